//! The findings of one connection of one pluto: one rule per finding kind,
//! each reading what pluto logged, what pluto and the kernel hold, and the
//! IKE path the kernel saw between the connection's addresses.

use std::net::IpAddr;

use super::{Evidence, quote};
use crate::{
    ike::IkePath,
    model::{Finding, FindingKind},
    pluto::{
        log::{EventKind, LogEvent},
        session::Observed,
        status::Connection,
    },
};

/// What the rules of one connection look at.
pub struct ConnectionContext<'a> {
    pub evidence: &'a Evidence<'a>,
    pub pluto: &'a Observed,
    pub name: &'a str,
    /// As pluto last listed it; None when only its log names it.
    pub connection: Option<&'a Connection>,
    /// Its log events, in order.
    pub events: Vec<&'a LogEvent>,
    /// The peer's address, or `the peer` when unknown.
    pub peer: String,
    /// IKE between its local and remote address, as the kernel saw it.
    pub path: Option<&'a IkePath>,
}

/// A rule: the finding it makes for a connection, given those the rules
/// before it made (a silence or a tunnel down is only the cause when
/// nothing more precise is).
type Rule = fn(&ConnectionContext, &[Finding]) -> Option<Finding>;

/// The connection's rules, in the order their findings are reported.
pub const CONNECTION_RULES: &[Rule] = &[
    auth_failed,
    ike_proposal_mismatch,
    esp_proposal_mismatch,
    ts_mismatch,
    peer_not_running_ike,
    ike_blocked_locally,
    ike_unanswered,
    sa_missing_in_kernel,
    tunnel_down,
];

/// The findings of one connection of one pluto.
pub fn findings(
    evidence: &Evidence,
    pluto: &Observed,
    name: &str,
    connection: Option<&Connection>,
) -> Vec<Finding> {
    let context = ConnectionContext::new(evidence, pluto, name, connection);
    let mut out = Vec::new();
    for rule in CONNECTION_RULES {
        if let Some(finding) = rule(&context, &out) {
            out.push(finding);
        }
    }
    out
}

impl<'a> ConnectionContext<'a> {
    pub fn new(
        evidence: &'a Evidence<'a>,
        pluto: &'a Observed,
        name: &'a str,
        connection: Option<&'a Connection>,
    ) -> Self {
        let peer = connection
            .and_then(|c| c.remote_addr)
            .map_or_else(|| "the peer".to_string(), |a| a.to_string());
        let path = connection.and_then(|c| {
            let (local, remote) = (c.local_addr?.to_string(), c.remote_addr?.to_string());
            evidence
                .ike
                .iter()
                .find(|p| p.netns == pluto.netns && p.local == local && p.peer == remote)
        });
        Self {
            evidence,
            pluto,
            name,
            connection,
            events: pluto.events_of(name).collect(),
            peer,
            path,
        }
    }

    /// A finding of this connection, its summary prefixed with its name
    /// and namespace.
    fn finding(
        &self,
        kind: FindingKind,
        summary: String,
        fix: String,
        lines: Vec<String>,
    ) -> Finding {
        Finding {
            connection: self.name.into(),
            netns_label: self.pluto.netns_label.clone(),
            ..Finding::new(
                kind,
                format!(
                    "connection \"{}\" ({}): {summary}",
                    self.name, self.pluto.netns_label
                ),
                fix,
                lines,
            )
        }
    }

    /// The events of the kinds wanted.
    fn matching(&self, wanted: impl Fn(&EventKind) -> bool) -> Vec<&'a LogEvent> {
        self.events
            .iter()
            .copied()
            .filter(|e| wanted(&e.kind))
            .collect()
    }

    /// NO_PROPOSAL_CHOSEN refusals: (of the IKE SA, of the Child SA). An
    /// IKEv1 initiator logs the peer's refusal the same way for Main Mode
    /// and Quick Mode: before its IKE SA is up, it is IKE's.
    fn proposal_refusals(&self) -> (Vec<&'a LogEvent>, Vec<&'a LogEvent>) {
        let ike_up_at = self
            .events
            .iter()
            .position(|e| matches!(e.kind, EventKind::IkeEstablished));
        let v1_main_mode_refusal = |i: usize, e: &LogEvent| {
            matches!(e.kind, EventKind::ChildProposalRejected)
                && e.text.contains("ignoring informational payload")
                && ike_up_at.is_none_or(|up| i < up)
        };
        let (mut ike, mut child) = (Vec::new(), Vec::new());
        for (i, e) in self.events.iter().copied().enumerate() {
            if matches!(e.kind, EventKind::IkeProposalRejected) || v1_main_mode_refusal(i, e) {
                ike.push(e);
            } else if matches!(e.kind, EventKind::ChildProposalRejected) {
                child.push(e);
            }
        }
        (ike, child)
    }
}

