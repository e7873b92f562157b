//! The last rule of the diagnosis: every XFRM counter that moved ends in a
//! finding. What the earlier rules explained (a connection's tunnel down,
//! kernel errors, a lost SA) is left to them; every other counter gets a
//! finding of its own per namespace, naming the packets behind it (SPI,
//! peer, policy, selector) where they were attributed, with the cause and
//! the fix in an operator's words, or says plainly that it is informational.

use std::collections::BTreeMap;

use super::{Evidence, KERNEL_ERROR_COUNTERS};
use crate::{
    attribution::Source,
    model::{Finding, FindingKind},
    report::Counter,
    xfrm_state::Policy,
};

/// Which counters a finding kind already explains, in its namespace.
fn explained_by(finding: &Finding) -> &'static [&'static str] {
    match finding.kind {
        FindingKind::KernelXfrmErrors => &KERNEL_ERROR_COUNTERS,
        // A connection that is down, or never came up, is why its
        // traffic meets no SA, a drop shunt or a policy it does not fit.
        _ if !finding.connection.is_empty() => &[
            "XfrmOutNoStates",
            "XfrmOutPolBlock",
            "XfrmInNoStates",
            "XfrmInPolBlock",
            "XfrmInTmplMismatch",
            "XfrmInNoPols",
        ],
        FindingKind::TunnelDown => &["XfrmOutNoStates"],
        _ => &[],
    }
}

/// Sources listed as evidence per finding.
const SOURCES_SHOWN: usize = 5;

/// One finding per (counter, netns) that no earlier finding explains.
pub fn unexplained(evidence: &Evidence, earlier: &[Finding]) -> Vec<Finding> {
    let explained = |counter: &str, label: &str| {
        earlier.iter().any(|f| {
            explained_by(f).contains(&counter)
                && (f.netns_label.is_empty() || f.netns_label == label)
        })
    };
    let mut out = Vec::new();
    for counter in evidence.counters {
        for (label, moved) in by_netns(counter) {
            if moved.count > 0 && !explained(&counter.name, &label) {
                out.push(finding(evidence, counter, &label, &moved));
            }
        }
    }
    out
}

/// What moved in one namespace: the kernel's count and the sources.
struct Moved<'a> {
    count: u64,
    sources: Vec<&'a Source>,
}

fn by_netns(counter: &Counter) -> BTreeMap<String, Moved<'_>> {
    let mut out: BTreeMap<String, Moved> = BTreeMap::new();
    for n in &counter.by_netns {
        out.entry(n.label.clone())
            .or_insert(Moved {
                count: 0,
                sources: Vec::new(),
            })
            .count += n.delta;
    }
    for s in &counter.sources {
        let moved = out.entry(s.netns_label.clone()).or_insert(Moved {
            count: 0,
            sources: Vec::new(),
        });
        moved.sources.push(s);
    }
    for moved in out.values_mut() {
        // Where the kernel's count is unknown (the namespace vanished
        // unread), what was attributed is the count.
        let attributed: u64 = moved.sources.iter().map(|s| s.count).sum();
        moved.count = moved.count.max(attributed);
    }
    out
}

/// What one counter's increments in one namespace look like to the rules.
struct CounterContext<'a> {
    counter: &'a Counter,
    /// The increments in this namespace.
    n: u64,
    /// The most frequent source, if any was attributed.
    top: Option<&'a Source>,
    /// Its policy, as `ip xfrm policy` had it.
    policy: Option<&'a Policy>,
    /// ` src -> dst` of the top source (empty if none).
    flow: String,
    /// The prefix that runs a command in the namespace (`ip netns exec gw `).
    enter: String,
}

/// A rule's reading of one counter: the finding's kind, summary and fix.
struct Explanation {
    kind: FindingKind,
    summary: String,
    fix: String,
}

/// A rule: its explanation when the counter (and its top source) is one it
/// knows.
type Rule = fn(&CounterContext) -> Option<Explanation>;

