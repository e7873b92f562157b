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
    hooks::{self, HookOutcome, HookSpec, Role, Variant},
    kallsyms::Kallsyms,
    model::{HookList, Names},
};

/// The interface tracepoints of the watch (kfree_skb is attached by
/// `drops`). Classic tracepoints: every kernel has them.
pub const HOOKS: &[HookSpec] = &[
    HookSpec::new(
        "net_dev_queue",
        Role::IkeWatch,
        &[Variant::tracepoint("net", programs::net_dev_queue)],
    ),
    HookSpec::new(
        "netif_receive_skb",
        Role::IkeWatch,
        &[Variant::tracepoint("net", programs::netif_receive_skb)],
    ),
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

/// Rows grouped per (netns, local address, peer).
pub fn summarize(
    rows: &[(IkeKey, u64)],
    kallsyms: &Kallsyms,
    reasons: &HashMap<u32, String>,
    names: &Names,
) -> Vec<IkePath> {
    let mut paths: BTreeMap<(u64, IpAddr, IpAddr), IkePath> = BTreeMap::new();
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
        match key.event {
            event::SENT => path.sent += count,
            event::RECEIVED => path.received += count,
            event::PORT_UNREACHABLE => path.port_unreachable += count,
            event::DROPPED => {
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
        let paths = summarize(&rows, &syms, &reasons, &Names::new(&[]));
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
}
