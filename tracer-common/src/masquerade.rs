//! Packets SNATed before the IPsec policy lookup (the MASQUERADE pitfall,
//! docs/kernel.md §2).
//!
//! `xfrm4_output`/`xfrm6_output` (the `output` of every IPsec bundle) run
//! POSTROUTING with `__xfrm4_output`/`__xfrm6_output` as its okfn. If NAT in
//! POSTROUTING changed the source, `nf_xfrm_me_harder` re-does the policy
//! lookup; when the new source matches no policy the bundle is replaced by
//! the plain route and the okfn finds `skb_dst(skb)->xfrm == NULL`: the
//! packet leaves unencrypted. The eBPF side remembers each skb at the first
//! hook (pre-NAT header, the bundle's SA and policy) in a per-CPU slot and
//! counts it at the second when its route lost the bundle.

/// Capacity of the per-CPU leak table; leaks whose key does not fit are
/// counted in `MASQ_ERRORS[error::TABLE_FULL]`.
pub const LEAK_TABLE_ENTRIES: u32 = 4096;

/// An skb that entered POSTROUTING with a bundle: its header before NAT,
/// and the bundle's SA and policy, read only if the okfn finds it leaked.
/// Addresses: IPv4 in the first 4 bytes; network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// The skb's address: which packet the slot is about.
    pub skb: u64,
    /// `struct xfrm_state *` of the bundle (`dst->xfrm`).
    pub state: u64,
    /// `struct xfrm_policy *` of the bundle (`xfrm_dst.pols[0]`), 0 = none.
    pub policy: u64,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Family of the inner packet (AF_INET 2, AF_INET6 10).
    pub family: u16,
    pub proto: u8,
    /// 1 if the skb belongs to a local socket (locally generated).
    pub local: u8,
    pub _pad: [u8; 4],
}

/// Skbs a CPU is between the two hooks with. POSTROUTING runs its okfn
/// synchronously, so an skb's slot is on the CPU that filled it; a few
/// slots, taken in turn, leave room for a softirq's packet arriving while
/// a local send is between its hooks. A per-CPU array instead of a hash
/// map: no insert and no delete per IPsec packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entered {
    pub slots: [Seen; ENTERED_SLOTS],
    /// The slot to fill next.
    pub next: u32,
    pub _pad: u32,
}

pub const ENTERED_SLOTS: usize = 4;

/// One row of the leak table: a pre-NAT flow that POSTROUTING NAT re-routed
/// out of its IPsec bundle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeakKey {
    /// Addresses before NAT (as the policy lookup saw them); zero if the
    /// skb was not seen entering POSTROUTING.
    pub pre_src: [u8; 16],
    pub pre_dst: [u8; 16],
    /// Addresses after NAT, as the packet leaves.
    pub post_src: [u8; 16],
    pub post_dst: [u8; 16],
    pub sa_daddr: [u8; 16],
    pub spi: u32,
    pub reqid: u32,
    pub policy_index: u32,
    /// Inode of the netns (`net->ns.inum`) of the egress device.
    pub netns: u32,
    /// Egress interface of the plain route the packet got instead.
    pub ifindex: u32,
    pub family: u16,
    pub sa_family: u16,
    pub proto: u8,
    pub local: u8,
    /// 1 if the skb was seen entering POSTROUTING with its bundle.
    pub seen: u8,
    pub _pad: [u8; 5],
}

/// Counts of a leak row (per CPU; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeakCount {
    /// Packets whose route lost its bundle in POSTROUTING.
    pub packets: u64,
    pub bytes: u64,
    /// Of those, handed on by `dst_output` (okfn returned 0): sent in clear.
    pub sent: u64,
    /// Of those, `dst_output` returned an error: dropped after the re-route.
    pub failed: u64,
}

/// Key of the policy selector table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub netns: u32,
    pub index: u32,
}

/// A policy's selector as the kernel has it (`xfrm_policy.selector`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub family: u16,
    pub prefixlen_s: u8,
    pub prefixlen_d: u8,
    pub proto: u8,
    pub _pad: [u8; 3],
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
    /// A re-routed skb was not seen entering POSTROUTING (counted anyway,
    /// without its pre-NAT flow, SA and policy).
    pub const UNSEEN: u32 = 1;
    /// Leak samples not sent (rate limit or full ring buffer).
    pub const SAMPLES_LOST: u32 = 2;
    pub const COUNT: u32 = 3;
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Seen>() == 64);
    assert!(size_of::<Entered>() == 264);
    assert!(size_of::<LeakKey>() == 112);
    assert!(size_of::<LeakCount>() == 32);
    assert!(size_of::<PolicyKey>() == 8);
    assert!(size_of::<Selector>() == 40);
    assert!(size_of::<LeakSample>() == 256);
};

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Seen {}
    unsafe impl aya::Pod for super::Entered {}
    unsafe impl aya::Pod for super::LeakKey {}
    unsafe impl aya::Pod for super::LeakCount {}
    unsafe impl aya::Pod for super::PolicyKey {}
    unsafe impl aya::Pod for super::Selector {}
    unsafe impl aya::Pod for super::LeakSample {}
}
