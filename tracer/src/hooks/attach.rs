//! The one attacher: carries out a plan, method by method, and says per
//! hook how it went. The only caller of `ebpf`'s attach functions.

use aya::{
    Btf, Ebpf,
    programs::{FExit, KProbe},
};

use super::{
    Role,
    plan::{AttachFailure, Planned, Step, dependency},
    spec::{HookSpec, Method, Needs, Pairing, Programs},
};
use crate::{ebpf, model::HookList};

/// How one hook went.
#[derive(Clone, Debug)]
pub struct HookOutcome {
    pub spec: &'static HookSpec,
    pub programs: &'static Programs,
    /// The method that attached it.
    pub via: Option<Method>,
    /// Why it is not attached: the whole hook (method `None`), or each
    /// method tried or ruled out.
    pub failures: Vec<(Option<Method>, AttachFailure)>,
}

impl HookOutcome {
    pub fn function(&self) -> &'static str {
        self.spec.function
    }

    pub fn role(&self) -> Role {
        self.spec.role
    }

    /// The hook as the report lists it: `xfrm_input (fentry)`,
    /// `xfrm_state_lookup (kretprobe)`, `net:net_dev_queue`.
    pub fn listed_as(&self, method: Method) -> String {
        match (method, self.programs.tracepoint) {
            (Method::Tracepoint, Some(tracepoint)) => {
                format!("{}:{}", tracepoint.category, self.spec.function)
            }
            _ => format!(
                "{} ({})",
                self.spec.function,
                self.programs.method_name(method)
            ),
        }
    }

    /// The name a missing hook is listed under: the tracepoint, the
    /// function, or for a hook that completes another hook of the same
    /// function, both (`__xfrm4_output (fexit)`).
    pub fn name(&self) -> String {
        match (self.programs.tracepoint, self.spec.needs) {
            (Some(tracepoint), _) => format!("{}:{}", tracepoint.category, self.spec.function),
            (None, Needs::HookedByFentry(function)) if function == self.spec.function => {
                self.listed_as(Method::Fentry)
            }
            _ => self.spec.function.to_string(),
        }
    }

    /// Why it is missing: `fentry: <why>; kprobe: <why>`, or the one
    /// reason for the whole hook.
    pub fn why(&self) -> String {
        self.failures
            .iter()
            .map(|(method, why)| match method {
                Some(method) => format!("{}: {why}", self.programs.method_name(*method)),
                None => why.to_string(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// What the plan expects, before anything is attached (the doctor's
    /// dry run).
    pub fn expected(planned: &Planned) -> Self {
        let via = planned.first_try();
        let mut outcome = Self::unattached(planned);
        outcome.via = via;
        if via.is_some() {
            outcome.failures.clear();
        }
        outcome
    }

    /// The plan's known failures, nothing attached yet.
    fn unattached(planned: &Planned) -> Self {
        let failures = match &planned.blocked {
            Some(why) => vec![(None, why.clone())],
            None => planned
                .steps
                .iter()
                .filter_map(|(method, step)| match step {
                    Step::RuledOut(why) => Some((Some(*method), why.clone())),
                    Step::Try => None,
                })
                .collect(),
        };
        Self {
            spec: planned.spec,
            programs: planned.programs,
            via: None,
            failures,
        }
    }
}

/// Attaches each planned hook with the first method that works (`btf` is
/// vmlinux BTF for fentry, or why it could not be read). The links live as
/// long as `ebpf`.
pub fn attach(ebpf: &mut Ebpf, btf: &Result<Btf, String>, plan: &[Planned]) -> Vec<HookOutcome> {
    let mut outcomes: Vec<HookOutcome> = Vec::new();
    for planned in plan {
        let hooked = |function: &str| {
            outcomes
                .iter()
                .find(|o| o.function() == function)
                .map(|o| o.via)
        };
        let mut outcome = HookOutcome::unattached(planned);
        match dependency(planned.spec.needs, hooked) {
            Ok(()) => {}
            Err(None) => continue,
            Err(Some(why)) => {
                outcome.failures = vec![(None, why)];
                outcomes.push(outcome);
                continue;
            }
        }
        if planned.blocked.is_none() {
            outcome.failures.clear();
            for (method, step) in &planned.steps {
                let result = match step {
                    Step::RuledOut(why) => Err(why.clone()),
                    Step::Try => {
                        attach_method(ebpf, btf, planned, *method).map_err(AttachFailure::Refused)
                    }
                };
                match result {
                    Ok(()) => {
                        outcome.via = Some(*method);
                        outcome.failures.clear();
                        break;
                    }
                    Err(why) => outcome.failures.push((Some(*method), why)),
                }
            }
        }
        outcomes.push(outcome);
    }
    outcomes
}

fn attach_method(
    ebpf: &mut Ebpf,
    btf: &Result<Btf, String>,
    planned: &Planned,
    method: Method,
) -> Result<(), String> {
    let function = planned.spec.function;
    let pairing = planned
        .programs
        .pairing(method)
        .ok_or_else(|| format!("no {} program", method.name()))?;
    match (method, pairing) {
        (Method::Tracepoint, Pairing::Single(program)) => {
            let category = planned.programs.tracepoint.map_or("", |t| t.category);
            ebpf::attach_tracepoint(ebpf, program, category, function)
        }
        (Method::Kprobe, Pairing::Single(program)) => {
            ebpf::attach_kprobe(ebpf, program, function).map(drop)
        }
        (Method::Kprobe, Pairing::Bracket { entry, exit }) => {
            let exit_link = ebpf::attach_kprobe(ebpf, exit, function)?;
            if let Err(e) = ebpf::attach_kprobe(ebpf, entry, function) {
                let prog: &mut KProbe = ebpf::program(ebpf, exit)?;
                let _ = prog.detach(exit_link);
                return Err(e);
            }
            Ok(())
        }
        (Method::Fentry, pairing) => {
            let btf = btf.as_ref().map_err(Clone::clone)?;
            match pairing {
                Pairing::Single(program) if Some(program) == planned.programs.fexit => {
                    ebpf::attach_fexit(ebpf, program, function, btf)
                }
                Pairing::Single(program) => ebpf::attach_fentry(ebpf, program, function, btf),
                Pairing::Bracket { entry, exit } => {
                    ebpf::attach_fexit(ebpf, exit, function, btf)?;
                    if let Err(e) = ebpf::attach_fentry(ebpf, entry, function, btf) {
                        // Unloaded (and its link with it) so that a kprobe
                        // pair can take over.
                        let prog: &mut FExit = ebpf::program(ebpf, exit)?;
                        let _ = prog.unload();
                        return Err(e);
                    }
                    Ok(())
                }
            }
        }
        (Method::Tracepoint, Pairing::Bracket { .. }) => {
            Err("a tracepoint has no exit program".into())
        }
    }
}

/// The published form of a capability's outcomes: `--hooks tracepoint`
/// excluding all of them is said once, under `whole`.
pub fn hook_list(outcomes: &[HookOutcome], whole: &str) -> HookList {
    let excluded = |o: &HookOutcome| {
        matches!(
            o.failures.as_slice(),
            [(
                None,
                AttachFailure::NotAllowed(super::HookChoice::Tracepoint)
            )]
        )
    };
    if !outcomes.is_empty() && outcomes.iter().all(excluded) {
        return HookList {
            attached: Vec::new(),
            missing: vec![(whole.to_string(), outcomes[0].why())],
        };
    }
    // Hooks whose fallback attached are not missing: it does their work.
    let replaced: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.via.is_some())
        .filter_map(|o| match o.spec.needs {
            Needs::Unhooked(functions) => Some(functions),
            _ => None,
        })
        .flatten()
        .copied()
        .collect();
    let mut list = HookList::default();
    for outcome in outcomes {
        match outcome.via {
            Some(method) => list.attached.push(outcome.listed_as(method)),
            None if replaced.contains(&outcome.function()) => {}
            None => list.missing.push((outcome.name(), outcome.why())),
        }
    }
    list
}
