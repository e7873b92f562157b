//! `xfrm-trace doctor`: what this kernel offers and how we would hook it.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    attribution::{self, Coverage},
    btf::{self, KernelBtf},
    capabilities::{self, ProgramSupport},
    ebpf,
    hooks::{self, HookChoice, HookMode, HookOutcome, HookSpec, KernelFacts, Mode, Needs, Role},
    ike,
    kallsyms::{Kallsyms, Presence},
    masquerade, mtu,
    netns::exits,
    tracefs,
    xfrm_stat::XfrmStat,
};

/// Every capability's hooks, in the order a run attaches them.
const ALL: [&[HookSpec]; 5] = [
    ike::HOOKS,
    attribution::claims::HOOKS,
    mtu::HOOKS,
    masquerade::HOOKS,
    exits::HOOKS,
];

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel_release: String,
    pub btf: Check,
    pub kallsyms_addresses: bool,
    pub xfrm_stat: Check,
    /// Counters the kernel has (from /proc/net/xfrm_stat).
    pub xfrm_counters: Vec<String>,
    /// Number of `enum skb_drop_reason` values (0 before 5.17).
    pub drop_reasons: usize,
    pub programs: Option<ProgramSupport>,
    /// The plan a run (`--hooks auto`) follows here.
    pub hooks: Vec<HookRow>,
    /// The report's `kernel.mode` of that run.
    pub mode: Mode,
}

/// One planned hook and how it will be attached here.
#[derive(Debug, Serialize)]
pub struct HookRow {
    /// The function, tracepoint (`net:net_dev_queue`) or completing exit
    /// (`__xfrm4_output (fexit)`), as the report lists it when missing.
    pub function: String,
    pub role: Role,
    pub in_btf: bool,
    /// `vmlinux`, a module name, `clone-only`, `absent`, or `-` for a
    /// tracepoint.
    pub kallsyms: String,
    pub attach: Attach,
    /// As the report lists it once attached (`xfrm_input (fentry)`).
    pub listed_as: Option<String>,
    /// Only some kernels have it (an alternative exists on the others).
    pub version_dependent: bool,
    /// The hook column: `fentry`, `fexit`, `kretprobe`, ... or `none: why`.
    #[serde(skip)]
    shown: String,
}

/// How one hook will be attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "method", content = "detail", rename_all = "snake_case")]
pub enum Attach {
    Fentry,
    Kprobe,
    Tracepoint,
    Unavailable(String),
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn from<T, E: std::fmt::Display>(result: &Result<T, E>, ok_detail: &str) -> Self {
        match result {
            Ok(_) => Self {
                ok: true,
                detail: ok_detail.into(),
            },
            Err(e) => Self {
                ok: false,
                detail: e.to_string(),
            },
        }
    }
}

/// Probes the running kernel (needs root to load programs).
pub fn run() -> Report {
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"));
    let btf = KernelBtf::running();
    let kallsyms = Kallsyms::read().unwrap_or_default();
    let stat_text = std::fs::read_to_string("/proc/net/xfrm_stat");
    let xfrm_stat = stat_text
        .as_ref()
        .map_err(|e| format!("/proc/net/xfrm_stat: {e} (kernel without CONFIG_XFRM_STATISTICS?)"))
        .and_then(|t| XfrmStat::parse(t).map_err(|e| format!("/proc/net/xfrm_stat: {e}")));
    let xfrm_counters = xfrm_stat
        .as_ref()
        .map(|s| s.0.keys().cloned().collect())
        .unwrap_or_default();

    let (programs, hooks, drop_reasons) = match &btf {
        Ok(btf) => {
            // Mounted (and unmounted) as a run does, so the prediction is
            // the run's; when it cannot be, the tracepoint row says why.
            let _tracefs = tracefs::mount().map_err(|e| log::warn!("{e}")).ok();
            let programs = match ebpf::load(None, None, attribution::claims::MIN_SHADOWS) {
                Ok(mut object) => capabilities::probe_programs(&mut object, btf, &kallsyms),
                Err(e) => all_failed(&e.to_string()),
            };
            let hooks = dry_run(btf, &kallsyms, &programs);
            (Some(programs), hooks, btf::drop_reason_names(btf).len())
        }
        Err(_) => (None, Vec::new(), 0),
    };
    let mode = match &programs {
        Some(programs) => mode(&hooks, programs),
        None => Mode::COUNTERS_ONLY,
    };
    let hooks = hooks
        .iter()
        .map(|outcome| row(outcome, btf.as_ref().ok(), &kallsyms))
        .collect();
    Report {
        kernel_release,
        btf: Check::from(&btf.as_ref().map(|_| ()), btf::VMLINUX_BTF),
        kallsyms_addresses: kallsyms.has_addresses(),
        xfrm_stat: Check::from(&xfrm_stat, "/proc/net/xfrm_stat"),
        xfrm_counters,
        drop_reasons,
        programs,
        hooks,
        mode,
    }
}

/// What a run would attach here, by the run's own planner, told which
/// program types work.
fn dry_run(btf: &KernelBtf, kallsyms: &Kallsyms, programs: &ProgramSupport) -> Vec<HookOutcome> {
    let mut facts = KernelFacts::of(btf, kallsyms, &ALL);
    facts.fentry = capabilities::works(&programs.fentry);
    facts.kprobe = capabilities::works(&programs.kprobe);
    facts.tracepoint = capabilities::works(&programs.tracepoint);
    ALL.iter()
        .flat_map(|specs| hooks::plan(&facts, HookChoice::Auto, specs))
        .map(|planned| HookOutcome::expected(&planned))
        .collect()
}

