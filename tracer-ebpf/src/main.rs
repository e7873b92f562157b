//! The xfrm-trace eBPF programs.
//!
//! Struct offsets and tracepoint layouts are not compiled in: userspace
//! resolves them from the running kernel (BTF, tracefs) and writes them into
//! the globals below before loading, so one object runs on every kernel.
#![no_std]
#![no_main]

mod attribution;
mod capture;
mod ike;
mod masquerade;
mod mtu;
mod netns;
mod packet;

use attribution::Packet;
use aya_ebpf::{
    Global,
    helpers::bpf_probe_read_kernel,
    macros::{btf_tracepoint, fentry, fexit, kprobe, kretprobe, map, raw_tracepoint, tracepoint},
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePointContext, FEntryContext, FExitContext, ProbeContext, RawTracePointContext,
        RetProbeContext, TracePointContext,
    },
};
use aya_log_ebpf::warn;
use tracer_common::{
    attribution::{dir, hook},
    capture::{DropSampling, SampleBudget},
    drops::{DROP_TABLE_ENTRIES, DropKey, DropSample},
    ike::NetRecords,
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

/// Which drops are sampled with their headers: written by userspace
/// after attaching, once it knows whether the brackets attached (index 0).
#[map]
static DROP_SAMPLING: Array<DropSampling> = Array::with_max_entries(1, 0);

#[map]
static DROP_SAMPLES: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map]
static DROP_BUDGET: PerCpuArray<SampleBudget> = PerCpuArray::with_max_entries(1, 0);

/// Drop samples not sent (rate limit or full ring buffer), index 0.
#[map]
static DROP_SAMPLES_LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    let record = KFREE_SKB_RECORD.load();
    let key = unsafe { drop_key(&ctx, &record) }.unwrap_or_default();
    count_drop(&ctx, &key);
    if let Ok(skb) = unsafe { ctx.read_at::<u64>(record.skbaddr as usize) } {
        unsafe { ike::on_drop(skb, key.location, key.reason, key.netns, key.ifindex) };
        sample_drop(skb, &key);
    }
    0
}

/// Sends a drop of a sampled reason with the packet's headers.
#[inline(always)]
fn sample_drop(skb: u64, key: &DropKey) {
    let Some(sampling) = DROP_SAMPLING.get(0) else {
        return;
    };
    let mut wanted = false;
    for i in 0..tracer_common::capture::DROP_REASONS_SAMPLED {
        if (i as u32) < sampling.count && sampling.reasons[i] == key.reason {
            wanted = true;
        }
    }
    if !wanted {
        return;
    }
    let reserved = if capture::within_budget(&DROP_BUDGET) {
        DROP_SAMPLES.reserve::<DropSample>(0)
    } else {
        None
    };
    let Some(mut entry) = reserved else {
        if let Some(lost) = DROP_SAMPLES_LOST.get_ptr_mut(0) {
            unsafe { *lost += 1 };
        }
        return;
    };
    let sample = entry.as_mut_ptr();
    unsafe {
        (*sample).time_ns = aya_ebpf::helpers::bpf_ktime_get_ns();
        (*sample).key = *key;
        capture::copy_headers(skb, core::ptr::addr_of_mut!((*sample).headers));
    }
    entry.submit(0);
}

#[unsafe(no_mangle)]
static NET_RECORDS: Global<NetRecords> = Global::new(NetRecords::UNSET);

#[tracepoint]
pub fn net_dev_queue(ctx: TracePointContext) -> u32 {
    let offset = NET_RECORDS.load().dev_queue_skbaddr as usize;
    if let Ok(skb) = unsafe { ctx.read_at::<u64>(offset) } {
        unsafe { ike::on_transmit(skb) };
    }
    0
}

#[tracepoint]
pub fn netif_receive_skb(ctx: TracePointContext) -> u32 {
    let offset = NET_RECORDS.load().receive_skbaddr as usize;
    if let Ok(skb) = unsafe { ctx.read_at::<u64>(offset) } {
        unsafe { ike::on_receive(skb) };
    }
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
    let (netns, ifindex) = unsafe { attribution::skb_netns_and_ifindex(skb) };
    Ok(DropKey {
        location,
        netns,
        reason,
        ifindex,
        protocol,
        _pad: 0,
    })
}

