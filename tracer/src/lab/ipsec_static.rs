//! IPsec with static `ip xfrm` SAs and policies (no IKE daemon).

use std::os::fd::OwnedFd;

use super::{EAST_SUBNET, EAST_WAN, Host, Lab, LabError, Result, WEST_SUBNET, WEST_WAN, io};

/// SPI of the west->east SA.
pub const SPI_WEST_TO_EAST: u32 = 0x1001;
/// SPI of the east->west SA.
pub const SPI_EAST_TO_WEST: u32 = 0x2002;
pub const REQID: u32 = 1;
/// The XFRM interface of a route-based tunnel, and its if_id.
pub const XFRM_INTERFACE: &str = "ipsec1";
pub const IF_ID: u32 = 7;
/// The VTI of a route-based tunnel, and its key (input and output): the
/// mark of its policies and SAs.
pub const VTI_INTERFACE: &str = "vti1";
pub const VTI_KEY: u32 = 5;

/// How traffic is steered into the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// By the policies' selectors.
    Policy,
    /// Route-based (tunnel mode): the remote subnet is routed into an XFRM
    /// interface (`XFRM_INTERFACE`), and the SAs and policies carry its
    /// if_id, as libreswan's `ipsec-interface=` sets it up.
    XfrmInterface,
    /// Route-based (tunnel mode) over a VTI (`VTI_INTERFACE` between the
    /// gateways' WAN addresses): the remote subnet is routed into it, and
    /// the SAs and policies carry its key as their mark, as libreswan's
    /// `vti-interface=` with `mark=` sets it up.
    Vti,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Subnet to subnet through the gateways.
    Tunnel,
    /// Gateway to gateway (their WAN addresses).
    Transport,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// rfc4106(gcm(aes)), 128-bit key, 128-bit ICV.
    AesGcm128,
    /// cbc(aes) 128-bit key + hmac(sha256) truncated to 128 bits.
    AesCbcHmacSha256,
}

#[derive(Clone, Copy, Debug)]
pub struct StaticIpsec {
    pub mode: Mode,
    pub cipher: Cipher,
    /// ESP in UDP 4500 (NAT traversal encapsulation).
    pub nat_t: bool,
    /// 0 disables anti-replay (the kernel's default for static SAs).
    pub replay_window: u32,
    /// The SAs installed on this gateway expire (hard) after this many
    /// packets, as a rekey that never happens would leave them.
    pub expire_after_packets: Option<(Host, u64)>,
    pub routing: Routing,
}

impl Default for StaticIpsec {
    fn default() -> Self {
        Self {
            mode: Mode::Tunnel,
            cipher: Cipher::AesGcm128,
            nat_t: false,
            replay_window: 32,
            expire_after_packets: None,
            routing: Routing::Policy,
        }
    }
}

