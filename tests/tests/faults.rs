//! Faults: the real binary interrupted at any moment, run twice at once,
//! losing a netns mid-run, fed a broken pluto, and missing kernel files.
//! Each ends with its documented exit code and a report or one clear error
//! line, never a panic, and leaves no BPF program, map or link behind.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use tests::{
    Namespaces, Tracer, assert_no_panic, assert_one_error_line, assert_reported, binary,
    blocked_pair, output_within, require_root, scratch, send_blocked, sh, sh_line, wait_blocked,
};

/// Runs of the tracer, one at a time: they look at kernel-wide BPF objects.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A BPF program, map or link, by its kernel id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Bpf {
    Prog(u64),
    Map(u64),
    Link(u64),
}

/// The BPF objects `pid` holds a descriptor of (its fdinfo says).
fn held_by(pid: u32) -> BTreeSet<Bpf> {
    let mut held = BTreeSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return held;
    };
    for fd in fds.flatten() {
        let Ok(info) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        for line in info.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(id) = value.trim().parse() else {
                continue;
            };
            match key {
                "prog_id" => held.insert(Bpf::Prog(id)),
                "map_id" => held.insert(Bpf::Map(id)),
                "link_id" => held.insert(Bpf::Link(id)),
                _ => false,
            };
        }
    }
    held
}

/// The BPF objects any process holds.
fn held_by_anyone() -> BTreeSet<Bpf> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .flat_map(held_by)
        .collect()
}

/// Every program, map and link loaded in the kernel, with its name (links
/// have none).
fn loaded() -> BTreeMap<Bpf, String> {
    let mut all = BTreeMap::new();
    for kind in ["prog", "map", "link"] {
        let out = sh_line(&format!("bpftool --json {kind} show"));
        let list: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
        for object in list.as_array().expect("bpftool list") {
            let id = object["id"].as_u64().expect("id");
            let bpf = match kind {
                "prog" => Bpf::Prog(id),
                "map" => Bpf::Map(id),
                _ => Bpf::Link(id),
            };
            all.insert(bpf, object["name"].as_str().unwrap_or("").to_string());
        }
    }
    all
}

/// Waits until the kernel has freed (it does so shortly after the last
/// descriptor closes) every object in `held`, and no program or map named
/// like ours appeared since `before` that no process holds (pinned, or
/// kept by a child).
fn assert_nothing_left(
    held: &BTreeSet<Bpf>,
    our_names: &BTreeSet<String>,
    before: &BTreeMap<Bpf, String>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = loaded();
        let new_of_ours: BTreeSet<Bpf> = now
            .iter()
            .filter(|(o, name)| !before.contains_key(o) && our_names.contains(*name))
            .map(|(o, _)| *o)
            .collect();
        let unowned = if new_of_ours.is_empty() {
            BTreeSet::new()
        } else {
            &new_of_ours - &held_by_anyone()
        };
        let left: Vec<(&Bpf, &String)> = now
            .iter()
            .filter(|(o, _)| held.contains(o) || unowned.contains(o))
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still loaded 30 s after xfrm-trace exited: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// When a signal reaches the tracer.
#[derive(Clone, Copy, Debug)]
enum Moment {
    /// This long after spawn: reading BTF, loading and attaching programs.
    AfterSpawn(Duration),
    /// As soon as it holds a BPF object: loading and attaching.
    Loading,
    /// As soon as it says it is attached (the ready file).
    Attached,
    /// A second into the watch.
    Watching,
}

/// SIGINT and SIGTERM during start-up end the process at once (killed by
/// the signal, nothing printed); once attached they end the watch with the
/// report and exit 0. Either way promptly, and no program, map or link of
/// ours stays loaded.
/// Runs on: host, 6.1 (faults that involve the kernel: once with tracepoints, once with a real fentry attach)
#[test]
fn sigint_and_sigterm_at_any_moment_end_promptly_and_leave_nothing_loaded() {
    require_root();
    let _serial = serial();
    let before = loaded();
    let mut our_names = BTreeSet::new();
    let (mut killed, mut reported) = (0, 0);
    let ms = Duration::from_millis;
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // Watching first: it learns our object names for the later checks.
        for moment in [
            Moment::Watching,
            Moment::AfterSpawn(ms(0)),
            Moment::AfterSpawn(ms(100)),
            Moment::AfterSpawn(ms(300)),
            Moment::Loading,
            Moment::Attached,
        ] {
            let (json, ready) = (scratch("signal.json"), scratch("signal.ready"));
            let _ = std::fs::remove_file(&json);
            let _ = std::fs::remove_file(&ready);
            let child = Command::new(binary())
                .arg("--json")
                .arg(&json)
                .arg("--ready-file")
                .arg(&ready)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start xfrm-trace");
            let pid = child.id();
            let spawned = Instant::now();
            let mut attached_at = None;
            // Every object it ever held, sampled until the signal.
            let mut held = BTreeSet::new();
            loop {
                held.extend(held_by(pid));
                if attached_at.is_none() && ready.exists() {
                    attached_at = Some(Instant::now());
                }
                let due = match moment {
                    Moment::AfterSpawn(delay) => spawned.elapsed() >= delay,
                    Moment::Loading => !held.is_empty(),
                    Moment::Attached => attached_at.is_some(),
                    Moment::Watching => attached_at.is_some_and(|t| t.elapsed() >= ms(1000)),
                };
                if due {
                    break;
                }
                assert!(
                    spawned.elapsed() < Duration::from_secs(180),
                    "not attached after 180 s"
                );
                std::thread::sleep(ms(10));
            }
            if let Moment::Watching = moment {
                let now = loaded();
                our_names.extend(
                    held.iter()
                        .filter_map(|o| now.get(o))
                        .filter(|name| !name.is_empty())
                        .cloned(),
                );
                assert!(!our_names.is_empty(), "no BPF object held while watching");
            }
            let was_attached = ready.exists();
            let signalled = Instant::now();
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).expect("signal");
            // On the host it takes 0.4 s; TCG VMs detach fentry programs slowly.
            let out = output_within(child, Duration::from_secs(30));
            eprintln!(
                "{signal} at {moment:?} ({} BPF objects held): {} after {:.2} s",
                held.len(),
                out.status,
                signalled.elapsed().as_secs_f64()
            );
            assert_no_panic(&out);
            if out.status.signal() == Some(signal as i32) {
                // Killed: only possible before the handlers are installed,
                // which is before the ready file.
                assert!(!was_attached, "killed by {signal} while watching");
                assert!(
                    out.stdout.is_empty() && out.stderr.is_empty(),
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                killed += 1;
            } else {
                let report = assert_reported(&out, &json);
                assert!(report["duration_secs"].as_f64().unwrap() > 0.0);
                reported += 1;
            }
            assert_nothing_left(&held, &our_names, &before);
        }
    }
    // Both outcomes were seen: a signal before the handlers, and after.
    assert!(
        killed >= 2 && reported >= 4,
        "killed {killed}, reported {reported}"
    );
}

