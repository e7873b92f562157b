//! MASQUERADE before IPsec (see `tracer_common::masquerade`): one entry
//! program at the okfn of the bundle's POSTROUTING, which returns at once
//! while the route still has an SA (every healthy IPsec packet) and counts
//! the packet when POSTROUTING NAT replaced the bundle by a plain route.
//! The drops program reports, through `on_drop`, a leak dropped on its way
//! out.

use aya_ebpf::{
    helpers::generated::bpf_probe_read_kernel as probe_read_raw,
    macros::{fentry, kprobe, map},
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{FEntryContext, ProbeContext},
};
use tracer_common::{
    capture::SampleBudget,
    layout::ABSENT,
    masquerade::{LEAK_TABLE_ENTRIES, LeakCount, LeakKey, LeakSample, Leaving, error},
};

use crate::{
    KERNEL_OFFSETS, capture,
    packet::skb_packet,
    skb::{read_at, skb_dst},
};

/// The leak this CPU is sending, until the skb is freed or the next leak.
#[map]
static MASQ_LEAVING: PerCpuArray<Leaving> = PerCpuArray::with_max_entries(1, 0);

/// Packets that left IPsec in POSTROUTING, per (flows, netns, egress):
/// exact per-CPU counts.
#[map]
static MASQ_LEAKS: PerCpuHashMap<LeakKey, LeakCount> =
    PerCpuHashMap::with_max_entries(LEAK_TABLE_ENTRIES, 0);

/// Leaked packets with their headers, rate-limited (the table stays exact).
#[map]
static LEAK_SAMPLES: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

#[map]
static LEAK_BUDGET: PerCpuArray<SampleBudget> = PerCpuArray::with_max_entries(1, 0);

#[map]
static MASQ_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(error::COUNT, 0);

#[inline(always)]
fn count_error(index: u32) {
    if let Some(count) = MASQ_ERRORS.get_ptr_mut(index) {
        unsafe { *count += 1 };
    }
}

