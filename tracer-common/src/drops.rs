//! Packet drops seen at `skb:kfree_skb`, aggregated in the kernel.

/// Capacity of the per-CPU drop table; drops of keys that do not fit are
/// counted in `DROPS_UNTRACKED` so no drop goes unseen.
pub const DROP_TABLE_ENTRIES: u32 = 8192;

/// One row of the in-kernel drop table: what was dropped, where, and why.
/// The value is the number of drops (a per-CPU `u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    /// Return address of the freeing call: the kernel function that dropped.
    pub location: u64,
    /// Inode number of the packet's network namespace (0 = unknown).
    pub netns: u32,
    /// `enum skb_drop_reason` value (0 where the kernel has no reasons).
    pub reason: u32,
    /// Interface index of `skb->dev` (0 = none).
    pub ifindex: u32,
    /// EtherType in host order (the tracepoint stores `ntohs(skb->protocol)`).
    pub protocol: u16,
    pub _pad: u16,
}

/// A sampled drop with the packet's first bytes (see `capture::DropSampling`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DropSample {
    pub time_ns: u64,
    pub key: DropKey,
    pub headers: crate::capture::Headers,
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<DropKey>() == 24);
    assert!(size_of::<DropSample>() == 168);
};

#[cfg(feature = "user")]
unsafe impl aya::Pod for DropKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for DropSample {}
