//! Where the output options (`--json`, `--pcap`, `report -o`,
//! `--ready-file`) may write, run as root: links planted by an unprivileged
//! user in shared directories, device nodes and FIFOs, file modes, paths
//! that cannot be written, and `-` for stdout. Userspace only: each test
//! runs on the host only.
//!
//! Device nodes are made with mknod in a scratch directory, never in /dev.

use std::{
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use serde_json::Value;
use tests::{binary, require_root, scratch, sh};

/// The uid and gid of `nobody`, the unprivileged user of these tests.
const NOBODY: u32 = 65534;

/// A fresh directory that `nobody` can enter.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = scratch(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    set_mode(&dir, 0o755);
    dir
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    path.metadata().unwrap().permissions().mode() & 0o7777
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs xfrm-trace with `args`, then `--duration 1s --quiet`.
fn run(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .args(["--duration", "1s", "--quiet"])
        .output()
        .expect("run xfrm-trace")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a command as `nobody`.
fn as_nobody(command: &[&str]) {
    let mut args = vec![
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    args.extend(command);
    sh(&args);
}

/// `ln -s target link` as `nobody`.
fn plant_link(target: &Path, link: &Path) {
    as_nobody(&["ln", "-s", text(target), text(link)]);
}

/// A directory like /tmp (sticky, world-writable) and one writable through
/// a group `nobody` is in, both under `root`.
fn shared_directories(root: &Path) -> [PathBuf; 2] {
    let sticky = root.join("sticky");
    let group = root.join("group");
    for dir in [&sticky, &group] {
        std::fs::create_dir(dir).unwrap();
    }
    set_mode(&sticky, 0o1777);
    std::os::unix::fs::chown(&group, Some(0), Some(NOBODY)).unwrap();
    set_mode(&group, 0o770);
    [sticky, group]
}

fn is_char_device(path: &Path, major: u64, minor: u64) -> bool {
    let meta = path.symlink_metadata().unwrap();
    meta.file_type().is_char_device() && meta.rdev() == makedev(major, minor)
}

/// A link planted at the output path by another user is refused before
/// the run starts; its target (a root-owned file) is untouched and the
/// link stays. So is a FIFO of theirs.
/// Runs on: host (where output files may be written: userspace only)
#[test]
fn outputs_planted_symlink_in_a_shared_directory_is_not_followed() {
    require_root();
    let root = scratch_dir("outputs-planted");
    let victim = root.join("victim");
    std::fs::write(&victim, "root's file\n").unwrap();
    for dir in shared_directories(&root) {
        for (option, name) in [
            ("--json", "out.json"),
            ("--pcap", "out.pcapng"),
            ("report -o", "out.tar.gz"),
            ("--ready-file", "ready"),
        ] {
            let link = dir.join(name);
            plant_link(&victim, &link);
            let mut args: Vec<&str> = option.split(' ').collect();
            args.push(text(&link));
            let out = run(&args);
            let why = if option == "--ready-file" {
                "already exists (it is created anew: remove it first)"
            } else {
                "a symbolic link owned by uid 65534: not following it"
            };
            assert_eq!(
                stderr(&out),
                format!("xfrm-trace: error: {option} {}: {why}\n", link.display())
            );
            assert_eq!(out.status.code(), Some(1));
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file\n");
            assert!(link.symlink_metadata().unwrap().is_symlink(), "{option}");
        }
        // A FIFO of theirs would hand them the report.
        let fifo = dir.join("fifo.json");
        as_nobody(&["mkfifo", text(&fifo)]);
        let out = run(&["--json", text(&fifo)]);
        assert_eq!(
            stderr(&out),
            format!(
                "xfrm-trace: error: --json {}: a FIFO owned by uid 65534: not writing into it\n",
                fifo.display()
            )
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(fifo.symlink_metadata().unwrap().file_type().is_fifo());
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// The temporary file beside the output has a name nobody can guess: a
/// link planted where the old predictable name (`.NAME.tmp-PID`) would be
/// is not written through, and the output is a new 0600 file.
/// Runs on: host (where output files may be written: userspace only)
#[test]
fn outputs_temporary_file_cannot_be_planted() {
    require_root();
    let root = scratch_dir("outputs-tmp");
    let victim = root.join("victim");
    std::fs::write(&victim, "root's file\n").unwrap();
    for dir in shared_directories(&root) {
        let json = dir.join("out.json");
        let child = Command::new(binary())
            .args(["--json", text(&json), "--duration", "2s", "--quiet"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run xfrm-trace");
        // The run writes at its end, well after this.
        plant_link(&victim, &dir.join(format!(".out.json.tmp-{}", child.id())));
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file\n");
        let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(report["schema"], "xfrm-trace/1");
        assert!(json.symlink_metadata().unwrap().is_file());
        assert_eq!(mode(&json), 0o600);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

/// A character device or FIFO given as an output is written through and
/// stays what it is; a full device fails the run (exit 1, one line naming
/// it) after the report is printed and the other outputs are written.
/// Runs on: host (where output files may be written: userspace only)
#[test]
fn outputs_device_nodes_and_fifos_are_written_through() {
    require_root();
    let dir = scratch_dir("outputs-devices");
    let (null, full, fifo) = (dir.join("null"), dir.join("full"), dir.join("fifo"));
    let device = SFlag::S_IFCHR;
    mknod(
        &null,
        device,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    mknod(
        &full,
        device,
        Mode::from_bits_truncate(0o666),
        makedev(1, 7),
    )
    .unwrap();
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();

    let pcap = dir.join("a.pcapng");
    let out = run(&["--json", text(&null), "--pcap", text(&pcap)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Diagnosis:"));
    assert!(is_char_device(&null, 1, 3));
    assert_eq!(
        &std::fs::read(&pcap).unwrap()[..4],
        [0x0a, 0x0d, 0x0d, 0x0a]
    );

    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let out = run(&["--json", text(&fifo)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&reader.join().unwrap()).unwrap();
    assert_eq!(report["schema"], "xfrm-trace/1");
    assert!(fifo.symlink_metadata().unwrap().file_type().is_fifo());

    for option in ["--json", "report -o"] {
        let pcap = dir.join("b.pcapng");
        let _ = std::fs::remove_file(&pcap);
        let mut args: Vec<&str> = option.split(' ').collect();
        args.extend([text(&full), "--pcap", text(&pcap)]);
        let out = run(&args);
        assert_eq!(out.status.code(), Some(1), "{option}: {}", stderr(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Diagnosis:"),
            "{option}: the report is printed"
        );
        let stderr = stderr(&out);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{option}: {stderr}");
        assert!(
            lines[0].ends_with(&format!("sampled packets written to {}", pcap.display())),
            "{option}: {stderr}"
        );
        assert_eq!(
            lines[1],
            format!(
                "xfrm-trace: error: writing {option} {}: No space left on device (os error 28)",
                full.display()
            )
        );
        assert_eq!(
            &std::fs::read(&pcap).unwrap()[..4],
            [0x0a, 0x0d, 0x0d, 0x0a]
        );
        assert!(is_char_device(&full, 1, 7), "{option}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Reports, pcaps, bundles and ready files are created 0600 (an existing
/// 0644 report is replaced by a 0600 one); nothing else is left behind;
/// a directory is refused.
/// Runs on: host (where output files may be written: userspace only)
#[test]
fn outputs_files_are_created_0600() {
    require_root();
    let dir = scratch_dir("outputs-modes");
    let (json, pcap, bundle, ready) = (
        dir.join("r.json"),
        dir.join("p.pcapng"),
        dir.join("b.tar.gz"),
        dir.join("ready"),
    );
    std::fs::write(&json, "old").unwrap();
    set_mode(&json, 0o644);
    let out = run(&[
        "--json",
        text(&json),
        "--pcap",
        text(&pcap),
        "--ready-file",
        text(&ready),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&["report", "-o", text(&bundle)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for file in [&json, &pcap, &bundle, &ready] {
        assert_eq!(mode(file), 0o600, "{}", file.display());
        assert_eq!(file.metadata().unwrap().uid(), 0);
    }
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["schema"], "xfrm-trace/1");
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["b.tar.gz", "p.pcapng", "r.json", "ready"]);

    let out = run(&["--json", text(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "xfrm-trace: error: --json {}: a directory, not a file\n",
            dir.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An output that cannot be written fails at once with one line, before
/// the run starts: no debug line of the start (BTF, kallsyms, attaching)
/// appears even with -vv, and a 30 s run ends in well under a second.
/// Runs on: host (where output files may be written: userspace only)
#[test]
fn outputs_unwritable_path_fails_before_attaching() {
    require_root();
    let dir = scratch_dir("outputs-early");
    let missing = dir.join("missing");
    let not_a_dir = dir.join("file");
    std::fs::write(&not_a_dir, "").unwrap();
    let ready = dir.join("ready");
    std::fs::write(&ready, "").unwrap();
    let cases = [
        ("--json", missing.join("r.json"), missing_why(&missing)),
        ("--pcap", missing.join("p.pcapng"), missing_why(&missing)),
        ("report -o", missing.join("b.tar.gz"), missing_why(&missing)),
        ("--ready-file", missing.join("ready"), missing_why(&missing)),
        (
            "--json",
            not_a_dir.join("r.json"),
            "Not a directory (os error 20)".to_string(),
        ),
        (
            "--ready-file",
            ready.clone(),
            "already exists (it is created anew: remove it first)".to_string(),
        ),
    ];
    for (option, path, why) in cases {
        let mut args: Vec<&str> = option.split(' ').collect();
        args.extend([text(&path), "-vv", "--duration", "30s"]);
        let started = Instant::now();
        let out = Command::new(binary()).args(&args).output().unwrap();
        let elapsed = started.elapsed();
        assert_eq!(
            stderr(&out),
            format!("xfrm-trace: error: {option} {}: {why}\n", path.display())
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(
            elapsed < Duration::from_millis(500),
            "{option}: {elapsed:?}"
        );
    }
    assert!(!missing.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn missing_why(missing: &Path) -> String {
    format!(
        "directory {}: No such file or directory (os error 2)",
        missing.display()
    )
}

/// `-` is stdout for every output (the report then goes to stderr); two
/// outputs on stdout are bad usage.
/// Runs on: host (where output files may be written: userspace only)
#[test]
fn outputs_dash_is_stdout_for_every_output() {
    require_root();
    let dir = scratch_dir("outputs-dash");
    let in_dir = |args: &[&str]| {
        Command::new(binary())
            .current_dir(&dir)
            .args(args)
            .args(["--duration", "1s", "--quiet"])
            .output()
            .unwrap()
    };
    let out = in_dir(&["--pcap", "-"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(&out.stdout[..4], [0x0a, 0x0d, 0x0d, 0x0a]);
    assert!(stderr(&out).contains("Diagnosis:"));

    let out = in_dir(&["report", "-o", "-"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stderr(&out).contains("Diagnosis:"));
    let mut tar = Command::new("tar")
        .args(["-tzf", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut tar.stdin.take().unwrap(), &out.stdout).unwrap();
    let mut listing = String::new();
    tar.stdout
        .take()
        .unwrap()
        .read_to_string(&mut listing)
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(
        listing.contains("xfrm-trace-evidence/report.json\n"),
        "{listing}"
    );

    let out = in_dir(&["--json", "-", "--pcap", "-"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("error: only one output can be - (stdout)\n"),
        "{}",
        stderr(&out)
    );
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "no file named -: {left:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A link of our own (like /dev/stdout) to a device is written through and
/// stays; one to a regular file is refused (name the file itself), the file
/// untouched.
/// Runs on: host (where output files may be written: userspace only)
#[test]
fn outputs_own_symlink_is_followed_only_to_a_device() {
    require_root();
    let dir = scratch_dir("outputs-own-link");
    let null = dir.join("null");
    mknod(
        &null,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .unwrap();
    let to_null = dir.join("to-null");
    std::os::unix::fs::symlink(&null, &to_null).unwrap();
    let out = run(&["--json", text(&to_null)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(to_null.symlink_metadata().unwrap().is_symlink());
    assert!(is_char_device(&null, 1, 3));

    let file = dir.join("file.json");
    std::fs::write(&file, "keep").unwrap();
    let to_file = dir.join("to-file");
    std::os::unix::fs::symlink(&file, &to_file).unwrap();
    let out = run(&["--json", text(&to_file)]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        format!(
            "xfrm-trace: error: --json {}: a symbolic link to a regular file: name the file itself\n",
            to_file.display()
        )
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    assert!(to_file.symlink_metadata().unwrap().is_symlink());
    std::fs::remove_dir_all(&dir).unwrap();
}
