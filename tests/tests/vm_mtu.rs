//! Oversize ESP: with the path MTU lowered on the router, every packet that
//! does not fit is reported once (fragmented after encryption, or refused
//! with ICMP "fragmentation needed" wherever that happens first), with the
//! `mtu=` and MSS computed from the SA's real overhead; traffic that fits
//! gives no finding. VM-only: the host kernel has no ESP.

use std::{net::SocketAddr, time::Duration};

use serde_json::Value;
use tests::traced_report;
use xfrm_trace::lab::{
    Cipher, Df, EAST_WAN, EHOST, Host, Lab, Mode, Routing, StaticIpsec, VTI_INTERFACE, WEST_WAN,
    WHOST, XFRM_INTERFACE, ipv6,
};

const COUNT: usize = 5;
/// MTU of the router's link towards east.
const PATH_MTU: u32 = 1400;

fn lab(name: &str, config: &StaticIpsec) -> Lab {
    let mut lab =
        Lab::create(&format!("xm{}{name}", std::process::id() % 10000)).expect("lab topology");
    lab.static_ipsec(config).expect("static SAs");
    lab.ip(
        Host::Router,
        &["link", "set", "r-east", "mtu", &PATH_MTU.to_string()],
    )
    .unwrap();
    lab
}

fn traced(name: &str, action: impl FnOnce()) -> Value {
    let report = traced_report(name, &[], action);
    assert!(
        report["esp_sizes_hooks"]["missing"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{:#}",
        report["esp_sizes_hooks"]
    );
    report
}

/// The `esp_sizes` entry of SA 0x1001.
fn west_to_east(report: &Value) -> Value {
    report["esp_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spi"] == "0x00001001")
        .cloned()
        .unwrap_or_else(|| panic!("SA 0x1001 missing: {:#}", report["esp_sizes"]))
}

fn oversize_findings(report: &Value) -> Vec<Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "esp_oversize")
        .cloned()
        .collect()
}

/// (sender netns, its address, destination): through the tunnel, or
/// gateway to gateway in transport mode.
fn endpoints(config: &StaticIpsec) -> (Host, &'static str, SocketAddr) {
    match config.mode {
        Mode::Tunnel => (Host::Whost, WHOST, format!("{EHOST}:7000").parse().unwrap()),
        Mode::Transport => (
            Host::West,
            WEST_WAN,
            format!("{EAST_WAN}:7000").parse().unwrap(),
        ),
    }
}

/// Largest inner packet for `path_mtu`, as the kernel's xfrm_state_mtu
/// computes it for these algorithms (docs/kernel.md §3).
fn expected_max_inner(config: &StaticIpsec, path_mtu: u32) -> u32 {
    let (iv, block, icv) = match config.cipher {
        Cipher::AesGcm128 => (8, 4, 16),
        Cipher::AesCbcHmacSha256 => (16, 16, 16),
    };
    let tunnel_ip = if config.mode == Mode::Tunnel { 20 } else { 0 };
    let transport_ip = 20 - tunnel_ip;
    let header = 8 + iv + tunnel_ip + if config.nat_t { 8 } else { 0 };
    ((path_mtu - header - icv - transport_ip) & !(block - 1)) + transport_ip - 2
}

/// An SA's size events: the ICMP errors received for its packets, and
/// the refusals and fragmentations seen where they happened.
fn received_and_here(sa: &Value) -> (Vec<&Value>, Vec<&Value>) {
    sa["events"]
        .as_array()
        .unwrap()
        .iter()
        .partition(|e| e["kind"] == "frag_needed_received")
}

fn count(events: &[&Value]) -> u64 {
    events.iter().map(|e| e["count"].as_u64().unwrap()).sum()
}

