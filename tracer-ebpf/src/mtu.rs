//! Oversize ESP (see `tracer_common::mtu`): where a packet of an SA meets
//! an MTU it does not fit, and what the SA carries.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{fentry, kprobe, map},
    maps::PerCpuHashMap,
    programs::{FEntryContext, ProbeContext},
};
use tracer_common::mtu::{MtuKey, MtuStats, kind};

use crate::{
    KERNEL_OFFSETS,
    args::{Args, entry_hook},
    packet::{IpPacket, skb_packet},
    skb::{read_at, skb_dst, skb_netns_and_ifindex},
};

#[map]
static MTU_EVENTS: PerCpuHashMap<MtuKey, MtuStats> = PerCpuHashMap::with_max_entries(4096, 0);

/// The SA of an IPsec bundle dst (0 if the dst is a plain route).
#[inline(always)]
unsafe fn dst_sa(dst: u64) -> u64 {
    if dst == 0 {
        return 0;
    }
    unsafe { read_at(dst, KERNEL_OFFSETS.load().dst_entry_xfrm) }.unwrap_or(0)
}

/// Fills SPI and SA destination from an SA pointer.
#[inline(always)]
unsafe fn key_from_sa(x: u64, key: &mut MtuKey) {
    let o = KERNEL_OFFSETS.load();
    key.spi = unsafe { read_at(x, o.xfrm_state_spi) }.unwrap_or(0);
    key.sa_dst = unsafe { read_at(x, o.xfrm_state_daddr) }.unwrap_or([0; 16]);
    key.family = unsafe { read_at::<u16>(x, o.xfrm_state_family) }.unwrap_or(0) as u8;
}

/// The device of a route (0 if none).
#[inline(always)]
unsafe fn dst_dev(dst: u64) -> u64 {
    if dst == 0 {
        return 0;
    }
    unsafe { read_at(dst, KERNEL_OFFSETS.load().dst_entry_dev) }.unwrap_or(0)
}

/// Whether `dev` is the interface of a route-based VPN: an XFRM interface
/// (`ip link add NAME type xfrm`) or a VTI (`type vti`, `type vti6`), by
/// the name of its link type.
#[inline(always)]
unsafe fn is_vpn_interface(dev: u64) -> bool {
    let o = KERNEL_OFFSETS.load();
    let ops: u64 = unsafe { read_at(dev, o.net_device_rtnl_link_ops) }.unwrap_or(0);
    if ops == 0 {
        return false;
    }
    let kind: u64 = unsafe { read_at(ops, o.rtnl_link_ops_kind) }.unwrap_or(0);
    if kind == 0 {
        return false;
    }
    let name: [u8; 5] = unsafe { bpf_probe_read_kernel(kind as *const [u8; 5]) }.unwrap_or([0; 5]);
    name == *b"xfrm\0" || name == *b"vti6\0" || [name[0], name[1], name[2], name[3]] == *b"vti\0"
}

/// Egress device of a dst: (ifindex, mtu).
#[inline(always)]
unsafe fn dst_device(dst: u64) -> (u32, u32) {
    let o = KERNEL_OFFSETS.load();
    let dev = unsafe { dst_dev(dst) };
    if dev == 0 {
        return (0, 0);
    }
    (
        unsafe { read_at(dev, o.net_device_ifindex) }.unwrap_or(0),
        unsafe { read_at(dev, o.net_device_mtu) }.unwrap_or(0),
    )
}

#[inline(always)]
pub(crate) fn record(key: &MtuKey, len: u32, mss: u32) {
    if let Some(stats) = MTU_EVENTS.get_ptr_mut(key) {
        // Per-CPU value: no other CPU writes it.
        let stats = unsafe { &mut *stats };
        stats.count += 1;
        if len > stats.max_len {
            stats.max_len = len;
        }
        if mss > stats.max_mss {
            stats.max_mss = mss;
        }
    } else {
        let stats = MtuStats {
            count: 1,
            max_len: len,
            max_mss: mss,
            gso_packets: 0,
        };
        let _ = MTU_EVENTS.insert(key, &stats, 0);
    }
}

/// `ip_do_fragment(net, sk, skb, output)`: an ESP packet is being
/// fragmented because it exceeds its route's MTU.
#[inline(always)]
fn on_fragment(a: &impl Args) {
    let skb = a.arg_u64(2);
    let Some(ip) = (unsafe { skb_packet(skb) }) else {
        return;
    };
    let Some((spi, _)) = ip.esp() else {
        return;
    };
    let (netns, _) = unsafe { skb_netns_and_ifindex(skb) };
    let (ifindex, mtu) = unsafe { dst_device(skb_dst(skb)) };
    let key = MtuKey {
        spi,
        netns,
        ifindex,
        mtu,
        kind: kind::FRAGMENTED,
        family: ip.family,
        sa_dst: ip.dst,
        ..MtuKey::default()
    };
    record(&key, ip.total_len, 0);
}
entry_hook!("ip_do_fragment", on_fragment => mtu_fragment_fentry, mtu_fragment_kprobe);
// ip6_fragment(net, sk, skb, output): the same arguments.
entry_hook!("ip6_fragment", on_fragment => mtu_fragment6_fentry, mtu_fragment6_kprobe);

