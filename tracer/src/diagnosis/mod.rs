//! The diagnosis at the end of every run: one finding per cause, in the
//! categories operators know, each with its evidence and its fix. It joins
//! the kernel's evidence (counters and the packets behind them, the IKE
//! path watch, MASQUERADE and MTU findings) with what pluto said.

use std::{collections::BTreeSet, net::IpAddr};

mod counters;

use crate::{
    ike::IkePath,
    model::{Finding, NetnsInfo},
    pluto::{
        log::{EventKind, LogEvent},
        session::{Observed, owner_of_spi_text},
        status::Connection,
    },
    report::Counter,
    xfrm_state::XfrmBook,
};

/// Counters that point at a kernel or SA problem rather than at the
/// configuration (missing SAs and policies are configuration; MTU has
/// its own finding).
const KERNEL_ERROR_COUNTERS: [&str; 17] = [
    "XfrmInError",
    "XfrmInBufferError",
    "XfrmInHdrError",
    "XfrmInStateProtoError",
    "XfrmInStateModeError",
    "XfrmInStateSeqError",
    "XfrmInStateMismatch",
    "XfrmInStateInvalid",
    "XfrmInStateDirError",
    "XfrmOutError",
    "XfrmOutBundleGenError",
    "XfrmOutBundleCheckError",
    "XfrmOutStateProtoError",
    "XfrmOutStateSeqError",
    "XfrmOutStateDirError",
    "XfrmFwdHdrError",
    "XfrmAcquireError",
];

/// Everything the diagnosis looks at.
pub struct Evidence<'a> {
    pub counters: &'a [Counter],
    pub ike: &'a [IkePath],
    pub plutos: &'a [Observed],
    pub book: &'a XfrmBook,
    pub netns: &'a [NetnsInfo],
    /// Whether the IKE path watch was attached (else its silence means nothing).
    pub ike_watched: bool,
}

/// All findings: the given ones (MASQUERADE, MTU) named after their
/// connection, then one per cause found here.
pub fn diagnose(evidence: &Evidence, mut findings: Vec<Finding>) -> Vec<Finding> {
    for finding in &mut findings {
        if let Some((connection, _)) = owner_of_spi_text(evidence.plutos, 0, &finding.spi) {
            finding.connection = connection.to_string();
            finding.summary = format!("connection \"{connection}\": {}", finding.summary);
        }
    }
    for pluto in evidence.plutos {
        let mut names: BTreeSet<&str> = pluto.connections.iter().map(|c| c.name.as_str()).collect();
        names.extend(pluto.events.iter().filter_map(|e| e.connection.as_deref()));
        for name in names {
            let connection = pluto.connections.iter().find(|c| c.name == name);
            findings.extend(connection_findings(evidence, pluto, name, connection));
        }
    }
    findings.extend(unmanaged_tunnels_down(evidence));
    findings.extend(kernel_errors(evidence));
    let unexplained = counters::unexplained(evidence, &findings);
    findings.extend(unexplained);
    findings
}

/// The log events of the kinds given, as evidence lines (first three).
fn quote(events: &[&LogEvent]) -> Vec<String> {
    let mut lines: Vec<String> = events
        .iter()
        .take(3)
        .map(|e| format!("pluto: {} {}", e.time, e.text))
        .collect();
    if events.len() > 3 {
        lines.push(format!("... {} such lines in all", events.len()));
    }
    lines
}

fn matching<'a>(events: &[&'a LogEvent], wanted: impl Fn(&EventKind) -> bool) -> Vec<&'a LogEvent> {
    events.iter().copied().filter(|e| wanted(&e.kind)).collect()
}

