//! Brackets: per-CPU counter snapshots around the functions that bump XFRM
//! counters (see `tracer_common::attribution`).

use aya_ebpf::{
    helpers::{
        bpf_get_smp_processor_id, bpf_probe_read_kernel,
        generated::bpf_probe_read_kernel as probe_read_raw,
    },
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf, StackTrace},
    programs::tracing::StackIdContext,
};
use tracer_common::attribution::{
    Flow, Frame, FrameStack, MAX_COUNTERS, MAX_DEPTH, Sample, SourceKey, dir, error, hook,
};
use tracer_common::capture::{Headers, SampleBudget};

use tracer_common::layout::ABSENT;

use crate::{
    KERNEL_OFFSETS, capture,
    packet::{AF_INET6, IpPacket, skb_packet},
    skb::{is_null_or_error, read_at, skb_dst, skb_net},
};

#[map]
static FRAMES: PerCpuArray<FrameStack> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for the exit snapshot (too big for the eBPF stack).
#[map]
static AFTER: PerCpuArray<[u64; MAX_COUNTERS]> = PerCpuArray::with_max_entries(1, 0);

/// Increments per (counter, bracket, flow): exact at any rate.
#[map]
static SOURCES: PerCpuHashMap<SourceKey, u64> = PerCpuHashMap::with_max_entries(16384, 0);

/// Per-increment samples for userspace (with kernel stacks).
#[map]
static SAMPLES: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[map]
static STACKS: StackTrace = StackTrace::with_max_entries(1024, 0);

#[map]
static SAMPLE_BUDGET: PerCpuArray<SampleBudget> = PerCpuArray::with_max_entries(1, 0);

#[map]
static ATTRIBUTION_ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(error::COUNT, 0);

/// Zeroes in place; volatile so LLVM does not turn it into a `memset`
/// call, which older verifiers reject.
#[inline(always)]
pub(crate) fn zero(values: &mut [u64; MAX_COUNTERS]) {
    for value in values.iter_mut() {
        unsafe { core::ptr::write_volatile(value, 0) };
    }
}

#[inline(always)]
pub(crate) fn count_error(index: u32) {
    if let Some(count) = ATTRIBUTION_ERRORS.get_ptr_mut(index) {
        unsafe { *count += 1 };
    }
}

/// `net->ns.inum` and the address of this CPU's XFRM counters of `net`.
#[inline(always)]
pub(crate) unsafe fn netns_and_mib(net: u64) -> (u32, u64) {
    let offsets = KERNEL_OFFSETS.load();
    if net == 0 {
        return (0, 0);
    }
    let inum: u32 = unsafe { read_at(net, offsets.net_ns_inum) }.unwrap_or(0);
    let percpu: u64 = unsafe { read_at(net, offsets.net_xfrm_statistics) }.unwrap_or(0);
    if percpu == 0 || offsets.per_cpu_offset == 0 {
        return (inum, 0);
    }
    let cpu = u64::from(unsafe { bpf_get_smp_processor_id() });
    let cpu_offset: u64 =
        unsafe { bpf_probe_read_kernel((offsets.per_cpu_offset + cpu * 8) as *const u64) }
            .unwrap_or(0);
    if cpu_offset == 0 {
        return (inum, 0);
    }
    (inum, percpu.wrapping_add(cpu_offset))
}

/// Reads the counters at `mib` into `out` (zeros where unknown).
#[inline(always)]
pub(crate) unsafe fn read_counters(mib: u64, out: &mut [u64; MAX_COUNTERS]) {
    let count = KERNEL_OFFSETS.load().xfrm_counters as usize;
    let count = if count > MAX_COUNTERS {
        MAX_COUNTERS
    } else {
        count
    };
    let ret = if mib == 0 || count == 0 {
        -1
    } else {
        unsafe { probe_read_raw(out.as_mut_ptr().cast(), (count * 8) as u32, mib as *const _) }
    };
    if ret != 0 {
        zero(out);
    }
}

/// Addresses, protocol, ports (or the ESP SPI and sequence number) from
/// the skb's IP header.
#[inline(always)]
pub(crate) unsafe fn flow_from_skb(skb: u64, flow: &mut Flow, seq: &mut u32) {
    if let Some(packet) = unsafe { skb_packet(skb) } {
        flow_from_packet(&packet, flow, seq);
    }
}

/// Addresses, protocol, ports (or the ESP SPI and sequence number) of a
/// parsed packet.
#[inline(always)]
pub(crate) fn flow_from_packet(packet: &IpPacket, flow: &mut Flow, seq: &mut u32) {
    flow.family = u16::from(packet.family);
    flow.proto = packet.proto;
    flow.src = packet.src;
    flow.dst = packet.dst;
    if let Some([sport, dport]) = packet.ports_raw() {
        flow.sport = sport;
        flow.dport = dport;
    }
    // An SA already named (by the bracket's argument) wins.
    if flow.spi == 0
        && let Some((spi, esp_seq)) = packet.esp()
    {
        flow.spi = spi;
        *seq = esp_seq;
    }
}

