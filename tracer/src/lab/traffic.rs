//! Traffic between lab hosts, sent and received by the tool itself so the
//! tests know exactly how many packets crossed.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use super::{Host, Lab, LabError, Result};

/// The don't-fragment behaviour of a sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Df {
    /// IP(V6)_PMTUDISC_PROBE: DF set (IPv6 never fragments on the path) and
    /// the learned path MTU ignored, so an oversize packet reaches every
    /// size check on the way.
    SetIgnoringPmtu,
    /// IP_PMTUDISC_DONT: DF clear, so routers fragment.
    Clear,
}

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

    /// Like `send_udp` from `source`, with the don't-fragment behaviour
    /// `df`. Returns how many sends the kernel refused.
    pub fn send_udp_df(
        &self,
        host: Host,
        source: &str,
        to: SocketAddr,
        count: usize,
        size: usize,
        df: Df,
    ) -> Result<usize> {
        let source: std::net::IpAddr = source
            .parse()
            .map_err(|_| LabError::Other(format!("bad source address {source}")))?;
        crate::netns::run_in(&self.ns_path(host), move || {
            let socket = UdpSocket::bind((source, 0))?;
            let (level, option, mode) = match (source.is_ipv6(), df) {
                (false, Df::SetIgnoringPmtu) => (
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    libc::IP_PMTUDISC_PROBE,
                ),
                (false, Df::Clear) => (
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    libc::IP_PMTUDISC_DONT,
                ),
                (true, Df::SetIgnoringPmtu) => (
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MTU_DISCOVER,
                    libc::IPV6_PMTUDISC_PROBE,
                ),
                (true, Df::Clear) => (
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MTU_DISCOVER,
                    libc::IPV6_PMTUDISC_DONT,
                ),
            };
            // SAFETY: the socket is open; the option value is a c_int we own.
            let ret = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&socket),
                    level,
                    option,
                    std::ptr::from_ref(&mode).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
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

    /// Sends `bytes` over TCP from `from` to `to` (a listener is opened
    /// in `server`); returns how many bytes arrived within `patience`.
    pub fn tcp_transfer(
        &self,
        from: Host,
        server: Host,
        to: SocketAddr,
        bytes: usize,
        patience: Duration,
    ) -> Result<usize> {
        use std::io::{Read as _, Write as _};
        let listener = crate::netns::run_in(&self.ns_path(server), move || {
            std::net::TcpListener::bind(("0.0.0.0", to.port()))
        })
        .map_err(|e| LabError::Other(format!("TCP listener in {}: {e}", self.ns(server))))?;
        let receiver = std::thread::spawn(move || -> std::io::Result<usize> {
            // Polled, so a sender that never connects cannot block us.
            listener.set_nonblocking(true)?;
            let deadline = std::time::Instant::now() + patience;
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            return Ok(0);
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            };
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(patience))?;
            let mut buffer = vec![0u8; 65536];
            let mut received = 0;
            while received < bytes {
                match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received += n,
                }
            }
            Ok(received)
        });
        let sent = crate::netns::run_in(&self.ns_path(from), move || {
            let mut stream = std::net::TcpStream::connect_timeout(&to, patience)?;
            stream.set_write_timeout(Some(patience))?;
            let chunk = vec![0x5a; 16 * 1024];
            let mut sent = 0;
            while sent < bytes {
                match stream.write(&chunk[..chunk.len().min(bytes - sent)]) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            Ok(sent)
        });
        let received = receiver
            .join()
            .map_err(|_| LabError::Other("TCP receiver panicked".into()))?
            .map_err(|e| LabError::Other(format!("TCP receiver in {}: {e}", self.ns(server))))?;
        sent.map_err(|e| LabError::Other(format!("TCP from {}: {e}", self.ns(from))))?;
        Ok(received)
    }

    /// A drop storm's source: sends 64-byte UDP datagrams from `host` to
    /// `to` until `stop` is set, as fast as one thread can or at most
    /// `per_second`; the thread returns how many the kernel accepted.
    pub fn flood_udp(
        &self,
        host: Host,
        to: SocketAddr,
        per_second: Option<u32>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::thread::JoinHandle<Result<u64>> {
        let path = self.ns_path(host);
        let ns = self.ns(host);
        std::thread::spawn(move || {
            crate::netns::run_in(&path, move || {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                let payload = [0x5a; 64];
                let mut sent = 0u64;
                const BURST: u32 = 64;
                let pause = per_second.map(|rate| Duration::from_secs(1) * BURST / rate.max(1));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..BURST {
                        if socket.send_to(&payload, to).is_ok() {
                            sent += 1;
                        }
                    }
                    if let Some(pause) = pause {
                        std::thread::sleep(pause);
                    }
                }
                Ok(sent)
            })
            .map_err(|e| LabError::Other(format!("flooding from {ns}: {e}")))
        })
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
