//! The IKE path watch: per local address and peer, IKE packets sent,
//! received, dropped in this host (and where), and ICMP "port unreachable"
//! from the peer. It tells "requests go out and nothing comes back" from
//! "our own firewall drops IKE" and "no IKE daemon at the peer".

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};
use tracer_common::names::programs;

use aya::{Ebpf, maps::PerCpuHashMap};
use serde::{Deserialize, Serialize};
use tracer_common::ike::{IkeKey, event};
use tracer_common::names::maps;

use crate::{
    drops,
    hooks::{self, HookOutcome, HookSpec, Needs, Prototype, Role, Variant},
    kallsyms::Kallsyms,
    model::{HookList, Names},
};

/// The hooks that send and receive for local sockets (see docs/kernel.md
/// §7): no ESP packet passes them.
const SEND: &[&str] = &["ip_send_skb", "ip6_send_skb"];
const RECEIVE: &[&str] = &["__udp_enqueue_schedule_skb", "icmp_rcv", "icmpv6_rcv"];

/// The watch's hooks (kfree_skb is attached by `drops`): the socket layer
/// and ICMP where functions can be hooked, else (the fallback: every
/// kernel has them) the interface tracepoints, which run for every packet.
pub const HOOKS: &[HookSpec] = &[
    HookSpec::new(
        "ip_send_skb",
        Role::IkeWatch,
        &[
            Variant::entry(programs::ike_send_fentry, programs::ike_send_kprobe)
                .prototype(Prototype::SkbAtOrNoBtf(1)),
        ],
    ),
    HookSpec::new(
        "ip6_send_skb",
        Role::IkeWatch,
        &[
            Variant::entry(programs::ike_send6_fentry, programs::ike_send6_kprobe)
                .prototype(Prototype::SkbAtOrNoBtf(0)),
        ],
    ),
    HookSpec::new(
        "__udp_enqueue_schedule_skb",
        Role::IkeWatch,
        &[Variant::bracket(
            programs::ike_enqueue_fentry,
            programs::ike_enqueue_fexit,
            programs::ike_enqueue_kprobe,
            programs::ike_enqueue_kretprobe,
        )
        .prototype(Prototype::ExitAfterArgs(2))],
    ),
    HookSpec::new(
        "icmp_rcv",
        Role::IkeWatch,
        &[
            Variant::entry(programs::ike_icmp_fentry, programs::ike_icmp_kprobe)
                .prototype(Prototype::SkbAtOrNoBtf(0)),
        ],
    ),
    HookSpec::new(
        "icmpv6_rcv",
        Role::IkeWatch,
        &[
            Variant::entry(programs::ike_icmp6_fentry, programs::ike_icmp6_kprobe)
                .prototype(Prototype::SkbAtOrNoBtf(0)),
        ],
    ),
    HookSpec::new(
        "net_dev_queue",
        Role::IkeWatch,
        &[Variant::tracepoint("net", programs::net_dev_queue)],
    )
    .needs(Needs::Unhooked(SEND)),
    HookSpec::new(
        "netif_receive_skb",
        Role::IkeWatch,
        &[Variant::tracepoint("net", programs::netif_receive_skb)],
    )
    .needs(Needs::Unhooked(RECEIVE)),
];

/// The published form of what `HOOKS` got, with the drops' kfree_skb the
/// watch reads too (what cannot attach is listed with the reason: the rest
/// of the tool works without it).
pub fn hook_list(outcomes: &[HookOutcome]) -> HookList {
    let mut list = hooks::hook_list(outcomes, "IKE watch");
    list.attached.push("skb:kfree_skb".into());
    list
}

/// The in-kernel table, summed over CPUs.
pub fn read(ebpf: &Ebpf) -> Result<Vec<(IkeKey, u64)>, aya::maps::MapError> {
    let map = ebpf
        .map(maps::IKE_EVENTS)
        .ok_or_else(|| aya::maps::MapError::InvalidName {
            name: maps::IKE_EVENTS.into(),
        })?;
    let table: PerCpuHashMap<_, IkeKey, u64> = PerCpuHashMap::try_from(map)?;
    let mut rows = Vec::new();
    for entry in table.iter() {
        let (key, per_cpu) = entry?;
        rows.push((key, per_cpu.iter().sum()));
    }
    Ok(rows)
}