/// The findings of one connection of one pluto.
fn connection_findings(
    evidence: &Evidence,
    pluto: &Observed,
    name: &str,
    connection: Option<&Connection>,
) -> Vec<Finding> {
    let events: Vec<&LogEvent> = pluto.events_of(name).collect();
    let finding = |kind: &str, summary: String, fix: String, lines: Vec<String>| Finding {
        kind: kind.into(),
        summary: format!("connection \"{name}\" ({}): {summary}", pluto.netns_label),
        fix,
        evidence: lines,
        connection: name.into(),
        netns_label: pluto.netns_label.clone(),
        spi: String::new(),
    };
    let peer = connection
        .and_then(|c| c.remote_addr)
        .map_or_else(|| "the peer".to_string(), |a| a.to_string());
    let local = connection.and_then(|c| c.local_addr);
    let path = connection.and_then(|c| {
        let (local, remote) = (c.local_addr?.to_string(), c.remote_addr?.to_string());
        evidence
            .ike
            .iter()
            .find(|p| p.netns == pluto.netns && p.local == local && p.peer == remote)
    });
    let mut out = Vec::new();

    // "Possible authentication failure": the peer answers but never
    // accepts our first encrypted message (IKEv1 says no more with PSKs).
    let auth = matching(&events, |k| {
        matches!(
            k,
            EventKind::AuthFailed | EventKind::InvalidHash | EventKind::NoAuthResponseTimeout
        )
    });
    if !auth.is_empty() {
        let ids = connection.map_or_else(String::new, |c| {
            format!(
                " for `{} {}`",
                c.local_id.as_deref().unwrap_or("%any"),
                c.remote_id.as_deref().unwrap_or("%any")
            )
        });
        out.push(finding(
            "auth_failed",
            format!("IKE authentication with {peer} failed: the pre-shared keys (or IDs) differ"),
            format!("make the PSK{ids} identical in ipsec.secrets on both gateways, then `ipsec auto --rereadsecrets` and `ipsec whack --initiate --name {name}`"),
            quote(&auth),
        ));
    }
    // An IKEv1 initiator logs the peer's NO_PROPOSAL_CHOSEN the same way
    // for Main Mode and Quick Mode: before its IKE SA is up, it is IKE's.
    let ike_up_at = events
        .iter()
        .position(|e| matches!(e.kind, EventKind::IkeEstablished));
    let v1_main_mode_refusal = |i: usize, e: &LogEvent| {
        matches!(e.kind, EventKind::ChildProposalRejected)
            && e.text.contains("ignoring informational payload")
            && ike_up_at.is_none_or(|up| i < up)
    };
    let (mut ike, mut child) = (Vec::new(), Vec::new());
    for (i, e) in events.iter().copied().enumerate() {
        if matches!(e.kind, EventKind::IkeProposalRejected) || v1_main_mode_refusal(i, e) {
            ike.push(e);
        } else if matches!(e.kind, EventKind::ChildProposalRejected) {
            child.push(e);
        }
    }
    if !ike.is_empty() {
        let ours = connection
            .and_then(|c| c.ike_algorithms.clone())
            .unwrap_or_else(|| "?".into());
        out.push(finding(
            "ike_proposal_mismatch",
            format!("no common IKE algorithms with {peer} (NO_PROPOSAL_CHOSEN)"),
            format!("set the same ike= on both sides (ours: {ours}); the peer's proposals are in its pluto log"),
            quote(&ike),
        ));
    }
    if !child.is_empty() {
        let ours = connection
            .and_then(|c| c.esp_algorithms.clone())
            .unwrap_or_else(|| "?".into());
        out.push(finding(
            "esp_proposal_mismatch",
            format!("the IKE SA with {peer} is up but no common ESP algorithms for the Child SA (NO_PROPOSAL_CHOSEN)"),
            format!("set the same esp= (and PFS group) on both sides (ours: {ours})"),
            quote(&child),
        ));
    }
    let ts = matching(&events, |k| {
        matches!(k, EventKind::TsUnacceptable | EventKind::QuickModeTimeout)
    });
    if !ts.is_empty() {
        let (summary, fix) = selectors_refused(evidence, connection, &peer, &ts);
        out.push(finding("ts_mismatch", summary, fix, quote(&ts)));
    }
    let refused = matching(&events, |k| {
        matches!(k, EventKind::ConnectionRefused { .. })
    });
    let unreachable = path.map_or(0, |p| p.port_unreachable);
    if !refused.is_empty() || unreachable > 0 {
        let mut lines = quote(&refused);
        if unreachable > 0 {
            lines.insert(
                0,
                format!("{unreachable} ICMP port unreachable from {peer} for our IKE packets (kernel: net:netif_receive_skb)"),
            );
        }
        out.push(finding(
            "peer_not_running_ike",
            format!("nothing listens for IKE at {peer}: it answers UDP 500/4500 with ICMP port unreachable"),
            format!("start the IKE daemon on {peer} (`systemctl start ipsec`), or correct right= if {peer} is the wrong address"),
            lines,
        ));
    }
    let mut blocked: Vec<String> = path
        .map(|p| {
            p.dropped
                .iter()
                .filter(|d| d.firewall)
                .map(|d| {
                    format!(
                        "{} IKE packets {} dropped by a netfilter rule at {} (reason {})",
                        d.count,
                        if d.direction == "out" {
                            "to the peer"
                        } else {
                            "from the peer"
                        },
                        d.function,
                        d.reason
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    if !blocked.is_empty() {
        blocked.extend(quote(&matching(&events, |k| {
            matches!(k, EventKind::SendFailed)
        })));
        let local = local.map_or_else(|| "this gateway".to_string(), |a| a.to_string());
        out.push(finding(
            "ike_blocked_locally",
            format!("this gateway's own firewall drops IKE between {local} and {peer}"),
            format!("allow UDP 500 and 4500 (and ESP, protocol 50) between {local} and {peer} in the netns's firewall, e.g. `iptables -I OUTPUT -p udp -d {peer} -m multiport --dports 500,4500 -j ACCEPT` and `iptables -I INPUT -p udp -s {peer} -m multiport --dports 500,4500 -j ACCEPT`"),
            blocked,
        ));
    }
    let answered = path.is_some_and(|p| p.received > 0);
    let sent = path.map_or(0, |p| p.sent);
    let retransmits = matching(&events, |k| {
        matches!(k, EventKind::Retransmit | EventKind::NoResponseTimeout)
    });
    let silent_path = sent > 0 && !answered;
    let silent_log = !evidence.ike_watched && !retransmits.is_empty();
    if out.is_empty() && (silent_path || silent_log) {
        let mut lines = Vec::new();
        if silent_path {
            lines.push(format!(
                "{sent} IKE packets to {peer} left this gateway and none came back (kernel: net:net_dev_queue, net:netif_receive_skb)"
            ));
        }
        for other in evidence.ike.iter().filter(|p| p.netns != pluto.netns) {
            for d in other.dropped.iter().filter(|d| d.firewall) {
                if [other.local.as_str(), other.peer.as_str()].contains(&peer.as_str()) {
                    lines.push(format!(
                        "{} IKE packets between {} and {} dropped by a netfilter rule in netns {} at {}",
                        d.count, other.local, other.peer, other.netns_label, d.function
                    ));
                }
            }
        }
        lines.extend(quote(&retransmits));
        out.push(finding(
            "ike_unanswered",
            format!("IKE requests to {peer} go out and nothing comes back: a firewall between the peers drops UDP 500/4500, or {peer} is down"),
            format!("open UDP 500 and 4500 (and ESP, protocol 50) from this gateway to {peer} and back on every firewall on the path; check that {peer} is up"),
            lines,
        ));
    }
    if let Some(missing) = sas_missing_in_kernel(evidence, pluto, connection) {
        let spis = missing.spis.join(", ");
        let mut found = finding(
            "sa_missing_in_kernel",
            format!(
                "pluto's Child SA #{} is established, but the kernel has no SA {spis}: it was removed behind pluto's back, and {} packets were dropped for want of it",
                missing.serial, missing.dropped
            ),
            format!(
                "`ipsec whack --ctlsocket {} --rekey-ipsec --name {name}` installs a new Child SA at both ends; then find what removes SAs outside pluto (`ip xfrm state flush` or `deleteall` in a script, a second IKE daemon, a container restart): `ip xfrm monitor` shows the deletions as they happen",
                pluto.ctl_socket.display()
            ),
            missing.lines,
        );
        found.spi = missing.spis[0].clone();
        out.push(found);
    }
    if out.is_empty() && !pluto.is_up(name) {
        let dropped = no_state_drops(evidence, pluto, connection);
        let went_down = pluto.up_at_start.iter().any(|c| c == name);
        let tried = events
            .iter()
            .any(|e| matches!(e.kind, EventKind::Initiating | EventKind::Deleting));
        if dropped > 0 || went_down || tried {
            let mut lines = Vec::new();
            if dropped > 0 {
                lines.push(format!(
                    "{dropped} packets for this connection's subnets dropped for want of an SA (XfrmOutNoStates)"
                ));
            }
            if went_down {
                lines.push("its Child SA was up when the run began and is gone now".into());
            }
            lines.extend(quote(&events));
            out.push(finding(
                "tunnel_down",
                "no Child SA is established, so its traffic is dropped".into(),
                format!("`ipsec whack --ctlsocket {} --initiate --name {name}` and read pluto's log for the reason it went down", pluto.ctl_socket.display()),
                lines,
            ));
        }
    }
    out
}

/// Who refused whose traffic selectors, and, where the peer's are known
/// (its pluto is watched too, or our refusal quotes its proposal), which
/// subnet differs.
fn selectors_refused(
    evidence: &Evidence,
    connection: Option<&Connection>,
    peer: &str,
    events: &[&LogEvent],
) -> (String, String) {
    let refused_here = events.iter().any(|e| e.refused_here());
    let ours = connection.map_or_else(String::new, |c| {
        format!(
            "{} <-> {}",
            c.local_subnets.join(","),
            c.remote_subnets.join(",")
        )
    });
    // The peer's view: (its subnet, the subnet it expects on our side).
    let theirs = peer_connection(evidence, connection)
        .map(|c| (c.local_subnets.join(","), c.remote_subnets.join(",")))
        .or_else(|| {
            events
                .iter()
                .find_map(|e| e.proposed_selectors())
                .map(|(on_our_side, theirs)| (theirs, on_our_side))
        });
    let summary = if refused_here {
        format!("we refused the traffic selectors {peer} proposed (TS_UNACCEPTABLE)")
    } else {
        format!("{peer} refused our traffic selectors (TS_UNACCEPTABLE)")
    };
    let mut differences = Vec::new();
    if let (Some(c), Some((their_subnet, expected_here))) = (connection, &theirs) {
        let (our_subnet, expected_there) = (c.local_subnets.join(","), c.remote_subnets.join(","));
        if *their_subnet != expected_there {
            differences.push(format!(
                "{peer} protects {their_subnet}, we expect {expected_there} (our rightsubnet)"
            ));
        }
        if *expected_here != our_subnet {
            differences.push(format!(
                "{peer} expects {expected_here} on our side, we protect {our_subnet} (our leftsubnet)"
            ));
        }
    }
    let summary = if differences.is_empty() {
        summary
    } else {
        format!("{summary}: {}", differences.join("; "))
    };
    let fix = if ours.is_empty() {
        "leftsubnet/rightsubnet must mirror the peer's rightsubnet/leftsubnet".to_string()
    } else {
        format!(
            "leftsubnet/rightsubnet must mirror the peer's rightsubnet/leftsubnet (ours: {ours})"
        )
    };
    (summary, fix)
}

/// The peer's own connection to us, when its pluto is watched too.
fn peer_connection<'a>(
    evidence: &'a Evidence,
    connection: Option<&Connection>,
) -> Option<&'a Connection> {
    let connection = connection?;
    let (local, remote) = (connection.local_addr?, connection.remote_addr?);
    evidence
        .plutos
        .iter()
        .flat_map(|p| &p.connections)
        .find(|c| c.local_addr == Some(remote) && c.remote_addr == Some(local))
}

/// The SAs of a connection's established Child SA that the kernel lacks.
struct MissingSas {
    serial: u32,
    /// Hex, as `ip xfrm` shows them.
    spis: Vec<String>,
    dropped: u64,
    lines: Vec<String>,
}

/// The SAs pluto lists for the connection's current Child SA that the
/// kernel of its netns does not have, when packets were dropped for want
/// of them (drops make it more than a moment between two looks).
fn sas_missing_in_kernel(
    evidence: &Evidence,
    pluto: &Observed,
    connection: Option<&Connection>,
) -> Option<MissingSas> {
    let connection = connection?;
    let state = pluto.current_child(&connection.name)?;
    let serial = state.serial;
    let kernel = evidence.book.current(pluto.netns)?;
    let missing: Vec<&(u32, IpAddr)> = state
        .esp_spis
        .iter()
        .filter(|(spi, dst)| !kernel.sas.iter().any(|sa| sa.spi == *spi && sa.dst == *dst))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let spis: Vec<String> = missing
        .iter()
        .map(|(spi, _)| format!("0x{spi:08x}"))
        .collect();
    let mut lines = Vec::new();
    let mut dropped = 0;
    for source in evidence
        .counters
        .iter()
        .filter(|c| c.name == "XfrmInNoStates")
        .flat_map(|c| &c.sources)
        .filter(|s| s.netns == pluto.netns && spis.contains(&s.spi))
    {
        dropped += source.count;
        lines.push(format!(
            "{} ESP packets for SA {} from {} dropped at {} on {}: XfrmInNoStates",
            source.count, source.spi, source.src, source.function, source.ifname
        ));
    }
    let outbound_missing = missing
        .iter()
        .any(|(_, dst)| Some(*dst) == connection.remote_addr);
    let outbound = if outbound_missing {
        no_state_drops(evidence, pluto, Some(connection))
    } else {
        0
    };
    if outbound > 0 {
        dropped += outbound;
        lines.push(format!(
            "{outbound} packets for this connection's subnets dropped for want of an SA: XfrmOutNoStates"
        ));
    }
    if dropped == 0 {
        return None;
    }
    lines.push(format!(
        "pluto: Child SA #{serial} ({}) established with ESP SPIs {}",
        state.name,
        state
            .esp_spis
            .iter()
            .map(|(spi, dst)| format!("0x{spi:08x} to {dst}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    lines.push(format!(
        "kernel ({}): {} SAs, none with SPI {}",
        pluto.netns_label,
        kernel.sas.len(),
        spis.join(" or ")
    ));
    Some(MissingSas {
        serial,
        spis,
        dropped,
        lines,
    })
}

/// XfrmOutNoStates increments whose policy is this connection's.
fn no_state_drops(evidence: &Evidence, pluto: &Observed, connection: Option<&Connection>) -> u64 {
    let Some(connection) = connection else {
        return 0;
    };
    evidence
        .counters
        .iter()
        .filter(|c| c.name == "XfrmOutNoStates")
        .flat_map(|c| &c.sources)
        .filter(|s| s.netns == pluto.netns)
        .filter(|s| {
            evidence
                .book
                .policy(s.netns, s.policy_index)
                .is_some_and(|p| {
                    pluto
                        .owner_of_selector(&p.selector.src, &p.selector.dst)
                        .is_some_and(|c| c.name == connection.name)
                })
        })
        .map(|s| s.count)
        .sum()
}

/// Traffic dropped for want of an SA under a policy no pluto manages (a
/// static or orphaned policy: its key manager is gone).
fn unmanaged_tunnels_down(evidence: &Evidence) -> Vec<Finding> {
    let mut out = Vec::new();
    for counter in evidence
        .counters
        .iter()
        .filter(|c| c.name == "XfrmOutNoStates")
    {
        for source in &counter.sources {
            let Some(policy) = evidence.book.policy(source.netns, source.policy_index) else {
                continue;
            };
            let managed = evidence.plutos.iter().any(|p| {
                p.netns == source.netns
                    && p.owner_of_selector(&policy.selector.src, &policy.selector.dst)
                        .is_some()
            });
            if managed {
                continue;
            }
            let template = policy.templates.first();
            let wants = template.map_or_else(String::new, |t| {
                format!(" requires an SA to {} (reqid {})", t.dst, t.reqid)
            });
            out.push(Finding {
                kind: "tunnel_down".into(),
                summary: format!(
                    "policy {} ({} -> {}, dir {}){wants} but there is none, and no running pluto manages it: {} packets dropped",
                    policy.index, policy.selector.src, policy.selector.dst, policy.dir, source.count
                ),
                fix: "start the IKE daemon that owns this policy (`systemctl start ipsec`) and bring the connection up, or remove the stale policy (`ip xfrm policy delete ...`)".into(),
                evidence: vec![format!(
                    "{} XfrmOutNoStates at {} for {} -> {} in netns {}",
                    source.count, source.function, source.src, source.dst, source.netns_label
                )],
                connection: String::new(),
                netns_label: source.netns_label.clone(),
                spi: String::new(),
            });
        }
    }
    out
}

/// One finding for every counter that points at a kernel or SA bug.
fn kernel_errors(evidence: &Evidence) -> Vec<Finding> {
    let moved: Vec<&Counter> = evidence
        .counters
        .iter()
        .filter(|c| c.kernel_delta > 0 && KERNEL_ERROR_COUNTERS.contains(&c.name.as_str()))
        .collect();
    if moved.is_empty() {
        return Vec::new();
    }
    let mut lines = Vec::new();
    for counter in &moved {
        lines.push(format!(
            "{} +{} ({} attributed)",
            counter.name, counter.kernel_delta, counter.attributed
        ));
        for s in counter.sources.iter().take(3) {
            let owner = owner_of_spi_text(evidence.plutos, s.netns, &s.spi)
                .map_or_else(String::new, |(c, _)| format!(" connection \"{c}\""));
            lines.push(format!(
                "  {} at {} in {} on {}: SA {}{owner}, {} -> {}",
                s.count, s.function, s.netns_label, s.ifname, s.spi, s.src, s.dst
            ));
        }
        if let Some(sample) = counter.samples.first() {
            lines.push(format!("  stack: {}", sample.stack.join(" <- ")));
        }
    }
    let names: Vec<&str> = moved.iter().map(|c| c.name.as_str()).collect();
    vec![Finding {
        kind: "kernel_xfrm_errors".into(),
        summary: format!(
            "the kernel rejected IPsec packets for reasons that point at the SA or the kernel: {}",
            names.join(", ")
        ),
        fix: "compare the SA on both ends (`ip -s xfrm state`: replay and integrity failures, same keys and algorithms); if they agree, report it to the kernel (netdev@vger.kernel.org) with this run's JSON (--json), the kernel release, `ip -s xfrm state` with the keys removed, and the stacks below".into(),
        evidence: lines,
        ..Finding::default()
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pluto::{log::parse_line, status::Connection};

    fn west(lines: &[&str]) -> Observed {
        Observed {
            pid: 7,
            netns: 11,
            netns_label: "west".into(),
            ctl_socket: "/run/pluto/pluto.ctl".into(),
            log: "/var/log/pluto.log".into(),
            connections: vec![Connection {
                name: "lab".into(),
                local_addr: Some("192.0.2.1".parse().unwrap()),
                remote_addr: Some("203.0.113.1".parse().unwrap()),
                local_subnets: vec!["10.0.2.0/24".into()],
                remote_subnets: vec!["192.168.0.0/16".into()],
                ..Connection::default()
            }],
            up_at_start: Vec::new(),
            states: Vec::new(),
            events: lines.iter().filter_map(|l| parse_line(l)).collect(),
            problems: Vec::new(),
        }
    }

    fn path(sent: u64, received: u64) -> IkePath {
        IkePath {
            netns: 11,
            local: "192.0.2.1".into(),
            peer: "203.0.113.1".into(),
            sent,
            received,
            ..IkePath::default()
        }
    }

    fn kinds(plutos: &[Observed], ike: &[IkePath]) -> Vec<String> {
        let book = XfrmBook::default();
        let evidence = Evidence {
            counters: &[],
            ike,
            plutos,
            book: &book,
            netns: &[],
            ike_watched: true,
        };
        diagnose(&evidence, Vec::new())
            .into_iter()
            .map(|f| {
                assert_eq!(
                    (f.connection.as_str(), f.netns_label.as_str()),
                    ("lab", "west")
                );
                f.kind
            })
            .collect()
    }

    fn findings(plutos: &[Observed]) -> Vec<Finding> {
        let book = XfrmBook::default();
        let evidence = Evidence {
            counters: &[],
            ike: &[],
            plutos,
            book: &book,
            netns: &[],
            ike_watched: true,
        };
        diagnose(&evidence, Vec::new())
    }

    /// East, the peer of `west`: it protects `subnet`.
    fn east(subnet: &str, lines: &[&str]) -> Observed {
        let mut east = west(lines);
        east.netns = 12;
        east.netns_label = "east".into();
        let c = &mut east.connections[0];
        std::mem::swap(&mut c.local_addr, &mut c.remote_addr);
        c.local_subnets = vec![subnet.into()];
        c.remote_subnets = vec!["10.0.2.0/24".into()];
        east
    }

    #[test]
    fn a_refusal_of_selectors_says_who_refused_whose_and_which_subnet_differs() {
        let initiator = "Nov 29 07:49:49.276933: \"lab\" #2: IKE_AUTH response rejected Child SA with TS_UNACCEPTABLE";
        let responder = "Nov 29 07:49:49.257225: \"lab\" #2: No IKEv2 connection found with compatible Traffic Selectors";
        let both = findings(&[west(&[initiator]), east("192.168.9.0/24", &[responder])]);
        let summaries: Vec<&str> = both.iter().map(|f| f.summary.as_str()).collect();
        assert_eq!(
            summaries,
            [
                "connection \"lab\" (west): 203.0.113.1 refused our traffic selectors (TS_UNACCEPTABLE): 203.0.113.1 protects 192.168.9.0/24, we expect 192.168.0.0/16 (our rightsubnet)",
                "connection \"lab\" (east): we refused the traffic selectors 192.0.2.1 proposed (TS_UNACCEPTABLE): 192.0.2.1 expects 192.168.0.0/16 on our side, we protect 192.168.9.0/24 (our leftsubnet)",
            ]
        );
        // Alone, the initiator cannot know which subnet differs.
        let alone = findings(&[west(&[initiator])]);
        assert_eq!(
            alone[0].summary,
            "connection \"lab\" (west): 203.0.113.1 refused our traffic selectors (TS_UNACCEPTABLE)"
        );
        // An IKEv1 responder's refusal quotes the proposal.
        let v1 = "\"lab\" #1: cannot respond to IPsec SA request because no connection is known for 192.168.0.0/16===203.0.113.1[@east]...192.0.2.1[@west]===10.0.2.0/24";
        let mut responder = east("192.168.9.0/24", &[v1]);
        responder.connections[0].remote_addr = None;
        assert_eq!(
            findings(&[responder])[0].summary,
            "connection \"lab\" (east): we refused the traffic selectors the peer proposed (TS_UNACCEPTABLE): the peer expects 192.168.0.0/16 on our side, we protect 192.168.9.0/24 (our leftsubnet)"
        );
    }

    // Lines as pluto 4.10 wrote them in the lab (IKEv1 initiator).
    const V1_MAIN_MODE_REFUSED: &str = "Nov 29 07:49:11.239657: \"lab\" #1: ignoring informational payload NO_PROPOSAL_CHOSEN, msgid=00000000, length=12";
    const V1_IKE_UP: &str = "Nov 29 07:48:40.603479: \"lab\" #1: IKE SA established {auth=PRESHARED_KEY cipher=AES_CBC_256 integ=HMAC_SHA2_256 group=MODP2048}";

    #[test]
    fn a_v1_no_proposal_notice_is_ike_before_the_ike_sa_and_esp_after() {
        let ike = [path(3, 3)];
        assert_eq!(
            kinds(&[west(&[V1_MAIN_MODE_REFUSED])], &ike),
            ["ike_proposal_mismatch"]
        );
        assert_eq!(
            kinds(&[west(&[V1_IKE_UP, V1_MAIN_MODE_REFUSED])], &ike),
            ["esp_proposal_mismatch"]
        );
    }

    #[test]
    fn silence_is_unanswered_only_when_requests_left_and_nothing_came_back() {
        let retransmit = "Nov 29 07:52:01.400957: \"lab\" #1: STATE_V2_PARENT_I1: retransmission; will wait 0.5 seconds for response";
        assert_eq!(
            kinds(&[west(&[retransmit])], &[path(4, 0)]),
            ["ike_unanswered"]
        );
        // Answers arrive (a slow peer): not a firewall.
        assert!(kinds(&[west(&[retransmit])], &[path(4, 2)]).is_empty());
        // A port unreachable names the cause instead.
        let mut refused = path(4, 0);
        refused.port_unreachable = 4;
        assert_eq!(
            kinds(&[west(&[retransmit])], &[refused]),
            ["peer_not_running_ike"]
        );
    }

    #[test]
    fn a_connection_that_tried_and_is_down_without_known_cause_is_down() {
        let initiating = "Nov 29 07:45:01.307048: \"lab\" #1: initiating IKEv2 connection";
        assert_eq!(
            kinds(&[west(&[initiating])], &[path(2, 2)]),
            ["tunnel_down"]
        );
        // Idle and never up: nothing to say.
        assert!(kinds(&[west(&[])], &[]).is_empty());
    }
}