/// `__icmp_send(skb_in, type, code, info, opt)`: "fragmentation needed"
/// for a packet routed into IPsec (inner MTU) or for an ESP packet (outer).
#[inline(always)]
fn on_icmp_send(a: &impl Args) {
    // `int` arguments: only the low 32 bits of the register are defined.
    let (skb, icmp_type, code) = (a.arg_u64(0), a.arg_u64(1) as u32, a.arg_u64(2) as u32);
    if icmp_type != 3 || code != 4 {
        return;
    }
    // `info` is the MTU in network order here.
    too_big(skb, u32::from_be(a.arg_u64(3) as u32));
}
entry_hook!("__icmp_send", on_icmp_send => mtu_icmp_fentry, mtu_icmp_kprobe);

/// `icmp6_send(skb, type, code, info, force_saddr, parm)`: "packet too
/// big" (type 2), IPv6's "fragmentation needed".
#[inline(always)]
fn on_icmp6_send(a: &impl Args) {
    let (skb, icmp_type) = (a.arg_u64(0), a.arg_u64(1) as u8);
    if icmp_type != 2 {
        return;
    }
    // `info` is the MTU in host order here.
    too_big(skb, a.arg_u64(3) as u32);
}
entry_hook!("icmp6_send", on_icmp6_send => mtu_icmp6_fentry, mtu_icmp6_kprobe);

/// A packet refused as too big for `mtu`: before encryption (its route
/// is an IPsec bundle: the IPsec MTU) or as an ESP packet (path MTU).
#[inline(always)]
fn too_big(skb: u64, mtu: u32) {
    let Some(ip) = (unsafe { skb_packet(skb) }) else {
        return;
    };
    let dst = unsafe { skb_dst(skb) };
    let x = unsafe { dst_sa(dst) };
    let (netns, _) = unsafe { skb_netns_and_ifindex(skb) };
    let mut key = MtuKey {
        netns,
        mtu,
        kind: kind::FRAG_NEEDED,
        ..MtuKey::default()
    };
    if x != 0 {
        unsafe { key_from_sa(x, &mut key) };
        key.inner_mtu = 1;
    } else if let Some((spi, _)) = ip.esp() {
        key.spi = spi;
        key.sa_dst = ip.dst;
        key.family = ip.family;
    } else if unsafe { is_vpn_interface(dst_dev(dst)) } {
        // The interface compares with its SA's MTU before the SA is on the
        // packet: userspace finds the SA from the interface (an XFRM
        // interface's if_id, a VTI's key and endpoints).
        key.via_vpn_interface = 1;
        key.inner_mtu = 1;
    } else {
        return;
    }
    key.ifindex = unsafe { dst_device(dst) }.0;
    // A GSO packet is refused for its segments: that is their size.
    let (len, _, _) = unsafe { inner_size(skb, &ip) };
    record(&key, len, 0);
}

/// `xfrm_local_error(skb, mtu)`: a local socket is told EMSGSIZE.
#[inline(always)]
fn on_local_error(a: &impl Args) {
    let skb = a.arg_u64(0);
    let x = unsafe { dst_sa(skb_dst(skb)) };
    if x == 0 {
        return;
    }
    let (netns, _) = unsafe { skb_netns_and_ifindex(skb) };
    let mut key = MtuKey {
        netns,
        mtu: a.arg_u64(1) as u32,
        kind: kind::LOCAL_EMSGSIZE,
        inner_mtu: 1,
        ..MtuKey::default()
    };
    unsafe { key_from_sa(x, &mut key) };
    let len = unsafe { skb_packet(skb) }.map_or(0, |ip| ip.total_len);
    record(&key, len, 0);
}
entry_hook!("xfrm_local_error", on_local_error => mtu_local_error_fentry, mtu_local_error_kprobe);

/// `__skb_gso_segment(skb, features, tx_path)`: a GSO packet routed into
/// IPsec is cut into its segments before encryption (only GSO packets
/// come here, so a non-GSO IPsec packet costs nothing). Per SA: how many,
/// and the largest segment.
#[inline(always)]
fn on_gso_segment(a: &impl Args) {
    let skb = a.arg_u64(0);
    let x = unsafe { dst_sa(skb_dst(skb)) };
    if x == 0 {
        return;
    }
    let Some(ip) = (unsafe { skb_packet(skb) }) else {
        return;
    };
    let (len, _, gso) = unsafe { inner_size(skb, &ip) };
    if !gso {
        return;
    }
    let (netns, _) = unsafe { skb_netns_and_ifindex(skb) };
    let mut key = MtuKey {
        netns,
        kind: kind::GSO_SEGMENTED,
        ..MtuKey::default()
    };
    unsafe { key_from_sa(x, &mut key) };
    record(&key, len, 0);
}
entry_hook!("__skb_gso_segment", on_gso_segment => mtu_gso_fentry, mtu_gso_kprobe);

/// Size of the packet (of one segment for GSO), the MSS of a SYN, and
/// whether it is GSO.
#[inline(always)]
unsafe fn inner_size(skb: u64, ip: &IpPacket) -> (u32, u32, bool) {
    let o = KERNEL_OFFSETS.load();
    let head: u64 = unsafe { read_at(skb, o.sk_buff_head) }.unwrap_or(0);
    let end: u32 = unsafe { read_at(skb, o.sk_buff_end) }.unwrap_or(0);
    let gso_size: u16 = if head != 0 && end != 0 {
        unsafe { read_at(head + u64::from(end), o.skb_shared_info_gso_size) }.unwrap_or(0)
    } else {
        0
    };
    // A segment: the headers, then gso_size bytes of payload.
    let (transport_len, mss) = match ip.tcp() {
        Some((header_len, _, mss)) => (header_len, mss),
        None => (8, 0),
    };
    let len = if gso_size > 0 {
        ip.header_len + transport_len + u32::from(gso_size)
    } else {
        ip.total_len
    };
    (len, mss, gso_size > 0)
}
