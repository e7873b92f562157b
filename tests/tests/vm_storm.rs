//! A drop storm: 4,000 XFRM drops per second for 30 s while the tracer
//! watches (needs the lab: VMs only).

use std::{
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{STORM_TARGET, Tracer, block_storm_path, scratch, status_kib};
use xfrm_trace::lab::{Host, Lab};

const STORM: Duration = Duration::from_secs(30);
/// The storm's rate. Unpaced, one sender under TCG has twice left a CPU
/// stuck for minutes in the softirq work of its own sends (a soft lockup
/// at `__xfrm_policy_check`'s patched entry, tracer attached): the test
/// then hung. `cargo xtask bench` floods unpaced and measures the rate.
/// Unpaced storms without and with the tracer have not reproduced it
/// since (docs/storm.md): the pacing stays until the test itself passes
/// unpaced reliably.
const RATE: u32 = 4000;
/// The memory bound for the tracer during a storm (resident).
const MAX_RSS_KIB: u64 = 64 * 1024;

fn in_pol_block(lab: &Lab, host: Host) -> u64 {
    lab.xfrm_stat(host).unwrap().0["XfrmInPolBlock"]
}

/// Waits until the router's counter stops moving (the last datagrams in
/// flight counted); returns its value.
fn settled(lab: &Lab) -> u64 {
    let started = Instant::now();
    let mut last = in_pol_block(lab, Host::Router);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = in_pol_block(lab, Host::Router);
        if now == last {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "XfrmInPolBlock still moving 30 s after the flood stopped"
        );
        last = now;
    }
}

/// Runs on: 6.1 (30 s of storm on the kernel the performance targets name)
#[test]
fn drop_storm_is_attributed_exactly_in_bounded_memory_and_ctrl_c_works() {
    let lab = Lab::create("storm").unwrap();
    block_storm_path(&lab);
    let target = STORM_TARGET.parse().unwrap();
    let router = lab.ns(Host::Router);
    let before = in_pol_block(&lab, Host::Router);

    // 30 s of storm, the tracer's memory read every second.
    let json = scratch("storm.json");
    let mut tracer = Tracer::start(&["--json", json.to_str().unwrap()], &scratch("storm.ready"));
    let pid = tracer.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = lab.flood_udp(Host::Whost, target, Some(RATE), stop.clone());
    let started = Instant::now();
    let mut peak_rss = 0;
    while started.elapsed() < STORM {
        std::thread::sleep(Duration::from_secs(1));
        peak_rss = peak_rss.max(status_kib(pid, "VmRSS"));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap().unwrap();
    let after = settled(&lab);
    let high_water = status_kib(pid, "VmHWM");
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kernel = after - before;
    eprintln!(
        "storm: {sent} sent, {kernel} XfrmInPolBlock in {:?} ({} per second); tracer RSS peak {peak_rss} KiB, high water {high_water} KiB",
        STORM,
        kernel / STORM.as_secs()
    );
    assert!(
        kernel >= 100 * STORM.as_secs(),
        "not a storm: {kernel} drops"
    );
    // During the storm; the start (parsing BTF) peaks higher: `high_water`.
    assert!(
        peak_rss > 0 && peak_rss < MAX_RSS_KIB,
        "VmRSS {peak_rss} KiB"
    );

    // Every increment attributed, exactly, at any rate.
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let counter = report["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "XfrmInPolBlock")
        .unwrap_or_else(|| panic!("no XfrmInPolBlock: {report:#}"));
    let on_router = counter["by_netns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["label"] == router.as_str())
        .unwrap();
    assert_eq!(on_router["delta"], kernel, "{counter:#}");
    assert_eq!(on_router["attributed"], kernel, "{counter:#}");
    assert_eq!(counter["gap"], 0, "{counter:#}");
    let dropped_at_forward: u64 = report["drops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["netns_label"] == router.as_str() && d["function"] == "ip_forward")
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped_at_forward, kernel);
    assert_eq!(report["drops_untracked"], 0);
    // Samples are rate-limited: what was not sent is counted and shown.
    let lost = report["attribution_errors"]["samples_lost"]
        .as_u64()
        .unwrap();
    assert!(lost > 0, "{:#}", report["attribution_errors"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "samples not sent (rate limit 64 per second and CPU; counts are exact): {lost}"
        )),
        "{text}"
    );

    // Ctrl-C in the middle of a storm: a prompt, clean exit with a report.
    // The storm goes on for 3 s after the signal. In one run of three on
    // 6.1 under TCG, a storm that went on after Ctrl-C until the tracer
    // exited kept it from exiting for over ten minutes (cause not found:
    // suspected the detach waiting for an RCU grace period while one vCPU
    // floods); every wait here is bounded, so such a run fails, not hangs.
    let json = scratch("storm-2.json");
    let mut tracer = Tracer::start(
        &["--quiet", "--json", json.to_str().unwrap()],
        &scratch("storm-2.ready"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flood = lab.flood_udp(Host::Whost, target, Some(RATE), stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    let interrupted = Instant::now();
    let pid = nix::unistd::Pid::from_raw(tracer.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let mut exit_time = None;
    while exit_time.is_none() && interrupted.elapsed() < Duration::from_secs(60) {
        if interrupted.elapsed() > Duration::from_secs(3) {
            stop.store(true, Ordering::Relaxed);
        }
        if let Ok(Some(_)) = tracer.child.try_wait() {
            exit_time = Some(interrupted.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let Some(exit_time) = exit_time else {
        panic!(
            "xfrm-trace still running 60 s after Ctrl-C:\n{}",
            tests::kernel_stacks(tracer.child.id())
        );
    };
    flood.join().unwrap().unwrap();
    let out = tracer.take_output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("storm: exit {exit_time:?} after Ctrl-C");
    // Under TCG with one vCPU flooding: the report, the JSON and the
    // detach of every program take about 6 s here; on the host the same
    // exit takes under a second.
    assert!(exit_time < Duration::from_secs(10), "{exit_time:?}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(
        report["counters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "XfrmInPolBlock" && c["attributed"].as_u64() > Some(0)),
        "{report:#}"
    );
}
