//! The embedded eBPF object and how it is loaded into the running kernel.

use aya::{Ebpf, EbpfLoader};
use tracer_common::layout::{KernelOffsets, KfreeSkbRecord};

use crate::{
    btf::{BtfError, KernelBtf},
    tracefs::{self, TracefsError},
};

/// Built by `tracer/build.rs` from `tracer-ebpf`, so the binary is one file.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this xfrm-trace was built without its eBPF programs (AYA_BUILD_SKIP); rebuild it normally"
    )]
    NoObject,
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
}

/// Everything the programs need to know about the running kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelLayout {
    pub offsets: KernelOffsets,
    pub kfree_skb: KfreeSkbRecord,
}

impl KernelLayout {
    /// Resolves offsets from BTF and the kfree_skb record from tracefs.
    pub fn resolve(btf: &KernelBtf) -> Result<Self, LoadError> {
        let offsets = KernelOffsets {
            sk_buff_dev: btf.member_offset("sk_buff", "dev")?,
            sk_buff_sk: btf.member_offset("sk_buff", "sk")?,
            net_device_ifindex: btf.member_offset("net_device", "ifindex")?,
            net_device_nd_net: btf.member_offset("net_device", "nd_net")?,
            sock_net: btf.member_offset("sock", "__sk_common.skc_net")?,
            net_ns_inum: btf.member_offset("net", "ns.inum")?,
        };
        let format = tracefs::format("skb", "kfree_skb")?;
        let field = |name: &str| {
            tracefs::field_offset(&format, name).ok_or_else(|| TracefsError::NoField {
                tracepoint: "skb:kfree_skb".into(),
                field: name.into(),
            })
        };
        let kfree_skb = KfreeSkbRecord {
            skbaddr: field("skbaddr")?,
            location: field("location")?,
            protocol: field("protocol")?,
            // Drop reasons arrived in 5.17.
            reason: tracefs::field_offset(&format, "reason")
                .unwrap_or(tracer_common::layout::ABSENT),
        };
        Ok(Self { offsets, kfree_skb })
    }
}

/// Loads the object (maps created, no program loaded or attached yet).
pub fn load(layout: Option<&KernelLayout>) -> Result<Ebpf, LoadError> {
    if OBJECT.is_empty() {
        return Err(LoadError::NoObject);
    }
    raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    if let Some(layout) = layout {
        loader
            .override_global("KERNEL_OFFSETS", &layout.offsets, true)
            .override_global("KFREE_SKB_RECORD", &layout.kfree_skb, true);
    }
    Ok(loader.load(OBJECT)?)
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (LWN 837122).
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    if ret != 0 {
        log::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
