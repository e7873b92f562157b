//! The SAs read over NETLINK_XFRM are the ones the lab installed (without
//! their keys), and the ESP overhead computed from them is exactly what the
//! kernel adds on the wire. VM-only: the host kernel has no ESP.

use std::{net::SocketAddr, time::Duration};

use xfrm_trace::{
    lab::{
        Cipher, EAST_WAN, EHOST, Host, Lab, Mode, SPI_WEST_TO_EAST, StaticIpsec, WEST_WAN, WHOST,
    },
    xfrm_state::{self, XfrmState},
};

/// UDP payload sizes sent through each SA (tiny, odd, block-crossing, large).
const PAYLOADS: [u32; 5] = [1, 50, 101, 333, 1000];

/// Every `0x…` key `ip xfrm state` shows for `host` (root can read them).
fn keys(lab: &Lab, host: Host) -> Vec<String> {
    lab.ip_line(host, "xfrm state")
        .unwrap()
        .split_whitespace()
        .filter(|w| w.starts_with("0x") && w.len() > 12)
        .map(|w| w.trim_start_matches("0x").to_string())
        .collect()
}

/// Installs `config` in the (reused) lab and checks it.
fn check(lab: &mut Lab, config: StaticIpsec) {
    lab.clear_ipsec().expect("clearing SAs");
    lab.static_ipsec(&config).expect("static SAs");
    let state = XfrmState::read_in(&lab.ns_path(Host::West)).expect("netlink dump");
    let sa = state
        .sa(SPI_WEST_TO_EAST, EAST_WAN.parse().unwrap())
        .unwrap_or_else(|| panic!("SA 0x1001 missing: {state:#?}"));
    assert_eq!(sa.src.to_string(), WEST_WAN);
    assert_eq!(sa.reqid, 1);
    let expected_mode = match config.mode {
        Mode::Tunnel => xfrm_state::Mode::Tunnel,
        Mode::Transport => xfrm_state::Mode::Transport,
    };
    assert_eq!(sa.mode, expected_mode);
    match config.cipher {
        Cipher::AesGcm128 => {
            let aead = sa.aead.as_ref().expect("aead");
            assert_eq!(
                (aead.name.as_str(), aead.icv_bits),
                ("rfc4106(gcm(aes))", 128)
            );
        }
        Cipher::AesCbcHmacSha256 => {
            assert_eq!(sa.cipher.as_ref().expect("cipher").name, "cbc(aes)");
            let auth = sa.auth.as_ref().expect("auth");
            assert_eq!((auth.name.as_str(), auth.icv_bits), ("hmac(sha256)", 128));
        }
    }
    assert_eq!(
        sa.encap.map(|e| (e.sport, e.dport)),
        config.nat_t.then_some((4500, 4500))
    );
    let out_policies = state.policies.iter().filter(|p| p.dir == "out").count();
    assert_eq!(out_policies, 1, "{:#?}", state.policies);

    // Keys never reach what we keep.
    let json = serde_json::to_string(&state).unwrap().to_lowercase();
    let debug = format!("{state:?}").to_lowercase();
    let keys = keys(lab, Host::West);
    assert!(!keys.is_empty(), "ip xfrm state shows no keys");
    for key in &keys {
        assert!(!json.contains(key.as_str()) && !debug.contains(key.as_str()));
    }

    // On the wire: each inner packet grows by exactly the computed overhead.
    let geometry = sa.esp_geometry().expect("ESP geometry");
    let (from, to, inner_ip) = match config.mode {
        Mode::Tunnel => (Host::Whost, EHOST, WHOST),
        Mode::Transport => (Host::West, EAST_WAN, WEST_WAN),
    };
    let largest = geometry.max_inner(1500) - 28;
    let payloads: Vec<u32> = PAYLOADS.iter().copied().chain([largest]).collect();
    let capture = lab.capture(Host::Router, "r-west").unwrap();
    let to: SocketAddr = format!("{to}:7000").parse().unwrap();
    for payload in &payloads {
        lab.send_udp(from, to, 1, *payload as usize).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let esp: Vec<_> = capture
        .stop()
        .into_iter()
        .filter(|p| p.is_esp() && p.src.to_string() == WEST_WAN)
        .collect();
    let sizes: Vec<u32> = esp.iter().map(|p| u32::from(p.ip_len)).collect();
    let expected: Vec<u32> = payloads
        .iter()
        .map(|p| geometry.outer_len(p + 28))
        .collect();
    assert_eq!(
        sizes, expected,
        "{config:?} from {inner_ip}: on-wire ESP sizes vs computed ({geometry:?})"
    );
    assert!(esp.iter().all(|p| !p.fragment), "fragments: {esp:?}");
    assert!(*sizes.last().unwrap() <= 1500);
}

/// Runs on: 6.1, 6.12, sid (eight setups or a variant; 5.10 is the slowest kernel to load on)
#[test]
fn computed_esp_overhead_equals_the_wire_for_every_mode_cipher_and_encap() {
    let mut lab = Lab::create(&format!("xo{}", std::process::id() % 10000)).expect("lab topology");
    for mode in [Mode::Tunnel, Mode::Transport] {
        for cipher in [Cipher::AesGcm128, Cipher::AesCbcHmacSha256] {
            for nat_t in [false, true] {
                check(
                    &mut lab,
                    StaticIpsec {
                        mode,
                        cipher,
                        nat_t,
                        ..StaticIpsec::default()
                    },
                );
            }
        }
    }
}
