//! Packet capture on a lab interface (AF_PACKET), to check what really
//! crossed the wire: ESP or plaintext, and how big.

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use super::{Host, Lab, LabError, Result};

/// One captured IPv4 packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol (50 = ESP, 17 = UDP, 1 = ICMP).
    pub protocol: u8,
    /// IP total length: the size on the wire without the Ethernet header.
    pub ip_len: u16,
    /// UDP destination port, if UDP.
    pub udp_dport: Option<u16>,
    /// More-fragments flag or non-zero offset.
    pub fragment: bool,
    /// The whole Ethernet frame, for re-sending it (replay tests).
    pub frame: Vec<u8>,
}

impl Packet {
    /// Parses an Ethernet frame; `None` for anything but IPv4.
    pub fn parse(frame: &[u8]) -> Option<Self> {
        let ip = frame.get(14..)?;
        if frame.get(12..14)? != [0x08, 0x00] || ip.len() < 20 || ip[0] >> 4 != 4 {
            return None;
        }
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        let flags_offset = u16::from_be_bytes([ip[6], ip[7]]);
        let fragment = flags_offset & 0x2000 != 0 || flags_offset & 0x1fff != 0;
        let protocol = ip[9];
        let udp_dport = (protocol == 17 && flags_offset & 0x1fff == 0)
            .then(|| {
                ip.get(header_len + 2..header_len + 4)
                    .map(|p| u16::from_be_bytes([p[0], p[1]]))
            })
            .flatten();
        Some(Self {
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            protocol,
            ip_len: u16::from_be_bytes([ip[2], ip[3]]),
            udp_dport,
            fragment,
            frame: frame.to_vec(),
        })
    }

    pub fn is_esp(&self) -> bool {
        self.protocol == 50 || self.udp_dport == Some(4500)
    }
}

/// A capture running on a thread until `stop`.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Packet>>>,
}

impl Lab {
    /// Starts capturing every IPv4 packet that crosses `iface` of `host`.
    pub fn capture(&self, host: Host, iface: &str) -> Result<Capture> {
        let iface = iface.to_string();
        let socket = crate::netns::run_in(&self.ns_path(host), move || {
            let index =
                nix::net::if_::if_nametoindex(iface.as_str()).map_err(std::io::Error::from)?;
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd was just returned by socket(2) and is not owned elsewhere.
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = protocol;
            address.sll_ifindex = index as i32;
            // SAFETY: address is a valid sockaddr_ll of the given size.
            let ret = unsafe {
                libc::bind(
                    socket.as_raw_fd(),
                    std::ptr::from_ref(&address).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Wake up every 100 ms to see whether to stop.
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: the option value is a timeval we own.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::from_ref(&timeout).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            Ok(socket)
        })
        .map_err(|e| LabError::Other(format!("capture on {}: {e}", self.ns(host))))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut packets = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: frame is a writable buffer of the given length.
                let n = unsafe {
                    libc::recv(
                        socket.as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        0,
                    )
                };
                if let Ok(n) = usize::try_from(n)
                    && let Some(packet) = Packet::parse(&frame[..n])
                {
                    packets.push(packet);
                }
            }
            packets
        });
        Ok(Capture {
            stop,
            thread: Some(thread),
        })
    }
}

impl Lab {
    /// Sends raw Ethernet frames out of `iface` of `host` (e.g. captured
    /// ESP packets, to replay them).
    pub fn inject(&self, host: Host, iface: &str, frames: Vec<Vec<u8>>) -> Result<usize> {
        let iface = iface.to_string();
        crate::netns::run_in(&self.ns_path(host), move || {
            let index =
                nix::net::if_::if_nametoindex(iface.as_str()).map_err(std::io::Error::from)?;
            // SAFETY: plain socket(2); the fd is owned right away.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: fd was just returned by socket(2).
            let socket = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_ifindex = index as i32;
            address.sll_halen = 6;
            let mut sent = 0;
            for frame in &frames {
                // SAFETY: frame and address are valid for the lengths given.
                let n = unsafe {
                    libc::sendto(
                        socket.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        std::ptr::from_ref(&address).cast(),
                        size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                    )
                };
                if n >= 0 {
                    sent += 1;
                }
            }
            Ok(sent)
        })
        .map_err(|e| LabError::Other(format!("injecting into {}: {e}", self.ns(host))))
    }
}

impl Capture {
    /// Stops the capture and returns what it saw.
    pub fn stop(mut self) -> Vec<Packet> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_esp_udp_and_fragments() {
        let mut frame = vec![0u8; 14 + 28];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[14..];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&28u16.to_be_bytes());
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[192, 0, 2, 1]);
        ip[16..20].copy_from_slice(&[203, 0, 113, 1]);
        ip[22..24].copy_from_slice(&4500u16.to_be_bytes());
        let p = Packet::parse(&frame).unwrap();
        assert_eq!(
            (p.protocol, p.udp_dport, p.ip_len, p.fragment),
            (17, Some(4500), 28, false)
        );
        assert!(p.is_esp());
        frame[14 + 9] = 50;
        frame[14 + 6] = 0x20; // more fragments
        let p = Packet::parse(&frame).unwrap();
        assert!(p.is_esp() && p.fragment && p.udp_dport.is_none());
        frame[12] = 0x86;
        assert!(Packet::parse(&frame).is_none());
    }
}