/// `len` random bytes as `0x...`: every lab gets fresh keys, never shown.
pub(super) fn random_key(len: usize) -> Result<String> {
    use std::io::Read as _;
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io("reading /dev/urandom"))?;
    Ok(format!(
        "0x{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

impl StaticIpsec {
    fn algorithm_args(&self) -> Result<Vec<String>> {
        Ok(match self.cipher {
            Cipher::AesGcm128 => vec![
                "aead".into(),
                "rfc4106(gcm(aes))".into(),
                random_key(20)?,
                "128".into(),
            ],
            Cipher::AesCbcHmacSha256 => vec![
                "enc".into(),
                "cbc(aes)".into(),
                random_key(16)?,
                "auth-trunc".into(),
                "hmac(sha256)".into(),
                random_key(32)?,
                "128".into(),
            ],
        })
    }

    fn mode_name(&self) -> &'static str {
        match self.mode {
            Mode::Tunnel => "tunnel",
            Mode::Transport => "transport",
        }
    }
}

impl Lab {
    /// Installs the same pair of SAs on both gateways and each gateway's
    /// policies (out, in, and fwd in tunnel mode).
    pub fn static_ipsec(&mut self, config: &StaticIpsec) -> Result<()> {
        self.warm_crypto()?;
        let west_to_east = config.algorithm_args()?;
        let east_to_west = config.algorithm_args()?;
        let if_id = IF_ID.to_string();
        let vti_key = VTI_KEY.to_string();
        // What marks the SAs and policies as the route-based interface's.
        let selected_by: &[&str] = match config.routing {
            Routing::Policy => &[],
            Routing::XfrmInterface => &["if_id", &if_id],
            Routing::Vti => &["mark", &vti_key],
        };
        for gw in [Host::West, Host::East] {
            for (src, dst, spi, algorithm) in [
                (WEST_WAN, EAST_WAN, SPI_WEST_TO_EAST, &west_to_east),
                (EAST_WAN, WEST_WAN, SPI_EAST_TO_WEST, &east_to_west),
            ] {
                let spi = format!("{spi:#010x}");
                let reqid = REQID.to_string();
                let window = config.replay_window.to_string();
                let mut args = vec![
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
                    &spi,
                    "reqid",
                    &reqid,
                    "mode",
                    config.mode_name(),
                    "replay-window",
                    &window,
                ];
                args.extend(algorithm.iter().map(String::as_str));
                if config.nat_t {
                    args.extend(["encap", "espinudp", "4500", "4500", "0.0.0.0"]);
                }
                let limit = match config.expire_after_packets {
                    Some((host, packets)) if host == gw => packets.to_string(),
                    _ => String::new(),
                };
                if !limit.is_empty() {
                    args.extend(["limit", "packet-hard", &limit]);
                }
                args.extend(selected_by);
                self.ip(gw, &args)?;
            }
            let (local, remote, local_net, remote_net) = match gw {
                Host::West => (WEST_WAN, EAST_WAN, WEST_SUBNET, EAST_SUBNET),
                _ => (EAST_WAN, WEST_WAN, EAST_SUBNET, WEST_SUBNET),
            };
            // The route-based interface: its name and type.
            let interface: Option<(&str, &[&str])> = match config.routing {
                Routing::Policy => None,
                Routing::XfrmInterface => Some((
                    XFRM_INTERFACE,
                    &["type", "xfrm", "dev", "wan0", "if_id", &if_id],
                )),
                Routing::Vti => Some((
                    VTI_INTERFACE,
                    &[
                        "type", "vti", "local", local, "remote", remote, "key", &vti_key,
                    ],
                )),
            };
            if let Some((interface, link_type)) = interface {
                self.ip(gw, &[&["link", "add", interface][..], link_type].concat())?;
                self.ip_line(gw, &format!("link set {interface} up"))?;
                self.ip_line(gw, &format!("route add {remote_net} dev {interface}"))?;
            }
            let reqid = REQID.to_string();
            let policy = |dir: &str, src: &str, dst: &str, tmpl_src: &str, tmpl_dst: &str| {
                let args = [
                    "xfrm",
                    "policy",
                    "add",
                    "src",
                    src,
                    "dst",
                    dst,
                    "dir",
                    dir,
                    "tmpl",
                    "src",
                    tmpl_src,
                    "dst",
                    tmpl_dst,
                    "proto",
                    "esp",
                    "reqid",
                    &reqid,
                    "mode",
                    config.mode_name(),
                ];
                self.ip(gw, &[&args[..], selected_by].concat())
            };
            match config.mode {
                Mode::Tunnel => {
                    policy("out", local_net, remote_net, local, remote)?;
                    policy("in", remote_net, local_net, remote, local)?;
                    policy("fwd", remote_net, local_net, remote, local)?;
                }
                Mode::Transport => {
                    let (local_host, remote_host) = (format!("{local}/32"), format!("{remote}/32"));
                    policy("out", &local_host, &remote_host, local, remote)?;
                    policy("in", &remote_host, &local_host, remote, local)?;
                }
            }
            if config.nat_t {
                let socket = self.encap_socket(gw)?;
                self.encap_sockets.push((gw, socket));
            }
        }
        Ok(())
    }

    /// Removes every SA, policy and VPN interface of both gateways (and
    /// the NAT-T sockets), so the same topology can carry another configuration.
    pub fn clear_ipsec(&mut self) -> Result<()> {
        for gw in [Host::West, Host::East] {
            self.ip_line(gw, "xfrm state flush")?;
            self.ip_line(gw, "xfrm policy flush")?;
            // Only a route-based configuration has one.
            let _ = self.ip_line(gw, &format!("link del {XFRM_INTERFACE}"));
            let _ = self.ip_line(gw, &format!("link del {VTI_INTERFACE}"));
        }
        self.encap_sockets.clear();
        Ok(())
    }

    /// Closes `gw`'s NAT-T socket: ESP in UDP arriving there finds no
    /// socket, and the kernel answers ICMP port unreachable.
    pub fn close_encap_socket(&mut self, gw: Host) {
        self.encap_sockets.retain(|(host, _)| *host != gw);
    }

    /// A UDP socket on port 4500 marked for ESP-in-UDP: without one the
    /// kernel treats arriving UDP 4500 as plain UDP (pluto opens it for IKE).
    fn encap_socket(&self, gw: Host) -> Result<OwnedFd> {
        crate::netns::run_in(&self.ns_path(gw), || {
            let socket = std::net::UdpSocket::bind("0.0.0.0:4500")?;
            let fd = OwnedFd::from(socket);
            let encap: libc::c_int = 2; // UDP_ENCAP_ESPINUDP
            // SAFETY: fd is an open socket; the option value is a c_int we own.
            let ret = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    libc::SOL_UDP,
                    100, // UDP_ENCAP
                    std::ptr::from_ref(&encap).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(fd)
        })
        .map_err(|e| LabError::Other(format!("NAT-T socket in {}: {e}", self.ns(gw))))
    }
}
