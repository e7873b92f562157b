//! `cargo xtask fuzz`: the cargo-fuzz targets of `tracer/fuzz` (one per
//! parser of outside text), built with the eBPF nightly and run for a
//! bounded time each. A crash fails with the target and the input.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{kernels, setup, util};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// How long each target runs (libFuzzer's -max_total_time).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Only this target (default: every one); repeatable.
    #[arg(long = "target")]
    pub targets: Vec<String>,
}

/// Seconds per target in `cargo xtask test`: with the build, the step
/// stays under 4 minutes on a 2-core machine.
pub const TEST_SECONDS: u64 = 5;

/// Real data kept beside the parsers that seeds a target too, besides
/// `tracer/fuzz/seeds/<target>`.
const EXTRA_SEEDS: &[(&str, &str)] = &[
    ("pluto_status", "tracer/src/pluto/testdata"),
    ("pluto_log", "tracer/src/pluto/testdata"),
];

/// One input slower than this is a hang, reported like a crash.
const INPUT_TIMEOUT_SECS: u64 = 10;

/// How one target's run ended.
pub struct TargetRun {
    pub target: String,
    /// Why it failed, with the input that made it fail.
    pub failure: Option<String>,
}

/// `cargo xtask fuzz`: fails on the first target that crashes.
pub fn main(options: &Options) -> anyhow::Result<()> {
    setup::cargo_fuzz()?;
    let targets = selected(&options.targets)?;
    build()?;
    for target in &targets {
        let run = run(target, options.seconds)?;
        if let Some(failure) = run.failure {
            bail!("fuzz target {target}: {failure}");
        }
    }
    Ok(())
}

/// The fuzz step of `cargo xtask test`: every target for `seconds`, all
/// run even when one crashes. Err only when they cannot be built or run.
pub fn all(seconds: u64) -> anyhow::Result<Vec<TargetRun>> {
    setup::cargo_fuzz()?;
    let targets = selected(&[])?;
    build()?;
    targets.iter().map(|t| run(t, seconds)).collect()
}

fn fuzz_dir() -> PathBuf {
    util::workspace_root().join("tracer/fuzz")
}

/// `cargo fuzz SUBCOMMAND` with the eBPF nightly and the build options
/// that `build` and `run` must share (or `run` would rebuild).
fn cargo_fuzz(subcommand: &str) -> anyhow::Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz_dir())
        // cargo-fuzz needs a nightly: the one already installed for eBPF.
        .env("RUSTUP_TOOLCHAIN", setup::ebpf_toolchain()?)
        // The cargo of the pinned stable that runs us must not be used.
        .env_remove("CARGO")
        // The parsers need no eBPF object (tracer/build.rs embeds an empty one).
        .env("AYA_BUILD_SKIP", "1")
        .args(["fuzz", subcommand]);
    if subcommand != "list" {
        // Safe Rust only: no sanitizer, but debug assertions and overflow
        // checks (cargo fuzz's default) make a wrong index or sum a crash.
        // 16 codegen units instead of 1: a build twice as quick on 2 cores.
        cmd.args(["--sanitizer", "none", "--codegen-units", "16"])
            .arg("--target-dir")
            .arg(target_dir());
    }
    Ok(cmd)
}

/// `$CARGO_TARGET_DIR/fuzz` when set, else a folder kept between checkouts
/// (CI clones afresh each time): the instrumented dependencies take minutes
/// to build and are the same for every checkout, so only tracer rebuilds.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir).join("fuzz"),
        None => kernels::cache_dir().join("fuzz-target"),
    }
}

/// Each checkout folder leaves its own tracer and targets (about 300 MB)
/// in the shared folder: past this size it starts again from scratch.
const CACHE_LIMIT_BYTES: u64 = 3 << 30;

