//! The real binary against the running kernel (the host's, or a VM's): real
//! eBPF programs, real packets across namespaces this test creates.

use std::{
    net::UdpSocket,
    path::Path,
    process::Command,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    Namespaces, PcapPacket, Tracer, binary, pcap_packets, require_root, scratch, sh, sh_line,
};
use xfrm_trace::ike::IkePath;

/// The tests below look at programs loaded kernel-wide: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Programs named `name` loaded in the kernel right now (needs bpftool).
fn loaded_programs(name: &str) -> usize {
    let out = sh_line("bpftool --json prog show");
    let progs: Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    progs
        .as_array()
        .map_or(0, |a| a.iter().filter(|p| p["name"] == name).count())
}

/// sender (a) -- router (r) -- receiver (b), with an XFRM policy on the
/// router that blocks forwarding a->b and one on the sender that blocks its
/// own UDP to the router.
fn blocked_topology() -> Namespaces {
    let ns = Namespaces::create("xt", &["a", "r", "b"]);
    let (a, r, b) = (
        ns.name("a").to_string(),
        ns.name("r").to_string(),
        ns.name("b").to_string(),
    );
    sh_line(&format!(
        "ip link add va netns {a} type veth peer name ra netns {r}"
    ));
    sh_line(&format!(
        "ip link add vb netns {b} type veth peer name rb netns {r}"
    ));
    ns.ip_line("a", "addr add 198.51.100.2/24 dev va");
    ns.ip_line("a", "link set va up");
    ns.ip_line("a", "route add default via 198.51.100.1");
    ns.ip_line("b", "addr add 203.0.113.2/24 dev vb");
    ns.ip_line("b", "link set vb up");
    ns.ip_line("b", "route add default via 203.0.113.1");
    ns.ip_line("r", "addr add 198.51.100.1/24 dev ra");
    ns.ip_line("r", "addr add 203.0.113.1/24 dev rb");
    ns.ip_line("r", "link set ra up");
    ns.ip_line("r", "link set rb up");
    sh_line(&format!(
        "ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"
    ));
    ns.ip_line(
        "r",
        "xfrm policy add src 198.51.100.0/24 dst 203.0.113.0/24 dir fwd action block",
    );
    ns.ip_line(
        "a",
        "xfrm policy add src 198.51.100.2/32 dst 198.51.100.1/32 proto udp dir out action block",
    );
    ns
}

/// Sends `count` UDP datagrams from inside `role` to `dst`; returns how
/// many `sendto` calls the kernel refused.
fn send_udp(ns: &Namespaces, role: &str, dst: &'static str, count: usize) -> usize {
    ns.run_in(role, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("bind");
        (0..count)
            .filter(|_| socket.send_to(b"xfrm-trace test", dst).is_err())
            .count()
    })
}

fn kfree_skb_has_reason() -> bool {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .any(|root| {
            std::fs::read_to_string(format!("{root}/events/skb/kfree_skb/format"))
                .is_ok_and(|f| f.contains(" reason;"))
        })
}

fn counter<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("counter {name} missing from report: {report:#}"))
}

fn netns_delta(counter: &Value, inode: u64) -> u64 {
    counter["by_netns"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["netns"] == inode))
        .and_then(|n| n["delta"].as_u64())
        .unwrap_or(0)
}

