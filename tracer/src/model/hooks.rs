//! What a capability got attached.

use serde::Serialize;

/// Hooks attached for one capability, and those missing with the reason.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HookList {
    pub attached: Vec<String>,
    pub missing: Vec<(String, String)>,
}
