//! A tracepoint's tracefs `format` file: `tracefs::field_offset`. The first
//! line of the input names the field to look up; the fields the tracer
//! reads are looked up too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::tracefs::field_offset;

fuzz_target!(|text: &str| {
    let (field, format) = text.split_once('\n').unwrap_or((text, ""));
    let _ = field_offset(format, field);
    for field in ["skbaddr", "location", "protocol", "reason", "rx_sk", ""] {
        let _ = field_offset(text, field);
    }
});
