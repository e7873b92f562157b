//! The one reader of an IP packet's headers, for every program: two reads
//! of kernel memory per packet (the fixed IP header, then the first bytes
//! after it), not one per field.

use aya_ebpf::helpers::bpf_probe_read_kernel;

use crate::{KERNEL_OFFSETS, skb::read_at};

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// Bytes read after the IP header: ports, the ESP SPI and sequence number
/// (behind a UDP header too: ESP in UDP 4500), an ICMP type, code and MTU,
/// or a TCP header with its first option (where SYNs carry the MSS).
const TRANSPORT_BYTES: usize = 24;

/// What an IP packet's headers say (IPv6 extension headers are not
/// followed: ESP, IKE, ICMP errors and the inner TCP/UDP come right after
/// the fixed header in the packets the programs look at).
pub struct IpPacket {
    pub family: u8,
    pub proto: u8,
    /// The whole packet's length from its IP header.
    pub total_len: u32,
    /// The IP header's length (where the transport header starts).
    pub header_len: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Address of the transport header.
    pub transport_at: u64,
    /// Bytes of the packet there are to read from its IP header on: all
    /// of it, except in the copy an ICMP error quotes, which may stop short.
    present_len: u32,
    /// Its first bytes (zeros where the read failed).
    transport: [u8; TRANSPORT_BYTES],
}

/// The IP header of an skb in the IP layer (`head + network_header`).
#[inline(always)]
pub unsafe fn network_header(skb: u64) -> Option<u64> {
    let o = KERNEL_OFFSETS.load();
    let head: u64 = unsafe { read_at(skb, o.sk_buff_head) }.ok()?;
    let network: u16 = unsafe { read_at(skb, o.sk_buff_network_header) }.ok()?;
    (head != 0 && network != 0xffff).then_some(head + u64::from(network))
}

/// The packet of an skb in the IP layer.
#[inline(always)]
pub unsafe fn skb_packet(skb: u64) -> Option<IpPacket> {
    ip_at(unsafe { network_header(skb) }?)
}

/// The packet whose IP header is at `at`.
#[inline(always)]
pub fn ip_at(at: u64) -> Option<IpPacket> {
    // An IPv6 header, or IPv4 with its first 20 bytes of payload. The
    // packet lies in an skb's head, which `skb_shared_info` follows, so
    // reading past a short packet stays inside the allocation; the
    // 20-byte retry covers memory that ends sooner.
    let header: [u8; 40] = match unsafe { bpf_probe_read_kernel(at as *const [u8; 40]) } {
        Ok(header) => header,
        Err(_) => {
            let v4: [u8; 20] = unsafe { bpf_probe_read_kernel(at as *const [u8; 20]) }.ok()?;
            let mut header = [0u8; 40];
            header[..20].copy_from_slice(&v4);
            header
        }
    };
    let mut packet = IpPacket {
        family: 0,
        proto: 0,
        total_len: 0,
        header_len: 0,
        src: [0; 16],
        dst: [0; 16],
        transport_at: 0,
        present_len: 0,
        transport: [0; TRANSPORT_BYTES],
    };
    match header[0] >> 4 {
        4 => {
            packet.family = AF_INET;
            packet.proto = header[9];
            packet.total_len = u32::from(u16::from_be_bytes([header[2], header[3]]));
            packet.src[..4].copy_from_slice(&header[12..16]);
            packet.dst[..4].copy_from_slice(&header[16..20]);
            packet.header_len = u32::from(header[0] & 0x0f) * 4;
        }
        6 => {
            packet.family = AF_INET6;
            packet.proto = header[6];
            packet.total_len = 40 + u32::from(u16::from_be_bytes([header[4], header[5]]));
            packet.src.copy_from_slice(&header[8..24]);
            packet.dst.copy_from_slice(&header[24..40]);
            packet.header_len = 40;
        }
        _ => return None,
    }
    packet.transport_at = at + u64::from(packet.header_len);
    packet.present_len = packet.total_len;
    packet.transport =
        unsafe { bpf_probe_read_kernel(packet.transport_at as *const [u8; TRANSPORT_BYTES]) }
            .unwrap_or([0; TRANSPORT_BYTES]);
    Some(packet)
}