/// The SA an outgoing skb's route points at (0 if none).
#[inline(always)]
pub(crate) unsafe fn route_sa(skb: u64) -> u64 {
    let dst = unsafe { skb_dst(skb) };
    if dst == 0 {
        return 0;
    }
    unsafe { read_at(dst, KERNEL_OFFSETS.load().dst_entry_xfrm) }.unwrap_or(0)
}

/// The SA (SPI, reqid) an outgoing skb's route points at, if any.
#[inline(always)]
pub(crate) unsafe fn sa_of_route(skb: u64, flow: &mut Flow) {
    let x = unsafe { route_sa(skb) };
    if x != 0 {
        unsafe { name_sa(x, flow) };
    }
}

/// Names the SA `x` (SPI, reqid) in the flow.
#[inline(always)]
pub(crate) unsafe fn name_sa(x: u64, flow: &mut Flow) {
    let o = KERNEL_OFFSETS.load();
    flow.spi = unsafe { read_at(x, o.xfrm_state_spi) }.unwrap_or(0);
    flow.reqid = unsafe { read_at(x, o.xfrm_state_reqid) }.unwrap_or(0);
}

/// The flow a route lookup is made for.
#[inline(always)]
pub(crate) unsafe fn flow_from_flowi(fl: u64, family: u16, flow: &mut Flow) {
    let o = KERNEL_OFFSETS.load();
    if fl == 0 {
        return;
    }
    flow.family = family;
    if family == u16::from(AF_INET6) {
        flow.src = unsafe { read_at(fl, o.flowi6_saddr) }.unwrap_or([0; 16]);
        flow.dst = unsafe { read_at(fl, o.flowi6_daddr) }.unwrap_or([0; 16]);
        flow.proto = unsafe { read_at(fl, o.flowi6_proto) }.unwrap_or(0);
        flow.sport = unsafe { read_at(fl, o.flowi6_sport) }.unwrap_or(0);
        flow.dport = unsafe { read_at(fl, o.flowi6_dport) }.unwrap_or(0);
    } else {
        let src: [u8; 4] = unsafe { read_at(fl, o.flowi4_saddr) }.unwrap_or([0; 4]);
        let dst: [u8; 4] = unsafe { read_at(fl, o.flowi4_daddr) }.unwrap_or([0; 4]);
        flow.src = [0; 16];
        flow.dst = [0; 16];
        flow.src[..4].copy_from_slice(&src);
        flow.dst[..4].copy_from_slice(&dst);
        flow.proto = unsafe { read_at(fl, o.flowi4_proto) }.unwrap_or(0);
        flow.sport = unsafe { read_at(fl, o.flowi4_sport) }.unwrap_or(0);
        flow.dport = unsafe { read_at(fl, o.flowi4_dport) }.unwrap_or(0);
    }
}

/// What a bracket knows at entry.
pub enum Packet {
    /// An skb, with the direction of its path.
    Skb { skb: u64, dir: u8 },
    /// A route lookup (the token is its flowi): no skb yet.
    Lookup { net: u64, dst_orig: u64 },
}

/// Opens a bracket: remembers the packet and snapshots the counters.
#[inline(always)]
pub fn enter(hook_id: u32, token: u64, packet: Packet) {
    let Some(stack) = FRAMES.get_ptr_mut(0) else {
        return;
    };
    let stack = unsafe { &mut *stack };
    let depth = (stack.depth as usize) & 7;
    if depth >= MAX_DEPTH || stack.depth as usize >= MAX_DEPTH {
        count_error(error::TOO_DEEP);
        return;
    }
    let Some(frame) = stack.frames.get_mut(depth) else {
        return;
    };
    frame.hook = hook_id;
    frame.token = token;
    frame.dst_orig = 0;
    frame.flow_pending = 0;
    frame.flow = Flow::default();
    frame.seq = 0;
    frame.headers.len = 0;
    zero(&mut frame.nested);
    let net = match packet {
        Packet::Skb { skb, dir } => {
            frame.flow.dir = dir;
            let (net, ifindex) = unsafe { skb_net(skb) };
            frame.flow.ifindex = ifindex;
            if hook_id == hook::POLICY_CHECK || hook_id == hook::ROUTE_FORWARD {
                // Most packets move no counter here: read them at exit.
                frame.flow_pending = 1;
            } else {
                // xfrm_input and xfrm_output transform the packet: read it
                // as it enters.
                unsafe { flow_from_skb(skb, &mut frame.flow, &mut frame.seq) };
                unsafe { capture::copy_headers(skb, &mut frame.headers) };
            }
            if hook_id == hook::OUTPUT || hook_id == hook::OUTPUT_RESUME {
                unsafe { sa_of_route(skb, &mut frame.flow) };
            }
            net
        }
        Packet::Lookup { net, dst_orig } => {
            frame.flow.dir = dir::OUT;
            frame.dst_orig = dst_orig;
            frame.flow_pending = 1;
            net
        }
    };
    let (netns, mib) = unsafe { netns_and_mib(net) };
    frame.flow.netns = netns;
    frame.mib = mib;
    unsafe { read_counters(mib, &mut frame.before) };
    stack.depth += 1;
}

