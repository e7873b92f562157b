//! The namespace lab: a small IPsec network built from network namespaces
//! and veth pairs, used by the tests and by `xfrm-trace lab`.
//!
//! ```text
//!  whost           west                    router                   east                 ehost
//!  eth0 10.0.2.10  lan0 10.0.2.1
//!                  wan0 192.0.2.1 -------- r-west 192.0.2.254
//!                                          r-east 203.0.113.254 --- wan0 203.0.113.1
//!                                                                   lan0 192.168.0.1/16 - eth0 192.168.1.10
//! ```
//!
//! Documentation and private ranges only, and only inside the namespaces.
//! The router knows the two WAN subnets and nothing else, so a packet that
//! leaves a gateway unencrypted dies there, visibly. Everything is torn down
//! when the `Lab` is dropped, also when a test fails.

mod capture;
mod ipsec_static;
pub mod ipv6;
mod pluto;
mod traffic;

use std::{
    path::PathBuf,
    process::{Command, Output},
};

pub use capture::{Capture, Packet};
pub use ipsec_static::{
    Cipher, IF_ID, Mode, REQID, Routing, SPI_EAST_TO_WEST, SPI_WEST_TO_EAST, StaticIpsec,
    VTI_INTERFACE, VTI_KEY, XFRM_INTERFACE,
};
pub use pluto::{PlutoConfig, PlutoInstance};
pub use traffic::{Df, UdpSink};

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, LabError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// The five hosts of the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Whost,
    West,
    Router,
    East,
    Ehost,
}

impl Host {
    pub const ALL: [Host; 5] = [
        Host::Whost,
        Host::West,
        Host::Router,
        Host::East,
        Host::Ehost,
    ];

    pub fn role(self) -> &'static str {
        match self {
            Host::Whost => "whost",
            Host::West => "west",
            Host::Router => "router",
            Host::East => "east",
            Host::Ehost => "ehost",
        }
    }
}

pub const WHOST: &str = "10.0.2.10";
pub const WEST_LAN: &str = "10.0.2.1";
pub const WEST_WAN: &str = "192.0.2.1";
pub const ROUTER_WEST: &str = "192.0.2.254";
pub const ROUTER_EAST: &str = "203.0.113.254";
pub const EAST_WAN: &str = "203.0.113.1";
pub const EAST_LAN: &str = "192.168.0.1";
pub const EHOST: &str = "192.168.1.10";
pub const WEST_SUBNET: &str = "10.0.2.0/24";
pub const EAST_SUBNET: &str = "192.168.0.0/16";

/// A running lab. Namespaces are named `<prefix>-<role>`.
pub struct Lab {
    prefix: String,
    plutos: Vec<PlutoInstance>,
    /// Per-lab scratch space (pluto configs, logs, sockets).
    pub run_dir: PathBuf,
    /// Open NAT-T encapsulation sockets (closing them stops decapsulation).
    encap_sockets: Vec<(Host, std::os::fd::OwnedFd)>,
}

/// Runs a command; its stdout on success, else an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output: Output = Command::new(program)
        .args(args)
        .output()
        .map_err(io(format!("cannot run {program} (is it installed?)")))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(LabError::Command {
            command: format!("{program} {}", redact(args)),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }
}

