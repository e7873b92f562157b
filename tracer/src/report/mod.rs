//! The run's report: the JSON schema `xfrm-trace/1` and its text rendering.
//!
//! Field names are a published interface: add fields, never rename them.

#[cfg(test)]
mod schema;
mod unwatched;

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::{
    attribution::{AttributionErrors, Coverage, SampleReport, Source},
    drops::DropRow,
    model::{CaptureCounts, Finding, HookList, NetnsInfo},
};

pub const SCHEMA: &str = "xfrm-trace/1";

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub kernel: Kernel,
    /// What `--netns`/`--filter` narrowed the report to (empty: all).
    pub filter: Vec<String>,
    pub duration_secs: f64,
    /// Which XFRM functions are hooked (and which could not be).
    pub coverage: Coverage,
    pub attribution_errors: AttributionErrors,
    pub counters: Vec<Counter>,
    /// Why no counter delta is known (`/proc/net/xfrm_stat` missing or
    /// unreadable); null when the counters were read.
    pub counters_unavailable: Option<String>,
    pub drops: Vec<DropRow>,
    /// Drops the in-kernel table had no room for (counted, not named).
    pub drops_untracked: u64,
    /// Dropped and leaked packets copied for the pcapng, and those not.
    pub capture: CaptureCounts,
    pub netns: Vec<NetnsInfo>,
    /// The hook that reads a deleted namespace's counters at its teardown;
    /// without it they are as of the last reading (every second).
    pub netns_teardown_hooks: HookList,
    /// Per SA: packets that did not fit the MTU, largest inner packet, MSS.
    pub esp_sizes: Vec<crate::mtu::SaSizes>,
    pub esp_sizes_hooks: HookList,
    pub findings: Vec<Finding>,
    /// IKE packets per local address and peer: sent, received, dropped here.
    pub ike: Vec<crate::ike::IkePath>,
    pub ike_hooks: HookList,
    /// Each pluto found: its connections, states and log events.
    pub pluto: PlutoReport,
    /// Packets SNATed before the IPsec policy lookup, per flow.
    pub masquerade: crate::masquerade::MasqueradeReport,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PlutoReport {
    pub instances: Vec<crate::pluto::session::Observed>,
    /// Why plutos could not be found (none running is not a problem).
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Kernel {
    pub release: String,
    pub mode: String,
}

/// `Counter::coverage` when every increment was tied to its packet.
pub const ATTRIBUTED: &str = "attributed";

/// One `/proc/net/xfrm_stat` counter that moved during the run.
#[derive(Debug, Serialize, Deserialize)]
pub struct Counter {
    pub name: String,
    pub kernel_delta: u64,
    pub attributed: u64,
    /// `kernel_delta - attributed`: increments no packet was found for.
    pub gap: i128,
    /// `attributed` (every increment tied to its packet) or `counted` (the
    /// kernel's delta only, as in tracepoint-only mode).
    pub coverage: String,
    pub by_netns: Vec<NetnsDelta>,
    pub sources: Vec<Source>,
    /// Sampled increments with their kernel stacks (rate-limited).
    pub samples: Vec<SampleReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NetnsDelta {
    pub netns: u64,
    pub label: String,
    pub delta: u64,
    pub attributed: u64,
    /// The namespace was deleted during the run (`delta` is up to then).
    pub deleted: bool,
}

/// How to print a report on a terminal.
#[derive(Clone, Copy, Debug, Default)]
pub struct Style {
    /// ANSI colours for finding kinds and gaps.
    pub color: bool,
    /// Only the diagnosis (`--quiet`).
    pub findings_only: bool,
}

/// The end-of-run summary for a terminal, plain.
pub fn render(report: &Report) -> String {
    render_with(report, Style::default())
}

/// The diagnosis: every finding with its fix and evidence.
fn render_findings(report: &Report, style: Style, out: &mut String) {
    let (red, bold, reset) = if style.color {
        ("\x1b[31m", "\x1b[1m", "\x1b[0m")
    } else {
        ("", "", "")
    };
    let _ = writeln!(out, "\n{bold}Diagnosis:{reset}");
    if report.findings.is_empty() {
        let _ = writeln!(out, "  no finding");
    }
    for f in &report.findings {
        let _ = writeln!(out, "  {red}[{}]{reset} {}", f.kind, f.summary);
        let _ = writeln!(out, "      {bold}fix:{reset} {}", f.fix);
        for e in &f.evidence {
            let _ = writeln!(out, "      - {e}");
        }
    }
}

/// The end-of-run summary for a terminal.
pub fn render_with(report: &Report, style: Style) -> String {
    let mut out = String::new();
    if style.findings_only {
        render_findings(report, style, &mut out);
        return out;
    }
    let _ = writeln!(
        out,
        "xfrm-trace: {:.1} s on {} in {} mode",
        report.duration_secs, report.kernel.release, report.kernel.mode
    );
    if !report.filter.is_empty() {
        let _ = writeln!(
            out,
            "filtered to: {} (counters' kernel totals are per netns; attributed counts only what matches)",
            report.filter.join(", ")
        );
    }
    let xfrm: Vec<&DropRow> = report.drops.iter().filter(|d| d.xfrm_related).collect();
    let _ = writeln!(
        out,
        "\nXFRM-related drops (skb:kfree_skb): {}",
        xfrm.iter().map(|d| d.count).sum::<u64>()
    );
    if !xfrm.is_empty() {
        let _ = writeln!(
            out,
            "  {:>8}  {:<20} {:<28} {:<16} {:<10} proto",
            "count", "reason", "function", "netns", "dev"
        );
        for d in &xfrm {
            let _ = writeln!(
                out,
                "  {:>8}  {:<20} {:<28} {:<16} {:<10} {}",
                d.count, d.reason, d.function, d.netns_label, d.ifname, d.protocol
            );
        }
    }
    let other: u64 = report
        .drops
        .iter()
        .filter(|d| !d.xfrm_related)
        .map(|d| d.count)
        .sum();
    let _ = writeln!(out, "other drops: {other}");
    if report.drops_untracked > 0 {
        let _ = writeln!(
            out,
            "drops not itemized (table full): {}",
            report.drops_untracked
        );
    }
    let _ = writeln!(out, "\nXFRM counters (/proc/net/xfrm_stat):");
    if let Some(problem) = &report.counters_unavailable {
        let _ = writeln!(out, "  not available: {problem}");
    } else if report.counters.is_empty() {
        let _ = writeln!(out, "  none moved");
    }
    for c in &report.counters {
        // A gap means something only where attribution was attempted.
        let gap = if c.gap == 0 || c.coverage != ATTRIBUTED {
            String::new()
        } else {
            format!("  GAP {}", c.gap)
        };
        let _ = writeln!(
            out,
            "  {:<26} kernel +{:<6} attributed {:<6}{gap}",
            c.name, c.kernel_delta, c.attributed
        );
        for n in &c.by_netns {
            let deleted = if n.deleted {
                " (deleted during the run)"
            } else {
                ""
            };
            let _ = writeln!(out, "      netns {:<20} +{}{deleted}", n.label, n.delta);
        }
        for s in c.sources.iter().take(5) {
            let spi = if s.spi.is_empty() {
                String::new()
            } else {
                format!(" spi {}", s.spi)
            };
            let policy = match (s.policy_index, s.policy_selector.as_str()) {
                (0, _) => String::new(),
                (index, "") => format!(" policy {index} ({})", s.policy_dir),
                (index, selector) => format!(" policy {index} ({}, {selector})", s.policy_dir),
            };
            let connection = if s.connection.is_empty() {
                String::new()
            } else {
                format!(" connection \"{}\" #{}", s.connection, s.pluto_state)
            };
            let _ = writeln!(
                out,
                "      {:>6}  {} {} -> {} {}{spi}{policy}{connection} dir {} in {} on {} at {}",
                s.count,
                s.family,
                s.src,
                s.dst,
                s.proto,
                s.dir,
                s.netns_label,
                s.ifname,
                s.function
            );
        }
        if let Some(sample) = c.samples.first() {
            let seq = sample.seq.map_or_else(String::new, |q| format!(" seq {q}"));
            let own = if sample.own_frames_left_out > 0 {
                " (frames of xfrm-trace itself left out)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "      sample{seq}{own}: {}",
                sample
                    .stack
                    .iter()
                    .take(6)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" <- ")
            );
        }
    }
    if !report.coverage.complete
        && let Some(line) = unwatched::line(
            "per-packet attribution",
            !report.coverage.attached.is_empty(),
            &report.coverage.missing,
        )
    {
        let _ = writeln!(out, "\n{line} (counters are counted only)");
    }
    let _ = writeln!(
        out,
        "\nMASQUERADE before IPsec (packets re-routed out of a tunnel by NAT): {}",
        report
            .masquerade
            .leaks
            .iter()
            .map(|l| l.packets)
            .sum::<u64>()
    );
    let masquerade = &report.masquerade.coverage;
    if masquerade.detected.is_empty() {
        let missing = if masquerade.missing.is_empty() {
            vec![("MASQUERADE detection".into(), "not on this kernel".into())]
        } else {
            masquerade.missing.clone()
        };
        if let Some(line) = unwatched::line("MASQUERADE detection", false, &missing) {
            let _ = writeln!(out, "  {line}");
        }
    }
    for (capability, hooks) in [
        ("oversize ESP", &report.esp_sizes_hooks),
        ("IKE watch", &report.ike_hooks),
    ] {
        if let Some(line) = unwatched::line(capability, !hooks.attached.is_empty(), &hooks.missing)
        {
            let _ = writeln!(out, "{line}");
        }
    }
    if let Some(line) = unwatched::line(
        "namespace teardown",
        false,
        &report.netns_teardown_hooks.missing,
    ) {
        let _ = writeln!(out, "{line} (deleted namespaces: counters as last read)");
    }
    if !report.ike.is_empty() {
        let _ = writeln!(out, "\nIKE (UDP 500/4500) per peer:");
        for p in &report.ike {
            let dropped = if p.dropped.is_empty() {
                String::new()
            } else {
                let sites: Vec<String> = p
                    .dropped
                    .iter()
                    .map(|d| {
                        format!(
                            "{} {} at {} ({})",
                            d.count, d.direction, d.function, d.reason
                        )
                    })
                    .collect();
                format!(", dropped here: {}", sites.join(", "))
            };
            let unreachable = if p.port_unreachable > 0 {
                format!(", ICMP port unreachable {}", p.port_unreachable)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  {:<16} {} -> {}: sent {}, received {}{unreachable}{dropped}",
                p.netns_label, p.local, p.peer, p.sent, p.received
            );
        }
    }
    if !report.pluto.instances.is_empty() || !report.pluto.problems.is_empty() {
        let _ = writeln!(out, "\npluto (libreswan):");
    }
    for problem in &report.pluto.problems {
        let _ = writeln!(out, "  {problem}");
    }
    for p in &report.pluto.instances {
        let _ = writeln!(
            out,
            "  pid {} in {} ({}; log {}): {} log events",
            p.pid,
            p.netns_label,
            p.ctl_socket.display(),
            p.log,
            p.events.len()
        );
        for c in &p.connections {
            let _ = writeln!(
                out,
                "    \"{}\" {}: {} <-> {}",
                c.name,
                if p.is_up(&c.name) { "up" } else { "down" },
                c.local_subnets.join(","),
                c.remote_subnets.join(",")
            );
        }
        for problem in &p.problems {
            let _ = writeln!(out, "    {problem}");
        }
    }
    render_findings(report, style, &mut out);
    let e = &report.attribution_errors;
    if e.samples_lost > 0 {
        let _ = writeln!(
            out,
            "samples not sent (rate limit {} per second and CPU; counts are exact): {}",
            tracer_common::capture::SAMPLES_PER_SECOND,
            e.samples_lost
        );
    }
    let c = &report.capture;
    if c.drops_not_captured + c.leaks_not_captured > 0 {
        let _ = writeln!(
            out,
            "packets not copied for the pcapng (rate limit {} per second and CPU; counts are exact): {} dropped (of {}), {} MASQUERADE leaks (of {})",
            tracer_common::capture::SAMPLES_PER_SECOND,
            c.drops_not_captured,
            c.drops_captured + c.drops_not_captured,
            c.leaks_not_captured,
            c.leaks_captured + c.leaks_not_captured,
        );
    }
    if e.unbalanced + e.too_deep + e.table_full > 0 {
        let _ = writeln!(
            out,
            "attribution errors: unbalanced {}, too deep {}, table full {}",
            e.unbalanced, e.too_deep, e.table_full
        );
    }
    out
}

/// The refreshing view while running: counters that moved so far, what is
/// attributed, and the top source of each. Clears the terminal first.
pub fn render_live(elapsed: std::time::Duration, counters: &[Counter]) -> String {
    let mut out = String::from("\x1b[2J\x1b[H");
    let _ = writeln!(
        out,
        "xfrm-trace: {:.0} s  (Ctrl-C for the full report)\n",
        elapsed.as_secs_f64()
    );
    if counters.is_empty() {
        let _ = writeln!(out, "no XFRM counter moved yet");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<26} {:>8} {:>10} {:>6}  top source",
        "counter", "kernel", "attributed", "gap"
    );
    for c in counters {
        let top = c.sources.first().map_or_else(String::new, |s| {
            let spi = if s.spi.is_empty() {
                String::new()
            } else {
                format!(" spi {}", s.spi)
            };
            format!(
                "{} {} -> {} {}{spi} at {}",
                s.count, s.src, s.dst, s.proto, s.function
            )
        });
        let gap = if c.coverage == ATTRIBUTED {
            c.gap.to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<26} {:>8} {:>10} {gap:>6}  {top}",
            c.name, c.kernel_delta, c.attributed
        );
    }
    out
}