/// Closes a bracket: what moved since entry, less what nested brackets
/// claimed, is this packet's.
#[inline(always)]
pub fn exit<C: StackIdContext>(ctx: &C, hook_id: u32, token: Option<u64>) {
    let Some(stack) = FRAMES.get_ptr_mut(0) else {
        return;
    };
    let stack = unsafe { &mut *stack };
    let Some(after) = AFTER.get_ptr_mut(0) else {
        return;
    };
    let after = unsafe { &mut *after };
    if stack.depth == 0 {
        count_error(error::UNBALANCED);
        return;
    }
    // Masked so the verifier sees the bound on the register it indexes with.
    let depth = (stack.depth.wrapping_sub(1) as usize) & 7;
    stack.depth -= 1;
    if depth >= MAX_DEPTH {
        return;
    }
    // Pass 1: what moved in this bracket, claimed minus nested claims;
    // `after` keeps the total moved for the parent.
    let Some(frame) = stack.frames.get_mut(depth) else {
        return;
    };
    if frame.hook != hook_id || token.is_some_and(|t| t != frame.token) {
        count_error(error::UNBALANCED);
        return;
    }
    unsafe { read_counters(frame.mib, after) };
    if frame.flow_pending != 0 {
        let mut moved = 0;
        for counter in 0..MAX_COUNTERS {
            moved |= after[counter] ^ frame.before[counter];
        }
        if moved != 0 {
            unsafe { read_pending_flow(frame) };
        }
    }
    let mib = frame.mib;
    for counter in 0..MAX_COUNTERS {
        let moved = after[counter].wrapping_sub(frame.before[counter]);
        // Counters only grow; anything else is a torn read.
        let moved = if moved > 1 << 32 { 0 } else { moved };
        after[counter] = moved;
        let own = moved.saturating_sub(frame.nested[counter]);
        if own > 0 {
            record(counter as u32, hook_id, &frame.flow, own);
            sample(ctx, counter as u32, hook_id, frame, own);
        }
    }
    // Pass 2: the enclosing bracket must not claim these again.
    if depth == 0 {
        return;
    }
    // A fresh (volatile) read of the depth, bounded on its own: derived
    // from `depth` the verifier could not prove the index stays >= 0.
    let parent_index =
        (unsafe { core::ptr::read_volatile(&stack.depth) }.wrapping_sub(1) as usize) & 7;
    let Some(parent) = stack.frames.get_mut(parent_index) else {
        return;
    };
    if parent.mib != mib {
        return;
    }
    for counter in 0..MAX_COUNTERS {
        parent.nested[counter] += after[counter];
    }
}

/// Reads the flow (and headers) a lazy bracket left for its exit: the
/// packet of a policy check or forward route is unchanged and alive, a
/// route lookup's flow is in its caller's frame.
#[inline(always)]
unsafe fn read_pending_flow(frame: &mut Frame) {
    frame.flow_pending = 0;
    if frame.hook == hook::LOOKUP {
        let family = unsafe { route_family(frame.dst_orig) };
        unsafe { flow_from_flowi(frame.token, family, &mut frame.flow) };
        return;
    }
    let skb = frame.token;
    if frame.hook == hook::POLICY_CHECK {
        let x = unsafe { decapsulating_sa(skb) };
        if x != 0 {
            unsafe { name_sa(x, &mut frame.flow) };
        }
    }
    unsafe { flow_from_skb(skb, &mut frame.flow, &mut frame.seq) };
    unsafe { capture::copy_headers(skb, &mut frame.headers) };
}

/// The address family of a route (what a lookup's flowi holds).
#[inline(always)]
pub(crate) unsafe fn route_family(dst: u64) -> u16 {
    let o = KERNEL_OFFSETS.load();
    let ops: u64 = unsafe { read_at(dst, o.dst_entry_ops) }.unwrap_or(0);
    if ops == 0 {
        return 0;
    }
    unsafe { read_at(ops, o.dst_ops_family) }.unwrap_or(0)
}

