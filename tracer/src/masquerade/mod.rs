//! MASQUERADE/SNAT before the IPsec policy lookup (docs/kernel.md §2): packets
//! routed into IPsec whose source POSTROUTING NAT rewrote, so that the
//! policy re-lookup matched nothing and they left unencrypted. The
//! detector's hooks, reading what it counted, and the finding with its fix.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};
use tracer_common::names::programs;

use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuHashMap},
};
use serde::{Deserialize, Serialize};
use tracer_common::masquerade::{LeakCount, LeakKey, LeakSample, error};
use tracer_common::names::maps;

use crate::{
    hooks::{self, HookOutcome, HookSpec, Prototype, Role, Variant},
    model::{Finding, FindingKind, HookList, Names},
    xfrm_state::{Policy, Sa, XfrmBook, XfrmState},
};

mod intended;

/// Per family: the okfn of the bundle's POSTROUTING; `skb` is its third
/// argument.
const FAMILIES: [(&str, &str); 2] = [("ipv4", "__xfrm4_output"), ("ipv6", "__xfrm6_output")];

const SKB: Prototype = Prototype::SkbAtOrNoBtf(2);

/// One entry program per family (the kprobe form serves both): it returns
/// at once while the route still has an SA, so a healthy IPsec packet
/// costs one program run. Whether a leak was sent or dropped is seen by the
/// drops program at `skb:kfree_skb`.
pub const HOOKS: &[HookSpec] = &[
    HookSpec::new(
        "__xfrm4_output",
        Role::Nat,
        &[Variant::entry(programs::masq_xfrm4_okfn, programs::masq_okfn_kprobe).prototype(SKB)],
    ),
    HookSpec::new(
        "__xfrm6_output",
        Role::Nat,
        &[Variant::entry(programs::masq_xfrm6_okfn, programs::masq_okfn_kprobe).prototype(SKB)],
    ),
];

/// What the detector covers on this kernel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MasqCoverage {
    /// Families whose re-routes out of IPsec are counted (`ipv4`, `ipv6`).
    pub detected: Vec<String>,
    /// Families whose pre-NAT flow, SA and policy are known too (the
    /// kernel's BTF describes conntrack's entries).
    pub explained: Vec<String>,
    /// Families where "sent in clear" vs "dropped" is known (the drops
    /// program, always attached, sees the drops).
    pub outcome: Vec<String>,
    /// `function (fentry|kprobe)`.
    pub attached: Vec<String>,
    pub missing: Vec<(String, String)>,
}

impl MasqCoverage {
    /// The published form of what `HOOKS` got; `conntrack`: whether the
    /// offsets of conntrack's entries were found.
    pub fn of(outcomes: &[HookOutcome], conntrack: bool) -> Self {
        let HookList { attached, missing } = hooks::hook_list(outcomes, "MASQUERADE detection");
        let detected: Vec<String> = FAMILIES
            .iter()
            .filter(|(_, okfn)| {
                outcomes
                    .iter()
                    .any(|o| o.via.is_some() && o.function() == *okfn)
            })
            .map(|(name, _)| name.to_string())
            .collect();
        Self {
            explained: if conntrack {
                detected.clone()
            } else {
                Vec::new()
            },
            outcome: detected.clone(),
            detected,
            attached,
            missing,
        }
    }
}

/// What the kernel side counted.
#[derive(Debug, Default)]
pub struct Counted {
    pub leaks: Vec<(LeakKey, LeakCount)>,
    pub table_full: u64,
    pub unseen: u64,
    /// Leaks the rate limit or a full ring kept out of the pcapng.
    pub samples_lost: u64,
    /// Sampled leaks with their headers (drained while running).
    pub samples: Vec<LeakSample>,
}

/// Reads the leak table (summed over CPUs) and the errors.
pub fn read(ebpf: &Ebpf) -> Result<Counted, aya::maps::MapError> {
    let map = |name: &str| {
        ebpf.map(name)
            .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })
    };
    let table: PerCpuHashMap<_, LeakKey, LeakCount> =
        PerCpuHashMap::try_from(map(maps::MASQ_LEAKS)?)?;
    let mut counted = Counted::default();
    for entry in table.iter() {
        let (key, per_cpu) = entry?;
        let mut sum = LeakCount::default();
        for c in per_cpu.iter() {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.failed += c.failed;
        }
        // What was not dropped on its egress device left it.
        sum.sent = sum.packets.saturating_sub(sum.failed);
        counted.leaks.push((key, sum));
    }
    let errors: PerCpuArray<_, u64> = PerCpuArray::try_from(map(maps::MASQ_ERRORS)?)?;
    counted.table_full = errors.get(&error::TABLE_FULL, 0)?.iter().sum();
    counted.unseen = errors.get(&error::UNSEEN, 0)?.iter().sum();
    counted.samples_lost = errors.get(&error::SAMPLES_LOST, 0)?.iter().sum();
    Ok(counted)
}

