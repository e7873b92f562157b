//! Function arguments, the same way from a trampoline (fentry) or from
//! registers (kprobe), so one handler serves both forms of a hook.

use aya_ebpf::programs::{FEntryContext, ProbeContext};

pub(crate) trait Args {
    fn arg_u64(&self, n: usize) -> u64;
}

impl Args for FEntryContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n)
    }
}

impl Args for ProbeContext {
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        self.arg(n).unwrap_or(0)
    }
}
