//! Attribution of XFRM counter increments to packets: at the drop
//! (`claims`, the default) or with the bracket and enrichment hooks, and
//! reading what they recorded.

pub mod claims;

use std::net::{Ipv4Addr, Ipv6Addr};
use tracer_common::names::programs;

use aya::{
    Ebpf,
    maps::{PerCpuArray, PerCpuHashMap, StackTraceMap},
};
use serde::{Deserialize, Serialize};
use tracer_common::attribution::{Sample, SourceKey, dir, error, hook};
use tracer_common::names::maps;

use crate::{
    btf::KernelBtf,
    hooks::{self, HookOutcome, HookSpec, Method, Mode, Needs, Prototype, Role, Variant},
    kallsyms::Kallsyms,
    model::{HookList, Names},
    xfrm_state::{FlowQuery, XfrmBook},
};

/// The brackets (fentry/fexit, else kprobe/kretprobe) and the enrichment
/// exits that name the SA and the policy.
pub const HOOKS: &[HookSpec] = &[
    HookSpec::new(
        "xfrm_input",
        Role::Bracket,
        &[Variant::bracket(
            programs::xfrm_input_entry,
            programs::xfrm_input_exit,
            programs::xfrm_input_kprobe,
            programs::xfrm_input_kretprobe,
        )],
    ),
    HookSpec::new(
        "__xfrm_policy_check",
        Role::Bracket,
        &[Variant::bracket(
            programs::policy_check_entry,
            programs::policy_check_exit,
            programs::policy_check_kprobe,
            programs::policy_check_kretprobe,
        )],
    ),
    HookSpec::new(
        "__xfrm_route_forward",
        Role::Bracket,
        &[Variant::bracket(
            programs::route_forward_entry,
            programs::route_forward_exit,
            programs::route_forward_kprobe,
            programs::route_forward_kretprobe,
        )],
    ),
    HookSpec::new(
        "xfrm_lookup_with_ifid",
        Role::Bracket,
        &[Variant::bracket(
            programs::lookup_entry,
            programs::lookup_exit,
            programs::lookup_kprobe,
            programs::lookup_kretprobe,
        )],
    ),
    HookSpec::new(
        "xfrm_output",
        Role::Bracket,
        &[Variant::bracket(
            programs::output_entry,
            programs::output_exit,
            programs::output_kprobe,
            programs::output_kretprobe,
        )],
    ),
    // xfrm_output_resume gained an `sk` argument in 5.14; the programs read
    // the skb at a fixed position, one set per prototype.
    HookSpec::new(
        "xfrm_output_resume",
        Role::Bracket,
        &[
            Variant::bracket(
                programs::output_resume_entry,
                programs::output_resume_exit,
                programs::output_resume_kprobe,
                programs::output_resume_kretprobe,
            )
            .prototype(Prototype::SkbAt(1)),
            Variant::bracket(
                programs::output_resume_old_entry,
                programs::output_resume_old_exit,
                programs::output_resume_old_kprobe,
                programs::output_resume_old_kretprobe,
            )
            .prototype(Prototype::SkbAt(0)),
        ],
    ),
    // The fexit programs read the return value after six arguments.
    HookSpec::new(
        "xfrm_state_lookup",
        Role::Enrichment,
        &[Variant::exit(
            programs::state_lookup_exit,
            Some(programs::state_lookup_kretprobe),
        )
        .prototype(Prototype::ExitAfterArgs(ENRICHMENT_ARGS))],
    )
    .needs(Needs::InBtf),
    // 6.12+.
    HookSpec::new(
        "xfrm_input_state_lookup",
        Role::Enrichment,
        &[Variant::exit(
            programs::input_state_lookup_exit,
            Some(programs::state_lookup_kretprobe),
        )
        .prototype(Prototype::ExitAfterArgs(ENRICHMENT_ARGS))],
    )
    .needs(Needs::InBtf),
    HookSpec::new(
        "xfrm_policy_lookup_bytype",
        Role::Enrichment,
        &[Variant::exit(
            programs::policy_lookup_exit,
            Some(programs::policy_lookup_kretprobe),
        )
        .prototype(Prototype::ExitAfterArgs(ENRICHMENT_ARGS))],
    )
    .needs(Needs::InBtf),
];
const ENRICHMENT_ARGS: usize = 6;

