//! Developer tasks: toolchain setup, build, tests (host and VMs), demo.

mod setup;
mod util;

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
    /// Set up, build, and run every test.
    Test,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::all(),
        Command::Demo => demo(),
        Command::Test => test(),
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

fn test() -> anyhow::Result<()> {
    setup::all()?;
    let binary = util::build_release()?;
    let host = util::cargo_test(
        util::cargo()
            .args([
                "test",
                "--workspace",
                "--exclude",
                "tracer-ebpf",
                "--release",
            ])
            .env("XFRM_TRACE_BIN", &binary),
    )?;
    // One closing line that sums up every test runner.
    println!("xtask: {} passed, {} failed", host.passed, host.failed);
    if host.failed > 0 || !host.success {
        anyhow::bail!("tests failed");
    }
    Ok(())
}
