//! Counters of a network namespace at its teardown: `xfrm_net_exit(net)`
//! runs while `net->mib.xfrm_statistics` still holds every CPU's final
//! values (it is freed at the end of that function), and nothing can bump
//! them any more. Summed here over the possible CPUs and sent to
//! userspace, which would otherwise lose a deleted namespace's counters.

use aya_ebpf::{
    Global,
    helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel as probe_read_raw},
    macros::{fentry, kprobe, map},
    maps::{PerCpuArray, RingBuf},
    programs::{FEntryContext, ProbeContext},
};
use tracer_common::{
    attribution::MAX_COUNTERS,
    netns::{MAX_CPUS, NetnsExit},
};

use crate::{KERNEL_OFFSETS, args::Args, skb::read_at};

/// How many CPUs the kernel may have (`/sys/devices/system/cpu/possible`),
/// written by userspace before loading.
#[unsafe(no_mangle)]
static POSSIBLE_CPUS: Global<u32> = Global::new(0);

#[map]
static NETNS_EXITS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

/// One CPU's counters (too big for the eBPF stack).
#[map]
static NETNS_EXIT_CPU: PerCpuArray<[u64; MAX_COUNTERS]> = PerCpuArray::with_max_entries(1, 0);

#[fentry(function = "xfrm_net_exit")]
pub fn netns_exit_fentry(ctx: FEntryContext) -> u32 {
    record_exit(&ctx);
    0
}

#[kprobe]
pub fn netns_exit_kprobe(ctx: ProbeContext) -> u32 {
    record_exit(&ctx);
    0
}

#[inline(always)]
fn record_exit(args: &impl Args) {
    let net = args.arg_u64(0);
    let offsets = KERNEL_OFFSETS.load();
    let count = offsets.xfrm_counters as usize;
    if net == 0 || count == 0 || count > MAX_COUNTERS || offsets.per_cpu_offset == 0 {
        return;
    }
    let Ok(netns) = (unsafe { read_at::<u32>(net, offsets.net_ns_inum) }) else {
        return;
    };
    crate::claims::forget(netns);
    let Ok(percpu) = (unsafe { read_at::<u64>(net, offsets.net_xfrm_statistics) }) else {
        return;
    };
    let cpus = POSSIBLE_CPUS.load();
    if cpus == 0 {
        return;
    }
    let Some(cpu_values) = NETNS_EXIT_CPU.get_ptr_mut(0) else {
        return;
    };
    let Some(mut entry) = NETNS_EXITS.reserve::<NetnsExit>(0) else {
        return;
    };
    let exit = entry.as_mut_ptr();
    unsafe {
        (*exit).netns = netns;
        (*exit).cpus_missed = 0;
        for value in (*exit).counters.iter_mut() {
            core::ptr::write_volatile(value, 0);
        }
    }
    // Kept in memory and read back (volatile) before each copy, then
    // checked: the 5.10 verifier loses the bound of a value spilled across
    // the loop's helper calls, and refuses an unbounded copy size.
    let bytes = (count * 8) as u32;
    let mut cpu = 0u32;
    while cpu < MAX_CPUS && cpu < cpus {
        let cpu_offset: u64 = unsafe {
            bpf_probe_read_kernel((offsets.per_cpu_offset + u64::from(cpu) * 8) as *const u64)
        }
        .unwrap_or(0);
        let size = unsafe { core::ptr::read_volatile(&bytes) };
        let read = if cpu_offset == 0 || size == 0 || size > (MAX_COUNTERS * 8) as u32 {
            -1
        } else {
            unsafe {
                probe_read_raw(
                    cpu_values.cast(),
                    size,
                    percpu.wrapping_add(cpu_offset) as *const _,
                )
            }
        };
        if read == 0 {
            for i in 0..MAX_COUNTERS {
                if i < count {
                    unsafe { (*exit).counters[i] += (*cpu_values)[i] };
                }
            }
        } else {
            unsafe { (*exit).cpus_missed += 1 };
        }
        cpu += 1;
    }
    if cpus > MAX_CPUS {
        unsafe { (*exit).cpus_missed += cpus - MAX_CPUS };
    }
    entry.submit(0);
}
