//! Network namespaces that go away during a run: their XFRM counters, read
//! by the kernel-side program as the namespace is torn down (the last moment
//! they exist), so a deleted namespace's increments are still reported.

use crate::attribution::MAX_COUNTERS;

/// Most CPUs whose counters are summed (more are counted in `cpus_missed`).
pub const MAX_CPUS: u32 = 1024;

/// One namespace's XFRM counters, summed over every CPU, at its teardown.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetnsExit {
    /// `net->ns.inum`: the inode userspace knew the namespace by.
    pub netns: u32,
    /// CPUs whose counters could not be read (0 when the sum is exact).
    pub cpus_missed: u32,
    /// By `LINUX_MIB_XFRM*` index, as in `/proc/net/xfrm_stat`.
    pub counters: [u64; MAX_COUNTERS],
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<NetnsExit>() == 328);
};

#[cfg(feature = "user")]
unsafe impl aya::Pod for NetnsExit {}
