//! Builds the eBPF object (`tracer-ebpf`) with the pinned nightly and
//! bpf-linker, so `include_bytes!` can embed it in the `xfrm-trace` binary.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// The eBPF crate's toolchain file, whose `channel` is the nightly to use
/// (`cargo xtask setup` installs the same).
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../tracer-ebpf/rust-toolchain.toml");

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    // With AYA_BUILD_SKIP=1 (clippy, docs) no object is built: embed an
    // empty one, which the loader rejects with a clear message.
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        fs::write(out_dir.join("tracer"), []).context("writing stub eBPF object")?;
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("tracer-ebpf has no directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::Custom(ebpf_toolchain()?),
    )
}

/// The `channel = "..."` value of [`EBPF_TOOLCHAIN_FILE`].
fn ebpf_toolchain() -> anyhow::Result<&'static str> {
    EBPF_TOOLCHAIN_FILE
        .lines()
        .find_map(|line| {
            let value = line.trim().strip_prefix("channel")?.trim_start();
            value
                .strip_prefix('=')?
                .trim()
                .strip_prefix('"')?
                .strip_suffix('"')
        })
        .context("tracer-ebpf/rust-toolchain.toml names no channel")
}
