//! MASQUERADE before the IPsec policy lookup: every packet a NAT rule takes
//! out of the tunnel is reported (the router's capture confirms it was
//! plaintext), the finding's fix restores encryption and silences it, and an
//! ordinary MASQUERADE for non-IPsec traffic gives no finding. iptables and
//! nftables, forwarded and local traffic. VM-only: the host kernel has no
//! ESP and cannot hook XFRM functions.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tests::{Tracer, scratch};
use xfrm_trace::lab::{
    EAST_SUBNET, EAST_WAN, EHOST, Host, Lab, Packet, ROUTER_WEST, StaticIpsec, WEST_LAN,
    WEST_SUBNET, WEST_WAN, WHOST,
};

const COUNT: usize = 6;
const PORT: u16 = 7000;

fn lab(name: &str) -> Lab {
    let mut lab =
        Lab::create(&format!("xm{}{name}", std::process::id() % 10000)).expect("lab topology");
    lab.static_ipsec(&StaticIpsec::default())
        .expect("static SAs");
    // Neighbours resolved and the tunnel proven before anything is traced.
    let sink = lab.udp_sink(Host::Ehost, PORT).unwrap();
    lab.send_udp(Host::Whost, to(EHOST), 1, 64).unwrap();
    assert_eq!(
        sink.receive(1, Duration::from_secs(10)),
        1,
        "tunnel must work"
    );
    lab
}

fn to(host: &str) -> SocketAddr {
    format!("{host}:{PORT}").parse().unwrap()
}

/// Runs `action` while the tracer watches; returns its JSON report.
fn traced(name: &str, action: impl FnOnce()) -> Value {
    let json = scratch(&format!("{name}.json"));
    let mut tracer = Tracer::start(
        &["--json", json.to_str().unwrap()],
        &scratch(&format!("{name}.ready")),
    );
    action();
    std::thread::sleep(Duration::from_millis(500));
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "xfrm-trace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report")).expect("json");
    let _ = std::fs::remove_file(&json);
    let coverage = &report["masquerade"]["coverage"];
    for key in ["detected", "explained", "outcome"] {
        assert!(
            coverage[key]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f == "ipv4"),
            "{key}: {coverage:#}"
        );
    }
    report
}

fn findings(report: &Value) -> Vec<Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "masquerade_before_policy")
        .cloned()
        .collect()
}

fn leaks(report: &Value) -> Vec<Value> {
    report["masquerade"]["leaks"].as_array().unwrap().clone()
}

/// Captures on the router's west link while `action` runs.
fn on_the_wire(lab: &Lab, action: impl FnOnce()) -> Vec<Packet> {
    let capture = lab.capture(Host::Router, "r-west").unwrap();
    action();
    std::thread::sleep(Duration::from_millis(500));
    capture.stop()
}

fn plaintext_to_ehost(packets: &[Packet]) -> usize {
    let ehost: std::net::Ipv4Addr = EHOST.parse().unwrap();
    packets
        .iter()
        .filter(|p| p.protocol == 17 && p.dst == ehost && p.udp_dport == Some(PORT))
        .count()
}

fn esp_from_west(packets: &[Packet]) -> usize {
    let west: std::net::Ipv4Addr = WEST_WAN.parse().unwrap();
    packets
        .iter()
        .filter(|p| p.is_esp() && p.src == west)
        .count()
}

/// Forwarded (whost) and local (west, from its LAN address) datagrams.
fn send_both(lab: &Lab) {
    assert_eq!(lab.send_udp(Host::Whost, to(EHOST), COUNT, 100).unwrap(), 0);
    assert_eq!(
        lab.send_udp_ignoring_pmtu(Host::West, WEST_LAN, to(EHOST), COUNT, 100)
            .unwrap(),
        0
    );
}

fn out_policy_index(lab: &Lab) -> u64 {
    let out = lab
        .ip(
            Host::West,
            &[
                "-s",
                "xfrm",
                "policy",
                "get",
                "src",
                WEST_SUBNET,
                "dst",
                EAST_SUBNET,
                "dir",
                "out",
            ],
        )
        .unwrap();
    out.split_whitespace()
        .skip_while(|w| *w != "index")
        .nth(1)
        .expect("index")
        .parse()
        .unwrap()
}

