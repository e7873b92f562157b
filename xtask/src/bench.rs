//! `cargo xtask bench`: what the tracer costs, measured inside a VM per
//! kernel (the guest side is `tests/src/bin/bench.rs`), printed as a table
//! with the targets, and written as JSON.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::{
    kernels::{self, MATRIX},
    setup, util, vm,
};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Kernels of the matrix to measure on; repeatable (default: 6.1, sid).
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Rounds; each runs every condition once (no tracer, xfrm-trace,
    /// xfrm-trace --hooks kprobe, bpftrace), in a rotating order.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per iperf3 TCP run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// UDP datagrams (1000 bytes) per blast through the tunnel, for the
    /// CPU time per datagram.
    #[arg(long, default_value_t = 10_000)]
    pub blast: usize,
    /// Seconds of drop storm for the CPU and memory figures.
    #[arg(long, default_value_t = 15)]
    pub storm_seconds: u64,
    /// Instead of the bench: this many unpaced drop storms without the
    /// tracer, then as many with it, watching the kernel log for soft
    /// lockups and stalls (docs/storm.md).
    #[arg(long)]
    pub storm_check: Option<usize>,
    /// Where the JSON of every kernel goes (default: target/bench.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Prints the tables of an earlier run's JSON (one or more files,
    /// their kernels one after the other) and measures nothing.
    #[arg(long)]
    pub print: Vec<PathBuf>,
}

/// The targets. CPU per healthy datagram with the tracer at most
/// 1/0.95 of without it (and not above the bpftrace peer's), TCP goodput
/// at least 0.95 of without it.
const MAX_CPU_RATIO: f64 = 1.0 / 0.95;
const MIN_TCP_RATIO: f64 = 0.95;
const MAX_RUNS_PER_GATEWAY: f64 = 2.0;
const MAX_ATTACH_SECONDS_6_1: f64 = 2.0;
const MAX_STOP_SECONDS: f64 = 2.0;
const MAX_CPU_PERCENT: f64 = 5.0;
const MAX_RSS_KIB: f64 = 64.0 * 1024.0;

