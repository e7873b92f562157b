//! The diagnosis at the end of every run: one finding per cause, in the
//! categories operators know, each with its evidence and its fix. It joins
//! the kernel's evidence (counters and the packets behind them, the IKE
//! path watch, MASQUERADE and MTU findings) with what pluto said.

use std::collections::BTreeSet;

mod connection;
mod counters;

use crate::{
    ike::IkePath,
    model::{Finding, FindingKind, NetnsInfo},
    pluto::{
        log::LogEvent,
        session::{Observed, owner_of_spi_text},
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
            findings.extend(connection::findings(evidence, pluto, name, connection));
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
                netns_label: source.netns_label.clone(),
                ..Finding::new(
                    FindingKind::TunnelDown,
                    format!(
                        "policy {} ({} -> {}, dir {}){wants} but there is none, and no running pluto manages it: {} packets dropped",
                        policy.index, policy.selector.src, policy.selector.dst, policy.dir, source.count
                    ),
                    "start the IKE daemon that owns this policy (`systemctl start ipsec`) and bring the connection up, or remove the stale policy (`ip xfrm policy delete ...`)".into(),
                    vec![format!(
                        "{} XfrmOutNoStates at {} for {} -> {} in netns {}",
                        source.count, source.function, source.src, source.dst, source.netns_label
                    )],
                )
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
    vec![Finding::new(
        FindingKind::KernelXfrmErrors,
        format!(
            "the kernel rejected IPsec packets for reasons that point at the SA or the kernel: {}",
            names.join(", ")
        ),
        "compare the SA on both ends (`ip -s xfrm state`: replay and integrity failures, same keys and algorithms); if they agree, report it to the kernel (netdev@vger.kernel.org) with this run's JSON (--json), the kernel release, `ip -s xfrm state` with the keys removed, and the stacks below".into(),
        lines,
    )]
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

    fn kinds(plutos: &[Observed], ike: &[IkePath]) -> Vec<FindingKind> {
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
            [FindingKind::IkeProposalMismatch]
        );
        assert_eq!(
            kinds(&[west(&[V1_IKE_UP, V1_MAIN_MODE_REFUSED])], &ike),
            [FindingKind::EspProposalMismatch]
        );
    }

    #[test]
    fn silence_is_unanswered_only_when_requests_left_and_nothing_came_back() {
        let retransmit = "Nov 29 07:52:01.400957: \"lab\" #1: STATE_V2_PARENT_I1: retransmission; will wait 0.5 seconds for response";
        assert_eq!(
            kinds(&[west(&[retransmit])], &[path(4, 0)]),
            [FindingKind::IkeUnanswered]
        );
        // Answers arrive (a slow peer): not a firewall.
        assert!(kinds(&[west(&[retransmit])], &[path(4, 2)]).is_empty());
        // A port unreachable names the cause instead.
        let mut refused = path(4, 0);
        refused.port_unreachable = 4;
        assert_eq!(
            kinds(&[west(&[retransmit])], &[refused]),
            [FindingKind::PeerNotRunningIke]
        );
    }

    #[test]
    fn a_connection_that_tried_and_is_down_without_known_cause_is_down() {
        let initiating = "Nov 29 07:45:01.307048: \"lab\" #1: initiating IKEv2 connection";
        assert_eq!(
            kinds(&[west(&[initiating])], &[path(2, 2)]),
            [FindingKind::TunnelDown]
        );
        // Idle and never up: nothing to say.
        assert!(kinds(&[west(&[])], &[]).is_empty());
    }
}
