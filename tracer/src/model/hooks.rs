//! What a capability got attached.

use serde::{Deserialize, Serialize};

/// Hooks attached for one capability, and those missing with the reason.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct HookList {
    pub attached: Vec<String>,
    pub missing: Vec<(String, String)>,
}
