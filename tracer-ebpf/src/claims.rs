//! Diff at the drop (see `tracer_common::attribution::class` and
//! `docs/drop-diff.md`): per CPU and per netns, a shadow of the XFRM
//! counters as last claimed. A packet freed as a drop, or one of the few
//! functions whose increments no drop follows, compares the counters with
//! the shadow: what moved in the classes that place can own was bumped for
//! that packet. A healthy packet runs none of this.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::{fexit, kprobe, kretprobe, map, raw_tracepoint},
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::tracing::StackIdContext,
    programs::{FExitContext, ProbeContext, RawTracePointContext, RetProbeContext},
};
use tracer_common::attribution::{
    ClaimTables, Frame, MAX_COUNTERS, MAX_SITES, Shadow, class, dir, error, hook, site,
};

use crate::{
    KERNEL_OFFSETS,
    attribution::{
        count_error, decapsulating_sa, flow_from_flowi, flow_from_packet, flow_from_skb, name_sa,
        netns_and_mib, read_counters, record, route_family, route_sa, sample, zero,
    },
    capture,
    packet::{ip_at, network_header},
    skb::{is_null_or_error, read_at, skb_net},
};

/// Written by userspace at start (index 0).
#[map]
static CLAIM_TABLES: Array<ClaimTables> = Array::with_max_entries(1, 0);

/// The shadows, by netns inode (a per-CPU value: each CPU its own);
/// userspace sizes it to the namespaces there are.
#[map]
static SHADOWS: PerCpuHashMap<u32, Shadow> = PerCpuHashMap::with_max_entries(64, 0);

/// Scratch space: the counters now (`before`), the flow and headers.
#[map]
static CLAIM_FRAME: PerCpuArray<Frame> = PerCpuArray::with_max_entries(1, 0);

/// What a claim knows of its packet.
pub enum Claimant {
    /// A packet freed as a drop, inside a function of `site`.
    Drop { skb: u64, site: u32 },
    /// A local route lookup that failed: no packet exists yet.
    Lookup { fl: u64, dst_orig: u64 },
}

/// The site of a drop location (`site::OTHER` where no range holds it).
#[inline(always)]
pub fn site_of(location: u64) -> u32 {
    let Some(tables) = CLAIM_TABLES.get(0) else {
        return site::OTHER;
    };
    for range in tables.sites.iter().take(MAX_SITES) {
        if location >= range.start && location < range.end {
            return range.site;
        }
    }
    site::OTHER
}

/// Which classes a drop at `site` may claim: XFRM's own drops only their
/// stage's, so a softirq drop cannot take a process-context increment of
/// another stage that is still on its way to its own drop.
#[inline(always)]
pub fn drop_mask(site: u32) -> u8 {
    match site {
        site::INPUT => class::ALL_IN,
        site::OUTPUT | site::OUTPUT_RESUME => class::OUT_XFORM,
        _ => class::AT_CALLERS,
    }
}

/// The bracket function an increment of `class` at `site` is named after
/// (the function that bumped it).
#[inline(always)]
fn hook_of(class_bits: u8, site: u32) -> u32 {
    match class_bits {
        class::IN_SA => hook::XFRM_INPUT,
        class::IN_EITHER if site == site::INPUT => hook::XFRM_INPUT,
        class::IN_POLICY | class::IN_EITHER => hook::POLICY_CHECK,
        class::OUT_FORWARD => hook::ROUTE_FORWARD,
        class::OUT_XFORM if site == site::OUTPUT => hook::OUTPUT,
        class::OUT_XFORM => hook::OUTPUT_RESUME,
        _ => hook::LOOKUP,
    }
}

/// The direction of the flow behind an increment of `class` at `site`.
#[inline(always)]
fn dir_of(class_bits: u8, site: u32) -> u8 {
    if class_bits & class::ALL_IN == 0 {
        dir::OUT
    } else if site == site::FORWARD {
        dir::FWD
    } else {
        dir::IN
    }
}