/// "Possible authentication failure": the peer answers but never accepts
/// our first encrypted message (IKEv1 says no more with PSKs).
fn auth_failed(cx: &ConnectionContext, _: &[Finding]) -> Option<Finding> {
    let auth = cx.matching(|k| {
        matches!(
            k,
            EventKind::AuthFailed | EventKind::InvalidHash | EventKind::NoAuthResponseTimeout
        )
    });
    if auth.is_empty() {
        return None;
    }
    let ids = cx.connection.map_or_else(String::new, |c| {
        format!(
            " for `{} {}`",
            c.local_id.as_deref().unwrap_or("%any"),
            c.remote_id.as_deref().unwrap_or("%any")
        )
    });
    let (peer, name) = (&cx.peer, cx.name);
    Some(cx.finding(
        FindingKind::AuthFailed,
        format!("IKE authentication with {peer} failed: the pre-shared keys (or IDs) differ"),
        format!("make the PSK{ids} identical in ipsec.secrets on both gateways, then `ipsec auto --rereadsecrets` and `ipsec whack --initiate --name {name}`"),
        quote(&auth),
    ))
}

fn ike_proposal_mismatch(cx: &ConnectionContext, _: &[Finding]) -> Option<Finding> {
    let (ike, _) = cx.proposal_refusals();
    if ike.is_empty() {
        return None;
    }
    let ours = cx
        .connection
        .and_then(|c| c.ike_algorithms.clone())
        .unwrap_or_else(|| "?".into());
    let peer = &cx.peer;
    Some(cx.finding(
        FindingKind::IkeProposalMismatch,
        format!("no common IKE algorithms with {peer} (NO_PROPOSAL_CHOSEN)"),
        format!("set the same ike= on both sides (ours: {ours}); the peer's proposals are in its pluto log"),
        quote(&ike),
    ))
}

fn esp_proposal_mismatch(cx: &ConnectionContext, _: &[Finding]) -> Option<Finding> {
    let (_, child) = cx.proposal_refusals();
    if child.is_empty() {
        return None;
    }
    let ours = cx
        .connection
        .and_then(|c| c.esp_algorithms.clone())
        .unwrap_or_else(|| "?".into());
    let peer = &cx.peer;
    Some(cx.finding(
        FindingKind::EspProposalMismatch,
        format!("the IKE SA with {peer} is up but no common ESP algorithms for the Child SA (NO_PROPOSAL_CHOSEN)"),
        format!("set the same esp= (and PFS group) on both sides (ours: {ours})"),
        quote(&child),
    ))
}

fn ts_mismatch(cx: &ConnectionContext, _: &[Finding]) -> Option<Finding> {
    let ts = cx.matching(|k| matches!(k, EventKind::TsUnacceptable | EventKind::QuickModeTimeout));
    if ts.is_empty() {
        return None;
    }
    let (summary, fix) = selectors_refused(cx, &ts);
    Some(cx.finding(FindingKind::TsMismatch, summary, fix, quote(&ts)))
}

