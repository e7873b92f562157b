//! Oversize ESP: which packets of which SA did not fit the path MTU, what
//! happened to them, and the `mtu=` and MSS clamp that fix it, computed
//! from the SA's real algorithms and mode.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};
use tracer_common::names::programs;

use aya::{Ebpf, maps::PerCpuHashMap};
use serde::{Deserialize, Serialize};
use tracer_common::mtu::{MtuKey, MtuStats, kind};
use tracer_common::names::maps;

use crate::{
    hooks::{self, HookOutcome, HookSpec, Prototype, Role, Variant},
    model::{Finding, FindingKind, HookList},
    xfrm_state::{EspGeometry, Mode, Sa, VpnInterface, VpnInterfaceKind, XfrmState},
};

/// Where oversize packets show: fragmented, refused with ICMP, refused
/// locally (EMSGSIZE); and GSO packets cut into segments for an SA. None of
/// them runs for a healthy non-GSO IPsec packet: what each SA carried comes
/// from its own packet and byte counters.
pub const HOOKS: &[HookSpec] = &[
    HookSpec::new(
        "ip_do_fragment",
        Role::Mtu,
        &[Variant::entry(
            programs::mtu_fragment_fentry,
            programs::mtu_fragment_kprobe,
        )],
    ),
    HookSpec::new(
        "ip6_fragment",
        Role::Mtu,
        &[Variant::entry(
            programs::mtu_fragment6_fentry,
            programs::mtu_fragment6_kprobe,
        )],
    ),
    HookSpec::new(
        "__icmp_send",
        Role::Mtu,
        &[Variant::entry(
            programs::mtu_icmp_fentry,
            programs::mtu_icmp_kprobe,
        )],
    ),
    HookSpec::new(
        "icmp6_send",
        Role::Mtu,
        &[Variant::entry(
            programs::mtu_icmp6_fentry,
            programs::mtu_icmp6_kprobe,
        )],
    ),
    HookSpec::new(
        "xfrm_local_error",
        Role::Mtu,
        &[Variant::entry(
            programs::mtu_local_error_fentry,
            programs::mtu_local_error_kprobe,
        )],
    ),
    HookSpec::new(
        "__skb_gso_segment",
        Role::Mtu,
        &[
            Variant::entry(programs::mtu_gso_fentry, programs::mtu_gso_kprobe)
                .prototype(Prototype::SkbAtOrNoBtf(0)),
        ],
    ),
];

/// The published form of what `HOOKS` got.
pub fn hook_list(outcomes: &[HookOutcome]) -> HookList {
    hooks::hook_list(outcomes, "oversize ESP hooks")
}

/// The table, summed over CPUs.
pub fn read(ebpf: &Ebpf) -> Result<Vec<(MtuKey, MtuStats)>, aya::maps::MapError> {
    let map = ebpf
        .map(maps::MTU_EVENTS)
        .ok_or_else(|| aya::maps::MapError::InvalidName {
            name: maps::MTU_EVENTS.into(),
        })?;
    let table: PerCpuHashMap<_, MtuKey, MtuStats> = PerCpuHashMap::try_from(map)?;
    let mut rows = Vec::new();
    for entry in table.iter() {
        let (key, per_cpu) = entry?;
        let mut total = MtuStats::default();
        for stats in per_cpu.iter() {
            total.count += stats.count;
            total.max_len = total.max_len.max(stats.max_len);
            total.max_mss = total.max_mss.max(stats.max_mss);
            total.gso_packets += stats.gso_packets;
        }
        rows.push((key, total));
    }
    Ok(rows)
}

/// One kind of event of one SA, as the report has it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SizeEvent {
    /// `fragmented`, `frag_needed`, `frag_needed_received` or `local_emsgsize`.
    pub kind: String,
    pub count: u64,
    pub netns: u64,
    pub netns_label: String,
    pub ifname: String,
    /// The MTU the packets were judged against.
    pub mtu: u32,
    /// True: `mtu` is the inner (IPsec) MTU; false: the outer path MTU.
    pub mtu_is_inner: bool,
    /// Refused by the XFRM interface `ifname` (kept as published: see
    /// `via_interface` for VTIs too).
    pub via_xfrm_interface: bool,
    /// Refused by the route-based VPN's interface `ifname` (`xfrm` or
    /// `vti`); null otherwise.
    pub via_interface: Option<InterfaceType>,
    pub max_len: u32,
}

/// The type of a route-based VPN's interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceType {
    Xfrm,
    /// A VTI, IPv4 (`vti`) or IPv6 (`vti6`).
    Vti,
}