/// How increments are tied to packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Diff at the drop: the counters are compared only when a packet is
    /// dropped (and after a failed local route lookup); a healthy packet
    /// runs nothing.
    #[default]
    DropDiff,
    /// Brackets around every call of the functions that bump counters
    /// (`--brackets`): per packet, names the exact function.
    Brackets,
}

/// What got attached.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Coverage {
    pub strategy: Strategy,
    /// Every bracket (or claim hook) attached: every increment can be tied
    /// to its packet.
    pub complete: bool,
    /// Brackets attached with fentry/fexit and with kprobe/kretprobe.
    pub fentry_brackets: usize,
    pub kprobe_brackets: usize,
    pub attached: Vec<String>,
    /// Functions that could not be hooked, and why.
    pub missing: Vec<(String, String)>,
}

impl Coverage {
    /// The published form of what `HOOKS` got.
    pub fn of(outcomes: &[HookOutcome]) -> Self {
        let HookList { attached, missing } = hooks::hook_list(outcomes, "all brackets");
        let brackets: Vec<Option<Method>> = outcomes
            .iter()
            .filter(|o| matches!(o.role(), Role::Bracket | Role::Claim))
            .map(|o| o.via)
            .collect();
        let strategy = if outcomes.iter().any(|o| o.role() == Role::Bracket) {
            Strategy::Brackets
        } else {
            Strategy::DropDiff
        };
        let hooked_by = |method| brackets.iter().filter(|via| **via == Some(method)).count();
        Self {
            strategy,
            complete: !brackets.is_empty() && brackets.iter().all(Option::is_some),
            fentry_brackets: hooked_by(Method::Fentry),
            kprobe_brackets: hooked_by(Method::Kprobe),
            attached,
            missing,
        }
    }

    /// No bracket attached, for the one reason given.
    pub fn none(why: String) -> Self {
        Self {
            missing: vec![("all brackets".into(), why)],
            ..Self::default()
        }
    }

    /// The mode as the report names it.
    pub fn mode(&self) -> Mode {
        Mode::of_brackets(self.fentry_brackets, self.kprobe_brackets, self.complete)
    }
}

/// Why no bracket is attached on a kernel without `__per_cpu_offset` in
/// kallsyms (the brackets cannot read counters without it); but when no
/// function can be hooked at all, that is the reason to give.
pub fn without_per_cpu_offset(ebpf: &mut Ebpf, btf: &KernelBtf, kallsyms: &Kallsyms) -> Coverage {
    Coverage::none(
        match crate::capabilities::function_hooks(ebpf, btf, kallsyms) {
            Ok(()) => "__per_cpu_offset is not in /proc/kallsyms (kernel without CONFIG_KALLSYMS_ALL?): counters cannot be read per packet".into(),
            Err(no_hooks) => no_hooks,
        },
    )
}

/// The raw attribution table, summed over CPUs, and the error counts.
pub fn read(
    ebpf: &Ebpf,
) -> Result<(Vec<(SourceKey, u64)>, AttributionErrors), aya::maps::MapError> {
    let map = |name: &str| {
        ebpf.map(name)
            .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })
    };
    let table: PerCpuHashMap<_, SourceKey, u64> = PerCpuHashMap::try_from(map(maps::SOURCES)?)?;
    let mut rows = Vec::new();
    for entry in table.iter() {
        let (key, per_cpu) = entry?;
        rows.push((key, per_cpu.iter().sum()));
    }
    let errors: PerCpuArray<_, u64> = PerCpuArray::try_from(map(maps::ATTRIBUTION_ERRORS)?)?;
    let sum = |index: u32| -> Result<u64, aya::maps::MapError> {
        Ok(errors.get(&index, 0)?.iter().sum())
    };
    Ok((
        rows,
        AttributionErrors {
            unbalanced: sum(error::UNBALANCED)?,
            too_deep: sum(error::TOO_DEEP)?,
            table_full: sum(error::TABLE_FULL)?,
            samples_lost: sum(error::SAMPLES_LOST)?,
        },
    ))
}

/// Events the attribution could not account for (shown, never hidden).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct AttributionErrors {
    pub unbalanced: u64,
    pub too_deep: u64,
    pub table_full: u64,
    /// Samples not sent (rate limit, full ring buffer); counts stay exact.
    pub samples_lost: u64,
}

/// Most samples kept for the report (the counts stay exact regardless).
pub const SAMPLES_KEPT: usize = 1000;

