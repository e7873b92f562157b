//! The command line, signals, privileges and the metrics endpoint: the
//! real binary on the running kernel. Userspace behaviour, so the host
//! runs them and no VM.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::sys::signal::{Signal, kill};
use serde_json::Value;
use tests::{
    Namespaces, Tracer, assert_one_error_line, assert_reported, binary, require_root, scratch, sh,
    sh_line, typed,
};

/// Runs of the tracer, one at a time: the metrics test measures CPU time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(binary()).args(args).output().expect("run")
}

/// A closed SSH session (SIGHUP) ends the watch like Ctrl-C: the text
/// report is printed, the JSON written, exit 0.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_sighup_ends_the_run_with_its_report() {
    require_root();
    let _serial = serial();
    let json = scratch("sighup.json");
    let mut tracer = Tracer::start(
        &["--json", json.to_str().unwrap()],
        &scratch("sighup.ready"),
    );
    let pid = nix::unistd::Pid::from_raw(tracer.child.id() as i32);
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    let out = tracer.take_output();
    let report = typed(&assert_reported(&out, &json));
    assert!(report.duration_secs > 0.0, "{report:?}");
}

/// The pid of the process whose command line holds `needle`.
fn pid_with_argument(needle: &str) -> Option<i32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .split('\0')
                .any(|arg| arg == needle)
                .then_some(pid)
        })
}

/// The terminal itself goes (the SSH session's pty is closed): the tracer,
/// its controlling process, gets SIGHUP and can no longer write there, and
/// still writes the pcapng and the JSON report.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_terminal_hangup_still_writes_the_outputs() {
    require_root();
    let _serial = serial();
    let (json, pcap, ready) = (
        scratch("hangup.json"),
        scratch("hangup.pcapng"),
        scratch("hangup.ready"),
    );
    for path in [&json, &pcap, &ready] {
        let _ = std::fs::remove_file(path);
    }
    let json_arg = json.to_str().unwrap().to_string();
    // script(1) runs it on a new pty, as the controlling process of its
    // session; killing script closes the pty's master side.
    let mut terminal = Command::new("script")
        .args(["--quiet", "--command"])
        .arg(format!(
            "exec {} --json {json_arg} --pcap {} --ready-file {}",
            binary().display(),
            pcap.display(),
            ready.display()
        ))
        .arg("/dev/null")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("script");
    let started = Instant::now();
    while !ready.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "not attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    let tracer = pid_with_argument(&json_arg).expect("the tracer's pid");
    terminal.kill().expect("close the terminal");
    terminal.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(format!("/proc/{tracer}")).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let still_running = std::fs::metadata(format!("/proc/{tracer}")).is_ok();
    if still_running {
        let _ = kill(nix::unistd::Pid::from_raw(tracer), Signal::SIGKILL);
    }
    assert!(!still_running, "the tracer outlived its terminal by 30 s");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).expect("JSON report written"))
        .expect("valid JSON");
    assert_eq!(report["schema"], "xfrm-trace/1");
    assert!(pcap.exists(), "pcapng written");
    for path in [&json, &pcap, &ready] {
        let _ = std::fs::remove_file(path);
    }
}

/// Under `nohup` (SIGHUP ignored) a hangup does not end the run: it goes
/// on until stopped, then reports.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_sighup_under_nohup_is_ignored() {
    require_root();
    let _serial = serial();
    let json = scratch("nohup.json");
    let ready = scratch("nohup.ready");
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new("nohup")
        .arg(binary())
        .arg("--json")
        .arg(&json)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("nohup xfrm-trace");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let started = Instant::now();
    while !ready.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "not attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        child.try_wait().unwrap().is_none() && !json.exists(),
        "ended by SIGHUP under nohup"
    );
    kill(pid, Signal::SIGINT).expect("SIGINT");
    let out = tests::output_within(child, Duration::from_secs(30));
    assert_reported(&out, &json);
}

/// `--netns` naming no namespace fails before attaching, listing those
/// there are; existing ones (by name or inode) are accepted.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_unknown_netns_is_an_error_naming_those_that_exist() {
    require_root();
    let _serial = serial();
    let ns = Namespaces::create("xn", &["a"]);
    let out = run(&["--netns", "no-such-name", "--duration", "1s"]);
    assert_one_error_line(
        &out,
        "xfrm-trace: error: --netns: no network namespace \"no-such-name\"; there are: host, ",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.split(", ").any(|n| n.trim() == ns.name("a")),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    let json = scratch("netns-known.json");
    let inode = ns.inode("a").to_string();
    let out = run(&[
        "--netns",
        ns.name("a"),
        "--netns",
        &inode,
        "--duration",
        "1s",
        "--json",
        json.to_str().unwrap(),
    ]);
    let report = typed(&assert_reported(&out, &json));
    let labels: Vec<&str> = report.netns.iter().map(|n| n.label.as_str()).collect();
    assert_eq!(labels, [ns.name("a")]);
}