/// Claims, for the packet of `claimant`, what moved in `net`'s counters on
/// this CPU since the last claim, in the classes of `mask`.
#[inline(always)]
pub fn claim<C: StackIdContext>(ctx: &C, net: u64, mask: u8, claimant: Claimant) {
    let Some(tables) = CLAIM_TABLES.get(0) else {
        return;
    };
    if tables.armed == 0 || net == 0 {
        return;
    }
    let (netns, mib) = unsafe { netns_and_mib(net) };
    if mib == 0 {
        return;
    }
    let Some(frame) = CLAIM_FRAME.get_ptr_mut(0) else {
        return;
    };
    let frame = unsafe { &mut *frame };
    unsafe { read_counters(mib, &mut frame.before) };
    let Some(shadow) = shadow_of(netns, frame) else {
        return;
    };
    let shadow = unsafe { &mut *shadow };
    let mut moved_any = 0;
    for counter in 0..MAX_COUNTERS {
        let class_bits = tables.classes[counter];
        if class_bits & mask != 0 {
            moved_any |= frame.before[counter] ^ shadow.values[counter];
        }
    }
    if moved_any == 0 {
        return;
    }
    let site = describe(frame, netns, claimant);
    // One sample per claim, of the first counter that moved (a drop
    // nearly always moves one): the verifier walks the loop unrolled, and
    // a sample in each iteration would multiply its work. The counts stay
    // exact for every counter.
    let mut sampled = (0u32, 0u32, 0u8, 0u64);
    for counter in 0..MAX_COUNTERS {
        let class_bits = tables.classes[counter];
        if class_bits & mask == 0 {
            continue;
        }
        let moved = frame.before[counter].wrapping_sub(shadow.values[counter]);
        shadow.values[counter] = frame.before[counter];
        // Counters only grow; anything else is a torn read.
        if moved == 0 || moved > 1 << 32 {
            continue;
        }
        let hook_id = hook_of(class_bits, site);
        frame.flow.dir = dir_of(class_bits, site);
        record(counter as u32, hook_id, &frame.flow, moved);
        if sampled.3 == 0 {
            sampled = (counter as u32, hook_id, frame.flow.dir, moved);
        }
    }
    let (counter, hook_id, direction, moved) = sampled;
    if moved != 0 {
        frame.flow.dir = direction;
        sample(ctx, counter, hook_id, frame, moved);
    }
}

/// This CPU's shadow of `netns`. A netns first seen now was created after
/// the start (userspace set up every netns that existed then): its
/// counters started at zero.
#[inline(always)]
fn shadow_of(netns: u32, frame: &mut Frame) -> Option<*mut Shadow> {
    if let Some(shadow) = SHADOWS.get_ptr_mut(&netns) {
        return Some(shadow);
    }
    zero(&mut frame.nested);
    let zeros = unsafe { &*(core::ptr::addr_of!(frame.nested).cast::<Shadow>()) };
    // From a program, a new per-CPU element is zero on the other CPUs.
    if SHADOWS.insert(&netns, zeros, 0).is_err() {
        count_error(error::SHADOWS_FULL);
        return None;
    }
    SHADOWS.get_ptr_mut(&netns)
}

/// Fills the frame's flow (and headers) from the claimant; returns the
/// site the increments are named after.
#[inline(always)]
fn describe(frame: &mut Frame, netns: u32, claimant: Claimant) -> u32 {
    frame.flow = Default::default();
    frame.seq = 0;
    frame.headers.len = 0;
    frame.flow.netns = netns;
    match claimant {
        Claimant::Drop { skb, site } => {
            let (_, ifindex) = unsafe { skb_net(skb) };
            frame.flow.ifindex = ifindex;
            unsafe { capture::copy_headers(skb, &mut frame.headers) };
            match site {
                site::OUTPUT | site::OUTPUT_RESUME => unsafe { describe_output(skb, frame) },
                _ => {
                    unsafe { flow_from_skb(skb, &mut frame.flow, &mut frame.seq) };
                    unsafe { name_decapsulating_sa(skb, frame) }
                }
            }
            site
        }
        Claimant::Lookup { fl, dst_orig } => {
            let family = unsafe { route_family(dst_orig) };
            unsafe { flow_from_flowi(fl, family, &mut frame.flow) };
            site::OTHER
        }
    }
}

