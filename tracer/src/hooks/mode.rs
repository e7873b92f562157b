//! The mode a run is in, in one vocabulary for the report and the doctor.

use serde::Serialize;

/// How the bracket functions (the attribution of counter increments) are
/// hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookMode {
    /// Every hooked bracket through fentry/fexit.
    Fentry,
    /// Some through fentry/fexit, some through kprobes.
    FentryKprobe,
    Kprobe,
    /// No bracket: kfree_skb drop reasons + xfrm_stat deltas.
    TracepointOnly,
    /// Nothing loads (the doctor's verdict only): xfrm_stat deltas.
    CountersOnly,
}

/// The mode and whether some brackets are missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mode {
    pub hooks: HookMode,
    /// Some brackets are not hooked: increments are counted, not all tied
    /// to their packets.
    pub partial: bool,
}

impl Mode {
    /// From the number of brackets hooked by each method, and whether all
    /// of them are.
    pub fn of_brackets(fentry: usize, kprobe: usize, complete: bool) -> Self {
        let hooks = match (fentry, kprobe) {
            (0, 0) => HookMode::TracepointOnly,
            (_, 0) => HookMode::Fentry,
            (0, _) => HookMode::Kprobe,
            _ => HookMode::FentryKprobe,
        };
        Self {
            hooks,
            partial: hooks != HookMode::TracepointOnly && !complete,
        }
    }

    pub const COUNTERS_ONLY: Self = Self {
        hooks: HookMode::CountersOnly,
        partial: false,
    };
}

impl HookMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::FentryKprobe => "fentry+kprobe",
            Self::Kprobe => "kprobe",
            Self::TracepointOnly => "tracepoint-only",
            Self::CountersOnly => "counters-only",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.hooks.name())?;
        if self.partial {
            f.write_str(" (partial)")?;
        }
        Ok(())
    }
}

impl Serialize for Mode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
