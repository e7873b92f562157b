//! The guest side of `cargo xtask bench`: inside a VM (root, a kernel with
//! ESP), builds the lab, measures what the tracer costs and writes JSON.
//!
//! - throughput through the ESP tunnel (iperf3 TCP and UDP, whost to
//!   ehost) without and with the tracer, in alternating rounds;
//! - each of our programs' cost from the kernel's BPF stats;
//! - start to attached (spawn to `--ready-file`);
//! - the tracer's CPU and resident memory during a drop storm.
//!
//! Usage: bench --out FILE [--rounds N] [--seconds S] [--storm-seconds T]

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::AtomicBool, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tests::{STORM_TARGET, Tracer, block_storm_path, scratch, status_kib};
use xfrm_trace::lab::{EHOST, Host, Lab, StaticIpsec};

struct Options {
    out: std::path::PathBuf,
    rounds: usize,
    seconds: u64,
    storm_seconds: u64,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        out: "bench.json".into(),
        rounds: 5,
        seconds: 5,
        storm_seconds: 15,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--out" => options.out = value()?.into(),
            "--rounds" => options.rounds = value()?.parse()?,
            "--seconds" => options.seconds = value()?.parse()?,
            "--storm-seconds" => options.storm_seconds = value()?.parse()?,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Received bits per second of one iperf3 run from whost to ehost.
fn iperf(lab: &Lab, udp: bool, seconds: u64) -> anyhow::Result<f64> {
    let seconds = seconds.to_string();
    let mut args = vec!["-c", EHOST, "-t", &seconds, "-J"];
    if udp {
        // As fast as the sender can; what arrives is the measure.
        args.extend(["-u", "-b", "0", "-l", "1200"]);
    }
    let out = lab.exec(Host::Whost, "iperf3", &args)?;
    let report: Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no sum_received in iperf3 output: {out}"))
}

/// run_cnt and run_time_ns of each program the process `pid` holds, by
/// name: from the fdinfo of its BPF program descriptors (the kernel's own
/// stats, `kernel.bpf_stats_enabled`), named by bpftool.
fn program_stats(pid: u32) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let mut stats = BTreeMap::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(fd?.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(count), Some(time)) =
            (field("prog_id:"), field("run_cnt:"), field("run_time_ns:"))
        else {
            continue;
        };
        let out = Command::new("bpftool")
            .args(["--json", "prog", "show", "id", &id.to_string()])
            .output()
            .context("bpftool")?;
        let program: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let name = program["name"].as_str().unwrap_or("?").to_string();
        let entry = stats.entry(name).or_insert((0, 0));
        entry.0 += count;
        entry.1 += time;
    }
    Ok(stats)
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after_comm` starts at field 3.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    ticks as f64 / per_second as f64
}

fn start_tracer(name: &str) -> (Tracer, Duration) {
    let started = Instant::now();
    let tracer = Tracer::start(&["--quiet"], &scratch(&format!("bench-{name}.ready")));
    (tracer, started.elapsed())
}

fn run() -> anyhow::Result<()> {
    let options = options()?;
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling kernel.bpf_stats_enabled")?;
    let mut lab = Lab::create("bench")?;
    lab.static_ipsec(&StaticIpsec::default())?;
    block_storm_path(&lab);
    let server: Child = Command::new("ip")
        .args(["netns", "exec", &lab.ns(Host::Ehost), "iperf3", "-s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    let server = KillOnDrop(server);
    std::thread::sleep(Duration::from_millis(500));

    let mut throughput: BTreeMap<&str, BTreeMap<&str, Vec<f64>>> = BTreeMap::new();
    let mut attach_times = Vec::new();
    let mut programs: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for round in 0..options.rounds {
        // Alternate the order so a drift in the VM's speed cancels out.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for traced in order {
            let tracer = if traced {
                let (tracer, attach) = start_tracer(&format!("round{round}"));
                attach_times.push(attach.as_secs_f64());
                Some(tracer)
            } else {
                None
            };
            let label = if traced { "with" } else { "without" };
            for (protocol, udp) in [("tcp", false), ("udp", true)] {
                let bits = iperf(&lab, udp, options.seconds)?;
                eprintln!(
                    "bench: round {round} {protocol} {label}: {:.1} Mbit/s",
                    bits / 1e6
                );
                throughput
                    .entry(protocol)
                    .or_default()
                    .entry(label)
                    .or_default()
                    .push(bits);
            }
            if let Some(mut tracer) = tracer {
                for (name, (count, time)) in program_stats(tracer.child.id())? {
                    let entry = programs.entry(name).or_insert((0, 0));
                    entry.0 += count;
                    entry.1 += time;
                }
                let out = tracer.interrupt();
                if !out.status.success() {
                    bail!("tracer failed: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
    }

    // The drop storm, with the tracer attached.
    let (mut tracer, _) = start_tracer("storm");
    let pid = tracer.child.id();
    let router_before = lab.xfrm_stat(Host::Router)?.0["XfrmInPolBlock"];
    let stop = Arc::new(AtomicBool::new(false));
    let flood = lab.flood_udp(Host::Whost, STORM_TARGET.parse()?, None, stop.clone());
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let mut rss_peak = 0;
    while started.elapsed() < Duration::from_secs(options.storm_seconds) {
        std::thread::sleep(Duration::from_millis(500));
        rss_peak = rss_peak.max(status_kib(pid, "VmRSS"));
    }
    let cpu = (cpu_seconds(pid) - cpu_before) / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood thread")?;
    let drops = lab.xfrm_stat(Host::Router)?.0["XfrmInPolBlock"] - router_before;
    let high_water = status_kib(pid, "VmHWM");
    tracer.interrupt();
    drop(server);

    let ratio = |protocol: &str| {
        let t = &throughput[protocol];
        median(&t["with"]) / median(&t["without"])
    };
    let program_rows: Vec<Value> = programs
        .iter()
        .filter(|(_, (count, _))| *count > 0)
        .map(|(name, (count, time))| {
            json!({"name": name, "run_cnt": count, "run_time_ns": time,
                   "ns_per_run": *time as f64 / *count as f64})
        })
        .collect();
    let attach = median(&attach_times);
    let storm_seconds = options.storm_seconds as f64;
    let result = json!({
        "kernel": nix::sys::utsname::uname()?.release().to_string_lossy(),
        "rounds": options.rounds,
        "seconds_per_run": options.seconds,
        "throughput_bits_per_second": throughput,
        "throughput_ratio": {"tcp": ratio("tcp"), "udp": ratio("udp")},
        "start_to_attached_seconds": {"median": attach, "all": attach_times},
        "programs": program_rows,
        "storm": {
            "seconds": storm_seconds,
            "xfrm_drops": drops,
            "drops_per_second": drops as f64 / storm_seconds,
            "tracer_cpu_percent_of_one_core": cpu * 100.0,
            "tracer_rss_peak_kib": rss_peak,
            "tracer_rss_high_water_kib": high_water,
        },
    });
    std::fs::write(&options.out, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("writing {}", options.out.display()))?;
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
