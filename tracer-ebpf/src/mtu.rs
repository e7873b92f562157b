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
    Args, KERNEL_OFFSETS,
    attribution::{skb_dst, skb_netns_and_ifindex},
    read_at,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[map]
static MTU_EVENTS: PerCpuHashMap<MtuKey, MtuStats> = PerCpuHashMap::with_max_entries(4096, 0);

/// The fentry and kprobe form of one entry hook.
macro_rules! entry_hook {
    ($function:tt, $handler:ident => $fentry:ident, $kprobe:ident) => {
        #[fentry(function = $function)]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            $handler(&ctx);
            0
        }

        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            $handler(&ctx);
            0
        }
    };
}

/// What the IP header of an skb says: total length, protocol, and the
/// ESP SPI (plain or in UDP 4500) with the destination, if it is ESP.
struct Ip {
    family: u8,
    len: u32,
    proto: u8,
    /// Offset of the transport header from the IP header.
    header_len: u64,
    ip: u64,
    esp_spi: u32,
    dst: [u8; 16],
}

/// The skb's IPv4 or IPv6 header (IPv6 extension headers are not
/// followed: ESP and the inner TCP/UDP come right after the fixed header
/// in the packets this looks at).
#[inline(always)]
unsafe fn ip(skb: u64) -> Option<Ip> {
    let o = KERNEL_OFFSETS.load();
    let head: u64 = unsafe { read_at(skb, o.sk_buff_head) }.ok()?;
    let network: u16 = unsafe { read_at(skb, o.sk_buff_network_header) }.ok()?;
    let ip = head + u64::from(network);
    let first: u8 = unsafe { bpf_probe_read_kernel(ip as *const u8) }.ok()?;
    let mut dst = [0u8; 16];
    let (family, header_len, len, proto) = match first >> 4 {
        4 => {
            let v4: [u8; 4] = unsafe { bpf_probe_read_kernel((ip + 16) as *const [u8; 4]) }.ok()?;
            dst[..4].copy_from_slice(&v4);
            let len = u16::from_be(unsafe { bpf_probe_read_kernel((ip + 2) as *const u16) }.ok()?);
            let proto: u8 = unsafe { bpf_probe_read_kernel((ip + 9) as *const u8) }.ok()?;
            (AF_INET, u64::from(first & 0x0f) * 4, u32::from(len), proto)
        }
        6 => {
            dst = unsafe { bpf_probe_read_kernel((ip + 24) as *const [u8; 16]) }.ok()?;
            let payload =
                u16::from_be(unsafe { bpf_probe_read_kernel((ip + 4) as *const u16) }.ok()?);
            let proto: u8 = unsafe { bpf_probe_read_kernel((ip + 6) as *const u8) }.ok()?;
            (AF_INET6, 40, 40 + u32::from(payload), proto)
        }
        _ => return None,
    };
    let transport = ip + header_len;
    let esp_spi = match proto {
        50 => unsafe { bpf_probe_read_kernel(transport as *const u32) }.unwrap_or(0),
        17 => {
            let dport: u16 =
                unsafe { bpf_probe_read_kernel((transport + 2) as *const u16) }.unwrap_or(0);
            if u16::from_be(dport) == 4500 {
                // SPI 0 here is the non-ESP marker of IKE on 4500.
                unsafe { bpf_probe_read_kernel((transport + 8) as *const u32) }.unwrap_or(0)
            } else {
                0
            }
        }
        _ => 0,
    };
    Some(Ip {
        family,
        len,
        proto,
        header_len,
        ip,
        esp_spi,
        dst,
    })
}

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

/// Egress device of a dst: (ifindex, mtu).
#[inline(always)]
unsafe fn dst_device(dst: u64) -> (u32, u32) {
    let o = KERNEL_OFFSETS.load();
    if dst == 0 {
        return (0, 0);
    }
    let dev: u64 = unsafe { read_at(dst, o.dst_entry_dev) }.unwrap_or(0);
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
    record_packet(key, len, mss, 0);
}

#[inline(always)]
fn record_packet(key: &MtuKey, len: u32, mss: u32, gso: u64) {
    if let Some(stats) = MTU_EVENTS.get_ptr_mut(key) {
        // Per-CPU value: no other CPU writes it.
        let stats = unsafe { &mut *stats };
        stats.count += 1;
        stats.gso_packets += gso;
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
            gso_packets: gso,
        };
        let _ = MTU_EVENTS.insert(key, &stats, 0);
    }
}

