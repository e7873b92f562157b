//! The run's report: the JSON schema `xfrm-trace/1` (rendered as text by
//! `render`).
//!
//! Field names are a published interface: add fields, never rename them.

#[cfg(test)]
pub(crate) mod schema;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    attribution::{AttributionErrors, Coverage, SampleReport, Source},
    drops::DropRow,
    model::{CaptureCounts, Finding, HookList, NetnsInfo},
};

pub const SCHEMA: &str = "xfrm-trace/1";

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub kernel: Kernel,
    /// What `--netns`/`--filter` narrowed the report to (empty: all).
    pub filter: Vec<String>,
    pub duration_secs: f64,
    /// Which XFRM functions are hooked (and which could not be).
    pub coverage: Coverage,
    pub attribution_errors: AttributionErrors,
    pub counters: Vec<Counter>,
    /// Why no counter delta is known (`/proc/net/xfrm_stat` missing or
    /// unreadable); null when the counters were read.
    pub counters_unavailable: Option<String>,
    pub drops: Vec<DropRow>,
    /// Drops the in-kernel table had no room for (counted, not named).
    pub drops_untracked: u64,
    /// Dropped and leaked packets copied for the pcapng, and those not.
    pub capture: CaptureCounts,
    pub netns: Vec<NetnsInfo>,
    /// The hook that reads a deleted namespace's counters at its teardown;
    /// without it they are as of the last reading (every second).
    pub netns_teardown_hooks: HookList,
    /// Per SA: packets that did not fit the MTU, largest inner packet, MSS.
    pub esp_sizes: Vec<crate::mtu::SaSizes>,
    pub esp_sizes_hooks: HookList,
    pub findings: Vec<Finding>,
    /// IKE packets per local address and peer: sent, received, dropped here.
    pub ike: Vec<crate::ike::IkePath>,
    pub ike_hooks: HookList,
    /// Each pluto found: its connections, states and log events.
    pub pluto: PlutoReport,
    /// Packets SNATed before the IPsec policy lookup, per flow.
    pub masquerade: crate::masquerade::MasqueradeReport,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PlutoReport {
    pub instances: Vec<crate::pluto::session::Observed>,
    /// Why plutos could not be found (none running is not a problem).
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Kernel {
    pub release: String,
    pub mode: String,
}

/// `Counter::coverage` when every increment was tied to its packet.
pub const ATTRIBUTED: &str = "attributed";

/// One `/proc/net/xfrm_stat` counter that moved during the run.
#[derive(Debug, Serialize, Deserialize)]
pub struct Counter {
    pub name: String,
    pub kernel_delta: u64,
    pub attributed: u64,
    /// `kernel_delta - attributed`: increments no packet was found for.
    pub gap: i128,
    /// `attributed` (every increment tied to its packet) or `counted` (the
    /// kernel's delta only, as in tracepoint-only mode).
    pub coverage: String,
    pub by_netns: Vec<NetnsDelta>,
    pub sources: Vec<Source>,
    /// Sampled increments with their kernel stacks (rate-limited).
    pub samples: Vec<SampleReport>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NetnsDelta {
    pub netns: u64,
    pub label: String,
    pub delta: u64,
    pub attributed: u64,
    /// The namespace was deleted during the run (`delta` is up to then).
    pub deleted: bool,
}

/// `/proc/net/xfrm_stat` values by counter name.
pub type CounterValues = BTreeMap<String, u64>;

/// A run's report and the raw evidence behind it (for the bundle).
pub struct Outcome {
    pub report: Report,
    /// `/proc/net/xfrm_stat` of each netns (by label) before and after.
    pub xfrm_stat: BTreeMap<String, (CounterValues, CounterValues)>,
    /// SAs and policies (never keys) of each netns that has any, at the end.
    pub xfrm_state: BTreeMap<String, crate::xfrm_state::XfrmState>,
}
