//! The end-of-run summary for a terminal: one function per section of the
//! report, printed in the order of `SECTIONS`.

use std::fmt::Write as _;

use super::{Style, unwatched};
use crate::{
    attribution::{SampleReport, Source},
    drops::DropRow,
    report::{ATTRIBUTED, Counter, Report},
};

/// One section's text, appended to `out`.
type Section = fn(&Report, Style, &mut String);

/// The sections of the full summary, in print order.
const SECTIONS: &[Section] = &[
    header,
    drops,
    counters,
    not_watched,
    ike,
    pluto,
    findings,
    losses,
];

/// The end-of-run summary for a terminal, plain.
pub fn render(report: &Report) -> String {
    render_with(report, Style::default())
}

/// The end-of-run summary for a terminal.
pub fn render_with(report: &Report, style: Style) -> String {
    let mut out = String::new();
    if style.findings_only {
        findings(report, style, &mut out);
        return out;
    }
    for section in SECTIONS {
        section(report, style, &mut out);
    }
    out
}

/// How long, on which kernel, in which mode, and what the filter kept.
fn header(report: &Report, _: Style, out: &mut String) {
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
}

/// XFRM-related drops as a table; other drops as one total.
fn drops(report: &Report, _: Style, out: &mut String) {
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
}

/// Every counter that moved: kernel delta, attributed, per netns, its top
/// sources and one sampled stack.
fn counters(report: &Report, _: Style, out: &mut String) {
    let _ = writeln!(out, "\nXFRM counters (/proc/net/xfrm_stat):");
    if let Some(problem) = &report.counters_unavailable {
        let _ = writeln!(out, "  not available: {problem}");
    } else if report.counters.is_empty() {
        let _ = writeln!(out, "  none moved");
    }
    for c in &report.counters {
        counter(c, out);
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
}

fn counter(c: &Counter, out: &mut String) {
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
        let _ = writeln!(out, "      {}", source(s));
    }
    if let Some(sample) = c.samples.first() {
        let _ = writeln!(out, "      {}", sample_line(sample));
    }
}

/// `count family src -> dst proto [spi] [policy] [connection] dir .. in .. on .. at ..`
fn source(s: &Source) -> String {
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
    format!(
        "{:>6}  {} {} -> {} {}{spi}{policy}{connection} dir {} in {} on {} at {}",
        s.count, s.family, s.src, s.dst, s.proto, s.dir, s.netns_label, s.ifname, s.function
    )
}

/// `sample [seq N]: f <- g <- ...` (the first six frames).
fn sample_line(sample: &SampleReport) -> String {
    let seq = sample.seq.map_or_else(String::new, |q| format!(" seq {q}"));
    let own = if sample.own_frames_left_out > 0 {
        " (frames of xfrm-trace itself left out)"
    } else {
        ""
    };
    let frames: Vec<&str> = sample.stack.iter().take(6).map(String::as_str).collect();
    format!("sample{seq}{own}: {}", frames.join(" <- "))
}

/// MASQUERADE leaks, and one line per capability that is not watched.
fn not_watched(report: &Report, _: Style, out: &mut String) {
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
}

/// IKE packets per local address and peer.
fn ike(report: &Report, _: Style, out: &mut String) {
    if report.ike.is_empty() {
        return;
    }
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

/// Each pluto found, its connections up or down, and its problems.
fn pluto(report: &Report, _: Style, out: &mut String) {
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
}

/// The diagnosis: every finding with its fix and evidence.
fn findings(report: &Report, style: Style, out: &mut String) {
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

/// What the rate limits let go (counts stay exact) and attribution errors.
fn losses(report: &Report, _: Style, out: &mut String) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section of a fully populated report, as a terminal shows it:
    /// compared with the committed text, so a change of wording or layout
    /// is seen in review (XFRM_TRACE_UPDATE_TEXT=1 rewrites the file).
    #[test]
    fn a_populated_report_renders_as_committed() {
        let text = render(&crate::report::schema::populated());
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/render/populated.txt");
        if std::env::var_os("XFRM_TRACE_UPDATE_TEXT").is_some() {
            std::fs::write(&path, &text).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text == committed,
            "the text report changed; if on purpose, update {} (XFRM_TRACE_UPDATE_TEXT=1 cargo test --release -p tracer --lib render)\n--- now:\n{text}",
            path.display()
        );
    }

    #[test]
    fn quiet_prints_the_diagnosis_only() {
        let report = crate::report::schema::populated();
        let quiet = render_with(
            &report,
            Style {
                color: false,
                findings_only: true,
            },
        );
        assert!(quiet.starts_with("\nDiagnosis:\n"), "{quiet}");
        assert!(!quiet.contains("XFRM counters"), "{quiet}");
        assert!(render(&report).contains(&quiet), "{quiet}");
    }
}
