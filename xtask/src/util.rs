//! Running commands with a clear error when they fail.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use anyhow::{Context as _, bail};

/// Runs `cmd` with inherited output; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot start {cmd:?}"))
}

/// `cargo` of the toolchain running us.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the release `xfrm-trace` and returns its path.
pub fn build_release() -> anyhow::Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "tracer",
        "--bin",
        "xfrm-trace",
    ]))?;
    Ok(target_dir().join("release/xfrm-trace"))
}

/// Cargo's target folder (`CARGO_TARGET_DIR` lets a second checkout of
/// the binaries run VM tests while the first is busy).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// What a `cargo test` run reported.
#[derive(Debug, Default)]
pub struct TestTally {
    pub passed: u64,
    pub failed: u64,
    pub success: bool,
}

/// Runs `cargo test`, echoing its output, and adds up its result lines.
pub fn cargo_test(cmd: &mut Command) -> anyhow::Result<TestTally> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let mut tally = TestTally::default();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        let (passed, failed) = parse_result_line(&line);
        tally.passed += passed;
        tally.failed += failed;
    }
    tally.success = child.wait()?.success();
    Ok(tally)
}

/// `test result: ok. 4 passed; 1 failed; ...` -> (4, 1).
pub fn parse_result_line(line: &str) -> (u64, u64) {
    let Some(rest) = line.strip_prefix("test result: ") else {
        return (0, 0);
    };
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    (count(" passed"), count(" failed"))
}

/// Integration test targets that run on the host kernel too: every
/// `tests/tests/*.rs` except `vm_*.rs`.
pub fn host_test_targets() -> anyhow::Result<Vec<String>> {
    let dir = workspace_root().join("tests/tests");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".rs")
                .map(str::to_string)
        })
        .filter(|name| !name.starts_with("vm_"))
        .collect();
    targets.sort();
    Ok(targets)
}

#[cfg(test)]
mod tests {
    #[test]
    fn result_lines() {
        use super::parse_result_line as p;
        assert_eq!(
            p(
                "test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.67s"
            ),
            (4, 0)
        );
        assert_eq!(
            p("test result: FAILED. 3 passed; 1 failed; 0 ignored"),
            (3, 1)
        );
        assert_eq!(p("running 4 tests"), (0, 0));
    }
}
