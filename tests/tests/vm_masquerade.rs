//! MASQUERADE before the IPsec policy lookup: every packet a NAT rule takes
//! out of the tunnel is reported (the router's capture confirms it was
//! plaintext), the finding's fix restores encryption and silences it, and an
//! ordinary MASQUERADE for non-IPsec traffic gives no finding. iptables and
//! nftables, forwarded and local traffic. VM-only: the host kernel has no
//! ESP and cannot hook XFRM functions.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tests::{Tracer, pcap_packets, scratch, traced_report};
use xfrm_trace::lab::{
    Df, EAST_SUBNET, EAST_WAN, EHOST, Host, Lab, Packet, ROUTER_WEST, StaticIpsec, WEST_LAN,
    WEST_SUBNET, WEST_WAN, WHOST, ipv6,
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

/// Runs `action` while the tracer watches; returns its JSON report (the
/// sampled packets are in `scratch("<name>.pcapng")`).
fn traced(name: &str, action: impl FnOnce()) -> Value {
    let pcap = scratch(&format!("{name}.pcapng"));
    let report = traced_report(name, &["--pcap", pcap.to_str().unwrap()], action);
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
        lab.send_udp_df(
            Host::West,
            WEST_LAN,
            to(EHOST),
            COUNT,
            100,
            Df::SetIgnoringPmtu
        )
        .unwrap(),
        0
    );
}

