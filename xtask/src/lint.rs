//! `cargo xtask lint`: the module dependency rule (`modules`), formatting
//! and clippy (the workspace's
//! `[workspace.lints]`, warnings as errors), the first step of
//! `cargo xtask test`. The eBPF crate is left out: it only builds for the
//! bpf target, with the nightly (tracer/build.rs builds it).

use anyhow::Context as _;

use crate::util;

pub fn run() -> anyhow::Result<()> {
    eprintln!("lint: no module cycle in tracer");
    crate::modules::check_acyclic(&util::workspace_root().join("tracer/src"))?;
    eprintln!("lint: cargo fmt --all --check");
    util::run(util::cargo().args(["fmt", "--all", "--check"]))
        .context("lint: the code is not formatted as rustfmt would (run `cargo fmt --all`)")?;
    // --release: clippy shares the release build's eBPF object (built by
    // tracer/build.rs) instead of building a second one.
    eprintln!("lint: cargo clippy (warnings are errors)");
    util::run(util::cargo().args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "tracer-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("lint: clippy found problems (listed above); fix them before the tests run")
}
