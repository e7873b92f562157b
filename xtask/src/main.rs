//! Developer tasks: toolchain setup, build, tests (host and VMs), demo.

mod kernels;
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
    /// Set up, build, and run every test: on the host kernel, then inside
    /// a VM for each kernel of the matrix.
    Test(vm_test::Options),
    /// Run the integration tests inside VMs only (kernel matrix).
    VmTest(vm_test::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::all(),
        Command::Demo => demo(),
        Command::Test(options) => test(&options),
        Command::VmTest(options) => vm_only(&options),
    };
    if let Err(error) = result {
        eprintln!("xtask: error: {error:#}");
        std::process::exit(1);
    }
}

/// The built-in default job: what this kernel offers, as `xfrm-trace doctor`
/// shows it, then a short trace.
fn demo() -> anyhow::Result<()> {
    setup::all()?;
    let binary = util::build_release()?;
    util::run(std::process::Command::new(&binary).arg("doctor"))?;
    util::run(std::process::Command::new(&binary).args(["--duration", "3s"]))
}

fn test(options: &vm_test::Options) -> anyhow::Result<()> {
    setup::all()?;
    setup::vm_tools()?;
    let binary = util::build_release()?;
    let host = host_tests(&binary)?;
    let vms = vm_test::run(options, &binary)?;
    vm_test::summarize(&host, &vms)
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
    util::cargo_test(util::cargo().args(&args).env("XFRM_TRACE_BIN", binary))
}
