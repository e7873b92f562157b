//! The namespaces of a run over time: each one seen (kept under its name
//! after it is gone), and those deleted during the run with their last
//! counters, so that what happened in them is still reported.

use std::collections::BTreeMap;

use tracer_common::netns::NetnsExit;

use super::{Netns, Seen};
use crate::{counters::Counters, netns::exits, xfrm_stat::XfrmStat};

/// A namespace deleted during the run.
#[derive(Clone, Debug)]
pub struct Deleted {
    pub netns: Netns,
    pub interfaces: BTreeMap<u32, String>,
    /// At its teardown, or, without the teardown hook, as last read.
    pub counters: XfrmStat,
}

#[derive(Debug, Default)]
pub struct History {
    pub seen: Seen,
    /// In the order they went (an inode may come back for a new namespace).
    pub deleted: Vec<Deleted>,
    /// Without the teardown hook: every namespace's counters as last read.
    last_read: Option<BTreeMap<u64, XfrmStat>>,
}

impl History {
    /// `poll_counters`: read every namespace's counters on each tick,
    /// for want of the teardown hook.
    pub fn new(poll_counters: bool) -> Self {
        Self {
            last_read: poll_counters.then(BTreeMap::new),
            ..Self::default()
        }
    }

    /// Once a second: the namespaces torn down since the last tick, and a
    /// new look at those reachable now (returned). `refresh_interfaces`
    /// re-reads every namespace's interface names.
    pub fn tick(
        &mut self,
        exits: Vec<NetnsExit>,
        names: &Counters,
        refresh_interfaces: bool,
    ) -> BTreeMap<u64, Netns> {
        for exit in exits {
            let inode = u64::from(exit.netns);
            self.push_deleted(inode, exits::final_counters(&exit, names));
        }
        let reachable = super::all();
        if let Some(last) = self.last_read.take() {
            for (inode, counters) in &last {
                if !reachable.contains_key(inode) {
                    self.push_deleted(*inode, counters.clone());
                }
            }
            self.last_read = Some(
                reachable
                    .values()
                    .filter_map(|ns| Some((ns.inode, super::read_counters(ns)?)))
                    .collect(),
            );
        }
        self.seen.update(&reachable, refresh_interfaces);
        reachable
    }

    fn push_deleted(&mut self, inode: u64, counters: XfrmStat) {
        let (netns, interfaces) = match self.seen.get(inode) {
            Some(seen) => (seen.netns.clone(), seen.interfaces.clone()),
            None => (
                Netns {
                    inode,
                    label: format!("netns:{inode}"),
                    path: Default::default(),
                    pids: Vec::new(),
                },
                BTreeMap::new(),
            ),
        };
        self.deleted.push(Deleted {
            netns,
            interfaces,
            counters,
        });
    }
}
