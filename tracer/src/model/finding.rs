//! A finding: one cause the diagnosis names, with its fix and evidence.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One diagnosed cause.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub summary: String,
    pub fix: String,
    pub evidence: Vec<String>,
    /// The libreswan connection it concerns (empty if none is known).
    pub connection: String,
    /// Where: the `ip netns` name (or `host`, `pid N`) of the gateway.
    pub netns_label: String,
    /// The SA it concerns, hex as `ip xfrm` shows it (empty if none).
    pub spi: String,
}

impl Finding {
    /// A finding not tied to a connection, namespace or SA (yet).
    pub fn new(kind: FindingKind, summary: String, fix: String, evidence: Vec<String>) -> Self {
        Self {
            kind,
            summary,
            fix,
            evidence,
            connection: String::new(),
            netns_label: String::new(),
            spi: String::new(),
        }
    }
}

/// What a finding is about. The JSON and the text name it in snake case
/// (`auth_failed`); these names are part of the report's schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    // One connection of a watched pluto.
    AuthFailed,
    IkeProposalMismatch,
    EspProposalMismatch,
    TsMismatch,
    PeerNotRunningIke,
    IkeBlockedLocally,
    IkeUnanswered,
    SaMissingInKernel,
    /// A connection down, or a policy no running pluto manages without its SA.
    TunnelDown,
    // Counters that point at the kernel or an SA.
    KernelXfrmErrors,
    // Every other counter that moved.
    EspForReplacedSa,
    NoSaForSpi,
    PolicyBlock,
    NoPolicy,
    TemplateMismatch,
    SaExpired,
    NoSaForPolicy,
    PolicyRemovedInUse,
    XfrmCounter,
    // The MTU and MASQUERADE detectors.
    EspOversize,
    MasqueradeBeforePolicy,
}

impl FindingKind {
    /// Every kind, in the order above.
    pub const ALL: [FindingKind; 21] = [
        Self::AuthFailed,
        Self::IkeProposalMismatch,
        Self::EspProposalMismatch,
        Self::TsMismatch,
        Self::PeerNotRunningIke,
        Self::IkeBlockedLocally,
        Self::IkeUnanswered,
        Self::SaMissingInKernel,
        Self::TunnelDown,
        Self::KernelXfrmErrors,
        Self::EspForReplacedSa,
        Self::NoSaForSpi,
        Self::PolicyBlock,
        Self::NoPolicy,
        Self::TemplateMismatch,
        Self::SaExpired,
        Self::NoSaForPolicy,
        Self::PolicyRemovedInUse,
        Self::XfrmCounter,
        Self::EspOversize,
        Self::MasqueradeBeforePolicy,
    ];

    /// The name as the report writes it (the serde name).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthFailed => "auth_failed",
            Self::IkeProposalMismatch => "ike_proposal_mismatch",
            Self::EspProposalMismatch => "esp_proposal_mismatch",
            Self::TsMismatch => "ts_mismatch",
            Self::PeerNotRunningIke => "peer_not_running_ike",
            Self::IkeBlockedLocally => "ike_blocked_locally",
            Self::IkeUnanswered => "ike_unanswered",
            Self::SaMissingInKernel => "sa_missing_in_kernel",
            Self::TunnelDown => "tunnel_down",
            Self::KernelXfrmErrors => "kernel_xfrm_errors",
            Self::EspForReplacedSa => "esp_for_replaced_sa",
            Self::NoSaForSpi => "no_sa_for_spi",
            Self::PolicyBlock => "policy_block",
            Self::NoPolicy => "no_policy",
            Self::TemplateMismatch => "template_mismatch",
            Self::SaExpired => "sa_expired",
            Self::NoSaForPolicy => "no_sa_for_policy",
            Self::PolicyRemovedInUse => "policy_removed_in_use",
            Self::XfrmCounter => "xfrm_counter",
            Self::EspOversize => "esp_oversize",
            Self::MasqueradeBeforePolicy => "masquerade_before_policy",
        }
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::FindingKind::{self, *};

    /// Every kind with the name the report has always given it: the JSON
    /// schema's vocabulary. A new kind is added here; a name never changes.
    const NAMES: [(FindingKind, &str); 21] = [
        (AuthFailed, "auth_failed"),
        (IkeProposalMismatch, "ike_proposal_mismatch"),
        (EspProposalMismatch, "esp_proposal_mismatch"),
        (TsMismatch, "ts_mismatch"),
        (PeerNotRunningIke, "peer_not_running_ike"),
        (IkeBlockedLocally, "ike_blocked_locally"),
        (IkeUnanswered, "ike_unanswered"),
        (SaMissingInKernel, "sa_missing_in_kernel"),
        (TunnelDown, "tunnel_down"),
        (KernelXfrmErrors, "kernel_xfrm_errors"),
        (EspForReplacedSa, "esp_for_replaced_sa"),
        (NoSaForSpi, "no_sa_for_spi"),
        (PolicyBlock, "policy_block"),
        (NoPolicy, "no_policy"),
        (TemplateMismatch, "template_mismatch"),
        (SaExpired, "sa_expired"),
        (NoSaForPolicy, "no_sa_for_policy"),
        (PolicyRemovedInUse, "policy_removed_in_use"),
        (XfrmCounter, "xfrm_counter"),
        (EspOversize, "esp_oversize"),
        (MasqueradeBeforePolicy, "masquerade_before_policy"),
    ];

    /// Fails to compile when a kind is added without a place in `ALL`.
    fn position(kind: FindingKind) -> usize {
        match kind {
            AuthFailed => 0,
            IkeProposalMismatch => 1,
            EspProposalMismatch => 2,
            TsMismatch => 3,
            PeerNotRunningIke => 4,
            IkeBlockedLocally => 5,
            IkeUnanswered => 6,
            SaMissingInKernel => 7,
            TunnelDown => 8,
            KernelXfrmErrors => 9,
            EspForReplacedSa => 10,
            NoSaForSpi => 11,
            PolicyBlock => 12,
            NoPolicy => 13,
            TemplateMismatch => 14,
            SaExpired => 15,
            NoSaForPolicy => 16,
            PolicyRemovedInUse => 17,
            XfrmCounter => 18,
            EspOversize => 19,
            MasqueradeBeforePolicy => 20,
        }
    }

    #[test]
    fn every_kind_has_its_published_name_in_json_and_text() {
        for (i, (kind, name)) in NAMES.iter().enumerate() {
            assert_eq!(FindingKind::ALL[i], *kind);
            assert_eq!(position(*kind), i, "{kind:?}");
            assert_eq!(serde_json::to_string(kind).unwrap(), format!("\"{name}\""));
            assert_eq!(kind.to_string(), *name);
            let parsed: FindingKind = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(parsed, *kind);
        }
    }

    #[test]
    fn an_unknown_name_is_an_error() {
        assert!(serde_json::from_str::<FindingKind>("\"auth_failure\"").is_err());
    }
}
