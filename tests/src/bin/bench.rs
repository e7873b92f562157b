//! The guest side of `cargo xtask bench`: inside a VM (root, a kernel with
//! ESP), builds the lab, measures what the tracer costs and writes JSON.
//!
//! Each round runs every condition once, in an order that rotates from
//! round to round so a drift in the VM's speed spreads over all of them:
//! no tracer; xfrm-trace (default hooks); xfrm-trace `--hooks kprobe`;
//! bpftrace with the counters a user would type instead (see
//! `BPFTRACE_FUNCTIONS`). Per condition and round:
//!
//! - CPU time of all CPUs (`/proc/stat`) per datagram delivered, for a
//!   fixed UDP blast from whost to ehost through the ESP tunnel;
//! - TCP goodput through the tunnel (iperf3);
//! - for the tracers: start to attached and stop time.
//!
//! Then, once per traced condition, how many times its programs ran per
//! delivered datagram (kernel BPF stats, switched on only for that count:
//! they cost a clock read per run), and the tracer's CPU and memory during
//! an unpaced drop storm.
//!
//! `--storm-check N` instead runs the unpaced drop storm N times without
//! and N times with the tracer and records what the kernel said (soft
//! lockups, RCU stalls, hung tasks) and how late a sleeping thread woke.
//!
//! Usage: bench --out FILE [--rounds N] [--seconds S] [--storm-seconds T]
//!        [--blast DATAGRAMS] [--storm-check N]

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    net::UdpSocket,
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
    blast: usize,
    storm_check: Option<usize>,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        out: "bench.json".into(),
        rounds: 5,
        seconds: 5,
        storm_seconds: 15,
        blast: 10_000,
        storm_check: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--out" => options.out = value()?.into(),
            "--rounds" => options.rounds = value()?.parse()?,
            "--seconds" => options.seconds = value()?.parse()?,
            "--storm-seconds" => options.storm_seconds = value()?.parse()?,
            "--blast" => options.blast = value()?.parse()?,
            "--storm-check" => options.storm_check = Some(value()?.parse()?),
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
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn figures(values: &[f64]) -> Value {
    json!({"median": median(values), "all": values})
}

/// What runs next to the traffic.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Condition {
    None,
    Default,
    Kprobe,
    Bpftrace,
}

impl Condition {
    const ALL: [Condition; 4] = [
        Condition::None,
        Condition::Default,
        Condition::Kprobe,
        Condition::Bpftrace,
    ];

    fn name(self) -> &'static str {
        match self {
            Condition::None => "none",
            Condition::Default => "xfrm-trace",
            Condition::Kprobe => "xfrm-trace --hooks kprobe",
            Condition::Bpftrace => "bpftrace minimal",
        }
    }
}

/// The functions a user would count with bpftrace to see where IPsec
/// packets go, next to `skb:kfree_skb` by reason.
const BPFTRACE_FUNCTIONS: [&str; 6] = [
    "xfrm_input",
    "__xfrm_policy_check",
    "xfrm_lookup_with_ifid",
    "xfrm_output",
    "xfrm_output_resume",
    "__xfrm_route_forward",
];

/// The bpftrace program: fentry counters and drops by reason (by
/// location on kernels whose `kfree_skb` tracepoint has no reason, 5.10).
fn bpftrace_program() -> String {
    let functions: Vec<String> = BPFTRACE_FUNCTIONS
        .iter()
        .map(|f| format!("kfunc:{f}"))
        .collect();
    let has_reason = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("{t}/events/skb/kfree_skb/format")).ok())
        .any(|format| format.contains(" reason;"));
    let key = if has_reason {
        "args->reason"
    } else {
        "args->location"
    };
    format!(
        "BEGIN {{ printf(\"attached\\n\"); }} {} {{ @calls[probe] = count(); }} tracepoint:skb:kfree_skb {{ @drops[{key}] = count(); }}",
        functions.join(", ")
    )
}