fn prune_cache() -> anyhow::Result<()> {
    let dir = target_dir();
    if std::env::var_os("CARGO_TARGET_DIR").is_some() || !dir.is_dir() {
        return Ok(());
    }
    let size = disk_usage(&dir);
    if size > CACHE_LIMIT_BYTES {
        eprintln!(
            "fuzz: {} holds {} MiB, over {} MiB: removing it",
            dir.display(),
            size >> 20,
            CACHE_LIMIT_BYTES >> 20
        );
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Bytes of the files under `dir` (symbolic links not followed).
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(t) if t.is_dir() => disk_usage(&entry.path()),
            Ok(t) if t.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// Every target of `tracer/fuzz`, or those asked for (which must exist).
fn selected(wanted: &[String]) -> anyhow::Result<Vec<String>> {
    let out = util::output(&mut cargo_fuzz("list")?)?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let all: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if all.is_empty() {
        bail!("no fuzz target in {}", fuzz_dir().display());
    }
    if let Some(unknown) = wanted.iter().find(|w| !all.contains(w)) {
        bail!("no fuzz target {unknown:?} (there are: {})", all.join(", "));
    }
    Ok(if wanted.is_empty() {
        all
    } else {
        wanted.to_vec()
    })
}

fn build() -> anyhow::Result<()> {
    prune_cache()?;
    let started = Instant::now();
    util::run(&mut cargo_fuzz("build")?)?;
    eprintln!(
        "fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs one target for `seconds` on its corpus (`tracer/fuzz/corpus/<target>`,
/// kept between runs) and seeds; its output goes to a log file.
fn run(target: &str, seconds: u64) -> anyhow::Result<TargetRun> {
    let root = util::workspace_root();
    let corpus = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut dirs = vec![corpus];
    dirs.push(fuzz_dir().join("seeds").join(target));
    dirs.extend(
        EXTRA_SEEDS
            .iter()
            .filter(|(t, _)| *t == target)
            .map(|(_, dir)| root.join(dir)),
    );
    dirs.retain(|d| d.is_dir());
    let logs = target_dir().join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let log_path = logs.join(format!("{target}.log"));
    let log =
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;

    eprintln!(
        "fuzz: {target} for {seconds} s (log: {})",
        log_path.display()
    );
    let started = Instant::now();
    let status = cargo_fuzz("run")?
        .arg(target)
        .args(&dirs)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("cannot start cargo fuzz run {target}"))?;
    let elapsed = started.elapsed();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let executions = text.lines().find_map(|l| {
        l.strip_prefix("stat::number_of_executed_units:")
            .and_then(|n| n.trim().parse::<u64>().ok())
    });
    let failure = (!status.success()).then(|| {
        eprintln!("fuzz: {target} failed ({status}):");
        for line in excerpt(&text) {
            eprintln!("  {line}");
        }
        match crash_input(&text) {
            Some(input) => format!(
                "crashed on {} (again: {} {})",
                input.display(),
                target_dir()
                    .join("x86_64-unknown-linux-gnu/release")
                    .join(target)
                    .display(),
                input.display()
            ),
            None => format!(
                "failed ({status}) without a crash input; see {}",
                log_path.display()
            ),
        }
    });
    eprintln!(
        "fuzz: {target}: {} in {:.0} s, {}",
        executions.map_or_else(|| "? inputs".into(), |n| format!("{n} inputs")),
        elapsed.as_secs_f64(),
        if failure.is_some() { "FAILED" } else { "ok" }
    );
    Ok(TargetRun {
        target: target.to_string(),
        failure,
    })
}

/// What a failed run's log says about the failure: from the panic (or
/// libFuzzer's error) on, else its end.
fn excerpt(log: &str) -> Vec<&str> {
    let lines: Vec<&str> = log.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains("panicked at"))
        .or_else(|| lines.iter().position(|l| l.contains("ERROR: libFuzzer")))
        .unwrap_or(lines.len().saturating_sub(30));
    lines.into_iter().skip(start).take(30).collect()
}

/// The input libFuzzer saved: `Test unit written to PATH` (a crash, a
/// timeout or running out of memory).
fn crash_input(log: &str) -> Option<PathBuf> {
    let path = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))?;
    let path = Path::new(path);
    Some(if path.is_absolute() {
        path.to_path_buf()
    } else {
        fuzz_dir().join(path)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn crash_input_from_the_log() {
        let log = "==1== ERROR: libFuzzer: deadly signal\nMS: 1 ChangeByte-; base unit: 0\n\
                   artifact_prefix='/r/tracer/fuzz/artifacts/netlink/'; Test unit written to /r/tracer/fuzz/artifacts/netlink/crash-da39\nBase64: AA==\n";
        assert_eq!(
            super::crash_input(log),
            Some("/r/tracer/fuzz/artifacts/netlink/crash-da39".into())
        );
        assert_eq!(super::crash_input("Done 100 runs in 1 second(s)\n"), None);
    }

    #[test]
    fn disk_usage_adds_up_files_below() {
        let dir = std::env::temp_dir().join(format!("xtask-du-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("x"), "123").unwrap();
        std::fs::write(dir.join("a/b/y"), "12345").unwrap();
        std::os::unix::fs::symlink("/usr", dir.join("a/usr")).unwrap();
        assert_eq!(super::disk_usage(&dir), 8);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(super::disk_usage(&dir), 0);
    }
}
