//! Turning what the programs counted, the counters' deltas, the XFRM book
//! and what pluto said into a `Report` with its diagnosis: at the end of a
//! run, and on every refresh of the metrics.

use std::collections::{BTreeMap, HashMap};

use tracer_common::attribution::SourceKey;

use super::{Snapshot, probes::Readings};
use crate::{
    attribution::{self, Coverage, Strategy},
    counters::Counters,
    diagnosis, drops, ike,
    kallsyms::Kallsyms,
    masquerade,
    model::{HookList, Names, NetnsInfo},
    mtu,
    netns::{self, Netns},
    pluto::session::{Observed, owner_of_spi_text},
    report::{self, Counter, Kernel, NetnsDelta, PlutoReport, Report},
    xfrm_stat::XfrmStat,
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
    pub netns_teardown_hooks: HookList,
    pub pluto_problems: Vec<String>,
    /// Why `/proc/net/xfrm_stat` cannot be read, if it cannot.
    pub counters_unavailable: Option<String>,
}

/// The state of the run at one moment.
pub struct Moment<'a> {
    pub readings: Readings,
    pub before: &'a Snapshot,
    pub after: &'a Snapshot,
    pub history: &'a netns::History,
    pub book: &'a XfrmBook,
    pub plutos: Vec<Observed>,
    pub elapsed: std::time::Duration,
}

