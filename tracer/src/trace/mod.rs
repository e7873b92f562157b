//! The default run: attach, watch until Ctrl-C/SIGTERM or `--duration`,
//! then report every XFRM counter that moved, the packets behind each
//! increment (where the kernel lets us hook its XFRM functions), and the
//! XFRM-related drops.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracer_common::attribution::SourceKey;

use crate::{
    attribution::{self, Coverage},
    btf::{self, KernelBtf},
    counters::Counters,
    diagnosis, drops, ike,
    kallsyms::Kallsyms,
    masquerade, mtu,
    netns::{self, Netns},
    pluto, privilege,
    report::{self, Counter, Kernel, NetnsDelta, NetnsInfo, Report},
    xfrm_stat::XfrmStat,
    xfrm_state::{XfrmBook, XfrmState},
};

mod probes;

use probes::Probes;

pub struct Options {
    /// Stop after this long; `None` runs until Ctrl-C or SIGTERM.
    pub duration: Option<Duration>,
    /// Created once every program is attached (for scripts and tests).
    pub ready_file: Option<PathBuf>,
    /// Redraw the counters every second while running (on a terminal).
    pub live: bool,
    pub hooks: attribution::HookChoice,
    /// pluto control sockets to ask (default: every running pluto).
    pub pluto_sockets: Vec<PathBuf>,
    /// Stops the run (checked every second) when set by another thread.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
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
    let counter_names = Counters::from_btf(&btf).unwrap_or_default();
    let mut probes = Probes::attach(&btf, &kallsyms, options.hooks)?;
    let mut book = XfrmBook::default();
    watch_new_namespaces(&mut book);
    let (mut plutos, pluto_problems) = pluto::session::Watch::start(&options.pluto_sockets);
    for problem in &pluto_problems {
        log::info!("pluto: {problem}");
    }
    // Counters are read once everything is attached, so every increment
    // in the window can be attributed.
    let before = snapshot();
    let started = Instant::now();

    let live = options.live && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let stop = options.stop.clone();
    let mut ticks = 0u64;
    wait(options.duration, options.ready_file.as_deref(), || {
        ticks += 1;
        probes.tick();
        book.poll();
        plutos.tick();
        if ticks.is_multiple_of(5) {
            watch_new_namespaces(&mut book);
        }
        if live {
            let counters = counter_report(
                &before,
                &snapshot(),
                &probes.sources(),
                &counter_names,
                &probes.coverage,
            );
            print!("{}", report::render_live(started.elapsed(), &counters));
        }
        stop.as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    })?;

    let after = snapshot();
    let coverage = probes.coverage.clone();
    let ike_hooks = std::mem::take(&mut probes.ike_hooks);
    let mtu_hooks = std::mem::take(&mut probes.mtu_hooks);
    let masq_coverage = probes.masquerade.clone();
    // Detaches every program before the (slower) reporting.
    let readings = probes.finish(&kallsyms)?;
    let elapsed = started.elapsed();
    book.poll();
    let plutos = plutos.finish();

    let reasons = btf::drop_reason_names(&btf);
    let mut drops = drops::summarize(&readings.drops, &kallsyms, &reasons);
    let mut counters = counter_report(
        &before,
        &after,
        &readings.sources,
        &counter_names,
        &coverage,
    );
    let mut leaks = masquerade::leaks(&readings.masquerade, &masq_coverage);
    let mut ike_paths = ike::summarize(&readings.ike, &kallsyms, &reasons);
    let mut seen: Vec<u64> = drops.iter().map(|d| u64::from(d.netns)).collect();
    seen.extend(readings.mtu.iter().map(|(k, _)| u64::from(k.netns)));
    seen.extend(leaks.iter().map(|l| l.netns));
    seen.extend(ike_paths.iter().map(|p| p.netns));
    seen.extend(
        counters
            .iter()
            .flat_map(|c| c.by_netns.iter().map(|n| n.netns)),
    );
    let netns: Vec<NetnsInfo> = after
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
        .collect();
    let label_of = |inode: u64| {
        netns
            .iter()
            .find(|n| n.inode == inode)
            .map_or_else(|| format!("netns:{inode}"), |n| n.label.clone())
    };
    let ifname_of = |inode: u64, ifindex: u32| match netns
        .iter()
        .find(|n| n.inode == inode)
        .and_then(|n| n.interfaces.get(&ifindex))
    {
        Some(name) => name.clone(),
        None if ifindex == 0 => "-".into(),
        None => format!("if{ifindex}"),
    };
    let mut plutos = plutos;
    for pluto in &mut plutos {
        pluto.netns_label = label_of(pluto.netns);
    }
    let esp_sizes = esp_sizes(&readings.mtu, &book, &netns);
    for drop in &mut drops {
        drop.netns_label = label_of(u64::from(drop.netns));
        drop.ifname = ifname_of(u64::from(drop.netns), drop.ifindex);
    }
    let name_source = |source: &mut attribution::Source| {
        source.ifname = ifname_of(source.netns, source.ifindex);
        source.netns_label = label_of(source.netns);
        if let Some(policy) = book.policy(source.netns, source.policy_index) {
            source.policy_selector = format!("{} -> {}", policy.selector.src, policy.selector.dst);
        }
        if let Some((connection, state)) =
            pluto::session::owner_of_spi_text(&plutos, source.netns, &source.spi)
        {
            source.connection = connection.to_string();
            source.pluto_state = state;
        }
    };
    for (index, mut sample) in readings.samples {
        let name = counter_names.name(index);
        if let Some(counter) = counters.iter_mut().find(|c| c.name == name) {
            name_source(&mut sample.source);
            counter.samples.push(sample);
        }
    }
    for counter in &mut counters {
        counter.sources.iter_mut().for_each(name_source);
    }
    for leak in &mut leaks {
        leak.netns_label = label_of(leak.netns);
        leak.ifname = ifname_of(leak.netns, leak.ifindex);
    }
    for path in &mut ike_paths {
        path.netns_label = label_of(path.netns);
    }
    let mut findings = masquerade::findings(&leaks);
    findings.extend(mtu::findings(&esp_sizes));
    let findings = diagnosis::diagnose(
        &diagnosis::Evidence {
            counters: &counters,
            ike: &ike_paths,
            plutos: &plutos,
            book: &book,
            ike_watched: ike_hooks.missing.is_empty(),
        },
        findings,
    );
    let mode = coverage.mode();
    Ok(Report {
        schema: report::SCHEMA,
        kernel: Kernel { release, mode },
        duration_secs: elapsed.as_secs_f64(),
        coverage,
        attribution_errors: readings.attribution_errors,
        counters,
        drops,
        drops_untracked: readings.drops_untracked,
        netns,
        esp_sizes,
        esp_sizes_hooks: mtu_hooks,
        findings,
        ike: ike_paths,
        ike_hooks,
        pluto: report::PlutoReport {
            instances: plutos,
            problems: pluto_problems,
        },
        masquerade: masquerade::MasqueradeReport {
            coverage: masq_coverage,
            leaks,
            table_full: readings.masquerade.table_full,
            unseen: readings.masquerade.unseen,
        },
    })
}

