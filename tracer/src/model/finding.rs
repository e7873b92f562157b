//! A finding: one cause the diagnosis names, with its fix and evidence.

use serde::Serialize;

/// One diagnosed cause.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Finding {
    pub kind: String,
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
