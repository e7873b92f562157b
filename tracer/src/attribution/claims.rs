//! Diff at the drop (`docs/drop-diff.md`): what the claim programs need
//! from userspace (where drops are, each counter's class), the one hook
//! that claims what no drop follows, and the shadows' set-up at the start.

use std::path::Path;

use aya::{
    Ebpf,
    maps::Array,
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun as _},
};
use tracer_common::{
    attribution::{ClaimTables, MAX_COUNTERS, MAX_SITES, SiteRange, class, site},
    names::{maps, programs},
};

use crate::{
    counters::Counters,
    ebpf::{describe, program},
    hooks::{HookSpec, Prototype, Role, Variant},
    kallsyms::Kallsyms,
};

/// Local route lookups: no packet exists yet, so no drop follows their
/// increments. fexit reads the result after five arguments.
pub const HOOKS: &[HookSpec] = &[HookSpec::new(
    "xfrm_lookup_route",
    Role::Claim,
    &[Variant::exit_or_kprobe_pair(
        programs::lookup_route_exit,
        programs::lookup_route_kprobe,
        programs::lookup_route_kretprobe,
    )
    .prototype(Prototype::ExitAfterArgs(5))],
)];

/// Each counter's class, by its `/proc/net/xfrm_stat` name (`None`: a
/// counter no claim takes, e.g. IP-TFS's, not analysed yet).
pub fn class_of(name: &str) -> Option<u8> {
    Some(match name {
        "XfrmInError"
        | "XfrmInNoStates"
        | "XfrmInStateProtoError"
        | "XfrmInStateModeError"
        | "XfrmInStateSeqError"
        | "XfrmInStateExpired"
        | "XfrmInStateInvalid"
        | "XfrmAcquireError"
        | "XfrmInStateDirError" => class::IN_SA,
        "XfrmInBufferError" | "XfrmInHdrError" | "XfrmInStateMismatch" => class::IN_EITHER,
        "XfrmInNoPols" | "XfrmInPolBlock" | "XfrmInPolError" | "XfrmInTmplMismatch" => {
            class::IN_POLICY
        }
        "XfrmOutNoStates"
        | "XfrmOutPolBlock"
        | "XfrmOutPolError"
        | "XfrmOutBundleGenError"
        | "XfrmOutBundleCheckError"
        | "XfrmOutPolDead"
        | "XfrmOutStateDirError" => class::OUT_LOOKUP,
        "XfrmFwdHdrError" => class::OUT_FORWARD,
        "XfrmOutError"
        | "XfrmOutStateModeError"
        | "XfrmOutStateSeqError"
        | "XfrmOutStateExpired"
        | "XfrmOutStateProtoError"
        | "XfrmOutStateInvalid" => class::OUT_XFORM,
        _ => return None,
    })
}

/// The functions a drop inside of tells the claim which stage it ends.
/// `xfrm_output_one` and `xfrm_output_gso` are usually inlined; where a
/// build keeps them apart they are listed under their own name.
const SITES: &[(&str, u32)] = &[
    ("xfrm_input", site::INPUT),
    ("xfrm_output", site::OUTPUT),
    ("xfrm_output_gso", site::OUTPUT),
    ("xfrm_output_resume", site::OUTPUT_RESUME),
    ("xfrm_output_one", site::OUTPUT_RESUME),
    ("esp_output_done", site::OUTPUT_RESUME),
    ("validate_xmit_xfrm", site::OUTPUT_RESUME),
    ("ip_forward", site::FORWARD),
    ("ip6_forward", site::FORWARD),
];

/// The tables for this kernel (not armed yet).
pub fn tables(counters: &Counters, kallsyms: &Kallsyms) -> ClaimTables {
    let mut tables = ClaimTables::EMPTY;
    for (&index, name) in &counters.names {
        if let (Some(slot), Some(class)) = (tables.classes.get_mut(index as usize), class_of(name))
        {
            *slot = class;
        }
    }
    let ranges = SITES.iter().flat_map(|&(function, site)| {
        kallsyms
            .function_ranges(function)
            .into_iter()
            .map(move |(start, end)| SiteRange {
                start,
                end,
                site,
                _pad: 0,
            })
    });
    for (slot, range) in tables.sites.iter_mut().zip(ranges.take(MAX_SITES)) {
        *slot = range;
    }
    tables
}

