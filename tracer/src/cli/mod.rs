//! Command-line interface.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

/// Why does this Linux IPsec VPN drop, leak or break packets?
///
/// Without a subcommand, attaches eBPF programs to the kernel's XFRM,
/// NAT and drop paths, watches until Ctrl-C or --duration, and reports:
/// every /proc/net/xfrm_stat counter that moved with the packets behind
/// it, the XFRM-related drops, IKE per peer, MASQUERADE leaks, oversize
/// ESP, what each running pluto said, and a diagnosis with the fix.
#[derive(Debug, Parser)]
#[command(
    name = "xfrm-trace",
    version,
    after_help = "Examples:
  sudo xfrm-trace                                 watch until Ctrl-C, then diagnose
  sudo xfrm-trace --duration 30s --json run.json  30 s, also as JSON
  sudo xfrm-trace --pcap drops.pcapng             the sampled dropped/leaked packets, for tshark
  sudo xfrm-trace --netns west --filter conn=vpn  one netns, one connection
  sudo xfrm-trace --filter 10.0.2.0/24 --filter spi=0x1001
  sudo xfrm-trace --prometheus 127.0.0.1:9469     serve OpenMetrics until stopped
  sudo xfrm-trace report -o evidence.tar.gz       evidence bundle for a bug report
  sudo xfrm-trace doctor                          what this kernel lets us hook
  sudo xfrm-trace lab mtu                         reproduce, diagnose, fix a PMTU black hole
  xfrm-trace completions bash > /etc/bash_completion.d/xfrm-trace
  xfrm-trace man > xfrm-trace.1

Exit codes:
  0  success (with --fail-on-findings: and no finding)
  1  error: one line on stderr (not root, no BTF, a file that cannot be written, ...)
  2  bad usage
  3  --fail-on-findings and the diagnosis found something
Ctrl-C, SIGTERM or SIGHUP (a closed SSH session; ignored under nohup) while
watching ends the run with its report (0 or 3); before the programs are
attached, it ends the process at once (by the signal)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
    /// More detail on stderr (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// What a run watches and how it reports; also for `report`.
#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// Stop after this long (e.g. 30s, 500ms, 2m); default: until Ctrl-C
    /// (`report`: 10s).
    #[arg(long, value_parser = parse_duration, global = true)]
    pub duration: Option<Duration>,
    /// Also write the report as JSON (schema xfrm-trace/1) to FILE, or - for
    /// stdout. A file is replaced whole, mode 0600; a device or FIFO is
    /// written through; a link or FIFO of another user is refused.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also write the sampled dropped and leaked packets as pcapng to FILE
    /// (first 128 bytes from the IP header, each with a comment naming the
    /// counter or finding, the SA and the kernel function); - for stdout.
    /// Written as --json is.
    #[arg(long, value_name = "FILE", global = true)]
    pub pcap: Option<PathBuf>,
    /// Create FILE (mode 0600; it must not exist) once every program is
    /// attached (for scripts).
    #[arg(long, value_name = "FILE", global = true)]
    pub ready_file: Option<PathBuf>,
    /// Which kernel hooks to use: auto picks fentry/fexit and falls back to
    /// kprobes per function; the others force one method.
    #[arg(long, value_enum, default_value_t, global = true)]
    pub hooks: crate::hooks::HookChoice,
    /// Tie increments to packets with brackets around every call of the
    /// XFRM functions instead of at the drop: costs every packet, names the
    /// exact function; for cross-checks and paths not analysed for the
    /// drop (IP-TFS, ESP in TCP).
    #[arg(long, global = true)]
    pub brackets: bool,
    /// Ask the pluto (libreswan) behind this control socket; repeatable.
    /// Default: every running pluto, found through /proc, with its log.
    #[arg(long, value_name = "PATH", global = true)]
    pub pluto_socket: Vec<PathBuf>,
    /// Report only these network namespaces (`ip netns` name, `host`, or
    /// inode number); repeatable.
    #[arg(long, value_name = "NAME", global = true)]
    pub netns: Vec<String>,
    /// Report only what matches: an address (`192.0.2.1`), a subnet
    /// (`10.0.2.0/24`), an SPI (`spi=0x1001`) or a connection
    /// (`conn=NAME`); repeatable: anything matching one of them.
    #[arg(long, value_name = "EXPR", value_parser = crate::filter::Term::parse, global = true)]
    pub filter: Vec<crate::filter::Term>,
    /// How often the live view and the metrics are refreshed.
    #[arg(long, value_parser = parse_duration, default_value = "1s", global = true)]
    pub interval: Duration,
    /// Serve OpenMetrics (Prometheus) at http://ADDR/metrics while running
    /// (ADDR: address:port or host:port, e.g. 127.0.0.1:9469, localhost:9469).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen_address, global = true)]
    pub prometheus: Option<std::net::SocketAddr>,
    /// Colour the terminal report: auto (on a terminal, unless NO_COLOR).
    #[arg(long, value_enum, default_value_t, global = true)]
    pub color: ColorChoice,
    /// Print only the diagnosis (findings), no live view.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Exit with 3 when the diagnosis has any finding.
    #[arg(long, global = true)]
    pub fail_on_findings: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether to colour output going to stdout.
    pub fn enabled(self) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => {
                std::io::IsTerminal::is_terminal(&std::io::stdout())
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }
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
    /// Watch (10 s by default) and write an evidence bundle for a kernel or
    /// libreswan bug report: report, kernel facts, counters, SAs and
    /// policies without keys, pluto status, stacks. Written as --json is.
    Report {
        /// The bundle to write (.tar.gz), or - for stdout.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    Man,
}