/// The conditions as the guest names them; the first is the reference.
const NONE: &str = "none";
const TRACERS: [&str; 2] = ["xfrm-trace", "xfrm-trace --hooks kprobe"];
const PEER: &str = "bpftrace minimal";

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !options.print.is_empty() {
        let mut results = Vec::new();
        for path in &options.print {
            let text =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let runs: Vec<Value> = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not the JSON of a bench run", path.display()))?;
            results.extend(runs);
        }
        print_table(&results);
        return Ok(());
    }
    setup::all()?;
    setup::vm_tools()?;
    let binary = util::build_release()?;
    util::run(util::cargo().args(["build", "--release", "-p", "tests", "--bin", "bench"]))?;
    let bench = util::target_dir().join("release/bench");
    let wanted: Vec<String> = if options.kernels.is_empty() {
        vec!["6.1".into(), "sid".into()]
    } else {
        options.kernels.clone()
    };
    let mut results = Vec::new();
    for name in &wanted {
        let spec = MATRIX
            .iter()
            .find(|k| k.name == name)
            .with_context(|| format!("unknown kernel {name}"))?;
        let kernel = kernels::ensure(spec)?;
        let out_dir = vm::out_dir(&format!("bench-{name}"));
        std::fs::create_dir_all(&out_dir)?;
        let result = out_dir.join("bench.json");
        let _ = std::fs::remove_file(&result);
        let script = out_dir.join("run.sh");
        std::fs::write(
            &script,
            format!(
                "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
                 export XFRM_TRACE_BIN={}\n\
                 cd {}\n\
                 {} --out {} --rounds {} --seconds {} --blast {} --storm-seconds {}{}\n",
                binary.display(),
                util::workspace_root().display(),
                bench.display(),
                result.display(),
                options.rounds,
                options.seconds,
                options.blast,
                options.storm_seconds,
                options
                    .storm_check
                    .map(|n| format!(" --storm-check {n}"))
                    .unwrap_or_default(),
            ),
        )?;
        eprintln!("bench: booting {name} ({}) under TCG", kernel.release);
        let budget = match options.storm_check {
            Some(runs) => 2 * runs as u64 * (options.storm_seconds + 120) + 600,
            None => {
                options.rounds as u64 * 4 * (options.seconds + 90) + options.storm_seconds + 600
            }
        };
        let outcome = vm::run_script(&kernel, &script, &out_dir, Duration::from_secs(budget))?;
        eprint!("{}", outcome.log);
        if outcome.exit_code != Some(0) {
            bail!(
                "the bench failed in the {name} VM (exit {:?}, timed out: {})",
                outcome.exit_code,
                outcome.timed_out
            );
        }
        let text =
            std::fs::read(&result).with_context(|| format!("reading {}", result.display()))?;
        let mut value: Value = serde_json::from_slice(&text).context("bench JSON")?;
        value["matrix_name"] = Value::from(name.as_str());
        results.push(value);
    }
    let path = options
        .json
        .clone()
        .unwrap_or_else(|| util::target_dir().join("bench.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)
        .with_context(|| format!("writing {}", path.display()))?;
    if options.storm_check.is_some() {
        println!("{}", serde_json::to_string_pretty(&results)?);
        println!("JSON: {}", path.display());
        return Ok(());
    }
    let missed = print_table(&results);
    println!("JSON: {}", path.display());
    if missed.is_empty() {
        Ok(())
    } else {
        bail!("targets missed: {}", missed.join("; "))
    }
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

/// Prints the tables (Markdown, to paste as they are); returns the
/// targets missed.
fn print_table(results: &[Value]) -> Vec<String> {
    let mut missed = Vec::new();
    let mut check = |what: String, ok: bool| {
        if !ok {
            missed.push(what);
        }
    };
    println!(
        "\n| kernel | condition | CPU µs per datagram | × none | TCP Mbit/s | × none | BPF runs per datagram (per gateway) | attach s | stop s |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in results {
        let kernel = r["matrix_name"].as_str().unwrap_or("?");
        let conditions = &r["conditions"];
        for name in [NONE, TRACERS[0], TRACERS[1], PEER] {
            let c = &conditions[name];
            if c["available"] != true {
                println!(
                    "| {kernel} | {name} | absent: {} | | | | | | |",
                    c["reason"].as_str().unwrap_or("?")
                );
                continue;
            }
            let cpu_ratio = f(&c["ratio_to_none"]["cpu_per_packet"]);
            let tcp_ratio = f(&c["ratio_to_none"]["tcp"]);
            let runs = &c["program_runs"];
            let (attach, stop) = (
                f(&c["start_to_attached_seconds"]["median"]),
                f(&c["stop_seconds"]["median"]),
            );
            let dash = |text: String| if name == NONE { "".into() } else { text };
            println!(
                "| {kernel} | {name} | {:.1} | {cpu_ratio:.3} | {:.1} | {tcp_ratio:.3} | {} | {} | {} |",
                f(&c["cpu_seconds_per_packet"]["median"]) * 1e6,
                f(&c["tcp_bits_per_second"]["median"]) / 1e6,
                dash(format!(
                    "{:.2} ({:.2})",
                    f(&runs["per_packet"]),
                    f(&runs["per_packet_per_gateway"])
                )),
                dash(format!("{attach:.2}")),
                dash(format!("{stop:.2}")),
            );
            if !TRACERS.contains(&name) {
                continue;
            }
            let peer = &conditions[PEER];
            let peer_ratio = f(&peer["ratio_to_none"]["cpu_per_packet"]);
            check(
                format!(
                    "{kernel} {name}: CPU per datagram {cpu_ratio:.3} × none <= {MAX_CPU_RATIO:.3}"
                ),
                cpu_ratio <= MAX_CPU_RATIO,
            );
            check(
                format!(
                    "{kernel} {name}: CPU per datagram {cpu_ratio:.3} × none <= bpftrace's {peer_ratio:.3}"
                ),
                peer["available"] != true || cpu_ratio <= peer_ratio,
            );
            check(
                format!("{kernel} {name}: TCP goodput {tcp_ratio:.3} × none >= {MIN_TCP_RATIO}"),
                tcp_ratio >= MIN_TCP_RATIO,
            );
            let per_gateway = f(&runs["per_packet_per_gateway"]);
            check(
                format!(
                    "{kernel} {name}: {per_gateway:.2} program runs per datagram per gateway <= {MAX_RUNS_PER_GATEWAY}"
                ),
                per_gateway <= MAX_RUNS_PER_GATEWAY,
            );
            check(
                format!(
                    "{kernel} {name}: start to attached {attach:.2} s <= {MAX_ATTACH_SECONDS_6_1} s"
                ),
                kernel != "6.1" || attach <= MAX_ATTACH_SECONDS_6_1,
            );
            check(
                format!("{kernel} {name}: stop {stop:.2} s <= {MAX_STOP_SECONDS} s"),
                stop <= MAX_STOP_SECONDS,
            );
        }
    }

    println!("\n| kernel | release | storm drops/s | tracer CPU % of a core | tracer RSS MiB |");
    println!("| --- | --- | ---: | ---: | ---: |");
    for r in results {
        let kernel = r["matrix_name"].as_str().unwrap_or("?");
        let storm = &r["storm"];
        let (cpu, rss) = (
            f(&storm["tracer_cpu_percent_of_one_core"]),
            f(&storm["tracer_rss_peak_kib"]),
        );
        println!(
            "| {kernel} | {} | {:.0} | {cpu:.2} | {:.1} |",
            r["kernel"].as_str().unwrap_or("?"),
            f(&storm["drops_per_second"]),
            rss / 1024.0
        );
        check(
            format!("{kernel}: storm CPU {cpu:.2}% < {MAX_CPU_PERCENT}%"),
            cpu < MAX_CPU_PERCENT,
        );
        check(
            format!("{kernel}: storm RSS {:.1} MiB < 64 MiB", rss / 1024.0),
            rss < MAX_RSS_KIB,
        );
    }

    println!("\nBPF program runs per datagram delivered (kernel BPF stats, one blast):\n");
    println!("| kernel | condition | program | runs | runs per datagram | ns per run |");
    println!("| --- | --- | --- | ---: | ---: | ---: |");
    for r in results {
        let kernel = r["matrix_name"].as_str().unwrap_or("?");
        for name in [TRACERS[0], TRACERS[1], PEER] {
            let programs = &r["conditions"][name]["program_runs"]["programs"];
            for p in programs.as_array().into_iter().flatten() {
                println!(
                    "| {kernel} | {name} | {} | {} | {:.2} | {:.0} |",
                    p["name"].as_str().unwrap_or("?"),
                    p["runs"].as_u64().unwrap_or(0),
                    f(&p["per_packet"]),
                    f(&p["ns_per_run"])
                );
            }
        }
    }
    println!(
        "\nMedians of the rounds; each round runs every condition once in one boot, under TCG. \
         CPU: busy time of all CPUs (/proc/stat) per datagram delivered, 1000-byte UDP from whost to ehost \
         through the ESP tunnel; a datagram crosses two gateways and the router. \
         Targets: CPU × none <= {MAX_CPU_RATIO:.3} (none/with >= 0.95) and <= bpftrace's, TCP × none >= {MIN_TCP_RATIO}, \
         <= {MAX_RUNS_PER_GATEWAY} runs per datagram per gateway, attach <= {MAX_ATTACH_SECONDS_6_1} s on 6.1, stop <= {MAX_STOP_SECONDS} s, \
         storm: tracer CPU < {MAX_CPU_PERCENT}% of a core, RSS < 64 MiB."
    );
    for m in &missed {
        println!("MISSED: {m}");
    }
    missed
}
