//! The IKE path watch: per local address and peer, IKE packets sent,
//! received, dropped in this host (and where), and ICMP "port unreachable"
//! from the peer. It tells "requests go out and nothing comes back" from
//! "our own firewall drops IKE" and "no IKE daemon at the peer".

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use aya::{Ebpf, maps::PerCpuHashMap, programs::TracePoint};
use serde::{Deserialize, Serialize};
use tracer_common::ike::{IkeKey, event};

use crate::{drops, ebpf, kallsyms::Kallsyms, model::HookList};

/// The tracepoints of the watch (kfree_skb is attached by `drops`).
const TRACEPOINTS: [(&str, &str); 2] = [("net", "net_dev_queue"), ("net", "netif_receive_skb")];

/// Attaches the interface tracepoints; what cannot attach is listed with
/// the reason (the rest of the tool works without it).
pub fn attach(ebpf: &mut Ebpf) -> HookList {
    let mut hooks = HookList::default();
    for (category, name) in TRACEPOINTS {
        let result = ebpf::program::<TracePoint>(ebpf, name).and_then(|prog| {
            prog.load().map_err(|e| ebpf::describe(&e))?;
            prog.attach(category, name)
                .map(drop)
                .map_err(|e| ebpf::describe(&e))
        });
        let hook = format!("{category}:{name}");
        match result {
            Ok(()) => hooks.attached.push(hook),
            Err(why) => hooks.missing.push((hook, why)),
        }
    }
    hooks.attached.push("skb:kfree_skb".into());
    hooks
}

/// The in-kernel table, summed over CPUs.
pub fn read(ebpf: &Ebpf) -> Result<Vec<(IkeKey, u64)>, aya::maps::MapError> {
    let map = ebpf
        .map("IKE_EVENTS")
        .ok_or_else(|| aya::maps::MapError::InvalidName {
            name: "IKE_EVENTS".into(),
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
    /// `ip netns` name, `host`, or `pid N` (filled in by the report).
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
        let paths = summarize(&rows, &syms, &reasons);
        assert_eq!(paths.len(), 1);
        let path = &paths[0];
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