/// Zeroes a plain-data value word by word; volatile so LLVM does not turn
/// it into a `memset` call, which older verifiers reject. `T` must be a
/// multiple of 8 bytes.
#[inline(always)]
fn zeroed<T>(value: &mut core::mem::MaybeUninit<T>) -> &mut T {
    let words = value.as_mut_ptr() as *mut u64;
    for i in 0..size_of::<T>() / 8 {
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte is written; the types are plain integers/arrays.
    unsafe { value.assume_init_mut() }
}

/// Reads `N` bytes at `src` into `dst`, zeroes on failure (no temporary).
#[inline(always)]
unsafe fn read_bytes<const N: usize>(dst: &mut [u8; N], src: u64) {
    let ret = unsafe { probe_read_raw(dst.as_mut_ptr().cast(), N as u32, src as *const _) };
    if ret != 0 {
        for byte in dst.iter_mut() {
            unsafe { core::ptr::write_volatile(byte, 0) };
        }
    }
}

/// Family, protocol and addresses of the skb's (inner, not yet
/// transformed) IP header; zeros if it has none.
#[inline(always)]
unsafe fn ip_header(skb: u64, src: &mut [u8; 16], dst: &mut [u8; 16]) -> (u16, u8) {
    let Some(packet) = (unsafe { skb_packet(skb) }) else {
        return (0, 0);
    };
    *src = packet.src;
    *dst = packet.dst;
    (u16::from(packet.family), packet.proto)
}

/// The flow the IPsec policy matched, from the packet's conntrack entry
/// (docs/kernel.md §2): the original direction's source (before SNAT) and
/// the reply direction's source (the destination after any DNAT, as the
/// policy lookup saw it). False without a conntrack entry or its offsets.
#[inline(always)]
unsafe fn flow_before_nat(skb: u64, key: &mut LeakKey) -> bool {
    let o = KERNEL_OFFSETS.load();
    if o.ct_original_tuple == ABSENT || o.ct_reply_tuple == ABSENT {
        return false;
    }
    let nfct: u64 = unsafe { read_at(skb, o.sk_buff_nfct) }.unwrap_or(0);
    // The low bits of `_nfct` hold the packet's ctinfo (NFCT_INFOMASK).
    let ct = nfct & !7;
    if ct == 0 || o.ct_tuple_src_addr == ABSENT {
        return false;
    }
    let original = ct + u64::from(o.ct_original_tuple);
    let reply = ct + u64::from(o.ct_reply_tuple);
    unsafe {
        read_bytes(&mut key.pre_src, original + u64::from(o.ct_tuple_src_addr));
        read_bytes(&mut key.pre_dst, reply + u64::from(o.ct_tuple_src_addr));
    }
    true
}

/// fentry/kprobe `__xfrm4_output`/`__xfrm6_output` (the okfn of the
/// bundle's POSTROUTING): if the route has no SA any more, NAT re-routed
/// the packet out of IPsec and it is about to leave in clear.
#[inline(always)]
fn leaving_postrouting(skb: u64) {
    let o = KERNEL_OFFSETS.load();
    let dst = unsafe { skb_dst(skb) };
    if dst == 0 {
        return;
    }
    let x: u64 = unsafe { read_at(dst, o.dst_entry_xfrm) }.unwrap_or(1);
    if x != 0 {
        // Still IPsec: the healthy case, nothing more to do.
        return;
    }
    let mut key = core::mem::MaybeUninit::<LeakKey>::uninit();
    let key = zeroed(&mut key);
    let (family, proto) = unsafe { ip_header(skb, &mut key.post_src, &mut key.post_dst) };
    key.family = family;
    key.proto = proto;
    let dev: u64 = unsafe { read_at(dst, o.dst_entry_dev) }.unwrap_or(0);
    let mut net: u64 = 0;
    if dev != 0 {
        key.ifindex = unsafe { read_at(dev, o.net_device_ifindex) }.unwrap_or(0);
        net = unsafe { read_at(dev, o.net_device_nd_net) }.unwrap_or(0);
    }
    if net != 0 {
        key.netns = unsafe { read_at(net, o.net_ns_inum) }.unwrap_or(0);
    }
    let sk: u64 = unsafe { read_at(skb, o.sk_buff_sk) }.unwrap_or(0);
    key.local = u8::from(sk != 0);
    if unsafe { flow_before_nat(skb, key) } {
        key.seen = 1;
    } else {
        count_error(error::UNSEEN);
    }
    let len: u32 = unsafe { read_at(skb, o.sk_buff_len) }.unwrap_or(0);
    if let Some(count) = MASQ_LEAKS.get_ptr_mut(key) {
        unsafe {
            (*count).packets += 1;
            (*count).bytes += u64::from(len);
        }
    } else {
        let mut count = core::mem::MaybeUninit::<LeakCount>::uninit();
        let count = zeroed(&mut count);
        count.packets = 1;
        count.bytes = u64::from(len);
        if MASQ_LEAKS.insert(key, count, 0).is_err() {
            count_error(error::TABLE_FULL);
            return;
        }
    }
    sample_leak(skb, key);
    remember_leaving(skb, dev, key);
}

/// Notes the leak this CPU is handing to `dst_output`, for `on_drop`.
#[inline(always)]
fn remember_leaving(skb: u64, dev: u64, key: &LeakKey) {
    let Some(leaving) = MASQ_LEAVING.get_ptr_mut(0) else {
        return;
    };
    unsafe {
        (*leaving).skb = skb;
        (*leaving).dev = dev;
        // The key by helper: a struct copy of this size would be a memcpy call.
        probe_read_raw(
            core::ptr::addr_of_mut!((*leaving).key).cast(),
            size_of::<LeakKey>() as u32,
            (key as *const LeakKey).cast(),
        );
    }
}

/// `skb:kfree_skb` (called by the drops program): the leak this CPU is
/// sending was dropped if the skb is freed while still on its egress
/// device; a later free elsewhere (the peer of a veth, another netns) is
/// after it left. Either way the slot is done with: its address may come
/// back for another packet.
#[inline(always)]
pub fn on_drop(skb: u64) {
    let Some(leaving) = MASQ_LEAVING.get_ptr_mut(0) else {
        return;
    };
    let leaving = unsafe { &mut *leaving };
    if leaving.skb != skb || skb == 0 {
        return;
    }
    leaving.skb = 0;
    let dev: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_dev) }.unwrap_or(0);
    if dev != leaving.dev {
        return;
    }
    if let Some(count) = MASQ_LEAKS.get_ptr_mut(&leaving.key) {
        unsafe { (*count).failed += 1 };
    } else {
        // Counted on another CPU (the task migrated): the sums agree.
        let mut count = core::mem::MaybeUninit::<LeakCount>::uninit();
        let count = zeroed(&mut count);
        count.failed = 1;
        if MASQ_LEAKS.insert(&leaving.key, count, 0).is_err() {
            count_error(error::TABLE_FULL);
        }
    }
}

/// Sends the leaked packet's headers, as it leaves, if the budget allows.
#[inline(always)]
fn sample_leak(skb: u64, key: &LeakKey) {
    let Some(mut entry) = capture::reserve::<LeakSample>(&LEAK_SAMPLES, &LEAK_BUDGET) else {
        count_error(error::SAMPLES_LOST);
        return;
    };
    let sample = entry.as_mut_ptr();
    // The key by helper: a struct copy of this size would be a memcpy call.
    unsafe {
        (*sample).time_ns = aya_ebpf::helpers::bpf_ktime_get_ns();
        probe_read_raw(
            core::ptr::addr_of_mut!((*sample).key).cast(),
            size_of::<LeakKey>() as u32,
            (key as *const LeakKey).cast(),
        );
        capture::copy_headers(skb, core::ptr::addr_of_mut!((*sample).headers));
    }
    entry.submit(0);
}

// MASQUERADE before IPsec (docs/kernel.md §2). __xfrm4_output and
// __xfrm6_output take (net, sk, skb) (checked against BTF before
// attaching). One fentry program per family; the kprobe serves both.

#[fentry(function = "__xfrm4_output")]
pub fn masq_xfrm4_okfn(ctx: FEntryContext) -> u32 {
    leaving_postrouting(ctx.arg(2));
    0
}

#[fentry(function = "__xfrm6_output")]
pub fn masq_xfrm6_okfn(ctx: FEntryContext) -> u32 {
    leaving_postrouting(ctx.arg(2));
    0
}

#[kprobe]
pub fn masq_okfn_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(2) {
        leaving_postrouting(skb);
    }
    0
}