fn run(args: &[&str]) {
    let (program, rest) = args.split_first().unwrap();
    xfrm_trace::lab::run(program, rest).unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

#[test]
fn masquerade_leak_is_reported_per_packet_and_the_return_fix_silences_it() {
    let lab = lab("ip");
    let west = lab.ns(Host::West);
    let index = out_policy_index(&lab);
    lab.exec(
        Host::West,
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
        ],
    )
    .unwrap();
    let sink = lab.udp_sink(Host::Ehost, PORT).unwrap();
    let mut wire = Vec::new();
    let report = traced("masq-leak", || {
        wire = on_the_wire(&lab, || send_both(&lab));
    });
    // The wire: every datagram left in clear, SNATed, none as ESP.
    assert_eq!(plaintext_to_ehost(&wire), 2 * COUNT, "{wire:#?}");
    assert_eq!(esp_from_west(&wire), 0, "{wire:#?}");
    let west_wan: std::net::Ipv4Addr = WEST_WAN.parse().unwrap();
    assert!(
        wire.iter()
            .filter(|p| p.udp_dport == Some(PORT))
            .all(|p| p.src == west_wan)
    );
    assert_eq!(sink.receive(1, Duration::from_millis(500)), 0);

    // The tool: one row per origin, exact counts, the real SA and policy.
    let rows = leaks(&report);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    for (origin, pre_src) in [("forwarded", WHOST), ("local", WEST_LAN)] {
        let row = rows
            .iter()
            .find(|r| r["origin"] == origin)
            .unwrap_or_else(|| panic!("no {origin} row: {rows:#?}"));
        assert_eq!(row["packets"], COUNT, "{row:#}");
        assert_eq!(row["sent"], COUNT, "{row:#}");
        assert_eq!(row["dropped"], 0, "{row:#}");
        assert_eq!(row["pre_src"], pre_src, "{row:#}");
        assert_eq!(row["pre_dst"], EHOST, "{row:#}");
        assert_eq!(row["post_src"], WEST_WAN, "{row:#}");
        assert_eq!(row["post_dst"], EHOST, "{row:#}");
        assert_eq!(row["proto"], "udp");
        assert_eq!(row["spi"], "0x00001001");
        assert_eq!(row["reqid"], 1);
        assert_eq!(row["sa_dst"], EAST_WAN);
        assert_eq!(row["policy_index"], index);
        assert_eq!(row["policy_src"], WEST_SUBNET);
        assert_eq!(row["policy_dst"], EAST_SUBNET);
        assert_eq!(row["netns_label"], west.as_str());
        assert_eq!(row["ifname"], "wan0");
    }
    assert_eq!(report["masquerade"]["unseen"], 0);
    let found = findings(&report);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        found[0]["summary"],
        format!(
            "{} packets from {WEST_SUBNET} to {EAST_SUBNET} were SNATed to {WEST_WAN} before IPsec and sent in clear on wan0 (netns {west})",
            2 * COUNT
        )
    );
    let fix = found[0]["fix"].as_str().unwrap();
    let first = fix.lines().next().unwrap();
    assert_eq!(
        first,
        format!(
            "ip netns exec {west} iptables -t nat -I POSTROUTING -s {WEST_SUBNET} -d {EAST_SUBNET} -j RETURN"
        )
    );

    // The fix, exactly as the finding gives it: encrypted again, no finding.
    run(&first.split_whitespace().collect::<Vec<_>>());
    let mut wire = Vec::new();
    let report = traced("masq-fixed", || {
        wire = on_the_wire(&lab, || send_both(&lab));
    });
    assert_eq!(esp_from_west(&wire), 2 * COUNT, "{wire:#?}");
    assert_eq!(plaintext_to_ehost(&wire), 0, "{wire:#?}");
    assert_eq!(sink.receive(2 * COUNT, Duration::from_secs(5)), 2 * COUNT);
    assert_eq!(findings(&report), Vec::<Value>::new());
    assert_eq!(leaks(&report), Vec::<Value>::new());
}

