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

/// Diff at the drop (`docs/drop-diff.md`): instead of bracketing every
/// packet, a per-CPU, per-netns shadow of the counters is compared when a
/// packet is freed as a drop (and at the exit of the few functions whose
/// increments no drop follows). The stage that bumps a counter is its
/// class; each place that claims takes only the classes it can own.
pub mod class {
    /// Only `xfrm_input`'s SA processing bumps it.
    pub const IN_SA: u8 = 1;
    /// Only the inbound policy check bumps it.
    pub const IN_POLICY: u8 = 2;
    /// Bumped by `xfrm_input` or the inbound policy check (InHdrError,
    /// InBufferError, InStateMismatch): the drop's location tells which.
    pub const IN_EITHER: u8 = 4;
    /// The outbound policy and bundle lookup.
    pub const OUT_LOOKUP: u8 = 8;
    /// `__xfrm_route_forward` itself (XfrmFwdHdrError).
    pub const OUT_FORWARD: u8 = 16;
    /// The transformation (`xfrm_output`, `xfrm_output_one`, completions).
    pub const OUT_XFORM: u8 = 32;
    /// What a drop elsewhere than inside XFRM may claim (a policy-check
    /// caller, the forwarding path, a netfilter re-route, a tunnel device).
    pub const AT_CALLERS: u8 = IN_POLICY | IN_EITHER | OUT_LOOKUP | OUT_FORWARD;
    pub const ALL_IN: u8 = IN_SA | IN_POLICY | IN_EITHER;
}

/// Where a drop happened, as far as claiming goes.
pub mod site {
    /// Anywhere not listed below.
    pub const OTHER: u32 = 0;
    /// Inside `xfrm_input`.
    pub const INPUT: u32 = 1;
    /// Inside `xfrm_output` itself.
    pub const OUTPUT: u32 = 2;
    /// Inside `xfrm_output_resume` (and `xfrm_output_one` where it is out
    /// of line), the ESP output completion, the offload transmit.
    pub const OUTPUT_RESUME: u32 = 3;
    /// Inside `ip_forward`/`ip6_forward`: a FWD policy check or
    /// `__xfrm_route_forward` refused the packet.
    pub const FORWARD: u32 = 4;
}

/// A kernel function's text, with the site a drop inside it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteRange {
    pub start: u64,
    pub end: u64,
    pub site: u32,
    pub _pad: u32,
}

/// Functions whose drops are told apart (a few per kernel).
pub const MAX_SITES: usize = 16;

/// What userspace resolves at start: where drops are, and each counter's
/// class (`class::*` by counter index; 0 = never claimed). The programs
/// claim nothing until `armed` is 1: the shadows must first hold every
/// CPU's counters as they were at the start.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ClaimTables {
    pub sites: [SiteRange; MAX_SITES],
    pub classes: [u8; MAX_COUNTERS],
    pub armed: u32,
    pub _pad: u32,
}

impl ClaimTables {
    pub const EMPTY: Self = Self {
        sites: [SiteRange {
            start: 0,
            end: 0,
            site: 0,
            _pad: 0,
        }; MAX_SITES],
        classes: [0; MAX_COUNTERS],
        armed: 0,
        _pad: 0,
    };
}

/// The counters of one netns on one CPU as last claimed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Shadow {
    pub values: [u64; MAX_COUNTERS],
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
    /// The shadow table was full: a netns's increments went unclaimed.
    pub const SHADOWS_FULL: u32 = 4;
    pub const COUNT: u32 = 5;
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
    assert!(size_of::<SiteRange>() == 24);
    assert!(size_of::<ClaimTables>() == 24 * MAX_SITES + MAX_COUNTERS + 8);
    assert!(size_of::<Shadow>() == 8 * MAX_COUNTERS);
};

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::Sample {}
    unsafe impl aya::Pod for super::ClaimTables {}
    unsafe impl aya::Pod for super::Shadow {}
}