/// A condition's tracer while it runs.
enum Running {
    Nothing,
    XfrmTrace(Tracer),
    Bpftrace(Child),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Running::Nothing => None,
            Running::XfrmTrace(t) => Some(t.child.id()),
            Running::Bpftrace(c) => Some(c.id()),
        }
    }

    /// Stops it; returns how long it took to exit.
    fn stop(self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        match self {
            Running::Nothing => {}
            Running::XfrmTrace(mut tracer) => {
                let out = tracer.interrupt();
                if !out.status.success() {
                    bail!(
                        "xfrm-trace failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            Running::Bpftrace(child) => {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
                let out = tests::output_within(child, tests::EXIT_LIMIT);
                if !out.status.success() {
                    bail!("bpftrace failed: {}", String::from_utf8_lossy(&out.stderr));
                }
            }
        }
        Ok(started.elapsed())
    }
}

/// Starts a condition; returns it and how long it took to attach.
fn start(condition: Condition, label: &str) -> anyhow::Result<(Running, Duration)> {
    let started = Instant::now();
    let ready = scratch(&format!("bench-{label}.ready"));
    let running = match condition {
        Condition::None => Running::Nothing,
        Condition::Default => Running::XfrmTrace(Tracer::start(&["--quiet"], &ready)),
        Condition::Kprobe => {
            Running::XfrmTrace(Tracer::start(&["--quiet", "--hooks", "kprobe"], &ready))
        }
        Condition::Bpftrace => Running::Bpftrace(start_bpftrace()?),
    };
    Ok((running, started.elapsed()))
}

/// Starts bpftrace and waits for its BEGIN probe, which fires once every
/// other probe is attached; an error carries its first lines of stderr.
fn start_bpftrace() -> anyhow::Result<Child> {
    let mut child = Command::new("bpftrace")
        .args(["-e", &bpftrace_program()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting bpftrace")?;
    let stdout = child.stdout.take().context("bpftrace stdout")?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == "attached" {
                let _ = sender.send(());
            }
        }
    });
    if receiver.recv_timeout(Duration::from_secs(180)).is_ok() {
        return Ok(child);
    }
    let _ = child.kill();
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason: Vec<&str> = stderr.lines().filter(|l| !l.is_empty()).take(3).collect();
    bail!("bpftrace did not attach: {}", reason.join(" / "))
}

/// Busy time of all CPUs so far (`/proc/stat`: user, nice, system, irq,
/// softirq, steal), in seconds.
fn busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let busy = busy_ticks(&stat).context("no cpu line in /proc/stat")?;
    Ok(busy as f64 / ticks_per_second())
}

/// The busy ticks of the all-CPUs line of a `/proc/stat` text.
fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already in user)
    Some(
        [0, 1, 2, 5, 6, 7]
            .iter()
            .filter_map(|&i| ticks.get(i))
            .sum(),
    )
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

/// The blast's receiver in ehost, with a receive buffer for the whole
/// blast, so what it counts is what the tunnel delivered.
fn blast_receiver(lab: &Lab) -> anyhow::Result<UdpSocket> {
    let socket = xfrm_trace::netns::run_in(&lab.ns_path(Host::Ehost), || {
        let socket = UdpSocket::bind(("0.0.0.0", BLAST_PORT))?;
        let size: libc::c_int = 64 << 20;
        // SAFETY: the socket is open; the option value is a c_int we own.
        let ret = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                std::ptr::from_ref(&size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(socket)
    })
    .context("blast receiver in ehost")?;
    Ok(socket)
}

const BLAST_PORT: u16 = 5202;
const BLAST_SIZE: usize = 1000;

/// Counts the datagrams of blast `id` arriving on `socket` until `sent`
/// is set and none came for a second: a datagram of an earlier blast that
/// arrives late is not counted.
fn count_blast(socket: &UdpSocket, id: u32, sent: &AtomicBool) -> std::io::Result<u64> {
    let mut buffer = [0u8; 2048];
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut received = 0;
    let mut idle = Duration::ZERO;
    while idle < Duration::from_secs(1) {
        match socket.recv(&mut buffer) {
            Ok(n) if n >= 4 && buffer[..4] == id.to_be_bytes() => {
                received += 1;
                idle = Duration::ZERO;
            }
            Ok(_) => {}
            Err(_) if sent.load(Ordering::Relaxed) => idle += Duration::from_millis(200),
            Err(_) => {}
        }
    }
    Ok(received)
}

/// Sends a blast of `count` datagrams from whost to ehost, each carrying
/// the blast's number; returns the datagrams delivered and the busy CPU
/// seconds of the whole VM while they crossed.
fn blast(lab: &Lab, socket: &UdpSocket, count: usize) -> anyhow::Result<(u64, f64)> {
    static BLASTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let id = BLASTS.fetch_add(1, Ordering::Relaxed);
    let to: std::net::SocketAddr = format!("{EHOST}:{BLAST_PORT}").parse()?;
    let receiver = socket.try_clone()?;
    let sent = Arc::new(AtomicBool::new(false));
    let before = busy_seconds()?;
    let counting = {
        let sent = sent.clone();
        std::thread::spawn(move || count_blast(&receiver, id, &sent))
    };
    let sending = xfrm_trace::netns::run_in(&lab.ns_path(Host::Whost), move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        let mut payload = vec![0x5a; BLAST_SIZE];
        payload[..4].copy_from_slice(&id.to_be_bytes());
        for _ in 0..count {
            // A refused send (full queue) is a datagram not delivered.
            let _ = socket.send_to(&payload, to);
        }
        Ok(())
    });
    sent.store(true, Ordering::Relaxed);
    let delivered = counting.join().expect("blast receiver")?;
    let busy = busy_seconds()? - before;
    sending.context("blast from whost")?;
    if delivered == 0 {
        bail!("no datagram of the blast reached ehost");
    }
    Ok((delivered, busy))
}

