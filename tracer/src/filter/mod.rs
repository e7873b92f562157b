//! `--netns` and `--filter`: narrowing a report to the namespaces,
//! addresses, subnets, SPIs and connections an engineer asks about.
//!
//! Netns restrict everything. Flow terms (address, subnet, SPI,
//! connection) apply to what carries them: attributed sources and samples,
//! IKE paths, MASQUERADE leaks, ESP sizes, findings and pluto connections;
//! several terms keep what matches any of them. A counter's kernel delta
//! cannot be split by flow: with flow terms its `attributed` counts only
//! the matching packets and no gap is computed.

use std::{net::IpAddr, str::FromStr};

use crate::report::Report;

/// One `--filter` expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Term {
    Address(IpAddr),
    Subnet {
        network: IpAddr,
        prefix: u8,
    },
    /// Host order.
    Spi(u32),
    Connection(String),
}

impl Term {
    /// `192.0.2.1`, `10.0.2.0/24`, `spi=0x1001` (or decimal), `conn=NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(spi) = text.strip_prefix("spi=") {
            let value = match spi.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => spi.parse(),
            };
            return value
                .map(Self::Spi)
                .map_err(|_| format!("not an SPI: {spi:?} (try spi=0x1001)"));
        }
        if let Some(name) = text.strip_prefix("conn=") {
            if name.is_empty() {
                return Err("conn= needs a connection name".into());
            }
            return Ok(Self::Connection(name.to_string()));
        }
        if let Some((address, prefix)) = text.split_once('/') {
            let network = IpAddr::from_str(address)
                .map_err(|_| format!("not a subnet: {text:?} (try 10.0.2.0/24)"))?;
            let max = if network.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("bad prefix length in {text:?}"))?;
            return Ok(Self::Subnet { network, prefix });
        }
        IpAddr::from_str(text).map(Self::Address).map_err(|_| {
            format!("unknown filter {text:?}: use an address, a subnet, spi=0x... or conn=NAME")
        })
    }

    /// Whether an address or subnet written as text (`192.0.2.1`,
    /// `10.0.2.0/24`) is this address or overlaps this subnet.
    fn matches_address_text(&self, text: &str) -> bool {
        let Some((address, prefix)) = parse_net(text) else {
            return false;
        };
        match self {
            Self::Address(wanted) => contains(address, prefix, *wanted),
            Self::Subnet { network, prefix: p } => {
                contains(*network, *p, address) || contains(address, prefix, *network)
            }
            _ => false,
        }
    }
}

/// `a.b.c.d` or `a.b.c.d/n` (IPv6 alike).
fn parse_net(text: &str) -> Option<(IpAddr, u8)> {
    match text.split_once('/') {
        Some((address, prefix)) => Some((address.parse().ok()?, prefix.parse().ok()?)),
        None => {
            let address: IpAddr = text.parse().ok()?;
            Some((address, if address.is_ipv4() { 32 } else { 128 }))
        }
    }
}

/// Whether `address` lies in `network/prefix`.
fn contains(network: IpAddr, prefix: u8, address: IpAddr) -> bool {
    let (network, address, bits) = match (network, address) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u128::from(n.to_bits()), u128::from(a.to_bits()), 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (n.to_bits(), a.to_bits(), 128),
        _ => return false,
    };
    let prefix = u32::from(prefix).min(bits);
    if prefix == 0 {
        return true;
    }
    let shift = bits - prefix;
    network >> shift == address >> shift
}

/// What a report is narrowed to.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub netns: Vec<String>,
    pub terms: Vec<Term>,
}

