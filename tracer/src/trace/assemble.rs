//! Turning what the programs counted, the counters' deltas, the XFRM book
//! and what pluto said into a `Report` with its diagnosis: at the end of a
//! run, and on every refresh of the metrics.

use std::collections::{BTreeMap, HashMap};

use tracer_common::attribution::SourceKey;

use super::{Snapshot, probes::Readings};
use crate::{
    attribution::{self, Coverage},
    counters::Counters,
    diagnosis, drops, ike,
    kallsyms::Kallsyms,
    masquerade, mtu,
    netns::{self, Netns},
    pluto::session::{Observed, owner_of_spi_text},
    report::{self, Counter, HookList, Kernel, NetnsDelta, NetnsInfo, PlutoReport, Report},
    xfrm_state::{XfrmBook, XfrmState},
};

/// What stays the same during a run.
pub struct Context {
    pub release: String,
    pub kallsyms: Kallsyms,
    pub reasons: HashMap<u32, String>,
    pub counter_names: Counters,
    pub coverage: Coverage,
    pub mtu_hooks: HookList,
    pub ike_hooks: HookList,
    pub masquerade: masquerade::MasqCoverage,
    pub pluto_problems: Vec<String>,
    /// Why `/proc/net/xfrm_stat` cannot be read, if it cannot.
    pub counters_unavailable: Option<String>,
}

/// The state of the run at one moment.
pub struct Moment<'a> {
    pub readings: Readings,
    pub before: &'a Snapshot,
    pub after: &'a Snapshot,
    pub book: &'a XfrmBook,
    pub plutos: Vec<Observed>,
    pub elapsed: std::time::Duration,
}

pub fn report(context: &Context, moment: Moment) -> Report {
    let Moment {
        readings,
        before,
        after,
        book,
        mut plutos,
        elapsed,
    } = moment;
    let mut drops = drops::summarize(&readings.drops, &context.kallsyms, &context.reasons);
    drops::attach_samples(
        &mut drops,
        &readings.drop_samples,
        &context.kallsyms,
        &context.reasons,
    );
    let mut counters = counter_report(
        before,
        after,
        &readings.sources,
        &context.counter_names,
        &context.coverage,
    );
    let mut leaks = masquerade::leaks(&readings.masquerade, &context.masquerade);
    let mut ike_paths = ike::summarize(&readings.ike, &context.kallsyms, &context.reasons);
    let mut seen: Vec<u64> = drops.iter().map(|d| u64::from(d.netns)).collect();
    seen.extend(readings.mtu.iter().map(|(k, _)| u64::from(k.netns)));
    seen.extend(leaks.iter().map(|l| l.netns));
    seen.extend(ike_paths.iter().map(|p| p.netns));
    seen.extend(
        counters
            .iter()
            .flat_map(|c| c.by_netns.iter().map(|n| n.netns)),
    );
    let netns: Vec<NetnsInfo> = after
        .values()
        .chain(before.values())
        .map(|(ns, _)| ns)
        .fold(BTreeMap::new(), |mut all: BTreeMap<u64, &Netns>, ns| {
            all.entry(ns.inode).or_insert(ns);
            all
        })
        .into_values()
        .map(|ns| NetnsInfo {
            inode: ns.inode,
            label: ns.label.clone(),
            interfaces: if seen.contains(&ns.inode) {
                netns::interface_names(&ns.path).unwrap_or_default()
            } else {
                BTreeMap::new()
            },
        })
        .collect();
    let label_of = |inode: u64| {
        netns
            .iter()
            .find(|n| n.inode == inode)
            .map_or_else(|| format!("netns:{inode}"), |n| n.label.clone())
    };
    let ifname_of = |inode: u64, ifindex: u32| match netns
        .iter()
        .find(|n| n.inode == inode)
        .and_then(|n| n.interfaces.get(&ifindex))
    {
        Some(name) => name.clone(),
        None if ifindex == 0 => "-".into(),
        None => format!("if{ifindex}"),
    };
    for pluto in &mut plutos {
        pluto.netns_label = label_of(pluto.netns);
    }
    let esp_sizes = esp_sizes(&readings.mtu, book, &netns);
    for drop in &mut drops {
        drop.netns_label = label_of(u64::from(drop.netns));
        drop.ifname = ifname_of(u64::from(drop.netns), drop.ifindex);
    }
    let name_source = |source: &mut attribution::Source| {
        source.ifname = ifname_of(source.netns, source.ifindex);
        source.netns_label = label_of(source.netns);
        if let Some(policy) = book.policy(source.netns, source.policy_index) {
            source.policy_selector = format!("{} -> {}", policy.selector.src, policy.selector.dst);
        }
        if let Some((connection, state)) = owner_of_spi_text(&plutos, source.netns, &source.spi) {
            source.connection = connection.to_string();
            source.pluto_state = state;
        }
    };
    for (index, mut sample) in readings.samples {
        let name = context.counter_names.name(index);
        if let Some(counter) = counters.iter_mut().find(|c| c.name == name) {
            name_source(&mut sample.source);
            counter.samples.push(sample);
        }
    }
    for counter in &mut counters {
        counter.sources.iter_mut().for_each(name_source);
    }
    for leak in &mut leaks {
        leak.netns_label = label_of(leak.netns);
        leak.ifname = ifname_of(leak.netns, leak.ifindex);
    }
    for path in &mut ike_paths {
        path.netns_label = label_of(path.netns);
    }
    let mut findings = masquerade::findings(&leaks);
    findings.extend(mtu::findings(&esp_sizes));
    let findings = diagnosis::diagnose(
        &diagnosis::Evidence {
            counters: &counters,
            ike: &ike_paths,
            plutos: &plutos,
            book,
            ike_watched: context.ike_hooks.missing.is_empty(),
        },
        findings,
    );
    Report {
        schema: report::SCHEMA,
        kernel: Kernel {
            release: context.release.clone(),
            mode: context.coverage.mode(),
        },
        filter: Vec::new(),
        duration_secs: elapsed.as_secs_f64(),
        coverage: context.coverage.clone(),
        attribution_errors: readings.attribution_errors,
        counters,
        counters_unavailable: context.counters_unavailable.clone(),
        drops,
        drops_untracked: readings.drops_untracked,
        capture: readings.capture.clone(),
        netns,
        esp_sizes,
        esp_sizes_hooks: context.mtu_hooks.clone(),
        findings,
        ike: ike_paths,
        ike_hooks: context.ike_hooks.clone(),
        pluto: PlutoReport {
            instances: plutos,
            problems: context.pluto_problems.clone(),
        },
        masquerade: masquerade::MasqueradeReport {
            coverage: context.masquerade.clone(),
            leaks,
            table_full: readings.masquerade.table_full,
            unseen: readings.masquerade.unseen,
        },
    }
}