/// The rules, most specific first: the first that knows the counter wins
/// (`xfrm_counter` for those none knows).
const COUNTER_RULES: &[Rule] = &[
    esp_for_replaced_sa,
    no_sa_for_spi,
    policy_block,
    no_policy,
    template_mismatch,
    sa_expired,
    no_sa_for_policy,
    policy_removed_in_use,
];

impl<'a> CounterContext<'a> {
    fn new(evidence: &'a Evidence, counter: &'a Counter, label: &str, moved: &Moved<'a>) -> Self {
        let top = moved.sources.first().copied();
        Self {
            counter,
            n: moved.count,
            top,
            policy: top.and_then(|s| evidence.book.policy(s.netns, s.policy_index)),
            flow: top.map_or_else(String::new, |s| format!(" {} -> {}", s.src, s.dst)),
            enter: crate::netns::enter_command(label, &pids(evidence, label)),
        }
    }
}

fn finding(evidence: &Evidence, counter: &Counter, label: &str, moved: &Moved) -> Finding {
    let (n, top) = (moved.count, moved.sources.first().copied());
    let cx = CounterContext::new(evidence, counter, label, moved);
    let Explanation { kind, summary, fix } = COUNTER_RULES
        .iter()
        .find_map(|rule| rule(&cx))
        .unwrap_or_else(|| xfrm_counter(&cx));
    let mut lines: Vec<String> = moved
        .sources
        .iter()
        .take(SOURCES_SHOWN)
        .map(|s| source_line(&counter.name, s))
        .collect();
    if moved.sources.is_empty() {
        lines.push(format!(
            "{} +{n} in netns {label} (the packets behind it are not attributed on this kernel)",
            counter.name
        ));
    } else if moved.sources.len() > SOURCES_SHOWN {
        lines.push(format!("... {} flows in all", moved.sources.len()));
    }
    if counter.name == "XfrmInNoStates"
        && let Some(s) = top
    {
        lines.push(sas_from_peer(evidence, s));
    }
    Finding {
        connection: top.map_or_else(String::new, |s| s.connection.clone()),
        netns_label: label.into(),
        spi: top.map_or_else(String::new, |s| s.spi.clone()),
        ..Finding::new(
            kind,
            format!("{summary} (netns {label}, {} +{n})", counter.name),
            fix,
            lines,
        )
    }
}

/// Whether the counter is one of `names`.
fn is(cx: &CounterContext, names: &[&str]) -> bool {
    names.contains(&cx.counter.name.as_str())
}

/// ESP for an SA pluto replaced: late packets of a rekey.
fn esp_for_replaced_sa(cx: &CounterContext) -> Option<Explanation> {
    let s = cx
        .top
        .filter(|s| is(cx, &["XfrmInNoStates"]) && !s.connection.is_empty())?;
    Some(Explanation {
        kind: FindingKind::EspForReplacedSa,
        summary: format!(
            "{} ESP packets for SPI {} of connection \"{}\" (Child SA #{}, replaced since) arrived after the kernel had deleted its SA: late packets of a rekey, informational",
            cx.n, s.spi, s.connection, s.pluto_state
        ),
        fix: "nothing if they stop; if they go on, the peer still sends on the old SA (its rekey did not finish): restart the connection on both ends".into(),
    })
}

/// Inbound ESP for an SPI the gateway has no SA for.
fn no_sa_for_spi(cx: &CounterContext) -> Option<Explanation> {
    if !is(cx, &["XfrmInNoStates"]) {
        return None;
    }
    let n = cx.n;
    let summary = match cx.top.filter(|s| !s.spi.is_empty()) {
        Some(s) => format!(
            "{n} ESP packets from {} to {} for SPI {}, which this gateway has no SA for",
            s.src, s.dst, s.spi
        ),
        None => format!("{n} IPsec packets for an SPI this gateway has no SA for"),
    };
    let enter = &cx.enter;
    Some(Explanation {
        kind: FindingKind::NoSaForSpi,
        summary,
        fix: format!(
            "the peer and this gateway disagree on the SAs: with an IKE daemon, one side rekeyed or restarted without the other (restart the connection on both ends and compare `ipsec trafficstatus`); with manual keys, make each SA's SPI, addresses, algorithm and key identical on both gateways (`{enter}ip xfrm state` here, the same on the peer)"
        ),
    })
}