/// `--pluto-socket` that is a plain file: one error line, no run that
/// silently asks no pluto. (A missing socket is pluto being down: the run
/// reports it, see host.rs ike_watch_counts_each_peer_exactly.)
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_pluto_socket_that_is_not_a_socket_is_an_error() {
    require_root();
    let file = scratch("not-a-socket.ctl");
    std::fs::write(&file, "").unwrap();
    let path = file.to_str().unwrap();
    let out = run(&["--pluto-socket", path, "--duration", "1s"]);
    assert_one_error_line(
        &out,
        &format!("xfrm-trace: error: --pluto-socket: {path} is not a socket"),
    );
    std::fs::remove_file(&file).unwrap();
}

/// `--hooks fentry` or `--hooks kprobe` on a kernel where that method
/// hooks nothing is an error naming why, not a quiet tracepoint-only run.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_forced_hooks_that_cannot_attach_are_an_error() {
    require_root();
    let _serial = serial();
    let doctor: Value =
        serde_json::from_slice(&sh(&[binary().to_str().unwrap(), "doctor", "--json"]).stdout)
            .expect("doctor JSON");
    if doctor["mode"] != "tracepoint-only" {
        // Hooks attach here: the VM tests run the forced methods through.
        return;
    }
    for method in ["fentry", "kprobe"] {
        let out = run(&["--hooks", method, "--duration", "1s"]);
        assert_one_error_line(
            &out,
            &format!(
                "xfrm-trace: error: --hooks {method}: no XFRM function can be hooked with {method} on this kernel ("
            ),
        );
        assert!(out.stdout.is_empty());
    }
}

/// `--prometheus localhost:PORT`: the name is resolved and served.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_prometheus_resolves_host_names() {
    require_root();
    let _serial = serial();
    let ns = Namespaces::create("xh", &["m"]);
    let mut tracer = Tracer::start_in(
        Some(ns.name("m")),
        &["--prometheus", "localhost:9470"],
        &scratch("prometheus-localhost.ready"),
    );
    let (head, body) = ns.run_in("m", || scrape(("localhost", 9470), Duration::from_secs(5)));
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /metrics` to `address`, answered within `limit`: (head, body).
fn scrape(address: impl std::net::ToSocketAddrs, limit: Duration) -> (String, String) {
    let mut stream = TcpStream::connect(address).expect("connect to the metrics");
    stream.set_read_timeout(Some(limit)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("metrics answered in time");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    (head.to_string(), body.to_string())
}

/// User plus system CPU time of `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are
    // the 14th and 15th of the line.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// 1,100 idle connections to `--prometheus` (more than the tracer's 1,024