/// Oversize ESP per SA, joined with the SAs the book has seen.
fn esp_sizes(
    rows: &[(tracer_common::mtu::MtuKey, tracer_common::mtu::MtuStats)],
    book: &XfrmBook,
    netns: &[NetnsInfo],
) -> Vec<mtu::SaSizes> {
    if rows.is_empty() {
        return Vec::new();
    }
    let states: BTreeMap<u64, XfrmState> = netns
        .iter()
        .filter_map(|n| Some((n.inode, book.current(n.inode)?)))
        .collect();
    let views: Vec<mtu::NetnsView> = netns
        .iter()
        .map(|n| mtu::NetnsView {
            inode: n.inode,
            label: &n.label,
            interfaces: &n.interfaces,
            state: states.get(&n.inode),
        })
        .collect();
    mtu::summarize(rows, &views)
}

/// Per counter: the kernel's increase in each netns (namespaces that
/// appeared during the run count from zero), what was attributed, and the
/// packets behind it.
pub fn counter_report(
    before: &Snapshot,
    after: &Snapshot,
    sources: &[(SourceKey, u64)],
    names: &Counters,
    coverage: &Coverage,
) -> Vec<Counter> {
    let mut by_counter: BTreeMap<String, Counter> = BTreeMap::new();
    let kind = if coverage.complete {
        crate::report::ATTRIBUTED
    } else {
        "counted"
    };
    for (inode, (ns, now)) in after {
        let then = before
            .get(inode)
            .map(|(_, s)| s.clone())
            .unwrap_or_default();
        for (name, delta) in now.delta_since(&then) {
            let counter = counter_entry(&mut by_counter, &name, kind);
            counter.kernel_delta += delta;
            counter.by_netns.push(NetnsDelta {
                netns: *inode,
                label: ns.label.clone(),
                delta,
                attributed: 0,
            });
        }
    }
    for (key, count) in sources {
        let name = names.name(key.counter);
        let counter = counter_entry(&mut by_counter, &name, kind);
        counter.attributed += count;
        let netns = u64::from(key.flow.netns);
        if let Some(n) = counter.by_netns.iter_mut().find(|n| n.netns == netns) {
            n.attributed += count;
        }
        counter.sources.push(attribution::source(key, *count));
    }
    by_counter
        .into_values()
        .map(|mut c| {
            c.gap = i128::from(c.kernel_delta) - i128::from(c.attributed);
            c.sources.sort_by_key(|s| std::cmp::Reverse(s.count));
            c
        })
        .collect()
}

fn counter_entry<'a>(
    by_counter: &'a mut BTreeMap<String, Counter>,
    name: &str,
    coverage: &'static str,
) -> &'a mut Counter {
    by_counter
        .entry(name.to_string())
        .or_insert_with(|| Counter {
            name: name.to_string(),
            kernel_delta: 0,
            attributed: 0,
            gap: 0,
            coverage,
            by_netns: Vec::new(),
            sources: Vec::new(),
            samples: Vec::new(),
        })
}