/// A packet dropped while its route's SA was being applied: that SA, and
/// the inner flow. Once the SA's mode has built the outer header (the
/// state checks of the output come after it), the packet's IP header is
/// the outer one, to the SA's peer, with the inner packet `header_len`
/// bytes on (not yet encrypted, except after a failed encryption).
#[inline(always)]
unsafe fn describe_output(skb: u64, frame: &mut Frame) {
    let Some(at) = (unsafe { network_header(skb) }) else {
        return;
    };
    let x = unsafe { route_sa(skb) };
    let mut inner_at = at;
    if x != 0 {
        unsafe { name_sa(x, &mut frame.flow) };
        let o = KERNEL_OFFSETS.load();
        let peer: [u8; 16] = unsafe { read_at(x, o.xfrm_state_daddr) }.unwrap_or([0; 16]);
        let header_len: u16 = unsafe { read_at(x, o.xfrm_state_header_len) }.unwrap_or(0);
        if unsafe { outer_header_to(at, &peer) } {
            inner_at = at + u64::from(header_len);
        }
    }
    // The SA named the packet: an ESP header's SPI must not replace it.
    if let Some(packet) = ip_at(inner_at) {
        let mut seq = 0;
        flow_from_packet(&packet, &mut frame.flow, &mut seq);
    }
}

/// Whether the IP header at `at` is a tunnel's outer header to `peer`.
#[inline(always)]
unsafe fn outer_header_to(at: u64, peer: &[u8; 16]) -> bool {
    let Ok(header) = (unsafe { bpf_probe_read_kernel(at as *const [u8; 40]) }) else {
        return false;
    };
    let (proto, dst) = match header[0] >> 4 {
        4 => (header[9], &header[16..20]),
        6 => (header[6], &header[24..40]),
        _ => return false,
    };
    dst == &peer[..dst.len()]
        && (dst.len() == 16 || peer[4..].iter().all(|b| *b == 0))
        && matches!(
            proto,
            IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_ESP | IPPROTO_AH
        )
}

/// What a tunnel's outer header says it carries before ESP or AH is
/// applied (IPv4 or IPv6 in IP), and after.
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;

/// The SA a received packet was decapsulated by, when it is the one the
/// packet's own ESP header names (or the packet is no longer ESP): on a
/// packet refused before its SA was found, an outer SA of a nested tunnel
/// must not be named.
#[inline(always)]
unsafe fn name_decapsulating_sa(skb: u64, frame: &mut Frame) {
    let x = unsafe { decapsulating_sa(skb) };
    if x == 0 {
        return;
    }
    let spi: u32 = unsafe { read_at(x, KERNEL_OFFSETS.load().xfrm_state_spi) }.unwrap_or(0);
    if frame.flow.spi == 0 || frame.flow.spi == spi {
        unsafe { name_sa(x, &mut frame.flow) };
    }
}

/// A netns is gone: its inode may be given to a new one, whose counters
/// start at zero.
#[inline(always)]
pub fn forget(netns: u32) {
    let _ = SHADOWS.remove(&netns);
}

