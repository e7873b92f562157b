//! Command-line interface.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

/// Why does this Linux IPsec VPN drop, leak or break packets?
///
/// Without a subcommand, attaches to the kernel's packet drop path, watches
/// until Ctrl-C or --duration, then reports the XFRM-related drops and every
/// /proc/net/xfrm_stat counter that moved, per network namespace.
///
/// Exit codes: 0 success, 1 error (one line on stderr), 2 bad usage.
#[derive(Debug, Parser)]
#[command(
    name = "xfrm-trace",
    version,
    after_help = "Examples:\n  sudo xfrm-trace --duration 10s\n  sudo xfrm-trace --json report.json\n  sudo xfrm-trace doctor\n  sudo xfrm-trace lab masquerade\n  sudo xfrm-trace lab mtu"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Stop after this long (e.g. 30s, 500ms, 2m); default: until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Also write the report as JSON (schema xfrm-trace/1) to FILE, or - for stdout.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Create FILE once every program is attached.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Which kernel hooks to use: auto picks fentry/fexit and falls back to
    /// kprobes per function; the others force one method.
    #[arg(long, value_enum, default_value_t)]
    pub hooks: crate::attribution::HookChoice,
    /// Ask the pluto (libreswan) behind this control socket; repeatable.
    /// Default: every running pluto, found through /proc, with its log.
    #[arg(long, value_name = "PATH")]
    pub pluto_socket: Vec<PathBuf>,
    /// More detail on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Reproduce a classic IPsec failure in a lab of network namespaces,
    /// diagnose it with xfrm-trace, apply the fix, show it working, clean up.
    Lab {
        #[arg(value_enum)]
        scenario: LabScenario,
    },
    /// Show what this kernel offers (BTF, program types, hookable functions) and the hook mode.
    Doctor {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `30s`, `500ms`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 30s)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?} (use ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("not a duration: {text:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabScenario {
    /// A MASQUERADE rule on the gateway sends tunnel traffic out in clear.
    Masquerade,
    /// ESP over a path with a lower MTU and filtered ICMP: TCP stalls.
    Mtu,
}
