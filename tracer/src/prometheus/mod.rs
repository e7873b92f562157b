//! `--prometheus ADDR`: the run's figures as OpenMetrics at
//! `http://ADDR/metrics`, refreshed every `--interval`, for a fleet
//! watched by Prometheus and Grafana. Series per counter, per connection
//! and per finding; label values come from the kernel and pluto, so each
//! family is capped (the smallest series beyond the cap add up in one
//! series labelled `other`).
//!
//! `render` turns a report into the text (one function per family below);
//! `server` answers the scrapes with the latest text.

mod family;
mod server;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use family::{Families, Family};
pub use server::serve;

use crate::report::Report;

/// The text served, replaced on every refresh; each scrape shares it
/// without a copy.
pub type Shared = Arc<Mutex<Bytes>>;

/// The report as OpenMetrics text.
pub fn render(report: &Report) -> String {
    family::encode(Families(vec![
        info(report),
        xfrm_stat_increase(report),
        attributed(report),
        xfrm_drops(report),
        ike_packets(report),
        masquerade_leaks(report),
        esp_oversize(report),
        findings(report),
        connections_up(report),
    ]))
}

fn info(report: &Report) -> Family {
    let mut family = Family::gauge(
        "xfrm_trace_info",
        "The kernel and the hook mode of this run.",
    );
    family.set(
        vec![
            ("release", report.kernel.release.clone()),
            ("mode", report.kernel.mode.clone()),
        ],
        1,
    );
    family
}

fn xfrm_stat_increase(report: &Report) -> Family {
    let mut family = Family::counter(
        "xfrm_trace_xfrm_stat_increase",
        "Increase of a /proc/net/xfrm_stat counter since xfrm-trace started, per netns.",
    );
    for counter in &report.counters {
        for n in &counter.by_netns {
            family.add(
                vec![
                    ("counter", counter.name.clone()),
                    ("netns", n.label.clone()),
                ],
                n.delta,
            );
        }
    }
    family
}

fn attributed(report: &Report) -> Family {
    let mut family = Family::counter(
        "xfrm_trace_attributed",
        "Counter increments tied to their packet, per kernel function and libreswan connection.",
    );
    for counter in &report.counters {
        for s in &counter.sources {
            family.add(
                vec![
                    ("counter", counter.name.clone()),
                    ("netns", s.netns_label.clone()),
                    ("function", s.function.to_string()),
                    ("connection", s.connection.clone()),
                ],
                s.count,
            );
        }
    }
    family
}

fn xfrm_drops(report: &Report) -> Family {
    let mut family = Family::counter(
        "xfrm_trace_xfrm_drops",
        "XFRM-related packet drops seen at skb:kfree_skb, per reason, function and netns.",
    );
    for d in report.drops.iter().filter(|d| d.xfrm_related) {
        family.add(
            vec![
                ("reason", d.reason.clone()),
                ("function", d.function.clone()),
                ("netns", d.netns_label.clone()),
            ],
            d.count,
        );
    }
    family
}

fn ike_packets(report: &Report) -> Family {
    let mut family = Family::counter(
        "xfrm_trace_ike_packets",
        "IKE packets per peer: sent, received, dropped here, ICMP port unreachable from the peer.",
    );
    for p in &report.ike {
        for (event, value) in [
            ("sent", p.sent),
            ("received", p.received),
            ("dropped", p.dropped_total()),
            ("port_unreachable", p.port_unreachable),
        ] {
            family.add(
                vec![
                    ("netns", p.netns_label.clone()),
                    ("peer", p.peer.clone()),
                    ("event", event.to_string()),
                ],
                value,
            );
        }
    }
    family
}

fn masquerade_leaks(report: &Report) -> Family {
    let mut family = Family::counter(
        "xfrm_trace_masquerade_leaked_packets",
        "Packets SNATed before the IPsec policy lookup and routed out of the tunnel.",
    );
    for l in &report.masquerade.leaks {
        family.add(
            vec![("netns", l.netns_label.clone()), ("spi", l.spi.clone())],
            l.packets,
        );
    }
    family
}

fn esp_oversize(report: &Report) -> Family {
    let mut family = Family::counter(
        "xfrm_trace_esp_oversize_packets",
        "ESP packets of an SA that did not fit the MTU.",
    );
    for sa in &report.esp_sizes {
        family.add(
            vec![("netns", sa.sa_netns.clone()), ("spi", sa.spi.clone())],
            sa.oversize(),
        );
    }
    family
}

fn findings(report: &Report) -> Family {
    let mut family = Family::gauge(
        "xfrm_trace_finding",
        "Causes the diagnosis finds now (1 per kind, connection and netns).",
    );
    for f in &report.findings {
        family.set(
            vec![
                ("kind", f.kind.to_string()),
                ("connection", f.connection.clone()),
                ("netns", f.netns_label.clone()),
            ],
            1,
        );
    }
    family
}

fn connections_up(report: &Report) -> Family {
    let mut family = Family::gauge(
        "xfrm_trace_connection_up",
        "1 when the libreswan connection has an established Child SA.",
    );
    for pluto in &report.pluto.instances {
        for c in &pluto.connections {
            family.set(
                vec![
                    ("connection", c.name.clone()),
                    ("netns", pluto.netns_label.clone()),
                ],
                u64::from(pluto.is_up(&c.name)),
            );
        }
    }
    family
}
