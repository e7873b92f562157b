//! `/proc/kallsyms`: `Kallsyms::parse`, then every lookup on the names and
//! addresses the input holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::kallsyms::Kallsyms;

fuzz_target!(|text: &str| {
    let symbols = Kallsyms::parse(text);
    let _ = symbols.has_addresses();
    let _ = symbols.data_address("__per_cpu_offset");
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if let Some(address) = fields.next().and_then(|a| u64::from_str_radix(a, 16).ok()) {
            for probe in [address, address.wrapping_add(1), address.wrapping_sub(1)] {
                if let Some((symbol, offset)) = symbols.symbolize(probe) {
                    assert_eq!(symbol.address + offset, probe);
                }
            }
        }
        if let Some(name) = fields.nth(1) {
            let _ = symbols.presence(name);
            let base = name.split('.').next().unwrap_or_default();
            let _ = symbols.presence(base);
        }
    }
});
