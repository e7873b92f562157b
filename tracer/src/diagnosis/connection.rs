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
            "{sent} IKE packets to {peer} left this gateway and none came back (kernel: the IKE watch)"
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attribution::Source,
        ike::IkeDrop,
        pluto::{log::parse_line, status::parse_status},
        report::Counter,
        xfrm_state::{Mode, Sa, XfrmBook, XfrmState},
    };

    /// West's `ipsec whack --status` in the lab (libreswan 4.10): "lab",
    /// 10.0.2.0/24===192.0.2.1[@west]...192.0.2.2[@east]===192.168.0.0/16,
    /// Child SA #2 with ESP SPIs 0x9e9e96db (out) and 0xcd0255de (in).
    const STATUS: &str = include_str!("../pluto/testdata/status-healthy-west.txt");

    // Log lines pluto 4.10 wrote in the lab (west, the initiator).
    const AUTH_REJECTED: &str = "Nov 29 07:49:32.170524: \"lab\" #1: IKE SA authentication request rejected by peer: AUTHENTICATION_FAILED";
    const IKE_NO_PROPOSAL: &str = "Nov 29 07:50:06.091271: \"lab\" #1: dropping unexpected IKE_SA_INIT message containing NO_PROPOSAL_CHOSEN notification; message payloads: N; missing payloads: SA,KE,Ni";
    const CHILD_NO_PROPOSAL: &str = "Nov 29 07:46:15.731668: \"lab\" #2: IKE_AUTH response rejected Child SA with NO_PROPOSAL_CHOSEN";
    const TS_REFUSED: &str = "Nov 29 07:49:49.276933: \"lab\" #2: IKE_AUTH response rejected Child SA with TS_UNACCEPTABLE";
    const CHILD_UP: &str = "Nov 29 07:44:44.944183: \"lab\" #2: initiator established Child SA using #1; IPsec tunnel [10.0.2.0-10.0.2.255:0-65535 0] -> [192.168.0.0-192.168.255.255:0-65535 0] {ESP/ESN=>0x9e9e96db <0xcd0255de xfrm=AES_GCM_16_128-NONE DPD=passive}";
    const RETRANSMIT: &str = "Nov 29 07:50:43.400957: \"lab\" #1: STATE_V2_PARENT_I1: retransmission; will wait 0.5 seconds for response";
    const SEND_FAILED: &str = "Nov 29 07:51:13.326598: ERROR: \"lab\" #1: send on wan0 from 192.0.2.1:500 to 192.0.2.2:500 using UDP failed in STATE_V2_PARENT_I0: Operation not permitted (errno 1)";
    const INITIATING: &str = "Nov 29 07:44:44.428773: \"lab\" #1: initiating IKEv2 connection";
    /// A whole run against a peer with no IKE daemon.
    const NO_PEER_LOG: &str = include_str!("../pluto/testdata/nopeer-west.log");

    /// West with these log lines; with its Child SA up or not.
    fn west(lines: &[&str], up: bool) -> Observed {
        let status = parse_status(STATUS).unwrap();
        Observed {
            pid: 7,
            netns: 11,
            netns_label: "west".into(),
            ctl_socket: "/run/pluto/pluto.ctl".into(),
            log: "/var/log/pluto.log".into(),
            connections: status.connections,
            up_at_start: Vec::new(),
            states: if up { status.states } else { Vec::new() },
            events: lines.iter().filter_map(|l| parse_line(l)).collect(),
            problems: Vec::new(),
        }
    }

    /// IKE between west and east as the kernel saw it in west.
    fn path(sent: u64, received: u64) -> IkePath {
        IkePath {
            netns: 11,
            netns_label: "west".into(),
            local: "192.0.2.1".into(),
            peer: "192.0.2.2".into(),
            sent,
            received,
            ..IkePath::default()
        }
    }

    /// Everything but the pluto, which `run` adds.
    #[derive(Default)]
    struct Seen<'a> {
        ike: &'a [IkePath],
        counters: &'a [Counter],
        book: XfrmBook,
    }

    /// What `rule` finds for west's "lab", after the `earlier` findings.
    fn run(rule: Rule, west: &Observed, seen: &Seen, earlier: &[Finding]) -> Option<Finding> {
        let evidence = Evidence {
            counters: seen.counters,
            ike: seen.ike,
            plutos: std::slice::from_ref(west),
            book: &seen.book,
            netns: &[],
            ike_watched: true,
        };
        let cx = ConnectionContext::new(&evidence, west, "lab", west.connections.first());
        rule(&cx, earlier)
    }

    /// (kind, summary, fix) of what `rule` finds for west alone.
    fn found(rule: Rule, lines: &[&str], seen: &Seen) -> Option<(FindingKind, String, String)> {
        run(rule, &west(lines, false), seen, &[]).map(|f| (f.kind, f.summary, f.fix))
    }

    fn expect(
        kind: FindingKind,
        summary: &str,
        fix: &str,
    ) -> Option<(FindingKind, String, String)> {
        Some((kind, summary.into(), fix.into()))
    }

    #[test]
    fn auth_failed_names_the_ids_whose_psk_differs() {
        assert_eq!(
            found(auth_failed, &[INITIATING, AUTH_REJECTED], &Seen::default()),
            expect(
                FindingKind::AuthFailed,
                "connection \"lab\" (west): IKE authentication with 192.0.2.2 failed: the pre-shared keys (or IDs) differ",
                "make the PSK for `@west @east` identical in ipsec.secrets on both gateways, then `ipsec auto --rereadsecrets` and `ipsec whack --initiate --name lab`",
            )
        );
        // The responder's echo of the notification is not a second cause.
        let echo = "Nov 29 07:49:32.152967: \"lab\" #1: responding to IKE_AUTH message (ID 1) from 192.0.2.1:500 with encrypted notification AUTHENTICATION_FAILED";
        assert_eq!(found(auth_failed, &[echo], &Seen::default()), None);
    }

    #[test]
    fn ike_proposal_mismatch_quotes_our_ike_algorithms() {
        assert_eq!(
            found(ike_proposal_mismatch, &[IKE_NO_PROPOSAL], &Seen::default()),
            expect(
                FindingKind::IkeProposalMismatch,
                "connection \"lab\" (west): no common IKE algorithms with 192.0.2.2 (NO_PROPOSAL_CHOSEN)",
                "set the same ike= on both sides (ours: AES_GCM_16_256-HMAC_SHA2_256-DH19); the peer's proposals are in its pluto log",
            )
        );
        // A refused Child SA is ESP's.
        assert_eq!(
            found(
                ike_proposal_mismatch,
                &[CHILD_NO_PROPOSAL],
                &Seen::default()
            ),
            None
        );
    }

    #[test]
    fn esp_proposal_mismatch_quotes_our_esp_algorithms() {
        let run = found(
            esp_proposal_mismatch,
            &[CHILD_NO_PROPOSAL],
            &Seen::default(),
        );
        assert_eq!(
            run,
            expect(
                FindingKind::EspProposalMismatch,
                "connection \"lab\" (west): the IKE SA with 192.0.2.2 is up but no common ESP algorithms for the Child SA (NO_PROPOSAL_CHOSEN)",
                "set the same esp= (and PFS group) on both sides (ours: AES_GCM_16_128-NONE)",
            )
        );
        assert_eq!(
            found(esp_proposal_mismatch, &[IKE_NO_PROPOSAL], &Seen::default()),
            None
        );
    }

    #[test]
    fn ts_mismatch_says_who_refused_and_our_subnets() {
        assert_eq!(
            found(ts_mismatch, &[TS_REFUSED], &Seen::default()),
            expect(
                FindingKind::TsMismatch,
                "connection \"lab\" (west): 192.0.2.2 refused our traffic selectors (TS_UNACCEPTABLE)",
                "leftsubnet/rightsubnet must mirror the peer's rightsubnet/leftsubnet (ours: 10.0.2.0/24 <-> 192.168.0.0/16)",
            )
        );
        assert_eq!(
            found(ts_mismatch, &[INITIATING, CHILD_UP], &Seen::default()),
            None
        );
    }

    #[test]
    fn peer_not_running_ike_from_the_log_or_the_kernel() {
        let log: Vec<&str> = NO_PEER_LOG.lines().collect();
        let expected = expect(
            FindingKind::PeerNotRunningIke,
            "connection \"lab\" (west): nothing listens for IKE at 192.0.2.2: it answers UDP 500/4500 with ICMP port unreachable",
            "start the IKE daemon on 192.0.2.2 (`systemctl start ipsec`), or correct right= if 192.0.2.2 is the wrong address",
        );
        assert_eq!(
            found(peer_not_running_ike, &log, &Seen::default()),
            expected
        );
        let mut refused = path(5, 0);
        refused.port_unreachable = 5;
        let seen = Seen {
            ike: &[refused],
            ..Seen::default()
        };
        let finding = run(peer_not_running_ike, &west(&log, false), &seen, &[]).unwrap();
        assert_eq!(
            finding.evidence,
            [
                "5 ICMP port unreachable from 192.0.2.2 for our IKE packets (kernel: net:netif_receive_skb)",
                "pluto: Nov 29 07:45:01.408411 ERROR: asynchronous network error report on wan0 (192.0.2.1:500), complainant 192.0.2.2: Connection refused [errno 111, origin ICMP type 3 code 3 (not authenticated)]",
                "pluto: Nov 29 07:45:01.890747 ERROR: asynchronous network error report on wan0 (192.0.2.1:500), complainant 192.0.2.2: Connection refused [errno 111, origin ICMP type 3 code 3 (not authenticated)]",
                "pluto: Nov 29 07:45:02.391154 ERROR: asynchronous network error report on wan0 (192.0.2.1:500), complainant 192.0.2.2: Connection refused [errno 111, origin ICMP type 3 code 3 (not authenticated)]",
                "... 5 such lines in all",
            ]
        );
        // Retransmits into silence are not a refusal.
        let seen = Seen {
            ike: &[path(4, 0)],
            ..Seen::default()
        };
        assert_eq!(found(peer_not_running_ike, &[RETRANSMIT], &seen), None);
    }

    #[test]
    fn ike_blocked_locally_counts_the_netfilter_drops_here() {
        let mut blocked = path(0, 0);
        blocked.dropped = vec![IkeDrop {
            count: 3,
            direction: "out".into(),
            function: "nf_hook_slow".into(),
            reason: "NETFILTER_DROP".into(),
            firewall: true,
        }];
        let seen = Seen {
            ike: std::slice::from_ref(&blocked),
            ..Seen::default()
        };
        let finding = run(
            ike_blocked_locally,
            &west(&[SEND_FAILED], false),
            &seen,
            &[],
        )
        .unwrap();
        assert_eq!(
            (finding.kind, finding.summary.as_str(), finding.fix.as_str()),
            (
                FindingKind::IkeBlockedLocally,
                "connection \"lab\" (west): this gateway's own firewall drops IKE between 192.0.2.1 and 192.0.2.2",
                "allow UDP 500 and 4500 (and ESP, protocol 50) between 192.0.2.1 and 192.0.2.2 in the netns's firewall, e.g. `iptables -I OUTPUT -p udp -d 192.0.2.2 -m multiport --dports 500,4500 -j ACCEPT` and `iptables -I INPUT -p udp -s 192.0.2.2 -m multiport --dports 500,4500 -j ACCEPT`",
            )
        );
        assert_eq!(
            finding.evidence,
            [
                "3 IKE packets to the peer dropped by a netfilter rule at nf_hook_slow (reason NETFILTER_DROP)",
                "pluto: Nov 29 07:51:13.326598 send on wan0 from 192.0.2.1:500 to 192.0.2.2:500 using UDP failed in STATE_V2_PARENT_I0: Operation not permitted (errno 1)",
            ]
        );
        // A drop that is not a firewall's (no route, a full queue) is not.
        blocked.dropped[0].firewall = false;
        let seen = Seen {
            ike: std::slice::from_ref(&blocked),
            ..Seen::default()
        };
        assert_eq!(found(ike_blocked_locally, &[SEND_FAILED], &seen), None);
    }

    #[test]
    fn ike_unanswered_when_nothing_came_back_and_nothing_else_explains_it() {
        let silent = Seen {
            ike: &[path(4, 0)],
            ..Seen::default()
        };
        assert_eq!(
            found(ike_unanswered, &[RETRANSMIT], &silent),
            expect(
                FindingKind::IkeUnanswered,
                "connection \"lab\" (west): IKE requests to 192.0.2.2 go out and nothing comes back: a firewall between the peers drops UDP 500/4500, or 192.0.2.2 is down",
                "open UDP 500 and 4500 (and ESP, protocol 50) from this gateway to 192.0.2.2 and back on every firewall on the path; check that 192.0.2.2 is up",
            )
        );
        // Answers came back (a slow peer).
        let answered = Seen {
            ike: &[path(4, 2)],
            ..Seen::default()
        };
        assert_eq!(found(ike_unanswered, &[RETRANSMIT], &answered), None);
        // A cause found before explains the silence.
        let earlier = run(auth_failed, &west(&[AUTH_REJECTED], false), &silent, &[]).unwrap();
        let retransmitting = west(&[RETRANSMIT], false);
        assert!(run(ike_unanswered, &retransmitting, &silent, &[earlier]).is_none());
    }

    /// The kernel's SA of west's Child SA #2 with this SPI.
    fn sa(spi: u32, src: &str, dst: &str) -> Sa {
        Sa {
            src: src.parse().unwrap(),
            ..Sa::example(spi, 16389, dst, Mode::Tunnel)
        }
    }

    /// `count` ESP packets for `spi` dropped in west for want of an SA.
    fn no_state(spi: &str, count: u64) -> Counter {
        Counter {
            name: "XfrmInNoStates".into(),
            kernel_delta: count,
            attributed: count,
            gap: 0,
            coverage: "attributed".into(),
            by_netns: Vec::new(),
            sources: vec![Source {
                count,
                function: "xfrm_input".into(),
                netns: 11,
                netns_label: "west".into(),
                dir: "in".into(),
                family: "ipv4".into(),
                src: "192.0.2.2".into(),
                dst: "192.0.2.1".into(),
                proto: "esp".into(),
                sport: 0,
                dport: 0,
                spi: spi.into(),
                reqid: 0,
                policy_index: 0,
                policy_dir: "in".into(),
                ifindex: 2,
                ifname: "wan0".into(),
                policy_selector: String::new(),
                connection: String::new(),
                pluto_state: 0,
            }],
            samples: Vec::new(),
        }
    }

    #[test]
    fn sa_missing_in_kernel_when_pluto_has_it_and_packets_died_for_it() {
        // `ip xfrm state deleteall` took the inbound SA; the outbound is left.
        let book = XfrmBook::seen(
            11,
            XfrmState {
                sas: vec![sa(0x9e9e96db, "192.0.2.1", "192.0.2.2")],
                ..XfrmState::default()
            },
        );
        let counters = [no_state("0xcd0255de", 7)];
        let seen = Seen {
            counters: &counters,
            book,
            ..Seen::default()
        };
        let finding = run(sa_missing_in_kernel, &west(&[CHILD_UP], true), &seen, &[]).unwrap();
        assert_eq!(
            (
                finding.kind,
                finding.summary.as_str(),
                finding.fix.as_str(),
                finding.spi.as_str()
            ),
            (
                FindingKind::SaMissingInKernel,
                "connection \"lab\" (west): pluto's Child SA #2 is established, but the kernel has no SA 0xcd0255de: it was removed behind pluto's back, and 7 packets were dropped for want of it",
                "`ipsec whack --ctlsocket /run/pluto/pluto.ctl --rekey-ipsec --name lab` installs a new Child SA at both ends; then find what removes SAs outside pluto (`ip xfrm state flush` or `deleteall` in a script, a second IKE daemon, a container restart): `ip xfrm monitor` shows the deletions as they happen",
                "0xcd0255de",
            )
        );
        assert_eq!(
            finding.evidence,
            [
                "7 ESP packets for SA 0xcd0255de from 192.0.2.2 dropped at xfrm_input on wan0: XfrmInNoStates",
                "pluto: Child SA #2 (STATE_V2_ESTABLISHED_CHILD_SA) established with ESP SPIs 0x9e9e96db to 192.0.2.2, 0xcd0255de to 192.0.2.1",
                "kernel (west): 1 SAs, none with SPI 0xcd0255de",
            ]
        );
        // Missing, but nothing died for it: a moment between two looks.
        let quiet = Seen {
            book: XfrmBook::seen(11, XfrmState::default()),
            ..Seen::default()
        };
        assert!(run(sa_missing_in_kernel, &west(&[CHILD_UP], true), &quiet, &[]).is_none());
    }

    #[test]
    fn tunnel_down_when_it_tried_and_nothing_else_says_why() {
        assert_eq!(
            found(tunnel_down, &[INITIATING], &Seen::default()),
            expect(
                FindingKind::TunnelDown,
                "connection \"lab\" (west): no Child SA is established, so its traffic is dropped",
                "`ipsec whack --ctlsocket /run/pluto/pluto.ctl --initiate --name lab` and read pluto's log for the reason it went down",
            )
        );
        // Up: not down.
        let up = west(&[INITIATING, CHILD_UP], true);
        assert!(run(tunnel_down, &up, &Seen::default(), &[]).is_none());
        // Idle and never up: nothing to say.
        assert_eq!(found(tunnel_down, &[], &Seen::default()), None);
    }

    #[test]
    fn the_rules_run_in_report_order() {
        // Refused selectors, then retransmits: the refusal explains them.
        let west = west(&[INITIATING, TS_REFUSED, RETRANSMIT], false);
        let seen = Seen {
            ike: &[path(4, 0)],
            ..Seen::default()
        };
        let evidence = Evidence {
            counters: &[],
            ike: seen.ike,
            plutos: std::slice::from_ref(&west),
            book: &seen.book,
            netns: &[],
            ike_watched: true,
        };
        let kinds: Vec<FindingKind> = findings(&evidence, &west, "lab", west.connections.first())
            .into_iter()
            .map(|f| f.kind)
            .collect();
        assert_eq!(kinds, [FindingKind::TsMismatch]);
    }
}
