//! Idempotent machine setup: the eBPF toolchain, bpf-linker built against
//! that toolchain's own LLVM, and the Debian packages the tests use. Each
//! step checks first, so a second run takes seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{output, run};

/// The eBPF crate's toolchain file: its `channel` is the nightly that
/// builds the eBPF programs (`tracer/build.rs` reads it too).
const EBPF_TOOLCHAIN_FILE: &str = include_str!("../../tracer-ebpf/rust-toolchain.toml");
const BPF_LINKER_VERSION: &str = "0.13.0";
/// `cargo xtask fuzz` drives the fuzz targets with it.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Debian packages the tests and the lab need.
const PACKAGES: &[&str] = &[
    "iproute2",
    "kmod",
    "util-linux",
    "bpftool",
    // The lab: IKE daemon, traffic and firewall tools.
    "libreswan",
    "iputils-ping",
    "tcpdump",
    "iptables",
    "nftables",
    "iperf3",
    // `cargo xtask bench`: the peer the tracer's cost is compared with.
    "bpftrace",
    // Reads the pcapng of sampled packets in the tests.
    "tshark",
];

pub fn all() -> anyhow::Result<()> {
    install_packages(PACKAGES)?;
    install_ebpf_toolchain()?;
    install_bpf_linker()?;
    Ok(())
}

/// What the VM tests need: QEMU and virtme-ng (from PyPI).
pub fn vm_tools() -> anyhow::Result<()> {
    install_packages(&["qemu-system-x86", "busybox-static"])?;
    let has_vng = output(Command::new("vng").arg("--version")).is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(VIRTME_NG_VERSION)
    });
    if has_vng {
        return Ok(());
    }
    eprintln!("setup: installing virtme-ng {VIRTME_NG_VERSION} from PyPI");
    run(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "-q",
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
    ]))
}

const VIRTME_NG_VERSION: &str = "1.42";

fn installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

pub fn install_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing Debian packages: {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    // rustup must not pick up the workspace's pinned stable here.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// The nightly that builds the eBPF programs.
pub fn ebpf_toolchain() -> anyhow::Result<&'static str> {
    channel(EBPF_TOOLCHAIN_FILE).context("tracer-ebpf/rust-toolchain.toml names no channel")
}

/// The `channel = "..."` value of a rust-toolchain.toml.
fn channel(toolchain_file: &str) -> Option<&str> {
    toolchain_file.lines().find_map(|line| {
        let value = line.trim().strip_prefix("channel")?.trim_start();
        value
            .strip_prefix('=')?
            .trim()
            .strip_prefix('"')?
            .strip_suffix('"')
    })
}

fn install_ebpf_toolchain() -> anyhow::Result<()> {
    let toolchain = ebpf_toolchain()?;
    let sysroot = ebpf_sysroot();
    let has_rust_src = sysroot
        .as_ref()
        .is_ok_and(|s| s.join("lib/rustlib/src/rust/library/core").is_dir());
    if has_rust_src {
        return Ok(());
    }
    eprintln!("setup: installing {toolchain} with rust-src");
    run(rustup().args([
        "toolchain",
        "install",
        "--no-self-update",
        toolchain,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn ebpf_sysroot() -> anyhow::Result<PathBuf> {
    let toolchain = ebpf_toolchain()?;
    let out = output(rustup().args(["run", toolchain, "rustc", "--print", "sysroot"]))?;
    if !out.status.success() {
        bail!("{toolchain} is not installed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/xfrm-trace")
}

/// bpf-linker must use the very LLVM that the nightly emits bitcode for,
/// and no prebuilt binary can be fetched: build it against the nightly's
/// own libLLVM through a prefix folder that links to it.
fn install_bpf_linker() -> anyhow::Result<()> {
    let works = output(Command::new("bpf-linker").arg("--version")).is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    });
    if works {
        return Ok(());
    }
    let sysroot = ebpf_sysroot()?;
    let libllvm = std::fs::read_dir(sysroot.join("lib"))
        .context("reading the nightly's lib folder")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("libLLVM.so.")
                    && n.to_string_lossy().contains("-rust-")
            })
        })
        .context("the nightly has no libLLVM.so.*-rust-* (is it a rustup toolchain?)")?;
    let soname = libllvm.file_name().context("libLLVM path")?.to_owned();
    let prefix = cache_dir().join("llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(&soname)] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against {} (about 2 minutes)",
        libllvm.display()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .env("LLVM_PREFIX", &prefix)
        .current_dir(std::env::temp_dir()))
}

/// cargo-fuzz, for `cargo xtask fuzz` (from crates.io, built once).
pub fn cargo_fuzz() -> anyhow::Result<()> {
    let works = output(Command::new("cargo-fuzz").arg("--version")).is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
    });
    if works {
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
    run(Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--force",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .current_dir(std::env::temp_dir()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ebpf_toolchain_is_a_dated_nightly() {
        let toolchain = ebpf_toolchain().unwrap();
        let date = toolchain.strip_prefix("nightly-").unwrap();
        assert_eq!(date.len(), "2026-10-29".len(), "{toolchain}");
        assert!(date.bytes().all(|b| b.is_ascii_digit() || b == b'-'));
    }

    #[test]
    fn the_channel_is_read_from_its_line_only() {
        let file = "# channel = \"no\"\n[toolchain]\nchannel = \"nightly-2026-01-02\"\n";
        assert_eq!(channel(file), Some("nightly-2026-01-02"));
        assert_eq!(channel("[toolchain]\nchannels = 1\n"), None);
    }
}
