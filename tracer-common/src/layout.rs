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

/// Byte offsets of kernel struct members (from BTF).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sk_buff_dev: u32,
    pub sk_buff_sk: u32,
    pub sk_buff_head: u32,
    pub sk_buff_network_header: u32,
    pub sk_buff_refdst: u32,
    pub net_device_ifindex: u32,
    pub net_device_nd_net: u32,
    pub sock_net: u32,
    pub net_ns_inum: u32,
    /// `net.mib.xfrm_statistics` (ABSENT without CONFIG_XFRM_STATISTICS).
    pub net_xfrm_statistics: u32,
    pub dst_entry_xfrm: u32,
    pub dst_entry_ops: u32,
    pub dst_ops_family: u32,
    pub xfrm_state_spi: u32,
    pub xfrm_state_reqid: u32,
    pub xfrm_policy_index: u32,
    pub flowi4_saddr: u32,
    pub flowi4_daddr: u32,
    pub flowi4_proto: u32,
    pub flowi4_sport: u32,
    pub flowi4_dport: u32,
    pub flowi6_saddr: u32,
    pub flowi6_daddr: u32,
    pub flowi6_proto: u32,
    pub flowi6_sport: u32,
    pub flowi6_dport: u32,
    pub sk_buff_transport_header: u32,
    pub sk_buff_end: u32,
    pub skb_shared_info_gso_size: u32,
    pub net_device_mtu: u32,
    /// Number of XFRM counters (`__LINUX_MIB_XFRMMAX`).
    pub xfrm_counters: u32,
    pub _pad: u32,
    /// Address of `__per_cpu_offset` (from kallsyms; 0 = unknown).
    pub per_cpu_offset: u64,
    // MASQUERADE-before-IPsec detection (all optional).
    pub sk_buff_len: u32,
    pub dst_entry_dev: u32,
    /// `xfrm_dst.pols` (its first element, `pols[0]`).
    pub xfrm_dst_pols: u32,
    pub xfrm_state_daddr: u32,
    pub xfrm_state_family: u32,
    pub xfrm_policy_sel_saddr: u32,
    pub xfrm_policy_sel_daddr: u32,
    pub xfrm_policy_sel_family: u32,
    pub xfrm_policy_sel_prefixlen_s: u32,
    pub xfrm_policy_sel_prefixlen_d: u32,
    pub xfrm_policy_sel_proto: u32,
    /// `sk_buff.data`: where a received packet's IP header starts.
    pub sk_buff_data: u32,
    /// `sk_buff.tail` (an offset from `head` on 64-bit kernels): where the
    /// linear data ends, so header copies stop at the packet's end.
    pub sk_buff_tail: u32,
    // The SAs that decapsulated a received packet: its sec_path, an skb
    // extension (all optional; ABSENT without CONFIG_SKB_EXTENSIONS).
    pub sk_buff_active_extensions: u32,
    pub sk_buff_extensions: u32,
    pub skb_ext_offset: u32,
    /// `SKB_EXT_SEC_PATH` (its value depends on the kernel's config).
    pub skb_ext_sec_path: u32,
    pub sec_path_len: u32,
    pub sec_path_xvec: u32,
    /// `net_device.rtnl_link_ops` and its `kind` ("xfrm" for an XFRM
    /// interface).
    pub net_device_rtnl_link_ops: u32,
    pub rtnl_link_ops_kind: u32,
    pub _pad2: u32,
}

impl KfreeSkbRecord {
    pub const UNSET: Self = Self {
        skbaddr: ABSENT,
        location: ABSENT,
        protocol: ABSENT,
        reason: ABSENT,
    };
}

impl KernelOffsets {
    pub const UNSET: Self = Self {
        sk_buff_dev: ABSENT,
        sk_buff_sk: ABSENT,
        sk_buff_head: ABSENT,
        sk_buff_network_header: ABSENT,
        sk_buff_refdst: ABSENT,
        net_device_ifindex: ABSENT,
        net_device_nd_net: ABSENT,
        sock_net: ABSENT,
        net_ns_inum: ABSENT,
        net_xfrm_statistics: ABSENT,
        dst_entry_xfrm: ABSENT,
        dst_entry_ops: ABSENT,
        dst_ops_family: ABSENT,
        xfrm_state_spi: ABSENT,
        xfrm_state_reqid: ABSENT,
        xfrm_policy_index: ABSENT,
        flowi4_saddr: ABSENT,
        flowi4_daddr: ABSENT,
        flowi4_proto: ABSENT,
        flowi4_sport: ABSENT,
        flowi4_dport: ABSENT,
        flowi6_saddr: ABSENT,
        flowi6_daddr: ABSENT,
        flowi6_proto: ABSENT,
        flowi6_sport: ABSENT,
        flowi6_dport: ABSENT,
        sk_buff_transport_header: ABSENT,
        sk_buff_end: ABSENT,
        skb_shared_info_gso_size: ABSENT,
        net_device_mtu: ABSENT,
        xfrm_counters: 0,
        _pad: 0,
        per_cpu_offset: 0,
        sk_buff_len: ABSENT,
        dst_entry_dev: ABSENT,
        xfrm_dst_pols: ABSENT,
        xfrm_state_daddr: ABSENT,
        xfrm_state_family: ABSENT,
        xfrm_policy_sel_saddr: ABSENT,
        xfrm_policy_sel_daddr: ABSENT,
        xfrm_policy_sel_family: ABSENT,
        xfrm_policy_sel_prefixlen_s: ABSENT,
        xfrm_policy_sel_prefixlen_d: ABSENT,
        xfrm_policy_sel_proto: ABSENT,
        sk_buff_data: ABSENT,
        sk_buff_tail: ABSENT,
        sk_buff_active_extensions: ABSENT,
        sk_buff_extensions: ABSENT,
        skb_ext_offset: ABSENT,
        skb_ext_sec_path: ABSENT,
        sec_path_len: ABSENT,
        sec_path_xvec: ABSENT,
        net_device_rtnl_link_ops: ABSENT,
        rtnl_link_ops_kind: ABSENT,
        _pad2: 0,
    };
}

#[cfg(feature = "user")]
unsafe impl aya::Pod for KfreeSkbRecord {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelOffsets {}
