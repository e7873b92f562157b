//! What the report calls a network namespace and its interfaces.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
pub struct NetnsInfo {
    pub inode: u64,
    /// `host` (the initial namespace), the `ip netns` name, or `netns:<inode>`.
    pub label: String,
    /// Some processes that live in it (to enter an unnamed one).
    pub pids: Vec<u32>,
    /// Deleted during the run: reported under the name it had.
    pub deleted: bool,
    /// Interface names by index, for reading `drops[].ifindex`.
    pub interfaces: BTreeMap<u32, String>,
}

/// Namespace labels and interface names for the rows of one report,
/// resolved from its namespace list: every capability names its rows
/// through this when it builds them.
#[derive(Clone, Copy)]
pub struct Names<'a> {
    netns: &'a [NetnsInfo],
}

impl NetnsInfo {
    /// A namespace with these interfaces (for tests of the rows named from
    /// it).
    pub fn with_interfaces(inode: u64, label: &str, interfaces: &[(u32, &str)]) -> Self {
        Self {
            inode,
            label: label.into(),
            pids: Vec::new(),
            deleted: false,
            interfaces: interfaces
                .iter()
                .map(|(index, name)| (*index, (*name).to_string()))
                .collect(),
        }
    }
}

impl<'a> Names<'a> {
    pub fn new(netns: &'a [NetnsInfo]) -> Self {
        Self { netns }
    }

    /// By inode: the namespace alive at the end, else the first deleted
    /// (the kernel may reuse an inode for a later namespace).
    pub fn netns(&self, inode: u64) -> Option<&'a NetnsInfo> {
        let mut candidates = self.netns.iter().filter(|n| n.inode == inode);
        candidates
            .clone()
            .find(|n| !n.deleted)
            .or_else(|| candidates.next())
    }

    /// `host`, the `ip netns` name, or `netns:<inode>` when unknown.
    pub fn label(&self, inode: u64) -> String {
        self.netns(inode)
            .map_or_else(|| format!("netns:{inode}"), |n| n.label.clone())
    }

    /// The interface's name in that namespace, `if<N>` when unknown, `-`
    /// for none (index 0).
    pub fn ifname(&self, inode: u64, ifindex: u32) -> String {
        match self.netns(inode).and_then(|n| n.interfaces.get(&ifindex)) {
            Some(name) => name.clone(),
            None if ifindex == 0 => "-".into(),
            None => format!("if{ifindex}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns(inode: u64, label: &str, deleted: bool, interfaces: &[(u32, &str)]) -> NetnsInfo {
        NetnsInfo {
            deleted,
            ..NetnsInfo::with_interfaces(inode, label, interfaces)
        }
    }

    #[test]
    fn a_reused_inode_names_the_living_namespace_and_unknowns_say_so() {
        let list = [
            netns(7, "old", true, &[(2, "eth0")]),
            netns(7, "new", false, &[(2, "wan0")]),
            netns(9, "gone", true, &[]),
        ];
        let names = Names::new(&list);
        assert_eq!(names.label(7), "new");
        assert_eq!(names.ifname(7, 2), "wan0");
        assert_eq!(names.label(9), "gone");
        assert_eq!(names.label(11), "netns:11");
        assert_eq!(names.ifname(9, 3), "if3");
        assert_eq!(names.ifname(11, 0), "-");
    }
}
