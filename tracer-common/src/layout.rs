//! Offsets that the eBPF programs need, resolved by userspace at load time
//! from the running kernel's BTF and tracefs, never from one kernel's headers.

/// Marks an offset the running kernel does not have.
pub const ABSENT: u32 = u32::MAX;

/// Field offsets inside the `skb:kfree_skb` tracepoint record (from its
/// tracefs `format` file; the record changed in 5.17 and again in 6.11).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KfreeSkbRecord {
    pub skbaddr: u32,
    pub location: u32,
    pub protocol: u32,
    /// `ABSENT` before 5.17 (no drop reasons).
    pub reason: u32,
}

impl KfreeSkbRecord {
    pub const UNSET: Self = Self {
        skbaddr: ABSENT,
        location: ABSENT,
        protocol: ABSENT,
        reason: ABSENT,
    };
}

/// Where the value of a `KernelOffsets` field comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSource {
    /// The byte offset of a member (a dotted path through nested members)
    /// of a kernel struct that every supported kernel has: loading fails
    /// without it.
    Required {
        ty: &'static str,
        path: &'static str,
    },
    /// Like `Required`, for a member some kernels lack (by version or
    /// config): `ABSENT` there, and the programs skip what needs it.
    Optional {
        ty: &'static str,
        path: &'static str,
    },
    /// Not a member's offset: userspace computes it with its own code.
    Computed,
}

/// One `KernelOffsets` field, as the `FIELDS` table lists it.
#[derive(Clone, Copy, Debug)]
pub struct OffsetField {
    pub name: &'static str,
    pub source: OffsetSource,
    /// The field in a `KernelOffsets`.
    pub slot: fn(&mut KernelOffsets) -> &mut u32,
}