/// IKE between one local address and one peer, in one netns.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkePath {
    pub netns: u64,
    /// `host`, the `ip netns` name, or `netns:<inode>`.
    pub netns_label: String,
    pub local: String,
    pub peer: String,
    /// IKE packets that left through an interface.
    pub sent: u64,
    pub received: u64,
    /// ICMP "port unreachable" from the peer for our IKE packets.
    pub port_unreachable: u64,
    /// IKE packets dropped in this host, by site.
    pub dropped: Vec<IkeDrop>,
    /// UDP ports used (500, 4500) on either side.
    pub ports: Vec<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IkeDrop {
    pub count: u64,
    /// `out` (sent by a local socket) or `in`.
    pub direction: String,
    pub function: String,
    pub reason: String,
    /// Dropped by a netfilter rule (iptables/nftables).
    pub firewall: bool,
}

impl IkePath {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|d| d.count).sum()
    }
}

/// Whether arrivals were counted at the interfaces (the tracepoint
/// fallback) rather than where sockets take them.
pub fn arrivals_at_interfaces(hooks: &HookList) -> bool {
    hooks.attached.iter().any(|h| h == "net:netif_receive_skb")
}

/// What the socket hooks count, before the drops complete it.
#[derive(Default)]
struct AtSockets {
    to_ip_output: u64,
    dropped_out: u64,
    dropped_in: u64,
}

/// Rows grouped per (netns, local address, peer). Counted at the sockets
/// (`arrivals_at_interfaces` false), sent is what sockets handed to IP
/// output less what this host dropped on the way out, and received what
/// sockets got plus what this host dropped on the way in: the same
/// figures as at the interfaces.
pub fn summarize(
    rows: &[(IkeKey, u64)],
    kallsyms: &Kallsyms,
    reasons: &HashMap<u32, String>,
    names: &Names,
    arrivals_at_interfaces: bool,
) -> Vec<IkePath> {
    let mut paths: BTreeMap<(u64, IpAddr, IpAddr), IkePath> = BTreeMap::new();
    let mut at_sockets: BTreeMap<(u64, IpAddr, IpAddr), AtSockets> = BTreeMap::new();
    for (key, count) in rows {
        let (local, peer) = (
            address(&key.local, key.family),
            address(&key.peer, key.family),
        );
        let path = paths
            .entry((u64::from(key.netns), local, peer))
            .or_insert_with(|| IkePath {
                netns: u64::from(key.netns),
                netns_label: names.label(u64::from(key.netns)),
                local: local.to_string(),
                peer: peer.to_string(),
                ..IkePath::default()
            });
        for port in [key.local_port, key.peer_port] {
            if !path.ports.contains(&port) {
                path.ports.push(port);
                path.ports.sort_unstable();
            }
        }
        let sockets = at_sockets
            .entry((u64::from(key.netns), local, peer))
            .or_default();
        match key.event {
            event::SENT => path.sent += count,
            event::RECEIVED | event::DELIVERED => path.received += count,
            event::TO_IP_OUTPUT => sockets.to_ip_output += count,
            event::PORT_UNREACHABLE => path.port_unreachable += count,
            event::DROPPED => {
                if key.outbound == 1 {
                    sockets.dropped_out += count;
                } else {
                    sockets.dropped_in += count;
                }
                let function = drops::function_at(kallsyms, key.location);
                let reason = drops::reason_name(reasons, key.reason);
                let direction = if key.outbound == 1 { "out" } else { "in" };
                match path.dropped.iter_mut().find(|d| {
                    d.function == function && d.reason == reason && d.direction == direction
                }) {
                    Some(drop) => drop.count += count,
                    None => path.dropped.push(IkeDrop {
                        count: *count,
                        direction: direction.into(),
                        firewall: is_firewall(&reason, &function),
                        function,
                        reason,
                    }),
                }
            }
            _ => {}
        }
    }
    for (at, sockets) in at_sockets {
        let Some(path) = paths.get_mut(&at) else {
            continue;
        };
        // Only what sockets handed over can have been dropped after it
        // (at the interfaces, `sent` already left the drops out).
        path.sent += sockets.to_ip_output.saturating_sub(sockets.dropped_out);
        if !arrivals_at_interfaces {
            path.received += sockets.dropped_in;
        }
    }
    paths.into_values().collect()
}

