//! Helpers for the integration tests: namespaces that are always removed,
//! the binary under test, and the kernel's own counters.
//!
//! Tests send traffic only inside namespaces they create, to addresses
//! inside them.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use xfrm_trace::report::Report;

/// The `xfrm-trace` binary: `$XFRM_TRACE_BIN` (set by `cargo xtask test`),
/// else the release build, else the debug build.
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("XFRM_TRACE_BIN") {
        return PathBuf::from(path);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let release = root.join("target/release/xfrm-trace");
    if release.exists() {
        release
    } else {
        root.join("target/debug/xfrm-trace")
    }
}

/// A per-process scratch path under the temp dir.
pub fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("xfrm-trace-test-{}-{name}", std::process::id()))
}

/// Panics with a clear message unless root: these tests load eBPF programs
/// and create namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "integration tests must run as root (sudo ./x.sh test)"
    );
}

/// `sh` with the command written as one line (split on whitespace: for
/// arguments without spaces).
pub fn sh_line(line: &str) -> Output {
    sh(&line.split_whitespace().collect::<Vec<_>>())
}

/// Runs a command; panics with its output unless it succeeds.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Named network namespaces (`ip netns`), deleted on drop even when the
/// test panics.
pub struct Namespaces {
    pub names: Vec<String>,
}

impl Namespaces {
    /// Creates namespaces `<prefix>-<role>` for each role, unique per process.
    pub fn create(prefix: &str, roles: &[&str]) -> Self {
        let names: Vec<String> = roles
            .iter()
            .map(|r| format!("{prefix}{}-{r}", std::process::id()))
            .collect();
        let mut created = Self { names: Vec::new() };
        for name in &names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            sh_line(&format!("ip netns add {name}"));
            created.names.push(name.clone());
            sh_line(&format!("ip -n {name} link set lo up"));
        }
        created
    }

    pub fn name(&self, role: &str) -> &str {
        self.names
            .iter()
            .find(|n| n.ends_with(&format!("-{role}")))
            .unwrap_or_else(|| panic!("no namespace for role {role}"))
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, role: &str, args: &[&str]) {
        let mut full = vec!["ip", "-n", self.name(role)];
        full.extend_from_slice(args);
        sh(&full);
    }

    /// Runs `f` on a thread inside the namespace (setns is per thread).
    pub fn run_in<T: Send + 'static>(
        &self,
        role: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let path = PathBuf::from("/run/netns").join(self.name(role));
        std::thread::spawn(move || {
            let ns = File::open(&path).expect("open netns");
            setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    }

    /// The kernel's own `/proc/net/xfrm_stat` of the namespace.
    pub fn xfrm_stat(&self, role: &str) -> BTreeMap<String, u64> {
        let path = Path::new("/run/netns").join(self.name(role));
        let text = xfrm_trace::netns::read_proc_net(&path, "xfrm_stat").expect("read xfrm_stat");
        xfrm_trace::xfrm_stat::XfrmStat::parse(&text)
            .expect("parse xfrm_stat")
            .0
    }

    /// Inode of the namespace: how the tool names it in its report.
    pub fn inode(&self, role: &str) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(Path::new("/run/netns").join(self.name(role)))
            .expect("netns file")
            .ino()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// `ip -n <ns> <words>`, the command written as one line.
impl Namespaces {
    pub fn ip_line(&self, role: &str, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        self.ip(role, &words);
    }
}

/// Two namespaces `a` (198.51.100.2, veth `ia`) and `b` (198.51.100.3,
/// veth `ib`); `b` blocks UDP from `a` by an inbound policy, so each
/// datagram from `a` bumps b's XfrmInPolBlock once.
pub fn blocked_pair(prefix: &str) -> Namespaces {
    let ns = Namespaces::create(prefix, &["a", "b"]);
    let (a, b) = (ns.name("a").to_string(), ns.name("b").to_string());
    sh_line(&format!(
        "ip link add ia netns {a} type veth peer name ib netns {b}"
    ));
    ns.ip_line("a", "addr add 198.51.100.2/24 dev ia");
    ns.ip_line("a", "link set ia up");
    ns.ip_line("b", "addr add 198.51.100.3/24 dev ib");
    ns.ip_line("b", "link set ib up");
    ns.ip_line(
        "b",
        "xfrm policy add src 198.51.100.2/32 dst 198.51.100.3/32 proto udp dir in action block",
    );
    // Resolve the neighbour now, so every datagram below reaches `b`.
    send_blocked(&ns, 1);
    std::thread::sleep(Duration::from_millis(300));
    ns
}

/// Sends `count` datagrams from `a` to `b`'s discard port (blocked there).
pub fn send_blocked(ns: &Namespaces, count: usize) {
    ns.run_in("a", move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..count {
            socket
                .send_to(b"xfrm-trace blocked test", "198.51.100.3:9")
                .expect("send");
        }
    });
}