/// Received bits per second of one iperf3 TCP run from whost to ehost.
fn tcp_goodput(lab: &Lab, seconds: u64) -> anyhow::Result<f64> {
    let seconds = seconds.to_string();
    let out = lab.exec(Host::Whost, "iperf3", &["-c", EHOST, "-t", &seconds, "-J"])?;
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

fn bpf_stats(enabled: bool) -> anyhow::Result<()> {
    std::fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if enabled { "1" } else { "0" },
    )
    .context("setting kernel.bpf_stats_enabled")
}

/// How many times each program of `pid` ran per datagram delivered, over
/// one blast with the kernel's BPF stats on.
fn program_runs(lab: &Lab, socket: &UdpSocket, pid: u32, count: usize) -> anyhow::Result<Value> {
    bpf_stats(true)?;
    let before = program_stats(pid)?;
    let blasted = blast(lab, socket, count);
    let after = program_stats(pid);
    bpf_stats(false)?;
    let (delivered, _) = blasted?;
    let mut rows = Vec::new();
    let mut total = 0.0;
    for (name, (count, time)) in after? {
        let (count_before, time_before) = before.get(&name).copied().unwrap_or((0, 0));
        let runs = count - count_before;
        if runs == 0 {
            continue;
        }
        let per_packet = runs as f64 / delivered as f64;
        total += per_packet;
        rows.push(json!({"name": name, "runs": runs, "per_packet": per_packet,
                         "ns_per_run": (time - time_before) as f64 / runs as f64}));
    }
    rows.sort_by(|a, b| f(&b["per_packet"]).total_cmp(&f(&a["per_packet"])));
    Ok(json!({
        "delivered": delivered,
        "per_packet": total,
        // A datagram crosses both gateways (west encrypts, east decrypts)
        // and the router between them.
        "per_packet_per_gateway": total / 2.0,
        "programs": rows,
    }))
}

fn f(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
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
    ticks as f64 / ticks_per_second()
}

fn run() -> anyhow::Result<()> {
    let options = options()?;
    bpf_stats(false)?;
    let mut lab = Lab::create("bench")?;
    lab.static_ipsec(&StaticIpsec::default())?;
    block_storm_path(&lab);
    let result = match options.storm_check {
        Some(runs) => storm_check(&lab, runs, options.storm_seconds)?,
        None => bench(&lab, &options)?,
    };
    std::fs::write(&options.out, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("writing {}", options.out.display()))?;
    Ok(())
}

/// Figures of one condition over the rounds.
#[derive(Default)]
struct Measured {
    cpu_per_packet: Vec<f64>,
    delivered: Vec<f64>,
    tcp: Vec<f64>,
    attach: Vec<f64>,
    stop: Vec<f64>,
}