/// Tracepoint-only mode copies each dropped packet of an XFRM reason for
/// the pcapng, at most 64 per second and CPU: a burst beyond that is
/// partly copied, and what was copied plus what was not is every drop.
/// Runs on: host (about tracepoint-only mode, the host's)
#[test]
fn dropped_packets_not_copied_for_the_pcapng_are_counted_exactly() {
    require_root();
    if !kfree_skb_has_reason() {
        eprintln!("skipped: kfree_skb has no drop reason here (before 5.17)");
        return;
    }
    let _serial = serial();
    const BURST: u64 = 400;
    let ns = blocked_topology();
    send_udp(&ns, "a", "203.0.113.2:9", 1);
    std::thread::sleep(Duration::from_millis(300));
    let before = ns.xfrm_stat("r")["XfrmInPolBlock"];
    let json = scratch("burst.json");
    let pcap = scratch("burst.pcapng");
    let mut tracer = Tracer::start(
        &[
            "--hooks",
            "tracepoint",
            "--json",
            json.to_str().unwrap(),
            "--pcap",
            pcap.to_str().unwrap(),
        ],
        &scratch("burst.ready"),
    );
    assert_eq!(send_udp(&ns, "a", "203.0.113.2:9", BURST as usize), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns.xfrm_stat("r")["XfrmInPolBlock"] < before + BURST {
        assert!(Instant::now() < deadline, "router never counted the burst");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ns.xfrm_stat("r")["XfrmInPolBlock"] - before, BURST);

    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let capture = &report["capture"];
    let copied = capture["drops_captured"].as_u64().unwrap();
    let not_copied = capture["drops_not_captured"].as_u64().unwrap();
    eprintln!("burst of {BURST}: {copied} copied, {not_copied} not");
    assert_eq!(copied + not_copied, BURST, "{capture}");
    assert!(not_copied > 0 && copied > 0, "{capture}");
    let packets = pcap_packets(&pcap);
    let _ = std::fs::remove_file(&pcap);
    assert_eq!(packets.len() as u64, copied, "{capture}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "packets not copied for the pcapng (rate limit 64 per second and CPU; counts are exact): {not_copied} dropped (of {BURST}), 0 MASQUERADE leaks (of 0)"
        )),
        "{text}"
    );
}

#[test]
fn xfrm_policy_drops_and_counters_are_reported_exactly() {
    require_root();
    let _serial = serial();
    const FORWARDED: u64 = 7;
    const LOCAL: u64 = 4;
    let ns = blocked_topology();
    // Resolve the router's MAC first, so every datagram below reaches it.
    send_udp(&ns, "a", "203.0.113.2:9", 1);
    std::thread::sleep(Duration::from_millis(300));
    let router_before = ns.xfrm_stat("r");
    let sender_before = ns.xfrm_stat("a");

    let json = scratch("report.json");
    let pcap = scratch("drops.pcapng");
    let ready = scratch("ready");
    let before_attach = loaded_programs("kfree_skb");
    let mut tracer = Tracer::start(
        &[
            "--json",
            json.to_str().unwrap(),
            "--pcap",
            pcap.to_str().unwrap(),
        ],
        &ready,
    );
    assert_eq!(
        loaded_programs("kfree_skb"),
        before_attach + 1,
        "kfree_skb program not attached"
    );

    assert_eq!(send_udp(&ns, "a", "203.0.113.2:9", FORWARDED as usize), 0);
    let refused = send_udp(&ns, "a", "198.51.100.1:9", LOCAL as usize);
    assert_eq!(
        refused as u64, LOCAL,
        "the out policy must refuse every local datagram"
    );
    // Forwarded drops happen in softirq: wait until the kernel counted them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns.xfrm_stat("r")["XfrmInPolBlock"] < router_before["XfrmInPolBlock"] + FORWARDED {
        assert!(
            Instant::now() < deadline,
            "router never counted the blocked packets"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "xfrm-trace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        loaded_programs("kfree_skb"),
        before_attach,
        "a program stayed attached after exit"
    );

    let kernel_router = ns.xfrm_stat("r")["XfrmInPolBlock"] - router_before["XfrmInPolBlock"];
    let kernel_sender = ns.xfrm_stat("a")["XfrmOutPolBlock"] - sender_before["XfrmOutPolBlock"];
    assert_eq!((kernel_router, kernel_sender), (FORWARDED, LOCAL));

    let report: Value =
        serde_json::from_slice(&std::fs::read(&json).expect("report written")).expect("valid json");
    let _ = std::fs::remove_file(&json);
    assert_eq!(report["schema"], "xfrm-trace/1");
    let router = ns.inode("r");
    // Before 5.17 kfree_skb has no reason: the drop is known by its place.
    let (reason, xfrm_related) = if kfree_skb_has_reason() {
        ("XFRM_POLICY", true)
    } else {
        ("-", false)
    };
    let policy_drops: u64 = report["drops"]
        .as_array()
        .expect("drops")
        .iter()
        .filter(|d| d["netns"] == router && d["reason"] == reason && d["function"] == "ip_forward")
        .map(|d| {
            assert_eq!(d["ifname"], "ra", "{d}");
            assert_eq!(d["netns_label"], ns.name("r"), "{d}");
            assert_eq!(d["xfrm_related"], xfrm_related, "{d}");
            d["count"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(
        policy_drops, FORWARDED,
        "XFRM_POLICY drops seen at ip_forward in the router"
    );
    assert_eq!(
        netns_delta(counter(&report, "XfrmInPolBlock"), router),
        kernel_router
    );
    assert_eq!(
        netns_delta(counter(&report, "XfrmOutPolBlock"), ns.inode("a")),
        kernel_sender
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("XfrmOutPolBlock"), "text summary: {text}");

    // The pcapng, as tshark reads it: every blocked packet once, named.
    let packets = pcap_packets(&pcap);
    let _ = std::fs::remove_file(&pcap);
    let forwarded = |p: &&PcapPacket| {
        (p.src.as_str(), p.dst.as_str(), p.dport.as_str()) == ("198.51.100.2", "203.0.113.2", "9")
    };
    if report["kernel"]["mode"] == "tracepoint-only" {
        // No bracket: the drops of XFRM reasons are sampled at kfree_skb.
        let expected = if kfree_skb_has_reason() { FORWARDED } else { 0 };
        assert_eq!(packets.len() as u64, expected, "{packets:#?}");
        for p in &packets {
            assert!(forwarded(&p), "{p:?}");
            assert!(
                p.comment
                    .starts_with("dropped: XFRM_POLICY in ip_forward, netns ")
                    && p.comment.contains(" dev ra;"),
                "{p:?}"
            );
        }
    } else {
        // Brackets: each increment's packet, named by its counter; the
        // local sends were refused at the route lookup, before any skb.
        let named = |counter: &'static str| {
            packets
                .iter()
                .filter(move |p| p.comment.starts_with(counter))
        };
        assert_eq!(
            named("XfrmInPolBlock +1 in ").count() as u64,
            FORWARDED,
            "{packets:#?}"
        );
        assert!(
            named("XfrmInPolBlock").all(|p| forwarded(&p)),
            "{packets:#?}"
        );
        assert_eq!(
            named("XfrmOutPolBlock +1 in xfrm_lookup_with_ifid (out)").count() as u64,
            LOCAL,
            "{packets:#?}"
        );
        for p in named("XfrmOutPolBlock") {
            assert_eq!(
                (p.src.as_str(), p.dst.as_str(), p.dport.as_str()),
                ("198.51.100.2", "198.51.100.1", "9")
            );
            assert!(
                p.comment.contains("headers rebuilt from the route lookup"),
                "{p:?}"
            );
        }
        assert_eq!(packets.len() as u64, FORWARDED + LOCAL, "{packets:#?}");
    }
}

/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn without_root_it_says_so_in_one_line() {
    require_root();
    for args in [&["--duration", "1s"][..], &["doctor"][..]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary())
            .args(args)
            .output()
            .expect("run as nobody");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("needs root"), "{stderr}");
    }
}