impl InterfaceType {
    fn of(interface: &VpnInterface) -> Self {
        match interface.kind {
            VpnInterfaceKind::Xfrm { .. } => Self::Xfrm,
            VpnInterfaceKind::Vti { .. } => Self::Vti,
        }
    }

    /// As an operator calls it.
    fn noun(self) -> &'static str {
        match self {
            Self::Xfrm => "XFRM interface",
            Self::Vti => "VTI",
        }
    }

    /// The libreswan option that makes a connection use one.
    fn libreswan_option(self) -> &'static str {
        match self {
            Self::Xfrm => "ipsec-interface=",
            Self::Vti => "vti-interface=",
        }
    }
}

/// Per SA: what it carried and what did not fit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SaSizes {
    /// Hex, as `ip xfrm` shows it.
    pub spi: String,
    pub sa_dst: String,
    /// Where the SA is installed (`ip netns` name), if found.
    pub sa_netns: String,
    pub mode: String,
    pub algorithms: String,
    pub geometry: Option<EspGeometry>,
    /// Packets the SA encrypted where it sends, during the run (the SA's own
    /// packet counter; a GSO packet counts once per segment).
    pub packets_out: u64,
    /// GSO packets cut into segments for the SA before encryption.
    pub gso_packets_out: u64,
    /// The largest inner packet known: the mean size of the SA's packets
    /// (its byte and packet counters) or its largest GSO segment, whichever
    /// is larger. Exact when the SA's packets have one size, a lower bound
    /// of the largest otherwise: no program sees each healthy packet.
    pub max_inner_len: u32,
    /// Not measured any more (0): it took a program on every packet.
    pub max_tcp_mss: u32,
    pub events: Vec<SizeEvent>,
    /// The largest inner packet that fits the smallest MTU seen.
    pub max_inner_fitting: Option<u32>,
}

impl SaSizes {
    /// Packets that did not fit. An ICMP error received for an ESP packet
    /// is a second sight of a packet a router refused, so the two views
    /// are not added up: the router may be watched too (in a lab) or not.
    pub fn oversize(&self) -> u64 {
        let (received, here): (Vec<&SizeEvent>, Vec<&SizeEvent>) = self
            .events
            .iter()
            .partition(|e| e.kind == "frag_needed_received");
        let sum = |events: Vec<&SizeEvent>| events.iter().map(|e| e.count).sum::<u64>();
        sum(here).max(sum(received))
    }
}

/// A netns as the analysis needs it: label, interfaces, XFRM state, and
/// what each of its SAs carried during the run (SA, packets, bytes).
pub struct NetnsView<'a> {
    pub inode: u64,
    pub label: &'a str,
    pub interfaces: &'a BTreeMap<u32, String>,
    pub state: Option<&'a XfrmState>,
    pub carried: Vec<(&'a Sa, u64, u64)>,
}

/// Whether the netns sends with `sa`: an `out` policy's template names it
/// (its protocol, reqid and destination, or its source when the template
/// leaves the destination to the packet). The SA is installed at both ends.
fn sends_with(state: &XfrmState, sa: &Sa) -> bool {
    state
        .policies
        .iter()
        .filter(|p| p.dir == "out")
        .flat_map(|p| &p.templates)
        .any(|t| {
            t.proto == sa.proto
                && (t.reqid == 0 || t.reqid == sa.reqid)
                && if t.dst.is_unspecified() {
                    t.src.is_unspecified() || t.src == sa.src
                } else {
                    t.dst == sa.dst
                }
        })
}

/// The mean inner packet of `packets` that made `bytes` in the SA's
/// counter. The kernel counts what ESP encrypts: the whole inner packet in
/// tunnel mode, the payload after the IP header in transport mode.
fn mean_inner_len(sa: &Sa, packets: u64, bytes: u64) -> u32 {
    let ip_header = match (sa.mode, sa.dst) {
        (Mode::Transport, IpAddr::V4(_)) => 20,
        (Mode::Transport, IpAddr::V6(_)) => 40,
        _ => 0,
    };
    u32::try_from(bytes / packets.max(1))
        .unwrap_or(u32::MAX)
        .saturating_add(ip_header)
}