fn policy_block(cx: &CounterContext) -> Option<Explanation> {
    if !is(cx, &["XfrmInPolBlock", "XfrmOutPolBlock"]) {
        return None;
    }
    let (n, flow, enter) = (cx.n, &cx.flow, &cx.enter);
    Some(Explanation {
        kind: FindingKind::PolicyBlock,
        summary: format!(
            "{n} packets{flow} dropped by a blocking policy{}",
            describe(cx.policy, cx.top)
        ),
        fix: match cx.top.filter(|s| s.policy_index != 0) {
            Some(s) => format!(
                "if this traffic should pass, delete or narrow the policy: `{enter}ip xfrm policy delete dir {} index {}` (an IKE daemon's drop shunt goes when its connection comes up)",
                s.policy_dir, s.policy_index
            ),
            None => format!(
                "if this traffic should pass, find the block policy in `{enter}ip xfrm policy list` and delete or narrow it (an IKE daemon's drop shunt goes when its connection comes up)"
            ),
        },
    })
}

fn no_policy(cx: &CounterContext) -> Option<Explanation> {
    if !is(cx, &["XfrmInNoPols"]) {
        return None;
    }
    let (n, flow, enter) = (cx.n, &cx.flow, &cx.enter);
    Some(Explanation {
        kind: FindingKind::NoPolicy,
        summary: format!(
            "{n} packets{flow} arrived through IPsec (or under a default-block policy) but no inbound or forward policy accepts them"
        ),
        fix: format!(
            "add the `dir in` and `dir fwd` policies for{flow} with the template of their SA (an IKE daemon installs them with the tunnel: check the connection's subnets on both ends), or, if `{enter}ip xfrm policy getdefault` says block, allow the default"
        ),
    })
}

fn template_mismatch(cx: &CounterContext) -> Option<Explanation> {
    if !is(cx, &["XfrmInTmplMismatch"]) {
        return None;
    }
    let (n, flow, enter) = (cx.n, &cx.flow, &cx.enter);
    Some(Explanation {
        kind: FindingKind::TemplateMismatch,
        summary: format!(
            "{n} packets{flow} matched a policy{} but did not arrive through the SA it requires ({})",
            describe(cx.policy, cx.top),
            cx.top.map_or("unknown", |s| if s.spi.is_empty() {
                "they came in clear"
            } else {
                "they came through another SA"
            })
        ),
        fix: format!(
            "make the peer encrypt this traffic with the SA the policy requires (same mode, reqid, addresses and protocol), or correct the policy's template: `{enter}ip xfrm policy list` and `{enter}ip xfrm state list` show both"
        ),
    })
}

fn sa_expired(cx: &CounterContext) -> Option<Explanation> {
    if !is(cx, &["XfrmInStateExpired", "XfrmOutStateExpired"]) {
        return None;
    }
    let (n, flow) = (cx.n, &cx.flow);
    Some(Explanation {
        kind: FindingKind::SaExpired,
        summary: format!(
            "{n} packets{flow} met an SA{} past its hard lifetime",
            cx.top
                .filter(|s| !s.spi.is_empty())
                .map_or_else(String::new, |s| format!(" ({})", s.spi))
        ),
        fix: "the IKE daemon should rekey before the hard limit: check that it runs and that lifetimes and margins agree on both ends; a manual SA needs new limits (`limit time-hard ... byte-hard ...`) or replacing".into(),
    })
}

fn no_sa_for_policy(cx: &CounterContext) -> Option<Explanation> {
    if !is(cx, &["XfrmOutNoStates"]) {
        return None;
    }
    let (n, flow) = (cx.n, &cx.flow);
    Some(Explanation {
        kind: FindingKind::NoSaForPolicy,
        summary: format!(
            "{n} packets{flow} matched a policy{} that requires an SA the kernel does not have",
            describe(cx.policy, cx.top)
        ),
        fix: "bring the tunnel that owns this policy up (its IKE daemon negotiates the SA on the kernel's ACQUIRE), or add the SA by hand if the tunnel is keyed manually".into(),
    })
}

