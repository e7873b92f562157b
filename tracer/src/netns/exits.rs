//! The counters of namespaces deleted during a run, read by a program at
//! `xfrm_net_exit` (see `tracer-ebpf/src/netns.rs`): without it a deleted
//! namespace's increments would be lost with it.

use aya::{
    Btf, Ebpf,
    maps::{MapData, RingBuf},
};
use tracer_common::netns::NetnsExit;

use crate::{
    attribution::HookChoice,
    counters::Counters,
    ebpf,
    kallsyms::{Kallsyms, Presence},
    xfrm_stat::XfrmStat,
};

/// The kernel function that tears down a namespace's XFRM state.
pub const FUNCTION: &str = "xfrm_net_exit";

/// The ring the teardown program writes to.
pub struct Exits {
    ring: RingBuf<MapData>,
}

/// Attaches the teardown program (fentry, else kprobe): how, or why not.
pub fn attach(
    ebpf: &mut Ebpf,
    btf: &Result<Btf, String>,
    kallsyms: &Kallsyms,
    choice: HookChoice,
) -> Result<(Exits, String), String> {
    let mut errors = Vec::new();
    let mut method = None;
    if matches!(choice, HookChoice::Auto | HookChoice::Fentry) {
        let result = btf
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|btf| ebpf::attach_fentry(ebpf, "netns_exit_fentry", FUNCTION, btf));
        match result {
            Ok(()) => method = Some("fentry"),
            Err(e) => errors.push(format!("fentry: {e}")),
        }
    }
    if method.is_none() && matches!(choice, HookChoice::Auto | HookChoice::Kprobe) {
        let result = match kallsyms.presence(FUNCTION) {
            Presence::Exact { .. } => {
                ebpf::attach_kprobe(ebpf, "netns_exit_kprobe", FUNCTION).map(drop)
            }
            _ => Err("not in /proc/kallsyms".into()),
        };
        match result {
            Ok(()) => method = Some("kprobe"),
            Err(e) => errors.push(format!("kprobe: {e}")),
        }
    }
    let Some(method) = method else {
        if errors.is_empty() {
            errors.push(format!("--hooks {choice:?}").to_lowercase());
        }
        return Err(errors.join("; "));
    };
    let ring = ebpf
        .take_map("NETNS_EXITS")
        .and_then(|map| RingBuf::try_from(map).ok())
        .ok_or("the NETNS_EXITS ring is missing from the object")?;
    Ok((Exits { ring }, format!("{FUNCTION} ({method})")))
}

impl Exits {
    /// The namespaces torn down since the last call.
    pub fn drain(&mut self) -> Vec<NetnsExit> {
        let mut exits = Vec::new();
        ebpf::drain_ring(&mut self.ring, &mut exits, usize::MAX);
        exits
    }
}

/// A torn-down namespace's counters by name, and whether the sum is whole
/// (every CPU read).
pub fn final_counters(exit: &NetnsExit, names: &Counters) -> (XfrmStat, bool) {
    let stat = names
        .names
        .iter()
        .filter_map(|(index, name)| {
            let value = *exit.counters.get(usize::try_from(*index).ok()?)?;
            Some((name.clone(), value))
        })
        .collect();
    (XfrmStat(stat), exit.cpus_missed == 0)
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
        let (stat, whole) = final_counters(&exit, &names);
        assert!(whole);
        assert_eq!(stat.0.get("XfrmInNoStates"), Some(&300));
        assert_eq!(stat.0.get("XfrmInPolBlock"), Some(&7));
        assert_eq!(stat.0.get("Beyond"), None);
        exit.cpus_missed = 1;
        assert!(!final_counters(&exit, &names).1);
    }
}