/// The longest `--duration` or `--interval`: a year (far beyond any run,
/// and far below where adding it to a clock overflows).
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// `30s`, `500ms`, `2m`, `1h`, or plain seconds: more than 0, at most
/// `MAX_DURATION`.
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
    let duration =
        Duration::try_from_secs_f64(seconds).map_err(|_| format!("not a duration: {text:?}"))?;
    if duration.is_zero() {
        return Err(format!("{text:?} is no time: give more than 0"));
    }
    if duration > MAX_DURATION {
        return Err(format!("{text:?} is too long: at most 366 days (8784h)"));
    }
    Ok(duration)
}

/// `address:port` or `host:port`, the host name resolved (the first
/// address it resolves to is the one listened on).
pub fn parse_listen_address(text: &str) -> Result<std::net::SocketAddr, String> {
    use std::net::ToSocketAddrs as _;
    let mut addresses = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} is not an address:port or host:port that resolves: {e}"))?;
    addresses
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
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
        assert_eq!(parse_duration("8784h"), Ok(MAX_DURATION));
        assert_eq!(
            parse_duration("9223372036854775807"),
            Err("\"9223372036854775807\" is too long: at most 366 days (8784h)".into())
        );
        assert_eq!(
            parse_duration("0ms"),
            Err("\"0ms\" is no time: give more than 0".into())
        );
        assert!(parse_duration("0.0001ms").is_ok());
    }

    #[test]
    fn listen_addresses_resolve_host_names() {
        assert_eq!(
            parse_listen_address("127.0.0.1:9469"),
            Ok("127.0.0.1:9469".parse().unwrap())
        );
        let local = parse_listen_address("localhost:9469").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 9469, "{local}");
        assert!(parse_listen_address("localhost").is_err());
        assert!(parse_listen_address("no-such-host.invalid:9469").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_line_of_the_help_parses() {
        // Parsing alone does not check that fields and flags agree: turning
        // the matches into the structs does (a flag of the same name on a
        // subcommand and globally would panic here).
        for line in [
            "xfrm-trace --duration 30s --json run.json",
            "xfrm-trace --netns west --filter conn=vpn --filter 10.0.2.0/24",
            "xfrm-trace --prometheus 127.0.0.1:9469 --interval 5s --color never -q",
            "xfrm-trace report -o evidence.tar.gz --duration 20s --hooks kprobe",
            "xfrm-trace doctor --json",
            "xfrm-trace lab mtu",
            "xfrm-trace completions zsh",
            "xfrm-trace man",
        ] {
            let cli = Cli::try_parse_from(line.split_whitespace());
            assert!(cli.is_ok(), "{line}: {cli:?}");
        }
        assert!(Cli::try_parse_from(["xfrm-trace", "--filter", "west"]).is_err());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LabScenario {
    /// A MASQUERADE rule on the gateway sends tunnel traffic out in clear.
    Masquerade,
    /// ESP over a path with a lower MTU and filtered ICMP: TCP stalls.
    Mtu,
}