/// The run's mode, from the planned brackets as the report counts them.
fn mode(hooks: &[HookOutcome], programs: &ProgramSupport) -> Mode {
    let brackets: Vec<HookOutcome> = hooks
        .iter()
        .filter(|o| matches!(o.role(), Role::Bracket | Role::Enrichment | Role::Claim))
        .cloned()
        .collect();
    let mode = Coverage::of(&brackets).mode();
    if mode.hooks == HookMode::TracepointOnly && programs.tracepoint.is_err() {
        return Mode::COUNTERS_ONLY;
    }
    mode
}

fn row(outcome: &HookOutcome, btf: Option<&KernelBtf>, kallsyms: &Kallsyms) -> HookRow {
    let function = outcome.function();
    let tracepoint = outcome.programs.tracepoint.is_some();
    let kallsyms = match kallsyms.presence(function) {
        _ if tracepoint => "-".into(),
        Presence::Exact { module: None } => "vmlinux".into(),
        Presence::Exact { module: Some(m) } => m,
        Presence::CloneOnly(_) => "clone-only".into(),
        Presence::Absent => "absent".into(),
    };
    HookRow {
        function: outcome.name(),
        role: outcome.role(),
        in_btf: !tracepoint && btf.is_some_and(|btf| btf.has_function(function)),
        kallsyms,
        attach: match outcome.via {
            Some(hooks::Method::Fentry) => Attach::Fentry,
            Some(hooks::Method::Kprobe) => Attach::Kprobe,
            Some(hooks::Method::Tracepoint) => Attach::Tracepoint,
            None => Attach::Unavailable(outcome.why()),
        },
        listed_as: outcome.via.map(|method| outcome.listed_as(method)),
        shown: match outcome.via {
            Some(method) => outcome.programs.method_name(method).to_string(),
            None => format!("none: {}", outcome.why()),
        },
        version_dependent: outcome.spec.needs == Needs::InBtf || outcome.spec.variants.len() > 1,
    }
}

fn all_failed(why: &str) -> ProgramSupport {
    let e = || Err(why.to_string());
    ProgramSupport {
        fentry: e(),
        kprobe: e(),
        tracepoint: e(),
        raw_tracepoint: e(),
        tp_btf: e(),
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "yes" } else { "NO " }
}

/// The report as a readable table.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "kernel         {}", report.kernel_release);
    let _ = writeln!(
        out,
        "BTF            {}  {}",
        mark(report.btf.ok),
        report.btf.detail
    );
    let _ = writeln!(
        out,
        "kallsyms       {}  addresses visible",
        mark(report.kallsyms_addresses)
    );
    let _ = writeln!(
        out,
        "xfrm_stat      {}  {} ({} counters)",
        mark(report.xfrm_stat.ok),
        report.xfrm_stat.detail,
        report.xfrm_counters.len()
    );
    let _ = writeln!(out, "drop reasons   {} named in BTF", report.drop_reasons);
    if let Some(p) = &report.programs {
        let _ = writeln!(out, "\nprogram type   works");
        for (name, support) in [
            ("fentry/fexit", &p.fentry),
            ("kprobe", &p.kprobe),
            ("tracepoint", &p.tracepoint),
            ("raw_tracepoint", &p.raw_tracepoint),
            ("tp_btf", &p.tp_btf),
        ] {
            match support {
                Ok(()) => {
                    let _ = writeln!(out, "{name:<14} yes");
                }
                Err(e) => {
                    let _ = writeln!(out, "{name:<14} NO   {e}");
                }
            }
        }
    }
    if !report.hooks.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<32} {:<11} {:<4} {:<11} hook",
            "function", "role", "btf", "kallsyms"
        );
        for h in &report.hooks {
            let role = serde_json::to_value(h.role)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<32} {:<11} {:<4} {:<11} {}",
                h.function,
                role,
                if h.in_btf { "yes" } else { "no" },
                h.kallsyms,
                h.shown
            );
        }
    }
    let _ = writeln!(out, "\nhook mode      {}", report.mode);
    let _ = writeln!(out, "{}", mode_explanation(report.mode.hooks));
    if report.mode.partial {
        let _ = writeln!(
            out,
            "some brackets cannot be hooked (above): their increments are counted, not tied to packets"
        );
    }
    out
}

fn mode_explanation(mode: HookMode) -> &'static str {
    match mode {
        HookMode::Fentry => "every XFRM counter path is hooked with fentry/fexit",
        HookMode::FentryKprobe => {
            "every XFRM counter path is hooked: fentry/fexit where possible, kprobes for the rest"
        }
        HookMode::Kprobe => "every XFRM counter path is hooked with kprobes",
        HookMode::TracepointOnly => {
            "no XFRM function can be hooked here: drops are seen at skb:kfree_skb (reason and location) and counters are reported as /proc/net/xfrm_stat deltas, without per-packet attribution"
        }
        HookMode::CountersOnly => {
            "no eBPF program can be attached here: only /proc/net/xfrm_stat deltas are reported"
        }
    }
}
