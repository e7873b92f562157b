//! The generic readers of kernel memory every concern uses: a field at a
//! resolved offset, and what an skb says about its namespace, interface
//! and route.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use tracer_common::layout::ABSENT;

use crate::KERNEL_OFFSETS;

/// Reads a `T` at `base + offset` in kernel memory; fails for an offset the
/// running kernel does not have.
#[inline(always)]
pub(crate) unsafe fn read_at<T>(base: u64, offset: u32) -> Result<T, i32> {
    if offset == ABSENT {
        return Err(-1);
    }
    unsafe { bpf_probe_read_kernel((base + u64::from(offset)) as *const T) }
}

/// The netns of an skb: through its device, else its socket.
#[inline(always)]
pub unsafe fn skb_net(skb: u64) -> (u64, u32) {
    let offsets = KERNEL_OFFSETS.load();
    let dev: u64 = unsafe { read_at(skb, offsets.sk_buff_dev) }.unwrap_or(0);
    if dev != 0 {
        let ifindex: u32 = unsafe { read_at(dev, offsets.net_device_ifindex) }.unwrap_or(0);
        let net: u64 = unsafe { read_at(dev, offsets.net_device_nd_net) }.unwrap_or(0);
        return (net, ifindex);
    }
    let sk: u64 = unsafe { read_at(skb, offsets.sk_buff_sk) }.unwrap_or(0);
    let net = if sk != 0 {
        unsafe { read_at(sk, offsets.sock_net) }.unwrap_or(0)
    } else {
        0
    };
    (net, 0)
}

/// The netns inode and interface of an skb (as `skb_net` finds them).
#[inline(always)]
pub unsafe fn skb_netns_and_ifindex(skb: u64) -> (u32, u32) {
    let (net, ifindex) = unsafe { skb_net(skb) };
    let netns: u32 = if net != 0 {
        unsafe { read_at(net, KERNEL_OFFSETS.load().net_ns_inum) }.unwrap_or(0)
    } else {
        0
    };
    (netns, ifindex)
}

/// The skb's route (`_skb_refdst` without the NOREF bit; 0 if none).
#[inline(always)]
pub unsafe fn skb_dst(skb: u64) -> u64 {
    let refdst: u64 = unsafe { read_at(skb, KERNEL_OFFSETS.load().sk_buff_refdst) }.unwrap_or(0);
    refdst & !1
}

/// Whether a returned kernel pointer is NULL or an error (`ERR_PTR`: the
/// top 4095 values).
#[inline(always)]
pub fn is_null_or_error(pointer: u64) -> bool {
    pointer == 0 || pointer > u64::MAX - 4095
}
