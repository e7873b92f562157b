//! The `xfrm-trace` binary: parse, run, and turn any error into one line.

use std::io::Write as _;

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser as _};
use xfrm_trace::{
    bundle,
    cli::{Cli, Command, LabScenario, TraceArgs},
    doctor,
    filter::Filter,
    privilege, report, scenarios, trace,
};

/// Exit code when `--fail-on-findings` and the diagnosis found something.
const EXIT_FINDINGS: i32 = 3;

fn main() {
    let cli = Cli::parse();
    let level = match (cli.verbose, cli.trace.quiet) {
        (0, true) => log::LevelFilter::Error,
        (0, false) => log::LevelFilter::Warn,
        (1, _) => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp(None)
        .init();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            let line = xfrm_trace::ebpf::describe(error.as_ref());
            note(&format!("xfrm-trace: error: {line}\n"));
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Some(Command::Lab { scenario }) => {
            privilege::require_privileges()?;
            match scenario {
                LabScenario::Masquerade => scenarios::masquerade::run()?,
                LabScenario::Mtu => scenarios::mtu::run(cli.trace.hooks)?,
            }
            Ok(0)
        }
        Some(Command::Doctor { json }) => {
            privilege::require_privileges()?;
            let report = doctor::run();
            if json {
                print(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
            } else {
                print(&doctor::render(&report))?;
            }
            Ok(0)
        }
        Some(Command::Completions { shell }) => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "xfrm-trace", &mut out);
            print(&String::from_utf8_lossy(&out))?;
            Ok(0)
        }
        Some(Command::Man) => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut out)?;
            print(&String::from_utf8_lossy(&out))?;
            Ok(0)
        }
        Some(Command::Report { output }) => {
            let mut args = cli.trace;
            args.duration = Some(args.duration.unwrap_or(std::time::Duration::from_secs(10)));
            let outcome = trace::run(&options(&args, false))?;
            bundle::write(&output, &outcome)
                .with_context(|| format!("writing the bundle {}", output.display()))?;
            finish(&args, &outcome.report)?;
            note(&format!(
                "xfrm-trace: evidence bundle written to {}\n",
                output.display()
            ));
            Ok(exit_code(&args, &outcome.report))
        }
        None => {
            let args = cli.trace;
            // JSON on stdout and the live view would mix.
            let live = !args.quiet && args.json.as_deref().is_none_or(|p| p.as_os_str() != "-");
            let outcome = trace::run(&options(&args, live))?;
            finish(&args, &outcome.report)?;
            Ok(exit_code(&args, &outcome.report))
        }
    }
}

fn options(args: &TraceArgs, live: bool) -> trace::Options {
    trace::Options {
        duration: args.duration,
        ready_file: args.ready_file.clone(),
        live,
        hooks: args.hooks,
        pluto_sockets: args.pluto_socket.clone(),
        filter: Filter {
            netns: args.netns.clone(),
            terms: args.filter.clone(),
        },
        interval: args.interval,
        prometheus: args.prometheus,
        stop: None,
    }
}

/// Prints the report (and writes its JSON and pcapng) as the options ask.
fn finish(args: &TraceArgs, report: &report::Report) -> anyhow::Result<()> {
    if let Some(path) = &args.pcap {
        let written = xfrm_trace::pcap::write(path, report)
            .with_context(|| format!("writing the pcapng {}", path.display()))?;
        note(&format!(
            "xfrm-trace: {written} sampled packets written to {}\n",
            path.display()
        ));
    }
    let style = report::Style {
        color: args.color.enabled(),
        findings_only: args.quiet,
    };
    let text = report::render_with(report, style);
    match args.json.as_deref() {
        Some(path) if path.as_os_str() == "-" => {
            note(&text);
            print(&format!("{}\n", serde_json::to_string_pretty(report)?))
        }
        Some(path) => {
            xfrm_trace::fsutil::write_atomically(path, &serde_json::to_vec_pretty(report)?)?;
            print(&text)
        }
        None => print(&text),
    }
}

fn exit_code(args: &TraceArgs, report: &report::Report) -> i32 {
    if args.fail_on_findings && !report.findings.is_empty() {
        EXIT_FINDINGS
    } else {
        0
    }
}

/// Writes stderr. Not eprint!: it panics when stderr is a terminal that
/// is gone (SIGHUP), and what is left to write (the JSON) must still be.
fn note(text: &str) {
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Writes stdout, turning a closed pipe or full disk into an error line.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}
