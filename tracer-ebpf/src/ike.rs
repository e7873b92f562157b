//! The IKE path watch (see `tracer_common::ike`): IKE packets where local
//! sockets send and receive them and at the drop point, and the ICMP errors
//! that come back for our IKE and ESP packets. Where the kernel lets us hook
//! functions, only the socket layer's and ICMP's (no ESP packet, forwarded
//! or ours, passes there: docs/kernel.md §7); where it does not, the
//! interface tracepoints, which see every packet.

use aya_ebpf::{
    Global,
    helpers::bpf_probe_read_kernel,
    macros::{fentry, fexit, kprobe, kretprobe, map, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext, TracePointContext},
};
use tracer_common::{
    ike::{IkeKey, NetRecords, event},
    mtu::{MtuKey, kind},
};

use crate::{
    KERNEL_OFFSETS,
    args::{Args, entry_hook},
    mtu,
    packet::{AF_INET, IpPacket, ip_at, quoted_at, skb_packet},
    skb::{read_at, skb_netns_and_ifindex},
};

/// Where `skbaddr` is in the two net tracepoints' records, written by
/// userspace before loading (from tracefs).
#[unsafe(no_mangle)]
static NET_RECORDS: Global<NetRecords> = Global::new(NetRecords::UNSET);

#[map]
static IKE_EVENTS: PerCpuHashMap<IkeKey, u64> = PerCpuHashMap::with_max_entries(2048, 0);

/// The IKE datagram a socket is being given on this CPU: its key is taken
/// at the entry of `__udp_enqueue_schedule_skb` and counted at the exit if
/// the socket took it (by then a reader may have freed the skb). Receiving
/// runs in softirq, so nothing else enqueues on this CPU in between.
#[repr(C)]
struct Enqueueing {
    skb: u64,
    key: IkeKey,
}

#[map]
static IKE_ENQUEUEING: PerCpuArray<Enqueueing> = PerCpuArray::with_max_entries(1, 0);

// Sending: `ip_send_skb(net, skb)` and `ip6_send_skb(skb)` take every
// datagram a local UDP socket sends (and ICMP replies, raw sockets' and
// pings'), never a forwarded packet nor ESP.
entry_hook!("ip_send_skb", on_ip_send => ike_send_fentry, ike_send_kprobe);
entry_hook!("ip6_send_skb", on_ip6_send => ike_send6_fentry, ike_send6_kprobe);

// ICMP errors: `icmp_rcv(skb)` and `icmpv6_rcv(skb)` take the ICMP packets
// addressed to this host, whether or not a socket will hear of them.
entry_hook!("icmp_rcv", on_icmp_rcv => ike_icmp_fentry, ike_icmp_kprobe);
entry_hook!("icmpv6_rcv", on_icmp_rcv => ike_icmp6_fentry, ike_icmp6_kprobe);

fn on_ip_send(a: &impl Args) {
    unsafe { on_send(a.arg_u64(1)) };
}

fn on_ip6_send(a: &impl Args) {
    unsafe { on_send(a.arg_u64(0)) };
}

fn on_icmp_rcv(a: &impl Args) {
    let skb = a.arg_u64(0);
    if let Some(ip) = unsafe { skb_packet(skb) } {
        unsafe { icmp_error(skb, &ip) };
    }
}

// Receiving: `__udp_enqueue_schedule_skb(sk, skb)` queues a datagram on a
// local UDP socket (both families); ESP in UDP never gets there (the
// NAT-T socket's encap_rcv takes it before).

#[fentry(function = "__udp_enqueue_schedule_skb")]
pub fn ike_enqueue_fentry(ctx: FEntryContext) -> u32 {
    unsafe { enqueue_entry(ctx.arg_u64(1)) };
    0
}

