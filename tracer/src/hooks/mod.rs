//! The hook engine: each capability declares its hooks as data (`spec`),
//! one planner decides how each is attached on this kernel (`plan`), one
//! attacher carries the plan out (`attach`); `mode` names the result. Why
//! these functions: docs/kernel.md §1.

pub mod attach;
pub mod mode;
pub mod plan;
pub mod spec;

pub use attach::{HookOutcome, hook_list};
pub use mode::{HookMode, Mode};
pub use plan::{AttachFailure, KernelFacts, Planned, Works, plan};
pub use spec::{HookSpec, Method, Needs, Prototype, Variant};

/// Which hooks the user allows (`--hooks`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HookChoice {
    /// fentry/fexit where they attach, kprobes where not.
    #[default]
    Auto,
    Fentry,
    Kprobe,
    /// No brackets: kfree_skb drop reasons and counter deltas only.
    Tracepoint,
}

/// What a hook is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Brackets that contain every XFRM counter increment site.
    Bracket,
    /// Names the SA, policy or exact cause while a bracket is open.
    Enrichment,
    /// Claims the increments no drop follows (diff at the drop).
    Claim,
    /// The MASQUERADE-before-IPsec path.
    Nat,
    /// Oversize ESP and path MTU.
    Mtu,
    /// IKE packets on the wire (tracepoints).
    IkeWatch,
    /// A namespace's counters read at its teardown.
    Teardown,
}

/// Functions a probe program may be attached to while testing whether a
/// program type works: common to every kernel we support.
pub const PROBE_TARGETS: &[&str] = &["xfrm_input", "ip_forward", "ip_rcv"];

#[cfg(test)]
mod tests;