fn out_policy_index(lab: &Lab) -> u64 {
    let out = lab
        .ip_line(
            Host::West,
            &format!("-s xfrm policy get src {WEST_SUBNET} dst {EAST_SUBNET} dir out"),
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
    lab.masquerade_everything(Host::West).unwrap();
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
    // The pcapng: each leaked datagram as it left, named by the finding.
    let packets = pcap_packets(&scratch("masq-leak.pcapng"));
    assert_eq!(packets.len(), 2 * COUNT, "{packets:#?}");
    assert_eq!(report["capture"]["leaks_captured"], 2 * COUNT);
    assert_eq!(report["capture"]["leaks_not_captured"], 0);
    for p in &packets {
        assert_eq!(
            (p.src.as_str(), p.dst.as_str(), p.dport.as_str()),
            (WEST_WAN, EHOST, PORT.to_string().as_str()),
            "{p:?}"
        );
        assert!(
            p.comment
                .starts_with("masquerade_before_policy: left in clear")
                && p.comment.contains(&format!(", netns {west} dev wan0"))
                && p.comment
                    .contains(&format!("SA spi 0x00001001 reqid 1 to {EAST_WAN}")),
            "{p:?}"
        );
    }
    for pre_src in [WHOST, WEST_LAN] {
        let matched = format!("policy matched {pre_src} -> {EHOST}, left as {WEST_WAN} -> {EHOST}");
        assert_eq!(
            packets
                .iter()
                .filter(|p| p.comment.contains(&matched))
                .count(),
            COUNT
        );
    }
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

/// Runs on: 6.1 (a MASQUERADE rule variant: the kernel path is the one the iptables test covers on every kernel)
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

/// Runs on: 6.1 (a MASQUERADE rule variant: the kernel path is the one the iptables test covers on every kernel)
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

/// The lab's IPv6 tunnel, and counters of what reaches the router.
fn ipv6_tunnel(lab: &Lab) {
    lab.ipv6_static_tunnel().unwrap();
    // What reaches the router from west, counted before routing (the
    // router has no route to the LANs and drops plaintext right after).
    for proto in ["udp", "esp"] {
        lab.exec(
            Host::Router,
            "ip6tables",
            &[
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "-i",
                "r-west",
                "-s",
                ipv6::WEST_WAN,
                "-p",
                proto,
            ],
        )
        .unwrap();
    }
}

/// Packets counted by the router's raw PREROUTING rule for `proto`.
fn router_v6_count(lab: &Lab, proto: &str) -> u64 {
    let out = lab
        .exec_line(Host::Router, "ip6tables -t raw -nvxL PREROUTING")
        .unwrap();
    // No target: the columns are pkts bytes prot ...; prot by name or number.
    let number = if proto == "udp" { "17" } else { "50" };
    out.lines()
        .find(|l| matches!(l.split_whitespace().nth(2), Some(p) if p == proto || p == number))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no {proto} rule: {out}"))
        .parse()
        .unwrap()
}

fn send_v6(lab: &Lab, count: usize) -> usize {
    let to: SocketAddr = format!("[{}]:{PORT}", ipv6::EHOST).parse().unwrap();
    xfrm_trace::netns::run_in(&lab.ns_path(Host::Whost), move || {
        let socket = std::net::UdpSocket::bind("[::]:0")?;
        Ok((0..count)
            .filter(|_| socket.send_to(&[0x5a; 100], to).is_ok())
            .count())
    })
    .unwrap()
}

fn v6_sink(lab: &Lab) -> std::net::UdpSocket {
    xfrm_trace::netns::run_in(&lab.ns_path(Host::Ehost), || {
        let socket = std::net::UdpSocket::bind(("::", PORT))?;
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(socket)
    })
    .unwrap()
}

fn received(socket: &std::net::UdpSocket, expected: usize) -> usize {
    let mut buffer = [0u8; 2048];
    let mut n = 0;
    let mut idle = 0;
    while n < expected && idle < 10 {
        if socket.recv(&mut buffer).is_ok() {
            n += 1;
        } else {
            idle += 1;
        }
    }
    n
}

#[test]
fn ipv6_masquerade_leak_is_reported_and_fixed() {
    let lab = lab("v6");
    ipv6_tunnel(&lab);
    let west = lab.ns(Host::West);
    let sink = v6_sink(&lab);
    // Neighbour discovery and the tunnel, before anything is traced.
    assert_eq!(send_v6(&lab, 1), 1);
    assert_eq!(received(&sink, 1), 1, "IPv6 tunnel must work");
    lab.exec_line(
        Host::West,
        "ip6tables -t nat -A POSTROUTING -o wan0 -j MASQUERADE",
    )
    .unwrap();
    let (udp_before, esp_before) = (router_v6_count(&lab, "udp"), router_v6_count(&lab, "esp"));
    let report = traced("masq-v6", || {
        assert_eq!(send_v6(&lab, COUNT), COUNT);
    });
    assert_eq!(router_v6_count(&lab, "udp") - udp_before, COUNT as u64);
    assert_eq!(router_v6_count(&lab, "esp") - esp_before, 0);
    assert_eq!(received(&sink, 1), 0);
    let rows = leaks(&report);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0];
    assert_eq!(row["family"], "ipv6");
    assert_eq!(row["packets"], COUNT, "{row:#}");
    assert_eq!(row["sent"], COUNT, "{row:#}");
    assert_eq!(row["pre_src"], ipv6::WHOST);
    assert_eq!(row["post_src"], ipv6::WEST_WAN);
    assert_eq!(row["spi"], "0x00003003");
    assert_eq!(row["reqid"], 2);
    assert_eq!(row["sa_dst"], ipv6::EAST_WAN);
    assert_eq!(row["policy_src"], ipv6::WEST_SUBNET);
    assert_eq!(row["policy_dst"], ipv6::EAST_SUBNET);
    let found = findings(&report);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(
        found[0]["summary"],
        format!(
            "{COUNT} packets from {} to {} were SNATed to {} before IPsec and sent in clear on wan0 (netns {west})",
            ipv6::WEST_SUBNET,
            ipv6::EAST_SUBNET,
            ipv6::WEST_WAN
        )
    );
    let fix = found[0]["fix"].as_str().unwrap().lines().next().unwrap();
    assert_eq!(
        fix,
        format!(
            "ip netns exec {west} ip6tables -t nat -I POSTROUTING -s {} -d {} -j RETURN",
            ipv6::WEST_SUBNET,
            ipv6::EAST_SUBNET
        )
    );
    run(&fix.split_whitespace().collect::<Vec<_>>());
    let (udp_before, esp_before) = (router_v6_count(&lab, "udp"), router_v6_count(&lab, "esp"));
    assert_eq!(send_v6(&lab, COUNT), COUNT);
    assert_eq!(received(&sink, COUNT), COUNT);
    assert_eq!(router_v6_count(&lab, "udp") - udp_before, 0);
    assert_eq!(router_v6_count(&lab, "esp") - esp_before, COUNT as u64);
}

/// Runs on: 6.12 (an `xfrm-trace lab` scenario, on the demo's kernel)
#[test]
fn lab_masquerade_command_shows_the_leak_the_finding_and_the_fix() {
    let out = std::process::Command::new(tests::binary())
        .args(["lab", "masquerade"])
        .output()
        .expect("run xfrm-trace lab masquerade");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "tunnel works: router saw 5 ESP and 0 plaintext UDP datagrams to 192.168.1.10; ehost received 5 of 5",
        "leak: router saw 0 ESP and 5 plaintext UDP datagrams to 192.168.1.10; ehost received 0 of 5",
        "FINDING masquerade_before_policy: 5 packets from 10.0.2.0/24 to 192.168.0.0/16 were SNATed to 192.0.2.1 before IPsec and sent in clear on wan0",
        "iptables -t nat -I POSTROUTING -s 10.0.2.0/24 -d 192.168.0.0/16 -j RETURN",
        "encrypted again: router saw 5 ESP and 0 plaintext UDP datagrams to 192.168.1.10; ehost received 5 of 5; findings: 0",
        "cleaned up",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(!stdout.contains("0x<key>") && !stdout.to_lowercase().contains("aead"));
}

/// Runs on: 6.1 (the forced-kprobe variant: the kprobe path is the same on every kernel; the fentry variant runs everywhere)
#[test]
fn masquerade_kprobe_fallback_counts_every_leak() {
    let lab = lab("kp");
    lab.masquerade_everything(Host::West).unwrap();
    // As on a kernel where fentry does not work: kprobes on the same two
    // functions; the outcome comes from the drops program, as with fentry.
    let json = scratch("masq-kprobe.json");
    let ready = scratch("masq-kprobe.ready");
    let _ = std::fs::remove_file(&ready);
    let child = std::process::Command::new(tests::binary())
        .args([
            "--hooks",
            "kprobe",
            "--json",
            json.to_str().unwrap(),
            "--ready-file",
        ])
        .arg(&ready)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut tracer = Tracer { child };
    let started = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            tracer.child.try_wait().unwrap().is_none(),
            "xfrm-trace exited early"
        );
        assert!(started.elapsed() < Duration::from_secs(600), "not attached");
        std::thread::sleep(Duration::from_millis(50));
    }
    let wire = on_the_wire(&lab, || {
        lab.send_udp(Host::Whost, to(EHOST), COUNT, 100).unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(plaintext_to_ehost(&wire), COUNT, "{wire:#?}");
    let coverage = &report["masquerade"]["coverage"];
    for function in ["__xfrm4_output", "__xfrm6_output"] {
        assert!(
            coverage["attached"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| *a == format!("{function} (kprobe)")),
            "{coverage:#}"
        );
    }
    assert_eq!(
        coverage["outcome"],
        serde_json::json!(["ipv4", "ipv6"]),
        "{coverage:#}"
    );
    let rows = leaks(&report);
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["packets"], COUNT);
    assert_eq!(rows[0]["outcome_known"], true);
    assert_eq!(rows[0]["sent"], COUNT);
    assert_eq!(rows[0]["dropped"], 0);
    assert_eq!(rows[0]["pre_src"], WHOST);
    assert_eq!(rows[0]["spi"], "0x00001001");
    assert_eq!(rows[0]["policy_src"], WEST_SUBNET);
    let found = findings(&report);
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(
        found[0]["summary"]
            .as_str()
            .unwrap()
            .contains("before IPsec and sent in clear on wan0"),
        "{found:#?}"
    );
}
