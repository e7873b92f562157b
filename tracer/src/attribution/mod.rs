//! Attribution of XFRM counter increments to packets: attaching the bracket
//! and enrichment programs, and reading what they recorded.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    Btf, Ebpf,
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf, StackTraceMap},
    programs::{FExit, KProbe},
};
use serde::{Deserialize, Serialize};
use tracer_common::attribution::{Sample, SourceKey, dir, error, hook};

use crate::{
    btf::KernelBtf,
    ebpf::{attach_fentry, attach_fexit, attach_kprobe, program},
    hooks::HookChoice,
    kallsyms::{Kallsyms, Presence},
};

/// A bracket: the function and its programs, named `<prefix>_entry`,
/// `_exit` (fentry/fexit) and `_kprobe`, `_kretprobe`.
struct Bracket {
    function: &'static str,
    prefix: &'static str,
}

const fn bracket(function: &'static str, prefix: &'static str) -> Bracket {
    Bracket { function, prefix }
}

const BRACKETS: &[Bracket] = &[
    bracket("xfrm_input", "xfrm_input"),
    bracket("__xfrm_policy_check", "policy_check"),
    bracket("__xfrm_route_forward", "route_forward"),
    bracket("xfrm_lookup_with_ifid", "lookup"),
    bracket("xfrm_output", "output"),
];

/// xfrm_output_resume gained an `sk` argument in 5.14. The programs read
/// the skb at a fixed position, so pick the set that matches this kernel's
/// prototype.
fn output_resume(btf: &KernelBtf) -> Result<Bracket, String> {
    let params = btf
        .function_params("xfrm_output_resume")
        .unwrap_or_default();
    match params.iter().position(|p| p == "skb") {
        Some(1) => Ok(bracket("xfrm_output_resume", "output_resume")),
        Some(0) => Ok(bracket("xfrm_output_resume", "output_resume_old")),
        _ => Err(format!(
            "unexpected prototype xfrm_output_resume({})",
            params.join(", ")
        )),
    }
}

/// (function, fexit program, kretprobe program): name the SA and the
/// policy. Only the functions this kernel has are attached
/// (xfrm_input_state_lookup is 6.12+); the fexit programs read the return
/// value after six arguments.
const ENRICHMENT: &[(&str, &str, &str)] = &[
    (
        "xfrm_state_lookup",
        "state_lookup_exit",
        "state_lookup_kretprobe",
    ),
    (
        "xfrm_input_state_lookup",
        "input_state_lookup_exit",
        "state_lookup_kretprobe",
    ),
    (
        "xfrm_policy_lookup_bytype",
        "policy_lookup_exit",
        "policy_lookup_kretprobe",
    ),
];
const ENRICHMENT_ARGS: usize = 6;

/// What got attached.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Coverage {
    /// Every bracket attached: every increment can be tied to its packet.
    pub complete: bool,
    /// Brackets attached with fentry/fexit and with kprobe/kretprobe.
    pub fentry_brackets: usize,
    pub kprobe_brackets: usize,
    pub attached: Vec<String>,
    /// Functions that could not be hooked, and why.
    pub missing: Vec<(String, String)>,
}

impl Coverage {
    /// The mode as the report names it.
    pub fn mode(&self) -> String {
        let method = match (self.fentry_brackets, self.kprobe_brackets) {
            (0, 0) => return "tracepoint-only".into(),
            (_, 0) => "fentry",
            (0, _) => "kprobe",
            _ => "fentry+kprobe",
        };
        if self.complete {
            method.into()
        } else {
            format!("{method} (partial)")
        }
    }
}

/// fexit before fentry, kretprobe before kprobe: an exit without its entry
/// is ignored, an entry without its exit would leave a frame open.
fn attach_bracket(
    ebpf: &mut Ebpf,
    bracket: &Bracket,
    kprobe: bool,
    btf: &Btf,
) -> Result<(), String> {
    let name = |suffix: &str| format!("{}_{suffix}", bracket.prefix);
    if kprobe {
        let exit = attach_kprobe(ebpf, &name("kretprobe"), bracket.function)?;
        if let Err(e) = attach_kprobe(ebpf, &name("kprobe"), bracket.function) {
            let prog: &mut KProbe = program(ebpf, &name("kretprobe"))?;
            let _ = prog.detach(exit);
            return Err(e);
        }
        return Ok(());
    }
    attach_fexit(ebpf, &name("exit"), bracket.function, btf)?;
    if let Err(e) = attach_fentry(ebpf, &name("entry"), bracket.function, btf) {
        // Unload the fexit (and its link) so a kprobe pair can take over.
        let prog: &mut FExit = program(ebpf, &name("exit"))?;
        let _ = prog.unload();
        return Err(e);
    }
    Ok(())
}

