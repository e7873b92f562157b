//! Traffic between lab hosts, sent and received by the tool itself so the
//! tests know exactly how many packets crossed.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use super::{Host, Lab, LabError, Result};

/// A UDP socket bound inside a lab host that counts what arrives.
pub struct UdpSink {
    socket: UdpSocket,
}

impl Lab {
    /// Sends `count` UDP datagrams of `size` payload bytes from `host` to
    /// `to`; returns how many `sendto` calls the kernel refused.
    pub fn send_udp(&self, host: Host, to: SocketAddr, count: usize, size: usize) -> Result<usize> {
        crate::netns::run_in(&self.ns_path(host), move || {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            let payload = vec![0x5a; size];
            Ok((0..count)
                .filter(|_| socket.send_to(&payload, to).is_err())
                .count())
        })
        .map_err(|e| LabError::Other(format!("sending from {}: {e}", self.ns(host))))
    }

    /// Like `send_udp` from `source`, with IP_PMTUDISC_PROBE: DF set and the
    /// path MTU ignored, so an oversize packet reaches the IPsec size check.
    /// Returns how many sends the kernel refused.
    pub fn send_udp_ignoring_pmtu(
        &self,
        host: Host,
        source: &str,
        to: SocketAddr,
        count: usize,
        size: usize,
    ) -> Result<usize> {
        let source: std::net::IpAddr = source
            .parse()
            .map_err(|_| LabError::Other(format!("bad source address {source}")))?;
        crate::netns::run_in(&self.ns_path(host), move || {
            let socket = UdpSocket::bind((source, 0))?;
            let probe: libc::c_int = libc::IP_PMTUDISC_PROBE;
            // SAFETY: the socket is open; the option value is a c_int we own.
            let ret = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    std::ptr::from_ref(&probe).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if ret != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let payload = vec![0x5a; size];
            Ok((0..count)
                .filter(|_| socket.send_to(&payload, to).is_err())
                .count())
        })
        .map_err(|e| LabError::Other(format!("sending from {}: {e}", self.ns(host))))
    }

    /// Binds a UDP socket on `port` inside `host`.
    pub fn udp_sink(&self, host: Host, port: u16) -> Result<UdpSink> {
        let socket = crate::netns::run_in(&self.ns_path(host), move || {
            let socket = UdpSocket::bind(("0.0.0.0", port))?;
            socket.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(socket)
        })
        .map_err(|e| LabError::Other(format!("UDP sink in {}: {e}", self.ns(host))))?;
        Ok(UdpSink { socket })
    }
}

impl UdpSink {
    /// Receives until `expected` datagrams arrived or `patience` passed
    /// without one; returns how many arrived.
    pub fn receive(&self, expected: usize, patience: Duration) -> usize {
        let mut buffer = vec![0u8; 65536];
        let mut received = 0;
        let mut idle = Duration::ZERO;
        while received < expected && idle < patience {
            match self.socket.recv(&mut buffer) {
                Ok(_) => {
                    received += 1;
                    idle = Duration::ZERO;
                }
                Err(_) => idle += Duration::from_millis(200),
            }
        }
        received
    }
}