/// The kernel stack of a sample, innermost first, as `function+0xoff` (the
/// raw address where no symbol contains it), without the frames of
/// xfrm-trace itself; and how many of those were left out.
pub fn stack(ebpf: &Ebpf, stack_id: i64, kallsyms: &Kallsyms) -> (Vec<String>, usize) {
    let (Ok(id), Some(map)) = (u32::try_from(stack_id), ebpf.map(maps::STACKS)) else {
        return (Vec::new(), 0);
    };
    let Ok(stacks) = StackTraceMap::try_from(map) else {
        return (Vec::new(), 0);
    };
    let Ok(trace) = stacks.get(&id, 0) else {
        return (Vec::new(), 0);
    };
    let ours: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
    let mut left_out = 0;
    let frames = trace
        .frames()
        .iter()
        .filter_map(|frame| match kallsyms.symbolize(frame.ip) {
            Some((symbol, _)) if is_own_frame(&symbol, &ours) => {
                left_out += 1;
                None
            }
            Some((symbol, offset)) => Some(format!("{}+{offset:#x}", symbol.name)),
            None => Some(format!("{:#x}", frame.ip)),
        })
        .collect();
    (frames, left_out)
}

/// A frame of xfrm-trace, not of the kernel path that kernel developers
/// read the stack for: one of our programs (`bpf_prog_<tag>_<name>`, the
/// name cut to 15 characters when the kernel lacks its BTF) or the BPF
/// trampoline that calls our fentry/fexit programs.
fn is_own_frame(symbol: &crate::kallsyms::Symbol<'_>, ours: &[&str]) -> bool {
    /// The kernel's limit on a program's own name (BPF_OBJ_NAME_LEN - 1).
    const SHORT_NAME: usize = 15;
    if symbol.module != Some(crate::kallsyms::BPF_MODULE) {
        return false;
    }
    if symbol.name.starts_with("bpf_trampoline_") {
        return true;
    }
    let Some(name) = symbol
        .name
        .strip_prefix("bpf_prog_")
        .and_then(|rest| rest.split_once('_'))
        .map(|(_tag, name)| name)
    else {
        return false;
    };
    ours.iter()
        .any(|&own| own == name || (name.len() == SHORT_NAME && own.starts_with(name)))
}

/// One sampled increment as the report has it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleReport {
    /// Milliseconds since the first sample of the run.
    pub time_ms: u64,
    /// `CLOCK_MONOTONIC` nanoseconds (for the pcapng).
    #[serde(skip)]
    pub time_ns: u64,
    /// The packet's first bytes (none for a route lookup).
    #[serde(skip)]
    pub captured: Option<crate::model::Captured>,
    #[serde(flatten)]
    pub source: Source,
    /// ESP sequence number of the packet (inbound ESP only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    pub stack: Vec<String>,
    /// Frames of xfrm-trace itself (its programs, their BPF trampoline)
    /// left out of `stack`.
    pub own_frames_left_out: usize,
}

/// Samples shown per counter (the counts stay exact regardless).
pub const SAMPLES_PER_COUNTER: usize = 16;

/// A kept sample with its symbolized stack (read while the programs' maps
/// are still open), before it is named.
#[derive(Clone, Debug)]
pub struct StackSample {
    pub counter: u32,
    key: SourceKey,
    count: u64,
    time_ms: u64,
    time_ns: u64,
    captured: Option<crate::model::Captured>,
    seq: Option<u32>,
    stack: Vec<String>,
    own_frames_left_out: usize,
}

impl StackSample {
    /// The sample as the report has it, its source named.
    pub fn report(self, names: &Names) -> SampleReport {
        SampleReport {
            time_ms: self.time_ms,
            time_ns: self.time_ns,
            captured: self.captured,
            source: source(&self.key, self.count, names),
            seq: self.seq,
            stack: self.stack,
            own_frames_left_out: self.own_frames_left_out,
        }
    }
}

