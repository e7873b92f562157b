//! The `xfrm-trace` binary: parse, run, and turn any error into one line.

use std::io::Write as _;

use clap::Parser as _;
use xfrm_trace::{
    cli::{Cli, Command, LabScenario},
    doctor, privilege, report, scenarios, trace,
};

fn main() {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp(None)
        .init();
    if let Err(error) = run(cli) {
        eprintln!("xfrm-trace: error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Some(Command::Lab { scenario }) => {
            privilege::require_root()?;
            match scenario {
                LabScenario::Masquerade => scenarios::masquerade::run(),
                LabScenario::Mtu => scenarios::mtu::run(cli.hooks),
            }
        }
        Some(Command::Doctor { json }) => {
            privilege::require_root()?;
            let report = doctor::run();
            if json {
                print(&format!("{}\n", serde_json::to_string_pretty(&report)?))
            } else {
                print(&doctor::render(&report))
            }
        }
        None => {
            let options = trace::Options {
                duration: cli.duration,
                ready_file: cli.ready_file,
                // JSON on stdout and the live view would mix.
                live: cli.json.as_deref().is_none_or(|p| p.as_os_str() != "-"),
                hooks: cli.hooks,
                pluto_sockets: cli.pluto_socket,
                stop: None,
            };
            let report = trace::run(&options)?;
            let text = report::render(&report);
            match cli.json.as_deref() {
                Some(path) if path.as_os_str() == "-" => {
                    eprint!("{text}");
                    print(&format!("{}\n", serde_json::to_string_pretty(&report)?))
                }
                Some(path) => {
                    write_atomically(path, &serde_json::to_vec_pretty(&report)?)?;
                    print(&text)
                }
                None => print(&text),
            }
        }
    }
}

/// Writes stdout, turning a closed pipe or full disk into an error line.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// Writes `path` through a temporary file and a rename, so a reader never
/// sees half a report (and a full disk leaves the old file intact).
fn write_atomically(path: &std::path::Path, data: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