/// The last SA that decapsulated a received skb (0 if none): its
/// sec_path, the skb extension the policy check itself reads.
#[inline(always)]
pub(crate) unsafe fn decapsulating_sa(skb: u64) -> u64 {
    let o = KERNEL_OFFSETS.load();
    if o.skb_ext_sec_path == ABSENT || o.sec_path_xvec == ABSENT || o.skb_ext_offset == ABSENT {
        return 0;
    }
    let active: u8 = unsafe { read_at(skb, o.sk_buff_active_extensions) }.unwrap_or(0);
    if active & (1u8 << (o.skb_ext_sec_path & 7)) == 0 {
        return 0;
    }
    let ext: u64 = unsafe { read_at(skb, o.sk_buff_extensions) }.unwrap_or(0);
    if ext == 0 {
        return 0;
    }
    // skb_ext_find(): the extension sits offset[id] 8-byte units in.
    let units: u8 = unsafe { read_at(ext, o.skb_ext_offset + o.skb_ext_sec_path) }.unwrap_or(0);
    let sp = ext + (u64::from(units) << 3);
    let len: i32 = unsafe { read_at(sp, o.sec_path_len) }.unwrap_or(0);
    // XFRM_MAX_DEPTH is 6.
    if !(1..=6).contains(&len) {
        return 0;
    }
    let slot = o.sec_path_xvec + (len as u32 - 1) * 8;
    unsafe { read_at(sp, slot) }.unwrap_or(0)
}

/// Sends a sample if this CPU's budget for the current second allows.
#[inline(always)]
pub(crate) fn sample<C: StackIdContext>(
    ctx: &C,
    counter: u32,
    hook_id: u32,
    frame: &Frame,
    count: u64,
) {
    let Some(mut entry) = capture::reserve::<Sample>(&SAMPLES, &SAMPLE_BUDGET) else {
        count_error(error::SAMPLES_LOST);
        return;
    };
    let stack_id = ctx.get_stackid(&STACKS, 0).map_or(-1, i64::from);
    let sample = entry.as_mut_ptr();
    // Field by field, the headers with one helper call: a struct copy of
    // this size would be a long run of instructions in every unrolled
    // iteration of the caller's counter loop.
    unsafe {
        (*sample).time_ns = aya_ebpf::helpers::bpf_ktime_get_ns();
        (*sample).counter = counter;
        (*sample).hook = hook_id;
        (*sample).stack_id = stack_id;
        (*sample).count = count;
        (*sample).seq = frame.seq;
        probe_read_raw(
            core::ptr::addr_of_mut!((*sample).flow).cast(),
            size_of::<Flow>() as u32,
            core::ptr::addr_of!(frame.flow).cast(),
        );
        probe_read_raw(
            core::ptr::addr_of_mut!((*sample).headers).cast(),
            size_of::<Headers>() as u32,
            core::ptr::addr_of!(frame.headers).cast(),
        );
    }
    entry.submit(0);
}

#[inline(always)]
pub(crate) fn record(counter: u32, hook_id: u32, flow: &Flow, count: u64) {
    let key = SourceKey {
        counter,
        hook: hook_id,
        flow: *flow,
    };
    if let Some(value) = SOURCES.get_ptr_mut(&key) {
        unsafe { *value += count };
    } else if SOURCES.insert(&key, &count, 0).is_err() {
        count_error(error::TABLE_FULL);
    }
}

/// The innermost open bracket on this CPU, if any.
#[inline(always)]
fn open_frame() -> Option<&'static mut Frame> {
    let stack = unsafe { &mut *FRAMES.get_ptr_mut(0)? };
    if stack.depth == 0 {
        return None;
    }
    stack
        .frames
        .get_mut((stack.depth.wrapping_sub(1) as usize) & 7)
}

/// An SA lookup in xfrm_input returned `x`: name it in the open bracket
/// (the policy check later finds it in the skb's sec_path).
#[inline(always)]
pub fn state_found(x: u64) {
    if x == 0 {
        return;
    }
    let Some(frame) = open_frame() else { return };
    if frame.hook != hook::XFRM_INPUT {
        return;
    }
    unsafe { name_sa(x, &mut frame.flow) };
}

/// A policy lookup returned `policy`: name it in the open bracket.
#[inline(always)]
pub fn policy_found(policy: u64) {
    if is_null_or_error(policy) {
        return;
    }
    let Some(frame) = open_frame() else { return };
    frame.flow.policy_index =
        unsafe { read_at(policy, KERNEL_OFFSETS.load().xfrm_policy_index) }.unwrap_or(0);
}