/// The kept samples with symbolized stacks, at most `SAMPLES_PER_COUNTER`
/// per counter. `kallsyms` must know our programs and their trampolines
/// (`with_current_bpf_symbols`).
pub fn stack_samples(ebpf: &Ebpf, samples: &[Sample], kallsyms: &Kallsyms) -> Vec<StackSample> {
    let first = samples.iter().map(|s| s.time_ns).min().unwrap_or(0);
    let mut shown: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    samples
        .iter()
        .filter(|s| {
            let n = shown.entry(s.counter).or_default();
            *n += 1;
            *n <= SAMPLES_PER_COUNTER
        })
        .map(|s| {
            let (stack, own_frames_left_out) = stack(ebpf, s.stack_id, kallsyms);
            StackSample {
                counter: s.counter,
                key: SourceKey {
                    counter: s.counter,
                    hook: s.hook,
                    flow: s.flow,
                },
                count: s.count,
                time_ms: (s.time_ns - first) / 1_000_000,
                time_ns: s.time_ns,
                captured: crate::model::Captured::from_headers(s.time_ns, &s.headers),
                seq: (s.seq != 0).then(|| u32::from_be(s.seq)),
                stack,
                own_frames_left_out,
            }
        })
        .collect()
}

/// One source of increments of a counter, as the JSON report has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub count: u64,
    pub function: String,
    pub netns: u64,
    /// `host`, the `ip netns` name, or `netns:<inode>`.
    pub netns_label: String,
    pub dir: String,
    pub family: String,
    pub src: String,
    pub dst: String,
    pub proto: String,
    pub sport: u16,
    pub dport: u16,
    /// Hex, as `ip xfrm` shows it (`0x00001001`); empty when none.
    pub spi: String,
    pub reqid: u32,
    pub policy_index: u32,
    /// `in`, `out` or `fwd` from the policy index (its low 3 bits).
    pub policy_dir: String,
    pub ifindex: u32,
    pub ifname: String,
    /// The policy's selector, `src -> dst` (from the kernel's policies as
    /// seen during the run; empty if unknown).
    pub policy_selector: String,
    /// The libreswan connection owning the SA (joined from pluto when the
    /// report is assembled).
    pub connection: String,
    /// pluto's Child SA state number (`#N`), 0 if unknown.
    pub pluto_state: u32,
}

fn function_name(hook_id: u32) -> &'static str {
    match hook_id {
        hook::XFRM_INPUT => "xfrm_input",
        hook::POLICY_CHECK => "__xfrm_policy_check",
        hook::ROUTE_FORWARD => "__xfrm_route_forward",
        hook::LOOKUP => "xfrm_lookup_with_ifid",
        hook::OUTPUT => "xfrm_output",
        hook::OUTPUT_RESUME => "xfrm_output_resume",
        _ => "?",
    }
}

fn dir_name(direction: u8) -> &'static str {
    match direction {
        dir::IN => "in",
        dir::OUT => "out",
        dir::FWD => "fwd",
        _ => "?",
    }
}

/// The protocol number of a name `proto_name` gave.
fn proto_number(name: &str) -> u8 {
    match name {
        "icmp" => 1,
        "tcp" => 6,
        "udp" => 17,
        "esp" => 50,
        "ah" => 51,
        "icmpv6" => 58,
        other => other.parse().unwrap_or(0),
    }
}

fn proto_name(proto: u8) -> String {
    match proto {
        0 => "-".into(),
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        58 => "icmpv6".into(),
        other => other.to_string(),
    }
}

/// Names the policy of an increment attributed at the drop, where the
/// programs saw no policy: the one the kernel picks for the flow in the
/// direction of the check or lookup that refused it. A counter that says
/// no policy was found (XfrmInNoPols) names none.
pub fn name_policy(source: &mut Source, counter: &str, book: &XfrmBook) {
    let dir = match source.function.as_str() {
        "__xfrm_policy_check" if counter != "XfrmInNoPols" => source.dir.as_str(),
        "xfrm_lookup_with_ifid" | "__xfrm_route_forward" => "out",
        _ => return,
    };
    if source.policy_index != 0 {
        return;
    }
    let (Ok(src), Ok(dst)) = (source.src.parse(), source.dst.parse()) else {
        return;
    };
    let flow = FlowQuery {
        src,
        dst,
        proto: proto_number(&source.proto),
        sport: source.sport,
        dport: source.dport,
    };
    if let Some(policy) = book.policy_for(source.netns, dir, &flow) {
        source.policy_index = policy.index;
        source.policy_dir = policy.dir.to_string();
    }
}

