//! pluto's log (file or journal): `pluto::log::parse_line` on every line,
//! and on the whole input as one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::pluto::log::parse_line;

fuzz_target!(|text: &str| {
    for line in text.lines() {
        if let Some(event) = parse_line(line) {
            assert!(line.contains(&event.text), "{event:?}");
        }
    }
    let _ = parse_line(text);
});
