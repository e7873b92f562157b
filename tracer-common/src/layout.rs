//! Offsets that the eBPF programs need, resolved by userspace at load time
//! from the running kernel's BTF and tracefs, never from one kernel's headers.

/// Marks an offset the running kernel does not have.
pub const ABSENT: u32 = u32::MAX;

/// Field offsets inside the `skb:kfree_skb` tracepoint record (from its
/// tracefs `format` file; the record changed in 5.17 and again in 6.11).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KfreeSkbRecord {
    pub skbaddr: u32,
    pub location: u32,
    pub protocol: u32,
    /// `ABSENT` before 5.17 (no drop reasons).
    pub reason: u32,
}

/// Byte offsets of kernel struct members (from BTF).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sk_buff_dev: u32,
    pub sk_buff_sk: u32,
    pub net_device_ifindex: u32,
    pub net_device_nd_net: u32,
    pub sock_net: u32,
    pub net_ns_inum: u32,
}

impl KfreeSkbRecord {
    pub const UNSET: Self = Self {
        skbaddr: ABSENT,
        location: ABSENT,
        protocol: ABSENT,
        reason: ABSENT,
    };
}

impl KernelOffsets {
    pub const UNSET: Self = Self {
        sk_buff_dev: ABSENT,
        sk_buff_sk: ABSENT,
        net_device_ifindex: ABSENT,
        net_device_nd_net: ABSENT,
        sock_net: ABSENT,
        net_ns_inum: ABSENT,
    };
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for KfreeSkbRecord {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}