/// The detector's part of the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MasqueradeReport {
    pub coverage: MasqCoverage,
    /// Packets re-routed out of IPsec, per flow.
    pub leaks: Vec<Leak>,
    /// Leaks not itemized (table full): counted here only.
    pub table_full: u64,
    /// Leaks without a pre-NAT flow (no conntrack entry, or no conntrack
    /// structs in the kernel's BTF).
    pub unseen: u64,
}

/// One pre-NAT flow that POSTROUTING NAT took out of its IPsec bundle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leak {
    pub packets: u64,
    pub bytes: u64,
    /// Not dropped on the egress device: they left in clear.
    pub sent: u64,
    /// Dropped on the egress device after the re-route (`skb:kfree_skb`).
    pub dropped: u64,
    /// Whether `sent`/`dropped` are known.
    pub outcome_known: bool,
    pub family: String,
    /// `forwarded` or `local` (the skb belonged to a local socket).
    pub origin: String,
    /// The flow the IPsec policy matched (empty if not seen).
    pub pre_src: String,
    pub pre_dst: String,
    /// The flow as it left.
    pub post_src: String,
    pub post_dst: String,
    pub proto: String,
    /// The SA it should have used (hex SPI as `ip xfrm` shows it).
    pub spi: String,
    pub reqid: u32,
    pub sa_dst: String,
    pub policy_index: u32,
    /// The policy's selector, `addr/prefix` (empty if unknown).
    pub policy_src: String,
    pub policy_dst: String,
    pub netns: u64,
    pub netns_label: String,
    pub ifindex: u32,
    pub ifname: String,
    /// Sampled packets of this row as they left (for the pcapng).
    #[serde(skip)]
    pub captured: Vec<crate::model::Captured>,
}

/// How to run a command where the leak happened.
fn enter_command(netns: &[crate::model::NetnsInfo], leak: &Leak) -> String {
    let pids = netns
        .iter()
        .find(|n| n.inode == leak.netns)
        .map_or(&[][..], |n| &n.pids[..]);
    crate::netns::enter_command(&leak.netns_label, pids)
}

