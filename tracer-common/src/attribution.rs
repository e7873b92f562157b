//! Attributing XFRM counter increments to packets.
//!
//! The kernel bumps `/proc/net/xfrm_stat` counters with an inlined per-CPU
//! increment inside a few large functions (the "brackets"). At entry of a
//! bracket the eBPF side snapshots this CPU's counters of the packet's netns
//! and what it knows of the packet; at exit it diffs them: whatever moved in
//! between (minus what nested brackets already claimed) belongs to this
//! packet and this function.

use crate::capture::Headers;

/// Upper bound of `__LINUX_MIB_XFRMMAX` (29 in 6.1, 33 in 6.18).
pub const MAX_COUNTERS: usize = 40;
/// Nesting of brackets on one CPU (output inside lookup inside softirq...).
pub const MAX_DEPTH: usize = 6;

/// The bracket functions.
pub mod hook {
    pub const XFRM_INPUT: u32 = 1;
    pub const POLICY_CHECK: u32 = 2;
    pub const ROUTE_FORWARD: u32 = 3;
    pub const LOOKUP: u32 = 4;
    pub const OUTPUT: u32 = 5;
    pub const OUTPUT_RESUME: u32 = 6;
}

/// Direction, as XFRM policies have it.
pub mod dir {
    pub const IN: u8 = 0;
    pub const OUT: u8 = 1;
    pub const FWD: u8 = 2;
}

/// What is known of the packet behind an increment. IPv4 addresses use the
/// first 4 bytes. Ports, SPI are in network byte order as in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub spi: u32,
    pub reqid: u32,
    /// XFRM policy index (0 = no policy found).
    pub policy_index: u32,
    pub netns: u32,
    pub ifindex: u32,
    /// AF_INET (2) or AF_INET6 (10); 0 if unknown.
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
}

/// One open bracket on a CPU. The 8-byte members come first: the rest
/// then fills the size exactly, without padding.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Frame {
    /// The first argument (skb or net): checked at exit to catch frames
    /// that do not belong together (a skipped entry, a migrated task).
    pub token: u64,
    /// A route lookup's `dst_orig` (its family names the flow's).
    pub dst_orig: u64,
    /// Address of this CPU's counter array of the packet's netns (0 = none).
    pub mib: u64,
    pub before: [u64; MAX_COUNTERS],
    /// Increments already claimed by brackets nested in this one.
    pub nested: [u64; MAX_COUNTERS],
    pub hook: u32,
    /// ESP sequence number of the packet (network order; 0 if none).
    pub seq: u32,
    /// 1 while the flow and headers are still to be read from the packet
    /// (done at exit, only when a counter moved: the packet is unchanged
    /// by these brackets and still alive at their exit).
    pub flow_pending: u32,
    pub flow: Flow,
    pub headers: Headers,
}

/// The per-CPU stack of open brackets.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FrameStack {
    pub depth: u32,
    pub _pad: u32,
    pub frames: [Frame; MAX_DEPTH],
}

/// Key of the attribution table; its value is the number of increments.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// Counter index (`LINUX_MIB_XFRM*` value).
    pub counter: u32,
    pub hook: u32,
    pub flow: Flow,
}

/// One attributed increment, sent to userspace through a ring buffer
/// (rate-limited: the counts in `SourceKey` stay exact regardless).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub time_ns: u64,
    pub counter: u32,
    pub hook: u32,
    /// Kernel stack in the `STACKS` map (negative: none).
    pub stack_id: i64,
    /// Increments in this bracket (usually 1).
    pub count: u64,
    pub flow: Flow,
    /// ESP sequence number (network order; 0 if none).
    pub seq: u32,
    /// The packet's first bytes: copied when the bracket opened for the
    /// brackets that transform it, at exit for the others (none for a
    /// route lookup: no packet exists yet).
    pub headers: Headers,
}

/// Indexes into the `ATTRIBUTION_ERRORS` per-CPU array.
pub mod error {
    /// Exit without a matching entry (skipped program, migration).
    pub const UNBALANCED: u32 = 0;
    /// Brackets nested deeper than `MAX_DEPTH`.
    pub const TOO_DEEP: u32 = 1;
    /// The attribution table was full.
    pub const TABLE_FULL: u32 = 2;
    /// Samples not sent (rate limit or full ring buffer).
    pub const SAMPLES_LOST: u32 = 3;
    pub const COUNT: u32 = 4;
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Flow>() == 60);
    assert!(size_of::<Frame>() == 872);
    assert!(size_of::<FrameStack>() == 5240);
    assert!(size_of::<SourceKey>() == 68);
    assert!(size_of::<Sample>() == 232);
};

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::Sample {}
}
