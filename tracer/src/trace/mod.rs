//! The default run: attach, watch until Ctrl-C/SIGTERM or `--duration`,
//! detach, then report what was dropped and which XFRM counters moved.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    btf::{self, KernelBtf},
    drops, ebpf,
    kallsyms::Kallsyms,
    netns::{self, Netns},
    privilege,
    report::{self, Counter, Kernel, NetnsDelta, NetnsInfo, Report},
    xfrm_stat::XfrmStat,
};

pub struct Options {
    /// Stop after this long; `None` runs until Ctrl-C or SIGTERM.
    pub duration: Option<Duration>,
    /// Created once every program is attached (for scripts and tests).
    pub ready_file: Option<PathBuf>,
}

/// Counters of every network namespace, by netns inode.
type Snapshot = BTreeMap<u64, (Netns, XfrmStat)>;

fn snapshot() -> Snapshot {
    netns::all()
        .into_values()
        .filter_map(|ns| {
            let text = netns::read_proc_net(&ns.path, "xfrm_stat").ok()?;
            let stat = XfrmStat::parse(&text).ok()?;
            Some((ns.inode, (ns, stat)))
        })
        .collect()
}

pub fn run(options: &Options) -> anyhow::Result<Report> {
    privilege::require_root()?;
    let btf = KernelBtf::running()?;
    let kallsyms = Kallsyms::read().context("reading /proc/kallsyms")?;
    if !std::path::Path::new("/proc/net/xfrm_stat").exists() {
        log::warn!(
            "/proc/net/xfrm_stat is missing (kernel without CONFIG_XFRM_STATISTICS): no counter deltas"
        );
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .context("uname")?;

    let layout = ebpf::KernelLayout::resolve(&btf)?;
    let mut object = ebpf::load(Some(&layout))?;
    let mut logger = match aya_log::EbpfLogger::init(&mut object) {
        Ok(logger) => Some(logger),
        Err(e) => {
            log::debug!("eBPF logging unavailable: {e}");
            None
        }
    };
    let before = snapshot();
    drops::attach(&mut object)?;
    let started = Instant::now();
    if let Some(path) = &options.ready_file {
        std::fs::write(path, b"attached\n")
            .with_context(|| format!("writing ready file {}", path.display()))?;
    }

    wait(options.duration, || {
        if let Some(logger) = logger.as_mut() {
            logger.flush();
        }
    })?;

    let (rows, untracked) = drops::read(&object)?;
    if let Some(logger) = logger.as_mut() {
        logger.flush();
    }
    // Detach before the (slower) reporting.
    drop(logger);
    drop(object);
    let elapsed = started.elapsed();
    let after = snapshot();

    let reasons = btf::drop_reason_names(&btf);
    let mut drops = drops::summarize(&rows, &kallsyms, &reasons);
    let counters = counter_deltas(&before, &after);
    let mut seen: Vec<u64> = drops.iter().map(|d| u64::from(d.netns)).collect();
    seen.extend(
        counters
            .iter()
            .flat_map(|c| c.by_netns.iter().map(|n| n.netns)),
    );
    let netns = after
        .values()
        .chain(before.values())
        .map(|(ns, _)| ns)
        .fold(BTreeMap::new(), |mut all: BTreeMap<u64, &Netns>, ns| {
            all.entry(ns.inode).or_insert(ns);
            all
        })
        .into_values()
        .map(|ns| NetnsInfo {
            inode: ns.inode,
            label: ns.label.clone(),
            interfaces: if seen.contains(&ns.inode) {
                netns::interface_names(&ns.path).unwrap_or_default()
            } else {
                BTreeMap::new()
            },
        })
        .collect::<Vec<NetnsInfo>>();
    for drop in &mut drops {
        let ns = netns.iter().find(|n| n.inode == u64::from(drop.netns));
        drop.netns_label = ns.map_or_else(|| format!("netns:{}", drop.netns), |n| n.label.clone());
        drop.ifname = match ns.and_then(|n| n.interfaces.get(&drop.ifindex)) {
            Some(name) => name.clone(),
            None if drop.ifindex == 0 => "-".into(),
            None => format!("if{}", drop.ifindex),
        };
    }
    Ok(Report {
        schema: report::SCHEMA,
        kernel: Kernel {
            release,
            mode: "tracepoint-only".into(),
        },
        duration_secs: elapsed.as_secs_f64(),
        counters,
        drops,
        drops_untracked: untracked,
        netns,
        findings: Vec::new(),
    })
}

/// Blocks until the duration passes or SIGINT/SIGTERM arrives, calling
/// `tick` every second (to drain the eBPF log).
fn wait(duration: Option<Duration>, mut tick: impl FnMut()) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut terminate =
            signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let deadline = duration.map(|d| tokio::time::Instant::now() + d);
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        loop {
            let until_deadline = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                () = until_deadline => break,
                _ = ticks.tick() => tick(),
            }
        }
        Ok(())
    })
}

/// Per counter, the increase in each netns (namespaces that appeared during
/// the run count from zero).
fn counter_deltas(before: &Snapshot, after: &Snapshot) -> Vec<Counter> {
    let mut by_counter: BTreeMap<String, Vec<NetnsDelta>> = BTreeMap::new();
    for (inode, (ns, now)) in after {
        let then = before
            .get(inode)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        for (name, delta) in now.delta_since(&then) {
            by_counter.entry(name).or_default().push(NetnsDelta {
                netns: *inode,
                label: ns.label.clone(),
                delta,
            });
        }
    }
    by_counter
        .into_iter()
        .map(|(name, by_netns)| Counter {
            kernel_delta: by_netns.iter().map(|n| n.delta).sum(),
            name,
            attributed: 0,
            coverage: "counted",
            by_netns,
            sources: Vec::new(),
        })
        .collect()
}
