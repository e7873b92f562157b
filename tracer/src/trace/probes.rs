//! Every eBPF program of a run: loaded and attached once, read at the end,
//! detached when dropped (also on error and Ctrl-C: the `Ebpf` owns the
//! links).

use std::collections::BTreeMap;

use anyhow::Context as _;

use tracer_common::{
    attribution::SourceKey,
    drops::{DropKey, DropSample},
    ike::IkeKey,
    masquerade::LeakSample,
    mtu::{MtuKey, MtuStats},
    names::maps,
};

use crate::{
    attribution::{self, AttributionErrors, Coverage, Strategy, claims},
    btf::KernelBtf,
    counters::Counters,
    drops, ebpf,
    ebpf::Sampler,
    hooks::{self, HookChoice, KernelFacts, attach::attach, plan::trampolines},
    ike,
    kallsyms::Kallsyms,
    masquerade::{self, MasqCoverage},
    model::HookList,
    mtu,
    netns::{
        Netns,
        exits::{self, Exits},
    },
};

/// Leak and drop samples kept for the pcapng (the counts stay exact).
const PACKETS_KEPT: usize = 256;

pub struct Probes {
    object: aya::Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Sampled increments with stacks, MASQUERADE leaks and XFRM drops.
    samples: Sampler<tracer_common::attribution::Sample>,
    leak_samples: Sampler<LeakSample>,
    drop_samples: Sampler<DropSample>,
    /// Counters of namespaces torn down during the run.
    exits: Option<Exits>,
    /// The namespace teardown hook, attached or why not.
    pub netns_teardown_hooks: HookList,
    pub coverage: Coverage,
    pub mtu_hooks: HookList,
    pub ike_hooks: HookList,
    pub masquerade: MasqCoverage,
    /// kallsyms with our programs and their trampolines, loaded after the
    /// start-up read: read again once, for the first stacks.
    stack_symbols: std::cell::OnceCell<Option<Kallsyms>>,
}

/// What the programs counted, read once after the run.
pub struct Readings {
    pub drops: Vec<(DropKey, u64)>,
    pub drops_untracked: u64,
    /// Sampled XFRM drops with headers (tracepoint-only mode).
    pub drop_samples: Vec<DropSample>,
    pub capture: crate::model::CaptureCounts,
    pub sources: Vec<(SourceKey, u64)>,
    pub attribution_errors: AttributionErrors,
    /// Sampled increments with stacks.
    pub samples: Vec<attribution::StackSample>,
    pub mtu: Vec<(MtuKey, MtuStats)>,
    pub masquerade: masquerade::Counted,
    pub ike: Vec<(IkeKey, u64)>,
}

/// A method forced with `--hooks fentry` or `--hooks kprobe` that hooks no
/// XFRM function is an error: falling back would quietly give a run other
/// than the one asked for.
fn forced_method_attached(hooks: HookChoice, coverage: &Coverage) -> anyhow::Result<()> {
    let method = match hooks {
        HookChoice::Fentry => "fentry",
        HookChoice::Kprobe => "kprobe",
        HookChoice::Auto | HookChoice::Tracepoint => return Ok(()),
    };
    if coverage.fentry_brackets + coverage.kprobe_brackets > 0 {
        return Ok(());
    }
    let (function, why) = coverage
        .missing
        .first()
        .map_or(("the XFRM functions", "unknown"), |(f, w)| {
            (f.as_str(), w.as_str())
        });
    anyhow::bail!(
        "--hooks {method}: no XFRM function can be hooked with {method} on this kernel ({function}: {why}); --hooks auto uses what it offers"
    )
}

/// The namespace teardown hook and its ring, or why not.
fn teardown(
    object: &mut aya::Ebpf,
    btf: &Result<aya::Btf, String>,
    plan: &[hooks::Planned],
) -> (Option<Exits>, HookList) {
    let hooks = exits::hook_list(&attach(object, btf, plan));
    if hooks.attached.is_empty() {
        return (None, hooks);
    }
    match exits::take_ring(object) {
        Ok(exits) => (Some(exits), hooks),
        Err(why) => (
            None,
            HookList {
                attached: Vec::new(),
                missing: vec![(exits::HOOKS[0].function.to_string(), why)],
            },
        ),
    }
}

/// Diff at the drop: every CPU's shadow of each netns set up, then the
/// claims armed.
fn start_claims(
    object: &mut aya::Ebpf,
    counters: &Counters,
    kallsyms: &Kallsyms,
    namespaces: &BTreeMap<u64, Netns>,
) -> Result<(), String> {
    let paths: Vec<&std::path::Path> = namespaces.values().map(|ns| ns.path.as_path()).collect();
    let shadows = claims::start(object, claims::tables(counters, kallsyms), &paths)?;
    log::debug!(
        "start: {shadows} shadows set up in {} namespaces",
        paths.len()
    );
    Ok(())
}

/// The object loaded with this kernel's layout, before anything attaches.
struct Loaded {
    object: aya::Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// vmlinux BTF for aya, parsed once for the loader and every fentry
    /// (under emulation each parse costs seconds).
    aya_btf: Result<aya::Btf, String>,
    /// `__per_cpu_offset` is known: the brackets can read the counters.
    per_packet: bool,
}