fn policy_removed_in_use(cx: &CounterContext) -> Option<Explanation> {
    if !is(cx, &["XfrmOutPolDead"]) {
        return None;
    }
    Some(Explanation {
        kind: FindingKind::PolicyRemovedInUse,
        summary: format!(
            "{} packets met a policy that was being deleted (informational)",
            cx.n
        ),
        fix: "nothing, if it happened during a rekey or a reload; repeated, find what deletes policies (`ip xfrm monitor policy`)".into(),
    })
}

/// Any other counter: named, with where to look.
fn xfrm_counter(cx: &CounterContext) -> Explanation {
    Explanation {
        kind: FindingKind::XfrmCounter,
        summary: format!("{} +{}{}", cx.counter.name, cx.n, cx.flow),
        fix: "see `ip -s xfrm state` and `ip -s xfrm policy` for the SAs and policies involved; the samples and stacks in the report show where the kernel counted it".into(),
    }
}

fn pids(evidence: &Evidence, label: &str) -> Vec<u32> {
    evidence
        .netns
        .iter()
        .find(|n| n.label == label)
        .map_or_else(Vec::new, |n| n.pids.clone())
}

/// What `ip xfrm state` has between the peers, in place of the SPI asked for.
fn sas_from_peer(evidence: &Evidence, s: &Source) -> String {
    let Some(state) = evidence.book.current(s.netns) else {
        return "the SAs of this netns are not known".into();
    };
    let between: Vec<String> = state
        .sas
        .iter()
        .filter(|sa| sa.src.to_string() == s.src && sa.dst.to_string() == s.dst)
        .map(|sa| format!("0x{:08x}", sa.spi))
        .collect();
    if between.is_empty() {
        format!(
            "ip xfrm state here has no SA from {} to {} at all ({} SAs in all)",
            s.src,
            s.dst,
            state.sas.len()
        )
    } else {
        format!(
            "ip xfrm state here has SPI {} from {} to {}, not {}",
            between.join(", "),
            s.src,
            s.dst,
            s.spi
        )
    }
}

/// ` (policy 10, dir in, 10.0.1.0/24 -> 10.0.2.0/24)`, as far as known.
fn describe(policy: Option<&Policy>, top: Option<&Source>) -> String {
    match (policy, top) {
        (Some(p), _) => format!(
            " (policy {}, dir {}, {} -> {})",
            p.index, p.dir, p.selector.src, p.selector.dst
        ),
        (None, Some(s)) if s.policy_index != 0 => {
            format!(" (policy {}, dir {})", s.policy_index, s.policy_dir)
        }
        _ => String::new(),
    }
}

