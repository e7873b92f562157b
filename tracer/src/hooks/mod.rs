//! The kernel functions xfrm-trace hooks, and why (see docs/kernel.md §1).

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
    /// The MASQUERADE-before-IPsec path.
    Nat,
    /// Oversize ESP and path MTU.
    Mtu,
}

/// One function we plan to hook.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub function: &'static str,
    pub role: Role,
    /// Only some kernels have it (an alternative exists on the others).
    pub version_dependent: bool,
}

const fn hook(function: &'static str, role: Role) -> Hook {
    Hook {
        function,
        role,
        version_dependent: false,
    }
}

const fn only_some(function: &'static str, role: Role) -> Hook {
    Hook {
        function,
        role,
        version_dependent: true,
    }
}

/// Every function a run hooks (tracepoints aside), as the doctor checks them.
pub const PLANNED: &[Hook] = &[
    hook("xfrm_input", Role::Bracket),
    hook("__xfrm_policy_check", Role::Bracket),
    hook("__xfrm_route_forward", Role::Bracket),
    hook("xfrm_lookup_with_ifid", Role::Bracket),
    hook("xfrm_output", Role::Bracket),
    hook("xfrm_output_resume", Role::Bracket),
    hook("xfrm_state_lookup", Role::Enrichment),
    only_some("xfrm_input_state_lookup", Role::Enrichment),
    hook("xfrm_policy_lookup_bytype", Role::Enrichment),
    hook("xfrm4_output", Role::Nat),
    hook("xfrm6_output", Role::Nat),
    hook("__xfrm4_output", Role::Nat),
    hook("__xfrm6_output", Role::Nat),
    hook("xfrm_local_error", Role::Mtu),
    hook("ip_do_fragment", Role::Mtu),
    hook("ip6_fragment", Role::Mtu),
    hook("__icmp_send", Role::Mtu),
    hook("icmp6_send", Role::Mtu),
];

/// Functions a probe program may be attached to while testing whether a
/// program type works: common to every kernel we support.
pub const PROBE_TARGETS: &[&str] = &["xfrm_input", "ip_forward", "ip_rcv"];
