//! Every eBPF program of a run: loaded and attached once, read at the end,
//! detached when dropped (also on error and Ctrl-C: the `Ebpf` owns the
//! links).

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use tracer_common::{
    attribution::SourceKey,
    drops::{DropKey, DropSample},
    ike::IkeKey,
    masquerade::LeakSample,
    mtu::{MtuKey, MtuStats},
    names,
};

use crate::{
    attribution::{self, AttributionErrors, Coverage, HookChoice},
    btf::KernelBtf,
    drops, ebpf, ike,
    kallsyms::Kallsyms,
    masquerade, mtu,
    netns::exits::{self, Exits},
    report::HookList,
};

/// Leak and drop samples kept for the pcapng (the counts stay exact).
const PACKETS_KEPT: usize = 256;

pub struct Probes {
    object: aya::Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    samples_ring: Option<RingBuf<MapData>>,
    samples: Vec<tracer_common::attribution::Sample>,
    leak_ring: Option<RingBuf<MapData>>,
    leak_samples: Vec<LeakSample>,
    drop_ring: Option<RingBuf<MapData>>,
    drop_samples: Vec<DropSample>,
    /// Leak and drop samples received, kept or not.
    leaks_received: u64,
    drops_received: u64,
    /// Counters of namespaces torn down during the run.
    exits: Option<Exits>,
    /// The namespace teardown hook, attached or why not.
    pub netns_teardown_hooks: HookList,
    pub coverage: Coverage,
    pub mtu_hooks: HookList,
    pub ike_hooks: HookList,
    pub masquerade: masquerade::MasqCoverage,
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
    pub capture: crate::pcap::CaptureCounts,
    pub sources: Vec<(SourceKey, u64)>,
    pub attribution_errors: AttributionErrors,
    /// Sampled increments with stacks, by counter index.
    pub samples: Vec<(u32, attribution::SampleReport)>,
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

impl Probes {
    /// Loads the object with the running kernel's layout and attaches each
    /// capability with the best hook the kernel offers; what cannot be
    /// hooked is logged and listed in the report.
    pub fn attach(btf: &KernelBtf, kallsyms: &Kallsyms, hooks: HookChoice) -> anyhow::Result<Self> {
        let started = std::time::Instant::now();
        // Needed while attaching only (record layouts, tracepoint ids).
        let _tracefs = crate::tracefs::mount()?;
        let layout = ebpf::KernelLayout::resolve(btf, kallsyms)?;
        // Parsed once for the loader and every fentry: under emulation
        // each parse of vmlinux BTF costs seconds.
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| ebpf::describe(&e));
        log::debug!("start: layout and BTF in {:?}", started.elapsed());
        let mut object = ebpf::load(Some(&layout), aya_btf.as_ref().ok())?;
        log::debug!("start: object loaded in {:?}", started.elapsed());
        let logger = match aya_log::EbpfLogger::init(&mut object) {
            Ok(logger) => Some(logger),
            Err(e) => {
                log::debug!("eBPF logging unavailable: {e}");
                None
            }
        };
        if let Ok(aya_btf) = &aya_btf
            && matches!(hooks, HookChoice::Auto | HookChoice::Fentry)
        {
            let mut programs = mtu::fentry_programs();
            programs.push((names::programs::netns_exit_fentry.into(), exits::FUNCTION));
            programs.extend(masquerade::fentry_programs(btf));
            if layout.offsets.per_cpu_offset != 0 {
                programs.extend(attribution::fentry_programs(btf));
            }
            ebpf::preload(&mut object, &programs, aya_btf);
            log::debug!("start: programs verified in {:?}", started.elapsed());
        }
        drops::attach(&mut object)?;
        let ike_hooks = ike::attach(&mut object);
        let samples_ring = attribution::take_samples(&mut object);
        let leak_ring = masquerade::take_samples(&mut object);
        let drop_ring = drops::take_samples(&mut object);
        log::debug!("start: drops and IKE attached in {:?}", started.elapsed());
        let coverage = attribution::attach(
            &mut object,
            btf,
            &aya_btf,
            kallsyms,
            layout.offsets.per_cpu_offset != 0,
            hooks,
        );
        log::debug!("start: brackets attached in {:?}", started.elapsed());
        forced_method_attached(hooks, &coverage)?;
        let (attached, missing) = mtu::attach(&mut object, &aya_btf, kallsyms, hooks);
        log::debug!("start: MTU hooks attached in {:?}", started.elapsed());
        let masquerade = masquerade::attach(&mut object, btf, &aya_btf, kallsyms, hooks);
        log::debug!(
            "start: MASQUERADE hooks attached in {:?}",
            started.elapsed()
        );
        let (exits, netns_teardown_hooks) =
            match exits::attach(&mut object, &aya_btf, kallsyms, hooks) {
                Ok((exits, how)) => (
                    Some(exits),
                    HookList {
                        attached: vec![how],
                        missing: Vec::new(),
                    },
                ),
                Err(why) => (
                    None,
                    HookList {
                        attached: Vec::new(),
                        missing: vec![(exits::FUNCTION.to_string(), why)],
                    },
                ),
            };
        log::debug!("start: netns teardown hook in {:?}", started.elapsed());
        if coverage.fentry_brackets + coverage.kprobe_brackets == 0 {
            drops::sample_xfrm_drops(&mut object, &crate::btf::drop_reason_names(btf))?;
        }
        for (what, missing) in [
            ("", &coverage.missing),
            ("oversize ESP: ", &missing),
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
            samples_ring,
            samples: Vec::new(),
            leak_ring,
            leak_samples: Vec::new(),
            drop_ring,
            drop_samples: Vec::new(),
            leaks_received: 0,
            drops_received: 0,
            exits,
            netns_teardown_hooks,
            coverage,
            mtu_hooks: HookList { attached, missing },
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
        if let Some(ring) = self.samples_ring.as_mut() {
            ebpf::drain_ring(ring, &mut self.samples, attribution::SAMPLES_KEPT);
        }
        if let Some(ring) = self.leak_ring.as_mut() {
            self.leaks_received += ebpf::drain_ring(ring, &mut self.leak_samples, PACKETS_KEPT);
        }
        if let Some(ring) = self.drop_ring.as_mut() {
            self.drops_received += ebpf::drain_ring(ring, &mut self.drop_samples, PACKETS_KEPT);
        }
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
            drop_samples: self.drop_samples.clone(),
            capture: crate::pcap::CaptureCounts {
                drops_captured: self.drops_received,
                drops_not_captured: drops::samples_lost(&self.object)?,
                leaks_captured: self.leaks_received,
                leaks_not_captured: masquerade.samples_lost,
            },
            sources,
            attribution_errors,
            samples: attribution::sample_reports(
                &self.object,
                &self.samples,
                self.stack_symbols(kallsyms),
            ),
            mtu: mtu::read(&self.object)?,
            masquerade: masquerade::Counted {
                samples: self.leak_samples.clone(),
                ..masquerade
            },
            ike: ike::read(&self.object).context("reading the IKE table")?,
        })
    }

    /// The symbols for sample stacks (the start-up ones until a sample
    /// needs more).
    fn stack_symbols<'a>(&'a self, kallsyms: &'a Kallsyms) -> &'a Kallsyms {
        if self.samples.is_empty() {
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
        drop(self.samples_ring.take());
        drop(self.leak_ring.take());
        drop(self.drop_ring.take());
        let readings = self.read(kallsyms);
        let detaching = std::time::Instant::now();
        drop(self);
        log::debug!("stop: detached in {:?}", detaching.elapsed());
        readings
    }
}
