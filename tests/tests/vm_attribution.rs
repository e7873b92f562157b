//! Every XFRM counter increment the lab can cause is attributed to its
//! packet: the tool's count equals the packets sent and the kernel's delta,
//! and it names the SA, policy and addresses the test set up. VM-only: the
//! host kernel has no ESP and cannot hook XFRM functions.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use serde_json::Value;
use tests::traced_report;
use xfrm_trace::lab::{Df, EAST_WAN, EHOST, Host, Lab, StaticIpsec, WEST_WAN, WHOST};

const COUNT: usize = 6;

fn lab(name: &str) -> Lab {
    lab_with(name, &StaticIpsec::default())
}

fn lab_with(name: &str, config: &StaticIpsec) -> Lab {
    let mut lab =
        Lab::create(&format!("xa{}{name}", std::process::id() % 10000)).expect("lab topology");
    lab.static_ipsec(config).expect("static SAs");
    lab
}

/// Sends `count` datagrams 100 ms apart (so SA expiry timers run between).
fn send_spaced(lab: &Lab, from: Host, to: &str, count: usize) {
    for _ in 0..count {
        lab.send_udp(from, udp(to), 1, 100).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every source of `name` in `host`'s netns names SA 0x1001 west->east.
fn assert_west_to_east_sa(sources: &[Value]) {
    for s in sources {
        assert_eq!(s["spi"], "0x00001001", "{s}");
        assert_eq!(s["reqid"], 1, "{s}");
    }
}

/// How the tracer hooks the XFRM functions in a test.
#[derive(Clone, Copy)]
enum Hooks {
    /// The default choice; the VM kernels allow fentry everywhere.
    Auto,
    /// Forced kprobe/kretprobe: the fallback for kernels without fentry.
    Kprobe,
    /// `--brackets`: per-packet brackets instead of the diff at the drop.
    Brackets,
}

/// Runs `action` while the tracer watches; returns its JSON report.
fn traced(name: &str, action: impl FnOnce()) -> Value {
    traced_with(Hooks::Auto, name, action)
}

fn traced_with(hooks: Hooks, name: &str, action: impl FnOnce()) -> Value {
    let (args, mode, strategy): (&[&str], _, _) = match hooks {
        Hooks::Auto => (&["--hooks", "auto"], "fentry", "drop_diff"),
        Hooks::Kprobe => (&["--hooks", "kprobe"], "kprobe", "drop_diff"),
        Hooks::Brackets => (&["--brackets"], "fentry", "brackets"),
    };
    let report = traced_report(name, args, action);
    assert_eq!(report["kernel"]["mode"], mode, "{:#}", report["coverage"]);
    assert_eq!(report["coverage"]["strategy"], strategy);
    report
}

fn counter<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("{name} missing: {:#}", report["counters"]))
}

/// The counter moved by exactly `expected` in `host`'s netns since
/// `before` (read before the tracer started), the tool attributed every
/// increment, and returns the sources in that netns.
fn assert_exact(
    report: &Value,
    lab: &Lab,
    host: Host,
    name: &str,
    before: &xfrm_trace::xfrm_stat::XfrmStat,
    expected: u64,
) -> Vec<Value> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(lab.ns_path(host)).expect("netns").ino();
    assert_eq!(
        delta(lab, host, name, before),
        expected,
        "kernel's own {name} delta"
    );
    let c = counter(report, name);
    let in_ns = c["by_netns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["netns"] == inode)
        .expect("netns delta");
    assert_eq!(
        in_ns["delta"], expected,
        "{name}: reported kernel delta {c:#}"
    );
    assert_eq!(in_ns["attributed"], expected, "{name}: attributed {c:#}");
    assert_eq!(c["gap"], 0, "{name}: {c:#}");
    let sources: Vec<Value> = c["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["netns"] == inode)
        .cloned()
        .collect();
    let total: u64 = sources.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(total, expected, "{name}: sources {sources:#?}");
    sources
}

/// Whether the running kernel is older than `major.minor`.
/// Each kernel text symbol (vmlinux and modules) with its size up to the
/// next symbol, as this test reads /proc/kallsyms itself; `None` for the
/// last symbol of vmlinux or a module, whose end nothing marks.
fn kernel_symbol_sizes() -> HashMap<String, Vec<Option<u64>>> {
    let text = std::fs::read_to_string("/proc/kallsyms").expect("/proc/kallsyms");
    let mut symbols: Vec<(u64, &str, Option<&str>)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let address = u64::from_str_radix(fields.next()?, 16).ok()?;
            let kind = fields.next()?;
            let name = fields.next()?;
            matches!(kind, "t" | "T" | "w" | "W").then_some((address, name, fields.next()))
        })
        .collect();
    symbols.sort_unstable();
    let mut sizes: HashMap<String, Vec<Option<u64>>> = HashMap::new();
    for (i, &(address, name, module)) in symbols.iter().enumerate() {
        // Aliases share an address: the next symbol is the next address.
        let size = symbols[i + 1..]
            .iter()
            .find(|next| next.0 > address)
            .filter(|next| next.2 == module)
            .map(|next| next.0 - address);
        sizes.entry(name.to_string()).or_default().push(size);
    }
    sizes
}