/// The fentry/fexit programs `attach` will try, with their functions (to
/// verify them beforehand, in parallel).
pub fn fentry_programs(kernel_btf: &KernelBtf) -> Vec<(String, &'static str)> {
    let mut programs = Vec::new();
    for bracket in BRACKETS
        .iter()
        .chain(output_resume(kernel_btf).as_ref().ok())
    {
        for suffix in ["exit", "entry"] {
            programs.push((format!("{}_{suffix}", bracket.prefix), bracket.function));
        }
    }
    for (function, fexit, _) in ENRICHMENT {
        if kernel_btf
            .function_params(function)
            .is_some_and(|params| params.len() == ENRICHMENT_ARGS)
        {
            programs.push((fexit.to_string(), *function));
        }
    }
    programs
}

/// Attaches every bracket and enrichment program this kernel allows:
/// fentry/fexit first, kprobes for what fentry cannot reach (unless
/// `choice` says otherwise). The links live as long as `ebpf`.
pub fn attach(
    ebpf: &mut Ebpf,
    kernel_btf: &KernelBtf,
    btf: &Result<Btf, String>,
    kallsyms: &Kallsyms,
    has_per_cpu_offset: bool,
    choice: HookChoice,
) -> Coverage {
    let mut coverage = Coverage::default();
    if choice == HookChoice::Tracepoint {
        coverage
            .missing
            .push(("all brackets".into(), "--hooks tracepoint".into()));
        return coverage;
    }
    if !has_per_cpu_offset {
        // The brackets cannot read counters without it, but when no
        // function can be hooked at all, that is the reason to give.
        let why = match crate::capabilities::function_hooks(ebpf, kernel_btf, kallsyms) {
            Ok(()) => "__per_cpu_offset is not in /proc/kallsyms (kernel without CONFIG_KALLSYMS_ALL?): counters cannot be read per packet".into(),
            Err(no_hooks) => no_hooks,
        };
        coverage.missing.push(("all brackets".into(), why));
        return coverage;
    }
    let mut all = true;
    let resume = output_resume(kernel_btf);
    if let Err(why) = &resume {
        all = false;
        coverage
            .missing
            .push(("xfrm_output_resume".into(), why.clone()));
    }
    let kprobe_target = |function: &str| match kallsyms.presence(function) {
        Presence::Exact { .. } => Ok(()),
        Presence::CloneOnly(clone) => Err(format!("only the compiler clone {clone} exists")),
        Presence::Absent => Err("not in /proc/kallsyms (inlined?)".to_string()),
    };
    for bracket in BRACKETS.iter().chain(resume.as_ref().ok()) {
        let mut errors = Vec::new();
        let mut method = None;
        if choice != HookChoice::Kprobe {
            match btf
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|btf| attach_bracket(ebpf, bracket, false, btf))
            {
                Ok(()) => method = Some("fentry"),
                Err(e) => errors.push(format!("fentry: {e}")),
            }
        }
        if method.is_none() && choice != HookChoice::Fentry {
            let attached = kprobe_target(bracket.function).and_then(|()| {
                // kprobes need no BTF; any loaded `Btf` will do for the call.
                let empty = Btf::new();
                attach_bracket(ebpf, bracket, true, btf.as_ref().unwrap_or(&empty))
            });
            match attached {
                Ok(()) => method = Some("kprobe"),
                Err(e) => errors.push(format!("kprobe: {e}")),
            }
        }
        match method {
            Some(method) => {
                if method == "fentry" {
                    coverage.fentry_brackets += 1;
                } else {
                    coverage.kprobe_brackets += 1;
                }
                coverage
                    .attached
                    .push(format!("{} ({method})", bracket.function));
            }
            None => {
                all = false;
                coverage
                    .missing
                    .push((bracket.function.to_string(), errors.join("; ")));
            }
        }
    }
    for (function, fexit, kretprobe) in ENRICHMENT {
        let Some(params) = kernel_btf.function_params(function) else {
            continue;
        };
        let fexit_result = if choice == HookChoice::Kprobe {
            Err("--hooks kprobe".to_string())
        } else if params.len() != ENRICHMENT_ARGS {
            Err(format!(
                "unexpected prototype ({} arguments, expected {ENRICHMENT_ARGS})",
                params.len()
            ))
        } else {
            btf.as_ref()
                .map_err(Clone::clone)
                .and_then(|btf| attach_fexit(ebpf, fexit, function, btf))
        };
        let result = match fexit_result {
            Ok(()) => Ok("fexit"),
            Err(_) if choice == HookChoice::Fentry => Err("fexit failed".to_string()),
            Err(fexit_error) => kprobe_target(function)
                .and_then(|()| attach_kprobe(ebpf, kretprobe, function).map(drop))
                .map(|()| "kretprobe")
                .map_err(|e| format!("fexit: {fexit_error}; kretprobe: {e}")),
        };
        match result {
            Ok(method) => coverage.attached.push(format!("{function} ({method})")),
            Err(e) => coverage.missing.push((function.to_string(), e)),
        }
    }
    coverage.complete = all;
    coverage
}