fn address(raw: &[u8; 16], family: u8) -> IpAddr {
    if family == 10 {
        IpAddr::from(*raw)
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

fn algorithms(sa: &Sa) -> String {
    let names: Vec<String> = [&sa.aead, &sa.cipher, &sa.auth]
        .into_iter()
        .flatten()
        .map(|a| {
            if a.icv_bits > 0 {
                format!("{}/{}", a.name, a.icv_bits)
            } else {
                a.name.clone()
            }
        })
        .collect();
    let encap = if sa.encap.is_some() {
        " +UDP encap"
    } else {
        ""
    };
    format!("{}{encap}", names.join(" + "))
}

/// The SA of an event (SPI in host order, destination): from the key, or,
/// for a refusal at a VPN interface, the interface's outbound SA.
fn sa_of(key: &MtuKey, namespaces: &[NetnsView]) -> Option<(u32, IpAddr)> {
    if key.spi != 0 {
        return Some((u32::from_be(key.spi), address(&key.sa_dst, key.family)));
    }
    if key.via_vpn_interface == 0 {
        return None;
    }
    let sa = netns_state(key, namespaces)?.interface_sa(key.ifindex)?;
    Some((sa.spi, sa.dst))
}

/// The XFRM state of the netns where the event happened.
fn netns_state<'a>(key: &MtuKey, namespaces: &[NetnsView<'a>]) -> Option<&'a XfrmState> {
    namespaces
        .iter()
        .find(|n| n.inode == u64::from(key.netns))?
        .state
}

/// A row for the SA, with what the kernel has of it.
fn sa_sizes(spi: u32, sa_dst: IpAddr, namespaces: &[NetnsView]) -> SaSizes {
    // The SA lives where it is installed, which may be another netns than
    // the one that saw the packet (a router on the path).
    let found = namespaces.iter().find_map(|ns| {
        let sa = ns.state?.sa(spi, sa_dst)?;
        Some((ns.label, sa))
    });
    SaSizes {
        spi: format!("{spi:#010x}"),
        sa_dst: sa_dst.to_string(),
        sa_netns: found.map_or_else(String::new, |(label, _)| label.to_string()),
        mode: found.map_or_else(String::new, |(_, sa)| {
            format!("{:?}", sa.mode).to_lowercase()
        }),
        algorithms: found.map_or_else(String::new, |(_, sa)| algorithms(sa)),
        geometry: found.and_then(|(_, sa)| sa.esp_geometry()),
        packets_out: 0,
        gso_packets_out: 0,
        max_inner_len: 0,
        max_tcp_mss: 0,
        events: Vec::new(),
        max_inner_fitting: None,
    }
}

/// Groups the events per SA and joins them with the SAs the kernel has and
/// what each carried where it sends.
pub fn summarize(rows: &[(MtuKey, MtuStats)], namespaces: &[NetnsView]) -> Vec<SaSizes> {
    let mut by_sa: BTreeMap<(u32, IpAddr), SaSizes> = BTreeMap::new();
    for ns in namespaces {
        let Some(state) = ns.state else { continue };
        for &(sa, packets, bytes) in &ns.carried {
            if packets == 0 || !sends_with(state, sa) {
                continue;
            }
            let entry = by_sa
                .entry((sa.spi, sa.dst))
                .or_insert_with(|| sa_sizes(sa.spi, sa.dst, namespaces));
            entry.sa_netns = ns.label.to_string();
            entry.packets_out += packets;
            entry.max_inner_len = entry.max_inner_len.max(mean_inner_len(sa, packets, bytes));
        }
    }
    for (key, stats) in rows {
        let Some((spi, sa_dst)) = sa_of(key, namespaces) else {
            continue;
        };
        let entry = by_sa
            .entry((spi, sa_dst))
            .or_insert_with(|| sa_sizes(spi, sa_dst, namespaces));
        if key.kind == kind::GSO_SEGMENTED {
            entry.gso_packets_out += stats.count;
            entry.max_inner_len = entry.max_inner_len.max(stats.max_len);
            continue;
        }
        let ns = namespaces.iter().find(|n| n.inode == u64::from(key.netns));
        let via_interface = if key.via_vpn_interface != 0 {
            netns_state(key, namespaces)
                .and_then(|state| state.interface(key.ifindex))
                .map(InterfaceType::of)
        } else {
            None
        };
        entry.events.push(SizeEvent {
            kind: match key.kind {
                kind::FRAGMENTED => "fragmented",
                kind::FRAG_NEEDED => "frag_needed",
                kind::FRAG_NEEDED_RECEIVED => "frag_needed_received",
                _ => "local_emsgsize",
            }
            .into(),
            count: stats.count,
            netns: u64::from(key.netns),
            netns_label: ns.map_or_else(|| format!("netns:{}", key.netns), |n| n.label.into()),
            ifname: ns
                .and_then(|n| n.interfaces.get(&key.ifindex).cloned())
                .unwrap_or_else(|| {
                    if key.ifindex == 0 {
                        "-".into()
                    } else {
                        format!("if{}", key.ifindex)
                    }
                }),
            mtu: key.mtu,
            mtu_is_inner: key.inner_mtu != 0,
            via_xfrm_interface: via_interface == Some(InterfaceType::Xfrm),
            via_interface,
            max_len: stats.max_len,
        });
    }
    let mut all: Vec<SaSizes> = by_sa.into_values().collect();
    for sa in &mut all {
        sa.events.sort_by_key(|e| std::cmp::Reverse(e.count));
        sa.max_inner_fitting = sa
            .events
            .iter()
            .filter(|e| e.mtu > 0)
            .filter_map(|e| {
                if e.mtu_is_inner {
                    Some(e.mtu)
                } else {
                    sa.geometry.map(|g| g.max_inner(e.mtu))
                }
            })
            .min();
    }
    all
}

