//! What pluto discovery reads of a process: its `/proc/PID/cmdline`
//! (`PlutoArgs::parse`) and the `ipsec.conf` it sees
//! (`logfile_from_config`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::pluto::{PlutoArgs, logfile_from_config};

fuzz_target!(|bytes: &[u8]| {
    let _ = PlutoArgs::parse(bytes);
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = logfile_from_config(text);
    }
});