/// Waits until `b`'s kernel counted `count` blocked datagrams since `since`.
pub fn wait_blocked(ns: &Namespaces, since: u64, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ns.xfrm_stat("b")["XfrmInPolBlock"] < since + count {
        assert!(Instant::now() < deadline, "b never counted the datagrams");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Let the drop events land in the maps.
    std::thread::sleep(Duration::from_millis(300));
}

/// Runs `action` while `xfrm-trace <args> --json ...` watches, stops it
/// with Ctrl-C, checks it succeeded and returns its JSON report.
pub fn traced_report(name: &str, args: &[&str], action: impl FnOnce()) -> serde_json::Value {
    let json = scratch(&format!("{name}.json"));
    let mut all = vec!["--json", json.to_str().expect("scratch path")];
    all.extend_from_slice(args);
    let mut tracer = Tracer::start(&all, &scratch(&format!("{name}.ready")));
    action();
    // Let the last packets' events land before the maps are read.
    std::thread::sleep(Duration::from_millis(500));
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "xfrm-trace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_slice(&std::fs::read(&json).expect("report")).expect("json");
    let _ = std::fs::remove_file(&json);
    typed(&report);
    report
}

/// `traced_report`, read into the library's own type.
pub fn traced(name: &str, args: &[&str], action: impl FnOnce()) -> Report {
    typed(&traced_report(name, args, action))
}

/// The JSON report as `xfrm_trace::report::Report`: a field the binary
/// renamed or left out fails here, by name (the helpers that return the
/// JSON check it too).
pub fn typed(report: &serde_json::Value) -> Report {
    serde_json::from_value(report.clone())
        .unwrap_or_else(|e| panic!("the JSON report is not an xfrm-trace/1 Report: {e}"))
}

/// How long a tracer may take to exit once its run is over (the slowest
/// seen: 6 s under TCG while a drop storm goes on).
pub const EXIT_LIMIT: Duration = Duration::from_secs(120);

/// Where each thread of `pid` waits in the kernel, and its state: what a
/// test prints about a process that does not end.
pub fn kernel_stacks(pid: u32) -> String {
    let mut text = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task)");
    };
    for task in tasks.flatten() {
        let path = task.path();
        let read = |name: &str| std::fs::read_to_string(path.join(name)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_string();
        text.push_str(&format!(
            "thread {} {} {state}\n{}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("stack")
        ));
    }
    text
}

/// Waits at most `limit` for `child` to exit, and returns its output. One
/// still running then is killed, and fails the test with what each of its
/// threads was waiting for in the kernel.
pub fn output_within(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(child.wait_with_output()));
    match receiver.recv_timeout(limit) {
        Ok(output) => output.expect("wait for xfrm-trace"),
        Err(_) => {
            let stacks = kernel_stacks(pid);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("xfrm-trace still running {limit:?} after it was asked to stop:\n{stacks}");
        }
    }
}

/// A running `xfrm-trace`, killed on drop.
pub struct Tracer {
    pub child: Child,
}

impl Tracer {
    /// Starts the tracer with `args` and waits until it says its programs
    /// are attached.
    pub fn start(args: &[&str], ready_file: &Path) -> Self {
        Self::start_in(None, args, ready_file)
    }

