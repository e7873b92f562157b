//! Packet headers copied by the eBPF programs for the pcapng of sampled
//! dropped and leaked packets (`--pcap`, the evidence bundle).

/// Bytes copied from the network header on: the IP header, the ESP or
/// transport header and the start of the payload. Ciphertext beyond this
/// says nothing, and a fixed size keeps the copy one helper call.
pub const HEADER_BYTES: usize = 128;

/// The first bytes of a packet from its IP header (the linear part only).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Headers {
    /// Bytes of `bytes` that are the packet's (0: none captured).
    pub len: u32,
    pub _pad: u32,
    pub bytes: [u8; HEADER_BYTES],
}

impl Default for Headers {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            bytes: [0; HEADER_BYTES],
        }
    }
}

impl core::fmt::Debug for Headers {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Headers({} bytes)", self.len)
    }
}

/// Samples per second and CPU at most, per kind of sample; the rest are
/// counted as lost (the counts in the tables stay exact regardless).
pub const SAMPLES_PER_SECOND: u64 = 64;

/// Per-CPU rate limiter state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SampleBudget {
    pub window_start_ns: u64,
    pub used: u64,
}

/// Which drops at `skb:kfree_skb` are sampled with their headers: only on
/// kernels where the bracket hooks cannot attach (there the attribution
/// samples carry the same packets, named by counter), and only for the
/// drop reasons listed (the XFRM ones, from BTF).
pub const DROP_REASONS_SAMPLED: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropSampling {
    /// Number of valid entries in `reasons` (0: no drop is sampled).
    pub count: u32,
    pub reasons: [u32; DROP_REASONS_SAMPLED],
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Headers>() == 136);
    assert!(size_of::<SampleBudget>() == 16);
    assert!(size_of::<DropSampling>() == 36);
};

#[cfg(feature = "user")]
mod pod {
    unsafe impl aya::Pod for super::Headers {}
    unsafe impl aya::Pod for super::SampleBudget {}
    unsafe impl aya::Pod for super::DropSampling {}
}
