//! Writing output files as root without being turned against the machine:
//! a reader never sees half of a file, nothing is created through a
//! symbolic link someone else planted, and what we write stays ours (0600).
//!
//! Where an output path may point (`--json`, `--pcap`, `report -o`):
//! - `-`: standard output;
//! - nothing, or a regular file: a new file is written under a random name
//!   beside it (created exclusively, never through a link, mode 0600),
//!   synced, and renamed over the path; only a regular file is ever
//!   replaced;
//! - a character device or a FIFO of ours (`/dev/null`, a pipe), named
//!   directly or through a symbolic link that belongs to us (`/dev/stdout`):
//!   opened without creating anything and written through;
//! - anything else is refused: a directory, a socket, a block device, a
//!   symbolic link to a regular file (name the file itself), and any
//!   symbolic link or FIFO owned by another user (planted in a shared
//!   directory to make root overwrite a file or hand over the data).
//!
//! Errors do not repeat the path: the caller names the option and path.

use std::{
    fs::{File, Metadata, OpenOptions},
    io::Write as _,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

/// How an output path is written.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Stdout,
    /// A new file renamed over the path (nothing or a regular file there).
    Replace,
    /// A character device or FIFO, opened and written in place.
    WriteThrough(Identity),
}

/// What a checked device or FIFO was, to recognise it once opened: an
/// inode number alone may already name a new file (numbers are reused).
#[derive(Debug, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    /// Type and permissions.
    mode: u32,
    uid: u32,
    rdev: u64,
}

impl Identity {
    fn of(meta: &Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            mode: meta.mode(),
            uid: meta.uid(),
            rdev: meta.rdev(),
        }
    }
}

/// Whether `path` names standard output (`-`).
pub fn is_stdout(path: &Path) -> bool {
    path.as_os_str() == "-"
}

/// Checks, before a run starts, that `path` can take an output: the error
/// is the one line the user sees, so that a bad path fails at once rather
/// than after the whole watch.
pub fn check_output(path: &Path) -> anyhow::Result<()> {
    if target(path)? == Target::Replace {
        let dir = directory(path)?;
        std::fs::metadata(&dir).with_context(|| format!("directory {}", dir.display()))?;
        // The only sure test that the directory takes a new file (a
        // read-only mount, no permission) is to create one.
        tempfile::Builder::new()
            .prefix(".xfrm-trace-check")
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create files in {}", dir.display()))?;
    }
    Ok(())
}

/// Writes `data` to the output `path` (see the module's rules).
pub fn write_output(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    match target(path)? {
        Target::Stdout => {
            let mut out = std::io::stdout().lock();
            out.write_all(data).and_then(|()| out.flush())?;
            Ok(())
        }
        Target::Replace => write_atomically(path, data),
        Target::WriteThrough(checked) => write_through(path, &checked, data),
    }
}

/// Creates `path` anew (never through a link, never over a file) with
/// `data`, mode 0600.
pub fn create_new(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(data)?;
    Ok(())
}

/// Checks, before a run starts, that `create_new(path)` can work.
pub fn check_new(path: &Path) -> anyhow::Result<()> {
    if path.symlink_metadata().is_ok() {
        bail!("already exists (it is created anew: remove it first)");
    }
    check_output(path)
}

fn target(path: &Path) -> anyhow::Result<Target> {
    if is_stdout(path) {
        return Ok(Target::Stdout);
    }
    let meta = match path.symlink_metadata() {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Target::Replace),
        Err(e) => return Err(e.into()),
    };
    if meta.is_file() {
        return Ok(Target::Replace);
    }
    let ours = nix::unistd::geteuid().as_raw();
    // Another user's FIFO in a shared directory would hand them the data.
    if meta.file_type().is_fifo() && meta.uid() != ours {
        bail!("a FIFO owned by uid {}: not writing into it", meta.uid());
    }
    if is_device_or_fifo(&meta) {
        return Ok(Target::WriteThrough(Identity::of(&meta)));
    }
    if !meta.is_symlink() {
        bail!("{}, not a file", describe(&meta));
    }
    if meta.uid() != ours {
        bail!(
            "a symbolic link owned by uid {}: not following it",
            meta.uid()
        );
    }
    let pointed = path.metadata()?;
    if is_device_or_fifo(&pointed) {
        Ok(Target::WriteThrough(Identity::of(&pointed)))
    } else {
        bail!(
            "a symbolic link to {}: name the file itself",
            describe(&pointed)
        )
    }
}

