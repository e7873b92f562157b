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
    /// Alternating rounds without and with the tracer.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Seconds of drop storm for the CPU and memory figures.
    #[arg(long, default_value_t = 15)]
    pub storm_seconds: u64,
    /// Where the JSON of every kernel goes (default: target/bench.json).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The targets.
const MIN_THROUGHPUT_RATIO: f64 = 0.97;
const MAX_ATTACH_SECONDS_6_1: f64 = 1.0;
const MAX_CPU_PERCENT: f64 = 5.0;
const MAX_RSS_KIB: f64 = 64.0 * 1024.0;

pub fn run(options: &Options) -> anyhow::Result<()> {
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
                 {} --out {} --rounds {} --seconds {} --storm-seconds {}\n",
                binary.display(),
                util::workspace_root().display(),
                bench.display(),
                result.display(),
                options.rounds,
                options.seconds,
                options.storm_seconds,
            ),
        )?;
        eprintln!("bench: booting {name} ({}) under TCG", kernel.release);
        let budget =
            options.rounds as u64 * (4 * options.seconds + 60) + options.storm_seconds + 600;
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

/// Prints the table; returns the targets missed.
fn print_table(results: &[Value]) -> Vec<String> {
    let mut missed = Vec::new();
    println!(
        "\n{:<6} {:<18} {:>9} {:>9} {:>9} {:>11} {:>7} {:>8}",
        "kernel",
        "release",
        "tcp with",
        "udp with",
        "attach s",
        "storm drops/s",
        "cpu %",
        "rss MiB"
    );
    for r in results {
        let name = r["matrix_name"].as_str().unwrap_or("?");
        let (tcp, udp) = (
            f(&r["throughput_ratio"]["tcp"]),
            f(&r["throughput_ratio"]["udp"]),
        );
        let attach = f(&r["start_to_attached_seconds"]["median"]);
        let storm = &r["storm"];
        let (cpu, rss) = (
            f(&storm["tracer_cpu_percent_of_one_core"]),
            f(&storm["tracer_rss_peak_kib"]),
        );
        println!(
            "{:<6} {:<18} {:>9.3} {:>9.3} {:>9.2} {:>11.0} {:>7.2} {:>8.1}",
            name,
            r["kernel"].as_str().unwrap_or("?"),
            tcp,
            udp,
            attach,
            f(&storm["drops_per_second"]),
            cpu,
            rss / 1024.0
        );
        for (what, ok) in [
            (
                format!("tcp throughput ratio {tcp:.3} >= {MIN_THROUGHPUT_RATIO}"),
                tcp >= MIN_THROUGHPUT_RATIO,
            ),
            (
                format!("udp throughput ratio {udp:.3} >= {MIN_THROUGHPUT_RATIO}"),
                udp >= MIN_THROUGHPUT_RATIO,
            ),
            (
                format!("start to attached {attach:.2} s < {MAX_ATTACH_SECONDS_6_1} s"),
                name != "6.1" || attach < MAX_ATTACH_SECONDS_6_1,
            ),
            (
                format!("storm CPU {cpu:.2}% < {MAX_CPU_PERCENT}%"),
                cpu < MAX_CPU_PERCENT,
            ),
            (
                format!("storm RSS {:.1} MiB < 64 MiB", rss / 1024.0),
                rss < MAX_RSS_KIB,
            ),
        ] {
            if !ok {
                missed.push(format!("{name}: {what}"));
            }
        }
    }
    println!("\nper program (kernel BPF stats, with the tracer attached during iperf3):");
    println!(
        "{:<6} {:<24} {:>12} {:>10}",
        "kernel", "program", "runs", "ns/run"
    );
    for r in results {
        let name = r["matrix_name"].as_str().unwrap_or("?");
        for p in r["programs"].as_array().into_iter().flatten() {
            println!(
                "{:<6} {:<24} {:>12} {:>10.0}",
                name,
                p["name"].as_str().unwrap_or("?"),
                p["run_cnt"].as_u64().unwrap_or(0),
                f(&p["ns_per_run"])
            );
        }
    }
    println!(
        "\ntargets: throughput with/without >= {MIN_THROUGHPUT_RATIO} (median of the rounds), start to attached < 1 s on 6.1, tracer CPU < 5% of one core and RSS < 64 MiB during the storm"
    );
    for m in &missed {
        println!("MISSED: {m}");
    }
    missed
}