fn address(family: u16, bytes: &[u8; 16]) -> Option<IpAddr> {
    match family {
        2 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        10 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

fn text(family: u16, bytes: &[u8; 16]) -> String {
    address(family, bytes).map_or_else(String::new, |a| a.to_string())
}

fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// The report rows, most packets first; the policy and SA each pre-NAT
/// flow matched are looked up in the `book` of its netns.
pub fn leaks(
    counted: &Counted,
    coverage: &MasqCoverage,
    names: &Names,
    book: &XfrmBook,
) -> Vec<Leak> {
    let mut states: BTreeMap<u32, Option<XfrmState>> = BTreeMap::new();
    let mut rows: Vec<Leak> = counted
        .leaks
        .iter()
        .filter(|(_, c)| c.packets > 0)
        .map(|(k, c)| {
            let family_name = if k.family == 10 { "ipv6" } else { "ipv4" };
            let flow = intended::Flow::of(k);
            let state = states
                .entry(k.netns)
                .or_insert_with(|| book.current(u64::from(k.netns)));
            let (policy, sa): (Option<&Policy>, Option<&Sa>) = match (&flow, state.as_ref()) {
                (Some(flow), Some(state)) => intended::policy_and_sa(state, flow)
                    .map_or((None, None), |(p, sa)| (Some(p), sa)),
                _ => (None, None),
            };
            let template = policy.and_then(|p| p.templates.first());
            Leak {
                packets: c.packets,
                bytes: c.bytes,
                sent: c.sent,
                dropped: c.failed,
                outcome_known: coverage.outcome.iter().any(|f| f == family_name),
                family: family_name.into(),
                origin: if k.local != 0 { "local" } else { "forwarded" }.into(),
                pre_src: flow
                    .as_ref()
                    .map_or_else(String::new, |f| f.src.to_string()),
                pre_dst: flow
                    .as_ref()
                    .map_or_else(String::new, |f| f.dst.to_string()),
                post_src: text(k.family, &k.post_src),
                post_dst: text(k.family, &k.post_dst),
                proto: proto_name(k.proto),
                spi: sa.map_or_else(String::new, |sa| format!("{:#010x}", sa.spi)),
                reqid: sa.map_or_else(|| template.map_or(0, |t| t.reqid), |sa| sa.reqid),
                sa_dst: sa.map_or_else(
                    || template.map_or_else(String::new, |t| t.dst.to_string()),
                    |sa| sa.dst.to_string(),
                ),
                policy_index: policy.map_or(0, |p| p.index),
                policy_src: policy.map_or_else(String::new, |p| p.selector.src.clone()),
                policy_dst: policy.map_or_else(String::new, |p| p.selector.dst.clone()),
                netns: u64::from(k.netns),
                netns_label: names.label(u64::from(k.netns)),
                ifindex: k.ifindex,
                ifname: names.ifname(u64::from(k.netns), k.ifindex),
                captured: counted
                    .samples
                    .iter()
                    .filter(|s| s.key == *k)
                    .filter_map(|s| crate::model::Captured::from_headers(s.time_ns, &s.headers))
                    .collect(),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.packets.cmp(&a.packets).then(a.pre_src.cmp(&b.pre_src)));
    rows
}

/// The exempting rule for these subnets, first line iptables (run as is).
/// `enter` runs a command in the leak's netns (`ip netns exec west `).
pub fn fix(leak: &Leak, enter: &str) -> String {
    let (src, dst) = if leak.policy_src.is_empty() {
        // Policy not known: the exact flow that was matched.
        let host = if leak.family == "ipv6" { "128" } else { "32" };
        (
            format!("{}/{host}", leak.pre_src),
            format!("{}/{host}", leak.pre_dst),
        )
    } else {
        (leak.policy_src.clone(), leak.policy_dst.clone())
    };
    let ns = enter;
    let (iptables, nft_family, addr) = if leak.family == "ipv6" {
        ("ip6tables", "ip6", "ip6")
    } else {
        ("iptables", "ip", "ip")
    };
    format!(
        "{ns}{iptables} -t nat -I POSTROUTING -s {src} -d {dst} -j RETURN\n\
         nftables: {ns}nft insert rule {nft_family} nat POSTROUTING {addr} saddr {src} {addr} daddr {dst} return \
         (in the table and chain that hold your masquerade rule)\n\
         or, for all IPsec traffic: {ns}{iptables} -t nat -I POSTROUTING -m policy --dir out --pol ipsec -j ACCEPT \
         (nftables: rt ipsec exists accept)"
    )
}

/// One finding per (netns, policy, NAT source, egress interface).
pub fn findings(leaks: &[Leak], netns: &[crate::model::NetnsInfo]) -> Vec<Finding> {
    let mut groups: BTreeMap<(u64, u32, String, u32, &str), Vec<&Leak>> = BTreeMap::new();
    for leak in leaks {
        groups
            .entry((
                leak.netns,
                leak.policy_index,
                leak.post_src.clone(),
                leak.ifindex,
                leak.family.as_str(),
            ))
            .or_default()
            .push(leak);
    }
    groups
        .into_values()
        .map(|rows| {
            let first = rows[0];
            let packets: u64 = rows.iter().map(|l| l.packets).sum();
            let sent: u64 = rows.iter().map(|l| l.sent).sum();
            let dropped: u64 = rows.iter().map(|l| l.dropped).sum();
            let (from, to) = if first.policy_src.is_empty() {
                (first.pre_src.clone(), first.pre_dst.clone())
            } else {
                (first.policy_src.clone(), first.policy_dst.clone())
            };
            let flows = if from.is_empty() {
                String::new()
            } else {
                format!(" from {from} to {to}")
            };
            let (fate, after) = if !first.outcome_known {
                (
                    "routed out of IPsec",
                    "; sent or dropped is not tracked on this kernel".to_string(),
                )
            } else if dropped == 0 {
                ("sent in clear", String::new())
            } else {
                (
                    "routed out of IPsec",
                    format!(": {sent} sent in clear, {dropped} dropped"),
                )
            };
            let summary = format!(
                "{packets} packet{} {flows} {} SNATed to {} before IPsec and {fate} on {} (netns {}){after}",
                if packets == 1 { "" } else { "s" },
                if packets == 1 { "was" } else { "were" },
                first.post_src,
                first.ifname,
                first.netns_label,
            )
            .replace("  ", " ");
            let mut evidence = vec![format!(
                "the route of these packets carried IPsec SA spi {} reqid {} (to {}) of policy index {}{} when POSTROUTING began, and a plain route when it ended: NAT changed the source, the policy re-lookup (nf_xfrm_me_harder) matched no policy, and {} handed the packet to dst_output unencrypted",
                if first.spi.is_empty() { "?" } else { &first.spi },
                first.reqid,
                if first.sa_dst.is_empty() { "?" } else { &first.sa_dst },
                first.policy_index,
                if first.policy_src.is_empty() {
                    String::new()
                } else {
                    format!(" (src {} dst {})", first.policy_src, first.policy_dst)
                },
                if first.family == "ipv6" {
                    "__xfrm6_output"
                } else {
                    "__xfrm4_output"
                },
            )];
            for l in &rows {
                evidence.push(format!(
                    "{} {} packet(s) {} -> {} {} left as {} -> {} on {}",
                    l.packets,
                    l.origin,
                    if l.pre_src.is_empty() { "?" } else { &l.pre_src },
                    if l.pre_dst.is_empty() { "?" } else { &l.pre_dst },
                    l.proto,
                    l.post_src,
                    l.post_dst,
                    l.ifname
                ));
            }
            if first.outcome_known {
                evidence.push(format!(
                    "outcome: {sent} accepted by dst_output (sent in clear), {dropped} failed"
                ));
            }
            evidence.push(
                "no /proc/net/xfrm_stat counter moves for this, and nothing is logged".into(),
            );
            Finding {
                netns_label: first.netns_label.clone(),
                spi: first.spi.clone(),
                ..Finding::new(
                    FindingKind::MasqueradeBeforePolicy,
                    summary,
                    fix(first, &enter_command(netns, first)),
                    evidence,
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leak() -> Leak {
        Leak {
            packets: 6,
            bytes: 600,
            sent: 6,
            dropped: 0,
            outcome_known: true,
            family: "ipv4".into(),
            origin: "forwarded".into(),
            pre_src: "10.0.2.10".into(),
            pre_dst: "192.168.1.10".into(),
            post_src: "192.0.2.1".into(),
            post_dst: "192.168.1.10".into(),
            proto: "udp".into(),
            spi: "0x00001001".into(),
            reqid: 1,
            sa_dst: "203.0.113.1".into(),
            policy_index: 1,
            policy_src: "10.0.2.0/24".into(),
            policy_dst: "192.168.0.0/16".into(),
            netns: 7,
            netns_label: "west".into(),
            ifindex: 3,
            ifname: "wan0".into(),
            captured: Vec::new(),
        }
    }

    #[test]
    fn finding_reads_at_a_glance_and_fix_is_exact() {
        let f = findings(&[leak()], &[]);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].kind, FindingKind::MasqueradeBeforePolicy);
        assert_eq!(
            f[0].summary,
            "6 packets from 10.0.2.0/24 to 192.168.0.0/16 were SNATed to 192.0.2.1 before IPsec and sent in clear on wan0 (netns west)"
        );
        assert_eq!(
            f[0].fix.lines().next().unwrap(),
            "ip netns exec west iptables -t nat -I POSTROUTING -s 10.0.2.0/24 -d 192.168.0.0/16 -j RETURN"
        );
        assert!(
            f[0].fix
                .contains("ip saddr 10.0.2.0/24 ip daddr 192.168.0.0/16 return")
        );
    }

    #[test]
    fn ipv6_and_unknown_policy() {
        let mut l = leak();
        l.family = "ipv6".into();
        l.policy_src.clear();
        l.policy_dst.clear();
        l.pre_src = "fd00:2::10".into();
        l.pre_dst = "fd00:168::10".into();
        l.netns_label = "host".into();
        let f = findings(&[l], &[]);
        assert_eq!(
            f[0].fix.lines().next().unwrap(),
            "ip6tables -t nat -I POSTROUTING -s fd00:2::10/128 -d fd00:168::10/128 -j RETURN"
        );
        assert!(
            f[0].summary
                .starts_with("6 packets from fd00:2::10 to fd00:168::10 were")
        );
    }
}
