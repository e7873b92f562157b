//! Where each integration test runs, as the test itself says it:
//!
//! ```text
//! /// Runs on: 6.1 (the forced-kprobe variant: that path is the same on every kernel)
//! #[test]
//! fn kprobe_in_no_states_names_the_missing_sa() {
//! ```
//!
//! A test without that line runs wherever its file runs: the host (files
//! not named `vm_*`) and every kernel of the matrix. A test with it runs
//! only on the targets it lists (`host` and the matrix's kernel names), so
//! that what behaves the same on every kernel costs CI one VM, not four.

use std::path::Path;

use anyhow::{Context as _, bail};

/// What the line starts with.
const MARKER: &str = "/// Runs on:";

/// The targets a test may name.
pub const HOST: &str = "host";

/// One test that runs on some targets only.
#[derive(Debug, PartialEq, Eq)]
pub struct Placement {
    pub test: String,
    pub targets: Vec<String>,
    /// Why there only (the parenthesis after the targets).
    pub why: String,
}

/// Every placement in the test sources under `dir` (`tests/tests`).
pub fn read(dir: &Path, known: &[&str]) -> anyhow::Result<Vec<Placement>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    let mut placements = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        placements.extend(parse(&text, known).with_context(|| file.display().to_string())?);
    }
    Ok(placements)
}

/// The placements in one test file's text.
pub fn parse(text: &str, known: &[&str]) -> anyhow::Result<Vec<Placement>> {
    let mut placements = Vec::new();
    let mut pending: Option<(usize, Vec<String>, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix(MARKER) {
            if pending.is_some() {
                bail!("line {}: two placements for one test", index + 1);
            }
            let (targets, why) = rest
                .split_once('(')
                .map_or((rest, ""), |(t, w)| (t, w.trim_end_matches(')')));
            let targets: Vec<String> = targets
                .split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect();
            if targets.is_empty() {
                bail!("line {}: `{MARKER}` names no target", index + 1);
            }
            if let Some(unknown) = targets.iter().find(|t| !known.contains(&t.as_str())) {
                bail!(
                    "line {}: unknown target {unknown} (known: {})",
                    index + 1,
                    known.join(", ")
                );
            }
            pending = Some((index, targets, why.trim().to_string()));
        } else if let Some((_, targets, why)) = pending.take_if(|_| line.starts_with("fn ")) {
            let test = line["fn ".len()..]
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .next()
                .unwrap_or_default()
                .to_string();
            placements.push(Placement { test, targets, why });
        } else if pending.is_some()
            && !(line.starts_with("///") || line.starts_with("#[") || line.is_empty())
        {
            let (at, ..) = pending.take().unwrap_or_default();
            bail!("line {}: `{MARKER}` is not followed by a test", at + 1);
        }
    }
    if let Some((at, ..)) = pending {
        bail!("line {}: `{MARKER}` is not followed by a test", at + 1);
    }
    Ok(placements)
}

/// The tests that do not run on `target` (libtest `--skip` patterns: each
/// is a whole test name, and `read`'s caller checks that none is part of
/// another test's name).
pub fn skipped_on(placements: &[Placement], target: &str) -> Vec<String> {
    placements
        .iter()
        .filter(|p| !p.targets.iter().any(|t| t == target))
        .map(|p| p.test.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["host", "6.1", "6.12"];

    #[test]
    fn a_marker_places_the_next_test() {
        let text = "\
/// Runs on: 6.1 (forced kprobes: same path everywhere)
#[test]
fn kprobe_variant() {}

/// Not placed: runs everywhere.
#[test]
fn everywhere() {}

/// What it checks.
/// Runs on: host, 6.12 (userspace)
#[test]
#[ignore]
fn two_targets() {}
";
        let placements = parse(text, KNOWN).unwrap();
        assert_eq!(
            placements,
            vec![
                Placement {
                    test: "kprobe_variant".into(),
                    targets: vec!["6.1".into()],
                    why: "forced kprobes: same path everywhere".into(),
                },
                Placement {
                    test: "two_targets".into(),
                    targets: vec!["host".into(), "6.12".into()],
                    why: "userspace".into(),
                },
            ]
        );
        assert_eq!(skipped_on(&placements, "6.1"), vec!["two_targets"]);
        assert_eq!(skipped_on(&placements, "host"), vec!["kprobe_variant"]);
        assert!(skipped_on(&placements, "6.12") == vec!["kprobe_variant"]);
    }

    #[test]
    fn mistakes_are_errors_with_their_line() {
        let unknown = parse("/// Runs on: 4.19 (old)\n#[test]\nfn t() {}\n", KNOWN);
        assert!(
            format!("{:#}", unknown.unwrap_err()).contains("line 1: unknown target 4.19"),
            "unknown target"
        );
        let dangling = parse("/// Runs on: 6.1\nconst X: u8 = 1;\n", KNOWN);
        assert!(
            format!("{:#}", dangling.unwrap_err()).contains("not followed by a test"),
            "dangling marker"
        );
        let empty = parse("/// Runs on: (why)\nfn t() {}\n", KNOWN);
        assert!(format!("{:#}", empty.unwrap_err()).contains("names no target"));
    }

    /// The real tests: every marker parses, names known targets, and no
    /// placed test's name is part of another test's name (libtest's
    /// `--skip` matches substrings).
    #[test]
    fn the_integration_tests_are_placed_consistently() {
        let dir = crate::util::workspace_root().join("tests/tests");
        let placements = read(&dir, &crate::kernels::targets()).unwrap();
        assert!(!placements.is_empty());
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let lines: Vec<&str> = text.lines().map(str::trim).collect();
            for (i, line) in lines.iter().enumerate() {
                if *line == "#[test]"
                    && let Some(name) = lines[i + 1..].iter().find_map(|l| l.strip_prefix("fn "))
                {
                    names.push(name.split('(').next().unwrap().to_string());
                }
            }
        }
        for placed in &placements {
            let containing: Vec<&String> = names
                .iter()
                .filter(|n| *n != &placed.test && n.contains(&placed.test))
                .collect();
            assert!(
                containing.is_empty(),
                "--skip {} would also skip {containing:?}",
                placed.test
            );
            assert!(
                !placed.why.is_empty(),
                "{}: say why it runs there only",
                placed.test
            );
        }
    }
}
