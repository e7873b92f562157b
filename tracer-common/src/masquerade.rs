//! Packets SNATed before the IPsec policy lookup (the MASQUERADE pitfall,
//! docs/kernel.md §2).
//!
//! `xfrm4_output`/`xfrm6_output` (the `output` of every IPsec bundle) run
//! POSTROUTING with `__xfrm4_output`/`__xfrm6_output` as its okfn. If NAT in
//! POSTROUTING changed the source, `nf_xfrm_me_harder` re-does the policy
//! lookup; when the new source matches no policy the bundle is replaced by
//! the plain route and the okfn finds `skb_dst(skb)->xfrm == NULL`: the
//! packet leaves unencrypted. The eBPF side counts it there, with the flow
//! before NAT from its conntrack entry; userspace finds the policy and SA
//! that flow matched.

/// Capacity of the per-CPU leak table; leaks whose key does not fit are
/// counted in `MASQ_ERRORS[error::TABLE_FULL]`.
pub const LEAK_TABLE_ENTRIES: u32 = 4096;

/// One row of the leak table: a pre-NAT flow that POSTROUTING NAT re-routed
/// out of its IPsec bundle. Addresses: IPv4 in the first 4 bytes, network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeakKey {
    /// The flow as the policy lookup saw it (before SNAT, after any DNAT),
    /// from conntrack; zero if the packet had no conntrack entry.
    pub pre_src: [u8; 16],
    pub pre_dst: [u8; 16],
    /// Addresses after NAT, as the packet leaves.
    pub post_src: [u8; 16],
    pub post_dst: [u8; 16],
    /// Inode of the netns (`net->ns.inum`) of the egress device.
    pub netns: u32,
    /// Egress interface of the plain route the packet got instead.
    pub ifindex: u32,
    pub family: u16,
    pub proto: u8,
    pub local: u8,
    /// 1 if the pre-NAT flow is known (from conntrack).
    pub seen: u8,
    pub _pad: [u8; 3],
}

/// The leak a CPU is handing to `dst_output`: a drop of `skb` on `dev`
/// (its egress device) before the next leak is that leak's drop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leaving {
    pub skb: u64,
    pub dev: u64,
    pub key: LeakKey,
}

/// Counts of a leak row (per CPU; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakCount {
    /// Packets whose route lost its bundle in POSTROUTING.
    pub packets: u64,
    pub bytes: u64,
    /// Unused by the kernel side: userspace fills it in (`packets - failed`).
    pub sent: u64,
    /// Of those, dropped on their egress device (seen at `skb:kfree_skb`).
    pub failed: u64,
}

/// A sampled leak: the packet as it leaves in clear (after NAT).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LeakSample {
    pub time_ns: u64,
    pub key: LeakKey,
    pub headers: crate::capture::Headers,
}

/// Indexes into the `MASQ_ERRORS` per-CPU array.
pub mod error {
    /// The leak table was full.
    pub const TABLE_FULL: u32 = 0;
    /// A re-routed skb without a conntrack entry, or a kernel whose BTF
    /// lacks conntrack's structs (counted anyway, without its pre-NAT flow,
    /// SA and policy).
    pub const UNSEEN: u32 = 1;
    /// Leak samples not sent (rate limit or full ring buffer).
    pub const SAMPLES_LOST: u32 = 2;
    pub const COUNT: u32 = 3;
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<LeakKey>() == 80);
    assert!(size_of::<Leaving>() == 96);
    assert!(size_of::<LeakCount>() == 32);
    assert!(size_of::<LeakSample>() == 224);
};

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::LeakKey {}
    unsafe impl aya::Pod for super::Leaving {}
    unsafe impl aya::Pod for super::LeakCount {}
    unsafe impl aya::Pod for super::LeakSample {}
}