/// The fewest shadow slots the table gets.
pub const MIN_SHADOWS: u32 = 64;

/// Room in the shadow table (one shadow per netns and CPU, preallocated:
/// tracing programs need that on older kernels) for twice the `namespaces`
/// there are now: a few hundred KiB per CPU.
pub fn shadow_entries(namespaces: usize) -> u32 {
    u32::try_from(namespaces.saturating_mul(2))
        .unwrap_or(u32::MAX)
        .clamp(MIN_SHADOWS, 4096)
}

/// Whether every counter the kernel has fits the programs' arrays.
pub fn fits(counters: &Counters) -> bool {
    (counters.array_len as usize) <= MAX_COUNTERS
}

/// Writes the tables, sets up every CPU's shadow of each netns in
/// `namespaces` (their counters as they are now), then arms the claims.
/// Returns how many (netns, CPU) shadows were set up.
pub fn start(
    ebpf: &mut Ebpf,
    mut tables: ClaimTables,
    namespaces: &[&Path],
) -> Result<usize, String> {
    tables.armed = 0;
    write_tables(ebpf, &tables)?;
    let init: &mut RawTracePoint = program(ebpf, programs::shadow_init)?;
    init.load()
        .map_err(|e| format!("loading {}: {}", programs::shadow_init, describe(&e)))?;
    let cpus = aya::util::online_cpus().map_err(|(_, e)| e.to_string())?;
    let init: &RawTracePoint = init;
    let mut done = 0;
    for path in namespaces {
        done += std::thread::scope(|scope| {
            scope
                .spawn(|| set_up_in(init, path, &cpus))
                .join()
                .map_err(|_| "shadow set-up thread panicked".to_string())?
        })?;
    }
    tables.armed = 1;
    write_tables(ebpf, &tables)?;
    Ok(done)
}

/// On this (fresh) thread: enters the netns at `path`, then runs the set-up
/// program once on each CPU (it takes the caller's netns and CPU).
fn set_up_in(init: &RawTracePoint, path: &Path, cpus: &[u32]) -> Result<usize, String> {
    let netns = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("entering {}: {e}", path.display()))?;
    let mut done = 0;
    for &cpu in cpus {
        let mut set = nix::sched::CpuSet::new();
        set.set(cpu as usize).map_err(|e| e.to_string())?;
        // A CPU gone offline meanwhile has no counters to set up.
        if nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).is_err() {
            continue;
        }
        let result = init
            .test_run(RawTracePointRunOptions {
                args: [0; 12],
                cpu: None,
            })
            .map_err(|e| format!("running {}: {}", programs::shadow_init, describe(&e)))?;
        if result.return_value == 0 {
            done += 1;
        }
    }
    Ok(done)
}