/// The arguments for an error message, with key material (long hex
/// strings, as `ip xfrm state` takes keys) replaced: never print keys.
fn redact(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            let hex = a.strip_prefix("0x").unwrap_or("");
            if hex.len() > 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                "0x<key>"
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Lab {
    /// Builds the topology: namespaces, links, addresses, routes, forwarding.
    pub fn create(prefix: &str) -> Result<Self> {
        let run_dir = PathBuf::from("/run/xfrm-trace-lab").join(prefix);
        let lab = Self {
            prefix: prefix.to_string(),
            plutos: Vec::new(),
            run_dir,
            encap_sockets: Vec::new(),
        };
        lab.remove_namespaces();
        std::fs::create_dir_all(&lab.run_dir)
            .map_err(io(format!("creating {}", lab.run_dir.display())))?;
        for host in Host::ALL {
            run("ip", &["netns", "add", &lab.ns(host)])?;
            lab.ip_line(host, "link set lo up")?;
        }
        lab.veth(Host::West, "lan0", Host::Whost, "eth0")?;
        lab.veth(Host::West, "wan0", Host::Router, "r-west")?;
        lab.veth(Host::East, "wan0", Host::Router, "r-east")?;
        lab.veth(Host::East, "lan0", Host::Ehost, "eth0")?;
        for (host, address, dev) in [
            (Host::Whost, "10.0.2.10/24", "eth0"),
            (Host::West, "10.0.2.1/24", "lan0"),
            (Host::West, "192.0.2.1/24", "wan0"),
            (Host::Router, "192.0.2.254/24", "r-west"),
            (Host::Router, "203.0.113.254/24", "r-east"),
            (Host::East, "203.0.113.1/24", "wan0"),
            (Host::East, "192.168.0.1/16", "lan0"),
            (Host::Ehost, "192.168.1.10/16", "eth0"),
        ] {
            lab.ip_line(host, &format!("addr add {address} dev {dev}"))?;
            lab.ip_line(host, &format!("link set {dev} up"))?;
        }
        lab.ip_line(Host::Whost, &format!("route add default via {WEST_LAN}"))?;
        lab.ip_line(Host::West, &format!("route add default via {ROUTER_WEST}"))?;
        lab.ip_line(Host::East, &format!("route add default via {ROUTER_EAST}"))?;
        lab.ip_line(Host::Ehost, &format!("route add default via {EAST_LAN}"))?;
        for host in [Host::West, Host::Router, Host::East] {
            lab.sysctl(host, "net.ipv4.ip_forward", "1")?;
        }
        Ok(lab)
    }

    pub fn ns(&self, host: Host) -> String {
        format!("{}-{}", self.prefix, host.role())
    }

    /// The namespace's file, for `setns`.
    pub fn ns_path(&self, host: Host) -> PathBuf {
        PathBuf::from("/run/netns").join(self.ns(host))
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, host: Host, args: &[&str]) -> Result<String> {
        let ns = self.ns(host);
        let mut full = vec!["-n", ns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip -n <ns> ...`, the command written as one line (split on
    /// whitespace: for arguments without spaces).
    pub fn ip_line(&self, host: Host, line: &str) -> Result<String> {
        self.ip(host, &line.split_whitespace().collect::<Vec<_>>())
    }

    /// A program run inside the host's namespace, written as one line
    /// (split on whitespace: for arguments without spaces).
    pub fn exec_line(&self, host: Host, line: &str) -> Result<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (program, args) = words
            .split_first()
            .ok_or_else(|| LabError::Other(format!("no command to run in {}", self.ns(host))))?;
        self.exec(host, program, args)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, host: Host, program: &str, args: &[&str]) -> Result<String> {
        let ns = self.ns(host);
        let mut full = vec!["netns", "exec", ns.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// The classic gateway mistake: MASQUERADE everything leaving `gw`'s
    /// WAN, tunnel traffic included.
    pub const MASQUERADE_RULE: [&'static str; 8] = [
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "wan0",
        "-j",
        "MASQUERADE",
    ];

    /// Adds `MASQUERADE_RULE` on `gw` with iptables.
    pub fn masquerade_everything(&self, gw: Host) -> Result<()> {
        self.exec(gw, "iptables", &Self::MASQUERADE_RULE).map(drop)
    }

    pub fn sysctl(&self, host: Host, key: &str, value: &str) -> Result<()> {
        self.exec_line(host, &format!("sysctl -qw {key}={value}"))
            .map(drop)
    }

    fn veth(&self, a: Host, a_dev: &str, b: Host, b_dev: &str) -> Result<()> {
        run(
            "ip",
            &[
                "link",
                "add",
                a_dev,
                "netns",
                &self.ns(a),
                "type",
                "veth",
                "peer",
                "name",
                b_dev,
                "netns",
                &self.ns(b),
            ],
        )
        .map(drop)
    }

    /// `/proc/net/xfrm_stat` of a host, as the kernel has it now.
    pub fn xfrm_stat(&self, host: Host) -> Result<crate::xfrm_stat::XfrmStat> {
        let text = crate::netns::read_proc_net(&self.ns_path(host), "xfrm_stat")
            .map_err(io("reading xfrm_stat"))?;
        crate::xfrm_stat::XfrmStat::parse(&text)
            .map_err(|e| LabError::Other(format!("xfrm_stat: {e}")))
    }

    fn remove_namespaces(&self) {
        for host in Host::ALL {
            let _ = run("ip", &["netns", "del", &self.ns(host)]);
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for pluto in &mut self.plutos {
            pluto.stop();
        }
        self.encap_sockets.clear();
        self.remove_namespaces();
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_never_show_keys() {
        let text = super::redact(&[
            "spi",
            "0x00001001",
            "aead",
            "rfc4106(gcm(aes))",
            "0x0102030405060708090a",
        ]);
        assert_eq!(text, "spi 0x00001001 aead rfc4106(gcm(aes)) 0x<key>");
    }
}
