//! Whether we may load eBPF programs.

#[derive(Debug, thiserror::Error)]
#[error(
    "xfrm-trace needs root (CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load eBPF programs and read other namespaces: run it with sudo"
)]
pub struct NotRoot;

/// Fails unless running as root (effective uid 0).
pub fn require_root() -> Result<(), NotRoot> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(NotRoot)
    }
}
