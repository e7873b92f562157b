//! The vocabulary every other module shares: findings, hook outcomes and
//! captured packets. A leaf: it imports nothing from the rest of the crate,
//! so capabilities, the report and the sinks can all depend on it without
//! depending on each other (see ARCHITECTURE.md).

mod finding;
mod hooks;
mod names;
mod packet;

pub use finding::{Finding, FindingKind};
pub use hooks::HookList;
pub use names::{Names, NetnsInfo};
pub use packet::{CaptureCounts, Captured};