/// The copy of our packet that an ICMP error quotes at `at`, `quoted_len`
/// bytes of it: Linux quotes as much as fits in 576 bytes (IPv4) or 1280
/// (IPv6), other stacks as little as the IP header and 8 bytes.
#[inline(always)]
pub fn quoted_at(at: u64, quoted_len: u32) -> Option<IpPacket> {
    let mut packet = ip_at(at)?;
    packet.present_len = packet.present_len.min(quoted_len);
    Some(packet)
}

impl IpPacket {
    /// Takes the packet's length from its skb instead (`skb->len` with
    /// `skb->data` at the IP header): the IP header's length field is
    /// only filled in when the packet enters `ip_local_out`.
    #[inline(always)]
    pub fn set_length(&mut self, total_len: u32) {
        self.total_len = total_len;
        self.present_len = total_len;
    }

    /// The 4 bytes after the IP header at `offset`, as they lie in memory;
    /// `None` past the end of the packet (or of its quote).
    #[inline(always)]
    fn word(&self, offset: usize) -> Option<u32> {
        if self.header_len + offset as u32 + 4 > self.present_len {
            return None;
        }
        let t = &self.transport;
        Some(u32::from_ne_bytes([
            t[offset],
            t[offset + 1],
            t[offset + 2],
            t[offset + 3],
        ]))
    }

    /// Source and destination port as they lie in memory (network order),
    /// for TCP and UDP.
    #[inline(always)]
    pub fn ports_raw(&self) -> Option<[u16; 2]> {
        let t = &self.transport;
        matches!(self.proto, 6 | 17).then(|| {
            [
                u16::from_ne_bytes([t[0], t[1]]),
                u16::from_ne_bytes([t[2], t[3]]),
            ]
        })
    }

    /// Source and destination port in host order, for UDP.
    #[inline(always)]
    pub fn udp_ports(&self) -> Option<(u16, u16)> {
        let t = &self.transport;
        (self.proto == 17).then(|| {
            (
                u16::from_be_bytes([t[0], t[1]]),
                u16::from_be_bytes([t[2], t[3]]),
            )
        })
    }

    /// The 4 bytes after a UDP header (the non-ESP marker of IKE on 4500
    /// is zero there); `None` if the packet or its quote ends sooner.
    #[inline(always)]
    pub fn after_udp_header(&self) -> Option<u32> {
        self.word(8)
    }

    /// TCP: the header's length, whether it is a SYN, and the MSS its
    /// first option announces (0 if none: Linux and most stacks put the
    /// MSS first).
    #[inline(always)]
    pub fn tcp(&self) -> Option<(u32, bool, u32)> {
        if self.proto != 6 {
            return None;
        }
        let t = &self.transport;
        let header_len = u32::from(t[12] >> 4) * 4;
        let syn = t[13] & 0x02 != 0;
        let mss = if syn && header_len >= 24 && t[20] == 2 && t[21] == 4 {
            u32::from(u16::from_be_bytes([t[22], t[23]]))
        } else {
            0
        };
        Some((header_len, syn, mss))
    }

    /// ICMP/ICMPv6 type and code.
    #[inline(always)]
    pub fn icmp_type_code(&self) -> (u8, u8) {
        (self.transport[0], self.transport[1])
    }

    /// The MTU an ICMP "fragmentation needed" (bytes 6-7) or ICMPv6
    /// "packet too big" (bytes 4-7) reports.
    #[inline(always)]
    pub fn icmp_mtu(&self) -> u32 {
        let t = &self.transport;
        if self.family == AF_INET {
            u32::from(u16::from_be_bytes([t[6], t[7]]))
        } else {
            u32::from_be_bytes([t[4], t[5], t[6], t[7]])
        }
    }

    /// ESP SPI and sequence number (network order, as in memory; the
    /// sequence number 0 if a quote stops before it), plain or in UDP 4500.
    /// SPI 0 is reserved, and in UDP 4500 it is the non-ESP marker: IKE,
    /// not ESP.
    #[inline(always)]
    pub fn esp(&self) -> Option<(u32, u32)> {
        let at = match self.proto {
            50 => 0,
            17 if self.udp_ports()?.1 == 4500 => 8,
            _ => return None,
        };
        let spi = self.word(at)?;
        (spi != 0).then(|| (spi, self.word(at + 4).unwrap_or(0)))
    }
}
