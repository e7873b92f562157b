//! The namespace lab on a kernel with IPsec (the VM kernels): static and
//! pluto-negotiated tunnels carry traffic, and only ESP crosses the router.
//! VM-only: the host kernel of these machines has no ESP.

use std::{net::SocketAddr, time::Duration};

use xfrm_trace::lab::{
    Cipher, EAST_WAN, EHOST, Host, Lab, Mode, Packet, PlutoConfig, StaticIpsec, WEST_WAN,
};

fn lab(name: &str) -> Lab {
    assert!(nix_is_root(), "VM tests run as root");
    Lab::create(&format!("xt{}{name}", std::process::id() % 10000)).expect("lab topology")
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    })
}

/// Sends `count` datagrams from `from` to `to` with a capture on `iface` of
/// the router; returns (received, captured packets).
fn send_through(
    lab: &Lab,
    from: Host,
    to_host: Host,
    to: &str,
    iface: &str,
    count: usize,
) -> (usize, Vec<Packet>) {
    let sink = lab.udp_sink(to_host, 7000).expect("sink");
    let target: SocketAddr = format!("{to}:7000").parse().expect("address");
    // One datagram first, so neighbour resolution does not delay the rest.
    assert_eq!(lab.send_udp(from, target, 1, 64).expect("send"), 0);
    assert_eq!(
        sink.receive(1, Duration::from_secs(10)),
        1,
        "warm-up datagram did not arrive"
    );
    let capture = lab.capture(Host::Router, iface).expect("capture");
    assert_eq!(lab.send_udp(from, target, count, 100).expect("send"), 0);
    let received = sink.receive(count, Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    (received, capture.stop())
}

fn esp_between(packets: &[Packet], src: &str, dst: &str) -> usize {
    packets
        .iter()
        .filter(|p| p.is_esp() && p.src.to_string() == src && p.dst.to_string() == dst)
        .count()
}

fn plaintext_to(packets: &[Packet], port_owner: &str) -> usize {
    packets
        .iter()
        .filter(|p| !p.is_esp() && (p.dst.to_string() == port_owner || p.udp_dport == Some(7000)))
        .count()
}

/// Runs on: 5.10, sid (the lab's static SAs, no tracer: the oldest and the newest kernel)
#[test]
fn static_sas_encrypt_every_packet_in_each_mode() {
    const COUNT: usize = 10;
    for (name, config) in [
        ("gcm", StaticIpsec::default()),
        (
            "cbc-natt",
            StaticIpsec {
                cipher: Cipher::AesCbcHmacSha256,
                nat_t: true,
                ..StaticIpsec::default()
            },
        ),
        (
            "transport",
            StaticIpsec {
                mode: Mode::Transport,
                ..StaticIpsec::default()
            },
        ),
    ] {
        let mut lab = lab("s");
        lab.static_ipsec(&config)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (from, to_host, to) = if config.mode == Mode::Tunnel {
            (Host::Whost, Host::Ehost, EHOST)
        } else {
            (Host::West, Host::East, EAST_WAN)
        };
        let (received, packets) = send_through(&lab, from, to_host, to, "r-west", COUNT);
        assert_eq!(received, COUNT, "{name}: datagrams lost");
        assert_eq!(
            esp_between(&packets, WEST_WAN, EAST_WAN),
            COUNT,
            "{name}: ESP on the router: {packets:?}"
        );
        assert_eq!(
            plaintext_to(&packets, to),
            0,
            "{name}: plaintext on the router: {packets:?}"
        );
        if config.nat_t {
            assert!(
                packets
                    .iter()
                    .filter(|p| p.is_esp())
                    .all(|p| p.protocol == 17 && p.udp_dport == Some(4500))
            );
        } else {
            assert!(
                packets
                    .iter()
                    .filter(|p| p.is_esp())
                    .all(|p| p.protocol == 50)
            );
        }
    }
}

/// Runs on: 6.12 (pluto itself, on the demo's kernel)
#[test]
fn pluto_negotiates_a_tunnel_that_carries_traffic() {
    const COUNT: usize = 5;
    let mut lab = lab("p");
    lab.warm_crypto().expect("crypto warm-up");
    for gw in [Host::West, Host::East] {
        lab.start_pluto(gw, &PlutoConfig::for_gateway(gw))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let initiate = lab
        .whack(Host::West, &["--initiate", "--name", "lab"])
        .expect("whack");
    let text = String::from_utf8_lossy(&initiate.stdout);
    assert!(initiate.status.success(), "initiate failed: {text}");
    assert!(text.contains("established Child SA"), "{text}");
    for gw in [Host::West, Host::East] {
        let status = lab.whack(gw, &["--trafficstatus"]).expect("trafficstatus");
        let status = String::from_utf8_lossy(&status.stdout);
        assert!(
            status.contains("\"lab\"") && status.contains("type=ESP"),
            "{gw:?}: {status}"
        );
    }
    let (received, packets) = send_through(&lab, Host::Whost, Host::Ehost, EHOST, "r-west", COUNT);
    assert_eq!(received, COUNT);
    assert_eq!(
        esp_between(&packets, WEST_WAN, EAST_WAN),
        COUNT,
        "{packets:?}"
    );
    assert_eq!(plaintext_to(&packets, EHOST), 0, "{packets:?}");
    let status = lab
        .whack(Host::West, &["--trafficstatus"])
        .expect("trafficstatus");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.contains("outBytes=0,"),
        "pluto saw no outbound bytes: {status}"
    );
}

/// `report -o`: the bundle of a gateway with live SAs carries their SPIs
/// and algorithms but none of their keys; with `--fail-on-findings` a
/// finding (here a tunnel down: west's SA deleted, its policy kept) makes
/// the exit code 3, and the bundle is still written.
/// Runs on: 6.12 (the bundle's no-key check needs SAs, not a particular kernel)
#[test]
fn report_bundle_holds_the_sas_but_no_key_and_exit_code_tells_findings() {
    let mut lab = lab("b");
    lab.static_ipsec(&StaticIpsec::default())
        .expect("static SAs");
    // The keys, as `ip xfrm state` shows them (0x + hex), on both gateways.
    let mut keys = Vec::new();
    for gw in [Host::West, Host::East] {
        let state = lab.ip_line(gw, "xfrm state").unwrap();
        keys.extend(
            state
                .split_whitespace()
                .filter_map(|t| t.strip_prefix("0x"))
                .filter(|hex| hex.len() >= 32)
                .map(str::to_lowercase),
        );
    }
    assert!(keys.len() >= 4, "keys not found in `ip xfrm state`");
    lab.ip_line(
        Host::West,
        &format!("xfrm state delete src {WEST_WAN} dst {EAST_WAN} proto esp spi 0x00001001"),
    )
    .unwrap();
    let dir = tests::scratch("vm-bundle");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("evidence.tar.gz");
    let ready = dir.join("ready");
    let mut tracer = tests::Tracer::start(
        &[
            "report",
            "-o",
            bundle.to_str().unwrap(),
            "--duration",
            "4s",
            "--fail-on-findings",
            "--quiet",
        ],
        &ready,
    );
    let to: SocketAddr = format!("{EHOST}:7000").parse().unwrap();
    lab.send_udp(Host::Whost, to, 3, 100).unwrap();
    let out = tracer.take_output();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("[tunnel_down]"), "{printed}");
    let status = std::process::Command::new("tar")
        .args([
            "-xzf",
            bundle.to_str().unwrap(),
            "-C",
            dir.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let root = dir.join("xfrm-trace-evidence");
    let states = std::fs::read_to_string(root.join("xfrm_state.json")).unwrap();
    assert!(
        states.contains("\"spi\": 8194") && states.contains("rfc4106(gcm(aes))"),
        "{states}"
    );
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).to_lowercase();
        for key in &keys {
            assert!(
                !text.contains(key.as_str()),
                "a key is in {}",
                path.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
