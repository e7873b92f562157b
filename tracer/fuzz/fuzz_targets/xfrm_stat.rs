//! `/proc/net/xfrm_stat`: `XfrmStat::parse`, then the delta between two
//! readings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::xfrm_stat::XfrmStat;

fuzz_target!(|text: &str| {
    let Ok(stat) = XfrmStat::parse(text) else {
        return;
    };
    assert!(stat.delta_since(&stat).is_empty());
    let from_zero = stat.delta_since(&XfrmStat::default());
    assert!(from_zero.values().all(|&v| v > 0));
});
