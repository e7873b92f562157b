//! Namespaces as the report names them: deleted during the run (their
//! counters still reported, exactly, under the name they had), and the
//! tool itself running inside a named namespace (`ip netns exec`).

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    Namespaces, Tracer, blocked_pair, require_root, scratch, send_blocked, sh, sh_line,
    wait_blocked,
};

/// Sends `count` blocked datagrams from `a` to `b` and waits until `b`
/// counted them.
fn block(ns: &Namespaces, count: u64) {
    let at_start = ns.xfrm_stat("b")["XfrmInPolBlock"];
    send_blocked(ns, count as usize);
    wait_blocked(ns, at_start, count);
    assert_eq!(ns.xfrm_stat("b")["XfrmInPolBlock"], at_start + count);
}

/// Deletes both namespaces, `b` first, waiting until the kernel has torn
/// it down (its veth peer in `a` goes with it).
fn delete(ns: Namespaces) {
    sh(&["ip", "netns", "del", ns.name("b")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::process::Command::new("ip")
        .args(["-n", ns.name("a"), "link", "show", "ia"])
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
/// Runs on: 5.10, sid (the teardown hook on the oldest and newest kernel; 6.1 attaches it in the netns fault test)
#[test]
fn deleted_namespaces_keep_their_counts_and_names() {
    require_root();
    const FIRST: u64 = 30;
    const CHURN: usize = 3;
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
    block(&first, FIRST);
    delete(first);
    let mut churned = Vec::new();
    for i in 0..CHURN {
        let ns = blocked_pair(&format!("xc{i}"));
        // Named while it lives: the run looks every second.
        std::thread::sleep(Duration::from_millis(1500));
        block(&ns, EACH);
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
    // Read at teardown, not polled: exact whenever a namespace goes.
    assert_eq!(
        report["netns_teardown_hooks"]["attached"],
        serde_json::json!(["xfrm_net_exit (fentry)"]),
        "{:#}",
        report["netns_teardown_hooks"]
    );
    let blocked = counter(&report, "XfrmInPolBlock");
    // `blocked_pair` sends one datagram to resolve the neighbour: counted
    // too in the namespaces created during the run.
    let expected = FIRST + CHURN as u64 * (EACH + 1);
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
        assert_eq!(delta_of(name), EACH + 1);
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
        drops_there.iter().all(|d| d["ifname"] == "ib"),
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

/// Sends `count` datagrams from `src` (an address of `a`) to `dst`; returns
/// how many the kernel accepted (a blocking output policy refuses them).
fn send_from(ns: &Namespaces, src: &'static str, dst: &'static str, count: usize) -> usize {
    ns.run_in("a", move || {
        let socket = UdpSocket::bind((src, 0)).expect("bind");
        (0..count)
            .filter(|_| {
                std::thread::sleep(Duration::from_millis(5));
                socket.send_to(b"xfrm-trace finding test", dst).is_ok()
            })
            .count()
    })
}

/// Counters with no IKE daemon in sight, on a topology unlike the lab's,
/// with the tool run inside the gateway's own namespace (`ip netns exec b
/// xfrm-trace`): each counter that moved ends in a finding with its exact
/// count, where it happened (by that namespace's name, not "host"), and a
/// fix that runs there (`ip netns exec`).
/// Runs on: 6.12 (the diagnosis's rules, on brackets that every kernel runs in the attribution tests)
#[test]
fn every_counter_that_moved_ends_in_a_finding() {
    require_root();
    const NO_SA: usize = 37;
    const IN_BLOCKED: usize = 5;
    const MISMATCH: usize = 4;
    const OUT_BLOCKED: usize = 3;
    let ns = blocked_pair("xfx");
    let (a, b) = (ns.name("a").to_string(), ns.name("b").to_string());
    for extra in ["198.51.100.12/24", "198.51.100.13/24"] {
        ns.ip_line("a", &format!("addr add {extra} dev ia"));
    }
    let key = "0x0102030405060708090a0b0c0d0e0f1011121314";
    let sa = |role: &str, spi: &str| {
        ns.ip_line(
            role,
            &format!("xfrm state add src 198.51.100.2 dst 198.51.100.3 proto esp spi {spi} mode tunnel aead rfc4106(gcm(aes)) {key} 128"),
        );
    };
    // a encrypts port 7000 to b with SPI 0x2002; b only has 0x3003.
    sa("a", "0x2002");
    sa("b", "0x3003");
    ns.ip_line(
        "a",
        "xfrm policy add src 198.51.100.2/32 dst 198.51.100.3/32 proto udp dport 7000 dir out tmpl src 198.51.100.2 dst 198.51.100.3 proto esp mode tunnel",
    );
    // b blocks .12 and wants ESP from .13; a blocks sends to .99.
    ns.ip_line(
        "b",
        "xfrm policy add src 198.51.100.12/32 dst 198.51.100.3/32 dir in action block",
    );
    ns.ip_line(
        "b",
        "xfrm policy add src 198.51.100.13/32 dst 198.51.100.3/32 dir in tmpl src 198.51.100.13 dst 198.51.100.3 proto esp mode tunnel",
    );
    ns.ip_line(
        "a",
        "xfrm policy add dst 198.51.100.99/32 dir out action block",
    );
    // Resolve the neighbours before the run.
    sh_line(&format!("ip netns exec {a} ping -c1 -W2 198.51.100.3"));
    let json = scratch("every-counter.json");
    let mut tracer = Tracer::start_in(
        Some(&b),
        &["--json", json.to_str().unwrap()],
        &scratch("every-counter.ready"),
    );
    assert_eq!(
        send_from(&ns, "198.51.100.2", "198.51.100.3:7000", NO_SA),
        NO_SA
    );
    assert_eq!(
        send_from(&ns, "198.51.100.12", "198.51.100.3:9", IN_BLOCKED),
        IN_BLOCKED
    );
    assert_eq!(
        send_from(&ns, "198.51.100.13", "198.51.100.3:9", MISMATCH),
        MISMATCH
    );
    assert_eq!(
        send_from(&ns, "198.51.100.2", "198.51.100.99:9", OUT_BLOCKED),
        0
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let findings = report["findings"].as_array().unwrap();
    let found = |kind: &str, netns: &str| -> &Value {
        let matching: Vec<&Value> = findings
            .iter()
            .filter(|f| f["kind"] == kind && f["netns_label"] == netns)
            .collect();
        assert_eq!(matching.len(), 1, "{kind} in {netns}: {findings:#?}");
        matching[0]
    };
    let no_sa = found("no_sa_for_spi", &b);
    assert_eq!(
        no_sa["summary"],
        format!(
            "{NO_SA} ESP packets from 198.51.100.2 to 198.51.100.3 for SPI 0x00002002, which this gateway has no SA for (netns {b}, XfrmInNoStates +{NO_SA})"
        )
    );
    assert!(
        no_sa["evidence"].to_string().contains(
            "ip xfrm state here has SPI 0x00003003 from 198.51.100.2 to 198.51.100.3, not 0x00002002"
        ),
        "{no_sa:#}"
    );
    assert!(
        no_sa["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("ip netns exec {b} ip xfrm state")),
        "{no_sa:#}"
    );
    let in_block = found("policy_block", &b);
    assert!(
        in_block["summary"].as_str().unwrap().starts_with(&format!(
            "{IN_BLOCKED} packets 198.51.100.12 -> 198.51.100.3 dropped by a blocking policy (policy "
        )) && in_block["summary"]
            .as_str()
            .unwrap()
            .ends_with(&format!("(netns {b}, XfrmInPolBlock +{IN_BLOCKED})")),
        "{in_block:#}"
    );
    assert!(
        in_block["fix"].as_str().unwrap().contains(&format!(
            "`ip netns exec {b} ip xfrm policy delete dir in index "
        )),
        "{in_block:#}"
    );
    let mismatch = found("template_mismatch", &b);
    assert!(
        mismatch["summary"].as_str().unwrap().starts_with(&format!(
            "{MISMATCH} packets 198.51.100.13 -> 198.51.100.3 matched a policy (policy "
        )) && mismatch["summary"]
            .as_str()
            .unwrap()
            .contains("they came in clear"),
        "{mismatch:#}"
    );
    let out_block = found("policy_block", &a);
    assert!(
        out_block["summary"]
            .as_str()
            .unwrap()
            .ends_with(&format!("(netns {a}, XfrmOutPolBlock +{OUT_BLOCKED})")),
        "{out_block:#}"
    );
    // Every counter that moved is explained, and the tool's own namespace
    // is called by its name; "host" is the initial one.
    let moved: Vec<&str> = report["counters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for name in &moved {
        assert!(
            findings.iter().any(|f| f["summary"]
                .as_str()
                .unwrap()
                .contains(&format!("{name} +"))),
            "{name} moved without a finding: {findings:#?}"
        );
    }
    let own = xfrm_trace::netns::initial_inode().unwrap();
    let netns = report["netns"].as_array().unwrap();
    assert!(
        netns.iter().any(|n| n["label"] == b.as_str())
            && netns
                .iter()
                .any(|n| n["label"] == "host" && n["inode"] == own),
        "{netns:#?}"
    );
    assert!(
        findings.iter().all(|f| f["netns_label"] != "host"),
        "{findings:#?}"
    );
}
