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

pub mod exits;
mod history;

pub use history::{Deleted, History};

/// Where `ip netns add` keeps named namespaces.
const NAMED_NETNS_DIR: &str = "/run/netns";

/// PIDs listed per unnamed namespace (enough to enter it with `nsenter`).
const PIDS_KEPT: usize = 4;

/// One network namespace and a file that refers to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub inode: u64,
    /// `host` for the initial namespace (PID 1's), else its `ip netns`
    /// name, else `netns:<inode>`.
    pub label: String,
    pub path: PathBuf,
    /// Some processes that live in it (the first few, by PID).
    pub pids: Vec<u32>,
}

/// The prefix that runs a command in the namespace labelled `label`, e.g.
/// `ip netns exec west ` (empty for the host's).
pub fn enter_command(label: &str, pids: &[u32]) -> String {
    if label == "host" || label.is_empty() {
        String::new()
    } else if !label.starts_with("netns:") {
        format!("ip netns exec {label} ")
    } else if let Some(pid) = pids.first() {
        format!("nsenter -t {pid} -n ")
    } else {
        String::new()
    }
}

/// Every network namespace reachable by name or through a process, keyed by
/// inode: the initial one is `host` (whichever namespace we run in), a
/// named one is called by its `ip netns` name, the rest `netns:<inode>`.
pub fn all() -> BTreeMap<u64, Netns> {
    let inode_of = |path: &Path| std::fs::metadata(path).ok().map(|m| m.ino());
    let initial = initial_inode();
    let mut found: BTreeMap<u64, Netns> = BTreeMap::new();
    let label = |inode: u64, name: Option<String>| match name {
        _ if Some(inode) == initial => "host".to_string(),
        Some(name) => name,
        None => format!("netns:{inode}"),
    };
    let add = |found: &mut BTreeMap<u64, Netns>, inode, path, name| {
        found.entry(inode).or_insert_with(|| Netns {
            inode,
            label: label(inode, name),
            path,
            pids: Vec::new(),
        });
    };
    if let Ok(dir) = std::fs::read_dir(NAMED_NETNS_DIR) {
        for entry in dir.flatten() {
            if let Some(inode) = inode_of(&entry.path()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                add(&mut found, inode, entry.path(), Some(name));
            }
        }
    }
    let own = PathBuf::from("/proc/self/ns/net");
    if let Some(inode) = inode_of(&own) {
        add(&mut found, inode, own, None);
    }
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    for pid in pids {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if let Some(inode) = inode_of(&path) {
            add(&mut found, inode, path, None);
            let pids = &mut found.get_mut(&inode).expect("just added").pids;
            if pids.len() < PIDS_KEPT {
                pids.push(pid);
            }
        }
    }
    found
}

/// Every namespace seen during a run, kept after it is deleted so that
/// what happened there is still reported under its name.
#[derive(Debug, Default)]
pub struct Seen {
    by_inode: BTreeMap<u64, SeenNetns>,
}

#[derive(Debug)]
pub struct SeenNetns {
    pub netns: Netns,
    /// Interface names by index, as of the last look.
    pub interfaces: BTreeMap<u32, String>,
    /// Gone at the last look.
    pub deleted: bool,
}

impl Seen {
    /// Takes in the namespaces reachable now: new ones with their
    /// interfaces (every one's when `refresh`), vanished ones as deleted.
    pub fn update(&mut self, reachable: &BTreeMap<u64, Netns>, refresh: bool) {
        for (inode, seen) in &mut self.by_inode {
            seen.deleted = !reachable.contains_key(inode);
        }
        for (inode, ns) in reachable {
            // The kernel reuses a deleted namespace's inode: a new name is
            // a new namespace.
            let known = self
                .by_inode
                .get(inode)
                .is_some_and(|seen| seen.netns.label == ns.label);
            if known && !refresh {
                continue;
            }
            // A namespace may vanish between the listing and this read:
            // keep the names read before.
            let interfaces = interface_names(&ns.path).ok();
            match self.by_inode.get_mut(inode).filter(|_| known) {
                Some(seen) => {
                    seen.netns = ns.clone();
                    if let Some(interfaces) = interfaces {
                        seen.interfaces = interfaces;
                    }
                }
                None => {
                    self.by_inode.insert(
                        *inode,
                        SeenNetns {
                            netns: ns.clone(),
                            interfaces: interfaces.unwrap_or_default(),
                            deleted: false,
                        },
                    );
                }
            }
        }
    }

    pub fn get(&self, inode: u64) -> Option<&SeenNetns> {
        self.by_inode.get(&inode)
    }

    pub fn iter(&self) -> impl Iterator<Item = &SeenNetns> {
        self.by_inode.values()
    }
}

/// The XFRM counters of `ns`, if it is still there and has them.
pub fn read_counters(ns: &Netns) -> Option<crate::xfrm_stat::XfrmStat> {
    let text = read_proc_net(&ns.path, "xfrm_stat").ok()?;
    crate::xfrm_stat::XfrmStat::parse(&text).ok()
}

/// The initial namespace's inode: PID 1's, or ours where PID 1's cannot be
/// read (a sandbox that hides it from us).
pub fn initial_inode() -> Option<u64> {
    ["/proc/1/ns/net", "/proc/self/ns/net"]
        .iter()
        .find_map(|path| Some(std::fs::metadata(path).ok()?.ino()))
}

/// Fails unless each of `wanted` is the label (`host`, an `ip netns`
/// name, `netns:<inode>`) or inode number of one of `existing`; the error
/// names those that exist.
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
        .partition(|ns| !ns.label.starts_with("netns:"));
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
    fn commands_enter_a_namespace_by_its_name_or_one_of_its_processes() {
        assert_eq!(enter_command("host", &[1]), "");
        assert_eq!(enter_command("gwa", &[]), "ip netns exec gwa ");
        assert_eq!(
            enter_command("netns:4026532301", &[812, 950]),
            "nsenter -t 812 -n "
        );
        assert_eq!(enter_command("netns:4026532301", &[]), "");
    }

    #[test]
    fn the_initial_namespace_is_host_and_ours_is_listed() {
        let all = all();
        let initial = initial_inode().unwrap();
        assert_eq!(all[&initial].label, "host");
        assert!(all.contains_key(&own_inode().unwrap()));
    }

    #[test]
    fn named_namespaces_are_checked_against_those_that_exist() {
        let ns = |inode, label: &str| {
            (
                inode,
                Netns {
                    inode,
                    label: label.into(),
                    path: PathBuf::new(),
                    pids: Vec::new(),
                },
            )
        };
        let existing = BTreeMap::from([ns(1, "host"), ns(2, "west"), ns(3, "netns:3")]);
        let wanted = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            check_named(&names, &existing).map_err(|e| e.to_string())
        };
        assert!(wanted(&["host", "west", "netns:3", "3"]).is_ok());
        assert_eq!(
            wanted(&["west", "east"]),
            Err("no network namespace \"east\"; there are: host, west, 3".into())
        );
        assert!(wanted(&["4"]).is_err());
    }
}