/// Reads a `T` at `base + offset` in kernel memory; fails for an offset the
/// running kernel does not have.
#[inline(always)]
pub(crate) unsafe fn read_at<T>(base: u64, offset: u32) -> Result<T, i32> {
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

// Brackets around every XFRM counter increment site (docs/kernel.md §1). The
// function names in the attributes are only section names: userspace loads
// each program against its target from BTF (fentry/fexit) or attaches the
// kprobe/kretprobe pair to the symbol where fentry is not possible.

/// Function arguments, from a trampoline or from registers.
pub(crate) trait Args {
    fn arg_u64(&self, n: usize) -> u64;
}

impl Args for FEntryContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n)
    }
}

impl Args for ProbeContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n).unwrap_or(0)
    }
}

/// The four programs of a bracket: `$enter` opens it from the arguments;
/// fexit passes the token argument so the exit matches its entry
/// (kretprobes cannot read arguments: they match by depth and hook alone).
macro_rules! bracket {
    ($function:tt, $hook:expr, token = $token:tt, $enter:ident =>
        $fentry:ident, $fexit:ident, $kprobe:ident, $kretprobe:ident) => {
        #[fentry(function = $function)]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            $enter(&ctx);
            0
        }

        #[fexit(function = $function)]
        pub fn $fexit(ctx: FExitContext) -> u32 {
            attribution::exit(&ctx, $hook, Some(ctx.arg($token)));
            0
        }

        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            $enter(&ctx);
            0
        }

        #[kretprobe]
        pub fn $kretprobe(ctx: RetProbeContext) -> u32 {
            attribution::exit(&ctx, $hook, None);
            0
        }
    };
}

/// `xfrm_input(skb, nexthdr, spi, encap_type)`
#[inline(always)]
fn enter_xfrm_input(a: &impl Args) {
    let skb = a.arg_u64(0);
    attribution::enter(hook::XFRM_INPUT, skb, Packet::Skb { skb, dir: dir::IN });
}
bracket!("xfrm_input", hook::XFRM_INPUT, token = 0, enter_xfrm_input =>
    xfrm_input_entry, xfrm_input_exit, xfrm_input_kprobe, xfrm_input_kretprobe);

/// `__xfrm_policy_check(sk, dir, skb, family)`
#[inline(always)]
fn enter_policy_check(a: &impl Args) {
    let skb = a.arg_u64(2);
    let direction = a.arg_u64(1);
    attribution::enter(
        hook::POLICY_CHECK,
        skb,
        Packet::Skb {
            skb,
            dir: (direction & 3) as u8,
        },
    );
}
bracket!("__xfrm_policy_check", hook::POLICY_CHECK, token = 2, enter_policy_check =>
    policy_check_entry, policy_check_exit, policy_check_kprobe, policy_check_kretprobe);

/// `__xfrm_route_forward(skb, family)`
#[inline(always)]
fn enter_route_forward(a: &impl Args) {
    let skb = a.arg_u64(0);
    attribution::enter(hook::ROUTE_FORWARD, skb, Packet::Skb { skb, dir: dir::FWD });
}
bracket!("__xfrm_route_forward", hook::ROUTE_FORWARD, token = 0, enter_route_forward =>
    route_forward_entry, route_forward_exit, route_forward_kprobe, route_forward_kretprobe);

/// `xfrm_lookup_with_ifid(net, dst_orig, fl, sk, flags, if_id)`
#[inline(always)]
fn enter_lookup(a: &impl Args) {
    let fl = a.arg_u64(2);
    attribution::enter(
        hook::LOOKUP,
        fl,
        Packet::Lookup {
            net: a.arg_u64(0),
            dst_orig: a.arg_u64(1),
        },
    );
}
bracket!("xfrm_lookup_with_ifid", hook::LOOKUP, token = 2, enter_lookup =>
    lookup_entry, lookup_exit, lookup_kprobe, lookup_kretprobe);

/// `xfrm_output(sk, skb)`
#[inline(always)]
fn enter_output(a: &impl Args) {
    let skb = a.arg_u64(1);
    attribution::enter(hook::OUTPUT, skb, Packet::Skb { skb, dir: dir::OUT });
}
bracket!("xfrm_output", hook::OUTPUT, token = 1, enter_output =>
    output_entry, output_exit, output_kprobe, output_kretprobe);

