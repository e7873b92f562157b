//! The default run: attach, watch until Ctrl-C/SIGTERM/SIGHUP or `--duration`,
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

use crate::{
    btf::{self, KernelBtf},
    counters::Counters,
    filter::Filter,
    kallsyms::Kallsyms,
    netns::{self, Netns},
    pluto, privilege, prometheus, render,
    report::{CounterValues, Outcome, Report},
    xfrm_stat::XfrmStat,
    xfrm_state::XfrmBook,
};

mod assemble;
mod probes;

use probes::Probes;

pub struct Options {
    /// Stop after this long; `None` runs until Ctrl-C or SIGTERM.
    pub duration: Option<Duration>,
    /// Created once every program is attached (for scripts and tests).
    pub ready_file: Option<PathBuf>,
    /// Redraw the counters every `interval` while running (on a terminal).
    pub live: bool,
    pub hooks: crate::hooks::HookChoice,
    /// Per-packet brackets instead of the diff at the drop.
    pub brackets: bool,
    /// pluto control sockets to ask (default: every running pluto).
    pub pluto_sockets: Vec<PathBuf>,
    /// What the report is narrowed to.
    pub filter: Filter,
    /// How often the live view and the metrics are refreshed.
    pub interval: Duration,
    /// Serve OpenMetrics here while running.
    pub prometheus: Option<std::net::SocketAddr>,
    /// Stops the run (checked every second) when set by another thread.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Counters of every network namespace, by netns inode.
type Snapshot = BTreeMap<u64, (Netns, XfrmStat)>;

/// Reads the counters of every netns when `counters`; without them every
/// netns is still listed (with no counter): it names drops and IKE paths.
fn snapshot(counters: bool) -> Snapshot {
    netns::all()
        .into_values()
        .filter_map(|ns| {
            let stat = if counters {
                netns::read_counters(&ns)?
            } else {
                XfrmStat::default()
            };
            Some((ns.inode, (ns, stat)))
        })
        .collect()
}

/// Why counter deltas cannot be reported, if they cannot: `path` (our own
/// `/proc/net/xfrm_stat`, read on the main thread, which never leaves our
/// netns) is missing, unreadable, empty or not in its format.
fn xfrm_stat_problem(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path);
    let path = path.display();
    match text {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "{path} is missing (kernel without CONFIG_XFRM_STATISTICS)"
        )),
        Err(e) => Some(format!("{path} cannot be read: {e}")),
        Ok(text) => match XfrmStat::parse(&text) {
            Ok(stat) if stat.0.is_empty() => Some(format!("{path} is empty")),
            Ok(_) => None,
            Err(e) => Some(format!("{path} is not in its format: {e}")),
        },
    }
}

/// A run: start, watch until asked to stop, then stop and report.
pub fn run(options: &Options) -> anyhow::Result<Outcome> {
    let mut session = Session::start(options)?;
    session.watch()?;
    session.stop()
}

/// The metrics text the endpoint serves, and where it listens.
type Metrics = Option<(std::net::SocketAddr, prometheus::Shared)>;

/// Everything a run holds between start and stop: the attached programs,
/// the pluto watch (both consumed at the stop) and the rest.
struct Session<'a> {
    probes: Probes,
    plutos: pluto::session::Watch,
    run: Run<'a>,
}

/// What the report is assembled from, besides the programs' readings.
struct Run<'a> {
    options: &'a Options,
    context: assemble::Context,
    /// Namespaces seen, and those deleted with their last counters.
    history: netns::History,
    book: XfrmBook,
    /// Whether `/proc/net/xfrm_stat` can be read (else no counter deltas).
    counters: bool,
    /// Counters once everything was attached.
    before: Snapshot,
    /// When the watch began (after attaching).
    started: Instant,
    metrics: Metrics,
    /// Redraw the counters on the terminal.
    live: bool,
    ticks: u64,
}

