//! `cargo xtask vm-test`: the integration tests inside a VM per kernel of
//! the matrix, each kernel booted once with every test run in that boot.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    kernels::{self, MATRIX},
    placement,
    util::{self, TestTally},
    vm,
};

#[derive(clap::Args, Debug)]
pub struct Options {
    /// Only these kernels of the matrix (5.10, 6.1, 6.12, sid); repeatable.
    #[arg(long = "kernel")]
    pub kernels: Vec<String>,
    /// Only tests whose name contains this; repeatable (any of them).
    #[arg(long = "test")]
    pub tests: Vec<String>,
    /// Time limit for one VM (boot, tests, power-off).
    #[arg(long, default_value_t = 2700)]
    pub vm_timeout_secs: u64,
    /// Run the selected tests this many times in the same boot (to catch
    /// a rare hang).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
}

/// One kernel's result.
pub struct KernelResult {
    pub name: String,
    pub release: String,
    pub tally: TestTally,
    pub elapsed: Duration,
    pub problem: Option<String>,
}

/// Integration test executables of the `tests` package (release build).
fn test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let out = util::output(util::cargo().args([
        "test",
        "--release",
        "--package",
        "tests",
        "--tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    if !out.status.success() {
        bail!(
            "building the tests failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let binaries: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["kind"][0] == "test")
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .collect();
    if binaries.is_empty() {
        bail!("no integration test binaries were built");
    }
    Ok(binaries)
}

/// How long one test binary may run in a VM: a hung test costs this, not
/// the whole CI budget. The slowest binary (attribution on 5.10) takes
/// about 10 min under TCG; the storm test, 2 min.
fn time_limit(binary: &Path) -> u64 {
    let name = binary.file_name().unwrap_or_default().to_string_lossy();
    if name.starts_with("vm_storm-") {
        360
    } else {
        1500
    }
}

/// After a killed test: what the kernel was doing, so a hang in CI can be
/// explained from the log alone (the blocked tasks' stacks and the last
/// kernel messages: soft lockups, RCU stalls, hung tasks).
const BLOCKED_TASKS: &str = "echo w > /proc/sysrq-trigger 2>/dev/null; \
    echo 'vm-test: the kernel log after the kill:'; dmesg | tail -n 120";

fn guest_script(binary: &Path, tests: &[PathBuf], options: &Options, skip: &[String]) -> String {
    let mut script =
        String::from("export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n");
    let _ = writeln!(
        script,
        "export XFRM_TRACE_BIN={} RUST_BACKTRACE=1",
        binary.display()
    );
    // Inside our VMs fentry and kprobes work: the doctor must find that.
    script.push_str("export XFRM_TRACE_EXPECT_MODE=fentry\n");
    let _ = writeln!(script, "cd {}", util::workspace_root().display());
    script.push_str("rc=0\n");
    let _ = writeln!(script, "for round in $(seq {}); do", options.repeat.max(1));
    for test in tests {
        let limit = time_limit(test);
        let _ = writeln!(
            script,
            "timeout -k 10 {limit} {} --test-threads=1 {}{}\ncode=$?\n\
             [ $code -eq 0 ] || rc=1\n\
             if [ $code -eq 124 ] || [ $code -eq 137 ]; then\n\
               echo \"vm-test: {} killed: still running after {limit} s\"\n\
               {BLOCKED_TASKS}\n\
             fi",
            test.display(),
            options.tests.join(" "),
            skip.iter()
                .map(|test| format!(" --skip {test}"))
                .collect::<String>(),
            test.file_name().unwrap_or_default().to_string_lossy(),
        );
    }
    script.push_str("done\nexit $rc\n");
    script
}

pub fn run(options: &Options, binary: &Path) -> anyhow::Result<Vec<KernelResult>> {
    for wanted in &options.kernels {
        if !MATRIX.iter().any(|k| k.name == wanted) {
            bail!(
                "unknown kernel {wanted}: the matrix has {}",
                MATRIX.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let tests = test_binaries()?;
    let placements = placement::read(
        &util::workspace_root().join("tests/tests"),
        &kernels::targets(),
    )?;
    let mut results = Vec::new();
    for spec in MATRIX
        .iter()
        .filter(|k| options.kernels.is_empty() || options.kernels.iter().any(|w| w == k.name))
    {
        let kernel = match kernels::ensure(spec) {
            Ok(kernel) => kernel,
            Err(e) => {
                results.push(KernelResult {
                    name: spec.name.into(),
                    release: "?".into(),
                    tally: TestTally::default(),
                    elapsed: Duration::ZERO,
                    problem: Some(format!("{e:#}")),
                });
                continue;
            }
        };
        let out_dir = vm::out_dir(spec.name);
        std::fs::create_dir_all(&out_dir)?;
        let script = out_dir.join("run.sh");
        let skipped = placement::skipped_on(&placements, spec.name);
        std::fs::write(&script, guest_script(binary, &tests, options, &skipped))
            .with_context(|| format!("writing {}", script.display()))?;
        eprintln!("vm: booting {} ({}) under TCG", spec.name, kernel.release);
        let outcome = vm::run_script(
            &kernel,
            &script,
            &out_dir,
            Duration::from_secs(options.vm_timeout_secs),
        )?;
        print!("{}", outcome.log);
        let mut tally = TestTally::default();
        for line in outcome.log.lines() {
            let (passed, failed) = util::parse_result_line(line);
            tally.passed += passed;
            tally.failed += failed;
        }
        tally.success = outcome.exit_code == Some(0);
        let problem = if outcome.timed_out {
            Some(format!("timed out after {} s", options.vm_timeout_secs))
        } else if outcome.exit_code.is_none() {
            Some(format!(
                "the VM died before the tests finished (see {})",
                out_dir.join("console").display()
            ))
        } else if outcome.release.as_deref() != Some(kernel.release.as_str()) {
            Some(format!(
                "booted {:?}, expected {}",
                outcome.release, kernel.release
            ))
        } else if let Some(killed) = outcome.log.lines().find(|l| l.contains(" killed: ")) {
            Some(killed.to_string())
        } else if tally.passed + tally.failed == 0 {
            Some("no test ran".into())
        } else {
            None
        };
        results.push(KernelResult {
            name: spec.name.into(),
            release: outcome.release.unwrap_or_else(|| kernel.release.clone()),
            tally,
            elapsed: outcome.elapsed,
            problem,
        });
    }
    Ok(results)
}

/// Prints the per-kernel table and the closing tally; fails if anything did.
pub fn summarize(host: &TestTally, vms: &[KernelResult]) -> anyhow::Result<()> {
    let host_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "\n{:<8} {:<28} {:>6} {:>6} {:>8}  result",
        "kernel", "release", "passed", "failed", "time"
    );
    if host.passed + host.failed > 0 {
        let result = if host.success && host.failed == 0 {
            "ok"
        } else {
            "FAILED"
        };
        println!(
            "{:<8} {:<28} {:>6} {:>6} {:>8}  {result}",
            "host", host_release, host.passed, host.failed, "-"
        );
    }
    let mut passed = host.passed;
    let mut failed = host.failed;
    let mut ok = host.success && host.failed == 0;
    for r in vms {
        let result = match &r.problem {
            Some(problem) => format!("FAILED: {problem}"),
            None if r.tally.success && r.tally.failed == 0 => "ok".into(),
            None => "FAILED".into(),
        };
        ok &= result == "ok";
        passed += r.tally.passed;
        failed += r.tally.failed;
        println!(
            "{:<8} {:<28} {:>6} {:>6} {:>7.0}s  {result}",
            r.name,
            r.release,
            r.tally.passed,
            r.tally.failed,
            r.elapsed.as_secs_f64()
        );
    }
    // One closing line that sums up every test runner.
    println!("xtask: {passed} passed, {failed} failed");
    if !ok {
        bail!("tests failed");
    }
    Ok(())
}