/// One `esp_oversize` finding per SA that had packets over the MTU.
pub fn findings(sizes: &[SaSizes]) -> Vec<Finding> {
    sizes
        .iter()
        .filter(|sa| sa.oversize() > 0)
        .map(|sa| {
            let what: Vec<String> = sa
                .events
                .iter()
                .map(|e| {
                    let action = match e.kind.as_str() {
                        "fragmented" => "fragmented after encryption",
                        "frag_needed" => "refused with ICMP fragmentation needed",
                        "frag_needed_received" => {
                            "reported too big by a router on the path (ICMP fragmentation needed received)"
                        }
                        _ => "refused to a local sender with EMSGSIZE",
                    };
                    let mtu = if e.mtu_is_inner {
                        format!("IPsec MTU {}", e.mtu)
                    } else {
                        format!("path MTU {}", e.mtu)
                    };
                    let device = match e.via_interface {
                        Some(interface) => format!("{} {}", interface.noun(), e.ifname),
                        None => e.ifname.clone(),
                    };
                    format!(
                        "{} {action} in {} on {device} ({mtu}, largest {} bytes)",
                        e.count, e.netns_label, e.max_len
                    )
                })
                .collect();
            let overhead = sa.geometry.map_or_else(String::new, |g| {
                format!(
                    "; ESP ({}, {}) adds {}-{} bytes",
                    sa.mode,
                    sa.algorithms,
                    g.header + g.icv + 2,
                    g.header + g.icv + g.block + 1
                )
            });
            let summary = format!(
                "{} packets of SA {} to {} did not fit the MTU: {}{overhead}",
                sa.oversize(),
                sa.spi,
                sa.sa_dst,
                what.join(", ")
            );
            let interface = sa
                .events
                .iter()
                .find_map(|e| Some((e.via_interface?, &e.ifname)));
            let fix = match sa.max_inner_fitting {
                Some(inner) => {
                    let mss = inner.saturating_sub(40);
                    let mtu = match interface {
                        Some((interface, ifname)) => format!(
                            "set the MTU of the {}: `ip link set dev {ifname} mtu {inner}` (libreswan: mtu={inner} in the connection with {})",
                            interface.noun(),
                            interface.libreswan_option()
                        ),
                        None => format!(
                            "set mtu={inner} in the libreswan connection of SA {} (or `ip route ... mtu {inner}` for the protected subnet)",
                            sa.spi
                        ),
                    };
                    format!(
                        "{mtu}, and clamp TCP MSS on the gateway: `iptables -t mangle -A FORWARD -p tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss {mss}` (nftables: `tcp flags syn tcp option maxseg size set {mss}`), or `-j TCPMSS --clamp-mss-to-pmtu` once the MTU is set"
                    )
                }
                None => "lower the MTU of the tunnel (libreswan mtu=) by the ESP overhead and clamp TCP MSS (-j TCPMSS --clamp-mss-to-pmtu)".into(),
            };
            let mut evidence = what;
            if sa.packets_out > 0 {
                evidence.push(format!(
                    "{} packets went out through this SA (its own counters); largest inner packet known {} bytes",
                    sa.packets_out, sa.max_inner_len,
                ));
            }
            Finding {
                netns_label: sa.sa_netns.clone(),
                spi: sa.spi.clone(),
                ..Finding::new(FindingKind::EspOversize, summary, fix, evidence)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: u8, netns: u32, mtu: u32, inner_mtu: u8) -> MtuKey {
        let mut key = MtuKey {
            spi: 0x1001u32.to_be(),
            netns,
            ifindex: 3,
            mtu,
            kind,
            inner_mtu,
            ..MtuKey::default()
        };
        key.sa_dst[..4].copy_from_slice(&[203, 0, 113, 1]);
        key
    }

    fn stats(count: u64, max_len: u32) -> MtuStats {
        MtuStats {
            count,
            max_len,
            max_mss: 0,
            gso_packets: 0,
        }
    }

    fn gateway_sa(mode: Mode) -> Sa {
        Sa::example(0x1001, 1, "203.0.113.1", mode)
    }

    /// A gateway that sends with `sa` (its out policy's template names it).
    fn sender(sa: Sa) -> XfrmState {
        XfrmState {
            policies: vec![crate::xfrm_state::Policy {
                selector: crate::xfrm_state::Selector::default(),
                dir: "out",
                action: "allow",
                index: 1,
                priority: 0,
                templates: vec![crate::xfrm_state::Template {
                    src: sa.src,
                    dst: sa.dst,
                    proto: 50,
                    spi: 0,
                    reqid: 1,
                    mode: sa.mode,
                    optional: false,
                }],
                mark: None,
                if_id: None,
            }],
            sas: vec![sa],
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn without_the_sa_the_inner_mtu_still_gives_the_fix() {
        let interfaces = BTreeMap::from([(3, "wan0".to_string())]);
        let views = [NetnsView {
            inode: 7,
            label: "west",
            interfaces: &interfaces,
            state: None,
            carried: Vec::new(),
        }];
        let rows = [
            (key(kind::FRAG_NEEDED, 7, 1346, 1), stats(3, 1400)),
            (key(kind::FRAG_NEEDED, 7, 1446, 1), stats(2, 1500)),
        ];
        let sizes = summarize(&rows, &views);
        assert_eq!(sizes.len(), 1);
        let sa = &sizes[0];
        assert_eq!((sa.spi.as_str(), sa.packets_out), ("0x00001001", 0));
        assert_eq!(sa.max_inner_fitting, Some(1346));
        let findings = findings(&sizes);
        assert_eq!(findings.len(), 1);
        assert!(
            findings[0]
                .summary
                .starts_with("5 packets of SA 0x00001001")
        );
        assert!(findings[0].fix.contains("mtu=1346"));
        assert!(findings[0].fix.contains("--set-mss 1306"));
    }

    #[test]
    fn what_an_sa_carried_comes_from_its_counters_where_it_sends() {
        let interfaces = BTreeMap::new();
        for (mode, bytes, mean) in [
            // Tunnel mode counts the whole inner packet, transport mode
            // what follows its IP header.
            (Mode::Tunnel, 10 * 1446, 1446),
            (Mode::Transport, 10 * 1426, 1446),
        ] {
            let west = sender(gateway_sa(mode));
            // The receiving end has the same SA, and no template naming it.
            let mut east = west.clone();
            east.policies.clear();
            let views = [
                NetnsView {
                    inode: 7,
                    label: "west",
                    interfaces: &interfaces,
                    state: Some(&west),
                    carried: vec![(&west.sas[0], 10, bytes)],
                },
                NetnsView {
                    inode: 8,
                    label: "east",
                    interfaces: &interfaces,
                    state: Some(&east),
                    carried: vec![(&east.sas[0], 10, bytes)],
                },
            ];
            let sizes = summarize(&[], &views);
            assert_eq!(sizes.len(), 1, "{mode:?}");
            let sa = &sizes[0];
            assert_eq!(
                (sa.sa_netns.as_str(), sa.packets_out, sa.max_inner_len),
                ("west", 10, mean),
                "{mode:?}"
            );
            assert!(findings(&sizes).is_empty());
        }
    }

    #[test]
    fn gso_packets_are_counted_with_their_largest_segment() {
        let interfaces = BTreeMap::new();
        let west = sender(gateway_sa(Mode::Tunnel));
        let views = [NetnsView {
            inode: 7,
            label: "west",
            interfaces: &interfaces,
            state: Some(&west),
            carried: vec![(&west.sas[0], 40, 40 * 1000)],
        }];
        let rows = [(key(kind::GSO_SEGMENTED, 7, 0, 0), stats(3, 1420))];
        let sizes = summarize(&rows, &views);
        let sa = &sizes[0];
        assert_eq!(
            (sa.packets_out, sa.gso_packets_out, sa.max_inner_len),
            (40, 3, 1420)
        );
        assert!(sa.events.is_empty());
    }
}