    /// Like `start`, inside the named netns (`ip netns exec`) when given:
    /// for a tracer that listens, so no test talks to the host's own stack.
    pub fn start_in(netns: Option<&str>, args: &[&str], ready_file: &Path) -> Self {
        let _ = std::fs::remove_file(ready_file);
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = command
            .args(args)
            .arg("--ready-file")
            .arg(ready_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start xfrm-trace");
        let mut tracer = Self { child };
        let started = Instant::now();
        while !ready_file.exists() {
            if let Ok(Some(status)) = tracer.child.try_wait() {
                let out = tracer.take_output();
                panic!(
                    "xfrm-trace exited early ({status}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(180),
                "xfrm-trace not attached after 180 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        tracer
    }

    /// Waits for the run to end (at most `EXIT_LIMIT`, see
    /// `output_within`) and returns its output.
    pub fn take_output(&mut self) -> Output {
        let child = std::mem::replace(
            &mut self.child,
            Command::new("true").spawn().expect("spawn true"),
        );
        output_within(child, EXIT_LIMIT)
    }

    /// Sends SIGINT (as Ctrl-C does) and waits for the report.
    pub fn interrupt(&mut self) -> Output {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        self.take_output()
    }
}

impl Drop for Tracer {
    /// Kills the tracer and reaps it, but never waits long: a tracer stuck
    /// in the kernel must not hide the failing test's message behind a
    /// hang (the VM runner reports the stuck task's stack).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let started = Instant::now();
        while started.elapsed() < EXIT_LIMIT {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "xfrm-trace (pid {}) still running {EXIT_LIMIT:?} after SIGKILL:\n{}",
            self.child.id(),
            kernel_stacks(self.child.id())
        );
    }
}

/// One packet of a pcapng as tshark decodes it.
#[derive(Debug)]
pub struct PcapPacket {
    pub comment: String,
    pub src: String,
    pub dst: String,
    /// UDP destination port (empty for other protocols).
    pub dport: String,
}

/// The packets of a pcapng file as tshark decodes them.
pub fn pcap_packets(path: &Path) -> Vec<PcapPacket> {
    let out = sh(&[
        "tshark",
        "-r",
        path.to_str().unwrap(),
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-e",
        "frame.comment",
        "-e",
        "ip.src",
        "-e",
        "ip.dst",
        "-e",
        "udp.dstport",
    ]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            assert_eq!(f.len(), 4, "tshark line: {line}");
            PcapPacket {
                comment: f[0].to_string(),
                src: f[1].to_string(),
                dst: f[2].to_string(),
                dport: f[3].to_string(),
            }
        })
        .collect()
}

/// Where a drop storm goes: east's WAN address, which `block_storm_path`
/// makes the router refuse to forward for west's LAN.
pub const STORM_TARGET: &str = "203.0.113.1:9";

/// An XFRM `fwd` block policy on the router for west's LAN to east's WAN:
/// each datagram whost sends to `STORM_TARGET` is one XfrmInPolBlock on
/// the router (and one XFRM_POLICY drop at ip_forward).
pub fn block_storm_path(lab: &xfrm_trace::lab::Lab) {
    use xfrm_trace::lab::{Host, WEST_SUBNET};
    let target = STORM_TARGET.split(':').next().unwrap_or_default();
    lab.ip_line(
        Host::Router,
        &format!("xfrm policy add src {WEST_SUBNET} dst {target}/32 dir fwd action block"),
    )
    .expect("router block policy");
}

/// A `/proc/<pid>/status` value in KiB (`VmRSS`, `VmHWM`); 0 if unknown.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// No panic message or backtrace on stderr.
pub fn assert_no_panic(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
}

/// Exit code 1 with exactly one `xfrm-trace: error:` line naming `what`.
pub fn assert_one_error_line(out: &Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("xfrm-trace: error: "), "{stderr}");
    assert!(stderr.contains(what), "expected {what:?} in: {stderr}");
    assert_no_panic(out);
}

/// The run's exit and its report (text on stdout, JSON in `json`).
pub fn assert_reported(out: &Output, json: &Path) -> serde_json::Value {
    assert_no_panic(out);
    assert!(
        out.status.success(),
        "{}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("xfrm-trace: ") && text.contains("\nDiagnosis:"),
        "no report printed: {text}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(json).expect("JSON report written"))
            .expect("valid JSON");
    let _ = std::fs::remove_file(json);
    assert_eq!(typed(&report).schema, "xfrm-trace/1");
    report
}
