//! Network namespaces: finding them all, and reading a file inside one.
//!
//! XFRM counters and drops are per netns; the kernel side identifies a netns
//! by its inode number (`net->ns.inum`), which is also the inode of its
//! `/proc/<pid>/ns/net` or `/run/netns/<name>` file.

use std::{
    collections::BTreeMap,
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::sched::{CloneFlags, setns};

/// Where `ip netns add` keeps named namespaces.
const NAMED_NETNS_DIR: &str = "/run/netns";

/// One network namespace and a file that refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    /// `ip netns` name, `host` for the tool's own, else `pid N`.
    pub label: String,
    pub path: PathBuf,
}

/// Every network namespace reachable by name or through a process, keyed by
/// inode. Ours comes first as `host`.
pub fn all() -> BTreeMap<u64, Netns> {
    let mut found = BTreeMap::new();
    let mut add = |path: PathBuf, label: String| {
        if let Ok(meta) = std::fs::metadata(&path) {
            found.entry(meta.ino()).or_insert(Netns {
                inode: meta.ino(),
                label,
                path,
            });
        }
    };
    add(PathBuf::from("/proc/self/ns/net"), "host".into());
    if let Ok(dir) = std::fs::read_dir(NAMED_NETNS_DIR) {
        for entry in dir.flatten() {
            add(
                entry.path(),
                entry.file_name().to_string_lossy().into_owned(),
            );
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.bytes().all(|b| b.is_ascii_digit()) {
                add(entry.path().join("ns/net"), format!("pid {name}"));
            }
        }
    }
    found
}

/// Fails unless each of `wanted` is the label (`host`, an `ip netns`
/// name, `pid N`) or inode number of one of `existing`; the error names
/// those that exist.
pub fn check_named(wanted: &[String], existing: &BTreeMap<u64, Netns>) -> anyhow::Result<()> {
    let exists = |w: &String| {
        existing
            .values()
            .any(|ns| &ns.label == w || w.parse() == Ok(ns.inode))
    };
    let Some(missing) = wanted.iter().find(|w| !exists(w)) else {
        return Ok(());
    };
    // Names first; namespaces known only through a process by inode.
    let (named, unnamed): (Vec<&Netns>, Vec<&Netns>) = existing
        .values()
        .partition(|ns| !ns.label.starts_with("pid "));
    let mut list: Vec<String> = named.iter().map(|ns| ns.label.clone()).collect();
    list.extend(unnamed.iter().map(|ns| ns.inode.to_string()));
    anyhow::bail!(
        "no network namespace {missing:?}; there are: {}",
        list.join(", ")
    )
}

/// The inode of our own network namespace.
pub fn own_inode() -> std::io::Result<u64> {
    Ok(std::fs::metadata("/proc/self/ns/net")?.ino())
}

/// Runs `f` on a short-lived thread inside the netns at `ns_path`: `setns`
/// changes only the calling thread and must not move the rest of the tool.
pub fn run_in<T, F>(ns_path: &Path, f: F) -> std::io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> std::io::Result<T> + Send + 'static,
{
    let ns_path = ns_path.to_path_buf();
    std::thread::spawn(move || {
        let ns = File::open(&ns_path)?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
        f()
    })
    .join()
    .map_err(|_| std::io::Error::other("netns thread panicked"))?
}

/// Reads `/proc/net/<file>` as seen from inside the netns at `ns_path`.
pub fn read_proc_net(ns_path: &Path, file: &str) -> std::io::Result<String> {
    let path = Path::new("/proc/thread-self/net").join(file);
    run_in(ns_path, move || std::fs::read_to_string(path))
}

/// Interface names by index inside the netns at `ns_path`.
pub fn interface_names(ns_path: &Path) -> std::io::Result<BTreeMap<u32, String>> {
    run_in(ns_path, || {
        let names = nix::net::if_::if_nameindex().map_err(std::io::Error::from)?;
        Ok(names
            .iter()
            .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_namespaces_are_checked_against_those_that_exist() {
        let ns = |inode, label: &str| {
            (
                inode,
                Netns {
                    inode,
                    label: label.into(),
                    path: PathBuf::new(),
                },
            )
        };
        let existing = BTreeMap::from([ns(1, "host"), ns(2, "west"), ns(3, "pid 42")]);
        let wanted = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            check_named(&names, &existing).map_err(|e| e.to_string())
        };
        assert!(wanted(&["host", "west", "pid 42", "3"]).is_ok());
        assert_eq!(
            wanted(&["west", "east"]),
            Err("no network namespace \"east\"; there are: host, west, 3".into())
        );
        assert!(wanted(&["4"]).is_err());
    }
}