/// The raw attribution table, summed over CPUs, and the error counts.
pub fn read(
    ebpf: &Ebpf,
) -> Result<(Vec<(SourceKey, u64)>, AttributionErrors), aya::maps::MapError> {
    let map = |name: &str| {
        ebpf.map(name)
            .ok_or_else(|| aya::maps::MapError::InvalidName { name: name.into() })
    };
    let table: PerCpuHashMap<_, SourceKey, u64> = PerCpuHashMap::try_from(map("SOURCES")?)?;
    let mut rows = Vec::new();
    for entry in table.iter() {
        let (key, per_cpu) = entry?;
        rows.push((key, per_cpu.iter().sum()));
    }
    let errors: PerCpuArray<_, u64> = PerCpuArray::try_from(map("ATTRIBUTION_ERRORS")?)?;
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

/// The ring buffer of per-increment samples, taken out of the object so it
/// can be drained while the programs run.
pub fn take_samples(ebpf: &mut Ebpf) -> Option<RingBuf<MapData>> {
    RingBuf::try_from(ebpf.take_map("SAMPLES")?).ok()
}

/// The kernel stack of a sample, innermost first, as `function+0xoff` (the
/// raw address where no symbol contains it), without the frames of
/// xfrm-trace itself; and how many of those were left out.
pub fn stack(ebpf: &Ebpf, stack_id: i64, kallsyms: &Kallsyms) -> (Vec<String>, usize) {
    let (Ok(id), Some(map)) = (u32::try_from(stack_id), ebpf.map("STACKS")) else {
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

/// The kept samples in report form, with symbolized stacks (read while the
/// programs' maps are still open), by counter index. `kallsyms` must know
/// our programs and their trampolines (`with_current_bpf_symbols`).
pub fn sample_reports(
    ebpf: &Ebpf,
    samples: &[Sample],
    kallsyms: &Kallsyms,
) -> Vec<(u32, SampleReport)> {
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
            let key = SourceKey {
                counter: s.counter,
                hook: s.hook,
                flow: s.flow,
            };
            let (stack, own_frames_left_out) = stack(ebpf, s.stack_id, kallsyms);
            let report = SampleReport {
                time_ms: (s.time_ns - first) / 1_000_000,
                time_ns: s.time_ns,
                captured: crate::model::Captured::from_headers(s.time_ns, &s.headers),
                source: source(&key, s.count),
                seq: (s.seq != 0).then(|| u32::from_be(s.seq)),
                stack,
                own_frames_left_out,
            };
            (s.counter, report)
        })
        .collect()
}

/// One source of increments of a counter, as the JSON report has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub count: u64,
    pub function: String,
    pub netns: u64,
    /// `ip netns` name, `host`, or `pid N` (filled in by the report).
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
    /// The libreswan connection owning the SA (filled in by the report).
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

/// Turns a table row into its report form (the counter is the caller's).
pub fn source(key: &SourceKey, count: u64) -> Source {
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
        netns_label: String::new(),
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
        ifname: String::new(),
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
        let s = source(
            &SourceKey {
                counter: 4,
                hook: hook::XFRM_INPUT,
                flow,
            },
            5,
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
