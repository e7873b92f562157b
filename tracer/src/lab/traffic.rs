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