/// A netfilter verdict: the drop reason where the kernel has them,
/// else the function (`nf_hook_slow` frees what a rule drops).
fn is_firewall(reason: &str, function: &str) -> bool {
    reason.starts_with("NETFILTER") || function.ends_with("nf_hook_slow")
}

fn address(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == 10 {
        IpAddr::from(*bytes)
    } else {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(event: u8, location: u64, reason: u32, outbound: u8) -> IkeKey {
        let mut key = IkeKey {
            netns: 9,
            family: 2,
            event,
            location,
            reason,
            outbound,
            local_port: 500,
            peer_port: 500,
            ..IkeKey::default()
        };
        key.local[..4].copy_from_slice(&[192, 0, 2, 1]);
        key.peer[..4].copy_from_slice(&[203, 0, 113, 1]);
        key
    }

    #[test]
    fn events_of_one_peer_make_one_path() {
        let syms =
            Kallsyms::parse("ffffffff81000000 T nf_hook_slow\nffffffff81000400 T __udp4_lib_rcv\n");
        let reasons = HashMap::from([(6, "NETFILTER_DROP".to_string()), (2, "NO_SOCKET".into())]);
        let rows = [
            (key(event::SENT, 0, 0, 0), 5),
            (key(event::DROPPED, 0xffffffff81000010, 6, 1), 3),
            (key(event::DROPPED, 0xffffffff81000410, 2, 0), 1),
            (key(event::PORT_UNREACHABLE, 0, 0, 0), 2),
        ];
        let paths = summarize(&rows, &syms, &reasons, &Names::new(&[]), true);
        assert_eq!(paths.len(), 1);
        let path = &paths[0];
        assert_eq!(path.netns_label, format!("netns:{}", path.netns));
        assert_eq!(
            (path.local.as_str(), path.peer.as_str()),
            ("192.0.2.1", "203.0.113.1")
        );
        assert_eq!((path.sent, path.received, path.port_unreachable), (5, 0, 2));
        assert_eq!(path.dropped_total(), 4);
        assert!(path.dropped[0].firewall && path.dropped[0].direction == "out");
        assert!(!path.dropped[1].firewall && path.dropped[1].reason == "NO_SOCKET");
        assert_eq!(path.ports, vec![500]);
    }

    /// At the sockets, the drops complete sent and received: what our
    /// firewall drops was not sent, what this host drops on the way in
    /// (a firewall, no socket) still arrived.
    #[test]
    fn at_the_sockets_the_drops_complete_sent_and_received() {
        let syms = Kallsyms::parse("ffffffff81000000 T nf_hook_slow\n");
        let reasons = HashMap::from([(6, "NETFILTER_DROP".to_string())]);
        let rows = [
            (key(event::TO_IP_OUTPUT, 0, 0, 0), 7),
            (key(event::DROPPED, 0xffffffff81000010, 6, 1), 3),
            (key(event::DELIVERED, 0, 0, 0), 4),
            (key(event::DROPPED, 0xffffffff81000010, 6, 0), 2),
            (key(event::PORT_UNREACHABLE, 0, 0, 0), 1),
        ];
        let figures = |at_interfaces| {
            let paths = summarize(&rows, &syms, &reasons, &Names::new(&[]), at_interfaces);
            assert_eq!(paths.len(), 1);
            let p = &paths[0];
            (p.sent, p.received, p.port_unreachable, p.dropped_total())
        };
        assert_eq!(figures(false), (4, 6, 1, 5));
        // Only what sockets handed over is taken off, and arrivals counted
        // at the interfaces already include what was dropped after them.
        assert_eq!(figures(true), (4, 4, 1, 5));
        let only_drops = [(key(event::DROPPED, 0xffffffff81000010, 6, 1), 3)];
        let paths = summarize(&only_drops, &syms, &reasons, &Names::new(&[]), false);
        assert_eq!((paths[0].sent, paths[0].received), (0, 0));
    }

    #[test]
    fn arrivals_are_at_the_interfaces_only_with_the_receive_tracepoint() {
        let hooks = |attached: &[&str]| HookList {
            attached: attached.iter().map(|h| h.to_string()).collect(),
            ..HookList::default()
        };
        assert!(!arrivals_at_interfaces(&hooks(&[
            "__udp_enqueue_schedule_skb (fentry)"
        ])));
        assert!(arrivals_at_interfaces(&hooks(&[
            "net:netif_receive_skb",
            "skb:kfree_skb"
        ])));
    }
}
