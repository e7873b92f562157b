//! Developer tasks: toolchain setup, build, tests (host and VMs), demo.

mod bench;
mod fuzz;
mod kernels;
mod lint;
mod modules;
mod placement;
mod setup;
mod util;
mod vm;
mod vm_test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install toolchains, bpf-linker and Debian packages (idempotent).
    Setup,
    /// Set up, build xfrm-trace (release) and run the built-in demo.
    Demo,
    /// Set up, check formatting and clippy (`lint`), build, and run every
    /// test: on the host kernel, then inside a VM for each kernel of the
    /// matrix.
    Test(vm_test::Options),
    /// `cargo fmt --check` and clippy with warnings as errors.
    Lint,
    /// Run the integration tests inside VMs only (kernel matrix).
    VmTest(vm_test::Options),
    /// Measure the tracer's cost in VMs (throughput, per-program time,
    /// attach time, CPU and memory in a drop storm) against the targets.
    Bench(bench::Options),
    /// Build the fuzz targets of the parsers (tracer/fuzz) and run each
    /// for a bounded time; fails on a crash, naming the input.
    Fuzz(fuzz::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::all(),
        Command::Demo => demo(),
        Command::Test(options) => test(&options),
        Command::Lint => lint::run(),
        Command::VmTest(options) => vm_only(&options),
        Command::Bench(options) => bench::run(&options),
        Command::Fuzz(options) => fuzz::main(&options),
    };
    if let Err(error) = result {
        eprintln!("xtask: error: {error:#}");
        std::process::exit(1);
    }
}

/// Lab scenarios the demo runs, in order.
const DEMO_SCENARIOS: &[&str] = &["masquerade", "mtu"];
/// The VM kernel for the demo when the local one cannot host the lab.
const DEMO_KERNEL: &str = "6.12";

/// The built-in default job: what this kernel offers (`xfrm-trace doctor`),
/// then the lab scenarios, each reproducing a failure, diagnosing it with
/// xfrm-trace and fixing it. They run here when this kernel has ESP and
/// hookable XFRM functions, else in a VM.
fn demo() -> anyhow::Result<()> {
    setup::all()?;
    let binary = util::build_release()?;
    util::run(std::process::Command::new(&binary).arg("doctor"))?;
    if let Some(why) = local_kernel_cannot_host_the_lab(&binary) {
        eprintln!("demo: {why}; running the lab in a VM (kernel {DEMO_KERNEL}, QEMU)");
        return demo_in_vm(&binary);
    }
    for scenario in DEMO_SCENARIOS {
        util::run(std::process::Command::new(&binary).args(["lab", scenario]))?;
    }
    Ok(())
}

/// Why the running kernel cannot host the lab, if it cannot.
fn local_kernel_cannot_host_the_lab(binary: &std::path::Path) -> Option<String> {
    let doctor = util::output(std::process::Command::new(binary).args(["doctor", "--json"]));
    let mode = doctor
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|v| v["mode"].as_str().map(str::to_string))
        .unwrap_or_default();
    if !matches!(mode.as_str(), "fentry" | "fentry+kprobe" | "kprobe") {
        return Some(format!(
            "this kernel cannot hook XFRM functions (mode {mode})"
        ));
    }
    let esp = std::path::Path::new("/sys/module/esp4").exists()
        || std::process::Command::new("modprobe")
            .arg("esp4")
            .status()
            .is_ok_and(|s| s.success());
    (!esp).then(|| "this kernel has no ESP (esp4)".to_string())
}

fn demo_in_vm(binary: &std::path::Path) -> anyhow::Result<()> {
    setup::vm_tools()?;
    let spec = kernels::MATRIX
        .iter()
        .find(|k| k.name == DEMO_KERNEL)
        .ok_or_else(|| anyhow::anyhow!("kernel {DEMO_KERNEL} is not in the matrix"))?;
    let kernel = kernels::ensure(spec)?;
    let out_dir = vm::out_dir("demo");
    std::fs::create_dir_all(&out_dir)?;
    let mut script = String::from(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
set -e
",
    );
    for scenario in DEMO_SCENARIOS {
        script.push_str(&format!(
            "echo '$ xfrm-trace lab {scenario}'
{} lab {scenario}
",
            binary.display()
        ));
    }
    let path = out_dir.join("run.sh");
    std::fs::write(&path, script)?;
    let outcome = vm::run_script(
        &kernel,
        &path,
        &out_dir,
        std::time::Duration::from_secs(900),
    )?;
    print!("{}", outcome.log);
    match outcome.exit_code {
        Some(0) => Ok(()),
        Some(code) => anyhow::bail!("the demo failed in the VM (exit {code})"),
        None => anyhow::bail!(
            "the VM did not finish the demo (timed out: {})",
            outcome.timed_out
        ),
    }
}

fn test(options: &vm_test::Options) -> anyhow::Result<()> {
    setup::all()?;
    lint::run()?;
    setup::vm_tools()?;
    let binary = util::build_release()?;
    let host = host_tests(&binary)?;
    let mut results = vec![fuzz_step()];
    results.extend(vm_test::run(options, &binary)?);
    vm_test::summarize(&host, &results)
}

/// Every fuzz target for `fuzz::TEST_SECONDS`, as one row of the summary:
/// a target that ran clean passed, one that crashed failed.
fn fuzz_step() -> vm_test::KernelResult {
    let started = std::time::Instant::now();
    let runs = fuzz::all(fuzz::TEST_SECONDS);
    let mut result = vm_test::KernelResult {
        name: "fuzz".into(),
        release: String::new(),
        tally: util::TestTally::default(),
        elapsed: std::time::Duration::ZERO,
        problem: None,
    };
    match runs {
        Ok(runs) => {
            result.release = format!("{} targets, {} s each", runs.len(), fuzz::TEST_SECONDS);
            let failures: Vec<String> = runs
                .iter()
                .filter_map(|r| Some(format!("{}: {}", r.target, r.failure.as_ref()?)))
                .collect();
            result.tally.failed = failures.len() as u64;
            result.tally.passed = runs.len() as u64 - result.tally.failed;
            result.tally.success = failures.is_empty();
            result.problem = (!failures.is_empty()).then(|| failures.join("; "));
        }
        Err(error) => result.problem = Some(format!("{error:#}")),
    }
    result.elapsed = started.elapsed();
    eprintln!("fuzz: step done in {:.0} s", result.elapsed.as_secs_f64());
    result
}

fn vm_only(options: &vm_test::Options) -> anyhow::Result<()> {
    setup::all()?;
    setup::vm_tools()?;
    let binary = util::build_release()?;
    let vms = vm_test::run(options, &binary)?;
    vm_test::summarize(
        &util::TestTally {
            success: true,
            ..Default::default()
        },
        &vms,
    )
}

/// Unit tests of every crate, then the integration tests that run on any
/// kernel (`tests/tests/vm_*.rs` need IPsec in the kernel: VMs only).
fn host_tests(binary: &std::path::Path) -> anyhow::Result<util::TestTally> {
    let mut args = vec![
        "test",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--release",
        "--lib",
        "--bins",
    ];
    let targets = util::host_test_targets()?;
    for target in &targets {
        args.extend(["--test", target.as_str()]);
    }
    let placements = placement::read(
        &util::workspace_root().join("tests/tests"),
        &kernels::targets(),
    )?;
    let skipped = placement::skipped_on(&placements, placement::HOST);
    args.push("--");
    for test in &skipped {
        args.extend(["--skip", test.as_str()]);
    }
    util::cargo_test(util::cargo().args(&args).env("XFRM_TRACE_BIN", binary))
}
