//! The SAs and policies of every netns over the whole run: dumped at the
//! start, dumped again whenever the kernel announces a change (rekey, new
//! or deleted SA or policy, expiry), and never forgotten, so a drop counted
//! before a rekey still names the SA it hit.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use super::{Policy, Sa, VpnInterface, XfrmState, netlink};

/// One netns: its SAs, policies and VPN interfaces as last seen, and the
/// SAs and policies gone since.
struct Namespace {
    path: PathBuf,
    notifications: Option<netlink::Socket>,
    sas: Vec<Sa>,
    policies: Vec<Policy>,
    interfaces: Vec<VpnInterface>,
    gone_sas: Vec<Sa>,
    gone_policies: Vec<Policy>,
    /// Each SA's counters at the first dump.
    first_counts: Option<BTreeMap<SaId, (u64, u64)>>,
}

/// An SA by (SPI, destination, protocol); its counters as (packets, bytes).
type SaId = (u32, IpAddr, u8);

#[derive(Default)]
pub struct XfrmBook {
    namespaces: BTreeMap<u64, Namespace>,
    /// Dumps done after the first one (for the report and tests).
    pub refreshes: u64,
}

impl XfrmBook {
    /// Starts watching the netns (`inode` at `path`): dumps it and joins
    /// its notification groups. A netns without any SA or policy is still
    /// watched: a tunnel may come up during the run.
    pub fn watch(&mut self, inode: u64, path: &Path) {
        if self
            .namespaces
            .get(&inode)
            .is_some_and(|ns| ns.notifications.is_some())
        {
            return;
        }
        let notifications = crate::netns::run_in(path, netlink::Socket::subscribe)
            .map_err(|e| log::debug!("XFRM notifications in {}: {e}", path.display()))
            .ok();
        // A netns let go of (below) and reachable again keeps what was seen.
        let ns = self.namespaces.entry(inode).or_insert_with(|| Namespace {
            path: path.to_path_buf(),
            notifications: None,
            sas: Vec::new(),
            policies: Vec::new(),
            interfaces: Vec::new(),
            gone_sas: Vec::new(),
            gone_policies: Vec::new(),
            first_counts: None,
        });
        ns.path = path.to_path_buf();
        ns.notifications = notifications;
        ns.refresh();
    }

    /// Closes the notification socket of each netns not in `reachable`
    /// (deleted, or its last process gone): the socket holds a reference
    /// that would keep the netns, its interfaces and SAs alive until the
    /// run ends. What was seen there stays in the book.
    pub fn release_unreachable(&mut self, reachable: &BTreeSet<u64>) {
        for (inode, ns) in &mut self.namespaces {
            if !reachable.contains(inode) {
                ns.notifications = None;
            }
        }
    }

    /// Dumps again each netns the kernel announced a change in.
    pub fn poll(&mut self) {
        for ns in self.namespaces.values_mut() {
            if ns
                .notifications
                .as_ref()
                .is_some_and(netlink::Socket::changed)
            {
                ns.refresh();
                self.refreshes += 1;
            }
        }
    }

    /// Dumps every netns that can still be reached again: an SA's packet
    /// and byte counters move without a notification (at the end of a run).
    pub fn refresh_counters(&mut self) {
        for ns in self.namespaces.values_mut() {
            if ns.notifications.is_some() {
                ns.refresh();
            }
        }
    }

    /// Each SA of the netns as last dumped, with the packets and bytes it
    /// carried since the netns was first dumped (an SA added since counts
    /// from zero).
    pub fn carried(&self, netns: u64) -> Vec<(&Sa, u64, u64)> {
        let Some(ns) = self.namespaces.get(&netns) else {
            return Vec::new();
        };
        ns.sas
            .iter()
            .map(|sa| {
                let (packets, bytes) = ns
                    .first_counts
                    .as_ref()
                    .and_then(|first| first.get(&(sa.spi, sa.dst, sa.proto)))
                    .copied()
                    .unwrap_or((0, 0));
                (
                    sa,
                    sa.packets.saturating_sub(packets),
                    sa.bytes.saturating_sub(bytes),
                )
            })
            .collect()
    }

    /// The SA with this SPI (host order) and destination in the netns,
    /// current or gone; `None` destination matches any.
    pub fn sa(&self, netns: u64, spi: u32, dst: Option<IpAddr>) -> Option<&Sa> {
        let ns = self.namespaces.get(&netns)?;
        ns.sas
            .iter()
            .chain(&ns.gone_sas)
            .find(|sa| sa.spi == spi && dst.is_none_or(|d| sa.dst == d))
    }