fn source_line(counter: &str, s: &Source) -> String {
    let spi = if s.spi.is_empty() {
        String::new()
    } else {
        format!(" SA {}", s.spi)
    };
    format!(
        "{} {counter} at {} on {}: {} {} -> {}{spi}",
        s.count, s.function, s.ifname, s.proto, s.src, s.dst
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{report::NetnsDelta, xfrm_state::XfrmBook};

    fn source(netns: &str, spi: &str, policy_index: u32, count: u64) -> Source {
        Source {
            count,
            function: "xfrm_input".into(),
            netns: 4026532001,
            netns_label: netns.into(),
            dir: "in".into(),
            family: "ipv4".into(),
            src: "192.0.2.1".into(),
            dst: "192.0.2.2".into(),
            proto: "esp".into(),
            sport: 0,
            dport: 0,
            spi: spi.into(),
            reqid: 0,
            policy_index,
            policy_dir: "in".into(),
            ifindex: 2,
            ifname: "wan0".into(),
            policy_selector: String::new(),
            connection: String::new(),
            pluto_state: 0,
        }
    }

    fn counter(name: &str, netns: &str, delta: u64, sources: Vec<Source>) -> Counter {
        Counter {
            name: name.into(),
            kernel_delta: delta,
            attributed: sources.iter().map(|s| s.count).sum(),
            gap: 0,
            coverage: "attributed".into(),
            by_netns: vec![NetnsDelta {
                netns: 4026532001,
                label: netns.into(),
                delta,
                attributed: 0,
                deleted: false,
            }],
            sources,
            samples: Vec::new(),
        }
    }

    fn diagnose(counters: &[Counter], earlier: &[Finding]) -> Vec<Finding> {
        let book = XfrmBook::default();
        let evidence = Evidence {
            counters,
            ike: &[],
            plutos: &[],
            book: &book,
            netns: &[],
            ike_watched: true,
        };
        unexplained(&evidence, earlier)
    }

    #[test]
    fn esp_for_an_unknown_spi_names_the_spi_the_peer_and_the_count() {
        let found = diagnose(
            &[counter(
                "XfrmInNoStates",
                "gwb",
                37,
                vec![source("gwb", "0x00002002", 0, 37)],
            )],
            &[],
        );
        assert_eq!(found.len(), 1);
        let f = &found[0];
        assert_eq!(f.kind, FindingKind::NoSaForSpi);
        assert_eq!(
            f.summary,
            "37 ESP packets from 192.0.2.1 to 192.0.2.2 for SPI 0x00002002, which this gateway has no SA for (netns gwb, XfrmInNoStates +37)"
        );
        assert!(
            f.fix.contains("ip netns exec gwb ip xfrm state"),
            "{}",
            f.fix
        );
        assert_eq!(f.spi, "0x00002002");
    }

    #[test]
    fn a_policy_block_names_the_policy_and_how_to_remove_it() {
        let found = diagnose(
            &[counter(
                "XfrmInPolBlock",
                "host",
                5,
                vec![source("host", "", 10, 5)],
            )],
            &[],
        );
        assert_eq!(found[0].kind, FindingKind::PolicyBlock);
        assert!(
            found[0].summary.starts_with(
                "5 packets 192.0.2.1 -> 192.0.2.2 dropped by a blocking policy (policy 10, dir in)"
            ),
            "{}",
            found[0].summary
        );
        assert!(
            found[0]
                .fix
                .contains("`ip xfrm policy delete dir in index 10`"),
            "{}",
            found[0].fix
        );
    }

    #[test]
    fn a_connection_finding_explains_its_namespace_only() {
        let earlier = [Finding {
            connection: "lab".into(),
            netns_label: "west".into(),
            ..Finding::new(
                FindingKind::TsMismatch,
                String::new(),
                String::new(),
                Vec::new(),
            )
        }];
        let counters = [
            counter("XfrmOutNoStates", "west", 4, vec![]),
            counter("XfrmInTmplMismatch", "east", 2, vec![]),
        ];
        let found = diagnose(&counters, &earlier);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert_eq!(found[0].kind, FindingKind::TemplateMismatch);
        assert_eq!(found[0].netns_label, "east");
        assert_eq!(
            found[0].evidence,
            [
                "XfrmInTmplMismatch +2 in netns east (the packets behind it are not attributed on this kernel)"
            ]
        );
    }

    #[test]
    fn every_other_counter_that_moved_is_still_a_finding() {
        let found = diagnose(
            &[
                counter("XfrmOutPolDead", "host", 1, vec![]),
                counter("XfrmInIptfsError", "host", 3, vec![]),
                counter("XfrmInNoPols", "host", 0, vec![]),
            ],
            &[],
        );
        let kinds: Vec<FindingKind> = found.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [FindingKind::PolicyRemovedInUse, FindingKind::XfrmCounter]
        );
        assert!(found[1].summary.starts_with("XfrmInIptfsError +3"));
    }

    #[test]
    fn late_esp_of_a_replaced_sa_is_informational_and_names_its_connection() {
        let mut late = source("east", "0x0000abcd", 0, 3);
        late.connection = "lab".into();
        late.pluto_state = 2;
        let found = diagnose(&[counter("XfrmInNoStates", "east", 3, vec![late])], &[]);
        assert_eq!(found[0].kind, FindingKind::EspForReplacedSa);
        assert_eq!(found[0].connection, "lab");
        assert!(found[0].summary.contains("informational"));
    }

    /// What `rule` says about `counter` in netns `host`.
    fn explain(rule: Rule, counter: &Counter) -> Option<(FindingKind, String, String)> {
        let book = XfrmBook::default();
        let evidence = Evidence {
            counters: std::slice::from_ref(counter),
            ike: &[],
            plutos: &[],
            book: &book,
            netns: &[],
            ike_watched: true,
        };
        let moved = &by_netns(counter)["host"];
        rule(&CounterContext::new(&evidence, counter, "host", moved))
            .map(|e| (e.kind, e.summary, e.fix))
    }

    #[test]
    fn each_counter_rule_knows_its_counters_only() {
        let esp = |name: &str| counter(name, "host", 2, vec![source("host", "0x00001001", 10, 2)]);
        let other = esp("XfrmInIptfsError");
        let cases: [(Rule, &str, FindingKind); 8] = [
            (
                esp_for_replaced_sa,
                "XfrmInNoStates",
                FindingKind::EspForReplacedSa,
            ),
            (no_sa_for_spi, "XfrmInNoStates", FindingKind::NoSaForSpi),
            (policy_block, "XfrmOutPolBlock", FindingKind::PolicyBlock),
            (no_policy, "XfrmInNoPols", FindingKind::NoPolicy),
            (
                template_mismatch,
                "XfrmInTmplMismatch",
                FindingKind::TemplateMismatch,
            ),
            (sa_expired, "XfrmOutStateExpired", FindingKind::SaExpired),
            (
                no_sa_for_policy,
                "XfrmOutNoStates",
                FindingKind::NoSaForPolicy,
            ),
            (
                policy_removed_in_use,
                "XfrmOutPolDead",
                FindingKind::PolicyRemovedInUse,
            ),
        ];
        for (rule, name, kind) in cases {
            let mut moved = esp(name);
            moved.sources[0].connection = "lab".into();
            assert_eq!(explain(rule, &moved).map(|e| e.0), Some(kind), "{name}");
            assert_eq!(explain(rule, &other), None, "{kind} for XfrmInIptfsError");
        }
        // Without a connection, ESP for an unknown SPI is not a rekey's.
        assert_eq!(explain(esp_for_replaced_sa, &esp("XfrmInNoStates")), None);
    }

    #[test]
    fn no_policy_sa_expired_and_no_sa_for_policy_name_the_flow() {
        let one =
            |name: &str, spi: &str| counter(name, "host", 2, vec![source("host", spi, 10, 2)]);
        assert_eq!(
            explain(no_policy, &one("XfrmInNoPols", "")),
            Some((
                FindingKind::NoPolicy,
                "2 packets 192.0.2.1 -> 192.0.2.2 arrived through IPsec (or under a default-block policy) but no inbound or forward policy accepts them".into(),
                "add the `dir in` and `dir fwd` policies for 192.0.2.1 -> 192.0.2.2 with the template of their SA (an IKE daemon installs them with the tunnel: check the connection's subnets on both ends), or, if `ip xfrm policy getdefault` says block, allow the default".into(),
            ))
        );
        assert_eq!(
            explain(sa_expired, &one("XfrmInStateExpired", "0x00001001")).map(|e| e.1),
            Some(
                "2 packets 192.0.2.1 -> 192.0.2.2 met an SA (0x00001001) past its hard lifetime"
                    .into()
            )
        );
        assert_eq!(
            explain(no_sa_for_policy, &one("XfrmOutNoStates", "")).map(|e| e.1),
            Some("2 packets 192.0.2.1 -> 192.0.2.2 matched a policy (policy 10, dir in) that requires an SA the kernel does not have".into())
        );
    }
}
