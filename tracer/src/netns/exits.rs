//! The counters of namespaces deleted during a run, read by a program at
//! `xfrm_net_exit` (see `tracer-ebpf/src/netns.rs`): without it a deleted
//! namespace's increments would be lost with it.

use aya::Ebpf;
use tracer_common::names::{maps, programs};
use tracer_common::netns::NetnsExit;

use crate::{
    counters::Counters,
    ebpf::Sampler,
    hooks::{self, HookOutcome, HookSpec, Role, Variant},
    model::HookList,
    xfrm_stat::XfrmStat,
};

/// The kernel function that tears down a namespace's XFRM state.
pub const HOOKS: &[HookSpec] = &[HookSpec::new(
    "xfrm_net_exit",
    Role::Teardown,
    &[Variant::entry(
        programs::netns_exit_fentry,
        programs::netns_exit_kprobe,
    )],
)];

/// The ring the teardown program writes to.
pub struct Exits {
    ring: Sampler<NetnsExit>,
}

/// The published form of what `HOOKS` got.
pub fn hook_list(outcomes: &[HookOutcome]) -> HookList {
    hooks::hook_list(outcomes, HOOKS[0].function)
}

/// The ring of the teardown program, once it is attached.
pub fn take_ring(ebpf: &mut Ebpf) -> Result<Exits, String> {
    let ring = Sampler::take(ebpf, maps::NETNS_EXITS, usize::MAX);
    if !ring.is_open() {
        return Err("the NETNS_EXITS ring is missing from the object".to_string());
    }
    Ok(Exits { ring })
}

impl Exits {
    /// The namespaces torn down since the last call.
    pub fn drain(&mut self) -> Vec<NetnsExit> {
        self.ring.take_kept()
    }
}

/// A torn-down namespace's counters by name.
pub fn final_counters(exit: &NetnsExit, names: &Counters) -> XfrmStat {
    if exit.cpus_missed > 0 {
        log::warn!(
            "netns {}: the counters of {} CPUs could not be read at its teardown",
            exit.netns,
            exit.cpus_missed
        );
    }
    let stat = names
        .names
        .iter()
        .filter_map(|(index, name)| {
            let value = *exit.counters.get(usize::try_from(*index).ok()?)?;
            Some((name.clone(), value))
        })
        .collect();
    XfrmStat(stat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_counters_are_named_by_their_kernel_index() {
        let mut exit = NetnsExit {
            netns: 4026532000,
            cpus_missed: 0,
            counters: [0; tracer_common::attribution::MAX_COUNTERS],
        };
        exit.counters[4] = 300;
        exit.counters[13] = 7;
        let names = Counters {
            names: [
                (4, "XfrmInNoStates"),
                (13, "XfrmInPolBlock"),
                (60, "Beyond"),
            ]
            .into_iter()
            .map(|(i, n)| (i, n.to_string()))
            .collect(),
            array_len: 61,
        };
        let stat = final_counters(&exit, &names);
        assert_eq!(stat.0.get("XfrmInNoStates"), Some(&300));
        assert_eq!(stat.0.get("XfrmInPolBlock"), Some(&7));
        assert_eq!(stat.0.get("Beyond"), None);
    }
}
