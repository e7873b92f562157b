//! What the running kernel offers, found by trying rather than by reading
//! config flags (on some hosts CONFIG says fentry works, yet attaching fails
//! with EPERM), and the hook each planned function gets.

use aya::{
    Btf, Ebpf,
    programs::{BtfTracePoint, FEntry, KProbe, RawTracePoint, TracePoint},
};
use serde::Serialize;

use crate::{
    btf::KernelBtf,
    ebpf::{describe, program},
    hooks::{self, Hook, Role},
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

/// How one planned function will be hooked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "method", content = "detail", rename_all = "snake_case")]
pub enum Attach {
    Fentry,
    /// In a module (aya's fentry reaches vmlinux only) or fentry unusable.
    Kprobe,
    Unavailable(String),
}

/// The overall mode `xfrm-trace` runs in on this kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookMode {
    /// Every bracket through fentry/fexit.
    Fentry,
    /// Every bracket attachable, some or all through kprobes.
    FentryKprobe,
    Kprobe,
    /// No bracket attachable: kfree_skb drop reasons + xfrm_stat deltas.
    TracepointOnly,
    /// Nothing loads: only xfrm_stat deltas.
    CountersOnly,
}

impl HookMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::FentryKprobe => "fentry+kprobe",
            Self::Kprobe => "kprobe",
            Self::TracepointOnly => "tracepoint-only",
            Self::CountersOnly => "counters-only",
        }
    }
}

/// Picks the hook for one function: fentry when it is in vmlinux BTF under
/// its exact name and fentry works, else a kprobe on the exact symbol.
pub fn choose_attach(
    in_vmlinux_btf: bool,
    presence: &Presence,
    programs: &ProgramSupport,
) -> Attach {
    match presence {
        Presence::Absent => Attach::Unavailable("not in this kernel (inlined or not built)".into()),
        Presence::CloneOnly(clone) => {
            Attach::Unavailable(format!("only a compiler clone {clone} exists"))
        }
        Presence::Exact { module } => {
            if module.is_none() && in_vmlinux_btf && programs.fentry.is_ok() {
                Attach::Fentry
            } else if programs.kprobe.is_ok() {
                Attach::Kprobe
            } else if let Some(module) = module {
                Attach::Unavailable(format!(
                    "in module {module}: needs kprobes, which do not work here"
                ))
            } else if !in_vmlinux_btf {
                Attach::Unavailable("no BTF for it and kprobes do not work here".into())
            } else {
                Attach::Unavailable("neither fentry nor kprobes work here".into())
            }
        }
    }
}

/// The mode, from how the bracket functions can be hooked.
pub fn choose_mode(brackets: &[Attach], programs: &ProgramSupport) -> HookMode {
    let fentry = brackets.iter().filter(|a| **a == Attach::Fentry).count();
    let kprobe = brackets.iter().filter(|a| **a == Attach::Kprobe).count();
    match (fentry, kprobe) {
        (0, 0) if programs.tracepoint.is_ok() => HookMode::TracepointOnly,
        (0, 0) => HookMode::CountersOnly,
        (_, 0) => HookMode::Fentry,
        (0, _) => HookMode::Kprobe,
        _ => HookMode::FentryKprobe,
    }
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

/// One planned hook and how it will be attached here.
#[derive(Clone, Debug, Serialize)]
pub struct HookPlan {
    pub function: &'static str,
    pub role: Role,
    pub in_btf: bool,
    /// `vmlinux`, a module name, `clone-only` or `absent`.
    pub kallsyms: String,
    pub attach: Attach,
    pub version_dependent: bool,
}

pub fn plan_hooks(
    btf: &KernelBtf,
    kallsyms: &Kallsyms,
    programs: &ProgramSupport,
) -> Vec<HookPlan> {
    hooks::PLANNED
        .iter()
        .map(
            |&Hook {
                 function,
                 role,
                 version_dependent,
             }| {
                let presence = kallsyms.presence(function);
                let in_btf = btf.has_function(function);
                HookPlan {
                    function,
                    role,
                    in_btf,
                    kallsyms: match &presence {
                        Presence::Exact { module: None } => "vmlinux".into(),
                        Presence::Exact { module: Some(m) } => m.clone(),
                        Presence::CloneOnly(_) => "clone-only".into(),
                        Presence::Absent => "absent".into(),
                    },
                    attach: choose_attach(in_btf, &presence, programs),
                    version_dependent,
                }
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn support(fentry: bool, kprobe: bool, tracepoint: bool) -> ProgramSupport {
        let s = |ok: bool| if ok { Ok(()) } else { Err("EPERM".to_string()) };
        ProgramSupport {
            fentry: s(fentry),
            kprobe: s(kprobe),
            tracepoint: s(tracepoint),
            raw_tracepoint: s(tracepoint),
            tp_btf: s(tracepoint),
        }
    }

    const VMLINUX: Presence = Presence::Exact { module: None };

    #[test]
    fn vmlinux_function_prefers_fentry_then_kprobe() {
        assert_eq!(
            choose_attach(true, &VMLINUX, &support(true, true, true)),
            Attach::Fentry
        );
        assert_eq!(
            choose_attach(true, &VMLINUX, &support(false, true, true)),
            Attach::Kprobe
        );
        assert!(matches!(
            choose_attach(true, &VMLINUX, &support(false, false, true)),
            Attach::Unavailable(_)
        ));
    }

    #[test]
    fn module_function_needs_kprobe() {
        let esp4 = Presence::Exact {
            module: Some("esp4".into()),
        };
        assert_eq!(
            choose_attach(false, &esp4, &support(true, true, true)),
            Attach::Kprobe
        );
        let Attach::Unavailable(why) = choose_attach(false, &esp4, &support(true, false, true))
        else {
            panic!("module function without kprobes must be unavailable");
        };
        assert!(why.contains("esp4"));
    }

    #[test]
    fn clones_and_absent_functions_are_unavailable() {
        let clone = Presence::CloneOnly("ip_fragment.constprop.0".into());
        assert!(
            matches!(choose_attach(true, &clone, &support(true, true, true)), Attach::Unavailable(w) if w.contains("constprop"))
        );
        assert!(matches!(
            choose_attach(false, &Presence::Absent, &support(true, true, true)),
            Attach::Unavailable(_)
        ));
    }

    #[test]
    fn mode_follows_the_brackets() {
        let all = support(true, true, true);
        assert_eq!(
            choose_mode(&[Attach::Fentry, Attach::Fentry], &all),
            HookMode::Fentry
        );
        assert_eq!(
            choose_mode(&[Attach::Fentry, Attach::Kprobe], &all),
            HookMode::FentryKprobe
        );
        assert_eq!(choose_mode(&[Attach::Kprobe], &all), HookMode::Kprobe);
        let none = [Attach::Unavailable("x".into())];
        assert_eq!(
            choose_mode(&none, &support(false, false, true)),
            HookMode::TracepointOnly
        );
        assert_eq!(
            choose_mode(&none, &support(false, false, false)),
            HookMode::CountersOnly
        );
    }
}
