//! The bracket programs (see `tracer_common::attribution`): for each
//! function that bumps XFRM counters, which argument is the packet and
//! which the token that matches an exit to its entry; and the enrichment
//! programs that name the SA and policy behind an increment. What a
//! bracket does at entry and exit is in `attribution`.

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe},
    programs::{FEntryContext, FExitContext, ProbeContext, RetProbeContext},
};
use tracer_common::attribution::{dir, hook};

use crate::{
    args::Args,
    attribution::{self, Packet},
};

// Brackets around every XFRM counter increment site (docs/kernel.md §1). The
// function names in the attributes are only section names: userspace loads
// each program against its target from BTF (fentry/fexit) or attaches the
// kprobe/kretprobe pair to the symbol where fentry is not possible.

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