/// The flow fields of one report item.
#[derive(Default)]
struct Flow<'a> {
    addresses: Vec<&'a str>,
    spi: Option<&'a str>,
    connection: Option<&'a str>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.terms.is_empty()
    }

    /// As the user wrote it, for the report.
    pub fn describe(&self) -> Vec<String> {
        let mut out: Vec<String> = self.netns.iter().map(|n| format!("netns {n}")).collect();
        out.extend(self.terms.iter().map(|t| match t {
            Term::Address(a) => a.to_string(),
            Term::Subnet { network, prefix } => format!("{network}/{prefix}"),
            Term::Spi(spi) => format!("spi=0x{spi:08x}"),
            Term::Connection(c) => format!("conn={c}"),
        }));
        out
    }

    fn keeps_netns(&self, inode: u64, label: &str) -> bool {
        self.netns.is_empty()
            || self
                .netns
                .iter()
                .any(|n| n == label || n.parse::<u64>().is_ok_and(|i| i == inode))
    }

    fn keeps_netns_label(&self, label: &str) -> bool {
        self.netns.is_empty() || self.netns.iter().any(|n| n == label)
    }

    fn keeps_flow(&self, flow: &Flow) -> bool {
        self.terms.is_empty()
            || self.terms.iter().any(|term| match term {
                Term::Spi(spi) => flow.spi.is_some_and(|s| {
                    u32::from_str_radix(s.trim_start_matches("0x"), 16).is_ok_and(|v| v == *spi)
                }),
                Term::Connection(name) => flow.connection == Some(name.as_str()),
                _ => flow.addresses.iter().any(|a| term.matches_address_text(a)),
            })
    }

    /// Removes from the report what the filter does not ask for.
    pub fn apply(&self, report: &mut Report) {
        if self.is_empty() {
            return;
        }
        report.filter = self.describe();
        let flows_filtered = !self.terms.is_empty();
        for counter in &mut report.counters {
            counter
                .by_netns
                .retain(|n| self.keeps_netns(n.netns, &n.label));
            counter.sources.retain(|s| {
                self.keeps_netns(s.netns, &s.netns_label) && self.keeps_flow(&source_flow(s))
            });
            counter.samples.retain(|s| {
                self.keeps_netns(s.source.netns, &s.source.netns_label)
                    && self.keeps_flow(&source_flow(&s.source))
            });
            counter.kernel_delta = counter.by_netns.iter().map(|n| n.delta).sum();
            counter.attributed = counter.sources.iter().map(|s| s.count).sum();
            for n in &mut counter.by_netns {
                n.attributed = counter
                    .sources
                    .iter()
                    .filter(|s| s.netns == n.netns)
                    .map(|s| s.count)
                    .sum();
            }
            counter.gap = if flows_filtered {
                0
            } else {
                i128::from(counter.kernel_delta) - i128::from(counter.attributed)
            };
        }
        report
            .counters
            .retain(|c| c.kernel_delta > 0 || c.attributed > 0);
        report
            .drops
            .retain(|d| self.keeps_netns(u64::from(d.netns), &d.netns_label));
        report.ike.retain(|p| {
            self.keeps_netns(p.netns, &p.netns_label)
                && self.keeps_flow(&Flow {
                    addresses: vec![&p.local, &p.peer],
                    ..Flow::default()
                })
        });
        report.masquerade.leaks.retain(|l| {
            self.keeps_netns(l.netns, &l.netns_label)
                && self.keeps_flow(&Flow {
                    addresses: vec![
                        &l.pre_src,
                        &l.pre_dst,
                        &l.post_src,
                        &l.post_dst,
                        &l.policy_src,
                        &l.policy_dst,
                    ],
                    spi: Some(&l.spi),
                    connection: None,
                })
        });
        report.esp_sizes.retain_mut(|sa| {
            sa.events
                .retain(|e| self.keeps_netns(e.netns, &e.netns_label));
            (self.keeps_netns_label(&sa.sa_netns) || !sa.events.is_empty())
                && self.keeps_flow(&Flow {
                    addresses: vec![&sa.sa_dst],
                    spi: Some(&sa.spi),
                    connection: None,
                })
        });
        report.findings.retain(|f| {
            (f.netns_label.is_empty() || self.keeps_netns_label(&f.netns_label))
                && self.keeps_flow(&Flow {
                    addresses: addresses_in(&f.summary),
                    spi: (!f.spi.is_empty()).then_some(f.spi.as_str()),
                    connection: (!f.connection.is_empty()).then_some(f.connection.as_str()),
                })
        });
        report
            .pluto
            .instances
            .retain(|p| self.keeps_netns(p.netns, &p.netns_label));
        for pluto in &mut report.pluto.instances {
            pluto.connections.retain(|c| {
                let local = c.local_addr.map(|a| a.to_string()).unwrap_or_default();
                let remote = c.remote_addr.map(|a| a.to_string()).unwrap_or_default();
                let mut addresses = vec![local.as_str(), remote.as_str()];
                addresses.extend(c.local_subnets.iter().map(String::as_str));
                addresses.extend(c.remote_subnets.iter().map(String::as_str));
                self.keeps_flow(&Flow {
                    addresses,
                    spi: None,
                    connection: Some(&c.name),
                })
            });
        }
        report.netns.retain(|n| self.keeps_netns(n.inode, &n.label));
    }
}

fn source_flow(s: &crate::attribution::Source) -> Flow<'_> {
    let mut addresses = vec![s.src.as_str(), s.dst.as_str()];
    if let Some((src, dst)) = s.policy_selector.split_once(" -> ") {
        addresses.extend([src, dst]);
    }
    Flow {
        addresses,
        spi: (!s.spi.is_empty()).then_some(s.spi.as_str()),
        connection: (!s.connection.is_empty()).then_some(s.connection.as_str()),
    }
}

/// The addresses and subnets written in a finding's text.
fn addresses_in(text: &str) -> Vec<&str> {
    text.split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':' || c == '/'))
        .map(|t| t.trim_end_matches(['.', ':']))
        .filter(|t| parse_net(t).is_some())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_parse_and_bad_ones_say_why() {
        assert_eq!(Term::parse("spi=0x1001"), Ok(Term::Spi(0x1001)));
        assert_eq!(Term::parse("spi=4097"), Ok(Term::Spi(0x1001)));
        assert_eq!(
            Term::parse("conn=vpn.example.com"),
            Ok(Term::Connection("vpn.example.com".into()))
        );
        assert_eq!(
            Term::parse("10.0.2.0/24"),
            Ok(Term::Subnet {
                network: "10.0.2.0".parse().unwrap(),
                prefix: 24
            })
        );
        assert_eq!(
            Term::parse("2001:db8::1"),
            Ok(Term::Address("2001:db8::1".parse().unwrap()))
        );
        for bad in ["spi=zz", "conn=", "10.0.2.0/33", "west", ""] {
            assert!(Term::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses_match_subnets_both_ways() {
        let subnet = Term::parse("10.0.2.0/24").unwrap();
        assert!(subnet.matches_address_text("10.0.2.10"));
        assert!(subnet.matches_address_text("10.0.0.0/16"));
        assert!(!subnet.matches_address_text("10.0.3.1"));
        assert!(!subnet.matches_address_text("fd00::1"));
        let address = Term::parse("192.168.1.10").unwrap();
        assert!(address.matches_address_text("192.168.0.0/16"));
        assert!(!address.matches_address_text("192.168.1.11"));
    }

    #[test]
    fn finding_text_addresses_are_found() {
        let found =
            addresses_in("12 packets from 10.0.2.0/24 to 192.168.0.0/16 were SNATed to 192.0.2.1.");
        assert_eq!(found, ["10.0.2.0/24", "192.168.0.0/16", "192.0.2.1"]);
    }
}