fn load(btf: &KernelBtf, kallsyms: &Kallsyms, namespaces: usize) -> anyhow::Result<Loaded> {
    let layout = ebpf::KernelLayout::resolve(btf, kallsyms)?;
    let aya_btf = aya::Btf::from_sys_fs().map_err(|e| ebpf::describe(&e));
    let shadows = claims::shadow_entries(namespaces);
    let mut object = ebpf::load(Some(&layout), aya_btf.as_ref().ok(), shadows)?;
    let logger = match aya_log::EbpfLogger::init(&mut object) {
        Ok(logger) => Some(logger),
        Err(e) => {
            log::debug!("eBPF logging unavailable: {e}");
            None
        }
    };
    Ok(Loaded {
        object,
        logger,
        aya_btf,
        per_packet: layout.offsets.per_cpu_offset != 0,
    })
}

/// Each capability's hooks as the planner decided them for this kernel.
struct Plans {
    brackets: Vec<hooks::Planned>,
    claims: Vec<hooks::Planned>,
    mtu: Vec<hooks::Planned>,
    masquerade: Vec<hooks::Planned>,
    exits: Vec<hooks::Planned>,
    ike: Vec<hooks::Planned>,
}

impl Plans {
    fn new(btf: &KernelBtf, kallsyms: &Kallsyms, choice: HookChoice) -> Self {
        let facts = KernelFacts::of(
            btf,
            kallsyms,
            &[
                attribution::HOOKS,
                claims::HOOKS,
                mtu::HOOKS,
                masquerade::HOOKS,
                exits::HOOKS,
                ike::HOOKS,
            ],
        );
        let plan = |specs| hooks::plan(&facts, choice, specs);
        Self {
            brackets: plan(attribution::HOOKS),
            claims: plan(claims::HOOKS),
            mtu: plan(mtu::HOOKS),
            masquerade: plan(masquerade::HOOKS),
            exits: plan(exits::HOOKS),
            ike: plan(ike::HOOKS),
        }
    }

    /// Verifies every fentry/fexit program the plans attach, in one pass
    /// over the kernel's BTF (the brackets only where they can count).
    fn preload(&self, object: &mut aya::Ebpf, aya_btf: &aya::Btf, strategy: Option<Strategy>) {
        let mut programs = trampolines(&self.mtu);
        programs.extend(trampolines(&self.exits));
        programs.extend(trampolines(&self.masquerade));
        programs.extend(trampolines(&self.ike));
        match strategy {
            Some(Strategy::Brackets) => programs.extend(trampolines(&self.brackets)),
            Some(Strategy::DropDiff) => programs.extend(trampolines(&self.claims)),
            None => {}
        }
        if !programs.is_empty() {
            ebpf::preload(object, &programs, aya_btf);
        }
    }
}

