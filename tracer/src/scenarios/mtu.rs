//! `xfrm-trace lab mtu`: ESP through a path whose MTU is lower than the
//! tunnel expects, with ICMP "fragmentation needed" filtered on the way
//! (the PMTU black hole): small packets pass, a TCP transfer stalls,
//! xfrm-trace names the SA and prescribes `mtu=` and the MSS clamp, the fix
//! is applied and the transfer completes.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::{Step, trace_during};
use crate::{
    hooks::HookChoice,
    lab::{EAST_SUBNET, EHOST, Host, Lab, ROUTER_WEST, StaticIpsec},
};

/// MTU of the router's link towards east (the rest of the path has 1500).
const PATH_MTU: u32 = 1400;
const TRANSFER: usize = 1 << 20;
const PATIENCE: Duration = Duration::from_secs(5);

pub fn run(hooks: HookChoice) -> anyhow::Result<()> {
    let mut step = Step::new(6);
    let mut lab = Lab::create("xtmtu").context("building the lab")?;
    lab.static_ipsec(&StaticIpsec::default())
        .context("this kernel cannot host the IPsec lab (no ESP?)")?;
    lab.ip(
        Host::Router,
        &["link", "set", "r-east", "mtu", &PATH_MTU.to_string()],
    )?;
    for args in [
        &["add", "table", "ip", "blackhole"][..],
        &[
            "add",
            "chain",
            "ip",
            "blackhole",
            "out",
            "{ type filter hook output priority 0; }",
        ],
        &[
            "add",
            "rule",
            "ip",
            "blackhole",
            "out",
            "icmp",
            "type",
            "destination-unreachable",
            "icmp",
            "code",
            "frag-needed",
            "drop",
        ],
    ] {
        lab.exec(Host::Router, "nft", args)?;
    }
    step.say(&format!(
        "lab: IPsec tunnel 10.0.2.0/24 <-> {EAST_SUBNET} (AES-GCM, tunnel mode) between west and east; \
         the router's link towards east has MTU {PATH_MTU} and the router drops the ICMP \
         \"fragmentation needed\" it would send (as many networks do)"
    ));

    let sink = lab.udp_sink(Host::Ehost, 7000)?;
    let to = format!("{EHOST}:7000").parse()?;
    lab.send_udp(Host::Whost, to, 5, 200)?;
    let small = sink.receive(5, PATIENCE);
    step.say(&format!(
        "ping-sized traffic: {small}/5 UDP datagrams of 200 bytes arrived"
    ));

    let tcp_to = format!("{EHOST}:7001").parse()?;
    let mut before = 0;
    let report = trace_during(hooks, || {
        before = lab
            .tcp_transfer(Host::Whost, Host::Ehost, tcp_to, TRANSFER, PATIENCE)
            .unwrap_or(0);
    })?;
    step.say(&format!(
        "TCP transfer of {TRANSFER} bytes: {before} arrived in {} s (the connection opens, then full-size segments vanish)",
        PATIENCE.as_secs()
    ));
    let finding = report
        .findings
        .iter()
        .find(|f| f.kind == crate::model::FindingKind::EspOversize)
        .cloned();
    step.say("xfrm-trace watched the transfer:");
    let Some(finding) = finding else {
        bail!(
            "xfrm-trace found no oversize ESP (mode {}; hooks missing: {:?})",
            report.kernel.mode,
            report.esp_sizes_hooks.missing
        );
    };
    println!("      [{}] {}", finding.kind, finding.summary);
    println!("      fix: {}", finding.fix);
    for e in &finding.evidence {
        println!("      - {e}");
    }

    let inner = report
        .esp_sizes
        .iter()
        .find_map(|s| s.max_inner_fitting)
        .context("no MTU to prescribe")?;
    let mss = inner - 40;
    lab.ip_line(
        Host::West,
        &format!("route add {EAST_SUBNET} via {ROUTER_WEST} mtu {inner}"),
    )?;
    lab.exec_line(
        Host::West,
        &format!(
            "iptables -t mangle -A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {mss}"
        ),
    )?;
    step.say(&format!(
        "fix applied on west: route to {EAST_SUBNET} with mtu {inner} (libreswan: mtu={inner}) and TCP MSS clamped to {mss}"
    ));
    let after = lab.tcp_transfer(Host::Whost, Host::Ehost, tcp_to, TRANSFER, PATIENCE)?;
    step.say(&format!(
        "TCP transfer of {TRANSFER} bytes: {after} arrived"
    ));
    drop(lab);
    if small != 5 || before >= TRANSFER || after != TRANSFER {
        bail!(
            "the lab did not behave as expected (small {small}/5, before {before}, after {after} of {TRANSFER} bytes)"
        );
    }
    println!("lab removed; the MTU failure was reproduced, diagnosed and fixed");
    Ok(())
}
