//! The pcapng file itself (pcap-file writes the blocks): a section header,
//! one raw-IP interface with nanosecond timestamps, and an enhanced packet
//! block per packet with its comment.

use std::{borrow::Cow, time::Duration};

use pcap_file::{
    DataLink, Endianness, PcapResult,
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
            section_header::{SectionHeaderBlock, SectionHeaderOption},
        },
    },
};

/// One packet of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// `CLOCK_MONOTONIC` nanoseconds (converted to wall-clock time when
    /// the file is written).
    pub time_ns: u64,
    /// From the IP header on (LINKTYPE_RAW), possibly cut short.
    pub bytes: Vec<u8>,
    pub comment: String,
}

/// The file. `wall_offset_ns` turns the packets' monotonic times into
/// nanoseconds since the epoch.
pub fn encode(packets: &[Packet], wall_offset_ns: i128) -> PcapResult<Vec<u8>> {
    let section = SectionHeaderBlock {
        endianness: Endianness::Little,
        options: vec![SectionHeaderOption::UserApplication(Cow::Owned(format!(
            "xfrm-trace {}",
            env!("CARGO_PKG_VERSION")
        )))],
        ..SectionHeaderBlock::default()
    };
    let mut writer = PcapNgWriter::with_section_header(Vec::new(), section)?;
    writer.write_pcapng_block(InterfaceDescriptionBlock {
        linktype: DataLink::RAW,
        snaplen: tracer_common::capture::HEADER_BYTES as u32,
        options: vec![
            InterfaceDescriptionOption::IfName("xfrm-trace".into()),
            // pcap-file writes timestamps in nanoseconds.
            InterfaceDescriptionOption::IfTsResol(9),
        ],
    })?;
    for packet in packets {
        let since_epoch = (i128::from(packet.time_ns) + wall_offset_ns).max(0) as u64;
        writer.write_pcapng_block(EnhancedPacketBlock {
            interface_id: 0,
            timestamp: Duration::from_nanos(since_epoch),
            original_len: original_len(&packet.bytes),
            data: Cow::Borrowed(&packet.bytes),
            options: vec![EnhancedPacketOption::Comment(Cow::Borrowed(
                &packet.comment,
            ))],
        })?;
    }
    Ok(writer.into_inner())
}

/// The whole packet's length per its IP header (the capture may be shorter).
pub(super) fn original_len(bytes: &[u8]) -> u32 {
    let captured = bytes.len() as u32;
    let declared = match bytes.first().map(|b| b >> 4) {
        Some(4) if bytes.len() >= 4 => u32::from(u16::from_be_bytes([bytes[2], bytes[3]])),
        Some(6) if bytes.len() >= 6 => 40 + u32::from(u16::from_be_bytes([bytes[4], bytes[5]])),
        _ => captured,
    };
    declared.max(captured)
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
        let file = encode(&[packet], 0).unwrap();
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
                // Captured 11 bytes of a 1500-byte packet at 5 ns.
                let body = &file[at + 8..];
                assert_eq!(u32::from_le_bytes(body[4..8].try_into().unwrap()), 0);
                assert_eq!(u32::from_le_bytes(body[8..12].try_into().unwrap()), 5);
                assert_eq!(u32::from_le_bytes(body[12..16].try_into().unwrap()), 11);
                assert_eq!(u32::from_le_bytes(body[16..20].try_into().unwrap()), 1500);
                // The comment option follows the data padded to 32 bits.
                assert_eq!(&body[32..36], &[1, 0, 18, 0]);
                assert_eq!(&body[36..54], b"XfrmOutPolBlock +1");
            }
            at += len;
        }
        assert_eq!(types, [0x0A0D_0D0A, 1, 6]);
    }

    #[test]
    fn the_file_reads_back_with_its_comments() {
        let packets = [
            Packet {
                time_ns: 1_000,
                bytes: vec![0x60, 0, 0, 0, 0, 8],
                comment: "first".into(),
            },
            Packet {
                time_ns: 2_000,
                bytes: vec![0x45, 0, 0, 20],
                comment: "second, é".into(),
            },
        ];
        let file = encode(&packets, 1_000_000_000).unwrap();
        let mut reader = pcap_file::pcapng::PcapNgReader::new(&file[..]).unwrap();
        let mut read = Vec::new();
        while let Some(block) = reader.next_block() {
            if let Some(epb) = block.unwrap().into_owned().into_enhanced_packet() {
                read.push((
                    epb.timestamp.as_nanos(),
                    epb.original_len,
                    epb.data.to_vec(),
                    epb.options,
                ));
            }
        }
        assert_eq!(
            read,
            [
                (
                    1_000_001_000,
                    48,
                    packets[0].bytes.clone(),
                    vec![EnhancedPacketOption::Comment("first".into())]
                ),
                (
                    1_000_002_000,
                    20,
                    packets[1].bytes.clone(),
                    vec![EnhancedPacketOption::Comment("second, é".into())]
                ),
            ]
        );
    }
}
