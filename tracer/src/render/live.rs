//! The refreshing view while running.

use std::fmt::Write as _;

use crate::report::{ATTRIBUTED, Counter};

/// Counters that moved so far, what is attributed, and the top source of
/// each. Clears the terminal first.
pub fn live(elapsed: std::time::Duration, counters: &[Counter]) -> String {
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
