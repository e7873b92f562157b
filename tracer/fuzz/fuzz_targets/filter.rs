//! What the user types: a `--filter` term (`filter::Term::parse`, which
//! must read back what the report prints of it) and a duration
//! (`cli::parse_duration`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::{
    cli::parse_duration,
    filter::{Filter, Term},
};

fuzz_target!(|text: &str| {
    if let Ok(term) = Term::parse(text) {
        let filter = Filter {
            netns: Vec::new(),
            terms: vec![term.clone()],
        };
        let described = filter.describe();
        assert_eq!(Term::parse(&described[0]), Ok(term), "{text:?}");
    }
    let _ = parse_duration(text);
});