fn bench(lab: &Lab, options: &Options) -> anyhow::Result<Value> {
    let server = Command::new("ip")
        .args(["netns", "exec", &lab.ns(Host::Ehost), "iperf3", "-s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server")?;
    let _server = KillOnDrop(server);
    let socket = blast_receiver(lab)?;
    std::thread::sleep(Duration::from_millis(500));
    // One blast first: neighbours resolved, caches warm.
    blast(lab, &socket, options.blast / 10)?;

    let mut absent: BTreeMap<Condition, String> = BTreeMap::new();
    let mut runs: BTreeMap<Condition, Value> = BTreeMap::new();
    let mut measured: BTreeMap<Condition, Measured> = BTreeMap::new();
    for round in 0..options.rounds {
        let mut order = Condition::ALL;
        order.rotate_left(round % Condition::ALL.len());
        for condition in order {
            if absent.contains_key(&condition) {
                continue;
            }
            let (running, attach) = match start(condition, &format!("{round}")) {
                Ok(started) => started,
                Err(e) => {
                    eprintln!("bench: {} absent: {e:#}", condition.name());
                    absent.insert(condition, format!("{e:#}"));
                    continue;
                }
            };
            let (delivered, busy) = blast(lab, &socket, options.blast)?;
            let tcp = tcp_goodput(lab, options.seconds)?;
            if let (Some(pid), false) = (running.pid(), runs.contains_key(&condition)) {
                runs.insert(
                    condition,
                    program_runs(lab, &socket, pid, options.blast / 4)?,
                );
            }
            let stop = running.stop()?;
            let cpu_per_packet = busy / delivered as f64;
            eprintln!(
                "bench: round {round} {}: {delivered} of {} delivered, {:.1} µs CPU per datagram, TCP {:.1} Mbit/s, attach {:.2} s, stop {:.2} s",
                condition.name(),
                options.blast,
                cpu_per_packet * 1e6,
                tcp / 1e6,
                attach.as_secs_f64(),
                stop.as_secs_f64(),
            );
            let m = measured.entry(condition).or_default();
            m.cpu_per_packet.push(cpu_per_packet);
            m.delivered.push(delivered as f64);
            m.tcp.push(tcp);
            if condition != Condition::None {
                m.attach.push(attach.as_secs_f64());
                m.stop.push(stop.as_secs_f64());
            }
        }
    }

    let none = measured.get(&Condition::None).context("no round ran")?;
    let (none_cpu, none_tcp) = (median(&none.cpu_per_packet), median(&none.tcp));
    let mut conditions = serde_json::Map::new();
    for condition in Condition::ALL {
        let value = match (measured.get(&condition), absent.get(&condition)) {
            (Some(m), _) => json!({
                "available": true,
                "cpu_seconds_per_packet": figures(&m.cpu_per_packet),
                "delivered": figures(&m.delivered),
                "tcp_bits_per_second": figures(&m.tcp),
                "ratio_to_none": {
                    "cpu_per_packet": median(&m.cpu_per_packet) / none_cpu,
                    "tcp": median(&m.tcp) / none_tcp,
                },
                "start_to_attached_seconds": figures(&m.attach),
                "stop_seconds": figures(&m.stop),
                "program_runs": runs.get(&condition).cloned().unwrap_or(Value::Null),
            }),
            (None, Some(reason)) => json!({"available": false, "reason": reason}),
            (None, None) => json!({"available": false, "reason": "not run"}),
        };
        conditions.insert(condition.name().to_string(), value);
    }

    let storm = storm(lab, options.storm_seconds)?;
    Ok(json!({
        "kernel": nix::sys::utsname::uname()?.release().to_string_lossy(),
        "rounds": options.rounds,
        "seconds_per_tcp_run": options.seconds,
        "blast": {"datagrams": options.blast, "bytes": BLAST_SIZE},
        "conditions": conditions,
        "storm": storm,
    }))
}

/// The tracer's CPU and memory during an unpaced drop storm.
fn storm(lab: &Lab, seconds: u64) -> anyhow::Result<Value> {
    let tracer = Tracer::start(&["--quiet"], &scratch("bench-storm.ready"));
    let pid = tracer.child.id();
    let router_before = lab.xfrm_stat(Host::Router)?.0["XfrmInPolBlock"];
    let stop = Arc::new(AtomicBool::new(false));
    let flood = lab.flood_udp(Host::Whost, STORM_TARGET.parse()?, None, stop.clone());
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let mut rss_peak = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        rss_peak = rss_peak.max(status_kib(pid, "VmRSS"));
    }
    let cpu = (cpu_seconds(pid) - cpu_before) / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flood.join().expect("flood thread")?;
    let drops = lab.xfrm_stat(Host::Router)?.0["XfrmInPolBlock"] - router_before;
    let high_water = status_kib(pid, "VmHWM");
    Running::XfrmTrace(tracer).stop()?;
    Ok(json!({
        "seconds": seconds,
        "xfrm_drops": drops,
        "drops_per_second": drops as f64 / seconds as f64,
        "tracer_cpu_percent_of_one_core": cpu * 100.0,
        "tracer_rss_peak_kib": rss_peak,
        "tracer_rss_high_water_kib": high_water,
    }))
}