fn oversize_is_reported_once_per_packet_with_the_fix(name: &str, config: StaticIpsec) {
    let lab = lab(name, &config);
    let (from, source, to) = endpoints(&config);
    let max_inner = expected_max_inner(&config, PATH_MTU);
    // Fits exactly: no finding, and the largest inner packet is measured.
    let report = traced(&format!("{name}-fits"), || {
        let refused = lab
            .send_udp_df(
                from,
                source,
                to,
                COUNT,
                (max_inner - 28) as usize,
                Df::SetIgnoringPmtu,
            )
            .unwrap();
        assert_eq!(refused, 0);
    });
    assert!(
        oversize_findings(&report).is_empty(),
        "{:#}",
        report["findings"]
    );
    let sa = west_to_east(&report);
    assert_eq!(sa["packets_out"], COUNT as u64, "{sa:#}");
    assert_eq!(sa["max_inner_len"], max_inner, "{sa:#}");
    assert!(sa["events"].as_array().unwrap().is_empty(), "{sa:#}");

    // One byte more, DF set: each packet is refused once, at the router
    // (path MTU) or, once west learned it, at west (IPsec MTU).
    let report = traced(&format!("{name}-df"), || {
        lab.send_udp_df(
            from,
            source,
            to,
            COUNT,
            (max_inner - 27) as usize,
            Df::SetIgnoringPmtu,
        )
        .unwrap();
    });
    let sa = west_to_east(&report);
    let (received, events) = received_and_here(&sa);
    assert_eq!(count(&events), COUNT as u64, "{sa:#}");
    // Each refusal at the router comes back to west as ICMP, and is seen
    // there too, with the router's MTU.
    let at_router: Vec<&Value> = events
        .iter()
        .copied()
        .filter(|e| e["mtu_is_inner"] == false)
        .collect();
    assert_eq!(count(&received), count(&at_router), "{sa:#}");
    for e in &received {
        assert_eq!(e["mtu"], PATH_MTU, "{e}");
        assert!(e["netns_label"].as_str().unwrap().ends_with("-west"), "{e}");
    }
    for e in events {
        assert_ne!(e["kind"], "fragmented", "{e}");
        let expected_mtu = if e["mtu_is_inner"] == true {
            max_inner
        } else {
            PATH_MTU
        };
        assert_eq!(e["mtu"], expected_mtu, "{e}");
    }
    assert_eq!(sa["max_inner_fitting"], max_inner, "{sa:#}");
    let findings = oversize_findings(&report);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let fix = findings[0]["fix"].as_str().unwrap();
    assert!(fix.contains(&format!("mtu={max_inner}")), "{fix}");
    assert!(
        fix.contains(&format!("--set-mss {}", max_inner - 40)),
        "{fix}"
    );
    assert!(
        findings[0]["summary"]
            .as_str()
            .unwrap()
            .contains("0x00001001")
    );
}

#[test]
fn tunnel_gcm_oversize_is_reported_once_per_packet_with_the_fix() {
    oversize_is_reported_once_per_packet_with_the_fix("tg", StaticIpsec::default());
}

/// Runs on: 6.1, 6.12, sid (eight setups or a variant; 5.10 is the slowest kernel to load on)
#[test]
fn transport_cbc_nat_t_oversize_is_reported_once_per_packet_with_the_fix() {
    oversize_is_reported_once_per_packet_with_the_fix(
        "pc",
        StaticIpsec {
            mode: Mode::Transport,
            cipher: Cipher::AesCbcHmacSha256,
            nat_t: true,
            ..StaticIpsec::default()
        },
    );
}

