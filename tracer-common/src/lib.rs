//! Types shared by the eBPF programs (`tracer-ebpf`) and userspace (`tracer`).
//!
//! Every type is `#[repr(C)]` with explicit padding, and its size asserted
//! at compile time, so both sides agree on the layout byte for byte. Flags
//! are integers, never `bool`.
#![no_std]

pub mod attribution;
pub mod capture;
pub mod drops;
pub mod ike;
pub mod layout;
pub mod masquerade;
pub mod mtu;
pub mod names;
pub mod netns;