/// Starts watching the XFRM state of namespaces that appeared.
fn watch_new_namespaces(book: &mut XfrmBook) {
    for ns in netns::all().into_values() {
        book.watch(ns.inode, &ns.path);
    }
}

/// Oversize ESP per SA, joined with the SAs the book has seen.
fn esp_sizes(
    rows: &[(tracer_common::mtu::MtuKey, tracer_common::mtu::MtuStats)],
    book: &XfrmBook,
    netns: &[NetnsInfo],
) -> Vec<mtu::SaSizes> {
    if rows.is_empty() {
        return Vec::new();
    }
    let states: BTreeMap<u64, XfrmState> = netns
        .iter()
        .filter_map(|n| Some((n.inode, book.current(n.inode)?)))
        .collect();
    let views: Vec<mtu::NetnsView> = netns
        .iter()
        .map(|n| mtu::NetnsView {
            inode: n.inode,
            label: &n.label,
            interfaces: &n.interfaces,
            state: states.get(&n.inode),
        })
        .collect();
    mtu::summarize(rows, &views)
}

/// Blocks until the duration passes, SIGINT/SIGTERM arrives or `tick`
/// (called every second) returns true. The ready file is written once the
/// signal handlers are installed, so a SIGINT sent as soon as it appears
/// ends the run with a report instead of killing the process.
fn wait(
    duration: Option<Duration>,
    ready_file: Option<&std::path::Path>,
    mut tick: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut terminate =
            signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        if let Some(path) = ready_file {
            std::fs::write(path, b"attached\n")
                .with_context(|| format!("writing ready file {}", path.display()))?;
        }
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
                _ = ticks.tick() => if tick() {
                    break;
                },
            }
        }
        Ok(())
    })
}

/// Per counter: the kernel's increase in each netns (namespaces that
/// appeared during the run count from zero), what was attributed, and the
/// packets behind it.
fn counter_report(
    before: &Snapshot,
    after: &Snapshot,
    sources: &[(SourceKey, u64)],
    names: &Counters,
    coverage: &Coverage,
) -> Vec<Counter> {
    let mut by_counter: BTreeMap<String, Counter> = BTreeMap::new();
    let kind = if coverage.complete {
        "attributed"
    } else {
        "counted"
    };
    for (inode, (ns, now)) in after {
        let then = before
            .get(inode)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        for (name, delta) in now.delta_since(&then) {
            let counter = counter_entry(&mut by_counter, &name, kind);
            counter.kernel_delta += delta;
            counter.by_netns.push(NetnsDelta {
                netns: *inode,
                label: ns.label.clone(),
                delta,
                attributed: 0,
            });
        }
    }
    for (key, count) in sources {
        let name = names.name(key.counter);
        let counter = counter_entry(&mut by_counter, &name, kind);
        counter.attributed += count;
        let netns = u64::from(key.flow.netns);
        if let Some(n) = counter.by_netns.iter_mut().find(|n| n.netns == netns) {
            n.attributed += count;
        }
        counter.sources.push(attribution::source(key, *count));
    }
    by_counter
        .into_values()
        .map(|mut c| {
            c.gap = i128::from(c.kernel_delta) - i128::from(c.attributed);
            c.sources.sort_by_key(|s| std::cmp::Reverse(s.count));
            c
        })
        .collect()
}

fn counter_entry<'a>(
    by_counter: &'a mut BTreeMap<String, Counter>,
    name: &str,
    coverage: &'static str,
) -> &'a mut Counter {
    by_counter
        .entry(name.to_string())
        .or_insert_with(|| Counter {
            name: name.to_string(),
            kernel_delta: 0,
            attributed: 0,
            gap: 0,
            coverage,
            by_netns: Vec::new(),
            sources: Vec::new(),
            samples: Vec::new(),
        })
}
