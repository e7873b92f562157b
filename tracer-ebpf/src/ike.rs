//! The IKE path watch (see `tracer_common::ike`): IKE packets at the
//! interfaces and at the drop point, and the ICMP errors that come back
//! for our IKE and ESP packets. Classic tracepoints only, so it works on
//! every kernel, tracepoint-only hosts included.

use aya_ebpf::{
    Global,
    macros::{map, tracepoint},
    maps::PerCpuHashMap,
    programs::TracePointContext,
};
use tracer_common::{
    ike::{IkeKey, NetRecords, event},
    mtu::{MtuKey, kind},
};

use crate::{
    KERNEL_OFFSETS, mtu,
    packet::{AF_INET, IpPacket, ip_at, quoted_at, skb_packet},
    skb::{read_at, skb_netns_and_ifindex},
};

/// Where `skbaddr` is in the two net tracepoints' records, written by
/// userspace before loading (from tracefs).
#[unsafe(no_mangle)]
static NET_RECORDS: Global<NetRecords> = Global::new(NetRecords::UNSET);

#[map]
static IKE_EVENTS: PerCpuHashMap<IkeKey, u64> = PerCpuHashMap::with_max_entries(2048, 0);

#[tracepoint]
pub fn net_dev_queue(ctx: TracePointContext) -> u32 {
    let offset = NET_RECORDS.load().dev_queue_skbaddr as usize;
    if let Ok(skb) = unsafe { ctx.read_at::<u64>(offset) } {
        unsafe { on_transmit(skb) };
    }
    0
}

#[tracepoint]
pub fn netif_receive_skb(ctx: TracePointContext) -> u32 {
    let offset = NET_RECORDS.load().receive_skbaddr as usize;
    if let Ok(skb) = unsafe { ctx.read_at::<u64>(offset) } {
        unsafe { on_receive(skb) };
    }
    0
}

/// Source and destination port of a UDP datagram if it is IKE: port 500,
/// or 4500 with the 4-byte non-ESP marker (zero). ESP in UDP has its SPI
/// there and a NAT-T keepalive is one byte: neither is IKE, and neither is
/// a datagram (or the quote of one in an ICMP error) that ends before the
/// marker, since nothing tells what it was.
#[inline(always)]
fn ike_ports(ip: &IpPacket) -> Option<(u16, u16)> {
    let (sport, dport) = ip.udp_ports()?;
    if sport == 500 || dport == 500 {
        return Some((sport, dport));
    }
    ((sport == 4500 || dport == 4500) && ip.after_udp_header() == Some(0)).then_some((sport, dport))
}

#[inline(always)]
fn count(key: &IkeKey) {
    if let Some(value) = IKE_EVENTS.get_ptr_mut(key) {
        // Per-CPU value: no other CPU writes it.
        unsafe { *value += 1 };
    } else {
        let _ = IKE_EVENTS.insert(key, &1, 0);
    }
}

#[inline(always)]
fn key(ip: &IpPacket, event: u8, outbound: bool, ports: (u16, u16)) -> IkeKey {
    let mut key = IkeKey {
        family: ip.family,
        event,
        ..IkeKey::default()
    };
    if outbound {
        key.local = ip.src;
        key.peer = ip.dst;
        (key.local_port, key.peer_port) = ports;
    } else {
        key.local = ip.dst;
        key.peer = ip.src;
        (key.peer_port, key.local_port) = ports;
    }
    key
}

/// `net:net_dev_queue`: a locally sent IKE packet leaves (forwarded
/// packets have no socket and are not ours).
unsafe fn on_transmit(skb: u64) {
    let sk: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_sk) }.unwrap_or(0);
    if sk == 0 {
        return;
    }
    let Some(ip) = (unsafe { skb_packet(skb) }) else {
        return;
    };
    let Some(ports) = ike_ports(&ip) else {
        return;
    };
    let mut key = key(&ip, event::SENT, true, ports);
    (key.netns, key.ifindex) = unsafe { skb_netns_and_ifindex(skb) };
    count(&key);
}

/// `net:netif_receive_skb` (`skb->data` is the IP header there): an IKE
/// packet arrives, or an ICMP error about one of our IKE or ESP packets.
unsafe fn on_receive(skb: u64) {
    let data: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_data) }.unwrap_or(0);
    if data == 0 {
        return;
    }
    let Some(ip) = ip_at(data) else {
        return;
    };
    if let Some(ports) = ike_ports(&ip) {
        let mut key = key(&ip, event::RECEIVED, false, ports);
        (key.netns, key.ifindex) = unsafe { skb_netns_and_ifindex(skb) };
        count(&key);
        return;
    }
    if matches!(ip.proto, 1 | 58) {
        unsafe { icmp_error(skb, &ip) };
    }
}

/// ICMP/ICMPv6 "port unreachable" for our IKE packets, and "fragmentation
/// needed" / "packet too big" for our ESP packets (the path MTU is below
/// the ESP packet: issue of oversize ESP).
#[inline(always)]
unsafe fn icmp_error(skb: u64, outer: &IpPacket) {
    let (icmp_type, code) = outer.icmp_type_code();
    let (port_unreachable, too_big) = if outer.family == AF_INET {
        (icmp_type == 3 && code == 3, icmp_type == 3 && code == 4)
    } else {
        (icmp_type == 1 && code == 4, icmp_type == 2)
    };
    if !port_unreachable && !too_big {
        return;
    }
    // Our own packet, as the complainant quotes it: what follows the
    // 8-byte ICMP header.
    let quoted_len = outer.total_len.saturating_sub(outer.header_len + 8);
    let Some(inner) = quoted_at(outer.transport_at + 8, quoted_len) else {
        return;
    };
    let (netns, ifindex) = unsafe { skb_netns_and_ifindex(skb) };
    if port_unreachable {
        if let Some(ports) = ike_ports(&inner) {
            let mut key = key(&inner, event::PORT_UNREACHABLE, true, ports);
            (key.netns, key.ifindex) = (netns, ifindex);
            count(&key);
        }
        return;
    }
    let Some((spi, _)) = inner.esp() else {
        return;
    };
    let mtu = outer.icmp_mtu();
    let key = MtuKey {
        sa_dst: inner.dst,
        spi,
        netns,
        ifindex,
        mtu,
        kind: kind::FRAG_NEEDED_RECEIVED,
        family: inner.family,
        ..MtuKey::default()
    };
    mtu::record(&key, inner.total_len, 0);
}

/// `skb:kfree_skb`: an IKE packet dropped in this host.
pub unsafe fn on_drop(skb: u64, location: u64, reason: u32, netns: u32, ifindex: u32) {
    let Some(ip) = (unsafe { skb_packet(skb) }) else {
        return;
    };
    let Some(ports) = ike_ports(&ip) else {
        return;
    };
    // A packet still owned by a socket was on its way out.
    let sk: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_sk) }.unwrap_or(0);
    let mut key = key(&ip, event::DROPPED, sk != 0, ports);
    key.outbound = u8::from(sk != 0);
    key.location = location;
    key.reason = reason;
    key.netns = netns;
    key.ifindex = ifindex;
    count(&key);
}
