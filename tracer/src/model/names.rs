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
