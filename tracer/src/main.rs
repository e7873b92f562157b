//! The `xfrm-trace` binary: parse, run, and turn any error into one line.

use std::{io::Write as _, path::Path};

use clap::{CommandFactory as _, Parser as _};
use xfrm_trace::{
    bundle,
    cli::{Cli, Command, LabScenario, TraceArgs},
    doctor,
    filter::Filter,
    fsutil, privilege, render, report, scenarios, trace,
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
            check_outputs(&args, Some(&output))?;
            let outcome = trace::run(&options(&args, false))?;
            finish(&args, &outcome, Some(&output))
        }
        None => {
            let args = cli.trace;
            check_outputs(&args, None)?;
            // Data on stdout and the live view would mix.
            let live = !args.quiet && !stdout_taken(&args, None);
            let outcome = trace::run(&options(&args, live))?;
            finish(&args, &outcome, None)
        }
    }
}

fn options(args: &TraceArgs, live: bool) -> trace::Options {
    trace::Options {
        duration: args.duration,
        ready_file: args.ready_file.clone(),
        live,
        hooks: args.hooks,
        brackets: args.brackets,
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

/// An output file of a run, besides the report on the terminal.
#[derive(Clone, Copy)]
enum Output {
    Bundle,
    Pcap,
    Json,
}

impl Output {
    /// The option that names it, for error lines.
    fn option(self) -> &'static str {
        match self {
            Self::Bundle => "report -o",
            Self::Pcap => "--pcap",
            Self::Json => "--json",
        }
    }

    /// Writes it; returns what to announce on stderr, if anything.
    fn write(self, path: &Path, outcome: &report::Outcome) -> anyhow::Result<Option<String>> {
        match self {
            Self::Bundle => bundle::write(path, outcome).map(|()| Some("evidence bundle".into())),
            Self::Pcap => xfrm_trace::pcap::write(path, &outcome.report)
                .map(|count| Some(format!("{count} sampled packets"))),
            Self::Json => {
                let mut bytes = serde_json::to_vec_pretty(&outcome.report)?;
                bytes.push(b'\n');
                fsutil::write_output(path, &bytes).map(|()| None)
            }
        }
    }
}

/// The outputs the options ask for, `bundle` being `report -o`'s.
fn outputs<'a>(args: &'a TraceArgs, bundle: Option<&'a Path>) -> Vec<(Output, &'a Path)> {
    [
        (Output::Bundle, bundle),
        (Output::Pcap, args.pcap.as_deref()),
        (Output::Json, args.json.as_deref()),
    ]
    .into_iter()
    .filter_map(|(output, path)| Some((output, path?)))
    .collect()
}

/// Whether an output goes to stdout (`-`): the report then goes to stderr.
fn stdout_taken(args: &TraceArgs, bundle: Option<&Path>) -> bool {
    outputs(args, bundle)
        .iter()
        .any(|(_, path)| fsutil::is_stdout(path))
}

/// Fails before anything is attached if an output cannot be written, so
/// that a bad path does not cost the whole watch.
fn check_outputs(args: &TraceArgs, bundle: Option<&Path>) -> anyhow::Result<()> {
    let outputs = outputs(args, bundle);
    if outputs.iter().filter(|(_, p)| fsutil::is_stdout(p)).count() > 1 {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "only one output can be - (stdout)",
            )
            .exit();
    }
    for (output, path) in outputs {
        fsutil::check_output(path).map_err(|e| named(output.option(), path, &e))?;
    }
    if let Some(path) = &args.ready_file {
        fsutil::check_new(path).map_err(|e| named("--ready-file", path, &e))?;
    }
    Ok(())
}

fn named(option: &str, path: &Path, error: &anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!("{option} {}: {error:#}", path.display())
}

/// Prints the report, then writes every output. One that cannot be
/// written does not stop the others; the run then fails (exit 1) with one
/// line naming each failed output.
fn finish(
    args: &TraceArgs,
    outcome: &report::Outcome,
    bundle: Option<&Path>,
) -> anyhow::Result<i32> {
    let style = render::Style {
        color: args.color.enabled(),
        findings_only: args.quiet,
    };
    let text = render::render_with(&outcome.report, style);
    let mut failures = Vec::new();
    if stdout_taken(args, bundle) {
        note(&text);
    } else if let Err(e) = print(&text) {
        failures.push(format!("printing the report: {e:#}"));
    }
    for (output, path) in outputs(args, bundle) {
        match output.write(path, outcome) {
            Ok(Some(what)) => note(&format!(
                "xfrm-trace: {what} written to {}\n",
                path.display()
            )),
            Ok(None) => {}
            Err(e) => failures.push(format!("writing {:#}", named(output.option(), path, &e))),
        }
    }
    if !failures.is_empty() {
        anyhow::bail!("{}", failures.join("; "));
    }
    Ok(exit_code(args, &outcome.report))
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