#[test]
fn ordinary_masquerade_for_non_ipsec_traffic_gives_no_finding() {
    let lab = lab("ok");
    // The correct gateway: tunnel traffic exempt, everything else NATed.
    for rule in [
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            WEST_SUBNET,
            "-d",
            EAST_SUBNET,
            "-j",
            "RETURN",
        ][..],
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "wan0",
            "-j",
            "MASQUERADE",
        ][..],
    ] {
        lab.exec(Host::West, "iptables", rule).unwrap();
    }
    let sink = lab.udp_sink(Host::Ehost, PORT).unwrap();
    let router = lab.udp_sink(Host::Router, PORT).unwrap();
    let mut wire = Vec::new();
    let report = traced("masq-ordinary", || {
        wire = on_the_wire(&lab, || {
            send_both(&lab);
            // Internet-bound: SNATed, in clear, as it should be.
            lab.send_udp(Host::Whost, to(ROUTER_WEST), COUNT, 100)
                .unwrap();
        });
    });
    let west_wan: std::net::Ipv4Addr = WEST_WAN.parse().unwrap();
    let router_west: std::net::Ipv4Addr = ROUTER_WEST.parse().unwrap();
    let natted = wire
        .iter()
        .filter(|p| p.src == west_wan && p.dst == router_west && p.udp_dport == Some(PORT))
        .count();
    assert_eq!(natted, COUNT, "{wire:#?}");
    assert_eq!(router.receive(COUNT, Duration::from_secs(5)), COUNT);
    assert_eq!(esp_from_west(&wire), 2 * COUNT, "{wire:#?}");
    assert_eq!(sink.receive(2 * COUNT, Duration::from_secs(5)), 2 * COUNT);
    assert_eq!(findings(&report), Vec::<Value>::new());
    assert_eq!(leaks(&report), Vec::<Value>::new());
}

#[test]
fn nftables_masquerade_is_detected_the_same_way() {
    let lab = lab("nf");
    let west = lab.ns(Host::West);
    for rule in [
        "add table ip labnat",
        "add chain ip labnat post { type nat hook postrouting priority 100 ; }",
        "add rule ip labnat post oifname \"wan0\" masquerade",
    ] {
        lab.exec(Host::West, "nft", &[rule]).unwrap();
    }
    let mut wire = Vec::new();
    let report = traced("masq-nft", || {
        wire = on_the_wire(&lab, || {
            lab.send_udp(Host::Whost, to(EHOST), COUNT, 100).unwrap();
        });
    });
    assert_eq!(plaintext_to_ehost(&wire), COUNT, "{wire:#?}");
    assert_eq!(esp_from_west(&wire), 0, "{wire:#?}");
    let rows = leaks(&report);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["packets"], COUNT);
    assert_eq!(rows[0]["sent"], COUNT);
    assert_eq!(rows[0]["origin"], "forwarded");
    assert_eq!(rows[0]["pre_src"], WHOST);
    assert_eq!(rows[0]["post_src"], WEST_WAN);
    let found = findings(&report);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        found[0]["summary"],
        format!(
            "{COUNT} packets from {WEST_SUBNET} to {EAST_SUBNET} were SNATed to {WEST_WAN} before IPsec and sent in clear on wan0 (netns {west})"
        )
    );
    // The nftables form of the fix, in this table and chain.
    let fix = found[0]["fix"].as_str().unwrap();
    let expression = format!("ip saddr {WEST_SUBNET} ip daddr {EAST_SUBNET} return");
    assert!(fix.contains(&expression), "{fix}");
    lab.exec(
        Host::West,
        "nft",
        &[&format!("insert rule ip labnat post {expression}")],
    )
    .unwrap();
    let sink = lab.udp_sink(Host::Ehost, PORT).unwrap();
    let wire = on_the_wire(&lab, || {
        lab.send_udp(Host::Whost, to(EHOST), COUNT, 100).unwrap();
    });
    assert_eq!(esp_from_west(&wire), COUNT, "{wire:#?}");
    assert_eq!(plaintext_to_ehost(&wire), 0);
    assert_eq!(sink.receive(COUNT, Duration::from_secs(5)), COUNT);
}
