//! The IKE path watch: IKE packets (UDP 500, and 4500 with the non-ESP
//! marker) sent, received and dropped per local address and peer, and the
//! ICMP errors a peer returns for them, counted exactly in per-CPU maps.
//! Sent and received are counted at the interfaces (`SENT`, `RECEIVED`)
//! where only tracepoints attach, else at the sockets (`TO_IP_OUTPUT`,
//! `DELIVERED`), which userspace completes with the drops.

/// What happened to an IKE packet (the `event` of an `IkeKey`).
pub mod event {
    /// Left through an interface (`net:net_dev_queue`) from a local socket.
    pub const SENT: u8 = 1;
    /// Arrived on an interface (`net:netif_receive_skb`).
    pub const RECEIVED: u8 = 2;
    /// Freed as a drop in this host (`skb:kfree_skb`): a firewall rule, no
    /// listening socket, ...; `location` and `reason` say where and why.
    pub const DROPPED: u8 = 3;
    /// The peer answered with ICMP "port unreachable": nothing listens
    /// for IKE there.
    pub const PORT_UNREACHABLE: u8 = 4;
    /// Handed to IP output by a local socket (`ip_send_skb`,
    /// `ip6_send_skb`): sent, unless dropped in this host on the way out.
    pub const TO_IP_OUTPUT: u8 = 5;
    /// Queued on a local socket (`__udp_enqueue_schedule_skb`).
    pub const DELIVERED: u8 = 6;
}

/// Per (event, local address and port, peer address and port, netns,
/// interface, drop site). `local`/`peer` are IPv4 in their first 4 bytes
/// for `family` 2, IPv6 for 10.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IkeKey {
    pub local: [u8; 16],
    pub peer: [u8; 16],
    /// `DROPPED`: the kernel function that freed it (return address).
    pub location: u64,
    pub netns: u32,
    pub ifindex: u32,
    /// `DROPPED`: `enum skb_drop_reason` (0 before 5.17).
    pub reason: u32,
    /// Host order.
    pub local_port: u16,
    pub peer_port: u16,
    pub family: u8,
    pub event: u8,
    /// 1: the dropped packet was on its way out (it had a local socket).
    pub outbound: u8,
    pub _pad: u8,
    pub _pad2: u32,
}

/// Field offsets of the `net:net_dev_queue` and `net:netif_receive_skb`
/// records (from tracefs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetRecords {
    pub dev_queue_skbaddr: u32,
    pub receive_skbaddr: u32,
}

impl NetRecords {
    pub const UNSET: Self = Self {
        dev_queue_skbaddr: crate::layout::ABSENT,
        receive_skbaddr: crate::layout::ABSENT,
    };
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<IkeKey>() == 64);
    assert!(size_of::<NetRecords>() == 8);
};

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::IkeKey {}
    unsafe impl aya::Pod for super::NetRecords {}
}
