//! IPv6 on the same five namespaces (documentation and ULA prefixes), and
//! a static ESP tunnel (AES-GCM, reqid 2) between the gateways' IPv6 WAN
//! addresses for the IPv6 LANs: policy-based, or route-based over a VTI.

use super::{Host, Lab, Result, ipsec_static::random_key};

pub const WHOST: &str = "fd00:2::10";
pub const WEST_LAN: &str = "fd00:2::1";
pub const WEST_WAN: &str = "2001:db8:1::1";
pub const ROUTER_WEST: &str = "2001:db8:1::fe";
pub const ROUTER_EAST: &str = "2001:db8:2::fe";
pub const EAST_WAN: &str = "2001:db8:2::1";
pub const EAST_LAN: &str = "fd00:168::1";
pub const EHOST: &str = "fd00:168::10";
pub const WEST_SUBNET: &str = "fd00:2::/64";
pub const EAST_SUBNET: &str = "fd00:168::/64";
pub const SPI_WEST_TO_EAST: &str = "0x00003003";
pub const SPI_EAST_TO_WEST: &str = "0x00004004";
/// The VTI of the route-based variant, and its key (input and output):
/// the mark of its policies.
pub const VTI_INTERFACE: &str = "vti1v6";
pub const VTI_KEY: u32 = 6;

impl Lab {
    /// IPv6 addresses, routes and forwarding, and the IPv6 ESP tunnel.
    pub fn ipv6_static_tunnel(&self) -> Result<()> {
        self.ipv6_tunnel(false)
    }

    /// The same, route-based: the remote LAN is routed into a VTI
    /// (`VTI_INTERFACE`) between the WAN addresses, whose key marks the
    /// policies; the SAs carry no mark (as the kernel's own PMTU selftest
    /// sets VTIs up), so the policy alone ties them to the VTI.
    pub fn ipv6_vti_tunnel(&self) -> Result<()> {
        self.ipv6_tunnel(true)
    }

    fn ipv6_tunnel(&self, over_vti: bool) -> Result<()> {
        for (host, address, dev) in [
            (Host::Whost, "fd00:2::10/64", "eth0"),
            (Host::West, "fd00:2::1/64", "lan0"),
            (Host::West, "2001:db8:1::1/64", "wan0"),
            (Host::Router, "2001:db8:1::fe/64", "r-west"),
            (Host::Router, "2001:db8:2::fe/64", "r-east"),
            (Host::East, "2001:db8:2::1/64", "wan0"),
            (Host::East, "fd00:168::1/64", "lan0"),
            (Host::Ehost, "fd00:168::10/64", "eth0"),
        ] {
            self.ip_line(host, &format!("-6 addr add {address} dev {dev} nodad"))?;
        }
        for (host, via) in [
            (Host::Whost, WEST_LAN),
            (Host::West, ROUTER_WEST),
            (Host::East, ROUTER_EAST),
            (Host::Ehost, EAST_LAN),
        ] {
            self.ip_line(host, &format!("-6 route add default via {via}"))?;
        }
        for host in [Host::West, Host::Router, Host::East] {
            self.sysctl(host, "net.ipv6.conf.all.forwarding", "1")?;
        }
        let keys = [random_key(20)?, random_key(20)?];
        let vti_key = VTI_KEY.to_string();
        let mark: &[&str] = if over_vti { &["mark", &vti_key] } else { &[] };
        for gw in [Host::West, Host::East] {
            for ((src, dst, spi), key) in [
                (WEST_WAN, EAST_WAN, SPI_WEST_TO_EAST),
                (EAST_WAN, WEST_WAN, SPI_EAST_TO_WEST),
            ]
            .into_iter()
            .zip(&keys)
            {
                let state = [
                    "xfrm",
                    "state",
                    "add",
                    "src",
                    src,
                    "dst",
                    dst,
                    "proto",
                    "esp",
                    "spi",
                    spi,
                    "reqid",
                    "2",
                    "mode",
                    "tunnel",
                    "aead",
                    "rfc4106(gcm(aes))",
                    key,
                    "128",
                ];
                self.ip(gw, &state)?;
            }
            let (local, remote, local_net, remote_net) = match gw {
                Host::West => (WEST_WAN, EAST_WAN, WEST_SUBNET, EAST_SUBNET),
                _ => (EAST_WAN, WEST_WAN, EAST_SUBNET, WEST_SUBNET),
            };
            if over_vti {
                self.ip_line(gw, &format!("link add {VTI_INTERFACE} type vti6 local {local} remote {remote} key {vti_key}"))?;
                self.ip_line(gw, &format!("link set {VTI_INTERFACE} up"))?;
                self.ip_line(
                    gw,
                    &format!("-6 route add {remote_net} dev {VTI_INTERFACE}"),
                )?;
            }
            for (dir, src, dst, tsrc, tdst) in [
                ("out", local_net, remote_net, local, remote),
                ("in", remote_net, local_net, remote, local),
                ("fwd", remote_net, local_net, remote, local),
            ] {
                let policy = [
                    "xfrm", "policy", "add", "src", src, "dst", dst, "dir", dir, "tmpl", "src",
                    tsrc, "dst", tdst, "proto", "esp", "reqid", "2", "mode", "tunnel",
                ];
                self.ip(gw, &[&policy[..], mark].concat())?;
            }
        }
        Ok(())
    }
}