/// Declares `KernelOffsets` from one list: its `u32` fields, their value
/// in `UNSET`, and the `FIELDS` table userspace resolves them by. Each
/// entry is `name: required("struct", "member.path")`,
/// `optional("struct", "member.path")` or `computed(unset value)`.
macro_rules! kernel_offsets {
    (@unset required($ty:literal, $path:literal)) => { ABSENT };
    (@unset optional($ty:literal, $path:literal)) => { ABSENT };
    (@unset computed($unset:expr)) => { $unset };
    (@source required($ty:literal, $path:literal)) => {
        OffsetSource::Required { ty: $ty, path: $path }
    };
    (@source optional($ty:literal, $path:literal)) => {
        OffsetSource::Optional { ty: $ty, path: $path }
    };
    (@source computed($unset:expr)) => { OffsetSource::Computed };
    ($($(#[$meta:meta])* $name:ident: $kind:ident($($arg:tt)*),)*) => {
        /// How many `u32` fields: an odd number takes a padding field.
        const U32_FIELDS: usize = [$(stringify!($name)),*].len();

        /// Byte offsets of kernel struct members (from BTF), and the few
        /// values the programs need that are not offsets.
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct KernelOffsets {
            /// Address of `__per_cpu_offset` (from kallsyms; 0 = unknown).
            /// First, so the `u32` fields need at most one padding field.
            pub per_cpu_offset: u64,
            $($(#[$meta])* pub $name: u32,)*
            /// Explicit, so no byte of the struct is implicit padding.
            pub _pad: [u32; U32_FIELDS % 2],
        }

        impl KernelOffsets {
            pub const UNSET: Self = Self {
                per_cpu_offset: 0,
                $($name: kernel_offsets!(@unset $kind($($arg)*)),)*
                _pad: [0; U32_FIELDS % 2],
            };

            /// Every `u32` field, in declaration order.
            pub const FIELDS: &'static [OffsetField] = &[$(OffsetField {
                name: stringify!($name),
                source: kernel_offsets!(@source $kind($($arg)*)),
                slot: |offsets| &mut offsets.$name,
            },)*];
        }
    };
}

kernel_offsets! {
    sk_buff_dev: required("sk_buff", "dev"),
    sk_buff_sk: required("sk_buff", "sk"),
    sk_buff_head: required("sk_buff", "head"),
    sk_buff_network_header: required("sk_buff", "network_header"),
    sk_buff_refdst: required("sk_buff", "_skb_refdst"),
    net_device_ifindex: required("net_device", "ifindex"),
    net_device_nd_net: required("net_device", "nd_net"),
    sock_net: required("sock", "__sk_common.skc_net"),
    net_ns_inum: required("net", "ns.inum"),
    /// ABSENT without CONFIG_XFRM_STATISTICS.
    net_xfrm_statistics: optional("net", "mib.xfrm_statistics"),
    dst_entry_xfrm: optional("dst_entry", "xfrm"),
    dst_entry_ops: optional("dst_entry", "ops"),
    dst_ops_family: optional("dst_ops", "family"),
    xfrm_state_spi: optional("xfrm_state", "id.spi"),
    xfrm_state_reqid: optional("xfrm_state", "props.reqid"),
    xfrm_policy_index: optional("xfrm_policy", "index"),
    flowi4_saddr: optional("flowi", "u.ip4.saddr"),
    flowi4_daddr: optional("flowi", "u.ip4.daddr"),
    flowi4_proto: optional("flowi", "u.ip4.__fl_common.flowic_proto"),
    flowi4_sport: optional("flowi", "u.ip4.uli.ports.sport"),
    flowi4_dport: optional("flowi", "u.ip4.uli.ports.dport"),
    flowi6_saddr: optional("flowi", "u.ip6.saddr"),
    flowi6_daddr: optional("flowi", "u.ip6.daddr"),
    flowi6_proto: optional("flowi", "u.ip6.__fl_common.flowic_proto"),
    flowi6_sport: optional("flowi", "u.ip6.uli.ports.sport"),
    flowi6_dport: optional("flowi", "u.ip6.uli.ports.dport"),
    sk_buff_transport_header: optional("sk_buff", "transport_header"),
    sk_buff_end: optional("sk_buff", "end"),
    skb_shared_info_gso_size: optional("skb_shared_info", "gso_size"),
    net_device_mtu: optional("net_device", "mtu"),
    /// Number of XFRM counters (`__LINUX_MIB_XFRMMAX`, from BTF; 0 =
    /// unknown).
    xfrm_counters: computed(0),
    // MASQUERADE-before-IPsec detection.
    sk_buff_len: optional("sk_buff", "len"),
    dst_entry_dev: optional("dst_entry", "dev"),
    /// `xfrm_dst.pols` (its first element, `pols[0]`).
    xfrm_dst_pols: optional("xfrm_dst", "pols"),
    xfrm_state_daddr: optional("xfrm_state", "id.daddr"),
    xfrm_state_family: optional("xfrm_state", "props.family"),
    /// The SA's protocol (ESP 50, AH 51, IPComp 108) and the bytes its
    /// mode puts before the inner packet (outer IP header, ESP header, IV).
    xfrm_state_proto: optional("xfrm_state", "id.proto"),
    xfrm_state_header_len: optional("xfrm_state", "props.header_len"),
    xfrm_policy_sel_saddr: optional("xfrm_policy", "selector.saddr"),
    xfrm_policy_sel_daddr: optional("xfrm_policy", "selector.daddr"),
    xfrm_policy_sel_family: optional("xfrm_policy", "selector.family"),
    xfrm_policy_sel_prefixlen_s: optional("xfrm_policy", "selector.prefixlen_s"),
    xfrm_policy_sel_prefixlen_d: optional("xfrm_policy", "selector.prefixlen_d"),
    xfrm_policy_sel_proto: optional("xfrm_policy", "selector.proto"),
    /// `sk_buff.data`: where a received packet's IP header starts.
    sk_buff_data: optional("sk_buff", "data"),
    /// `sk_buff.tail` (an offset from `head` on 64-bit kernels): where the
    /// linear data ends, so header copies stop at the packet's end.
    sk_buff_tail: optional("sk_buff", "tail"),
    // The SAs that decapsulated a received packet: its sec_path, an skb
    // extension (ABSENT without CONFIG_SKB_EXTENSIONS).
    sk_buff_active_extensions: optional("sk_buff", "active_extensions"),
    sk_buff_extensions: optional("sk_buff", "extensions"),
    skb_ext_offset: optional("skb_ext", "offset"),
    /// `SKB_EXT_SEC_PATH` (its value depends on the kernel's config).
    skb_ext_sec_path: computed(ABSENT),
    sec_path_len: optional("sec_path", "len"),
    sec_path_xvec: optional("sec_path", "xvec"),
    /// `net_device.rtnl_link_ops` and its `kind` ("xfrm" for an XFRM
    /// interface).
    net_device_rtnl_link_ops: optional("net_device", "rtnl_link_ops"),
    rtnl_link_ops_kind: optional("rtnl_link_ops", "kind"),
    /// The calling task's netns (`current->nsproxy->net_ns`): how the
    /// shadow set-up program finds the netns userspace entered.
    task_struct_nsproxy: optional("task_struct", "nsproxy"),
    nsproxy_net_ns: optional("nsproxy", "net_ns"),
    // A packet's conntrack entry (the flow before NAT); ABSENT where the
    // kernel's BTF lacks conntrack's structs.
    sk_buff_nfct: optional("sk_buff", "_nfct"),
    /// Where the original and the reply direction's tuple are in
    /// `struct nf_conn` (`tuplehash[dir].tuple`).
    ct_original_tuple: computed(ABSENT),
    ct_reply_tuple: computed(ABSENT),
    ct_tuple_src_addr: optional("nf_conntrack_tuple", "src.u3"),
}

// Sizes the eBPF and userspace compiles must agree on, every byte a
// member (no implicit padding): a layout change updates them on purpose.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<KfreeSkbRecord>() == 16);
    assert!(size_of::<KernelOffsets>() == 248);
};

#[cfg(feature = "user")]
unsafe impl aya::Pod for KfreeSkbRecord {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}
