//! Oversize ESP: packets of an SA that did not fit the path MTU, and the
//! GSO packets each SA carried (what every SA carried comes from its own
//! counters, read by userspace).

/// What happened to a packet (the `kind` of an `MtuKey`).
pub mod kind {
    /// ESP packet fragmented after encryption (`ip_do_fragment`).
    pub const FRAGMENTED: u8 = 1;
    /// ICMP "fragmentation needed" sent for it (`__icmp_send`): refused
    /// with DF set, before encryption (bundle MTU) or after (path MTU).
    pub const FRAG_NEEDED: u8 = 2;
    /// A local sender got EMSGSIZE from the IPsec size check
    /// (`xfrm_local_error`).
    pub const LOCAL_EMSGSIZE: u8 = 3;
    /// A GSO packet cut into its segments before encryption
    /// (`__skb_gso_segment` with an SA on its route): the largest segment.
    pub const GSO_SEGMENTED: u8 = 4;
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" received from
    /// the path for an ESP packet we sent (`net:netif_receive_skb`).
    pub const FRAG_NEEDED_RECEIVED: u8 = 5;
}

/// Per (event, SA, netns, MTU): counted exactly in per-CPU maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MtuKey {
    /// SA destination (IPv4 in the first 4 bytes; zero if unknown).
    pub sa_dst: [u8; 16],
    /// Network byte order; 0 if unknown.
    pub spi: u32,
    pub netns: u32,
    /// Egress interface (0 if unknown).
    pub ifindex: u32,
    /// The MTU the packet was judged against (0 for `GSO_SEGMENTED`).
    pub mtu: u32,
    pub kind: u8,
    /// 1: `mtu` is the inner (IPsec bundle) MTU; 0: the outer path MTU.
    pub inner_mtu: u8,
    /// 10 for an IPv6 `sa_dst`; 0 or 2 for IPv4.
    pub family: u8,
    /// 1: refused by the interface of a route-based VPN (an XFRM interface
    /// or a VTI) before its SA was on the packet: `ifindex` is the
    /// interface, `spi` and `sa_dst` are 0.
    pub via_vpn_interface: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MtuStats {
    pub count: u64,
    /// Largest packet (for GSO packets: the largest segment).
    pub max_len: u32,
    /// Unused (0): the TCP MSS of SYNs was read by a per-packet hook.
    pub max_mss: u32,
    /// Unused (0): GSO packets are the `count` of `GSO_SEGMENTED`.
    pub gso_packets: u64,
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<MtuKey>() == 36);
    assert!(size_of::<MtuStats>() == 24);
};

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::MtuKey {}
    unsafe impl aya::Pod for super::MtuStats {}
}