/// No frame is named after a symbol it lies beyond (`name+0xoff` with the
/// offset inside one of the symbols of that name; past the last symbol of
/// a region, within 64 KiB: no kernel function is that large), and no
/// frame is one of xfrm-trace's own (its BPF programs, their trampoline).
fn assert_frames_within_their_symbols(stack: &[&str], sizes: &HashMap<String, Vec<Option<u64>>>) {
    for frame in stack {
        if frame.starts_with("0x") {
            continue;
        }
        let (name, offset) = frame
            .rsplit_once("+0x")
            .unwrap_or_else(|| panic!("frame {frame} in {stack:?}"));
        assert!(
            !name.starts_with("bpf_prog_") && !name.starts_with("bpf_trampoline_"),
            "BPF frame {frame} in {stack:?}"
        );
        let offset = u64::from_str_radix(offset, 16).unwrap();
        let fits = sizes
            .get(name)
            .is_some_and(|sizes| sizes.iter().any(|size| offset < size.unwrap_or(0x10000)));
        assert!(
            fits,
            "{frame} lies beyond its symbol ({:?}): {stack:?}",
            sizes.get(name)
        );
    }
}

fn delta(lab: &Lab, host: Host, name: &str, before: &xfrm_trace::xfrm_stat::XfrmStat) -> u64 {
    let now = lab.xfrm_stat(host).expect("xfrm_stat");
    now.0.get(name).copied().unwrap_or(0) - before.0.get(name).copied().unwrap_or(0)
}

fn udp(to: &str) -> SocketAddr {
    format!("{to}:7000").parse().unwrap()
}

/// Policy index of the only policy matching `selector` in `host`.
fn policy_index(lab: &Lab, host: Host, args: &[&str]) -> u64 {
    let mut full = vec!["xfrm", "policy", "get"];
    full.extend_from_slice(args);
    let mut stats = vec!["-s"];
    stats.extend_from_slice(&full);
    let out = lab.ip(host, &stats).expect("ip -s xfrm policy get");
    let index = out
        .split_whitespace()
        .skip_while(|w| *w != "index")
        .nth(1)
        .expect("index in policy");
    index.parse().expect("number")
}

#[test]
fn in_no_states_names_the_missing_sa_and_ignores_healthy_traffic() {
    in_no_states(Hooks::Auto);
}

/// Runs on: 6.1 (the forced-kprobe variant: the kprobe path is the same on every kernel; the fentry variant runs everywhere)
#[test]
fn kprobe_in_no_states_names_the_missing_sa() {
    in_no_states(Hooks::Kprobe);
}

/// Runs on: 6.1 (the per-packet brackets of `--brackets`: the same functions on every kernel; the diff at the drop runs everywhere)
#[test]
fn brackets_in_no_states_names_the_missing_sa() {
    in_no_states(Hooks::Brackets);
}