/// A route-based SA: the `COUNT` inner packets of `max_inner` bytes went
/// through it, and the `COUNT` one byte larger were each refused once, in
/// west, by its interface `ifname` of type `via` (ICMP fragmentation needed
/// or ICMPv6 packet too big, against the IPsec MTU); the one finding sets
/// that interface's MTU.
fn assert_refused_at_the_interface(
    report: &Value,
    spi: &str,
    ifname: &str,
    via: &str,
    max_inner: u32,
) {
    let sa = report["esp_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spi"] == spi)
        .unwrap_or_else(|| panic!("SA {spi} missing: {:#}", report["esp_sizes"]));
    assert_eq!(sa["packets_out"], COUNT as u64, "{sa:#}");
    assert_eq!(sa["max_inner_len"], max_inner, "{sa:#}");
    let events = sa["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{sa:#}");
    let refused = &events[0];
    assert_eq!(refused["kind"], "frag_needed", "{refused}");
    assert_eq!(refused["count"], COUNT as u64, "{refused}");
    assert_eq!(refused["ifname"], ifname, "{refused}");
    assert_eq!(refused["via_interface"], via, "{refused}");
    assert_eq!(refused["via_xfrm_interface"], via == "xfrm", "{refused}");
    assert_eq!(refused["mtu"], max_inner, "{refused}");
    assert_eq!(refused["mtu_is_inner"], true, "{refused}");
    assert_eq!(refused["max_len"], max_inner + 1, "{refused}");
    assert!(refused["netns_label"].as_str().unwrap().ends_with("-west"));
    assert_eq!(sa["max_inner_fitting"], max_inner, "{sa:#}");
    let findings: Vec<Value> = oversize_findings(report)
        .into_iter()
        .filter(|f| f["spi"] == spi)
        .collect();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let summary = findings[0]["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!("{COUNT} packets of SA {spi}")),
        "{summary}"
    );
    let fix = findings[0]["fix"].as_str().unwrap();
    assert!(
        fix.contains(&format!("ip link set dev {ifname} mtu {max_inner}")),
        "{fix}"
    );
}