impl<'a> Session<'a> {
    /// Reads the kernel's facts, attaches every program, starts following
    /// namespaces, SAs and pluto, and reads the counters last.
    fn start(options: &'a Options) -> anyhow::Result<Self> {
        privilege::require_privileges()?;
        check_requested(options)?;
        let started = Instant::now();
        let btf = KernelBtf::running()?;
        log::debug!("start: kernel BTF read in {:?}", started.elapsed());
        let kallsyms = Kallsyms::read().context("reading /proc/kallsyms")?;
        log::debug!("start: kallsyms read in {:?}", started.elapsed());
        // Without the counters the run still watches drops, IKE, MASQUERADE
        // and MTU; the report says why no counter is shown.
        let counters_unavailable = xfrm_stat_problem("/proc/net/xfrm_stat".as_ref());
        if let Some(problem) = &counters_unavailable {
            log::warn!("{problem}: no counter deltas");
        }
        let counters = counters_unavailable.is_none();
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .context("uname")?;
        let counter_names = Counters::from_btf(&btf).unwrap_or_default();
        let probes = Probes::attach(
            &btf,
            &kallsyms,
            &counter_names,
            options.hooks,
            options.brackets,
        )?;
        // Without the teardown hook, a deleted namespace keeps the counters
        // last read (every second).
        let mut history =
            netns::History::new(counters && probes.netns_teardown_hooks.attached.is_empty());
        let mut book = XfrmBook::default();
        watch_namespaces(&mut book, &history.tick(Vec::new(), &counter_names, true));
        log::debug!("start: namespaces watched in {:?}", started.elapsed());
        let (plutos, pluto_problems) = pluto::session::Watch::start(&options.pluto_sockets);
        log::debug!("start: pluto watched in {:?}", started.elapsed());
        for problem in &pluto_problems {
            log::info!("pluto: {problem}");
        }
        let context = assemble::Context {
            release,
            reasons: btf::drop_reason_names(&btf),
            kallsyms,
            counter_names,
            coverage: probes.coverage.clone(),
            mtu_hooks: probes.mtu_hooks.clone(),
            ike_hooks: probes.ike_hooks.clone(),
            masquerade: probes.masquerade.clone(),
            netns_teardown_hooks: probes.netns_teardown_hooks.clone(),
            pluto_problems,
            counters_unavailable,
        };
        // The kernel's BTF (several MiB) is the largest thing in memory and
        // is not needed once attached: free it and give the pages back, so a
        // long run (a drop storm) holds only what it reports from.
        drop(btf);
        release_free_memory();
        log::debug!("start: BTF freed in {:?}", started.elapsed());
        // Counters are read once everything is attached, so every increment
        // in the window can be attributed.
        let before = snapshot(counters);
        log::debug!(
            "start: attached and counters read in {:?}",
            started.elapsed()
        );
        Ok(Self {
            probes,
            plutos,
            run: Run {
                options,
                context,
                history,
                book,
                counters,
                before,
                started: Instant::now(),
                metrics: options
                    .prometheus
                    .map(|address| (address, prometheus::Shared::default())),
                live: options.live && std::io::IsTerminal::is_terminal(&std::io::stdout()),
                ticks: 0,
            },
        })
    }

    /// Until the duration passes, a signal arrives or `options.stop` is set.
    fn watch(&mut self) -> anyhow::Result<()> {
        let options = self.run.options;
        wait(
            options.duration,
            options.ready_file.as_deref(),
            self.run.metrics.clone(),
            || self.tick(),
        )
    }