/// Who refused whose traffic selectors, and, where the peer's are known
/// (its pluto is watched too, or our refusal quotes its proposal), which
/// subnet differs.
fn selectors_refused(cx: &ConnectionContext, events: &[&LogEvent]) -> (String, String) {
    let (connection, peer) = (cx.connection, &cx.peer);
    let refused_here = events.iter().any(|e| e.refused_here());
    let ours = connection.map_or_else(String::new, |c| {
        format!(
            "{} <-> {}",
            c.local_subnets.join(","),
            c.remote_subnets.join(",")
        )
    });
    // The peer's view: (its subnet, the subnet it expects on our side).
    let theirs = peer_connection(cx.evidence, connection)
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

/// pluto's "Connection refused", or the kernel's count of ICMP port
/// unreachable from the peer for our IKE packets.
fn peer_not_running_ike(cx: &ConnectionContext, _: &[Finding]) -> Option<Finding> {
    let refused = cx.matching(|k| matches!(k, EventKind::ConnectionRefused { .. }));
    let unreachable = cx.path.map_or(0, |p| p.port_unreachable);
    if refused.is_empty() && unreachable == 0 {
        return None;
    }
    let peer = &cx.peer;
    let mut lines = quote(&refused);
    if unreachable > 0 {
        lines.insert(
            0,
            format!("{unreachable} ICMP port unreachable from {peer} for our IKE packets (kernel: net:netif_receive_skb)"),
        );
    }
    Some(cx.finding(
        FindingKind::PeerNotRunningIke,
        format!("nothing listens for IKE at {peer}: it answers UDP 500/4500 with ICMP port unreachable"),
        format!("start the IKE daemon on {peer} (`systemctl start ipsec`), or correct right= if {peer} is the wrong address"),
        lines,
    ))
}

/// IKE packets of this connection dropped by a netfilter rule of its own
/// namespace.
fn ike_blocked_locally(cx: &ConnectionContext, _: &[Finding]) -> Option<Finding> {
    let mut blocked: Vec<String> = cx
        .path
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
    if blocked.is_empty() {
        return None;
    }
    blocked.extend(quote(&cx.matching(|k| matches!(k, EventKind::SendFailed))));
    let peer = &cx.peer;
    let local = cx
        .connection
        .and_then(|c| c.local_addr)
        .map_or_else(|| "this gateway".to_string(), |a| a.to_string());
    Some(cx.finding(
        FindingKind::IkeBlockedLocally,
        format!("this gateway's own firewall drops IKE between {local} and {peer}"),
        format!("allow UDP 500 and 4500 (and ESP, protocol 50) between {local} and {peer} in the netns's firewall, e.g. `iptables -I OUTPUT -p udp -d {peer} -m multiport --dports 500,4500 -j ACCEPT` and `iptables -I INPUT -p udp -s {peer} -m multiport --dports 500,4500 -j ACCEPT`"),
        blocked,
    ))
}

/// IKE requests left and nothing came back (or, without the IKE path
/// watch, pluto retransmitted), and nothing before explains why.
fn ike_unanswered(cx: &ConnectionContext, earlier: &[Finding]) -> Option<Finding> {
    let answered = cx.path.is_some_and(|p| p.received > 0);
    let sent = cx.path.map_or(0, |p| p.sent);
    let retransmits =
        cx.matching(|k| matches!(k, EventKind::Retransmit | EventKind::NoResponseTimeout));
    let silent_path = sent > 0 && !answered;
    let silent_log = !cx.evidence.ike_watched && !retransmits.is_empty();
    if !earlier.is_empty() || !(silent_path || silent_log) {
        return None;
    }
    let peer = &cx.peer;
    let mut lines = Vec::new();
    if silent_path {
        lines.push(format!(
            "{sent} IKE packets to {peer} left this gateway and none came back (kernel: net:net_dev_queue, net:netif_receive_skb)"
        ));
    }
    lines.extend(dropped_on_the_way(cx));
    lines.extend(quote(&retransmits));
    Some(cx.finding(
        FindingKind::IkeUnanswered,
        format!("IKE requests to {peer} go out and nothing comes back: a firewall between the peers drops UDP 500/4500, or {peer} is down"),
        format!("open UDP 500 and 4500 (and ESP, protocol 50) from this gateway to {peer} and back on every firewall on the path; check that {peer} is up"),
        lines,
    ))
}

/// IKE to or from the peer dropped by a netfilter rule in another watched
/// namespace (a router on the path, in a lab or a container host).
fn dropped_on_the_way(cx: &ConnectionContext) -> Vec<String> {
    let mut lines = Vec::new();
    for other in cx.evidence.ike.iter().filter(|p| p.netns != cx.pluto.netns) {
        for d in other.dropped.iter().filter(|d| d.firewall) {
            if [other.local.as_str(), other.peer.as_str()].contains(&cx.peer.as_str()) {
                lines.push(format!(
                    "{} IKE packets between {} and {} dropped by a netfilter rule in netns {} at {}",
                    d.count, other.local, other.peer, other.netns_label, d.function
                ));
            }
        }
    }
    lines
}

fn sa_missing_in_kernel(cx: &ConnectionContext, _: &[Finding]) -> Option<Finding> {
    let missing = sas_missing_in_kernel(cx)?;
    let spis = missing.spis.join(", ");
    let mut found = cx.finding(
        FindingKind::SaMissingInKernel,
        format!(
            "pluto's Child SA #{} is established, but the kernel has no SA {spis}: it was removed behind pluto's back, and {} packets were dropped for want of it",
            missing.serial, missing.dropped
        ),
        format!(
            "`ipsec whack --ctlsocket {} --rekey-ipsec --name {}` installs a new Child SA at both ends; then find what removes SAs outside pluto (`ip xfrm state flush` or `deleteall` in a script, a second IKE daemon, a container restart): `ip xfrm monitor` shows the deletions as they happen",
            cx.pluto.ctl_socket.display(),
            cx.name
        ),
        missing.lines,
    );
    found.spi = missing.spis[0].clone();
    Some(found)
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
fn sas_missing_in_kernel(cx: &ConnectionContext) -> Option<MissingSas> {
    let (evidence, pluto) = (cx.evidence, cx.pluto);
    let connection = cx.connection?;
    let state = pluto.current_child(&connection.name)?;
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
    let (mut dropped, mut lines) = inbound_drops(cx, &spis);
    let outbound_missing = missing
        .iter()
        .any(|(_, dst)| Some(*dst) == connection.remote_addr);
    let outbound = if outbound_missing {
        no_state_drops(cx)
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
        "pluto: Child SA #{} ({}) established with ESP SPIs {}",
        state.serial,
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
        serial: state.serial,
        spis,
        dropped,
        lines,
    })
}

/// ESP for the SPIs given dropped for want of an SA in the connection's
/// namespace: the count, and one line per source.
fn inbound_drops(cx: &ConnectionContext, spis: &[String]) -> (u64, Vec<String>) {
    let mut lines = Vec::new();
    let mut dropped = 0;
    for source in cx
        .evidence
        .counters
        .iter()
        .filter(|c| c.name == "XfrmInNoStates")
        .flat_map(|c| &c.sources)
        .filter(|s| s.netns == cx.pluto.netns && spis.contains(&s.spi))
    {
        dropped += source.count;
        lines.push(format!(
            "{} ESP packets for SA {} from {} dropped at {} on {}: XfrmInNoStates",
            source.count, source.spi, source.src, source.function, source.ifname
        ));
    }
    (dropped, lines)
}

/// XfrmOutNoStates increments whose policy is this connection's.
fn no_state_drops(cx: &ConnectionContext) -> u64 {
    let (evidence, pluto) = (cx.evidence, cx.pluto);
    let Some(connection) = cx.connection else {
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

/// The connection has no Child SA and tried to have one, lost it, or its
/// traffic was dropped for want of it; and nothing before says why.
fn tunnel_down(cx: &ConnectionContext, earlier: &[Finding]) -> Option<Finding> {
    if !earlier.is_empty() || cx.pluto.is_up(cx.name) {
        return None;
    }
    let dropped = no_state_drops(cx);
    let went_down = cx.pluto.up_at_start.iter().any(|c| c == cx.name);
    let tried = cx
        .events
        .iter()
        .any(|e| matches!(e.kind, EventKind::Initiating | EventKind::Deleting));
    if dropped == 0 && !went_down && !tried {
        return None;
    }
    let mut lines = Vec::new();
    if dropped > 0 {
        lines.push(format!(
            "{dropped} packets for this connection's subnets dropped for want of an SA (XfrmOutNoStates)"
        ));
    }
    if went_down {
        lines.push("its Child SA was up when the run began and is gone now".into());
    }
    lines.extend(quote(&cx.events));
    Some(cx.finding(
        FindingKind::TunnelDown,
        "no Child SA is established, so its traffic is dropped".into(),
        format!(
            "`ipsec whack --ctlsocket {} --initiate --name {}` and read pluto's log for the reason it went down",
            cx.pluto.ctl_socket.display(),
            cx.name
        ),
        lines,
    ))
}