fn is_device_or_fifo(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() || meta.file_type().is_fifo()
}

fn describe(meta: &Metadata) -> &'static str {
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_file() {
        "a regular file"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "an unknown kind of file"
    }
}

/// The directory `path` sits in (`.` for a bare name).
fn directory(path: &Path) -> anyhow::Result<PathBuf> {
    path.file_name().context("not a file name")?;
    Ok(match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    })
}

/// Writes a new file under a random name beside `path` (exclusively, mode
/// 0600), syncs it and renames it over `path`: a crash or a full disk
/// leaves the old file (or none) and no partial one.
fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let mut file = tempfile::Builder::new()
        .prefix(".xfrm-trace-")
        .tempfile_in(directory(path)?)?;
    file.write_all(data)
        .and_then(|()| file.as_file().sync_all())?;
    // Checked again right before the rename, which replaces whatever stands
    // at the path: something other than a regular file may have appeared.
    if target(path)? != Target::Replace {
        bail!("changed while it was being written");
    }
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Writes into the character device or FIFO `checked` that `path` names,
/// creating nothing.
fn write_through(path: &Path, checked: &Identity, data: &[u8]) -> anyhow::Result<()> {
    let mut file: File = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)?;
    // Nothing is written unless what was opened is what was checked: the
    // path may have been swapped since (no O_TRUNC, so nothing changed yet).
    if Identity::of(&file.metadata()?) != *checked {
        bail!("changed while it was being written");
    }
    file.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("xfrm-trace-fsutil-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_whole_files_0600_and_leaves_nothing_on_error() {
        let dir = scratch("replace");
        let path = dir.join("r.json");
        write_output(&path, b"one").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_output(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = path.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_output(&dir.join("missing/r.json"), b"x").is_err());
        assert!(check_output(&dir.join("missing/r.json")).is_err());
        assert_eq!(names(&dir), ["r.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_directories_and_links_to_files() {
        let dir = scratch("refuse");
        let error = check_output(&dir).unwrap_err().to_string();
        assert_eq!(error, "a directory, not a file");
        let file = dir.join("file");
        std::fs::write(&file, b"keep").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let error = write_output(&link, b"x").unwrap_err().to_string();
        assert_eq!(
            error,
            "a symbolic link to a regular file: name the file itself"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        assert!(link.symlink_metadata().unwrap().is_symlink());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn create_new_refuses_what_exists_even_a_dangling_link() {
        let dir = scratch("new");
        let path = dir.join("ready");
        check_new(&path).unwrap();
        create_new(&path, b"attached\n").unwrap();
        let mode = path.metadata().unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(check_new(&path).is_err());
        assert!(create_new(&path, b"again").is_err());
        let link = dir.join("dangling");
        std::os::unix::fs::symlink(dir.join("target"), &link).unwrap();
        assert!(check_new(&link).is_err());
        assert!(create_new(&link, b"x").is_err());
        assert_eq!(names(&dir), ["dangling", "ready"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_nothing_into_what_replaced_a_checked_fifo() {
        let dir = scratch("swapped");
        let path = dir.join("out");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let Target::WriteThrough(checked) = target(&path).unwrap() else {
            panic!("a FIFO of ours is written through");
        };
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"keep").unwrap();
        let error = write_through(&path, &checked, b"x").unwrap_err();
        assert_eq!(error.to_string(), "changed while it was being written");
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_through_a_fifo() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        check_output(&fifo).unwrap();
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).unwrap())
        };
        write_output(&fifo, b"through").unwrap();
        assert_eq!(reader.join().unwrap(), b"through");
        assert!(fifo.symlink_metadata().unwrap().file_type().is_fifo());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