// xfrm_output_resume(sk, skb, err) since 5.14, (skb, err) before: one set
// of programs per layout (tracing programs may only read their context at
// constant offsets); userspace picks the set from the BTF prototype.

#[inline(always)]
fn enter_output_resume(a: &impl Args) {
    let skb = a.arg_u64(1);
    attribution::enter(hook::OUTPUT_RESUME, skb, Packet::Skb { skb, dir: dir::OUT });
}
bracket!("xfrm_output_resume", hook::OUTPUT_RESUME, token = 1, enter_output_resume =>
    output_resume_entry, output_resume_exit, output_resume_kprobe, output_resume_kretprobe);

#[inline(always)]
fn enter_output_resume_old(a: &impl Args) {
    let skb = a.arg_u64(0);
    attribution::enter(hook::OUTPUT_RESUME, skb, Packet::Skb { skb, dir: dir::OUT });
}
bracket!("xfrm_output_resume", hook::OUTPUT_RESUME, token = 0, enter_output_resume_old =>
    output_resume_old_entry, output_resume_old_exit, output_resume_old_kprobe,
    output_resume_old_kretprobe);

// Enrichment: name the SA and the policy behind an increment. All three
// functions take six arguments (checked against BTF before attaching), so
// fexit finds the return value in slot 6.

#[fexit(function = "xfrm_state_lookup")]
pub fn state_lookup_exit(ctx: FExitContext) -> u32 {
    attribution::state_found(ctx.arg(6));
    0
}

#[fexit(function = "xfrm_input_state_lookup")]
pub fn input_state_lookup_exit(ctx: FExitContext) -> u32 {
    attribution::state_found(ctx.arg(6));
    0
}

#[fexit(function = "xfrm_policy_lookup_bytype")]
pub fn policy_lookup_exit(ctx: FExitContext) -> u32 {
    attribution::policy_found(ctx.arg(6));
    0
}

/// kretprobe form of the SA lookups (both functions).
#[kretprobe]
pub fn state_lookup_kretprobe(ctx: RetProbeContext) -> u32 {
    attribution::state_found(ctx.ret());
    0
}

#[kretprobe]
pub fn policy_lookup_kretprobe(ctx: RetProbeContext) -> u32 {
    attribution::policy_found(ctx.ret());
    0
}

// MASQUERADE before IPsec (docs/kernel.md §2). xfrm4_output, xfrm6_output
// and their POSTROUTING okfns __xfrm4_output, __xfrm6_output all take
// (net, sk, skb) (checked against BTF before attaching). One fentry program
// per target; the kprobe fallbacks attach to both families.

#[fentry(function = "xfrm4_output")]
pub fn masq_xfrm4_output(ctx: FEntryContext) -> u32 {
    masquerade::entering_postrouting(ctx.arg(2));
    0
}

#[fentry(function = "xfrm6_output")]
pub fn masq_xfrm6_output(ctx: FEntryContext) -> u32 {
    masquerade::entering_postrouting(ctx.arg(2));
    0
}

#[fentry(function = "__xfrm4_output")]
pub fn masq_xfrm4_okfn(ctx: FEntryContext) -> u32 {
    masquerade::leaving_postrouting(ctx.arg(2), true);
    0
}

#[fentry(function = "__xfrm6_output")]
pub fn masq_xfrm6_okfn(ctx: FEntryContext) -> u32 {
    masquerade::leaving_postrouting(ctx.arg(2), true);
    0
}

#[fexit(function = "__xfrm4_output")]
pub fn masq_xfrm4_okfn_exit(ctx: FExitContext) -> u32 {
    masquerade::left_postrouting(ctx.arg(2), ctx.arg(3));
    0
}

#[fexit(function = "__xfrm6_output")]
pub fn masq_xfrm6_okfn_exit(ctx: FExitContext) -> u32 {
    masquerade::left_postrouting(ctx.arg(2), ctx.arg(3));
    0
}

#[kprobe]
pub fn masq_output_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(2) {
        masquerade::entering_postrouting(skb);
    }
    0
}

#[kprobe]
pub fn masq_okfn_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(2) {
        masquerade::leaving_postrouting(skb, false);
    }
    0
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
