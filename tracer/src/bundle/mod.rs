//! `xfrm-trace report -o FILE.tar.gz`: one file to attach to a kernel or
//! libreswan bug report. Everything comes from the run's own outcome:
//! nothing here reads keys (the XFRM parser skips them, pluto's status has
//! none), and the file appears whole or not at all.

use std::{collections::BTreeMap, io::Write as _, path::Path};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    fsutil,
    report::{self, Outcome},
};

/// The folder every file of the bundle sits in.
const ROOT: &str = "xfrm-trace-evidence";

const README: &str = "\
xfrm-trace evidence bundle
==========================

Written by `xfrm-trace report`. Nothing here contains key material: SAs
are read over NETLINK_XFRM by a parser that skips the key bytes, and
pluto's status and log do not carry keys.

report.txt        the run's summary as printed on the terminal: counters that
                  moved with the packets behind them, drops, IKE per peer,
                  MASQUERADE leaks, oversize ESP, pluto, the diagnosis
report.json       the same, complete (schema xfrm-trace/1, see the README of
                  xfrm-trace); `counters[].samples[].stack` are the kernel
                  stacks of sampled increments
kernel.txt        kernel release and version, boot command line, the config
                  options that matter for IPsec and eBPF
coverage.json     which kernel functions were hooked and how (fentry, kprobe),
                  which could not be and why; the hook mode of the run
xfrm_stat.json    /proc/net/xfrm_stat of every network namespace, before and
                  after the run
xfrm_state.json   SAs, policies and VPN interfaces (XFRM interfaces, VTIs)
                  of every namespace that has any, at the end (algorithms,
                  lifetimes, selectors, statistics, if_ids, marks; no keys)
pluto.json        every pluto found: connections, IKE and Child SA states,
                  what its log said during the run
drop_sites.txt    attributed drop sites: counter, kernel function, SA, and
                  the stack of the first sample of each counter
packets.pcapng    the sampled dropped and leaked packets (first 128 bytes from
                  the IP header; raw IP), each with a comment naming the
                  counter or finding, the SA and the kernel function: open
                  with Wireshark, or `tshark -r packets.pcapng -V`
command.txt       the command line of this run
";

/// Kernel config options worth seeing in an IPsec or eBPF bug report.
const CONFIG_PREFIXES: [&str; 9] = [
    "CONFIG_XFRM",
    "CONFIG_INET_ESP",
    "CONFIG_INET6_ESP",
    "CONFIG_NETFILTER_XT_MATCH_POLICY",
    "CONFIG_NF_NAT",
    "CONFIG_BPF",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_KPROBE",
    "CONFIG_FUNCTION_TRACER",
];

/// Writes the bundle of `outcome` to `path` (tar, gzip) as
/// [`fsutil::write_output`] does (a file: whole or not at all, mode 0600).
pub fn write(path: &Path, outcome: &Outcome) -> anyhow::Result<()> {
    let mut files: Vec<(&str, Vec<u8>)> = vec![
        ("README.txt", README.as_bytes().to_vec()),
        (
            "report.txt",
            crate::render::render(&outcome.report).into_bytes(),
        ),
        ("report.json", json(&outcome.report)?),
        ("kernel.txt", kernel_facts().into_bytes()),
        ("coverage.json", json(&coverage(&outcome.report))?),
        ("xfrm_stat.json", json(&xfrm_stat(outcome))?),
        ("xfrm_state.json", json(&outcome.xfrm_state)?),
        ("pluto.json", json(&outcome.report.pluto)?),
        ("drop_sites.txt", drop_sites(&outcome.report).into_bytes()),
        (
            "packets.pcapng",
            crate::pcap::encode(
                &crate::pcap::packets(&outcome.report),
                crate::pcap::wall_clock_offset_ns(),
            )?,
        ),
    ];
    let command: Vec<String> = std::env::args().collect();
    files.push((
        "command.txt",
        format!("{}\n", command.join(" ")).into_bytes(),
    ));

    let mut archive = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (name, data) in &files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_cksum();
        archive
            .append_data(&mut header, format!("{ROOT}/{name}"), data.as_slice())
            .with_context(|| format!("adding {name}"))?;
    }
    let mut gzip = archive.into_inner().context("finishing the archive")?;
    gzip.flush()?;
    let bytes = gzip.finish().context("compressing")?;
    fsutil::write_output(path, &bytes)
}

fn json(value: &impl Serialize) -> anyhow::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    Ok(bytes)
}

#[derive(Serialize)]
struct CoverageFile<'a> {
    mode: &'a str,
    attribution: &'a crate::attribution::Coverage,
    oversize_esp: &'a crate::model::HookList,
    ike: &'a crate::model::HookList,
    masquerade: &'a crate::masquerade::MasqCoverage,
}

fn coverage(report: &report::Report) -> CoverageFile<'_> {
    CoverageFile {
        mode: &report.kernel.mode,
        attribution: &report.coverage,
        oversize_esp: &report.esp_sizes_hooks,
        ike: &report.ike_hooks,
        masquerade: &report.masquerade.coverage,
    }
}

#[derive(Serialize)]
struct Counters<'a> {
    before: &'a BTreeMap<String, u64>,
    after: &'a BTreeMap<String, u64>,
}

fn xfrm_stat(outcome: &Outcome) -> BTreeMap<&str, Counters<'_>> {
    outcome
        .xfrm_stat
        .iter()
        .map(|(label, (before, after))| (label.as_str(), Counters { before, after }))
        .collect()
}

/// Release, version, command line and the relevant config options (from
/// /boot/config-<release> or /proc/config.gz).
fn kernel_facts() -> String {
    let read =
        |path: &str| std::fs::read_to_string(path).unwrap_or_else(|e| format!("({path}: {e})\n"));
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = format!(
        "release: {release}\nversion: {}cmdline: {}\n",
        read("/proc/version"),
        read("/proc/cmdline")
    );
    let config = std::fs::read_to_string(format!("/boot/config-{release}"))
        .ok()
        .or_else(|| {
            let file = std::fs::File::open("/proc/config.gz").ok()?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(file), &mut text)
                .ok()?;
            Some(text)
        });
    match config {
        Some(config) => {
            out.push_str("\nconfig:\n");
            for line in config.lines().filter(|l| {
                let name = l.trim_start_matches("# ");
                CONFIG_PREFIXES.iter().any(|p| name.starts_with(p))
            }) {
                out.push_str(line);
                out.push('\n');
            }
        }
        None => out.push_str("\nconfig: not found (/boot/config-<release>, /proc/config.gz)\n"),
    }
    out
}

/// Attributed drop sites, one block per counter, with the first stack.
fn drop_sites(report: &report::Report) -> String {
    let mut out = String::new();
    for counter in &report.counters {
        out.push_str(&format!(
            "{}: kernel +{}, attributed {}\n",
            counter.name, counter.kernel_delta, counter.attributed
        ));
        for s in &counter.sources {
            out.push_str(&format!(
                "  {} at {} in {} on {}: {} {} -> {} spi {} reqid {} policy {} {}\n",
                s.count,
                s.function,
                s.netns_label,
                s.ifname,
                s.proto,
                s.src,
                s.dst,
                if s.spi.is_empty() { "-" } else { &s.spi },
                s.reqid,
                s.policy_index,
                s.connection
            ));
        }
        if let Some(sample) = counter.samples.first() {
            out.push_str("  stack of the first sample:\n");
            for frame in &sample.stack {
                out.push_str(&format!("    {frame}\n"));
            }
        }
    }
    if out.is_empty() {
        out.push_str("no XFRM counter moved during the run\n");
    }
    out
}