    /// Once a second: samples, namespaces, SAs, pluto; the live view and
    /// the metrics every `--interval`. True when asked to stop.
    fn tick(&mut self) -> bool {
        let run = &mut self.run;
        run.ticks += 1;
        self.probes.tick();
        let every_5_s = run.ticks.is_multiple_of(5);
        let reachable = run.history.tick(
            self.probes.take_netns_exits(),
            &run.context.counter_names,
            every_5_s,
        );
        run.book.poll();
        self.plutos.tick();
        if every_5_s {
            watch_namespaces(&mut run.book, &reachable);
        }
        let refresh_every = run.options.interval.as_secs_f64().round().max(1.0) as u64;
        if (run.live || run.metrics.is_some()) && run.ticks.is_multiple_of(refresh_every) {
            match self.refresh() {
                Ok(report) => self.run.show(&report),
                Err(e) => log::warn!("refreshing the live report: {e:#}"),
            }
        }
        self.run
            .options
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The report as of now (the programs keep running).
    fn refresh(&self) -> anyhow::Result<Report> {
        let readings = self.probes.read(&self.run.context.kallsyms)?;
        Ok(self.run.assemble(
            readings,
            &snapshot(self.run.counters),
            self.plutos.observed(),
            self.run.started.elapsed(),
        ))
    }

    /// Reads the counters and every table a last time, detaches every
    /// program, and assembles the report with its raw evidence.
    fn stop(self) -> anyhow::Result<Outcome> {
        let Session {
            mut probes,
            plutos,
            mut run,
        } = self;
        run.history
            .tick(probes.take_netns_exits(), &run.context.counter_names, false);
        let mut after = snapshot(run.counters);
        // A namespace torn down after the reading above: its counters at
        // teardown include everything read there.
        let late = probes.take_netns_exits();
        for exit in &late {
            after.remove(&u64::from(exit.netns));
        }
        run.history.tick(late, &run.context.counter_names, false);
        let elapsed = run.started.elapsed();
        // Detaches every program before the (slower) reporting.
        let stopping = Instant::now();
        let readings = probes.finish(&run.context.kallsyms)?;
        log::debug!("stop: read and detached in {:?}", stopping.elapsed());
        // The SAs' counters as the run ends (what each SA carried).
        run.book.refresh_counters();
        let report = run.assemble(readings, &after, plutos.finish(), elapsed);
        log::debug!("stop: report assembled in {:?}", stopping.elapsed());
        let xfrm_stat = run.counter_evidence(&report, &after);
        let xfrm_state = report
            .netns
            .iter()
            .filter_map(|n| Some((n.label.clone(), run.book.current(n.inode)?)))
            .filter(|(_, state)| {
                !state.sas.is_empty() || !state.policies.is_empty() || !state.interfaces.is_empty()
            })
            .collect();
        Ok(Outcome {
            report,
            xfrm_stat,
            xfrm_state,
        })
    }
}

impl Run<'_> {
    /// Publishes a refreshed report to the metrics endpoint and the terminal.
    fn show(&self, report: &Report) {
        if let Some((_, text)) = &self.metrics {
            *text.lock().unwrap_or_else(|e| e.into_inner()) = prometheus::render(report).into();
        }
        if self.live {
            // Not print!: it panics once the terminal is gone (SIGHUP), and
            // the run must still report.
            let _ = std::io::Write::write_all(
                &mut std::io::stdout(),
                render::live(self.started.elapsed(), &report.counters).as_bytes(),
            );
        }
    }

    /// The report at one moment, narrowed as asked.
    fn assemble(
        &self,
        readings: probes::Readings,
        after: &Snapshot,
        plutos: Vec<pluto::session::Observed>,
        elapsed: Duration,
    ) -> Report {
        let mut report = assemble::report(
            &self.context,
            assemble::Moment {
                readings,
                before: &self.before,
                after,
                history: &self.history,
                book: &self.book,
                plutos,
                elapsed,
            },
        );
        self.options.filter.apply(&mut report);
        report
    }

    /// `/proc/net/xfrm_stat` before and after, per namespace the report
    /// kept (deleted ones as of their teardown).
    fn counter_evidence(
        &self,
        report: &Report,
        after: &Snapshot,
    ) -> BTreeMap<String, (CounterValues, CounterValues)> {
        let kept = |label: &str| report.netns.iter().any(|n| n.label == label);
        let mut xfrm_stat = BTreeMap::new();
        let readings = self
            .history
            .deleted
            .iter()
            .map(|gone| (&gone.netns, &gone.counters))
            .chain(after.values().map(|(ns, now)| (ns, now)));
        for (ns, now) in readings.filter(|(ns, _)| kept(&ns.label)) {
            let then = self
                .before
                .get(&ns.inode)
                .map(|(_, s)| s.0.clone())
                .unwrap_or_default();
            xfrm_stat
                .entry(ns.label.clone())
                .or_insert((then, now.0.clone()));
        }
        xfrm_stat
    }
}