impl Probes {
    /// Loads the object with the running kernel's layout and attaches each
    /// capability with the best hook the kernel offers; what cannot be
    /// hooked is logged and listed in the report.
    pub fn attach(
        btf: &KernelBtf,
        kallsyms: &Kallsyms,
        counters: &Counters,
        choice: HookChoice,
        brackets: bool,
    ) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        // Needed while attaching only (record layouts, tracepoint ids).
        let _tracefs = crate::tracefs::mount()?;
        // The namespaces there are: the shadows' room and set-up.
        let namespaces = crate::netns::all();
        let Loaded {
            mut object,
            logger,
            aya_btf,
            per_packet,
        } = load(btf, kallsyms, namespaces.len())?;
        log::debug!("start: object loaded in {:?}", started.elapsed());
        let plans = Plans::new(btf, kallsyms, choice);
        // Without __per_cpu_offset no counter can be read per CPU; with
        // `--hooks tracepoint` the brackets' report says nothing is hooked.
        let strategy = if choice == HookChoice::Tracepoint
            || (per_packet && (brackets || !claims::fits(counters)))
        {
            Some(Strategy::Brackets)
        } else if per_packet {
            Some(Strategy::DropDiff)
        } else {
            None
        };
        if let Ok(aya_btf) = &aya_btf {
            plans.preload(&mut object, aya_btf, strategy);
            log::debug!("start: programs verified in {:?}", started.elapsed());
        }
        let Plans {
            brackets: bracket_plan,
            claims: claim_plan,
            mtu: mtu_plan,
            masquerade: masquerade_plan,
            exits: exits_plan,
            ike: ike_plan,
        } = plans;
        drops::attach(&mut object)?;
        let ike_hooks = ike::hook_list(&attach(&mut object, &aya_btf, &ike_plan));
        let samples = Sampler::take(&mut object, maps::SAMPLES, attribution::SAMPLES_KEPT);
        let leak_samples = Sampler::take(&mut object, maps::LEAK_SAMPLES, PACKETS_KEPT);
        let drop_samples = Sampler::take(&mut object, maps::DROP_SAMPLES, PACKETS_KEPT);
        log::debug!("start: drops and IKE attached in {:?}", started.elapsed());
        let coverage = match strategy {
            Some(Strategy::DropDiff) => {
                let coverage = Coverage::of(&attach(&mut object, &aya_btf, &claim_plan));
                if coverage.fentry_brackets + coverage.kprobe_brackets == 0 {
                    // No function can be hooked here: the brackets' report
                    // says why.
                    Coverage::of(&attach(&mut object, &aya_btf, &bracket_plan))
                } else if let Err(why) = start_claims(&mut object, counters, kallsyms, &namespaces)
                {
                    log::warn!("diff at the drop unavailable ({why}): brackets instead");
                    Coverage::of(&attach(&mut object, &aya_btf, &bracket_plan))
                } else {
                    coverage
                }
            }
            Some(Strategy::Brackets) => Coverage::of(&attach(&mut object, &aya_btf, &bracket_plan)),
            None => attribution::without_per_cpu_offset(&mut object, btf, kallsyms),
        };
        log::debug!("start: attribution attached in {:?}", started.elapsed());
        forced_method_attached(choice, &coverage)?;
        let mtu_hooks = mtu::hook_list(&attach(&mut object, &aya_btf, &mtu_plan));
        log::debug!("start: MTU hooks attached in {:?}", started.elapsed());
        let conntrack = btf.struct_size("nf_conntrack_tuple_hash").is_some();
        let masquerade =
            MasqCoverage::of(&attach(&mut object, &aya_btf, &masquerade_plan), conntrack);
        log::debug!(
            "start: MASQUERADE hooks attached in {:?}",
            started.elapsed()
        );
        let (exits, netns_teardown_hooks) = teardown(&mut object, &aya_btf, &exits_plan);
        log::debug!("start: netns teardown hook in {:?}", started.elapsed());
        if coverage.fentry_brackets + coverage.kprobe_brackets == 0 {
            drops::sample_xfrm_drops(&mut object, &crate::btf::drop_reason_names(btf))?;
        }
        for (what, missing) in [
            ("", &coverage.missing),
            ("oversize ESP: ", &mtu_hooks.missing),
            ("MASQUERADE detection: ", &masquerade.missing),
            ("IKE watch: ", &ike_hooks.missing),
        ] {
            for (function, why) in missing {
                log::info!("{what}not hooked: {function}: {why}");
            }
        }
        Ok(Self {
            object,
            logger,
            samples,
            leak_samples,
            drop_samples,
            exits,
            netns_teardown_hooks,
            coverage,
            mtu_hooks,
            ike_hooks,
            masquerade,
            stack_symbols: std::cell::OnceCell::new(),
        })
    }

    /// Once a second: the programs' log lines and samples.
    pub fn tick(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
        self.samples.drain();
        self.leak_samples.drain();
        self.drop_samples.drain();
    }

    /// Namespaces torn down since the last call, with their final counters.
    pub fn take_netns_exits(&mut self) -> Vec<tracer_common::netns::NetnsExit> {
        self.exits.as_mut().map_or_else(Vec::new, Exits::drain)
    }

    /// Reads every table (the programs keep running).
    pub fn read(&self, kallsyms: &Kallsyms) -> anyhow::Result<Readings> {
        let (drops, drops_untracked) = drops::read(&self.object)?;
        let (sources, attribution_errors) = attribution::read(&self.object)?;
        let masquerade = masquerade::read(&self.object)?;
        Ok(Readings {
            drops,
            drops_untracked,
            drop_samples: self.drop_samples.kept().to_vec(),
            capture: crate::model::CaptureCounts {
                drops_captured: self.drop_samples.received(),
                drops_not_captured: drops::samples_lost(&self.object)?,
                leaks_captured: self.leak_samples.received(),
                leaks_not_captured: masquerade.samples_lost,
            },
            sources,
            attribution_errors,
            samples: attribution::stack_samples(
                &self.object,
                self.samples.kept(),
                self.stack_symbols(kallsyms),
            ),
            mtu: mtu::read(&self.object)?,
            masquerade: masquerade::Counted {
                samples: self.leak_samples.kept().to_vec(),
                ..masquerade
            },
            ike: ike::read(&self.object).context("reading the IKE table")?,
        })
    }

    /// The symbols for sample stacks (the start-up ones until a sample
    /// needs more).
    fn stack_symbols<'a>(&'a self, kallsyms: &'a Kallsyms) -> &'a Kallsyms {
        if self.samples.kept().is_empty() {
            return kallsyms;
        }
        self.stack_symbols
            .get_or_init(|| {
                kallsyms
                    .with_current_bpf_symbols()
                    .inspect_err(|e| log::warn!("reading /proc/kallsyms for BPF programs: {e}"))
                    .ok()
            })
            .as_ref()
            .unwrap_or(kallsyms)
    }

    /// Reads every table a last time, then detaches everything.
    pub fn finish(mut self, kallsyms: &Kallsyms) -> anyhow::Result<Readings> {
        self.tick();
        self.samples.close();
        self.leak_samples.close();
        self.drop_samples.close();
        let readings = self.read(kallsyms);
        let detaching = std::time::Instant::now();
        drop(self);
        log::debug!("stop: detached in {:?}", detaching.elapsed());
        readings
    }
}
