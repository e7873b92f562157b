//! `ipsec whack --status` output: `pluto::status::parse_status`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::pluto::status::parse_status;

fuzz_target!(|text: &str| {
    let _ = parse_status(text);
});
