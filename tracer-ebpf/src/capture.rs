//! Copies of packet headers for the pcapng (see `tracer_common::capture`),
//! and the per-CPU budget every kind of sample shares the shape of.

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, generated::bpf_probe_read_kernel as probe_read_raw},
    maps::{PerCpuArray, RingBuf, ring_buf::RingBufEntry},
};
use tracer_common::capture::{HEADER_BYTES, Headers, SAMPLES_PER_SECOND, SampleBudget};

use crate::{KERNEL_OFFSETS, skb::read_at};

/// The shortest copy tried when the full one faults (the buffer may end
/// close to a page boundary): an IPv6 header, or IPv4 with ports or SPI.
const SHORT_COPY: u32 = 48;

/// Copies the first bytes of `skb` from its network header into `out`
/// (which may point into a map or ring buffer); `out.len` says how many are
/// the packet's: never past the linear data.
#[inline(always)]
pub unsafe fn copy_headers(skb: u64, out: *mut Headers) {
    let o = KERNEL_OFFSETS.load();
    unsafe { (*out).len = 0 };
    let head: u64 = unsafe { read_at(skb, o.sk_buff_head) }.unwrap_or(0);
    let network: u16 = unsafe { read_at(skb, o.sk_buff_network_header) }.unwrap_or(0xffff);
    if head == 0 || network == 0xffff {
        return;
    }
    // Unknown tail: trust the copy's length.
    let tail: u32 = unsafe { read_at(skb, o.sk_buff_tail) }.unwrap_or(u32::MAX);
    let available = tail.saturating_sub(u32::from(network));
    let from = (head + u64::from(network)) as *const core::ffi::c_void;
    let bytes = unsafe { (*out).bytes.as_mut_ptr() }.cast();
    let mut copied = HEADER_BYTES as u32;
    if unsafe { probe_read_raw(bytes, copied, from) } != 0 {
        copied = SHORT_COPY;
        if unsafe { probe_read_raw(bytes, copied, from) } != 0 {
            return;
        }
    }
    unsafe {
        (*out).len = if available < copied {
            available
        } else {
            copied
        }
    };
}

/// A slot for one sample in `ring`, if this CPU's budget for the current
/// second allows one more and the ring has room; `None` is a lost sample,
/// which the caller counts (every sample channel has this one shape: a
/// ring, a per-CPU budget, a lost count).
#[inline(always)]
pub fn reserve<T: 'static>(
    ring: &RingBuf,
    budget: &PerCpuArray<SampleBudget>,
) -> Option<RingBufEntry<T>> {
    if within_budget(budget) {
        ring.reserve::<T>(0)
    } else {
        None
    }
}

/// Whether this CPU may send one more sample this second (counts it).
#[inline(always)]
fn within_budget(budget: &PerCpuArray<SampleBudget>) -> bool {
    let Some(budget) = budget.get_ptr_mut(0) else {
        return false;
    };
    let budget = unsafe { &mut *budget };
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(budget.window_start_ns) > 1_000_000_000 {
        budget.window_start_ns = now;
        budget.used = 0;
    }
    if budget.used >= SAMPLES_PER_SECOND {
        return false;
    }
    budget.used += 1;
    true
}
