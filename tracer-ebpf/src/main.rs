//! The xfrm-trace eBPF programs.
//!
//! Struct offsets and tracepoint layouts are not compiled in: userspace
//! resolves them from the running kernel (BTF, tracefs) and writes them into
//! the globals below before loading, so one object runs on every kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, fentry, kprobe, map, raw_tracepoint, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, TracePointContext,
    },
};
use aya_log_ebpf::warn;
use tracer_common::{
    drops::{DROP_TABLE_ENTRIES, DropKey},
    layout::{ABSENT, KernelOffsets, KfreeSkbRecord},
};

#[unsafe(no_mangle)]
static KFREE_SKB_RECORD: Global<KfreeSkbRecord> = Global::new(KfreeSkbRecord::UNSET);

#[unsafe(no_mangle)]
static KERNEL_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::UNSET);

/// Drop counts per (location, netns, reason, interface, protocol), per CPU:
/// exact at any packet rate, summed by userspace.
#[map]
static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(DROP_TABLE_ENTRIES, 0);

/// Drops whose key did not fit in `DROPS` (index 0).
#[map]
static DROPS_UNTRACKED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    let record = KFREE_SKB_RECORD.load();
    let key = unsafe { drop_key(&ctx, &record) }.unwrap_or_default();
    count_drop(&ctx, &key);
    0
}

unsafe fn drop_key(ctx: &TracePointContext, record: &KfreeSkbRecord) -> Result<DropKey, i32> {
    let skb: u64 = unsafe { ctx.read_at(record.skbaddr as usize)? };
    let location: u64 = unsafe { ctx.read_at(record.location as usize)? };
    let protocol: u16 = unsafe { ctx.read_at(record.protocol as usize)? };
    let reason: u32 = if record.reason == ABSENT {
        0
    } else {
        unsafe { ctx.read_at(record.reason as usize)? }
    };
    let (netns, ifindex) = unsafe { skb_netns_and_ifindex(skb) };
    Ok(DropKey {
        location,
        netns,
        reason,
        ifindex,
        protocol,
        _pad: 0,
    })
}

/// The packet's netns (through its device, else its socket) and interface.
unsafe fn skb_netns_and_ifindex(skb: u64) -> (u32, u32) {
    let offsets = KERNEL_OFFSETS.load();
    let dev: u64 = unsafe { read_at(skb, offsets.sk_buff_dev) }.unwrap_or(0);
    let (net, ifindex) = if dev != 0 {
        let ifindex: u32 = unsafe { read_at(dev, offsets.net_device_ifindex) }.unwrap_or(0);
        let net: u64 = unsafe { read_at(dev, offsets.net_device_nd_net) }.unwrap_or(0);
        (net, ifindex)
    } else {
        let sk: u64 = unsafe { read_at(skb, offsets.sk_buff_sk) }.unwrap_or(0);
        let net: u64 = if sk != 0 {
            unsafe { read_at(sk, offsets.sock_net) }.unwrap_or(0)
        } else {
            0
        };
        (net, 0)
    };
    let netns: u32 = if net != 0 {
        unsafe { read_at(net, offsets.net_ns_inum) }.unwrap_or(0)
    } else {
        0
    };
    (netns, ifindex)
}

/// Reads a `T` at `base + offset` in kernel memory; fails for an offset the
/// running kernel does not have.
unsafe fn read_at<T>(base: u64, offset: u32) -> Result<T, i32> {
    if offset == ABSENT {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }
}

fn count_drop(ctx: &TracePointContext, key: &DropKey) {
    if let Some(count) = DROPS.get_ptr_mut(key) {
        // Per-CPU value: no other CPU writes it.
        unsafe { *count += 1 };
    } else if DROPS.insert(key, &1, 0).is_err() {
        if let Some(untracked) = DROPS_UNTRACKED.get_ptr_mut(0) {
            unsafe { *untracked += 1 };
        }
        warn!(ctx, "drop table full: drop counted as untracked");
    }
}

// Minimal programs that `xfrm-trace doctor` loads and attaches to learn which
// program types the running kernel really accepts (a config flag can lie).

#[fentry(function = "probe_target")]
pub fn probe_fentry(_ctx: FEntryContext) -> u32 {
    0
}

#[kprobe]
pub fn probe_kprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[tracepoint]
pub fn probe_tracepoint(_ctx: TracePointContext) -> u32 {
    0
}

#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn probe_raw_tracepoint(_ctx: RawTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "kfree_skb")]
pub fn probe_btf_tracepoint(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