/// `ip_do_fragment(net, sk, skb, output)`: an ESP packet is being
/// fragmented because it exceeds its route's MTU.
#[inline(always)]
fn on_fragment(a: &impl Args) {
    let skb = a.arg_u64(2);
    let Some(ip) = (unsafe { ip(skb) }) else {
        return;
    };
    if ip.esp_spi == 0 {
        return;
    }
    let (netns, _) = unsafe { skb_netns_and_ifindex(skb) };
    let (ifindex, mtu) = unsafe { dst_device(skb_dst(skb)) };
    let key = MtuKey {
        spi: ip.esp_spi,
        netns,
        ifindex,
        mtu,
        kind: kind::FRAGMENTED,
        family: ip.family,
        sa_dst: ip.dst,
        ..MtuKey::default()
    };
    record(&key, ip.len, 0);
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
    let Some(ip) = (unsafe { ip(skb) }) else {
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
    } else if ip.esp_spi != 0 {
        key.spi = ip.esp_spi;
        key.sa_dst = ip.dst;
        key.family = ip.family;
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
    let len = unsafe { ip(skb) }.map_or(0, |ip| ip.len);
    record(&key, len, 0);
}
entry_hook!("xfrm_local_error", on_local_error => mtu_local_error_fentry, mtu_local_error_kprobe);

/// `xfrm_output(sk, skb)`: the inner packet (for GSO, its segments) and
/// the MSS a TCP SYN announces, per SA.
#[inline(always)]
fn on_output(a: &impl Args) {
    let skb = a.arg_u64(1);
    let x = unsafe { dst_sa(skb_dst(skb)) };
    let Some(ip) = (unsafe { ip(skb) }) else {
        return;
    };
    if x == 0 {
        return;
    }
    let (netns, _) = unsafe { skb_netns_and_ifindex(skb) };
    let mut key = MtuKey {
        netns,
        kind: kind::INNER,
        ..MtuKey::default()
    };
    unsafe { key_from_sa(x, &mut key) };
    let (len, mss, gso) = unsafe { inner_size(skb, &ip) };
    record_packet(&key, len, mss, u64::from(gso));
}
entry_hook!("xfrm_output", on_output => mtu_output_fentry, mtu_output_kprobe);

/// Size of the packet (of one segment for GSO), the MSS of a SYN (its
/// first option, where Linux and most stacks put it), and whether it is GSO.
#[inline(always)]
unsafe fn inner_size(skb: u64, ip: &Ip) -> (u32, u32, bool) {
    let o = KERNEL_OFFSETS.load();
    let head: u64 = unsafe { read_at(skb, o.sk_buff_head) }.unwrap_or(0);
    let end: u32 = unsafe { read_at(skb, o.sk_buff_end) }.unwrap_or(0);
    let gso_size: u16 = if head != 0 && end != 0 {
        unsafe { read_at(head + u64::from(end), o.skb_shared_info_gso_size) }.unwrap_or(0)
    } else {
        0
    };
    if ip.proto != 6 {
        let len = if gso_size > 0 {
            ip.header_len as u32 + 8 + u32::from(gso_size)
        } else {
            ip.len
        };
        return (len, 0, gso_size > 0);
    }
    let tcp = ip.ip + ip.header_len;
    let flags_word: [u8; 2] =
        unsafe { bpf_probe_read_kernel((tcp + 12) as *const [u8; 2]) }.unwrap_or([0; 2]);
    let tcp_len = u32::from(flags_word[0] >> 4) * 4;
    let len = if gso_size > 0 {
        ip.header_len as u32 + tcp_len + u32::from(gso_size)
    } else {
        ip.len
    };
    let syn = flags_word[1] & 0x02 != 0;
    let mut mss = 0;
    if syn && tcp_len >= 24 {
        let option: [u8; 4] =
            unsafe { bpf_probe_read_kernel((tcp + 20) as *const [u8; 4]) }.unwrap_or([0; 4]);
        if option[0] == 2 && option[1] == 4 {
            mss = u32::from(u16::from_be_bytes([option[2], option[3]]));
        }
    }
    (len, mss, gso_size > 0)
}
