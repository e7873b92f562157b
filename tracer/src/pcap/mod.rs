//! pcapng of the sampled dropped and leaked packets (`--pcap FILE`, and
//! `packets.pcapng` in the evidence bundle), for Wireshark and tshark.
//!
//! Each packet is the first bytes the eBPF programs copied from its IP
//! header on (LINKTYPE_RAW), with the whole packet's length, and a comment
//! naming the counter or finding, the SA and the kernel function.
//! `packets` turns a report into commented packets; `encode` writes the
//! file and knows nothing of reports.

mod encode;
mod packets;

use std::path::Path;

pub use encode::{Packet, encode};
pub use packets::packets;

use crate::report::Report;

/// Nanoseconds to add to a `CLOCK_MONOTONIC` time to get the wall clock.
pub fn wall_clock_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the struct we pass.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// Writes the report's packets to `path` (see [`crate::fsutil::write_output`]);
/// returns how many.
pub fn write(path: &Path, report: &Report) -> anyhow::Result<usize> {
    let packets = packets(report);
    crate::fsutil::write_output(path, &encode(&packets, wall_clock_offset_ns())?)?;
    Ok(packets.len())
}
