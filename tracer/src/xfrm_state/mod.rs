//! The kernel's SAs and policies, read over NETLINK_XFRM (what `ip xfrm
//! state` / `ip xfrm policy` show). Keys are skipped by the parser: they
//! never reach memory we keep, a report or a log.
//!
//! The message layouts are the stable UAPI of `<linux/xfrm.h>`.

mod book;
pub mod netlink;
mod overhead;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::Serialize;

pub use book::XfrmBook;
pub use overhead::EspGeometry;

/// What a selector matches (addresses with prefix lengths, protocol, ports).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Selector {
    pub src: String,
    pub dst: String,
    /// 0 = any.
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ifindex: i32,
}

/// A packet's flow, as a selector is matched against it.
#[derive(Clone, Copy, Debug)]
pub struct FlowQuery {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Selector {
    /// Whether the selector covers `flow` (a zero protocol or port is any).
    pub fn matches(&self, flow: &FlowQuery) -> bool {
        covers(&self.src, flow.src)
            && covers(&self.dst, flow.dst)
            && (self.proto == 0 || self.proto == flow.proto)
            && (self.sport == 0 || self.sport == flow.sport)
            && (self.dport == 0 || self.dport == flow.dport)
    }
}

/// Whether `prefix` (`address/length`) contains `address`.
pub fn covers(prefix: &str, address: IpAddr) -> bool {
    let Some((net, len)) = prefix.split_once('/') else {
        return false;
    };
    let (Ok(net), Ok(len)) = (net.parse::<IpAddr>(), len.parse::<u32>()) else {
        return false;
    };
    let within = |net: u128, address: u128, bits: u32| {
        len == 0 || (len <= bits && (net ^ address) >> (bits - len) == 0)
    };
    match (net, address) {
        (IpAddr::V4(net), IpAddr::V4(address)) => {
            within(u32::from(net).into(), u32::from(address).into(), 32)
        }
        (IpAddr::V6(net), IpAddr::V6(address)) => within(net.into(), address.into(), 128),
        _ => false,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Algorithm {
    /// Kernel crypto name, e.g. `rfc4106(gcm(aes))`, `cbc(aes)`, `hmac(sha256)`.
    pub name: String,
    pub key_bits: u32,
    /// ICV (AEAD) or truncation (auth) length in bits; 0 for ciphers.
    pub icv_bits: u32,
}

/// UDP encapsulation (NAT traversal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Encap {
    /// 1 = ESP in UDP (non-IKE), 2 = ESP in UDP (RFC 3948), 7 = ESP in TCP.
    pub kind: u16,
    pub sport: u16,
    pub dport: u16,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Lifetime {
    pub soft_bytes: u64,
    pub hard_bytes: u64,
    pub soft_packets: u64,
    pub hard_packets: u64,
    pub soft_add_secs: u64,
    pub hard_add_secs: u64,
}

/// One SA, without its keys.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Sa {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Host order.
    pub spi: u32,
    /// 50 ESP, 51 AH, 108 IPComp.
    pub proto: u8,
    pub reqid: u32,
    pub mode: Mode,
    pub replay_window: u32,
    pub selector: Selector,
    pub aead: Option<Algorithm>,
    pub cipher: Option<Algorithm>,
    pub auth: Option<Algorithm>,
    pub encap: Option<Encap>,
    pub lifetime: Lifetime,
    pub bytes: u64,
    pub packets: u64,
    /// Packets dropped by the replay check and by the integrity check.
    pub replay_errors: u32,
    pub integrity_failures: u32,
    pub mark: Option<(u32, u32)>,
    pub if_id: Option<u32>,
}

#[cfg(test)]
impl Sa {
    /// An ESP SA from 192.0.2.1 to `dst`, no algorithm, no traffic (for
    /// the tests of its readers).
    pub fn example(spi: u32, reqid: u32, dst: &str, mode: Mode) -> Self {
        Self {
            src: "192.0.2.1".parse().unwrap(),
            dst: dst.parse().unwrap(),
            spi,
            proto: 50,
            reqid,
            mode,
            replay_window: 0,
            selector: Selector::default(),
            aead: None,
            cipher: None,
            auth: None,
            encap: None,
            lifetime: Lifetime::default(),
            bytes: 0,
            packets: 0,
            replay_errors: 0,
            integrity_failures: 0,
            mark: None,
            if_id: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Transport,
    Tunnel,
    RouteOptimization,
    InTrigger,
    Beet,
    IpTfs,
    Other,
}

impl Mode {
    fn from_uapi(value: u8) -> Self {
        match value {
            0 => Self::Transport,
            1 => Self::Tunnel,
            2 => Self::RouteOptimization,
            3 => Self::InTrigger,
            4 => Self::Beet,
            5 => Self::IpTfs,
            _ => Self::Other,
        }
    }
}

/// One template of a policy: the SA a matching packet needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Template {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub spi: u32,
    pub reqid: u32,
    pub mode: Mode,
    pub optional: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub selector: Selector,
    /// `in`, `out` or `fwd`.
    pub dir: &'static str,
    /// `allow` or `block`.
    pub action: &'static str,
    pub index: u32,
    pub priority: u32,
    pub templates: Vec<Template>,
    pub mark: Option<(u32, u32)>,
    pub if_id: Option<u32>,
}

/// The interface of a route-based VPN: what is routed into it is
/// encrypted with the SA it selects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VpnInterface {
    pub name: String,
    pub ifindex: u32,
    #[serde(flatten)]
    pub kind: VpnInterfaceKind,
}

/// How a VPN interface selects its policies and SAs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum VpnInterfaceKind {
    /// `ip link add NAME type xfrm if_id N`: the policies and SAs carry
    /// its if_id.
    Xfrm { if_id: u32 },
    /// `ip link add NAME type vti|vti6 local L remote R ikey I okey O`: a
    /// packet leaving it is looked up with the mark O (an arriving one
    /// with I), so its policies and SAs carry that mark or none, and the
    /// kernel sends it only through an SA from L to R (an unspecified L
    /// matches any).
    Vti {
        ikey: u32,
        okey: u32,
        local: IpAddr,
        remote: IpAddr,
    },
}

/// Every SA, policy and VPN interface of the current thread's network
/// namespace.
#[derive(Clone, Debug, Default, Serialize)]
pub struct XfrmState {
    pub sas: Vec<Sa>,
    pub policies: Vec<Policy>,
    pub interfaces: Vec<VpnInterface>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NETLINK_XFRM: {0}")]
    Io(#[from] std::io::Error),
    #[error("NETLINK_XFRM: malformed message: {0}")]
    Malformed(&'static str),
}

impl XfrmState {
    /// Dumps the SAs and policies of the calling thread's netns.
    pub fn read() -> Result<Self, Error> {
        let socket = netlink::Socket::open(netlink::NETLINK_XFRM)?;
        let sas = socket
            .dump(netlink::XFRM_MSG_GETSA, netlink::USERSA_INFO_LEN)?
            .iter()
            .map(|m| netlink::parse_sa(m))
            .collect::<Result<_, _>>()?;
        let policies = socket
            .dump(netlink::XFRM_MSG_GETPOLICY, netlink::USERPOLICY_INFO_LEN)?
            .iter()
            .map(|m| netlink::parse_policy(m))
            .collect::<Result<_, _>>()?;
        let interfaces = netlink::Socket::open(netlink::NETLINK_ROUTE)?
            .dump(netlink::RTM_GETLINK, netlink::IFINFOMSG_LEN)?
            .iter()
            .filter_map(|m| netlink::parse_vpn_interface(m).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Self {
            sas,
            policies,
            interfaces,
        })
    }

    /// Dumps the SAs and policies of the netns at `ns_path`.
    pub fn read_in(ns_path: &Path) -> Result<Self, Error> {
        crate::netns::run_in(ns_path, || Self::read().map_err(std::io::Error::other))
            .map_err(Error::Io)
    }

    /// The SA with this SPI (host order) and destination, if any.
    pub fn sa(&self, spi: u32, dst: IpAddr) -> Option<&Sa> {
        self.sas.iter().find(|sa| sa.spi == spi && sa.dst == dst)
    }

    /// The policy with this index, if any.
    pub fn policy(&self, index: u32) -> Option<&Policy> {
        self.policies.iter().find(|p| p.index == index)
    }

    /// The VPN interface `ifindex`, if it is one.
    pub fn interface(&self, ifindex: u32) -> Option<&VpnInterface> {
        self.interfaces.iter().find(|i| i.ifindex == ifindex)
    }

    /// The outbound ESP SA of the VPN interface `ifindex`. An XFRM
    /// interface: the SA with its if_id that the template of its outbound
    /// policy names. A VTI: the SA from its local to its remote address
    /// whose mark its output key matches.
    pub fn interface_sa(&self, ifindex: u32) -> Option<&Sa> {
        match self.interface(ifindex)?.kind {
            VpnInterfaceKind::Xfrm { if_id } => self
                .policies
                .iter()
                .filter(|p| p.dir == "out" && p.if_id == Some(if_id))
                .flat_map(|p| &p.templates)
                .find_map(|t| {
                    self.sas.iter().find(|sa| {
                        sa.if_id == Some(if_id)
                            && sa.proto == 50
                            && sa.dst == t.dst
                            && sa.src == t.src
                    })
                }),
            VpnInterfaceKind::Vti {
                okey,
                local,
                remote,
                ..
            } => self.sas.iter().find(|sa| {
                sa.proto == 50
                    && sa.dst == remote
                    && (local.is_unspecified() || sa.src == local)
                    && sa.mark.is_none_or(|(value, mask)| okey & mask == value)
            }),
        }
    }
}

/// `xfrm_address_t` (16 bytes) of `family` as an address.
fn address(bytes: &[u8], family: u16) -> IpAddr {
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&bytes[..16]);
    if family == libc::AF_INET6 as u16 {
        IpAddr::V6(Ipv6Addr::from(raw))
    } else {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(src: &str, dst: &str, proto: u8, dport: u16) -> Selector {
        Selector {
            src: src.into(),
            dst: dst.into(),
            proto,
            dport,
            ..Selector::default()
        }
    }

    fn policy(index: u32, dir: &'static str, priority: u32, selector: Selector) -> Policy {
        Policy {
            selector,
            dir,
            action: "allow",
            index,
            priority,
            templates: Vec::new(),
            mark: None,
            if_id: None,
        }
    }

    fn flow(src: &str, dst: &str, proto: u8, dport: u16) -> FlowQuery {
        FlowQuery {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto,
            sport: 40000,
            dport,
        }
    }

    #[test]
    fn selectors_match_by_prefix_protocol_and_port() {
        let udp = flow("10.0.1.5", "10.0.2.9", 17, 5001);
        assert!(selector("10.0.1.0/24", "10.0.2.0/24", 0, 0).matches(&udp));
        assert!(selector("0.0.0.0/0", "10.0.2.9/32", 17, 5001).matches(&udp));
        assert!(!selector("10.0.1.0/25", "10.0.3.0/24", 0, 0).matches(&udp));
        assert!(!selector("10.0.1.0/24", "10.0.2.0/24", 6, 0).matches(&udp));
        assert!(!selector("10.0.1.0/24", "10.0.2.0/24", 17, 500).matches(&udp));
        assert!(!selector("::/0", "::/0", 0, 0).matches(&udp));
        let v6 = flow("fd00:1::5", "fd00:2::9", 58, 0);
        assert!(selector("fd00:1::/64", "fd00:2::/64", 0, 0).matches(&v6));
        assert!(!selector("fd00:1::/64", "fd00:3::/64", 0, 0).matches(&v6));
    }

    #[test]
    fn the_policy_for_a_flow_is_the_lowest_priority_then_the_oldest() {
        let wide = selector("0.0.0.0/0", "0.0.0.0/0", 0, 0);
        let narrow = selector("10.0.1.0/24", "10.0.2.0/24", 0, 0);
        let state = XfrmState {
            sas: Vec::new(),
            policies: vec![
                policy(0x11, "out", 100, wide.clone()),
                policy(0x19, "out", 50, narrow.clone()),
                policy(0x21, "out", 50, narrow.clone()),
                policy(0x1a, "fwd", 10, narrow),
            ],
            interfaces: Vec::new(),
        };
        let book = XfrmBook::seen(7, state);
        let udp = flow("10.0.1.5", "10.0.2.9", 17, 5001);
        assert_eq!(book.policy_for(7, "out", &udp).map(|p| p.index), Some(0x19));
        assert_eq!(book.policy_for(7, "fwd", &udp).map(|p| p.index), Some(0x1a));
        assert_eq!(book.policy_for(7, "in", &udp).map(|p| p.index), None);
        let other = flow("192.0.2.1", "198.51.100.1", 6, 22);
        assert_eq!(
            book.policy_for(7, "out", &other).map(|p| p.index),
            Some(0x11)
        );
        assert!(book.policy_for(8, "out", &udp).is_none());
    }
}