/// Turns a table row into its report form (the counter is the caller's).
/// The joins with the SAs' policies and pluto come later
/// (`policy_selector`, `connection`, `pluto_state`).
pub fn source(key: &SourceKey, count: u64, names: &Names) -> Source {
    let flow = &key.flow;
    let (family, src, dst) = match flow.family {
        2 => (
            "ipv4",
            Ipv4Addr::new(flow.src[0], flow.src[1], flow.src[2], flow.src[3]).to_string(),
            Ipv4Addr::new(flow.dst[0], flow.dst[1], flow.dst[2], flow.dst[3]).to_string(),
        ),
        10 => (
            "ipv6",
            Ipv6Addr::from(flow.src).to_string(),
            Ipv6Addr::from(flow.dst).to_string(),
        ),
        _ => ("-", String::new(), String::new()),
    };
    Source {
        count,
        function: function_name(key.hook).into(),
        netns: u64::from(flow.netns),
        netns_label: names.label(u64::from(flow.netns)),
        dir: dir_name(flow.dir).into(),
        family: family.into(),
        src,
        dst,
        proto: proto_name(flow.proto),
        sport: u16::from_be(flow.sport),
        dport: u16::from_be(flow.dport),
        spi: if flow.spi == 0 {
            String::new()
        } else {
            format!("{:#010x}", u32::from_be(flow.spi))
        },
        reqid: flow.reqid,
        policy_index: flow.policy_index,
        policy_dir: if flow.policy_index == 0 {
            ""
        } else {
            dir_name((flow.policy_index & 7) as u8)
        }
        .into(),
        ifindex: flow.ifindex,
        ifname: names.ifname(u64::from(flow.netns), flow.ifindex),
        policy_selector: String::new(),
        connection: String::new(),
        pluto_state: 0,
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::attribution::Flow;

    use super::*;

    #[test]
    fn own_programs_and_trampolines_are_our_frames() {
        use crate::kallsyms::Kallsyms;
        let syms = Kallsyms::parse(
            "ffffffff821149c0 T xfrm_input
ffffffffc0027388 t bpf_prog_aa1fa657af38baff_xfrm_input_exit\t[bpf]
ffffffffc0028000 t bpf_prog_0123456789abcdef_input_state_loo\t[bpf]
ffffffffc0029000 t bpf_prog_0123456789abcdef_other_tool\t[bpf]
ffffffffc0031000 t bpf_trampoline_6442516531\t[bpf]
ffffffffc0040000 t bpf_prog_ffff_in_module\t[esp4]
",
        );
        let ours = ["xfrm_input_exit", "input_state_lookup_exit"];
        let own = |address: u64| is_own_frame(&syms.symbolize(address).unwrap().0, &ours);
        assert!(own(0xffffffffc0027390));
        // The kernel's 15-character name when it has no BTF for ours.
        assert!(own(0xffffffffc0028010));
        assert!(own(0xffffffffc0031010));
        assert!(!own(0xffffffffc0029010), "another tool's program");
        assert!(!own(0xffffffff821149c8));
        assert!(!own(0xffffffffc0040010), "not a BPF program");
    }

    #[test]
    fn sources_read_like_ip_xfrm() {
        let mut flow = Flow {
            family: 2,
            proto: 50,
            dir: dir::IN,
            netns: 7,
            reqid: 1,
            ..Flow::default()
        };
        flow.src[..4].copy_from_slice(&[192, 0, 2, 1]);
        flow.dst[..4].copy_from_slice(&[203, 0, 113, 1]);
        flow.spi = 0x1001u32.to_be();
        flow.policy_index = 0x1a; // index 3, direction fwd (2)
        flow.dport = 4500u16.to_be();
        flow.ifindex = 2;
        let netns = [crate::model::NetnsInfo::with_interfaces(
            7,
            "east",
            &[(2, "wan0")],
        )];
        let s = source(
            &SourceKey {
                counter: 4,
                hook: hook::XFRM_INPUT,
                flow,
            },
            5,
            &Names::new(&netns),
        );
        assert_eq!(
            (s.netns_label.as_str(), s.ifname.as_str()),
            ("east", "wan0")
        );
        assert_eq!(
            (s.src.as_str(), s.dst.as_str(), s.proto.as_str()),
            ("192.0.2.1", "203.0.113.1", "esp")
        );
        assert_eq!(
            (s.spi.as_str(), s.function.as_str(), s.dir.as_str(), s.count),
            ("0x00001001", "xfrm_input", "in", 5)
        );
        assert_eq!((s.policy_dir.as_str(), s.dport), ("fwd", 4500));
    }
}