/// A route-based tunnel: the remote subnet is routed into an XFRM
/// interface, which refuses what does not fit its SA (ICMP fragmentation
/// needed) before the SA is looked up. Each refusal is counted against the
/// interface's SA, and the fix sets the interface's MTU.
#[test]
fn route_based_oversize_is_reported_against_the_interface_sa() {
    let config = StaticIpsec {
        routing: Routing::XfrmInterface,
        ..StaticIpsec::default()
    };
    let mut lab = Lab::create(&format!("xm{}rb", std::process::id() % 10000)).expect("lab");
    lab.static_ipsec(&config).expect("route-based SAs");
    let (from, source, to) = endpoints(&config);
    // The links have MTU 1500; nothing on the path is smaller.
    let max_inner = expected_max_inner(&config, 1500);
    let report = traced("rb", || {
        for size in [max_inner, max_inner + 1] {
            lab.send_udp_df(
                from,
                source,
                to,
                COUNT,
                (size - 28) as usize,
                Df::SetIgnoringPmtu,
            )
            .unwrap();
        }
    });
    assert_refused_at_the_interface(&report, "0x00001001", XFRM_INTERFACE, "xfrm", max_inner);
    let fix = oversize_findings(&report)[0]["fix"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(fix.contains("ipsec-interface="), "{fix}");
    assert!(
        fix.contains(&format!("--set-mss {}", max_inner - 40)),
        "{fix}"
    );
}

/// Route-based over VTIs, IPv4 (`ip_vti`) and IPv6 (`ip6_vti`) at once:
/// the remote LANs are routed into VTIs whose key marks the policies (and
/// the IPv4 SAs; the IPv6 SAs carry no mark, as in the kernel's PMTU
/// selftest), and each VTI refuses what does not fit its SA (ICMP
/// fragmentation needed, ICMPv6 packet too big) before the SA is on the
/// packet. Each refusal is counted once against the VTI's SA, found from
/// the VTI's key and endpoints, and the fix sets the VTI's MTU.
/// Runs on: 6.12 (differs from the XFRM-interface test, which runs everywhere, only in the link kind the program compares)
#[test]
fn vti_oversize_is_reported_against_the_vti_sa() {
    let config = StaticIpsec {
        routing: Routing::Vti,
        ..StaticIpsec::default()
    };
    let mut lab = Lab::create(&format!("xm{}vt", std::process::id() % 10000)).expect("lab");
    lab.static_ipsec(&config).expect("IPv4 SAs over a VTI");
    lab.ipv6_vti_tunnel().expect("IPv6 SAs over a VTI");
    let to4: SocketAddr = format!("{EHOST}:7000").parse().unwrap();
    let to6: SocketAddr = format!("[{}]:7000", ipv6::EHOST).parse().unwrap();
    // Neighbours resolved before the traced window.
    lab.send_udp(Host::Whost, to4, 1, 64).unwrap();
    lab.send_udp(Host::Whost, to6, 1, 64).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // The links have MTU 1500, the VTIs 1480 and 1460: the SAs' MTUs
    // (GCM-128, tunnel mode) are smaller.
    let max_inner4 = expected_max_inner(&config, 1500);
    let max_inner6 = ((1500 - 56 - 16) & !3) - 2;
    let report = traced("vti", || {
        for (source, to, max_inner, headers) in [
            (WHOST, to4, max_inner4, 28),
            (ipv6::WHOST, to6, max_inner6, 48),
        ] {
            for size in [max_inner, max_inner + 1] {
                lab.send_udp_df(
                    Host::Whost,
                    source,
                    to,
                    COUNT,
                    (size - headers) as usize,
                    Df::SetIgnoringPmtu,
                )
                .unwrap();
            }
        }
    });
    assert_refused_at_the_interface(&report, "0x00001001", VTI_INTERFACE, "vti", max_inner4);
    assert_refused_at_the_interface(
        &report,
        ipv6::SPI_WEST_TO_EAST,
        ipv6::VTI_INTERFACE,
        "vti",
        max_inner6,
    );
    let fix = oversize_findings(&report)
        .into_iter()
        .find(|f| f["spi"] == "0x00001001")
        .unwrap()["fix"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(fix.contains("vti-interface="), "{fix}");
    assert!(
        fix.contains(&format!("--set-mss {}", max_inner4 - 40)),
        "{fix}"
    );
}

/// IPv6 inside and outside (ESP between the gateways' IPv6 addresses): an
/// oversize packet is refused once with ICMPv6 "packet too big", at the
/// router (path MTU; west then sees it come back) or at west (IPsec MTU).
#[test]
fn ipv6_oversize_is_reported_once_per_packet_with_the_fix() {
    let lab = Lab::create(&format!("xm{}v6", std::process::id() % 10000)).expect("lab topology");
    lab.ipv6_static_tunnel().unwrap();
    lab.ip(
        Host::Router,
        &["link", "set", "r-east", "mtu", &PATH_MTU.to_string()],
    )
    .unwrap();
    let to: SocketAddr = format!("[{}]:7000", ipv6::EHOST).parse().unwrap();
    // Neighbours resolved before the traced window.
    lab.send_udp(Host::Whost, to, 1, 64).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // GCM-128 in IPv6 tunnel mode: 40 + 8 + 8 header, 16 ICV, 4-byte blocks.
    let max_inner = ((PATH_MTU - 56 - 16) & !3) - 2;
    let report = traced("v6-df", || {
        lab.send_udp_df(
            Host::Whost,
            ipv6::WHOST,
            to,
            COUNT,
            (max_inner - 48 + 1) as usize,
            Df::SetIgnoringPmtu,
        )
        .unwrap();
    });
    let sa = report["esp_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spi"] == ipv6::SPI_WEST_TO_EAST)
        .cloned()
        .unwrap_or_else(|| panic!("IPv6 SA missing: {:#}", report["esp_sizes"]));
    assert_eq!(sa["sa_dst"], ipv6::EAST_WAN, "{sa:#}");
    let (received, events) = received_and_here(&sa);
    assert_eq!(count(&events), COUNT as u64, "{sa:#}");
    let at_router = events.iter().filter(|e| e["mtu_is_inner"] == false).count();
    assert!(at_router > 0, "the first packet meets the router: {sa:#}");
    for e in &events {
        assert_eq!(e["kind"], "frag_needed", "{e}");
        let expected = if e["mtu_is_inner"] == true {
            max_inner
        } else {
            PATH_MTU
        };
        assert_eq!(e["mtu"], expected, "{e}");
    }
    let router_refusals: u64 = events
        .iter()
        .filter(|e| e["mtu_is_inner"] == false)
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(count(&received), router_refusals, "{sa:#}");
    assert_eq!(sa["max_inner_fitting"], max_inner, "{sa:#}");
    let findings = oversize_findings(&report);
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let fix = findings[0]["fix"].as_str().unwrap();
    assert!(fix.contains(&format!("mtu={max_inner}")), "{fix}");
}

/// TCP from whost: its GSO packets cross west's veth whole and meet IPsec
/// as super-packets. They are judged by their segments: the largest inner
/// packet that went into the tunnel fits its MTU, the segments too big for
/// it (whost's MSS assumes 1500) are reported at 1500 bytes, not at the
/// size of the super-packet, and the transfer completes once whost learns
/// the MTU.
#[test]
fn gso_packets_are_judged_by_their_segments() {
    let config = StaticIpsec::default();
    let mut lab =
        Lab::create(&format!("xm{}gs", std::process::id() % 10000)).expect("lab topology");
    lab.static_ipsec(&config).expect("static SAs");
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    lab.send_udp(Host::Whost, format!("{EHOST}:7000").parse().unwrap(), 1, 64)
        .unwrap();
    assert_eq!(sink.receive(1, Duration::from_secs(10)), 1);
    const BYTES: usize = 512 * 1024;
    let mut arrived = 0;
    let report = traced("gso", || {
        arrived = lab
            .tcp_transfer(
                Host::Whost,
                Host::Ehost,
                format!("{EHOST}:7100").parse().unwrap(),
                BYTES,
                Duration::from_secs(30),
            )
            .unwrap();
    });
    assert_eq!(arrived, BYTES);
    let sa = west_to_east(&report);
    // The bundle MTU of a 1500-byte path for GCM-128 in tunnel mode.
    let bundle_mtu = ((1500 - 36 - 16) & !3) - 2;
    assert!(
        sa["gso_packets_out"].as_u64().unwrap() > 0,
        "no GSO: {sa:#}"
    );
    let max_inner = sa["max_inner_len"].as_u64().unwrap();
    assert!(max_inner > 1000 && max_inner <= bundle_mtu, "{sa:#}");
    for e in sa["events"].as_array().unwrap() {
        assert_eq!(
            e["max_len"], 1500,
            "a refused GSO packet is its segments: {e}"
        );
    }
}

#[test]
fn esp_fragmented_by_the_router_is_counted_per_packet() {
    let config = StaticIpsec::default();
    let lab = lab("fr", &config);
    let max_inner = expected_max_inner(&config, PATH_MTU);
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    let report = traced("fragmented", || {
        lab.send_udp_df(
            Host::Whost,
            WHOST,
            format!("{EHOST}:7000").parse().unwrap(),
            COUNT,
            (max_inner - 28 + 40) as usize,
            Df::Clear,
        )
        .unwrap();
        // Fragmented, not lost: every datagram arrives.
        assert_eq!(sink.receive(COUNT, Duration::from_secs(5)), COUNT);
    });
    let sa = west_to_east(&report);
    let events = sa["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{sa:#}");
    let e = &events[0];
    assert_eq!(
        (e["kind"].as_str(), e["count"].as_u64(), e["mtu"].as_u64()),
        (
            Some("fragmented"),
            Some(COUNT as u64),
            Some(u64::from(PATH_MTU))
        ),
        "{e}"
    );
    assert_eq!(e["ifname"], "r-east", "{e}");
    assert!(
        e["netns_label"].as_str().unwrap().ends_with("-router"),
        "{e}"
    );
    assert_eq!(sa["max_inner_fitting"], max_inner);
}

/// Runs on: 6.12 (an `xfrm-trace lab` scenario, on the demo's kernel)
#[test]
fn lab_mtu_reproduces_diagnoses_and_fixes_the_black_hole() {
    let out = std::process::Command::new(tests::binary())
        .args(["lab", "mtu"])
        .output()
        .expect("running xfrm-trace lab mtu");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[esp_oversize]"), "{stdout}");
    assert!(stdout.contains("mtu=1346"), "{stdout}");
    assert!(
        stdout.contains("TCP transfer of 1048576 bytes: 1048576 arrived"),
        "{stdout}"
    );
}