/// Fails before anything is attached when what the user named does not
/// exist: a run that watched nothing of what was asked would look clean.
fn check_requested(options: &Options) -> anyhow::Result<()> {
    for socket in &options.pluto_sockets {
        // A missing socket is evidence (pluto is down) and the report says
        // so; a path that is no socket at all is a mistake.
        if let Err(e @ pluto::Error::NotASocket(_)) = pluto::check_socket(socket) {
            return Err(e).context("--pluto-socket");
        }
    }
    if !options.filter.netns.is_empty() {
        netns::check_named(&options.filter.netns, &netns::all()).context("--netns")?;
    }
    Ok(())
}

/// Starts watching the XFRM state of namespaces that appeared, and lets go
/// of those that can no longer be reached, so that a deleted netns is not
/// kept alive by the run.
fn watch_namespaces(book: &mut XfrmBook, reachable: &BTreeMap<u64, Netns>) {
    book.release_unreachable(&reachable.keys().copied().collect());
    for ns in reachable.values() {
        book.watch(ns.inode, &ns.path);
    }
}

/// Blocks until the duration passes, SIGINT/SIGTERM/SIGHUP arrives or `tick`
/// (called every second) returns true. The ready file is written once the
/// signal handlers are installed, so a SIGINT sent as soon as it appears
/// ends the run with a report instead of killing the process.
fn wait(
    duration: Option<Duration>,
    ready_file: Option<&std::path::Path>,
    metrics: Option<(std::net::SocketAddr, prometheus::Shared)>,
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
        // A closed SSH session during an incident must not lose the run;
        // under nohup (SIGHUP ignored) the run goes on, as asked.
        let mut hangup = if hangup_ignored() {
            None
        } else {
            Some(signal(SignalKind::hangup()).context("installing SIGHUP handler")?)
        };
        if let Some((address, text)) = metrics {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for Prometheus on {address}"))?;
            tokio::spawn(prometheus::serve(listener, text));
        }
        if let Some(path) = ready_file {
            // Created anew: a link planted at the path is not followed.
            crate::fsutil::create_new(path, b"attached\n")
                .with_context(|| format!("creating the ready file {}", path.display()))?;
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
            let hung_up = async {
                match hangup.as_mut() {
                    Some(hangup) => hangup.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                _ = hung_up => break,
                () = until_deadline => break,
                _ = ticks.tick() => if tick() {
                    break;
                },
            }
        }
        Ok(())
    })
}

/// Whether SIGHUP is ignored, as `nohup` leaves it.
fn hangup_ignored() -> bool {
    let mut current = std::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: with no new action, sigaction only writes the current one
    // into `current`, which is large enough for it.
    let read = unsafe { libc::sigaction(libc::SIGHUP, std::ptr::null(), current.as_mut_ptr()) };
    // SAFETY: zeroed is a valid sigaction, and on success the call filled it.
    read == 0 && unsafe { current.assume_init() }.sa_sigaction == libc::SIG_IGN
}

/// Returns the heap's free pages to the kernel (glibc keeps them otherwise).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_empty_or_broken_xfrm_stat_is_said_in_one_line() {
        let dir = std::env::temp_dir().join(format!("xfrm-trace-stat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let problem = |path: &std::path::Path| {
            xfrm_stat_problem(path).map(|p| p.replace(&dir.display().to_string(), "D"))
        };
        assert_eq!(
            problem(&dir.join("none")).as_deref(),
            Some("D/none is missing (kernel without CONFIG_XFRM_STATISTICS)")
        );
        assert_eq!(
            problem(&file("empty", "")).as_deref(),
            Some("D/empty is empty")
        );
        assert_eq!(
            problem(&file("garbage", "garbage\n")).as_deref(),
            Some("D/garbage is not in its format: line 1: expected `Name value`, got \"garbage\"")
        );
        assert!(problem(&dir).unwrap().starts_with("D cannot be read: "));
        assert_eq!(problem(&file("good", "XfrmInError 0\n")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
