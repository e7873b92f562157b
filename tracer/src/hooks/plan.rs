//! The one planner: which programs each hook would use on a kernel, from
//! recorded facts about it (no I/O here, so a unit test can replay any
//! kernel). A run attaches the plan; `xfrm-trace doctor` prints it.

use std::collections::HashMap;

use super::{
    HookChoice,
    spec::{HookSpec, Method, Needs, Programs, Prototype},
};
use crate::{
    btf::KernelBtf,
    kallsyms::{Kallsyms, Presence},
};

/// Whether a program type works here: the doctor knows (it tried), a run
/// does not ask (it tries each hook and falls back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Works {
    Yes,
    No,
    Untested,
}

/// What the kernel says about one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionFacts {
    /// Argument names from its BTF prototype; `None`: not in vmlinux BTF.
    pub params: Option<Vec<String>>,
    pub kallsyms: Presence,
}

const UNKNOWN: FunctionFacts = FunctionFacts {
    params: None,
    kallsyms: Presence::Absent,
};

/// What the running kernel offers, as far as hooks go.
#[derive(Clone, Debug)]
pub struct KernelFacts {
    pub functions: HashMap<String, FunctionFacts>,
    pub fentry: Works,
    pub kprobe: Works,
    pub tracepoint: Works,
}

impl KernelFacts {
    /// The facts about the functions `specs` name, from tables already
    /// read; program types untested.
    pub fn of(btf: &KernelBtf, kallsyms: &Kallsyms, specs: &[&[HookSpec]]) -> Self {
        let functions = specs
            .iter()
            .flat_map(|specs| specs.iter())
            .filter(|spec| !spec.is_tracepoint())
            .map(|spec| {
                let facts = FunctionFacts {
                    params: btf.function_params(spec.function),
                    kallsyms: kallsyms.presence(spec.function),
                };
                (spec.function.to_string(), facts)
            })
            .collect();
        Self {
            functions,
            fentry: Works::Untested,
            kprobe: Works::Untested,
            tracepoint: Works::Untested,
        }
    }

    pub fn function(&self, name: &str) -> &FunctionFacts {
        self.functions.get(name).unwrap_or(&UNKNOWN)
    }
}

/// Why a hook, or one method of it, is not attached. The text is the same
/// in the report, the log and the doctor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttachFailure {
    #[error("--hooks {}", choice_name(*.0))]
    NotAllowed(HookChoice),
    #[error("not in /proc/kallsyms (inlined or not built)")]
    Absent,
    #[error("only the compiler clone {0} exists")]
    CloneOnly(String),
    #[error("not in the kernel's BTF")]
    NotInBtf,
    #[error("in module {0}: fentry reaches vmlinux functions only")]
    InModule(String),
    #[error("unexpected prototype {0}")]
    Prototype(String),
    #[error(
        "unexpected prototype {signature}: fexit reads the return value after {expected} arguments"
    )]
    ArgCount { signature: String, expected: usize },
    #[error("its entry hook is a kprobe, and this fexit only pairs with an fentry")]
    EntryByKprobe,
    #[error("does not work here")]
    DoesNotWork,
    /// The kernel's (or the loader's) own error.
    #[error("{0}")]
    Refused(String),
}

fn choice_name(choice: HookChoice) -> &'static str {
    match choice {
        HookChoice::Auto => "auto",
        HookChoice::Fentry => "fentry",
        HookChoice::Kprobe => "kprobe",
        HookChoice::Tracepoint => "tracepoint",
    }
}

/// One method of a planned hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Try,
    RuledOut(AttachFailure),
}

/// How one hook will be attached.
#[derive(Clone, Debug)]
pub struct Planned {
    pub spec: &'static HookSpec,
    /// The variant whose prototype matches (the first when none does).
    pub programs: &'static Programs,
    /// Why no method is tried at all.
    pub blocked: Option<AttachFailure>,
    /// The methods in the order they are tried; a method that cannot work
    /// says why.
    pub steps: Vec<(Method, Step)>,
}

impl Planned {
    /// The method this hook is expected to attach with.
    pub fn first_try(&self) -> Option<Method> {
        self.steps
            .iter()
            .find(|(_, step)| *step == Step::Try)
            .map(|(method, _)| *method)
    }

    fn blocked(spec: &'static HookSpec, why: AttachFailure) -> Self {
        Self {
            spec,
            programs: &spec.variants[0].programs,
            blocked: Some(why),
            steps: Vec::new(),
        }
    }
}

/// Whether `needs` holds, given how the earlier hooks went (`hooked`: for a
/// function, `None` if no earlier hook names it, else the method that
/// hooked it). `Err(None)`: the hook is left out; `Err(Some(why))`: it is
/// listed as missing.
pub fn dependency(
    needs: Needs,
    hooked: impl Fn(&str) -> Option<Option<Method>>,
) -> Result<(), Option<AttachFailure>> {
    match needs {
        Needs::Nothing | Needs::InBtf => Ok(()),
        Needs::Hooked(function) => match hooked(function) {
            Some(Some(_)) => Ok(()),
            _ => Err(None),
        },
        Needs::HookedByFentry(function) => match hooked(function) {
            Some(Some(Method::Fentry)) => Ok(()),
            Some(Some(_)) => Err(Some(AttachFailure::EntryByKprobe)),
            _ => Err(None),
        },
        Needs::Unhooked(functions) => {
            if functions.iter().any(|f| matches!(hooked(f), Some(Some(_)))) {
                Err(None)
            } else {
                Ok(())
            }
        }
    }
}

