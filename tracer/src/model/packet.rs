//! Packets the eBPF programs copied, and how many they let go.

use serde::{Deserialize, Serialize};
use tracer_common::capture::Headers;

/// Dropped and leaked packets the kernel copied for the pcapng, and those
/// it let go (over the rate limit, or the ring full): exact counts, so the
/// file's sample is known to be one. Increments attributed to counters
/// have theirs in `attribution_errors.samples_lost`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CaptureCounts {
    pub drops_captured: u64,
    pub drops_not_captured: u64,
    pub leaks_captured: u64,
    pub leaks_not_captured: u64,
}

/// The first bytes of one packet, as an eBPF program copied them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Captured {
    /// `CLOCK_MONOTONIC` (`bpf_ktime_get_ns`).
    pub time_ns: u64,
    pub bytes: Vec<u8>,
}

impl Captured {
    /// None when the program could copy nothing.
    pub fn from_headers(time_ns: u64, headers: &Headers) -> Option<Self> {
        let len = (headers.len as usize).min(headers.bytes.len());
        (len > 0).then(|| Self {
            time_ns,
            bytes: headers.bytes[..len].to_vec(),
        })
    }
}
