//! The xfrm-trace eBPF programs, one module per concern.
//!
//! Struct offsets and tracepoint layouts are not compiled in: userspace
//! resolves them from the running kernel (BTF, tracefs) and writes them into
//! the globals (here the offsets every concern reads, in a concern's module
//! the ones only it reads) before loading, so one object runs on every kernel.
#![no_std]
#![no_main]

// Shared readers.
mod args;
mod capture;
mod packet;
mod skb;

// Concerns: their maps and programs.
mod attribution;
mod brackets;
mod claims;
mod doctor;
mod drops;
mod ike;
mod masquerade;
mod mtu;
mod netns;

use aya_ebpf::Global;
use tracer_common::layout::KernelOffsets;

#[unsafe(no_mangle)]
static KERNEL_OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::UNSET);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
