//! Packet drops at `skb:kfree_skb` (see `tracer_common::drops`): counted
//! per (location, netns, reason, interface, protocol), and the drops of the
//! reasons userspace asks for sampled with their headers.

use aya_ebpf::{
    Global,
    macros::{map, tracepoint},
    maps::{Array, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{
    capture::{DropSampling, SampleBudget},
    drops::{DROP_TABLE_ENTRIES, DropKey, DropSample},
    layout::{ABSENT, KfreeSkbRecord},
};

use crate::{
    capture, claims, ike, masquerade,
    skb::{skb_net, skb_netns_and_ifindex},
};

/// Where the fields are in the tracepoint's record, written by userspace
/// before loading (from tracefs).
#[unsafe(no_mangle)]
static KFREE_SKB_RECORD: Global<KfreeSkbRecord> = Global::new(KfreeSkbRecord::UNSET);

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
        let (net, _) = unsafe { skb_net(skb) };
        let site = claims::site_of(key.location);
        claims::claim(
            &ctx,
            net,
            claims::drop_mask(site),
            claims::Claimant::Drop { skb, site },
        );
        unsafe { ike::on_drop(skb, key.location, key.reason, key.netns, key.ifindex) };
        masquerade::on_drop(skb);
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
    let Some(mut entry) = capture::reserve::<DropSample>(&DROP_SAMPLES, &DROP_BUDGET) else {
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
