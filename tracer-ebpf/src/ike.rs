//! The IKE path watch (see `tracer_common::ike`): IKE packets at the
//! interfaces and at the drop point, and the ICMP errors that come back
//! for our IKE and ESP packets. Classic tracepoints only, so it works on
//! every kernel, tracepoint-only hosts included.

use aya_ebpf::{helpers::bpf_probe_read_kernel, macros::map, maps::PerCpuHashMap};
use tracer_common::{
    ike::{IkeKey, event},
    mtu::{MtuKey, kind},
};

use crate::{KERNEL_OFFSETS, attribution::skb_netns_and_ifindex, mtu, read_at};

#[map]
static IKE_EVENTS: PerCpuHashMap<IkeKey, u64> = PerCpuHashMap::with_max_entries(2048, 0);

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The parts of an IP header the watch needs.
struct Ip {
    family: u8,
    proto: u8,
    total_len: u32,
    src: [u8; 16],
    dst: [u8; 16],
    transport: u64,
}

#[inline(always)]
fn read<T>(at: u64) -> Option<T> {
    unsafe { bpf_probe_read_kernel(at as *const T) }.ok()
}

/// The IP header at `at` (IPv6 extension headers are not followed: IKE
/// and ICMP errors do not carry them in practice).
#[inline(always)]
fn ip_at(at: u64) -> Option<Ip> {
    let first: u8 = read(at)?;
    let mut ip = Ip {
        family: 0,
        proto: 0,
        total_len: 0,
        src: [0; 16],
        dst: [0; 16],
        transport: 0,
    };
    match first >> 4 {
        4 => {
            ip.family = AF_INET;
            ip.proto = read(at + 9)?;
            ip.total_len = u32::from(u16::from_be(read(at + 2)?));
            let src: [u8; 4] = read(at + 12)?;
            let dst: [u8; 4] = read(at + 16)?;
            ip.src[..4].copy_from_slice(&src);
            ip.dst[..4].copy_from_slice(&dst);
            ip.transport = at + u64::from(first & 0x0f) * 4;
        }
        6 => {
            ip.family = AF_INET6;
            ip.proto = read(at + 6)?;
            ip.total_len = 40 + u32::from(u16::from_be(read(at + 4)?));
            ip.src = read(at + 8)?;
            ip.dst = read(at + 24)?;
            ip.transport = at + 40;
        }
        _ => return None,
    }
    Some(ip)
}

/// Source and destination port of a UDP datagram if it is IKE: port 500,
/// or 4500 with the 4-byte non-ESP marker (ESP in UDP and NAT-T
/// keepalives are not IKE). `marker_required` is false for the copy of
/// our packet inside an ICMP error, which may stop after the UDP header.
#[inline(always)]
fn ike_ports(ip: &Ip, marker_required: bool) -> Option<(u16, u16)> {
    if ip.proto != 17 {
        return None;
    }
    let ports: [u16; 2] = read(ip.transport)?;
    let (sport, dport) = (u16::from_be(ports[0]), u16::from_be(ports[1]));
    if sport == 500 || dport == 500 {
        return Some((sport, dport));
    }
    if sport != 4500 && dport != 4500 {
        return None;
    }
    if !marker_required {
        return Some((sport, dport));
    }
    let marker: u32 = read(ip.transport + 8)?;
    (marker == 0).then_some((sport, dport))
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

/// The network header of an skb in the IP layer (`head + network_header`).
#[inline(always)]
unsafe fn network_header(skb: u64) -> Option<u64> {
    let o = KERNEL_OFFSETS.load();
    let head: u64 = unsafe { read_at(skb, o.sk_buff_head) }.ok()?;
    let network: u16 = unsafe { read_at(skb, o.sk_buff_network_header) }.ok()?;
    (head != 0 && network != 0xffff).then_some(head + u64::from(network))
}

#[inline(always)]
fn key(ip: &Ip, event: u8, outbound: bool, ports: (u16, u16)) -> IkeKey {
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
pub unsafe fn on_transmit(skb: u64) {
    let sk: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_sk) }.unwrap_or(0);
    if sk == 0 {
        return;
    }
    let Some(ip) = (unsafe { network_header(skb) }).and_then(ip_at) else {
        return;
    };
    let Some(ports) = ike_ports(&ip, true) else {
        return;
    };
    let mut key = key(&ip, event::SENT, true, ports);
    (key.netns, key.ifindex) = unsafe { skb_netns_and_ifindex(skb) };
    count(&key);
}

/// `net:netif_receive_skb` (`skb->data` is the IP header there): an IKE
/// packet arrives, or an ICMP error about one of our IKE or ESP packets.
pub unsafe fn on_receive(skb: u64) {
    let data: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_data) }.unwrap_or(0);
    if data == 0 {
        return;
    }
    let Some(ip) = ip_at(data) else {
        return;
    };
    if let Some(ports) = ike_ports(&ip, true) {
        let mut key = key(&ip, event::RECEIVED, false, ports);
        (key.netns, key.ifindex) = unsafe { skb_netns_and_ifindex(skb) };
        count(&key);
        return;
    }
    let is_icmp_error = match ip.proto {
        1 => true,
        58 => true,
        _ => false,
    };
    if is_icmp_error {
        unsafe { icmp_error(skb, &ip) };
    }
}

/// ICMP/ICMPv6 "port unreachable" for our IKE packets, and "fragmentation
/// needed" / "packet too big" for our ESP packets (the path MTU is below
/// the ESP packet: issue of oversize ESP).
#[inline(always)]
unsafe fn icmp_error(skb: u64, outer: &Ip) {
    let header: [u8; 2] = read(outer.transport).unwrap_or([0; 2]);
    let (icmp_type, code) = (header[0], header[1]);
    let (port_unreachable, too_big) = if outer.family == AF_INET {
        (icmp_type == 3 && code == 3, icmp_type == 3 && code == 4)
    } else {
        (icmp_type == 1 && code == 4, icmp_type == 2)
    };
    if !port_unreachable && !too_big {
        return;
    }
    // Our own packet, as the complainant quotes it.
    let Some(inner) = ip_at(outer.transport + 8) else {
        return;
    };
    let (netns, ifindex) = unsafe { skb_netns_and_ifindex(skb) };
    if port_unreachable {
        if let Some(ports) = ike_ports(&inner, false) {
            let mut key = key(&inner, event::PORT_UNREACHABLE, true, ports);
            (key.netns, key.ifindex) = (netns, ifindex);
            count(&key);
        }
        return;
    }
    let spi: u32 = match inner.proto {
        50 => read(inner.transport).unwrap_or(0),
        17 => {
            let ports: [u16; 2] = read(inner.transport).unwrap_or([0; 2]);
            if u16::from_be(ports[1]) == 4500 {
                // 0 is the non-ESP marker: IKE, not ESP.
                read(inner.transport + 8).unwrap_or(0)
            } else {
                0
            }
        }
        _ => 0,
    };
    if spi == 0 {
        return;
    }
    let mtu = if outer.family == AF_INET {
        u32::from(u16::from_be(read(outer.transport + 6).unwrap_or(0)))
    } else {
        u32::from_be(read(outer.transport + 4).unwrap_or(0))
    };
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
    let Some(ip) = (unsafe { network_header(skb) }).and_then(ip_at) else {
        return;
    };
    let Some(ports) = ike_ports(&ip, true) else {
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