/// Two arguments (checked against BTF before attaching): the return value
/// follows them.
#[fexit(function = "__udp_enqueue_schedule_skb")]
pub fn ike_enqueue_fexit(ctx: FExitContext) -> u32 {
    let (skb, ret): (u64, u64) = (ctx.arg(1), ctx.arg(2));
    enqueue_exit(Some(skb), ret as i32);
    0
}

#[kprobe]
pub fn ike_enqueue_kprobe(ctx: ProbeContext) -> u32 {
    unsafe { enqueue_entry(ctx.arg_u64(1)) };
    0
}

#[kretprobe]
pub fn ike_enqueue_kretprobe(ctx: RetProbeContext) -> u32 {
    let ret: u64 = ctx.ret();
    enqueue_exit(None, ret as i32);
    0
}

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

/// `ip_send_skb`/`ip6_send_skb`: a local socket hands an IKE datagram to
/// IP output (sent, unless this host drops it on the way: userspace takes
/// the outbound drops off). `skb->data` is the IP header there, whose
/// length field is not filled in yet: the skb's length is the packet's.
unsafe fn on_send(skb: u64) {
    let Some(mut ip) = (unsafe { skb_packet(skb) }) else {
        return;
    };
    let Ok(len) = (unsafe { read_at::<u32>(skb, KERNEL_OFFSETS.load().sk_buff_len) }) else {
        return;
    };
    ip.set_length(len);
    let Some(ports) = ike_ports(&ip) else {
        return;
    };
    let mut key = key(&ip, event::TO_IP_OUTPUT, true, ports);
    (key.netns, key.ifindex) = unsafe { skb_netns_and_ifindex(skb) };
    count(&key);
}

/// Entry of `__udp_enqueue_schedule_skb`: remembers an IKE datagram's key
/// (and forgets whatever was there: only the datagram being queued counts).
unsafe fn enqueue_entry(skb: u64) {
    let Some(slot) = IKE_ENQUEUEING.get_ptr_mut(0) else {
        return;
    };
    let slot = unsafe { &mut *slot };
    slot.skb = 0;
    let Some(ip) = (unsafe { skb_packet(skb) }) else {
        return;
    };
    let Some(ports) = ike_ports(&ip) else {
        return;
    };
    slot.key = key(&ip, event::DELIVERED, false, ports);
    (slot.key.netns, slot.key.ifindex) = unsafe { skb_netns_and_ifindex(skb) };
    slot.skb = skb;
}

/// Exit of `__udp_enqueue_schedule_skb` (`skb`: `None` from a kretprobe,
/// which cannot read arguments): counts the datagram if the socket took it
/// (0). A refused one is freed as a drop, which `on_drop` counts.
fn enqueue_exit(skb: Option<u64>, ret: i32) {
    let Some(slot) = IKE_ENQUEUEING.get_ptr_mut(0) else {
        return;
    };
    let slot = unsafe { &mut *slot };
    if slot.skb == 0 || skb.is_some_and(|skb| skb != slot.skb) {
        return;
    }
    slot.skb = 0;
    if ret == 0 {
        count(&slot.key);
    }
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

/// The transport protocol of the IP packet at `at`, from one short read:
/// the receive tracepoint sees every packet, and leaves at this first check
/// for all but UDP and ICMP (ESP among them).
#[inline(always)]
fn ip_protocol_at(at: u64) -> Option<u8> {
    let header: [u8; 10] = unsafe { bpf_probe_read_kernel(at as *const [u8; 10]) }.ok()?;
    match header[0] >> 4 {
        4 => Some(header[9]),
        6 => Some(header[6]),
        _ => None,
    }
}

/// `net:netif_receive_skb` (`skb->data` is the IP header there): an IKE
/// packet arrives, or an ICMP error about one of our IKE or ESP packets.
unsafe fn on_receive(skb: u64) {
    let data: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_data) }.unwrap_or(0);
    if data == 0 || !matches!(ip_protocol_at(data), Some(17 | 1 | 58)) {
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