/// Runs on: host (about a kernel without ESP, as the host's is)
#[test]
fn lab_on_a_kernel_without_esp_says_why_in_one_line_without_keys() {
    require_root();
    let esp_available = Path::new("/sys/module/esp4").exists()
        || Command::new("modprobe")
            .args(["-n", "esp4"])
            .status()
            .is_ok_and(|s| s.success());
    if esp_available {
        // This kernel hosts the lab: vm_mtu.rs runs the scenario through.
        return;
    }
    let out = Command::new(binary())
        .args(["lab", "mtu"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot host the IPsec lab"), "{stderr}");
    assert!(
        stderr.contains("<key>"),
        "the failing command, keys replaced: {stderr}"
    );
    assert!(
        !Path::new("/run/netns/xtmtu-west").exists(),
        "lab left behind"
    );
}

/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn bad_usage_is_reported_not_panicked() {
    for (args, said) in [
        (&["--duration", "soon"][..], "not a duration"),
        (
            &["--duration", "9223372036854775807"],
            "\"9223372036854775807\" is too long: at most 366 days (8784h)",
        ),
        (&["--duration", "0"], "\"0\" is no time: give more than 0"),
        (&["--interval", "0s"], "\"0s\" is no time: give more than 0"),
        (
            &["--prometheus", "no-such-host.invalid:9469"],
            "\"no-such-host.invalid:9469\" is not an address:port or host:port that resolves",
        ),
    ] {
        let out = Command::new(binary()).args(args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: invalid value"), "{stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn doctor_matches_what_loads() {
    require_root();
    let _serial = serial();
    let out = Command::new(binary())
        .args(["doctor", "--json"])
        .output()
        .expect("doctor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["btf"]["ok"], true);
    assert_eq!(report["xfrm_stat"]["ok"], true);
    let release = sh_line("uname -r");
    assert_eq!(
        report["kernel_release"],
        String::from_utf8_lossy(&release.stdout).trim()
    );
    // Every kernel we support loads classic tracepoints: the run above relies on it.
    assert_eq!(
        report["programs"]["tracepoint"]["works"], true,
        "{report:#}"
    );
    let hooks = report["hooks"].as_array().expect("hooks");
    // The one function the diff at the drop hooks (local route lookups).
    let input = hooks
        .iter()
        .find(|h| h["function"] == "xfrm_lookup_route")
        .expect("xfrm_lookup_route planned");
    assert_eq!(input["in_btf"], true);
    let fentry = report["programs"]["fentry"]["works"] == true;
    let kprobe = report["programs"]["kprobe"]["works"] == true;
    let expected = match (fentry, kprobe) {
        (true, _) => "fentry",
        (false, true) => "kprobe",
        (false, false) => "tracepoint-only",
    };
    assert_eq!(report["mode"], expected, "{report:#}");
    // Where the harness knows what the kernel offers (its VMs), hold the
    // doctor to it: every program type must load and attach.
    if let Ok(mode) = std::env::var("XFRM_TRACE_EXPECT_MODE") {
        assert_eq!(report["mode"], mode.as_str(), "{report:#}");
        for program in ["fentry", "kprobe", "tracepoint", "raw_tracepoint", "tp_btf"] {
            assert_eq!(
                report["programs"][program]["works"], true,
                "{program}: {report:#}"
            );
        }
    }
    assert_eq!(
        input["attach"]["method"],
        if expected == "tracepoint-only" {
            "unavailable"
        } else {
            expected
        }
    );
    doctor_plan_is_what_a_run_attaches(&report);
}

/// A run attaches exactly the hooks the doctor planned, each with the
/// planned method, and reports the doctor's mode.
fn doctor_plan_is_what_a_run_attaches(doctor: &Value) {
    let json = scratch("doctor-vs-run.json");
    let out = Command::new(binary())
        .args(["--duration", "1s", "--json"])
        .arg(&json)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(report["kernel"]["mode"], doctor["mode"], "{doctor:#}");
    let strings = |list: &Value| -> Vec<String> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|s| s.as_str().expect("a string").to_string())
            .collect()
    };
    let mut attached: Vec<String> = [
        &report["coverage"]["attached"],
        &report["esp_sizes_hooks"]["attached"],
        &report["ike_hooks"]["attached"],
        &report["masquerade"]["coverage"]["attached"],
        &report["netns_teardown_hooks"]["attached"],
    ]
    .into_iter()
    .flat_map(strings)
    // Attached by the drops capability, which the doctor does not plan.
    .filter(|hook| hook != "skb:kfree_skb")
    .collect();
    let mut planned: Vec<String> = doctor["hooks"]
        .as_array()
        .expect("hooks")
        .iter()
        .filter_map(|h| h["listed_as"].as_str().map(str::to_string))
        .collect();
    attached.sort();
    planned.sort();
    assert_eq!(attached, planned, "{doctor:#}");
    // Every kernel has a hook for IKE sent: the socket layer's where
    // functions can be hooked, else the interface tracepoint.
    assert!(
        [
            "net:net_dev_queue",
            "ip_send_skb (fentry)",
            "ip_send_skb (kprobe)"
        ]
        .iter()
        .any(|hook| planned.contains(&hook.to_string())),
        "{planned:?}"
    );
}

/// Two namespaces on one link: `a` is 198.51.100.2 on `ia`, `b` has
/// `b_addresses` on `ib`.
fn two_hosts(prefix: &str, b_addresses: &[&str]) -> Namespaces {
    let ns = Namespaces::create(prefix, &["a", "b"]);
    let (a, b) = (ns.name("a").to_string(), ns.name("b").to_string());
    sh_line(&format!(
        "ip link add ia netns {a} type veth peer name ib netns {b}"
    ));
    ns.ip_line("a", "addr add 198.51.100.2/24 dev ia");
    ns.ip_line("a", "link set ia up");
    for address in b_addresses {
        ns.ip_line("b", &format!("addr add {address} dev ib"));
    }
    ns.ip_line("b", "link set ib up");
    ns
}

/// Sends, from `role`'s netns to `to`, an ICMP port unreachable quoting
/// only the IP and UDP headers of a datagram from `to` to `quoted_dst` on
/// UDP `port`: the least a stack may quote (the IP header and 8 bytes).
fn send_short_port_unreachable(
    ns: &Namespaces,
    role: &str,
    to: std::net::Ipv4Addr,
    quoted_dst: std::net::Ipv4Addr,
    port: u16,
) {
    use nix::sys::socket::{
        AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, sendto, socket,
    };
    use std::os::fd::AsRawFd as _;
    let mut message = vec![3, 3, 0, 0, 0, 0, 0, 0];
    // The quoted IPv4 header (a 100-byte datagram, DF) and UDP header.
    message.extend([0x45, 0, 0, 100, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    message.extend(to.octets());
    message.extend(quoted_dst.octets());
    message.extend(port.to_be_bytes());
    message.extend(port.to_be_bytes());
    message.extend([0, 80, 0, 0]);
    let sum = message
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    ns.run_in(role, move || {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Icmp,
        )
        .expect("raw ICMP socket");
        let address = SockaddrIn::from(std::net::SocketAddrV4::new(to, 0));
        sendto(fd.as_raw_fd(), &message, &address, MsgFlags::empty()).expect("send ICMP");
    });
}

/// The IKE path watch, with exact counts: IKE answered by the peer, NAT-T
/// IKE on 4500 told from ESP-in-UDP by the non-ESP marker (in the ICMP
/// errors that quote them too, and not called IKE when the quote stops
/// before the marker), a peer address with nothing listening (ICMP port
/// unreachable back), our own firewall dropping IKE on the way out, and
/// the peer's dropping it on the way in.
#[test]
fn ike_watch_counts_each_peer_exactly() {
    require_root();
    let _serial = serial();
    let ns = two_hosts(
        "xi",
        &["198.51.100.3/24", "198.51.100.4/24", "198.51.100.6/24"],
    );
    let (a, b) = (ns.name("a").to_string(), ns.name("b").to_string());
    // .5 answers ARP nowhere: a static neighbour lets the firewall, not
    // ARP, stop the packets.
    ns.ip_line(
        "a",
        "neigh add 198.51.100.5 lladdr 02:00:00:00:00:05 dev ia",
    );
    sh_line(&format!(
        "ip netns exec {a} iptables -A OUTPUT -p udp -d 198.51.100.5 --dport 500 -j DROP"
    ));
    sh_line(&format!(
        "ip netns exec {b} iptables -A INPUT -p udp -d 198.51.100.6 --dport 500 -j DROP"
    ));
    // The peer answers every request to .4 with port unreachable: its
    // per-destination ICMP rate limit (1/s, burst 6, the warm-up's answer
    // included) would otherwise drop some depending on how fast the tracer
    // starts.
    sh_line(&format!(
        "ip netns exec {b} sysctl -qw net.ipv4.icmp_ratelimit=0"
    ));
    let bind = |role: &str, address: &'static str| {
        ns.run_in(role, move || {
            let socket = UdpSocket::bind(address).expect("bind");
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            socket
        })
    };
    let (a500, a4500) = (
        bind("a", "198.51.100.2:500"),
        bind("a", "198.51.100.2:4500"),
    );
    let (b500, b4500) = (
        bind("b", "198.51.100.3:500"),
        bind("b", "198.51.100.3:4500"),
    );
    // Warm ARP outside the traced window.
    for peer in ["198.51.100.3:9", "198.51.100.4:9", "198.51.100.6:9"] {
        a500.send_to(b"", peer).expect("warm-up");
    }
    std::thread::sleep(Duration::from_millis(500));

    let echo = |from: &UdpSocket, to: &UdpSocket, payload: &[u8], count: usize| {
        let mut buf = [0u8; 64];
        for _ in 0..count {
            from.send_to(payload, to.local_addr().unwrap())
                .expect("send");
            let (n, back) = to.recv_from(&mut buf).expect("peer receives");
            to.send_to(&buf[..n], back).expect("peer answers");
            from.recv_from(&mut buf).expect("answer arrives");
        }
    };
    // A pluto that is not there is said plainly; everything else works.
    let no_pluto = "/run/xfrm-trace-test-no-such-pluto.ctl";
    let report = tests::traced("ike-watch", &["--pluto-socket", no_pluto], || {
        // IKE_SA_INIT-like on 500; NAT-T IKE (zero marker) and ESP-in-UDP
        // (an SPI where the marker would be) on 4500.
        echo(&a500, &b500, b"ike-sa-init", 5);
        echo(&a4500, &b4500, b"\0\0\0\0ike-on-4500", 3);
        echo(&a4500, &b4500, b"\x00\x00\x10\x01esp", 2);
        for _ in 0..4 {
            a500.send_to(b"ike", "198.51.100.4:500").expect("send");
        }
        // Nothing listens on 4500 at .4 either: NAT-T IKE comes back as
        // port unreachable, ESP in UDP too but it is not IKE.
        for _ in 0..2 {
            a4500
                .send_to(b"\0\0\0\0ike", "198.51.100.4:4500")
                .expect("send");
        }
        for _ in 0..3 {
            a4500
                .send_to(b"\x00\x00\x10\x01esp", "198.51.100.4:4500")
                .expect("send");
        }
        // Port unreachable quoting no more than the UDP header: IKE on
        // 500 (.7), unknown on 4500 (.8), so not IKE.
        let (local, short_500, short_4500) = (
            "198.51.100.2".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
            "198.51.100.8".parse().unwrap(),
        );
        for _ in 0..2 {
            send_short_port_unreachable(&ns, "b", local, short_500, 500);
        }
        for _ in 0..3 {
            send_short_port_unreachable(&ns, "b", local, short_4500, 4500);
        }
        for _ in 0..3 {
            let _ = a500.send_to(b"ike", "198.51.100.5:500");
        }
        for _ in 0..2 {
            a500.send_to(b"ike", "198.51.100.6:500").expect("send");
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    assert!(
        report.pluto.problems.len() == 1 && report.pluto.problems[0].contains(no_pluto),
        "{:#?}",
        report.pluto
    );
    assert!(report.pluto.instances.is_empty(), "{:#?}", report.pluto);
    let path = |role: &str, local: &str, peer: &str| {
        report
            .ike
            .iter()
            .find(|p| p.netns == ns.inode(role) && p.local == local && p.peer == peer)
            .unwrap_or_else(|| panic!("no IKE row {role} {local} -> {peer}: {:#?}", report.ike))
    };
    let counts = |p: &IkePath| {
        let dropped: Vec<(u64, String, bool)> = p
            .dropped
            .iter()
            .map(|d| (d.count, d.direction.clone(), d.firewall))
            .collect();
        (p.sent, p.received, p.port_unreachable, dropped)
    };
    // The answered peer: 5 on 500 + 3 on 4500 each way; ESP-in-UDP not IKE.
    assert_eq!(
        counts(path("a", "198.51.100.2", "198.51.100.3")),
        (8, 8, 0, vec![])
    );
    assert_eq!(
        counts(path("b", "198.51.100.3", "198.51.100.2")),
        (8, 8, 0, vec![])
    );
    // Nothing listens at .4: every request (4 on 500, 2 on 4500) comes
    // back as port unreachable, and the peer drops each for want of a
    // socket; the ESP in UDP refused there is not IKE.
    assert_eq!(
        counts(path("a", "198.51.100.2", "198.51.100.4")),
        (6, 0, 6, vec![])
    );
    assert_eq!(
        counts(path("b", "198.51.100.4", "198.51.100.2")),
        (0, 6, 0, vec![(6, "in".into(), false)])
    );
    // Short quotes: on 500 IKE, on 4500 nothing to tell, so no path.
    assert_eq!(
        counts(path("a", "198.51.100.2", "198.51.100.7")),
        (0, 0, 2, vec![])
    );
    assert!(
        !report.ike.iter().any(|p| p.peer == "198.51.100.8"),
        "{:#?}",
        report.ike
    );
    // Our firewall: never sent.
    assert_eq!(
        counts(path("a", "198.51.100.2", "198.51.100.5")),
        (0, 0, 0, vec![(3, "out".into(), true)])
    );
    // The peer's firewall: sent, received there, dropped there.
    assert_eq!(
        counts(path("a", "198.51.100.2", "198.51.100.6")),
        (2, 0, 0, vec![])
    );
    assert_eq!(
        counts(path("b", "198.51.100.6", "198.51.100.2")),
        (0, 2, 0, vec![(2, "in".into(), true)])
    );
}

/// Reads `http://127.0.0.1:<port>/metrics` from inside the netns.
fn scrape(ns: &Namespaces, role: &str, port: u16) -> (String, String) {
    ns.run_in(role, move || {
        use std::io::{Read as _, Write as _};
        let mut stream =
            std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        (head.to_string(), body.to_string())
    })
}

fn metric(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// The OpenMetrics endpoint serves the same figures as the JSON report,
/// refreshed while running. The tracer listens inside a netns of the test.
/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn prometheus_metrics_equal_the_report() {
    require_root();
    let _serial = serial();
    const FORWARDED: u64 = 7;
    const LOCAL: u64 = 4;
    let ns = blocked_topology();
    let metrics_ns = Namespaces::create("xp", &["m"]);
    metrics_ns.ip_line("m", "link set lo up");
    send_udp(&ns, "a", "203.0.113.2:9", 1);
    std::thread::sleep(Duration::from_millis(300));
    let router_before = ns.xfrm_stat("r");
    let json = scratch("prometheus.json");
    let mut tracer = Tracer::start_in(
        Some(metrics_ns.name("m")),
        &[
            "--prometheus",
            "127.0.0.1:9469",
            "--interval",
            "1s",
            "--json",
            json.to_str().unwrap(),
        ],
        &scratch("prometheus.ready"),
    );
    assert_eq!(send_udp(&ns, "a", "203.0.113.2:9", FORWARDED as usize), 0);
    assert_eq!(
        send_udp(&ns, "a", "198.51.100.1:9", LOCAL as usize),
        LOCAL as usize
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while ns.xfrm_stat("r")["XfrmInPolBlock"] < router_before["XfrmInPolBlock"] + FORWARDED {
        assert!(
            Instant::now() < deadline,
            "router never counted the blocked packets"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (router, sender) = (ns.name("r").to_string(), ns.name("a").to_string());
    let in_series = format!(
        "xfrm_trace_xfrm_stat_increase_total{{counter=\"XfrmInPolBlock\",netns=\"{router}\"}}"
    );
    let out_series = format!(
        "xfrm_trace_xfrm_stat_increase_total{{counter=\"XfrmOutPolBlock\",netns=\"{sender}\"}}"
    );
    let drops_series = format!(
        "xfrm_trace_xfrm_drops_total{{reason=\"XFRM_POLICY\",function=\"ip_forward\",netns=\"{router}\"}}"
    );
    // Before 5.17 a drop has no reason: only the counters are compared.
    let with_reasons = kfree_skb_has_reason();
    // Refreshed every second: wait for the refresh that saw every packet
    // (counters and drop table are read one after the other).
    let deadline = Instant::now() + Duration::from_secs(15);
    let (head, body) = loop {
        let (head, body) = scrape(&metrics_ns, "m", 9469);
        if metric(&body, &in_series) == Some(FORWARDED)
            && metric(&body, &out_series) == Some(LOCAL)
            && (!with_reasons || metric(&body, &drops_series) == Some(FORWARDED))
        {
            break (head, body);
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the drops:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(
        body.contains("# TYPE xfrm_trace_xfrm_stat_increase counter"),
        "{body}"
    );
    let out = tracer.interrupt();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    assert_eq!(
        netns_delta(counter(&report, "XfrmInPolBlock"), ns.inode("r")),
        FORWARDED
    );
    assert_eq!(
        netns_delta(counter(&report, "XfrmOutPolBlock"), ns.inode("a")),
        LOCAL
    );
    if with_reasons {
        let in_json: u64 = report["drops"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["netns_label"] == router.as_str() && d["reason"] == "XFRM_POLICY")
            .map(|d| d["count"].as_u64().unwrap())
            .sum();
        assert_eq!(metric(&body, &drops_series), Some(in_json), "{body}");
        assert_eq!(in_json, FORWARDED);
    }
}

/// `--netns` and `--filter` narrow the report to what was asked.
/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn netns_and_filter_narrow_the_report() {
    require_root();
    let _serial = serial();
    let ns = two_hosts("xf", &["198.51.100.3/24", "198.51.100.4/24"]);
    let a = ns.name("a").to_string();
    let sender = ns.run_in("a", || UdpSocket::bind("198.51.100.2:500").expect("bind"));
    for peer in ["198.51.100.3:9", "198.51.100.4:9"] {
        sender.send_to(b"", peer).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = tests::traced_report(
        "filtered",
        &["--netns", &a, "--filter", "198.51.100.4/32"],
        || {
            for peer in ["198.51.100.3:500", "198.51.100.4:500"] {
                for _ in 0..3 {
                    sender.send_to(b"ike", peer).unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        },
    );
    assert_eq!(
        report["filter"],
        serde_json::json!([format!("netns {a}"), "198.51.100.4/32"])
    );
    let ike = report["ike"].as_array().unwrap();
    assert_eq!(ike.len(), 1, "{ike:#?}");
    assert_eq!(
        (ike[0]["local"].as_str(), ike[0]["peer"].as_str()),
        (Some("198.51.100.2"), Some("198.51.100.4"))
    );
    assert_eq!(ike[0]["sent"], 3);
    let labels: Vec<&str> = report["netns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, [a.as_str()]);
    for d in report["drops"].as_array().unwrap() {
        assert_eq!(d["netns_label"], a.as_str(), "{d}");
    }
}

/// `report -o` writes one tar.gz with the files its README lists, whole or
/// not at all; a directory that does not exist is one error line.
/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn report_bundle_has_every_file_and_is_written_whole() {
    require_root();
    let _serial = serial();
    let dir = scratch("bundle");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bundle = dir.join("evidence.tar.gz");
    let out = Command::new(binary())
        .args([
            "report",
            "-o",
            bundle.to_str().unwrap(),
            "--duration",
            "1s",
            "--quiet",
        ])
        .output()
        .expect("xfrm-trace report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leftovers: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["evidence.tar.gz"]);
    sh(&[
        "tar",
        "-xzf",
        bundle.to_str().unwrap(),
        "-C",
        dir.to_str().unwrap(),
    ]);
    let root = dir.join("xfrm-trace-evidence");
    let readme = std::fs::read_to_string(root.join("README.txt")).unwrap();
    for file in [
        "report.txt",
        "report.json",
        "kernel.txt",
        "coverage.json",
        "xfrm_stat.json",
        "xfrm_state.json",
        "pluto.json",
        "drop_sites.txt",
        "command.txt",
    ] {
        assert!(root.join(file).exists(), "{file} missing");
        assert!(readme.contains(file), "README does not explain {file}");
    }
    let report: Value =
        serde_json::from_slice(&std::fs::read(root.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["schema"], "xfrm-trace/1");
    let stat: Value =
        serde_json::from_slice(&std::fs::read(root.join("xfrm_stat.json")).unwrap()).unwrap();
    assert!(
        stat["host"]["before"]["XfrmInNoStates"].is_u64(),
        "{stat:#}"
    );
    let kernel = std::fs::read_to_string(root.join("kernel.txt")).unwrap();
    let release = String::from_utf8_lossy(&sh_line("uname -r").stdout)
        .trim()
        .to_string();
    assert!(kernel.contains(&release), "{kernel}");

    let missing = dir.join("no-such-dir/evidence.tar.gz");
    let out = Command::new(binary())
        .args([
            "report",
            "-o",
            missing.to_str().unwrap(),
            "--duration",
            "1s",
            "--quiet",
        ])
        .output()
        .expect("xfrm-trace report");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no-such-dir"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs on: host (userspace only: no VM kernel adds anything)
#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let run = |args: &[&str]| {
        let out = Command::new(binary()).args(args).output().expect("run");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("--pluto-socket") && bash.contains("doctor"),
        "{bash}"
    );
    let man = run(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH xfrm-trace"),
        "{man}"
    );
    assert!(man.contains("pluto\\-socket"), "{man}");
    let help = run(&["--help"]);
    assert!(
        help.contains("Exit codes:") && help.contains("--fail-on-findings"),
        "{help}"
    );
}
