//! A report's sampled packets, each with a comment naming the counter or
//! finding, the SA and the kernel function. A route lookup that failed
//! before any packet existed (a local socket's send refused by policy)
//! gets its headers rebuilt from the flow, and says so.

use std::net::IpAddr;

use super::encode::Packet;
use crate::{
    attribution::{SampleReport, Source},
    drops::DropRow,
    masquerade::Leak,
    report::Report,
};

/// Every captured packet of the report (what its filter kept), oldest first.
pub fn packets(report: &Report) -> Vec<Packet> {
    let mut out = Vec::new();
    for counter in &report.counters {
        for sample in &counter.samples {
            if let Some(packet) = attribution_packet(&counter.name, sample) {
                out.push(packet);
            }
        }
    }
    for leak in &report.masquerade.leaks {
        for captured in &leak.captured {
            out.push(Packet {
                time_ns: captured.time_ns,
                bytes: captured.bytes.clone(),
                comment: leak_comment(leak),
            });
        }
    }
    for row in report.drops.iter().filter(|d| d.xfrm_related) {
        for captured in &row.captured {
            out.push(Packet {
                time_ns: captured.time_ns,
                bytes: captured.bytes.clone(),
                comment: drop_comment(row),
            });
        }
    }
    out.sort_by_key(|p| p.time_ns);
    out
}

fn attribution_packet(counter: &str, sample: &SampleReport) -> Option<Packet> {
    let s = &sample.source;
    let mut comment = format!("{counter} +{} in {}", s.count, s.function);
    push_place(&mut comment, &s.dir, &s.netns_label, &s.ifname);
    if !s.spi.is_empty() {
        comment.push_str(&format!(", SA spi {} reqid {}", s.spi, s.reqid));
    }
    if s.policy_index != 0 {
        comment.push_str(&format!(", policy {} {}", s.policy_index, s.policy_dir));
        if !s.policy_selector.is_empty() {
            comment.push_str(&format!(" {}", s.policy_selector));
        }
    }
    if !s.connection.is_empty() {
        comment.push_str(&format!(", connection \"{}\"", s.connection));
        if s.pluto_state != 0 {
            comment.push_str(&format!(" #{}", s.pluto_state));
        }
    }
    if let Some(seq) = sample.seq {
        comment.push_str(&format!(", ESP seq {seq}"));
    }
    match &sample.captured {
        Some(captured) => Some(Packet {
            time_ns: captured.time_ns,
            bytes: captured.bytes.clone(),
            comment,
        }),
        None => {
            comment
                .push_str("; headers rebuilt from the route lookup's flow: no packet existed yet");
            Some(Packet {
                time_ns: sample.time_ns,
                bytes: rebuilt(s)?,
                comment,
            })
        }
    }
}

/// Direction (if known), netns and interface.
fn push_place(comment: &mut String, dir: &str, netns: &str, ifname: &str) {
    if !dir.is_empty() {
        comment.push_str(&format!(" ({dir})"));
    }
    comment.push_str(&format!(", netns {netns}"));
    if !ifname.is_empty() {
        comment.push_str(&format!(" dev {ifname}"));
    }
}

fn leak_comment(leak: &Leak) -> String {
    let okfn = if leak.family == "ipv6" {
        "__xfrm6_output"
    } else {
        "__xfrm4_output"
    };
    let mut comment = format!(
        "masquerade_before_policy: left in clear, SNATed in POSTROUTING after the IPsec policy lookup, in {okfn}"
    );
    push_place(&mut comment, "out", &leak.netns_label, &leak.ifname);
    if !leak.pre_src.is_empty() {
        comment.push_str(&format!(
            ", policy matched {} -> {}, left as {} -> {}",
            leak.pre_src, leak.pre_dst, leak.post_src, leak.post_dst
        ));
    }
    if !leak.spi.is_empty() {
        comment.push_str(&format!(
            ", SA spi {} reqid {} to {}",
            leak.spi, leak.reqid, leak.sa_dst
        ));
    }
    if leak.policy_index != 0 {
        comment.push_str(&format!(
            ", policy {} {} -> {}",
            leak.policy_index, leak.policy_src, leak.policy_dst
        ));
    }
    comment
}

fn drop_comment(row: &DropRow) -> String {
    let mut comment = format!("dropped: {} in {}", row.reason, row.function);
    push_place(&mut comment, "", &row.netns_label, &row.ifname);
    comment.push_str("; XFRM counter not attributed: no bracket hooks on this kernel");
    comment
}

/// An IP header (and the ports) rebuilt from a flow, checksums zero.
fn rebuilt(s: &Source) -> Option<Vec<u8>> {
    let (src, dst): (IpAddr, IpAddr) = (s.src.parse().ok()?, s.dst.parse().ok()?);
    let proto = match s.proto.as_str() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        "esp" => 50,
        other => other.parse().unwrap_or(0),
    };
    let mut transport = Vec::new();
    if proto == 6 || proto == 17 {
        transport.extend_from_slice(&s.sport.to_be_bytes());
        transport.extend_from_slice(&s.dport.to_be_bytes());
        if proto == 17 {
            transport.extend_from_slice(&8u16.to_be_bytes());
            transport.extend_from_slice(&[0, 0]);
        } else {
            // Sequence, acknowledgement, data offset 5 words, no flags.
            transport.extend_from_slice(&[0; 8]);
            transport.extend_from_slice(&[0x50, 0, 0, 0, 0, 0, 0, 0]);
        }
    }
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let total = (20 + transport.len()) as u16;
            out.extend_from_slice(&[0x45, 0]);
            out.extend_from_slice(&total.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            out.extend_from_slice(&[0x60, 0, 0, 0]);
            out.extend_from_slice(&(transport.len() as u16).to_be_bytes());
            out.extend_from_slice(&[proto, 64]);
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
        }
        _ => return None,
    }
    out.extend_from_slice(&transport);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_rebuilt_from_a_lookup_flow() {
        let source = Source {
            count: 1,
            function: "xfrm_lookup_with_ifid".into(),
            netns: 1,
            netns_label: "a".into(),
            dir: "out".into(),
            family: "ipv4".into(),
            src: "10.0.1.1".into(),
            dst: "10.0.2.1".into(),
            proto: "udp".into(),
            sport: 4000,
            dport: 9,
            spi: String::new(),
            reqid: 0,
            policy_index: 0,
            policy_dir: "".into(),
            ifindex: 0,
            ifname: String::new(),
            policy_selector: String::new(),
            connection: String::new(),
            pluto_state: 0,
        };
        let bytes = rebuilt(&source).unwrap();
        assert_eq!(bytes.len(), 28);
        assert_eq!(crate::pcap::encode::original_len(&bytes), 28);
        assert_eq!(&bytes[12..16], &[10, 0, 1, 1]);
        assert_eq!(&bytes[20..24], &[0x0f, 0xa0, 0, 9]);
    }
}