/// Run by userspace (`BPF_PROG_TEST_RUN`, never attached) on each CPU
/// from inside each netns that exists at the start: the shadow of the
/// caller's netns on this CPU takes the counters as they are now.
#[raw_tracepoint]
pub fn shadow_init(_ctx: RawTracePointContext) -> i32 {
    let o = KERNEL_OFFSETS.load();
    let task = unsafe { bpf_get_current_task() };
    let Ok(nsproxy) = (unsafe { read_at::<u64>(task, o.task_struct_nsproxy) }) else {
        return 1;
    };
    let Ok(net) = (unsafe { read_at::<u64>(nsproxy, o.nsproxy_net_ns) }) else {
        return 1;
    };
    let (netns, mib) = unsafe { netns_and_mib(net) };
    if mib == 0 {
        return 1;
    }
    let Some(frame) = CLAIM_FRAME.get_ptr_mut(0) else {
        return 1;
    };
    let frame = unsafe { &mut *frame };
    let Some(shadow) = shadow_of(netns, frame) else {
        return 1;
    };
    unsafe { read_counters(mib, &mut (*shadow).values) };
    0
}

// Local route lookups (`xfrm_lookup_route(net, dst_orig, fl, sk, flags)`,
// for sockets: no packet exists yet, so no drop follows an increment).
// Every increment of the lookup is on a path that returns an error or,
// for a missing SA, a blackhole route: a route carrying an SA, or the
// original route (no policy), means nothing moved.

/// Whether the lookup's result can hide an increment.
#[inline(always)]
fn lookup_failed(result: u64, dst_orig: u64) -> bool {
    if is_null_or_error(result) {
        return true;
    }
    if result == dst_orig {
        return false;
    }
    let x: u64 = unsafe { read_at(result, KERNEL_OFFSETS.load().dst_entry_xfrm) }.unwrap_or(0);
    x == 0
}

/// Claims a failed lookup's increments (`result` is what it returned).
#[inline(always)]
fn claim_lookup<C: StackIdContext>(ctx: &C, net: u64, dst_orig: u64, fl: u64, result: u64) {
    if lookup_failed(result, dst_orig) {
        claim(
            ctx,
            net,
            class::OUT_LOOKUP,
            Claimant::Lookup { fl, dst_orig },
        );
    }
}

#[fexit(function = "xfrm_lookup_route")]
pub fn lookup_route_exit(ctx: FExitContext) -> u32 {
    let net: u64 = ctx.arg(0);
    let dst_orig: u64 = ctx.arg(1);
    let fl: u64 = ctx.arg(2);
    claim_lookup(&ctx, net, dst_orig, fl, ctx.arg(5));
    0
}

/// The arguments of the open `xfrm_lookup_route` calls on this CPU, for the
/// kretprobe (which cannot read them): a softirq's lookup can nest in a
/// process-context one.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OpenLookups {
    depth: u64,
    calls: [[u64; 3]; 4],
}

#[map]
static OPEN_LOOKUPS: PerCpuArray<OpenLookups> = PerCpuArray::with_max_entries(1, 0);

#[kprobe]
pub fn lookup_route_kprobe(ctx: ProbeContext) -> u32 {
    let Some(open) = OPEN_LOOKUPS.get_ptr_mut(0) else {
        return 0;
    };
    let open = unsafe { &mut *open };
    let depth = open.depth as usize;
    if depth < 4 {
        open.calls[depth & 3] = [
            ctx.arg(0).unwrap_or(0),
            ctx.arg(1).unwrap_or(0),
            ctx.arg(2).unwrap_or(0),
        ];
    }
    open.depth += 1;
    0
}

#[kretprobe]
pub fn lookup_route_kretprobe(ctx: RetProbeContext) -> u32 {
    let Some(open) = OPEN_LOOKUPS.get_ptr_mut(0) else {
        return 0;
    };
    let open = unsafe { &mut *open };
    if open.depth == 0 {
        count_error(error::UNBALANCED);
        return 0;
    }
    open.depth -= 1;
    let depth = open.depth as usize;
    if depth >= 4 {
        return 0;
    }
    let [net, dst_orig, fl] = open.calls[depth & 3];
    claim_lookup(&ctx, net, dst_orig, fl, ctx.ret());
    0
}
