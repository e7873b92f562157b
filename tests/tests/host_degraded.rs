//! The summary on a degraded kernel, one that allows tracepoints only (the
//! host: fentry gives EPERM, kprobes are not built in): one short line per
//! capability, no gaps for counters that are only counted, and the
//! per-function details with `-v` and in `xfrm-trace doctor`.

use std::{net::UdpSocket, process::Command};

use serde_json::Value;
use tests::{Namespaces, Tracer, binary, require_root, scratch, sh};

/// The one reason this kernel gives for every function hook, from what
/// `doctor` found; `None` on a kernel that is not degraded that way.
fn degraded_reason() -> Option<&'static str> {
    let out = Command::new(binary())
        .args(["doctor", "--json"])
        .output()
        .expect("doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doctor: Value = serde_json::from_slice(&out.stdout).expect("doctor json");
    let error = |program: &str| {
        doctor["programs"][program]["error"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    (doctor["mode"] == "tracepoint-only"
        && error("fentry").contains("Operation not permitted")
        && error("kprobe").contains("devices/kprobe/type"))
    .then_some("this kernel allows neither fentry (EPERM) nor kprobes (not built in)")
}

/// Runs on: host (about tracepoint-only mode, the host's)
#[test]
fn degraded_kernel_summary_is_one_short_line_per_capability() {
    require_root();
    let Some(reason) = degraded_reason() else {
        eprintln!("skipped: this kernel can hook functions (fentry or kprobes)");
        return;
    };
    const BLOCKED: u64 = 5;
    // One namespace whose out policy blocks UDP to a neighbour on its
    // link: each send is refused and counted as XfrmOutPolBlock.
    let ns = Namespaces::create("xd", &["a"]);
    ns.ip_line("a", "link add v0 type veth peer name v1");
    ns.ip_line("a", "addr add 192.0.2.1/24 dev v0");
    ns.ip_line("a", "link set v0 up");
    ns.ip_line("a", "link set v1 up");
    ns.ip_line(
        "a",
        "xfrm policy add src 192.0.2.1/32 dst 192.0.2.2/32 proto udp dir out action block",
    );
    let before = ns.xfrm_stat("a")["XfrmOutPolBlock"];
    let json = scratch("degraded.json");
    let mut tracer = Tracer::start(
        &["-v", "--json", json.to_str().unwrap()],
        &scratch("degraded.ready"),
    );
    let refused = ns.run_in("a", || {
        let socket = UdpSocket::bind("192.0.2.1:0").expect("bind");
        (0..BLOCKED)
            .filter(|_| socket.send_to(b"blocked", "192.0.2.2:9").is_err())
            .count() as u64
    });
    assert_eq!(refused, BLOCKED);
    let out = tracer.interrupt();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(ns.xfrm_stat("a")["XfrmOutPolBlock"] - before, BLOCKED);

    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let counter = report["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "XfrmOutPolBlock")
        .unwrap_or_else(|| panic!("{report:#}"));
    // JSON keeps the gap; the text does not show it for a counted counter.
    assert_eq!(
        (
            &counter["coverage"],
            &counter["kernel_delta"],
            &counter["gap"]
        ),
        (
            &Value::from("counted"),
            &Value::from(BLOCKED),
            &Value::from(BLOCKED)
        )
    );

    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(
            &format!(
                "  {:<26} kernel +{BLOCKED:<6} attributed {:<6}",
                "XfrmOutPolBlock", 0
            )
            .as_str()
        ),
        "{text}"
    );
    for line in &lines {
        assert!(line.len() <= 200, "{} chars: {line}", line.len());
        assert!(!line.contains("GAP"), "{line}");
        assert!(
            !line.contains("__per_cpu_offset") && !line.contains("KALLSYMS_ALL"),
            "blames the per-CPU offset though nothing can be hooked: {line}"
        );
    }
    let see = "see `xfrm-trace doctor`, -v";
    for expected in [
        format!("per-packet attribution: not watched: {reason}; {see} (counters are counted only)"),
        format!("  MASQUERADE detection: not watched: {reason}; {see}"),
        format!("oversize ESP: not watched: {reason}; {see}"),
        format!(
            "namespace teardown: not watched: {reason}; {see} (deleted namespaces: counters as last read)"
        ),
    ] {
        assert_eq!(
            lines.iter().filter(|l| **l == expected).count(),
            1,
            "{expected:?} in {text}"
        );
    }
    // Nothing else speaks of hooks: the four lines above are all.
    assert_eq!(
        lines.iter().filter(|l| l.contains("fentry")).count(),
        4,
        "{text}"
    );

    // The details: every function and its own errors, with -v.
    for function in [
        "oversize ESP: not hooked: ip_do_fragment: ",
        "oversize ESP: not hooked: icmp6_send: ",
        "MASQUERADE detection: not hooked: __xfrm4_output: ",
        "not hooked: all brackets: ",
    ] {
        let detail = stderr
            .lines()
            .find(|l| l.contains(function))
            .unwrap_or_else(|| panic!("{function:?} not in -v output: {stderr}"));
        assert!(
            detail.contains("fentry: ")
                && detail.contains("Operation not permitted (os error 1)")
                && detail.contains("kprobe: ")
                && detail.contains("/sys/bus/event_source/devices/kprobe/type"),
            "{detail}"
        );
    }

    // And in doctor: each program type's error, each function's hook.
    let doctor = sh(&[binary().to_str().unwrap(), "doctor"]);
    let doctor = String::from_utf8_lossy(&doctor.stdout);
    assert!(
        doctor
            .lines()
            .any(|l| l.starts_with("fentry/fexit   NO") && l.contains("Operation not permitted")),
        "{doctor}"
    );
    assert!(
        doctor
            .lines()
            .any(|l| l.starts_with("kprobe         NO") && l.contains("devices/kprobe/type")),
        "{doctor}"
    );
    assert!(
        doctor.lines().any(|l| l.starts_with("ip_do_fragment ")
            && l.ends_with("none: fentry: does not work here; kprobe: does not work here")),
        "{doctor}"
    );
}
