//! pcapng of the sampled dropped and leaked packets (`--pcap FILE`, and
//! `packets.pcapng` in the evidence bundle), for Wireshark and tshark.
//!
//! Each packet is the first bytes the eBPF programs copied from its IP
//! header on (LINKTYPE_RAW), with the whole packet's length, and a comment
//! naming the counter or finding, the SA and the kernel function. A route
//! lookup that failed before any packet existed (a local socket's send
//! refused by policy) gets its headers rebuilt from the flow, and says so.

use std::{net::IpAddr, path::Path};

use crate::{
    attribution::{SampleReport, Source},
    drops::DropRow,
    masquerade::Leak,
    report::Report,
};

/// One packet of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// `CLOCK_MONOTONIC` nanoseconds (converted to wall-clock time when
    /// the file is written).
    pub time_ns: u64,
    pub bytes: Vec<u8>,
    pub comment: String,
}

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

/// The whole packet's length per its IP header (the capture may be shorter).
fn original_len(bytes: &[u8]) -> u32 {
    let captured = bytes.len() as u32;
    let declared = match bytes.first().map(|b| b >> 4) {
        Some(4) if bytes.len() >= 4 => u32::from(u16::from_be_bytes([bytes[2], bytes[3]])),
        Some(6) if bytes.len() >= 6 => 40 + u32::from(u16::from_be_bytes([bytes[4], bytes[5]])),
        _ => captured,
    };
    declared.max(captured)
}

const LINKTYPE_RAW: u16 = 101;
const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_TSRESOL: u16 = 9;

/// One option: code, length, value padded to 32 bits.
fn option(out: &mut Vec<u8>, code: u16, value: &[u8]) {
    out.extend_from_slice(&code.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    pad(out);
}

fn pad(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// A block: type, total length, body, total length again.
fn block(out: &mut Vec<u8>, block_type: u32, body: &[u8]) {
    let total = (12 + body.len()) as u32;
    out.extend_from_slice(&block_type.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&total.to_le_bytes());
}

/// The file: a section header, one raw-IP interface with nanosecond
/// timestamps, and an enhanced packet block per packet. `wall_offset_ns`
/// turns the packets' monotonic times into nanoseconds since the epoch.
pub fn encode(packets: &[Packet], wall_offset_ns: i128) -> Vec<u8> {
    let mut out = Vec::new();
    let mut shb = Vec::new();
    shb.extend_from_slice(&0x1A2B_3C4Du32.to_le_bytes());
    shb.extend_from_slice(&1u16.to_le_bytes());
    shb.extend_from_slice(&0u16.to_le_bytes());
    shb.extend_from_slice(&(-1i64).to_le_bytes());
    let application = format!("xfrm-trace {}", env!("CARGO_PKG_VERSION"));
    option(&mut shb, SHB_USERAPPL, application.as_bytes());
    option(&mut shb, OPT_END, &[]);
    block(&mut out, 0x0A0D_0D0A, &shb);

    let mut idb = Vec::new();
    idb.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
    idb.extend_from_slice(&0u16.to_le_bytes());
    idb.extend_from_slice(&(tracer_common::capture::HEADER_BYTES as u32).to_le_bytes());
    option(&mut idb, IF_NAME, b"xfrm-trace");
    option(&mut idb, IF_TSRESOL, &[9]);
    option(&mut idb, OPT_END, &[]);
    block(&mut out, 1, &idb);

    for packet in packets {
        let time = (i128::from(packet.time_ns) + wall_offset_ns).max(0) as u64;
        let mut epb = Vec::new();
        epb.extend_from_slice(&0u32.to_le_bytes());
        epb.extend_from_slice(&((time >> 32) as u32).to_le_bytes());
        epb.extend_from_slice(&(time as u32).to_le_bytes());
        epb.extend_from_slice(&(packet.bytes.len() as u32).to_le_bytes());
        epb.extend_from_slice(&original_len(&packet.bytes).to_le_bytes());
        epb.extend_from_slice(&packet.bytes);
        pad(&mut epb);
        option(&mut epb, OPT_COMMENT, packet.comment.as_bytes());
        option(&mut epb, OPT_END, &[]);
        block(&mut out, 6, &epb);
    }
    out
}

/// Nanoseconds to add to a `CLOCK_MONOTONIC` time to get the wall clock.
pub fn wall_clock_offset_ns() -> i128 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime only writes the struct we pass.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// Writes the report's packets to `path` (see [`crate::fsutil::write_output`]);
/// returns how many.
pub fn write(path: &Path, report: &Report) -> anyhow::Result<usize> {
    let packets = packets(report);
    crate::fsutil::write_output(path, &encode(&packets, wall_clock_offset_ns()))?;
    Ok(packets.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_lengths_repeat() {
        let packet = Packet {
            time_ns: 5,
            bytes: vec![0x45, 0, 0x05, 0xdc, 0, 0, 0, 0, 64, 50, 0],
            comment: "XfrmOutPolBlock +1".into(),
        };
        let file = encode(&[packet], 0);
        assert_eq!(file.len() % 4, 0);
        let mut at = 0;
        let mut types = Vec::new();
        while at < file.len() {
            let kind = u32::from_le_bytes(file[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(file[at + 4..at + 8].try_into().unwrap()) as usize;
            let trailer = u32::from_le_bytes(file[at + len - 4..at + len].try_into().unwrap());
            assert_eq!(trailer as usize, len);
            types.push(kind);
            if kind == 6 {
                // Captured 11 bytes of a 1500-byte packet.
                let body = &file[at + 8..];
                assert_eq!(u32::from_le_bytes(body[12..16].try_into().unwrap()), 11);
                assert_eq!(u32::from_le_bytes(body[16..20].try_into().unwrap()), 1500);
            }
            at += len;
        }
        assert_eq!(types, [0x0A0D_0D0A, 1, 6]);
    }

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
        assert_eq!(original_len(&bytes), 28);
        assert_eq!(&bytes[12..16], &[10, 0, 1, 1]);
        assert_eq!(&bytes[20..24], &[0x0f, 0xa0, 0, 9]);
    }
}