fn write_tables(ebpf: &mut Ebpf, tables: &ClaimTables) -> Result<(), String> {
    let map = ebpf
        .map_mut(maps::CLAIM_TABLES)
        .ok_or_else(|| format!("no map {}", maps::CLAIM_TABLES))?;
    let mut array: Array<_, ClaimTables> = Array::try_from(map).map_err(|e| describe(&e))?;
    array.set(0, tables, 0).map_err(|e| describe(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 6.12 enum (`LINUX_MIB_XFRM*` values), as BTF gives it.
    fn counters_6_12() -> Counters {
        let names = [
            "LINUX_MIB_XFRMNUM",
            "LINUX_MIB_XFRMINERROR",
            "LINUX_MIB_XFRMINBUFFERERROR",
            "LINUX_MIB_XFRMINHDRERROR",
            "LINUX_MIB_XFRMINNOSTATES",
            "LINUX_MIB_XFRMINSTATEPROTOERROR",
            "LINUX_MIB_XFRMINSTATEMODEERROR",
            "LINUX_MIB_XFRMINSTATESEQERROR",
            "LINUX_MIB_XFRMINSTATEEXPIRED",
            "LINUX_MIB_XFRMINSTATEMISMATCH",
            "LINUX_MIB_XFRMINSTATEINVALID",
            "LINUX_MIB_XFRMINTMPLMISMATCH",
            "LINUX_MIB_XFRMINNOPOLS",
            "LINUX_MIB_XFRMINPOLBLOCK",
            "LINUX_MIB_XFRMINPOLERROR",
            "LINUX_MIB_XFRMOUTERROR",
            "LINUX_MIB_XFRMOUTBUNDLEGENERROR",
            "LINUX_MIB_XFRMOUTBUNDLECHECKERROR",
            "LINUX_MIB_XFRMOUTNOSTATES",
            "LINUX_MIB_XFRMOUTSTATEPROTOERROR",
            "LINUX_MIB_XFRMOUTSTATEMODEERROR",
            "LINUX_MIB_XFRMOUTSTATESEQERROR",
            "LINUX_MIB_XFRMOUTSTATEEXPIRED",
            "LINUX_MIB_XFRMOUTPOLBLOCK",
            "LINUX_MIB_XFRMOUTPOLDEAD",
            "LINUX_MIB_XFRMOUTPOLERROR",
            "LINUX_MIB_XFRMFWDHDRERROR",
            "LINUX_MIB_XFRMOUTSTATEINVALID",
            "LINUX_MIB_XFRMACQUIREERROR",
            "LINUX_MIB_XFRMOUTSTATEDIRERROR",
            "LINUX_MIB_XFRMINSTATEDIRERROR",
            "__LINUX_MIB_XFRMMAX",
        ];
        let values: Vec<(String, u64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), i as u64))
            .collect();
        Counters::from_enum(&values)
    }

    #[test]
    fn every_counter_of_a_kernel_without_ip_tfs_has_a_class() {
        let counters = counters_6_12();
        assert!(fits(&counters));
        let unclassified: Vec<&String> = counters
            .names
            .values()
            .filter(|name| class_of(name).is_none())
            .collect();
        assert!(unclassified.is_empty(), "{unclassified:?}");
        let tables = tables(&counters, &Kallsyms::default());
        assert_eq!(tables.classes[0], 0, "XFRMNUM is no counter");
        assert_eq!(tables.classes[4], class::IN_SA, "XfrmInNoStates");
        assert_eq!(tables.classes[3], class::IN_EITHER, "XfrmInHdrError");
        assert_eq!(tables.classes[13], class::IN_POLICY, "XfrmInPolBlock");
        assert_eq!(tables.classes[18], class::OUT_LOOKUP, "XfrmOutNoStates");
        assert_eq!(tables.classes[26], class::OUT_FORWARD, "XfrmFwdHdrError");
        assert_eq!(tables.classes[21], class::OUT_XFORM, "XfrmOutStateSeqError");
        assert_eq!(tables.armed, 0);
        assert_eq!(class_of("XfrmInIptfsError"), None);
    }

    #[test]
    fn drop_sites_are_the_functions_text_up_to_the_next_symbol() {
        let kallsyms = Kallsyms::parse(
            "ffffffff81a00000 T xfrm_input\n\
             ffffffff81a01200 t xfrm_input_resume\n\
             ffffffff81b00000 T ip_forward\n\
             ffffffff81b00800 T ip_forward_finish\n\
             ffffffffc0100000 t esp_output_done\t[esp4]\n\
             ffffffffc0100300 t esp_output_tail\t[esp4]\n",
        );
        let tables = tables(&counters_6_12(), &kallsyms);
        let sites: Vec<(u64, u64, u32)> = tables
            .sites
            .iter()
            .filter(|r| r.end != 0)
            .map(|r| (r.start, r.end, r.site))
            .collect();
        assert_eq!(
            sites,
            [
                (0xffffffff81a00000, 0xffffffff81a01200, site::INPUT),
                (0xffffffffc0100000, 0xffffffffc0100300, site::OUTPUT_RESUME),
                (0xffffffff81b00000, 0xffffffff81b00800, site::FORWARD),
            ]
        );
    }
}