/// The plan for `specs` on the kernel `facts` describe, under `choice`.
pub fn plan(facts: &KernelFacts, choice: HookChoice, specs: &'static [HookSpec]) -> Vec<Planned> {
    let mut planned: Vec<Planned> = Vec::new();
    for spec in specs {
        // A fallback is left out only where its hooks are sure to attach
        // (the doctor knows which program types work); a run, which does
        // not ask, plans it and the attacher decides.
        let sure = |method: &Method| match method {
            Method::Fentry => facts.fentry == Works::Yes,
            Method::Kprobe => facts.kprobe == Works::Yes,
            Method::Tracepoint => facts.tracepoint == Works::Yes,
        };
        let hooked = |function: &str| {
            planned
                .iter()
                .find(|p| p.spec.function == function)
                .map(|p| match spec.needs {
                    Needs::Unhooked(_) => p.first_try().filter(sure),
                    _ => p.first_try(),
                })
        };
        let one = match dependency(spec.needs, hooked) {
            Ok(()) => plan_one(facts, choice, spec),
            Err(Some(why)) => Some(Planned::blocked(spec, why)),
            Err(None) => None,
        };
        planned.extend(one);
    }
    planned
}

fn plan_one(facts: &KernelFacts, choice: HookChoice, spec: &'static HookSpec) -> Option<Planned> {
    if spec.is_tracepoint() {
        let step = match facts.tracepoint {
            Works::No => Step::RuledOut(AttachFailure::DoesNotWork),
            Works::Yes | Works::Untested => Step::Try,
        };
        return Some(Planned {
            spec,
            programs: &spec.variants[0].programs,
            blocked: None,
            steps: vec![(Method::Tracepoint, step)],
        });
    }
    let function = facts.function(spec.function);
    if spec.needs == Needs::InBtf && function.params.is_none() {
        return None;
    }
    let blocked = |why| Some(Planned::blocked(spec, why));
    if choice == HookChoice::Tracepoint {
        return blocked(AttachFailure::NotAllowed(choice));
    }
    let module = match &function.kallsyms {
        Presence::Exact { module } => module,
        Presence::CloneOnly(clone) => return blocked(AttachFailure::CloneOnly(clone.clone())),
        Presence::Absent => return blocked(AttachFailure::Absent),
    };
    let params = function.params.as_deref();
    let Some(variant) = spec
        .variants
        .iter()
        .find(|v| prototype_fits(v.prototype, params))
    else {
        return blocked(AttachFailure::Prototype(signature(spec.function, params)));
    };
    let steps: Vec<(Method, Step)> = [Method::Fentry, Method::Kprobe]
        .into_iter()
        .filter(|&method| allowed(choice, method) && variant.programs.pairing(method).is_some())
        .map(|method| {
            let ruled_out = match method {
                Method::Fentry => fentry_ruled_out(facts, spec.function, module, variant.prototype),
                _ => (facts.kprobe == Works::No).then_some(AttachFailure::DoesNotWork),
            };
            (method, ruled_out.map_or(Step::Try, Step::RuledOut))
        })
        .collect();
    if steps.is_empty() {
        return blocked(AttachFailure::NotAllowed(choice));
    }
    Some(Planned {
        spec,
        programs: &variant.programs,
        blocked: None,
        steps,
    })
}

/// Why fentry/fexit cannot hook `function`, if they cannot.
fn fentry_ruled_out(
    facts: &KernelFacts,
    function: &str,
    module: &Option<String>,
    prototype: Prototype,
) -> Option<AttachFailure> {
    let params = facts.function(function).params.as_deref();
    if let Some(module) = module {
        return Some(AttachFailure::InModule(module.clone()));
    }
    let Some(params) = params else {
        return Some(AttachFailure::NotInBtf);
    };
    if let Prototype::ExitAfterArgs(expected) = prototype
        && params.len() != expected
    {
        return Some(AttachFailure::ArgCount {
            signature: signature(function, Some(params)),
            expected,
        });
    }
    (facts.fentry == Works::No).then_some(AttachFailure::DoesNotWork)
}

/// Whether a variant's programs read this prototype's arguments right
/// (`ExitAfterArgs` only rules fexit out: see `fentry_ruled_out`).
fn prototype_fits(prototype: Prototype, params: Option<&[String]>) -> bool {
    let skb_at =
        |index| params.and_then(|p| p.iter().position(|name| name == "skb")) == Some(index);
    match prototype {
        Prototype::Any | Prototype::ExitAfterArgs(_) => true,
        Prototype::SkbAt(index) => skb_at(index),
        Prototype::SkbAtOrNoBtf(index) => params.is_none() || skb_at(index),
    }
}

fn signature(function: &str, params: Option<&[String]>) -> String {
    format!("{function}({})", params.unwrap_or_default().join(", "))
}

fn allowed(choice: HookChoice, method: Method) -> bool {
    match choice {
        HookChoice::Auto => true,
        HookChoice::Fentry => method == Method::Fentry,
        HookChoice::Kprobe => method == Method::Kprobe,
        HookChoice::Tracepoint => method == Method::Tracepoint,
    }
}

/// The fentry/fexit programs a plan will load, with their functions (to
/// verify them beforehand, in parallel).
pub fn trampolines(plan: &[Planned]) -> Vec<(&'static str, &'static str)> {
    plan.iter()
        .filter(|p| p.first_try() == Some(Method::Fentry))
        .flat_map(|p| {
            [p.programs.fexit, p.programs.fentry]
                .into_iter()
                .flatten()
                .map(|program| (program, p.spec.function))
        })
        .collect()
}
