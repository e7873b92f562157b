//! What ESP adds to a packet, from an SA's real algorithms and mode, as the
//! kernel computes it (`esp_init_state`, `xfrm_state_mtu`).

use serde::{Deserialize, Serialize};

use super::{Mode, Sa};

/// The fixed parts of an ESP SA's encapsulation, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EspGeometry {
    /// Outer IP header (tunnel mode) + UDP (NAT-T) + ESP header + IV.
    pub header: u32,
    pub iv: u32,
    /// Payload + 2 trailer bytes are padded to this (at least 4).
    pub block: u32,
    pub icv: u32,
    /// Inner IP header length kept in place in transport mode (0 in tunnel).
    pub transport_ip: u32,
}

/// (IV bytes, cipher block bytes) of the ciphers the kernel offers for ESP.
fn cipher_sizes(name: &str) -> Option<(u32, u32)> {
    Some(match name {
        "rfc4106(gcm(aes))" | "rfc4309(ccm(aes))" | "rfc7539esp(chacha20,poly1305)" => (8, 1),
        "rfc4543(gcm(aes))" | "rfc3686(ctr(aes))" => (8, 1),
        "cbc(aes)" | "cbc(camellia)" | "cbc(serpent)" | "cbc(twofish)" | "cbc(sm4)" => (16, 16),
        "cbc(des3_ede)" | "cbc(des)" | "cbc(cast5)" | "cbc(blowfish)" => (8, 8),
        "ecb(cipher_null)" => (0, 1),
        _ => return None,
    })
}

/// ICV bytes of an untruncated-form auth algorithm (the kernel's defaults).
fn default_icv(name: &str) -> Option<u32> {
    Some(match name {
        "hmac(md5)" | "hmac(sha1)" | "xcbc(aes)" | "hmac(rmd160)" => 12,
        // The kernel keeps 96 bits for hmac(sha256) given without a
        // truncation length (pre-RFC 4868 behaviour).
        "hmac(sha256)" => 12,
        "hmac(sha384)" => 24,
        "hmac(sha512)" => 32,
        "cmac(aes)" => 12,
        "digest_null" => 0,
        _ => return None,
    })
}

impl Sa {
    /// The ESP geometry of this SA, or `None` for non-ESP SAs and
    /// algorithms this table does not know (said plainly by the caller).
    pub fn esp_geometry(&self) -> Option<EspGeometry> {
        if self.proto != 50 {
            return None;
        }
        let (iv, block, icv) = if let Some(aead) = &self.aead {
            let (iv, block) = cipher_sizes(&aead.name)?;
            (iv, block, aead.icv_bits / 8)
        } else {
            let (iv, block) = cipher_sizes(&self.cipher.as_ref()?.name)?;
            let icv = match &self.auth {
                Some(auth) if auth.icv_bits > 0 => auth.icv_bits / 8,
                Some(auth) => default_icv(&auth.name)?,
                None => 0,
            };
            (iv, block, icv)
        };
        let outer_ip = if self.dst.is_ipv6() { 40 } else { 20 };
        let tunnel_ip = if self.mode == Mode::Tunnel {
            outer_ip
        } else {
            0
        };
        let udp = match self.encap {
            Some(e) if e.kind == 7 => 2,
            Some(_) => 8,
            None => 0,
        };
        Some(EspGeometry {
            header: 8 + iv + tunnel_ip + udp,
            iv,
            block: block.max(4).next_multiple_of(4),
            icv,
            transport_ip: if self.mode == Mode::Transport {
                outer_ip
            } else {
                0
            },
        })
    }
}

impl EspGeometry {
    /// On-wire IP packet length for an inner IP packet of `inner` bytes.
    pub fn outer_len(&self, inner: u32) -> u32 {
        let payload = inner - self.transport_ip;
        let padded = (payload + 2).next_multiple_of(self.block);
        self.transport_ip + self.header + padded + self.icv
    }

    /// Largest inner IP packet whose ESP packet fits `mtu` (the kernel's
    /// `xfrm_state_mtu`).
    pub fn max_inner(&self, mtu: u32) -> u32 {
        let overhead = self.header + self.icv + self.transport_ip;
        let room = mtu.saturating_sub(overhead) & !(self.block - 1);
        (room + self.transport_ip).saturating_sub(2)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::xfrm_state::{Algorithm, Encap, Lifetime, Selector};

    fn sa(mode: Mode, aead: bool, nat_t: bool) -> Sa {
        let alg = |name: &str, icv_bits| {
            Some(Algorithm {
                name: name.into(),
                key_bits: 128,
                icv_bits,
            })
        };
        Sa {
            src: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)),
            spi: 1,
            proto: 50,
            reqid: 1,
            mode,
            replay_window: 32,
            selector: Selector::default(),
            aead: if aead {
                alg("rfc4106(gcm(aes))", 128)
            } else {
                None
            },
            cipher: if aead { None } else { alg("cbc(aes)", 0) },
            auth: if aead { None } else { alg("hmac(sha256)", 128) },
            encap: nat_t.then_some(Encap {
                kind: 2,
                sport: 4500,
                dport: 4500,
            }),
            lifetime: Lifetime::default(),
            bytes: 0,
            packets: 0,
            replay_errors: 0,
            integrity_failures: 0,
            mark: None,
            if_id: None,
        }
    }

    #[test]
    fn gcm_tunnel_matches_the_kernel() {
        let g = sa(Mode::Tunnel, true, false).esp_geometry().unwrap();
        // 20 outer + 8 ESP + 8 IV, pad to 4 incl. 2 trailer bytes, 16 ICV.
        assert_eq!(g.outer_len(100), 20 + 8 + 8 + 104 + 16);
        // xfrm_state_mtu(1500): ((1500 - 52) & ~3) - 2 = 1446.
        assert_eq!(g.max_inner(1500), 1446);
        assert!(g.outer_len(1446) <= 1500 && g.outer_len(1447) > 1500);
    }

    #[test]
    fn cbc_transport_nat_t() {
        let g = sa(Mode::Transport, false, true).esp_geometry().unwrap();
        assert_eq!((g.header, g.block, g.icv), (8 + 16 + 8, 16, 16));
        // Inner 100 = 20 IP + 80 payload; 82 padded to 96.
        assert_eq!(g.outer_len(100), 20 + 32 + 96 + 16);
        let max = g.max_inner(1400);
        assert!(g.outer_len(max) <= 1400 && g.outer_len(max + 1) > 1400);
    }

    #[test]
    fn every_size_agrees_with_max_inner() {
        for mode in [Mode::Tunnel, Mode::Transport] {
            for aead in [true, false] {
                for nat_t in [true, false] {
                    let g = sa(mode, aead, nat_t).esp_geometry().unwrap();
                    for mtu in 576..1600 {
                        let max = g.max_inner(mtu);
                        assert!(g.outer_len(max) <= mtu, "{mode:?} {aead} {nat_t} {mtu}");
                        assert!(g.outer_len(max + 1) > mtu, "{mode:?} {aead} {nat_t} {mtu}");
                    }
                }
            }
        }
    }
}