    /// The SA with this SPI and destination in any netns (ESP seen on a
    /// router belongs to the gateways at either end).
    pub fn sa_anywhere(&self, spi: u32, dst: IpAddr) -> Option<(u64, &Sa)> {
        self.namespaces
            .keys()
            .find_map(|inode| Some((*inode, self.sa(*inode, spi, Some(dst))?)))
    }

    /// The policy with this index in the netns, current or gone.
    pub fn policy(&self, netns: u64, index: u32) -> Option<&Policy> {
        let ns = self.namespaces.get(&netns)?;
        ns.policies
            .iter()
            .chain(&ns.gone_policies)
            .find(|p| p.index == index)
    }

    /// The policy the kernel would pick for `flow` in direction `dir`
    /// among the netns's current ones: the lowest priority value whose
    /// selector matches, the oldest (lowest index) among equals. Marks,
    /// interface ids and socket policies are not considered.
    pub fn policy_for(&self, netns: u64, dir: &str, flow: &super::FlowQuery) -> Option<&Policy> {
        let ns = self.namespaces.get(&netns)?;
        ns.policies
            .iter()
            .filter(|p| p.dir == dir && p.selector.matches(flow))
            .min_by_key(|p| (p.priority, p.index))
    }

    /// The current SAs, policies and VPN interfaces of the netns.
    pub fn current(&self, netns: u64) -> Option<XfrmState> {
        let ns = self.namespaces.get(&netns)?;
        Some(XfrmState {
            sas: ns.sas.clone(),
            policies: ns.policies.clone(),
            interfaces: ns.interfaces.clone(),
        })
    }
}

#[cfg(test)]
impl XfrmBook {
    /// A book that saw `state` in `netns` (for the tests of its readers).
    pub fn seen(netns: u64, state: XfrmState) -> Self {
        let ns = Namespace {
            path: PathBuf::new(),
            notifications: None,
            sas: state.sas,
            policies: state.policies,
            interfaces: state.interfaces,
            gone_sas: Vec::new(),
            gone_policies: Vec::new(),
            first_counts: None,
        };
        Self {
            namespaces: BTreeMap::from([(netns, ns)]),
            refreshes: 0,
        }
    }
}

impl Namespace {
    fn refresh(&mut self) {
        let state = match XfrmState::read_in(&self.path) {
            Ok(state) => state,
            Err(e) => {
                log::debug!("XFRM state of {}: {e}", self.path.display());
                return;
            }
        };
        let same_sa = |a: &Sa, b: &Sa| a.spi == b.spi && a.dst == b.dst && a.proto == b.proto;
        for old in std::mem::take(&mut self.sas) {
            if !state.sas.iter().any(|sa| same_sa(sa, &old)) {
                self.gone_sas.retain(|g| !same_sa(g, &old));
                self.gone_sas.push(old);
            }
        }
        for old in std::mem::take(&mut self.policies) {
            if !state.policies.iter().any(|p| p.index == old.index) {
                self.gone_policies.retain(|g| g.index != old.index);
                self.gone_policies.push(old);
            }
        }
        if self.first_counts.is_none() {
            self.first_counts = Some(
                state
                    .sas
                    .iter()
                    .map(|sa| ((sa.spi, sa.dst, sa.proto), (sa.packets, sa.bytes)))
                    .collect(),
            );
        }
        self.sas = state.sas;
        self.policies = state.policies;
        self.interfaces = state.interfaces;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xfrm_state::Mode;

    #[test]
    fn an_sa_carried_what_its_counters_moved_since_the_first_dump() {
        let counted = |spi, packets, bytes| {
            let mut sa = Sa::example(spi, 1, "203.0.113.1", Mode::Tunnel);
            (sa.packets, sa.bytes) = (packets, bytes);
            sa
        };
        let mut book = XfrmBook::seen(
            7,
            XfrmState {
                sas: vec![counted(0x1001, 15, 1500), counted(0x1002, 3, 300)],
                policies: Vec::new(),
                interfaces: Vec::new(),
            },
        );
        // 0x1001 was there at the first dump; 0x1002 came later.
        let ns = book.namespaces.get_mut(&7).unwrap();
        ns.first_counts = Some(BTreeMap::from([(
            (0x1001, "203.0.113.1".parse().unwrap(), 50),
            (10, 1000),
        )]));
        let carried: Vec<(u32, u64, u64)> = book
            .carried(7)
            .into_iter()
            .map(|(sa, packets, bytes)| (sa.spi, packets, bytes))
            .collect();
        assert_eq!(carried, [(0x1001, 5, 500), (0x1002, 3, 300)]);
        assert!(book.carried(8).is_empty());
    }
}