/// What the kernel log says about a CPU or task that stopped making
/// progress.
const STALL_MESSAGES: [&str; 5] = [
    "soft lockup",
    "self-detected stall",
    "rcu_sched detected stalls",
    "rcu_preempt detected stalls",
    "blocked for more than",
];

fn kernel_log() -> Vec<String> {
    Command::new("dmesg")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `runs` unpaced drop storms of `seconds` without the tracer, then as
/// many with it (attached and stopped during the storm): drops per second, the latest wake-up of a thread that
/// sleeps 100 ms at a time, how long the sender took to stop, the
/// tracer's stop time, and every stall message of the kernel log.
fn storm_check(lab: &Lab, runs: usize, seconds: u64) -> anyhow::Result<Value> {
    let mut results = Vec::new();
    for condition in [Condition::None, Condition::Default] {
        for run in 0..runs {
            let log_before = kernel_log().len();
            let router_before = lab.xfrm_stat(Host::Router)?.0["XfrmInPolBlock"];
            let stop = Arc::new(AtomicBool::new(false));
            let flood = lab.flood_udp(Host::Whost, STORM_TARGET.parse()?, None, stop.clone());
            let started = Instant::now();
            // The tracer attaches and detaches while the storm goes on:
            // both patch the entry of functions the storm runs through.
            let (running, attach) = start(condition, &format!("check{run}"))?;
            let mut latest_wakeup = Duration::ZERO;
            while started.elapsed() < Duration::from_secs(seconds) {
                let asleep = Instant::now();
                std::thread::sleep(Duration::from_millis(100));
                latest_wakeup = latest_wakeup.max(asleep.elapsed() - Duration::from_millis(100));
            }
            // As in the drop storm test: the tracer is stopped while the
            // storm goes on.
            let tracer_stop = match running {
                Running::Nothing => None,
                running => Some(running.stop()?.as_secs_f64()),
            };
            let stopping = Instant::now();
            stop.store(true, Ordering::Relaxed);
            let sent = flood.join().expect("flood thread")?;
            let sender_stop = stopping.elapsed();
            let drops = lab.xfrm_stat(Host::Router)?.0["XfrmInPolBlock"] - router_before;
            let stalls: Vec<String> = kernel_log()
                .into_iter()
                .skip(log_before)
                .filter(|l| STALL_MESSAGES.iter().any(|m| l.contains(m)))
                .collect();
            let tracer_attach = tracer_stop.map(|_| attach.as_secs_f64());
            eprintln!(
                "storm check {} run {run}: {sent} sent, {:.0} drops/s, latest wake-up {:.2} s late, sender stopped in {:.2} s, tracer attached in {tracer_attach:?} s, stopped in {tracer_stop:?} s, {} stall messages",
                condition.name(),
                drops as f64 / seconds as f64,
                latest_wakeup.as_secs_f64(),
                sender_stop.as_secs_f64(),
                stalls.len()
            );
            for line in &stalls {
                eprintln!("  {line}");
            }
            results.push(json!({
                "condition": condition.name(),
                "run": run,
                "seconds": seconds,
                "sent": sent,
                "xfrm_drops": drops,
                "latest_wakeup_late_seconds": latest_wakeup.as_secs_f64(),
                "sender_stop_seconds": sender_stop.as_secs_f64(),
                "tracer_attach_seconds": tracer_attach,
                "tracer_stop_seconds": tracer_stop,
                "stall_messages": stalls,
            }));
        }
    }
    Ok(json!({
        "kernel": nix::sys::utsname::uname()?.release().to_string_lossy(),
        "storm_check": results,
    }))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn busy_ticks_leave_idle_and_iowait_out() {
        let stat = "cpu  10 2 30 1000 7 4 5 1 0 0\ncpu0 5 1 15 500 3 2 2 0 0 0\nintr 1\n";
        assert_eq!(busy_ticks(stat), Some(10 + 2 + 30 + 4 + 5 + 1));
        assert_eq!(busy_ticks("intr 1\n"), None);
    }

    #[test]
    fn median_of_odd_even_and_no_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