fn in_no_states(hooks: Hooks) {
    let lab = lab(&format!("ns{}", hooks as u8));
    // Warm up neighbours both ways through the tunnel.
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    let back = lab.udp_sink(Host::Whost, 7000).unwrap();
    lab.send_udp(Host::Whost, udp(EHOST), 1, 64).unwrap();
    assert_eq!(sink.receive(1, Duration::from_secs(10)), 1);
    // East forgets its inbound SA: west's ESP with SPI 0x1001 finds no state.
    lab.ip_line(
        Host::East,
        &format!("xfrm state delete src {WEST_WAN} dst {EAST_WAN} proto esp spi 0x1001"),
    )
    .unwrap();
    let before = lab.xfrm_stat(Host::East).unwrap();
    let report = traced_with(hooks, "nostates", || {
        for _ in 0..COUNT {
            lab.send_udp(Host::Whost, udp(EHOST), 1, 100).unwrap();
            // Healthy traffic the other way (SA 0x2002) at the same time.
            lab.send_udp(Host::Ehost, udp(WHOST), 1, 100).unwrap();
        }
        assert_eq!(
            back.receive(COUNT, Duration::from_secs(5)),
            COUNT,
            "healthy direction must work"
        );
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::East,
        "XfrmInNoStates",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        assert_eq!(s["spi"], "0x00001001", "{s}");
        assert_eq!(
            (s["src"].as_str(), s["dst"].as_str()),
            (Some(WEST_WAN), Some(EAST_WAN)),
            "{s}"
        );
        assert_eq!(s["proto"], "esp");
        assert_eq!(s["function"], "xfrm_input");
        assert_eq!(s["dir"], "in");
        assert_eq!(s["ifname"], "wan0");
    }
    let all = report["counters"].as_array().unwrap();
    assert!(
        all.iter()
            .flat_map(|c| c["sources"].as_array().unwrap())
            .all(|s| s["spi"] != "0x00002002"),
        "healthy SA 0x2002 misattributed: {all:#?}"
    );
}

#[test]
fn out_pol_block_names_the_blocking_policy() {
    let lab = lab("ob");
    lab.ip_line(
        Host::West,
        "xfrm policy add src 192.0.2.1/32 dst 203.0.113.1/32 proto udp dir out action block",
    )
    .unwrap();
    let index = policy_index(
        &lab,
        Host::West,
        &[
            "src",
            "192.0.2.1/32",
            "dst",
            "203.0.113.1/32",
            "proto",
            "udp",
            "dir",
            "out",
        ],
    );
    let before = lab.xfrm_stat(Host::West).unwrap();
    let report = traced("outpolblock", || {
        assert_eq!(
            lab.send_udp(Host::West, udp(EAST_WAN), COUNT, 100).unwrap(),
            COUNT,
            "every send refused"
        );
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::West,
        "XfrmOutPolBlock",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        assert_eq!(s["policy_index"], index, "{s}");
        assert_eq!(s["policy_dir"], "out");
        assert_eq!(
            s["policy_selector"], "192.0.2.1/32 -> 203.0.113.1/32",
            "{s}"
        );
        assert_eq!(
            (s["src"].as_str(), s["dst"].as_str(), s["proto"].as_str()),
            (Some(WEST_WAN), Some(EAST_WAN), Some("udp")),
            "{s}"
        );
        assert_eq!(s["dport"], 7000);
        assert_eq!(s["function"], "xfrm_lookup_with_ifid");
    }
}

#[test]
fn in_pol_block_names_the_blocking_policy() {
    let lab = lab("ib");
    lab.ip_line(
        Host::East,
        "xfrm policy add src 192.0.2.1/32 dst 203.0.113.1/32 proto udp dir in action block",
    )
    .unwrap();
    let index = policy_index(
        &lab,
        Host::East,
        &[
            "src",
            "192.0.2.1/32",
            "dst",
            "203.0.113.1/32",
            "proto",
            "udp",
            "dir",
            "in",
        ],
    );
    // Neighbour resolution first (ARP is not blocked).
    lab.send_udp(Host::West, udp(EAST_WAN), 1, 10).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = lab.xfrm_stat(Host::East).unwrap();
    let report = traced("inpolblock", || {
        lab.send_udp(Host::West, udp(EAST_WAN), COUNT, 100).unwrap();
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::East,
        "XfrmInPolBlock",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        assert_eq!(s["policy_index"], index, "{s}");
        assert_eq!(s["policy_dir"], "in");
        assert_eq!(
            (s["src"].as_str(), s["dst"].as_str()),
            (Some(WEST_WAN), Some(EAST_WAN))
        );
        assert_eq!(s["function"], "__xfrm_policy_check");
        assert_eq!(s["dir"], "in");
    }
}

#[test]
fn in_tmpl_mismatch_and_no_pols_name_the_sa() {
    let lab = lab("tm");
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    lab.send_udp(Host::Whost, udp(EHOST), 1, 64).unwrap();
    assert_eq!(sink.receive(1, Duration::from_secs(10)), 1);
    // East's fwd policy now wants reqid 9; the SA has reqid 1.
    lab.ip_line(Host::East, &format!("xfrm policy update src 10.0.2.0/24 dst 192.168.0.0/16 dir fwd tmpl src {WEST_WAN} dst {EAST_WAN} proto esp reqid 9 mode tunnel"))
    .unwrap();
    let before = lab.xfrm_stat(Host::East).unwrap();
    let report = traced("tmpl", || {
        lab.send_udp(Host::Whost, udp(EHOST), COUNT, 100).unwrap();
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::East,
        "XfrmInTmplMismatch",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        // The inner packet, and the SA it came through.
        assert_eq!(
            (s["src"].as_str(), s["dst"].as_str(), s["proto"].as_str()),
            (Some(WHOST), Some(EHOST), Some("udp")),
            "{s}"
        );
        assert_eq!(s["spi"], "0x00001001", "{s}");
        assert_eq!(s["reqid"], 1);
        assert_eq!(s["dir"], "fwd");
        assert!(s["policy_index"].as_u64().unwrap() > 0, "{s}");
    }
    // Without any fwd policy, decapsulated traffic has no policy at all.
    lab.ip_line(
        Host::East,
        "xfrm policy delete src 10.0.2.0/24 dst 192.168.0.0/16 dir fwd",
    )
    .unwrap();
    let before = lab.xfrm_stat(Host::East).unwrap();
    let report = traced("nopols", || {
        lab.send_udp(Host::Whost, udp(EHOST), COUNT, 100).unwrap();
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::East,
        "XfrmInNoPols",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        assert_eq!(s["spi"], "0x00001001", "{s}");
        assert_eq!(s["policy_index"], 0, "{s}");
        assert_eq!(s["dst"], EHOST);
    }
}

#[test]
fn replayed_esp_is_counted_as_sequence_errors_of_its_sa() {
    replay(Hooks::Auto);
}

/// Runs on: 6.1 (the forced-kprobe variant: the kprobe path is the same on every kernel; the fentry variant runs everywhere)
#[test]
fn kprobe_replayed_esp_is_sampled_with_its_sequence_numbers() {
    replay(Hooks::Kprobe);
}

fn replay(hooks: Hooks) {
    let lab = lab(&format!("rp{}", hooks as u8));
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    lab.send_udp(Host::Whost, udp(EHOST), 1, 64).unwrap();
    assert_eq!(sink.receive(1, Duration::from_secs(10)), 1);
    let capture = lab.capture(Host::Router, "r-east").unwrap();
    lab.send_udp(Host::Whost, udp(EHOST), COUNT, 100).unwrap();
    assert_eq!(sink.receive(COUNT, Duration::from_secs(5)), COUNT);
    std::thread::sleep(Duration::from_millis(200));
    let frames: Vec<Vec<u8>> = capture
        .stop()
        .into_iter()
        .filter(|p| p.protocol == 50 && p.dst.to_string() == EAST_WAN)
        .map(|p| p.frame)
        .collect();
    assert_eq!(frames.len(), COUNT, "captured ESP frames");
    // ESP sequence numbers on the wire: Ethernet 14 + IPv4 20 + SPI 4.
    let mut wire_seqs: Vec<u64> = frames
        .iter()
        .map(|f| u64::from(u32::from_be_bytes(f[38..42].try_into().unwrap())))
        .collect();
    wire_seqs.sort_unstable();
    let before = lab.xfrm_stat(Host::East).unwrap();
    let report = traced_with(hooks, "replay", || {
        assert_eq!(lab.inject(Host::Router, "r-east", frames).unwrap(), COUNT);
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::East,
        "XfrmInStateSeqError",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        assert_eq!(s["spi"], "0x00001001", "{s}");
        assert_eq!(s["reqid"], 1, "{s}");
        assert_eq!(
            (s["src"].as_str(), s["dst"].as_str()),
            (Some(WEST_WAN), Some(EAST_WAN))
        );
        assert_eq!(s["function"], "xfrm_input");
    }
    // Every replayed packet is sampled (well under the rate limit), with
    // its sequence number and the kernel stack that led to xfrm_input.
    let samples = counter(&report, "XfrmInStateSeqError")["samples"]
        .as_array()
        .unwrap()
        .clone();
    let mut seqs: Vec<u64> = samples.iter().filter_map(|s| s["seq"].as_u64()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, wire_seqs, "{samples:#?}");
    let symbol_sizes = kernel_symbol_sizes();
    for sample in &samples {
        assert_eq!(sample["spi"], "0x00001001", "{sample}");
        let stack: Vec<&str> = sample["stack"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            stack.iter().any(|f| f.starts_with("ip_")),
            "stack without the IP receive path: {stack:?}"
        );
        assert_frames_within_their_symbols(&stack, &symbol_sizes);
        let own = sample["own_frames_left_out"].as_u64().unwrap();
        // Sampled as the packet is dropped: the stack starts in the
        // function that frees it (kfree_skb, kfree_skb_reason or
        // sk_skb_reason_drop, by kernel), called from xfrm_input, which
        // refused it. None of our frames: the tracepoint runs the program
        // from the freeing function itself.
        let free = ["kfree_skb", "sk_skb_reason_drop"];
        assert!(free.iter().any(|f| stack[0].starts_with(f)), "{stack:?}");
        let refused_in = stack
            .iter()
            .find(|f| !free.iter().any(|p| f.starts_with(p)));
        assert!(
            refused_in.is_some_and(|f| f.starts_with("xfrm_input+")),
            "{stack:?}"
        );
        assert_eq!(own, 0, "{sample}");
    }
    assert_eq!(report["attribution_errors"]["samples_lost"], 0);
}

#[test]
fn out_no_states_names_the_policy_without_an_sa() {
    out_no_states(Hooks::Auto);
}

/// Runs on: 6.1 (the forced-kprobe variant: the kprobe path is the same on every kernel; the fentry variant runs everywhere)
#[test]
fn kprobe_out_no_states_names_the_policy() {
    out_no_states(Hooks::Kprobe);
}

fn out_no_states(hooks: Hooks) {
    let lab = lab(&format!("on{}", hooks as u8));
    // West keeps its out policy but loses the SA it points at; no IKE
    // daemon listens, so no SA can be acquired.
    lab.ip_line(
        Host::West,
        &format!("xfrm state delete src {WEST_WAN} dst {EAST_WAN} proto esp spi 0x1001"),
    )
    .unwrap();
    let index = policy_index(
        &lab,
        Host::West,
        &["src", "10.0.2.0/24", "dst", "192.168.0.0/16", "dir", "out"],
    );
    lab.send_udp(Host::Whost, udp(EHOST), 1, 64).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let before = lab.xfrm_stat(Host::West).unwrap();
    let report = traced_with(hooks, "outnostates", || {
        lab.send_udp(Host::Whost, udp(EHOST), COUNT, 100).unwrap();
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::West,
        "XfrmOutNoStates",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        assert_eq!(s["policy_index"], index, "{s}");
        assert_eq!(s["policy_dir"], "out");
        assert_eq!(
            (s["src"].as_str(), s["dst"].as_str(), s["proto"].as_str()),
            (Some(WHOST), Some(EHOST), Some("udp")),
            "{s}"
        );
        assert_eq!(s["function"], "xfrm_lookup_with_ifid");
    }
}

#[test]
fn out_state_mode_error_names_the_sa_of_oversize_packets() {
    let lab = lab("om");
    // 1472 bytes of UDP fill a 1500-byte link; ESP in tunnel mode cannot
    // add its overhead, and PMTU probing keeps the kernel from shrinking.
    let before = lab.xfrm_stat(Host::West).unwrap();
    let report = traced("modeerror", || {
        let refused = lab
            .send_udp_df(
                Host::West,
                "10.0.2.1",
                udp(EHOST),
                COUNT,
                1472,
                Df::SetIgnoringPmtu,
            )
            .unwrap();
        assert_eq!(
            refused, COUNT,
            "every oversize send must fail with EMSGSIZE"
        );
    });
    let sources = assert_exact(
        &report,
        &lab,
        Host::West,
        "XfrmOutStateModeError",
        &before,
        COUNT as u64,
    );
    for s in &sources {
        assert_eq!(s["spi"], "0x00001001", "{s}");
        assert_eq!(s["reqid"], 1, "{s}");
        assert_eq!(
            (s["src"].as_str(), s["dst"].as_str()),
            (Some("10.0.2.1"), Some(EHOST)),
            "{s}"
        );
        assert_eq!(s["dir"], "out");
    }
}

#[test]
fn in_state_expired_names_the_sa_that_reached_its_hard_limit() {
    // East's SAs die after 3 packets: the 4th finds its inbound SA expired,
    // the next ones find none (the kernel deletes expired SAs at once).
    let lab = lab_with(
        "ie",
        &StaticIpsec {
            expire_after_packets: Some((Host::East, 3)),
            ..StaticIpsec::default()
        },
    );
    let before = lab.xfrm_stat(Host::East).unwrap();
    let report = traced("inexpired", || send_spaced(&lab, Host::Whost, EHOST, 6));
    let expired = assert_exact(&report, &lab, Host::East, "XfrmInStateExpired", &before, 1);
    assert_west_to_east_sa(&expired);
    assert_eq!(expired[0]["function"], "xfrm_input");
    assert_eq!(expired[0]["src"], WEST_WAN);
    let gone = assert_exact(&report, &lab, Host::East, "XfrmInNoStates", &before, 2);
    for s in &gone {
        assert_eq!(s["spi"], "0x00001001", "{s}");
    }
}

#[test]
fn out_state_expired_names_the_sa_that_reached_its_hard_limit() {
    let lab = lab_with(
        "oe",
        &StaticIpsec {
            expire_after_packets: Some((Host::West, 3)),
            ..StaticIpsec::default()
        },
    );
    let before = lab.xfrm_stat(Host::West).unwrap();
    let report = traced("outexpired", || send_spaced(&lab, Host::Whost, EHOST, 6));
    let expired = assert_exact(&report, &lab, Host::West, "XfrmOutStateExpired", &before, 1);
    assert_west_to_east_sa(&expired);
    assert_eq!(
        (expired[0]["src"].as_str(), expired[0]["dst"].as_str()),
        (Some(WHOST), Some(EHOST))
    );
    assert_eq!(expired[0]["dir"], "out");
    // Then the policy has no SA left.
    assert_exact(&report, &lab, Host::West, "XfrmOutNoStates", &before, 2);
}

#[test]
fn in_state_proto_error_names_the_sa_of_corrupted_esp() {
    let lab = lab("ip");
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    lab.send_udp(Host::Whost, udp(EHOST), 1, 64).unwrap();
    assert_eq!(sink.receive(1, Duration::from_secs(10)), 1);
    // Fresh ESP that east has not seen: its firewall holds it back while the
    // router captures it.
    let nft = |args: &[&str]| lab.exec(Host::East, "nft", args).unwrap();
    nft(&["add", "table", "inet", "hold"]);
    nft(&[
        "add",
        "chain",
        "inet",
        "hold",
        "in",
        "{ type filter hook input priority 0; }",
    ]);
    nft(&[
        "add", "rule", "inet", "hold", "in", "meta", "l4proto", "esp", "drop",
    ]);
    let capture = lab.capture(Host::Router, "r-east").unwrap();
    lab.send_udp(Host::Whost, udp(EHOST), COUNT, 100).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    nft(&["delete", "table", "inet", "hold"]);
    // Flip a bit of each ICV (the last byte): integrity check fails.
    let frames: Vec<Vec<u8>> = capture
        .stop()
        .into_iter()
        .filter(|p| p.protocol == 50 && p.dst.to_string() == EAST_WAN)
        .map(|p| {
            let mut frame = p.frame;
            *frame.last_mut().unwrap() ^= 1;
            frame
        })
        .collect();
    assert_eq!(frames.len(), COUNT, "captured ESP frames");
    let before = lab.xfrm_stat(Host::East).unwrap();
    let report = traced("protoerror", || {
        assert_eq!(lab.inject(Host::Router, "r-east", frames).unwrap(), COUNT);
    });
    assert_eq!(sink.receive(1, Duration::from_millis(200)), 0);
    let sources = assert_exact(
        &report,
        &lab,
        Host::East,
        "XfrmInStateProtoError",
        &before,
        COUNT as u64,
    );
    assert_west_to_east_sa(&sources);
    for s in &sources {
        assert_eq!(s["function"], "xfrm_input", "{s}");
        assert_eq!(s["ifname"], "wan0", "{s}");
    }
    // Integrity failures point at the SA or the kernel: the diagnosis
    // says so, with the SA and what to attach to a bug report.
    let findings: Vec<&Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "kernel_xfrm_errors")
        .collect();
    assert_eq!(findings.len(), 1, "{:#}", report["findings"]);
    let evidence = findings[0]["evidence"].to_string();
    assert!(
        evidence.contains("XfrmInStateProtoError +6") && evidence.contains("0x00001001"),
        "{evidence}"
    );
}

/// `Udp: ... NoPorts` of `/proc/net/snmp` in `host`: datagrams that found
/// no socket (each answered with ICMP port unreachable).
/// Runs of the IKE watch's programs (socket hooks and fallback
/// tracepoints), summed over the programs process `pid` holds: the
/// kernel's own statistics (`kernel.bpf_stats_enabled`), named by bpftool
/// (which cuts names to 15 bytes).
fn ike_watch_runs(pid: u32) -> u64 {
    let mut runs = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let info = std::fs::read_to_string(fd.unwrap().path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(count)) = (field("prog_id:"), field("run_cnt:")) else {
            continue;
        };
        let out = tests::sh(&["bpftool", "--json", "prog", "show", "id", &id.to_string()]);
        let program: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let name = program["name"].as_str().unwrap_or_default();
        if ["ike_", "net_dev_queue", "netif_receive"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            runs += count;
        }
    }
    runs
}

/// ESP packets through west's SAs (both directions), from `ip -s xfrm state`.
fn esp_packets(lab: &Lab) -> u64 {
    let out = lab
        .exec(Host::West, "ip", &["-s", "xfrm", "state"])
        .unwrap();
    out.split_whitespace()
        .filter_map(|w| w.strip_suffix("(packets)")?.parse::<u64>().ok())
        .sum()
}

/// The IKE watch's runs per ESP packet while a TCP transfer goes through
/// the tunnel (data one way, acknowledgements the other), with the tracer
/// started with `hooks`.
fn ike_watch_runs_per_esp_packet(lab: &Lab, hooks: &str) -> f64 {
    use std::io::{Read as _, Write as _};
    let listener = xfrm_trace::netns::run_in(&lab.ns_path(Host::Ehost), || {
        std::net::TcpListener::bind((EHOST, 7001))
    })
    .unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut sink = Vec::new();
        stream.read_to_end(&mut sink).unwrap();
        sink.len()
    });
    let ready = tests::scratch(&format!("ike-runs-{hooks}.ready"));
    let mut tracer = tests::Tracer::start(&["--quiet", "--hooks", hooks], &ready);
    let (runs_before, esp_before) = (ike_watch_runs(tracer.child.id()), esp_packets(lab));
    let mut stream = xfrm_trace::netns::run_in(&lab.ns_path(Host::Whost), || {
        std::net::TcpStream::connect((EHOST, 7001))
    })
    .unwrap();
    stream.write_all(&vec![0x5a; 2 << 20]).unwrap();
    drop(stream);
    assert_eq!(server.join().unwrap(), 2 << 20);
    let runs = ike_watch_runs(tracer.child.id()) - runs_before;
    let esp = esp_packets(lab) - esp_before;
    assert!(tracer.interrupt().status.success());
    assert!(esp > 1000, "{esp} ESP packets");
    eprintln!("IKE watch, --hooks {hooks}: {runs} runs for {esp} ESP packets");
    runs as f64 / esp as f64
}

/// Healthy ESP costs the IKE watch nothing where functions can be hooked:
/// no program of the watch runs while the tunnel carries a TCP transfer
/// (no UDP socket, no ICMP on the way). The interface tracepoints, the
/// fallback, run several times per ESP packet (each device it crosses).
/// Runs on: 6.12 (the same hooks on every kernel that hooks functions)
#[test]
fn healthy_esp_runs_no_program_of_the_ike_watch() {
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").unwrap();
    let lab = lab("ir");
    // Neighbours resolved before the measured windows.
    send_spaced(&lab, Host::Whost, EHOST, 1);
    let fallback = ike_watch_runs_per_esp_packet(&lab, "tracepoint");
    let sockets = ike_watch_runs_per_esp_packet(&lab, "auto");
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0").unwrap();
    assert_eq!(sockets, 0.0);
    assert!(fallback >= 1.0, "{fallback} runs per ESP packet");
}

fn udp_no_ports(lab: &Lab, host: Host) -> u64 {
    let snmp = xfrm_trace::netns::read_proc_net(&lab.ns_path(host), "snmp").expect("snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names
        .split_whitespace()
        .position(|n| n == "NoPorts")
        .unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

/// ESP in UDP 4500 that the peer refuses (its NAT-T socket closed: the
/// kernel answers ICMP port unreachable, quoting the ESP packet with its
/// SPI where IKE has the zero non-ESP marker) is not IKE: the IKE watch
/// counts no port unreachable for it, while IKE on UDP 500 to the same
/// peer, where nothing listens either, still counts each datagram once.
/// Runs on: 6.12 (the IKE watch reads the same packets on every kernel; its quote rule runs everywhere in ike_watch_counts_each_peer_exactly)
#[test]
fn esp_in_udp_refused_by_the_peer_is_not_ike() {
    const IKE_COUNT: usize = 3;
    let config = StaticIpsec {
        nat_t: true,
        ..StaticIpsec::default()
    };
    let mut lab = lab_with("eu", &config);
    lab.close_encap_socket(Host::East);
    // Every refusal answered: east's ICMP rate limit would skip some.
    lab.sysctl(Host::East, "net.ipv4.icmp_ratelimit", "0")
        .unwrap();
    // Neighbours resolved before the traced window.
    lab.send_udp(Host::West, udp(EAST_WAN), 1, 64).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let no_ports_before = udp_no_ports(&lab, Host::East);
    let ike_peer: SocketAddr = format!("{EAST_WAN}:500").parse().unwrap();
    let report = traced("espinudp-refused", || {
        send_spaced(&lab, Host::Whost, EHOST, COUNT);
        assert_eq!(
            lab.send_udp(Host::West, ike_peer, IKE_COUNT, 64).unwrap(),
            0
        );
        std::thread::sleep(Duration::from_millis(300));
    });
    // East refused them all: the ESP-in-UDP packets and the IKE ones.
    assert_eq!(
        udp_no_ports(&lab, Host::East) - no_ports_before,
        (COUNT + IKE_COUNT) as u64
    );
    let esp = report["esp_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spi"] == "0x00001001")
        .unwrap_or_else(|| panic!("SA 0x1001 missing: {:#}", report["esp_sizes"]));
    assert_eq!(esp["packets_out"], COUNT as u64, "{esp:#}");
    let west = std::os::unix::fs::MetadataExt::ino(
        &std::fs::metadata(lab.ns_path(Host::West)).expect("netns"),
    );
    let paths: Vec<&Value> = report["ike"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["netns"] == west)
        .collect();
    assert_eq!(paths.len(), 1, "{paths:#?}");
    let path = paths[0];
    assert_eq!(
        (path["local"].as_str(), path["peer"].as_str()),
        (Some(WEST_WAN), Some(EAST_WAN)),
        "{path:#}"
    );
    let ike = IKE_COUNT as u64;
    assert_eq!(
        (
            path["sent"].as_u64(),
            path["received"].as_u64(),
            path["port_unreachable"].as_u64()
        ),
        (Some(ike), Some(0), Some(ike)),
        "{path:#}"
    );
}
