//! Which program types the running kernel accepts, found by trying rather
//! than by reading config flags (on some hosts CONFIG says fentry works, yet
//! attaching fails with EPERM).

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, KProbe, RawTracePoint, TracePoint},
};
use serde::Serialize;

use crate::{
    btf::KernelBtf,
    ebpf::{describe, program},
    hooks::{self, Works},
    kallsyms::{Kallsyms, Presence},
};

/// Whether a program type loads and attaches here; `Err` keeps the reason.
pub type Support = Result<(), String>;

#[derive(Clone, Debug, Serialize)]
pub struct ProgramSupport {
    #[serde(serialize_with = "support_json")]
    pub fentry: Support,
    #[serde(serialize_with = "support_json")]
    pub kprobe: Support,
    #[serde(serialize_with = "support_json")]
    pub tracepoint: Support,
    #[serde(serialize_with = "support_json")]
    pub raw_tracepoint: Support,
    #[serde(serialize_with = "support_json")]
    pub tp_btf: Support,
}

fn support_json<S: serde::Serializer>(support: &Support, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct as _;
    let mut out = s.serialize_struct("Support", 2)?;
    out.serialize_field("works", &support.is_ok())?;
    out.serialize_field("error", &support.as_ref().err())?;
    out.end()
}

/// Loads and attaches each tiny probe program from the object, then
/// detaches it again (dropping the link).
pub fn probe_programs(ebpf: &mut Ebpf, btf: &KernelBtf, kallsyms: &Kallsyms) -> ProgramSupport {
    let (fentry, kprobe) = probe_function_hooks(ebpf, btf, kallsyms);
    ProgramSupport {
        fentry,
        kprobe,
        tracepoint: try_tracepoint(ebpf),
        raw_tracepoint: try_raw_tracepoint(ebpf),
        tp_btf: try_tp_btf(ebpf),
    }
}

/// fentry and kprobe, each tried on a function every kernel has.
fn probe_function_hooks(
    ebpf: &mut Ebpf,
    btf: &KernelBtf,
    kallsyms: &Kallsyms,
) -> (Support, Support) {
    let fentry_target = hooks::PROBE_TARGETS.iter().find(|f| btf.has_function(f));
    let kprobe_target = hooks::PROBE_TARGETS
        .iter()
        .find(|f| matches!(kallsyms.presence(f), Presence::Exact { .. }));
    let fentry = match fentry_target {
        Some(target) => try_fentry(ebpf, target),
        None => Err("no probe target function in BTF".into()),
    };
    let kprobe = match kprobe_target {
        Some(target) => try_kprobe(ebpf, target),
        None => Err("no probe target function in /proc/kallsyms".into()),
    };
    (fentry, kprobe)
}

/// Whether any XFRM function could be hooked here (fentry or kprobes, on
/// the probe programs); the error says why neither works.
pub fn function_hooks(ebpf: &mut Ebpf, btf: &KernelBtf, kallsyms: &Kallsyms) -> Support {
    match probe_function_hooks(ebpf, btf, kallsyms) {
        (Err(fentry), Err(kprobe)) => Err(format!("fentry: {fentry}; kprobe: {kprobe}")),
        _ => Ok(()),
    }
}

fn try_fentry(ebpf: &mut Ebpf, target: &str) -> Support {
    let btf = Btf::from_sys_fs().map_err(|e| describe(&e))?;
    let prog: &mut FEntry = program(ebpf, "probe_fentry")?;
    prog.load(target, &btf)
        .map_err(|e| format!("load: {}", describe(&e)))?;
    let link = prog
        .attach()
        .map_err(|e| format!("attach to {target}: {}", describe(&e)))?;
    prog.detach(link).map_err(|e| describe(&e))
}

fn try_kprobe(ebpf: &mut Ebpf, target: &str) -> Support {
    let prog: &mut KProbe = program(ebpf, "probe_kprobe")?;
    prog.load().map_err(|e| format!("load: {}", describe(&e)))?;
    let link = prog
        .attach(target, 0)
        .map_err(|e| format!("attach to {target}: {}", describe(&e)))?;
    prog.detach(link).map_err(|e| describe(&e))
}

fn try_tracepoint(ebpf: &mut Ebpf) -> Support {
    let prog: &mut TracePoint = program(ebpf, "probe_tracepoint")?;
    prog.load().map_err(|e| format!("load: {}", describe(&e)))?;
    let link = prog
        .attach("skb", "kfree_skb")
        .map_err(|e| format!("attach: {}", describe(&e)))?;
    prog.detach(link).map_err(|e| describe(&e))
}

fn try_raw_tracepoint(ebpf: &mut Ebpf) -> Support {
    let prog: &mut RawTracePoint = program(ebpf, "probe_raw_tracepoint")?;
    prog.load().map_err(|e| format!("load: {}", describe(&e)))?;
    let link = prog
        .attach("kfree_skb")
        .map_err(|e| format!("attach: {}", describe(&e)))?;
    prog.detach(link).map_err(|e| describe(&e))
}

fn try_tp_btf(ebpf: &mut Ebpf) -> Support {
    let btf = Btf::from_sys_fs().map_err(|e| describe(&e))?;
    let prog: &mut BtfTracePoint = program(ebpf, "probe_btf_tracepoint")?;
    prog.load("kfree_skb", &btf)
        .map_err(|e| format!("load: {}", describe(&e)))?;
    let link = prog
        .attach()
        .map_err(|e| format!("attach: {}", describe(&e)))?;
    prog.detach(link).map_err(|e| describe(&e))
}

/// What a probe says, as the planner takes it.
pub fn works(support: &Support) -> Works {
    match support {
        Ok(()) => Works::Yes,
        Err(_) => Works::No,
    }
}