/// descriptors) neither starve a scrape nor spin a core.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_idle_metrics_connections_neither_starve_a_scrape_nor_spin() {
    require_root();
    let _serial = serial();
    const IDLE: usize = 1100;
    const PORT: u16 = 9471;
    let ns = Namespaces::create("xi", &["m"]);
    let mut tracer = Tracer::start_in(
        Some(ns.name("m")),
        &["--prometheus", &format!("127.0.0.1:{PORT}")],
        &scratch("idle.ready"),
    );
    let pid = tracer.child.id();
    // The tracer gets the usual default limit; this process holds the
    // idle connections and needs more.
    sh_line(&format!("prlimit --pid {pid} --nofile=1024:1024"));
    sh(&[
        "prlimit",
        "--pid",
        &std::process::id().to_string(),
        "--nofile=4096:",
    ]);
    let (idle, cpu, took, head, body) = ns.run_in("m", move || {
        let idle: Vec<TcpStream> = (0..IDLE)
            .map(|_| TcpStream::connect(("127.0.0.1", PORT)).expect("idle connection"))
            .collect();
        let before = cpu_time(pid);
        std::thread::sleep(Duration::from_secs(3));
        let cpu = cpu_time(pid) - before;
        eprintln!(
            "tracer CPU {cpu:?} in 3 s with {} idle connections",
            idle.len()
        );
        let started = Instant::now();
        let (head, body) = scrape(("127.0.0.1", PORT), Duration::from_secs(1));
        (idle.len(), cpu, started.elapsed(), head, body)
    });
    eprintln!("scrape answered in {took:?}");
    assert_eq!(idle, IDLE);
    assert!(
        cpu < Duration::from_millis(300),
        "tracer CPU {cpu:?} in 3 s"
    );
    assert!(took < Duration::from_secs(1), "scrape took {took:?}");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(body.contains("# TYPE xfrm_trace_info gauge"), "{body}");
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Out of file descriptors (a tracer limited to 16 more than it holds,
/// 100 idle connections): accept fails, and the endpoint waits instead of
/// spinning; once the clients go, a scrape answers within 2 s.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_metrics_out_of_descriptors_backs_off_and_recovers() {
    require_root();
    let _serial = serial();
    const IDLE: usize = 100;
    const PORT: u16 = 9472;
    let ns = Namespaces::create("xd", &["m"]);
    let mut tracer = Tracer::start_in(
        Some(ns.name("m")),
        &["--prometheus", &format!("127.0.0.1:{PORT}")],
        &scratch("descriptors.ready"),
    );
    let pid = tracer.child.id();
    let held = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={0}:{0}", held + 16);
    sh_line(&format!("prlimit --pid {pid} {limit}"));
    let (cpu, took, head) = ns.run_in("m", move || {
        let idle: Vec<TcpStream> = (0..IDLE)
            .map(|_| TcpStream::connect(("127.0.0.1", PORT)).expect("idle connection"))
            .collect();
        let before = cpu_time(pid);
        std::thread::sleep(Duration::from_secs(3));
        let cpu = cpu_time(pid) - before;
        eprintln!("tracer CPU {cpu:?} in 3 s out of descriptors");
        drop(idle);
        let started = Instant::now();
        // The queued connections are taken in rounds of ~16, 100 ms apart.
        let (head, _) = scrape(("127.0.0.1", PORT), Duration::from_secs(2));
        (cpu, started.elapsed(), head)
    });
    eprintln!("scrape answered in {took:?} once the idle connections closed");
    assert!(
        cpu < Duration::from_millis(300),
        "tracer CPU {cpu:?} in 3 s"
    );
    assert!(took < Duration::from_secs(2), "scrape took {took:?}");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A service user holding the capabilities runs and diagnoses like root;
/// root without them gets one line naming what is missing (no aya
/// warnings, no repeated error).
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_privilege_is_by_capabilities_not_uid() {
    require_root();
    let _serial = serial();
    let caps = "+bpf,+perfmon,+net_admin,+sys_admin,+dac_read_search";
    // As nobody: the JSON goes to stdout (the scratch directory is root's).
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(binary())
        .args(["--duration", "1s", "--json", "-"])
        .output()
        .expect("setpriv");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let doctor: Value =
        serde_json::from_slice(&sh(&[binary().to_str().unwrap(), "doctor", "--json"]).stdout)
            .expect("doctor JSON");
    assert_eq!(report["kernel"]["mode"], doctor["mode"], "{report}");
    let out = Command::new("setpriv")
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(binary())
        .args(["--duration", "1s"])
        .output()
        .expect("setpriv");
    assert_one_error_line(
        &out,
        "xfrm-trace: error: xfrm-trace needs root, or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH, to load eBPF programs and read other namespaces (missing: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_DAC_READ_SEARCH): run it with sudo",
    );
}

/// Without tracefs mounted (a private mount namespace without it), the
/// doctor predicts the mode the run has, and neither leaves tracefs
/// mounted behind it.
/// Runs on: host (signals, privileges, the metrics endpoint's limits, argument checks: userspace only)
#[test]
fn cli_without_tracefs_doctor_and_run_agree_and_unmount_it() {
    require_root();
    let _serial = serial();
    let json = scratch("no-tracefs.json");
    let doctor = scratch("no-tracefs-doctor.json");
    let tracefs_mounts = "awk '$3 == \"tracefs\"' /proc/self/mounts";
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount --make-rprivate / \
             && for m in $(awk '$3 == \"tracefs\" {{ print $2 }}' /proc/self/mounts); do umount \"$m\"; done \
             && echo before: $({tracefs_mounts}) \
             && \"$0\" doctor --json > {doctor} \
             && echo after doctor: $({tracefs_mounts}) \
             && \"$0\" --duration 1s --json {json} > /dev/null \
             && echo after run: $({tracefs_mounts})",
            doctor = doctor.display(),
            json = json.display(),
        ))
        .arg(binary())
        .output()
        .expect("unshare");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "before:\nafter doctor:\nafter run:\n"
    );
    let doctor: Value = serde_json::from_slice(&std::fs::read(&doctor).unwrap()).unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doctor["mode"], report["kernel"]["mode"]);
    assert_ne!(doctor["mode"], "counters-only");
    let _ = std::fs::remove_file(scratch("no-tracefs.json"));
    let _ = std::fs::remove_file(scratch("no-tracefs-doctor.json"));
}
