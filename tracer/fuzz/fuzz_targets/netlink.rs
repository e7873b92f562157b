//! Netlink: one received datagram split into messages (`split_dump`), each
//! answer parsed as an SA, a policy and a VPN interface (RTM_NEWLINK)
//! with their attributes; the input is also parsed as one bare message of
//! each kind.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::xfrm_state::netlink::{parse_policy, parse_sa, parse_vpn_interface, split_dump};

fuzz_target!(|bytes: &[u8]| {
    let parse_each = |message: &[u8]| {
        let _ = parse_sa(message);
        let _ = parse_policy(message);
        let _ = parse_vpn_interface(message);
    };
    parse_each(bytes);
    let mut answers = Vec::new();
    let _ = split_dump(bytes, &mut answers);
    for answer in &answers {
        parse_each(answer);
    }
});
