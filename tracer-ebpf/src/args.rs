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

/// The fentry and kprobe form of one entry hook.
/// (The fentry/kprobe macros and both context types must be in scope where
/// it is used.)
macro_rules! entry_hook {
    ($function:tt, $handler:ident => $fentry:ident, $kprobe:ident) => {
        #[fentry(function = $function)]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            $handler(&ctx);
            0
        }

        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            $handler(&ctx);
            0
        }
    };
}
pub(crate) use entry_hook;