pub fn report(context: &Context, moment: Moment) -> Report {
    let Moment {
        readings,
        before,
        after,
        history,
        book,
        mut plutos,
        elapsed,
    } = moment;
    // Namespaces where something happened: their interface names are read
    // afresh, then every row is named from that one list.
    let netns = netns_list(before, after, history, &active(&readings, before, after));
    let names = Names::new(&netns);
    let mut drops = drops::summarize(&readings.drops, &context.kallsyms, &context.reasons, &names);
    drops::attach_samples(
        &mut drops,
        &readings.drop_samples,
        &context.kallsyms,
        &context.reasons,
    );
    for pluto in &mut plutos {
        // The pluto watch runs before the names are known.
        pluto.netns_label = names.label(pluto.netns);
    }
    let mut counters = counter_report(
        before,
        after,
        &history.deleted,
        &readings.sources,
        &context.counter_names,
        &context.coverage,
        &names,
    );
    for sample in readings.samples {
        let name = context.counter_names.name(sample.counter);
        if let Some(counter) = counters.iter_mut().find(|c| c.name == name) {
            counter.samples.push(sample.report(&names));
        }
    }
    for counter in &mut counters {
        let sources = counter.sources.iter_mut();
        let samples = counter.samples.iter_mut().map(|s| &mut s.source);
        for source in sources.chain(samples) {
            if context.coverage.strategy == Strategy::DropDiff {
                attribution::name_policy(source, &counter.name, book);
            }
            join_policy_and_connection(source, book, &plutos);
        }
    }
    let leaks = masquerade::leaks(&readings.masquerade, &context.masquerade, &names, book);
    let ike_paths = ike::summarize(
        &readings.ike,
        &context.kallsyms,
        &context.reasons,
        &names,
        ike::arrivals_at_interfaces(&context.ike_hooks),
    );
    let esp_sizes = esp_sizes(&readings.mtu, book, &netns);
    let mut findings = masquerade::findings(&leaks, &netns);
    findings.extend(mtu::findings(&esp_sizes));
    let findings = diagnosis::diagnose(
        &diagnosis::Evidence {
            counters: &counters,
            ike: &ike_paths,
            plutos: &plutos,
            book,
            netns: &netns,
            ike_watched: context.ike_hooks.missing.is_empty(),
        },
        findings,
    );
    Report {
        schema: report::SCHEMA.into(),
        kernel: Kernel {
            release: context.release.clone(),
            mode: context.coverage.mode().to_string(),
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
        netns_teardown_hooks: context.netns_teardown_hooks.clone(),
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

/// Namespaces where something happened (a drop, a leak, an oversize or IKE
/// packet, a counter that moved or an attributed increment).
fn active(readings: &Readings, before: &Snapshot, after: &Snapshot) -> Vec<u64> {
    let mut active: Vec<u64> = readings
        .drops
        .iter()
        .map(|(k, _)| k.netns)
        .chain(readings.mtu.iter().map(|(k, _)| k.netns))
        .chain(readings.masquerade.leaks.iter().map(|(k, _)| k.netns))
        .chain(readings.ike.iter().map(|(k, _)| k.netns))
        .chain(readings.sources.iter().map(|(k, _)| k.flow.netns))
        .map(u64::from)
        .collect();
    let zero = XfrmStat::default();
    active.extend(after.iter().filter_map(|(inode, (_, now))| {
        let then = before.get(inode).map_or(&zero, |(_, s)| s);
        (!now.delta_since(then).is_empty()).then_some(*inode)
    }));
    active.sort_unstable();
    active.dedup();
    active
}

/// The policy's selector from the SAs and policies seen during the run,
/// and the libreswan connection and state that own the SA.
fn join_policy_and_connection(
    source: &mut attribution::Source,
    book: &XfrmBook,
    plutos: &[Observed],
) {
    if let Some(policy) = book.policy(source.netns, source.policy_index) {
        source.policy_selector = format!("{} -> {}", policy.selector.src, policy.selector.dst);
    }
    if let Some((connection, state)) = owner_of_spi_text(plutos, source.netns, &source.spi) {
        source.connection = connection.to_string();
        source.pluto_state = state;
    }
}

/// Every namespace of the run: those deleted during it (each under the
/// name it had, in the order they went), those read at the end or the
/// start, and those seen in between. An inode the kernel reused for a
/// later namespace appears once per namespace; what is known only by
/// inode (a drop) is named after the first of them.
fn netns_list(
    before: &Snapshot,
    after: &Snapshot,
    history: &netns::History,
    active: &[u64],
) -> Vec<NetnsInfo> {
    let mut all: Vec<NetnsInfo> = Vec::new();
    let mut add = |ns: &Netns, interfaces: &BTreeMap<u32, String>, deleted: bool| {
        if all
            .iter()
            .any(|n| n.inode == ns.inode && n.label == ns.label)
        {
            return;
        }
        all.push(NetnsInfo {
            inode: ns.inode,
            label: ns.label.clone(),
            pids: ns.pids.clone(),
            deleted,
            // Fresh names where something happened, else the last known.
            interfaces: if deleted || !active.contains(&ns.inode) {
                interfaces.clone()
            } else {
                netns::interface_names(&ns.path).unwrap_or_else(|_| interfaces.clone())
            },
        });
    };
    for gone in &history.deleted {
        add(&gone.netns, &gone.interfaces, true);
    }
    let known = |ns: &Netns| {
        history
            .seen
            .get(ns.inode)
            .filter(|s| s.netns.label == ns.label)
            .map(|s| s.interfaces.clone())
            .unwrap_or_default()
    };
    for (ns, _) in after.values() {
        add(ns, &known(ns), false);
    }
    for (ns, _) in before.values() {
        let gone = !after.contains_key(&ns.inode);
        add(ns, &known(ns), gone);
    }
    for seen in history.seen.iter() {
        add(&seen.netns, &seen.interfaces, seen.deleted);
    }
    all
}

/// Oversize ESP per SA, joined with the SAs the book has seen and what
/// each carried.
fn esp_sizes(
    rows: &[(tracer_common::mtu::MtuKey, tracer_common::mtu::MtuStats)],
    book: &XfrmBook,
    netns: &[NetnsInfo],
) -> Vec<mtu::SaSizes> {
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
            carried: book.carried(n.inode),
        })
        .collect();
    mtu::summarize(rows, &views)
}

/// Per counter: the kernel's increase in each netns (namespaces that
/// appeared during the run count from zero; one deleted during the run
/// counts up to its teardown, and an inode that came back for a new
/// namespace counts again from zero), what was attributed, and the packets
/// behind it. The gap leaves out what was attributed in a namespace whose
/// counters are unknown (gone before any reading), so it is never negative
/// for want of a reading.
pub fn counter_report(
    before: &Snapshot,
    after: &Snapshot,
    deleted: &[netns::Deleted],
    sources: &[(SourceKey, u64)],
    counter_names: &Counters,
    coverage: &Coverage,
    names: &Names,
) -> Vec<Counter> {
    let mut by_counter: BTreeMap<String, Counter> = BTreeMap::new();
    let kind = if coverage.complete {
        report::ATTRIBUTED
    } else {
        "counted"
    };
    let mut add = |ns: &Netns, now: &XfrmStat, then: &XfrmStat, deleted: bool| {
        for (name, delta) in now.delta_since(then) {
            let counter = counter_entry(&mut by_counter, &name, kind);
            counter.kernel_delta += delta;
            counter.by_netns.push(NetnsDelta {
                netns: ns.inode,
                label: ns.label.clone(),
                delta,
                attributed: 0,
                deleted,
            });
        }
    };
    let zero = XfrmStat::default();
    // Whether an inode's reading at the start was used up by a namespace
    // deleted since (a later namespace with its inode started from zero).
    let mut start_used: Vec<u64> = Vec::new();
    let mut then_of = |inode: u64| {
        if start_used.contains(&inode) {
            return &zero;
        }
        start_used.push(inode);
        before.get(&inode).map_or(&zero, |(_, s)| s)
    };
    for gone in deleted {
        add(&gone.netns, &gone.counters, then_of(gone.netns.inode), true);
    }
    for (inode, (ns, now)) in after {
        add(ns, now, then_of(*inode), false);
    }
    let known: Vec<u64> = after
        .keys()
        .copied()
        .chain(deleted.iter().map(|d| d.netns.inode))
        .collect();
    let mut unknown_attributed: BTreeMap<String, u64> = BTreeMap::new();
    for (key, count) in sources {
        let name = counter_names.name(key.counter);
        let counter = counter_entry(&mut by_counter, &name, kind);
        counter.attributed += count;
        let netns = u64::from(key.flow.netns);
        if !known.contains(&netns) {
            *unknown_attributed.entry(name.clone()).or_default() += count;
        }
        counter
            .sources
            .push(attribution::source(key, *count, names));
    }
    by_counter
        .into_values()
        .map(|mut c| {
            spread_attributed(&mut c);
            let unknown = unknown_attributed.get(&c.name).copied().unwrap_or(0);
            c.gap = i128::from(c.kernel_delta) - i128::from(c.attributed - unknown);
            c.sources.sort_by_key(|s| std::cmp::Reverse(s.count));
            c
        })
        .collect()
}

/// Each namespace's attributed count. Sources name a namespace by inode,
/// and the kernel may give a deleted namespace's inode to a later one: the
/// increments of an inode are then spread over its namespaces in the order
/// they lived, each up to its own delta (the last takes the rest), since
/// no packet says which of them it met.
fn spread_attributed(counter: &mut Counter) {
    let mut by_inode: BTreeMap<u64, u64> = BTreeMap::new();
    for s in &counter.sources {
        *by_inode.entry(s.netns).or_default() += s.count;
    }
    for (inode, mut left) in by_inode {
        let rows: Vec<usize> = (0..counter.by_netns.len())
            .filter(|&i| counter.by_netns[i].netns == inode)
            .collect();
        for (nth, &i) in rows.iter().enumerate() {
            let row = &mut counter.by_netns[i];
            row.attributed = if nth + 1 == rows.len() {
                left
            } else {
                left.min(row.delta)
            };
            left -= row.attributed;
        }
    }
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
            coverage: coverage.into(),
            by_netns: Vec::new(),
            sources: Vec::new(),
            samples: Vec::new(),
        })
}