/// The blocked datagrams a report saw in `b` (netns `inode`): its IPv4
/// drops (nothing else is sent to `b`) and its XfrmInPolBlock delta.
fn blocked_in_report(report: &Value, inode: u64) -> (u64, u64) {
    let drops = report["drops"]
        .as_array()
        .expect("drops")
        .iter()
        .filter(|d| d["netns"] == inode && d["protocol"] == "ipv4")
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    let counted = report["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter(|c| c["name"] == "XfrmInPolBlock")
        .flat_map(|c| c["by_netns"].as_array().unwrap())
        .filter(|n| n["netns"] == inode)
        .map(|n| n["delta"].as_u64().unwrap())
        .sum();
    (drops, counted)
}

/// A second instance while one runs: both work, each with its own
/// programs and maps, and count the same drops exactly; the second's exit
/// does not disturb the first.
/// Runs on: host, 6.1 (faults that involve the kernel: once with tracepoints, once with a real fentry attach)
#[test]
fn a_second_instance_works_alongside_the_first() {
    require_root();
    let _serial = serial();
    const SENT: u64 = 6;
    let ns = blocked_pair("xs");
    let b = ns.inode("b");
    let at_start = ns.xfrm_stat("b")["XfrmInPolBlock"];
    let (json1, json2) = (scratch("first.json"), scratch("second.json"));
    let mut first = Tracer::start(
        &["--json", json1.to_str().unwrap()],
        &scratch("first.ready"),
    );
    let mut second = Tracer::start(
        &["--json", json2.to_str().unwrap()],
        &scratch("second.ready"),
    );
    send_blocked(&ns, SENT as usize);
    wait_blocked(&ns, at_start, SENT);
    let report2 = assert_reported(&second.interrupt(), &json2);
    send_blocked(&ns, SENT as usize);
    wait_blocked(&ns, at_start, 2 * SENT);
    let report1 = assert_reported(&first.interrupt(), &json1);
    assert_eq!(blocked_in_report(&report2, b), (SENT, SENT), "second");
    assert_eq!(
        blocked_in_report(&report1, b),
        (2 * SENT, 2 * SENT),
        "first"
    );
}

/// A netns deleted while the run watches it: the run does not keep it
/// alive (its veth goes with it), ends normally, and reports what
/// happened there under its name.
/// Runs on: host, 6.1 (faults that involve the kernel: once with tracepoints, once with a real fentry attach)
#[test]
fn a_netns_deleted_mid_run_is_let_go_and_still_reported() {
    require_root();
    let _serial = serial();
    const SENT: u64 = 5;
    let ns = blocked_pair("xd");
    let (b, b_name) = (ns.inode("b"), ns.name("b").to_string());
    // Some XFRM state to watch: a policy with a template, and an SA where
    // the kernel has ESP (the VMs; the host has none).
    ns.ip_line("b", "xfrm policy add src 10.0.2.0/24 dst 10.0.1.0/24 dir out tmpl src 198.51.100.3 dst 198.51.100.2 proto esp mode tunnel");
    let _ = Command::new("ip")
        .args([
            "-n",
            &b_name,
            "xfrm",
            "state",
            "add",
            "src",
            "198.51.100.3",
            "dst",
            "198.51.100.2",
            "proto",
            "esp",
            "spi",
            "0x1001",
            "mode",
            "tunnel",
            "aead",
            "rfc4106(gcm(aes))",
            "0x0102030405060708090a0b0c0d0e0f1011121314",
            "128",
        ])
        .output();
    let at_start = ns.xfrm_stat("b")["XfrmInPolBlock"];
    let json = scratch("netns-gone.json");
    let mut tracer = Tracer::start(
        &["--json", json.to_str().unwrap()],
        &scratch("netns-gone.ready"),
    );
    send_blocked(&ns, SENT as usize);
    wait_blocked(&ns, at_start, SENT);
    // Where the teardown cannot be hooked (the host) the run reads every
    // namespace's counters each second: let one reading see the drops.
    std::thread::sleep(Duration::from_millis(1500));
    sh_line(&format!("ip netns del {b_name}"));
    // The run looks for vanished namespaces every 5 s.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Command::new("ip")
        .args(["-n", ns.name("a"), "link", "show", "ia"])
        .output()
        .expect("ip")
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "deleted netns still alive 15 s later: xfrm-trace holds it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = assert_reported(&tracer.interrupt(), &json);
    assert_eq!(
        blocked_in_report(&report, b),
        (SENT, SENT),
        "{:#}\n{:#}",
        report["drops"],
        report["counters"]
    );
    let teardown = &report["netns_teardown_hooks"];
    if std::env::var("XFRM_TRACE_EXPECT_MODE").as_deref() == Ok("fentry") {
        assert_eq!(
            teardown["attached"],
            serde_json::json!(["xfrm_net_exit (fentry)"]),
            "{teardown:#}"
        );
    }
    assert!(
        report["netns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["inode"] == b && n["label"] == b_name.as_str()),
        "{:#}",
        report["netns"]
    );
}

/// `ipsec` that prints a status cut short, garbage, or hangs: the run
/// succeeds, and the pluto's problems say so in one line (its log is
/// unknown: no running pluto owns the socket).
/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn broken_pluto_output_is_one_problem_line_and_the_run_succeeds() {
    require_root();
    let _serial = serial();
    let dir = scratch("fake-ipsec");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("pluto.ctl");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("socket"));
    let calls = dir.join("calls");
    let orphan = dir.join("orphan.pid");
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cut_short =
        "000 Connection list:\n000  \n000 \"lab\": 10.0.1.0/24===192.0.2.1[@west]...192.";
    let cases = [
        (
            format!("printf '{cut_short}'"),
            "unreadable pluto status: no `Bare Shunt list:` at the end (output cut short?)"
                .to_string(),
        ),
        (
            "printf '\\001\\377\\376garbage\\000\\n\\033[2J'".to_string(),
            "unreadable pluto status: no `Connection list:` (not --status output?)".to_string(),
        ),
        (
            "printf '000 Connection list:\\n000 \"lab\": \\377\\376\\n000 Bare Shunt list:\\n'"
                .to_string(),
            "unreadable pluto status: line 2: no routing after the topology of \"lab\"".to_string(),
        ),
        (
            // Not `exec`: the script's own child must be killed too.
            format!("sleep 600 & echo $! > {}; wait", orphan.display()),
            format!(
                "`ipsec whack --status` on {} did not answer within 5 s",
                socket.display()
            ),
        ),
    ];
    for (body, expected) in cases {
        let script = dir.join("ipsec");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$@\" >> {}\n{body}\n", calls.display()),
        )
        .unwrap();
        sh(&["chmod", "+x", script.to_str().unwrap()]);
        let _ = std::fs::remove_file(&calls);
        let json = dir.join("report.json");
        let out = Command::new(binary())
            .env("PATH", &path)
            .args(["--duration", "1s", "--pluto-socket"])
            .arg(&socket)
            .arg("--json")
            .arg(&json)
            .output()
            .expect("run xfrm-trace");
        let report = assert_reported(&out, &json);
        let pluto = &report["pluto"];
        assert_eq!(pluto["problems"], serde_json::json!([]), "{pluto:#}");
        assert_eq!(
            pluto["instances"][0]["problems"],
            serde_json::json!([
                expected,
                "pluto's log destination is unknown (socket given without a running pluto)"
            ]),
            "{body}"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches(&expected).count(), 1, "{text}");
        let asked = std::fs::read_to_string(&calls).unwrap_or_default();
        if expected.contains("did not answer") {
            // Asked once: a pluto that hangs is not asked again.
            assert_eq!(asked.lines().count(), 1, "{asked}");
            let pid: i32 = std::fs::read_to_string(&orphan)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let alive = Path::new(&format!("/proc/{pid}")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z ");
            assert!(!alive, "the hanging whack's child {pid} survived");
        } else {
            assert!(
                asked.lines().count() >= 2,
                "asked at start and end: {asked}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the binary in a private mount namespace after `setup` (shell, run
/// by the process that then becomes the binary: `$$` is its pid), so what
/// `setup` mounts is seen by that run only.
fn with_private_mounts(setup: &str, args: &[&str]) -> Output {
    Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount --make-rprivate / && {setup} && exec \"$0\" \"$@\""
        ))
        .arg(binary())
        .args(args)
        .output()
        .expect("unshare")
}

/// No kernel BTF (hidden, empty or cut short): no offsets, so no run; one
/// clear line, the cause said once, and exit 1.
/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn without_kernel_btf_the_run_fails_in_one_line() {
    require_root();
    let _serial = serial();
    let truncated = scratch("btf-truncated");
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("this kernel's BTF");
    std::fs::write(&truncated, &btf[..btf.len().min(4096)]).unwrap();
    // (setup, the error line's start and end: the truncated file's line
    // names the size of this kernel's type section).
    for (setup, start, end) in [
        (
            "mount -t tmpfs none /sys/kernel/btf".to_string(),
            "kernel BTF not available at /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF?): No such file or directory (os error 2)",
            "",
        ),
        (
            "mount --bind /dev/null /sys/kernel/btf/vmlinux".to_string(),
            "cannot parse BTF /sys/kernel/btf/vmlinux: the file is empty",
            "",
        ),
        (
            format!(
                "mount --bind {} /sys/kernel/btf/vmlinux",
                truncated.display()
            ),
            "cannot parse BTF /sys/kernel/btf/vmlinux: the type section (",
            " after the header) runs past the end of the data (4096 bytes)",
        ),
    ] {
        let out = with_private_mounts(&setup, &["--duration", "1s"]);
        assert_one_error_line(&out, start);
        let line = String::from_utf8_lossy(&out.stderr);
        let line = line.trim_end();
        assert!(
            line.starts_with(&format!("xfrm-trace: error: {start}")) && line.ends_with(end),
            "{line}"
        );
        assert!(out.stdout.is_empty());
    }
    let _ = std::fs::remove_file(&truncated);
}

/// `/proc/net/xfrm_stat` missing (a kernel without CONFIG_XFRM_STATISTICS)
/// or unreadable: the run goes on without counter deltas and says so once
/// on stderr and in the report; every netns is still named.
/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn without_xfrm_stat_the_run_says_counters_are_unavailable() {
    require_root();
    let _serial = serial();
    let ns = Namespaces::create("xc", &["a"]);
    // A tmpfs over our /proc/<pid>/net hides the kernel's files from the
    // main thread, which reads xfrm_stat (a mount on the file itself does
    // not hold: /proc/net entries are looked up afresh every time).
    for (setup, problem) in [
        (
            "true",
            "/proc/net/xfrm_stat is missing (kernel without CONFIG_XFRM_STATISTICS)",
        ),
        (
            "mkdir /proc/$$/net/xfrm_stat",
            "/proc/net/xfrm_stat cannot be read: Is a directory (os error 21)",
        ),
    ] {
        let json = scratch("no-xfrm-stat.json");
        let out = with_private_mounts(
            &format!("mount -t tmpfs none /proc/$$/net && {setup}"),
            &["--duration", "1s", "--json", json.to_str().unwrap()],
        );
        let report = assert_reported(&out, &json);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let said = stderr.lines().filter(|l| l.contains("xfrm_stat"));
        assert!(
            said.eq([format!("[WARN  xfrm_trace::trace] {problem}: no counter deltas").as_str()]),
            "{stderr}"
        );
        assert_eq!(report["counters_unavailable"], problem);
        assert_eq!(report["counters"], serde_json::json!([]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("not available: {problem}")),
            "{text}"
        );
        let labels: Vec<&str> = report["netns"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["label"].as_str())
            .collect();
        assert!(labels.contains(&ns.name("a")), "{labels:?}");
    }
}
