//! `--prometheus ADDR`: the run's figures as OpenMetrics at
//! `http://ADDR/metrics`, refreshed every `--interval`, for a fleet
//! watched by Prometheus and Grafana. Series per counter, per connection
//! and per finding; label values come from the kernel and pluto, so each
//! family is capped (the smallest series beyond the cap add up in one
//! series labelled `other`).

use std::{
    collections::{BTreeMap, VecDeque},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::report::Report;

/// The text served, replaced on every refresh.
pub type Shared = Arc<Mutex<String>>;

/// Series kept per metric family.
pub const MAX_SERIES: usize = 200;

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    series: BTreeMap<Labels, u64>,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind,
            help,
            series: BTreeMap::new(),
        }
    }

    fn add(&mut self, labels: Labels, value: u64) {
        *self.series.entry(labels).or_default() += value;
    }

    fn write(self, out: &mut String) {
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let mut series: Vec<(Labels, u64)> = self.series.into_iter().collect();
        if series.len() > MAX_SERIES {
            series.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let rest: u64 = series[MAX_SERIES - 1..].iter().map(|(_, v)| v).sum();
            let names: Vec<&'static str> = series[0].0.iter().map(|(k, _)| *k).collect();
            series.truncate(MAX_SERIES - 1);
            series.push((
                names
                    .into_iter()
                    .map(|k| (k, "other".to_string()))
                    .collect(),
                rest,
            ));
        }
        let suffix = if self.kind == "counter" { "_total" } else { "" };
        for (labels, value) in series {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = writeln!(out, "{}{suffix}{{{}}} {value}", self.name, labels.join(","));
        }
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The report as OpenMetrics text.
pub fn render(report: &Report) -> String {
    let mut info = Family::new(
        "xfrm_trace_info",
        "gauge",
        "The kernel and the hook mode of this run.",
    );
    info.add(
        vec![
            ("release", report.kernel.release.clone()),
            ("mode", report.kernel.mode.clone()),
        ],
        1,
    );
    let mut increase = Family::new(
        "xfrm_trace_xfrm_stat_increase",
        "counter",
        "Increase of a /proc/net/xfrm_stat counter since xfrm-trace started, per netns.",
    );
    let mut attributed = Family::new(
        "xfrm_trace_attributed",
        "counter",
        "Counter increments tied to their packet, per kernel function and libreswan connection.",
    );
    for counter in &report.counters {
        for n in &counter.by_netns {
            increase.add(
                vec![
                    ("counter", counter.name.clone()),
                    ("netns", n.label.clone()),
                ],
                n.delta,
            );
        }
        for s in &counter.sources {
            attributed.add(
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
    let mut drops = Family::new(
        "xfrm_trace_xfrm_drops",
        "counter",
        "XFRM-related packet drops seen at skb:kfree_skb, per reason, function and netns.",
    );
    for d in report.drops.iter().filter(|d| d.xfrm_related) {
        drops.add(
            vec![
                ("reason", d.reason.clone()),
                ("function", d.function.clone()),
                ("netns", d.netns_label.clone()),
            ],
            d.count,
        );
    }
    let mut ike = Family::new(
        "xfrm_trace_ike_packets",
        "counter",
        "IKE packets per peer: sent, received, dropped here, ICMP port unreachable from the peer.",
    );
    for p in &report.ike {
        for (event, value) in [
            ("sent", p.sent),
            ("received", p.received),
            ("dropped", p.dropped_total()),
            ("port_unreachable", p.port_unreachable),
        ] {
            ike.add(
                vec![
                    ("netns", p.netns_label.clone()),
                    ("peer", p.peer.clone()),
                    ("event", event.to_string()),
                ],
                value,
            );
        }
    }
    let mut leaks = Family::new(
        "xfrm_trace_masquerade_leaked_packets",
        "counter",
        "Packets SNATed before the IPsec policy lookup and routed out of the tunnel.",
    );
    for l in &report.masquerade.leaks {
        leaks.add(
            vec![("netns", l.netns_label.clone()), ("spi", l.spi.clone())],
            l.packets,
        );
    }
    let mut oversize = Family::new(
        "xfrm_trace_esp_oversize_packets",
        "counter",
        "ESP packets of an SA that did not fit the MTU.",
    );
    for sa in &report.esp_sizes {
        oversize.add(
            vec![("netns", sa.sa_netns.clone()), ("spi", sa.spi.clone())],
            sa.oversize(),
        );
    }
    let mut findings = Family::new(
        "xfrm_trace_finding",
        "gauge",
        "Causes the diagnosis finds now (1 per kind, connection and netns).",
    );
    for f in &report.findings {
        let labels = vec![
            ("kind", f.kind.to_string()),
            ("connection", f.connection.clone()),
            ("netns", f.netns_label.clone()),
        ];
        findings.series.insert(labels, 1);
    }
    let mut up = Family::new(
        "xfrm_trace_connection_up",
        "gauge",
        "1 when the libreswan connection has an established Child SA.",
    );
    for pluto in &report.pluto.instances {
        for c in &pluto.connections {
            up.series.insert(
                vec![
                    ("connection", c.name.clone()),
                    ("netns", pluto.netns_label.clone()),
                ],
                u64::from(pluto.is_up(&c.name)),
            );
        }
    }
    let mut out = String::new();
    for family in [
        info, increase, attributed, drops, ike, leaks, oversize, findings, up,
    ] {
        family.write(&mut out);
    }
    out.push_str("# EOF\n");
    out
}

/// Connections served at once. A new one beyond this closes the oldest:
/// the one most likely idle (an answered connection closes at once), so a
/// fresh scrape is served however many idle connections are held open.
const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request and read the answer.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// The largest request read: a scrape's request line and headers.
const MAX_REQUEST: usize = 4096;
/// Pause after a failed accept (such as running out of file descriptors)
/// instead of retrying at once, which would spin on a core.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Answers `GET /metrics` with the latest text until the run ends.
pub async fn serve(listener: tokio::net::TcpListener, text: Shared) {
    let mut live: VecDeque<tokio::task::AbortHandle> = VecDeque::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                log::debug!("metrics: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        live.retain(|connection| !connection.is_finished());
        if live.len() >= MAX_CONNECTIONS
            && let Some(oldest) = live.pop_front()
        {
            oldest.abort();
        }
        let text = text.clone();
        let connection = tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, answer(stream, &text)).await;
        });
        live.push_back(connection.abort_handle());
    }
}

/// Reads one request (at most `MAX_REQUEST` bytes) and answers it.
async fn answer(mut stream: tokio::net::TcpStream, text: &Shared) -> std::io::Result<()> {
    let mut request = vec![0u8; MAX_REQUEST];
    let mut read = 0;
    // The request line is all we need; stop at the blank line.
    let complete = loop {
        if request[..read].windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if read == request.len() {
            break false;
        }
        match stream.read(&mut request[read..]).await? {
            0 => break false,
            n => read += n,
        }
    };
    let (status, content_type, body) = if !complete {
        (
            "400 Bad Request",
            "text/plain",
            format!("a request ends with a blank line within {MAX_REQUEST} bytes\n"),
        )
    } else if request.starts_with(b"GET /metrics") {
        let mut body = text.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if body.is_empty() {
            body = "# EOF\n".into();
        }
        ("200 OK", CONTENT_TYPE, body)
    } else {
        ("404 Not Found", "text/plain", "see /metrics\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_capped_and_labels_escaped() {
        let mut family = Family::new("x", "counter", "help");
        for i in 0..(MAX_SERIES as u64 + 10) {
            family.add(vec![("peer", format!("p{i}"))], i + 1);
        }
        family.add(vec![("peer", "a\"b".into())], 1000);
        let mut out = String::new();
        family.write(&mut out);
        let series: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(series.len(), MAX_SERIES);
        assert!(out.contains("x_total{peer=\"a\\\"b\"} 1000"), "{out}");
        // The 12 smallest (1..=12) add up under `other`.
        assert!(out.contains("x_total{peer=\"other\"} 78"), "{out}");
    }
}
