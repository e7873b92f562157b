//! NETLINK_XFRM: one received datagram split into messages
//! (`split_dump`), each answer parsed as an SA and as a policy with their
//! attributes; the input is also parsed as one bare SA and policy message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::xfrm_state::netlink::{parse_policy, parse_sa, split_dump};

fuzz_target!(|bytes: &[u8]| {
    let _ = parse_sa(bytes);
    let _ = parse_policy(bytes);
    let mut answers = Vec::new();
    let _ = split_dump(bytes, &mut answers);
    for answer in &answers {
        let _ = parse_sa(answer);
        let _ = parse_policy(answer);
    }
});
