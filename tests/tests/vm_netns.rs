//! Namespaces as the report names them: deleted during the run (their
//! counters still reported, exactly, under the name they had), and the
//! tool itself running inside a named namespace (`ip netns exec`).

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{Namespaces, Tracer, require_root, scratch, sh};

/// Two namespaces joined by a veth; `b` blocks UDP from `a` by policy.
fn blocked_pair(prefix: &str) -> Namespaces {
    let ns = Namespaces::create(prefix, &["a", "b"]);
    let (a, b) = (ns.name("a").to_string(), ns.name("b").to_string());
    sh(&[
        "ip", "link", "add", "va", "netns", &a, "type", "veth", "peer", "name", "vb", "netns", &b,
    ]);
    ns.ip("a", &["addr", "add", "198.51.100.2/24", "dev", "va"]);
    ns.ip("a", &["link", "set", "va", "up"]);
    ns.ip("b", &["addr", "add", "198.51.100.3/24", "dev", "vb"]);
    ns.ip("b", &["link", "set", "vb", "up"]);
    ns.ip(
        "b",
        &[
            "xfrm",
            "policy",
            "add",
            "src",
            "198.51.100.2/32",
            "dst",
            "198.51.100.3/32",
            "proto",
            "udp",
            "dir",
            "in",
            "action",
            "block",
        ],
    );
    ns
}

/// Sends `count` datagrams from `a` to `b` and waits until `b` counted them.
fn send_blocked(ns: &Namespaces, count: u64) {
    let at_start = ns.xfrm_stat("b")["XfrmInPolBlock"];
    ns.run_in("a", move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..count {
            // The first may wait for the neighbour: resolved by then.
            let _ = socket.send_to(b"xfrm-trace netns test", "198.51.100.3:9");
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while ns.xfrm_stat("b")["XfrmInPolBlock"] < at_start + count {
        assert!(Instant::now() < deadline, "b never counted the datagrams");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ns.xfrm_stat("b")["XfrmInPolBlock"], at_start + count);
}

/// Deletes both namespaces, `b` first, waiting until the kernel has torn
/// it down (its veth peer in `a` goes with it).
fn delete(ns: Namespaces) {
    sh(&["ip", "netns", "del", ns.name("b")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::process::Command::new("ip")
        .args(["-n", ns.name("a"), "link", "show", "va"])
        .output()
        .expect("ip")
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "{} not torn down", ns.name("b"));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(ns);
}

fn counter<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {:#}", report["counters"]))
}

/// One namespace deleted mid-run that existed before it, and a churn of
/// namespaces created and deleted during it: every blocked datagram is in
/// the counter's kernel delta and attributed, under each namespace's name,
/// marked deleted, and no counter shows a negative gap. The tool runs
/// inside a named namespace of its own, which the report calls by that
/// name (not "host").
#[test]
fn deleted_namespaces_keep_their_counts_and_names() {
    require_root();
    const FIRST: u64 = 30;
    const CHURN: usize = 6;
    const EACH: u64 = 10;
    let tool = Namespaces::create("xnt", &["tool"]);
    let first = blocked_pair("xn0");
    let first_b = first.name("b").to_string();
    let json = scratch("netns-deleted.json");
    let mut tracer = Tracer::start_in(
        Some(tool.name("tool")),
        &["--json", json.to_str().unwrap()],
        &scratch("netns-deleted.ready"),
    );
    send_blocked(&first, FIRST);
    delete(first);
    let mut churned = Vec::new();
    for i in 0..CHURN {
        let ns = blocked_pair(&format!("xc{i}"));
        // Named while it lives: the run looks every second.
        std::thread::sleep(Duration::from_millis(1500));
        send_blocked(&ns, EACH);
        churned.push(ns.name("b").to_string());
        delete(ns);
    }
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let blocked = counter(&report, "XfrmInPolBlock");
    let expected = FIRST + CHURN as u64 * EACH;
    assert_eq!(blocked["kernel_delta"], expected, "{blocked:#}");
    assert_eq!(blocked["attributed"], expected, "{blocked:#}");
    assert_eq!(blocked["gap"], 0, "{blocked:#}");
    let by_netns = blocked["by_netns"].as_array().unwrap();
    let delta_of = |label: &str| {
        let rows: Vec<&Value> = by_netns.iter().filter(|n| n["label"] == label).collect();
        assert_eq!(rows.len(), 1, "{label}: {by_netns:#?}");
        assert_eq!(rows[0]["deleted"], true, "{label}: {:#}", rows[0]);
        rows[0]["delta"].as_u64().unwrap()
    };
    assert_eq!(delta_of(&first_b), FIRST);
    for name in &churned {
        assert_eq!(delta_of(name), EACH);
    }
    // The kernel reuses a deleted namespace's inode for a later one, so a
    // namespace's attributed share is spread by inode; the sum is exact.
    let attributed: u64 = by_netns
        .iter()
        .map(|n| n["attributed"].as_u64().unwrap())
        .sum();
    assert_eq!(attributed, expected, "{by_netns:#?}");
    for c in report["counters"].as_array().unwrap() {
        assert!(c["gap"].as_i64().unwrap() >= 0, "negative gap: {c:#}");
    }
    // Drops in a deleted namespace carry its name and its interface's.
    let drops_there: Vec<&Value> = report["drops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["netns_label"] == first_b.as_str())
        .collect();
    assert!(
        drops_there.iter().all(|d| d["ifname"] == "vb"),
        "{drops_there:#?}"
    );
    let netns = report["netns"].as_array().unwrap();
    let info = |label: &str| {
        netns
            .iter()
            .find(|n| n["label"] == label)
            .unwrap_or_else(|| panic!("{label} not in {netns:#?}"))
    };
    assert_eq!(info(&first_b)["deleted"], true);
    assert_eq!(info(tool.name("tool"))["deleted"], false);
    assert_eq!(info("host")["deleted"], false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("netns {first_b}")) && text.contains("(deleted during the run)"),
        "{text}"
    );
}
