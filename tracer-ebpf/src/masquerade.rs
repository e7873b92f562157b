//! MASQUERADE before IPsec (see `tracer_common::masquerade`): remember each
//! skb entering POSTROUTING with an IPsec bundle, count it when the okfn
//! finds that POSTROUTING NAT replaced the bundle by a plain route.

use aya_ebpf::{
    helpers::generated::bpf_probe_read_kernel as probe_read_raw,
    macros::{fentry, fexit, kprobe, map},
    maps::{HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{FEntryContext, FExitContext, ProbeContext},
};
use tracer_common::{
    capture::SampleBudget,
    masquerade::{
        ENTERED_SLOTS, Entered, LEAK_TABLE_ENTRIES, LeakCount, LeakKey, LeakSample, PolicyKey,
        Selector, error,
    },
};

use crate::{
    KERNEL_OFFSETS, capture,
    packet::skb_packet,
    skb::{read_at, skb_dst},
};

/// Skbs between POSTROUTING's two hooks, per CPU.
#[map]
static MASQ_ENTERED: PerCpuArray<Entered> = PerCpuArray::with_max_entries(1, 0);

/// Re-routed skbs between the okfn's entry and exit (for the outcome).
#[map]
static MASQ_PENDING: LruHashMap<u64, LeakKey> = LruHashMap::with_max_entries(4096, 0);

/// Packets that left IPsec in POSTROUTING, per (flows, SA, policy, netns,
/// egress): exact per-CPU counts.
#[map]
static MASQ_LEAKS: PerCpuHashMap<LeakKey, LeakCount> =
    PerCpuHashMap::with_max_entries(LEAK_TABLE_ENTRIES, 0);

/// Selectors of the policies behind leaks, read from the kernel.
#[map]
static MASQ_POLICIES: HashMap<PolicyKey, Selector> = HashMap::with_max_entries(1024, 0);

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

/// Like `read_bytes` at `base + offset`; zeroes for an absent offset.
#[inline(always)]
unsafe fn read_field<const N: usize>(dst: &mut [u8; N], base: u64, offset: u32) {
    if offset == tracer_common::layout::ABSENT {
        for byte in dst.iter_mut() {
            unsafe { core::ptr::write_volatile(byte, 0) };
        }
        return;
    }
    unsafe { read_bytes(dst, base + u64::from(offset)) };
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

/// fentry/kprobe `xfrm4_output`/`xfrm6_output`: the skb enters POSTROUTING
/// with its bundle; remember the flow the policy matched, the SA, the policy.
#[inline(always)]
fn entering_postrouting(skb: u64) {
    let o = KERNEL_OFFSETS.load();
    let dst = unsafe { skb_dst(skb) };
    if dst == 0 {
        return;
    }
    let x: u64 = unsafe { read_at(dst, o.dst_entry_xfrm) }.unwrap_or(0);
    if x == 0 {
        return;
    }
    let Some(entered) = MASQ_ENTERED.get_ptr_mut(0) else {
        return;
    };
    let entered = unsafe { &mut *entered };
    let index = (entered.next as usize) % ENTERED_SLOTS;
    entered.next = entered.next.wrapping_add(1);
    let Some(seen) = entered.slots.get_mut(index) else {
        return;
    };
    seen.skb = skb;
    seen.state = x;
    let (family, proto) = unsafe { ip_header(skb, &mut seen.src, &mut seen.dst) };
    seen.family = family;
    seen.proto = proto;
    // The bundle is a struct xfrm_dst whose first member is the dst_entry.
    seen.policy = unsafe { read_at(dst, o.xfrm_dst_pols) }.unwrap_or(0);
    let sk: u64 = unsafe { read_at(skb, o.sk_buff_sk) }.unwrap_or(0);
    seen.local = u8::from(sk != 0);
}

/// fentry/kprobe `__xfrm4_output`/`__xfrm6_output` (the okfn of that
/// POSTROUTING): if the route has no SA any more, NAT re-routed the packet
/// out of IPsec and it is about to leave in clear.
#[inline(always)]
fn leaving_postrouting(skb: u64, track_outcome: bool) {
    let o = KERNEL_OFFSETS.load();
    let dst = unsafe { skb_dst(skb) };
    if dst == 0 {
        return;
    }
    let x: u64 = unsafe { read_at(dst, o.dst_entry_xfrm) }.unwrap_or(1);
    if x != 0 {
        // Still IPsec (the normal case): its slot is simply reused.
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
    let mut policy: u64 = 0;
    if let Some(seen) = entered_slot(skb) {
        key.pre_src = seen.src;
        key.pre_dst = seen.dst;
        key.local = seen.local;
        key.seen = 1;
        // The SA and policy outlive the bundle NAT dropped (the SAD and
        // SPD hold them); read only now, for the packet that leaked.
        let x = seen.state;
        key.spi = unsafe { read_at(x, o.xfrm_state_spi) }.unwrap_or(0);
        key.reqid = unsafe { read_at(x, o.xfrm_state_reqid) }.unwrap_or(0);
        unsafe { read_field(&mut key.sa_daddr, x, o.xfrm_state_daddr) };
        key.sa_family = unsafe { read_at(x, o.xfrm_state_family) }.unwrap_or(0);
        policy = seen.policy;
        if policy != 0 {
            key.policy_index = unsafe { read_at(policy, o.xfrm_policy_index) }.unwrap_or(0);
        }
    } else {
        count_error(error::UNSEEN);
        let sk: u64 = unsafe { read_at(skb, o.sk_buff_sk) }.unwrap_or(0);
        key.local = u8::from(sk != 0);
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
    if policy != 0 && key.policy_index != 0 {
        let pkey = PolicyKey {
            netns: key.netns,
            index: key.policy_index,
        };
        if unsafe { MASQ_POLICIES.get(&pkey) }.is_none() {
            let mut selector = core::mem::MaybeUninit::<Selector>::uninit();
            let selector = zeroed(&mut selector);
            unsafe {
                read_field(&mut selector.saddr, policy, o.xfrm_policy_sel_saddr);
                read_field(&mut selector.daddr, policy, o.xfrm_policy_sel_daddr);
            }
            selector.family = unsafe { read_at(policy, o.xfrm_policy_sel_family) }.unwrap_or(0);
            selector.prefixlen_s =
                unsafe { read_at(policy, o.xfrm_policy_sel_prefixlen_s) }.unwrap_or(0);
            selector.prefixlen_d =
                unsafe { read_at(policy, o.xfrm_policy_sel_prefixlen_d) }.unwrap_or(0);
            selector.proto = unsafe { read_at(policy, o.xfrm_policy_sel_proto) }.unwrap_or(0);
            let _ = MASQ_POLICIES.insert(&pkey, selector, 0);
        }
    }
    if track_outcome {
        let _ = MASQ_PENDING.insert(&skb, key, 0);
    }
}

/// This CPU's slot for `skb`, if it entered POSTROUTING here.
#[inline(always)]
fn entered_slot(skb: u64) -> Option<&'static tracer_common::masquerade::Seen> {
    let entered = unsafe { &*MASQ_ENTERED.get_ptr(0)? };
    // Newest first: a freed skb's address comes back for a later packet.
    for age in 1..=ENTERED_SLOTS as u32 {
        let index = (entered.next.wrapping_sub(age) as usize) % ENTERED_SLOTS;
        let slot = entered.slots.get(index)?;
        if slot.skb == skb {
            return Some(slot);
        }
    }
    None
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

/// fexit of the okfn: `dst_output` of the plain route returned `ret`.
#[inline(always)]
fn left_postrouting(skb: u64, ret: i32) {
    let Some(key) = MASQ_PENDING.get_ptr(&skb) else {
        return;
    };
    // The key is used in place (a copy of the map value would need memcpy).
    let key = unsafe { &*key };
    let (sent, failed) = if ret == 0 { (1, 0) } else { (0, 1) };
    if let Some(count) = MASQ_LEAKS.get_ptr_mut(key) {
        unsafe {
            (*count).sent += sent;
            (*count).failed += failed;
        }
    } else {
        // Another CPU counted the packet (the task migrated): the sums agree.
        let mut count = core::mem::MaybeUninit::<LeakCount>::uninit();
        let count = zeroed(&mut count);
        count.sent = sent;
        count.failed = failed;
        if MASQ_LEAKS.insert(key, count, 0).is_err() {
            count_error(error::TABLE_FULL);
        }
    }
    let _ = MASQ_PENDING.remove(&skb);
}

// MASQUERADE before IPsec (docs/kernel.md §2). xfrm4_output, xfrm6_output
// and their POSTROUTING okfns __xfrm4_output, __xfrm6_output all take
// (net, sk, skb) (checked against BTF before attaching). One fentry program
// per target; the kprobe fallbacks attach to both families.

#[fentry(function = "xfrm4_output")]
pub fn masq_xfrm4_output(ctx: FEntryContext) -> u32 {
    entering_postrouting(ctx.arg(2));
    0
}

#[fentry(function = "xfrm6_output")]
pub fn masq_xfrm6_output(ctx: FEntryContext) -> u32 {
    entering_postrouting(ctx.arg(2));
    0
}

#[fentry(function = "__xfrm4_output")]
pub fn masq_xfrm4_okfn(ctx: FEntryContext) -> u32 {
    leaving_postrouting(ctx.arg(2), true);
    0
}

#[fentry(function = "__xfrm6_output")]
pub fn masq_xfrm6_okfn(ctx: FEntryContext) -> u32 {
    leaving_postrouting(ctx.arg(2), true);
    0
}

#[fexit(function = "__xfrm4_output")]
pub fn masq_xfrm4_okfn_exit(ctx: FExitContext) -> u32 {
    left_postrouting(ctx.arg(2), ctx.arg(3));
    0
}

#[fexit(function = "__xfrm6_output")]
pub fn masq_xfrm6_okfn_exit(ctx: FExitContext) -> u32 {
    left_postrouting(ctx.arg(2), ctx.arg(3));
    0
}

#[kprobe]
pub fn masq_output_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(2) {
        entering_postrouting(skb);
    }
    0
}

#[kprobe]
pub fn masq_okfn_kprobe(ctx: ProbeContext) -> u32 {
    if let Some(skb) = ctx.arg::<u64>(2) {
        leaving_postrouting(skb, false);
    }
    0
}
