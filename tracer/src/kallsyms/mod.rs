//! `/proc/kallsyms`: turns drop locations and stack frames into function
//! names, and tells whether a function exists under its exact name (not
//! only as a `.constprop`/`.isra` clone) and whether it lives in a module.
//!
//! kallsyms gives no sizes: a symbol ends where the next one starts, but
//! between sections and allocations (past the end of the kernel's text, in
//! the module area where modules and BPF programs lie apart) no symbol
//! marks the end. An address there is shown raw rather than as the
//! nearest symbol with a huge offset.

use std::collections::HashMap;

/// One text symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Symbol<'a> {
    pub address: u64,
    pub name: &'a str,
    /// `None` for vmlinux, else the module name.
    pub module: Option<&'a str>,
}

/// Where a function can be found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    /// Exact name in vmlinux or a module.
    Exact {
        module: Option<String>,
    },
    /// Only compiler clones such as `name.constprop.0`: probes by exact
    /// name fail.
    CloneOnly(String),
    Absent,
}

/// A text symbol as stored: its name is a slice of `Kallsyms::names`.
#[derive(Clone, Copy, Debug)]
struct Entry {
    address: u64,
    name_start: u32,
    name_len: u16,
    /// Index into `Kallsyms::modules`, `NO_MODULE` for vmlinux.
    module: u16,
}

const NO_MODULE: u16 = u16::MAX;

/// The kernel's text symbols, held compactly: some 120,000 of them, all
/// names in one string (one allocation, not one per symbol), looked up by
/// name only a few times per run.
#[derive(Debug, Default)]
pub struct Kallsyms {
    names: String,
    /// Sorted by address.
    text: Vec<Entry>,
    modules: Vec<String>,
    /// The few data symbols we need (see `DATA_SYMBOLS`).
    data: HashMap<String, u64>,
}

/// Data symbols read from kallsyms (present with CONFIG_KALLSYMS_ALL).
const DATA_SYMBOLS: &[&str] = &["__per_cpu_offset"];

/// The pseudo-module of JITed BPF programs and trampolines.
pub const BPF_MODULE: &str = "bpf";

/// Farthest an address may lie from the symbol it is named after: no
/// kernel function comes near 64 KiB (the largest are some 20 KiB, as are
/// our biggest JITed programs); a longer distance is a gap with no symbol.
const MAX_SYMBOL_SIZE: u64 = 0x10000;

/// The same for a module's last function, whose end nothing marks (the
/// next symbol is another module's or a BPF program's, or there is none):
/// one page, as a module's last functions are short (often its exit code).
const MAX_LAST_SYMBOL_SIZE: u64 = 0x1000;

/// Where the kernel's text ends: an address past them is in no function.
const TEXT_END_MARKERS: &[&str] = &["_etext", "_einittext"];

impl Kallsyms {
    pub fn read() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/kallsyms")?))
    }

    pub fn parse(text: &str) -> Self {
        let mut kallsyms = Self::default();
        kallsyms.add_lines(text, |_| true);
        kallsyms
    }

    /// A copy with the BPF programs and trampolines loaded now (ours are
    /// loaded after the start-up read, and their trampolines are made as
    /// they attach): stack frames in them get their names.
    pub fn with_current_bpf_symbols(&self) -> std::io::Result<Self> {
        Ok(self.with_bpf_symbols_from(&std::fs::read_to_string("/proc/kallsyms")?))
    }

    fn with_bpf_symbols_from(&self, text: &str) -> Self {
        let bpf = self.modules.iter().position(|m| m == BPF_MODULE);
        let mut kallsyms = Self {
            names: self.names.clone(),
            text: self
                .text
                .iter()
                .filter(|e| bpf != Some(usize::from(e.module)))
                .copied()
                .collect(),
            modules: self.modules.clone(),
            data: self.data.clone(),
        };
        let suffix = format!("[{BPF_MODULE}]");
        kallsyms.add_lines(text, |line| line.ends_with(&suffix));
        kallsyms
    }

    /// Adds the text symbols of the lines `keep` accepts, and the data
    /// symbols we need.
    fn add_lines(&mut self, text: &str, keep: impl Fn(&str) -> bool) {
        for line in text.lines().filter(|line| keep(line)) {
            let mut fields = line.split_whitespace();
            let (Some(address), Some(kind), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let Ok(address) = u64::from_str_radix(address, 16) else {
                continue;
            };
            if DATA_SYMBOLS.contains(&name) {
                self.data.insert(name.to_string(), address);
            }
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let (Ok(name_start), Ok(name_len)) =
                (u32::try_from(self.names.len()), u16::try_from(name.len()))
            else {
                continue;
            };
            let module = match fields.next() {
                Some(m) => self.module_index(m.trim_start_matches('[').trim_end_matches(']')),
                None => NO_MODULE,
            };
            self.names.push_str(name);
            self.text.push(Entry {
                address,
                name_start,
                name_len,
                module,
            });
        }
        self.text.sort_unstable_by_key(|e| e.address);
        self.names.shrink_to_fit();
    }

    /// The index of a module's name, added if new (symbols of one module
    /// come in a row, so the last one is the usual answer).
    fn module_index(&mut self, module: &str) -> u16 {
        if let Some(last) = self.modules.len().checked_sub(1)
            && self.modules[last] == module
        {
            return last as u16;
        }
        match self.modules.iter().position(|m| m == module) {
            Some(i) => i as u16,
            None if self.modules.len() < usize::from(NO_MODULE) => {
                self.modules.push(module.to_string());
                (self.modules.len() - 1) as u16
            }
            None => NO_MODULE,
        }
    }

    fn symbol(&self, entry: &Entry) -> Symbol<'_> {
        let start = entry.name_start as usize;
        Symbol {
            address: entry.address,
            name: &self.names[start..start + usize::from(entry.name_len)],
            module: self
                .modules
                .get(usize::from(entry.module))
                .map(String::as_str),
        }
    }

    /// Whether the addresses are real (root, or kptr_restrict=0).
    pub fn has_addresses(&self) -> bool {
        self.text.iter().any(|s| s.address != 0)
    }

    /// Address of a data symbol listed in `DATA_SYMBOLS` (0 if hidden).
    pub fn data_address(&self, name: &str) -> Option<u64> {
        self.data.get(name).copied().filter(|&a| a != 0)
    }

    /// Whether `function` can be probed by its name (one scan: asked a
    /// few times per run).
    pub fn presence(&self, function: &str) -> Presence {
        let mut clone = None;
        for entry in &self.text {
            let symbol = self.symbol(entry);
            if symbol.name == function {
                return Presence::Exact {
                    module: symbol.module.map(str::to_string),
                };
            }
            if clone.is_none()
                && symbol
                    .name
                    .strip_prefix(function)
                    .is_some_and(|rest| rest.starts_with('.'))
            {
                clone = Some(symbol.name);
            }
        }
        match clone {
            Some(name) => Presence::CloneOnly(name.to_string()),
            None => Presence::Absent,
        }
    }

    /// The text of each function named exactly `name` (static functions
    /// of several files or modules may share it): from its address to the
    /// next symbol's.
    pub fn function_ranges(&self, name: &str) -> Vec<(u64, u64)> {
        self.text
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.address != 0 && self.symbol(entry).name == name)
            .filter_map(|(index, entry)| {
                let next = self.text.get(index + 1)?;
                (next.module == entry.module).then_some((entry.address, next.address))
            })
            .collect()
    }

    /// The symbol containing a kernel text address, and the offset in it
    /// (`None` where no symbol plausibly contains it).
    pub fn symbolize(&self, address: u64) -> Option<(Symbol<'_>, u64)> {
        let index = self
            .text
            .partition_point(|s| s.address <= address)
            .checked_sub(1)?;
        let entry = &self.text[index];
        let symbol = self.symbol(entry);
        if symbol.address == 0 || TEXT_END_MARKERS.contains(&symbol.name) {
            return None;
        }
        // The next symbol (above `address`) bounds this one when it is of
        // the same module; else this is the last symbol of its module.
        let last_of_module = self
            .text
            .get(index + 1)
            .is_none_or(|next| next.module != entry.module);
        let limit = if last_of_module && symbol.module != Some(BPF_MODULE) {
            MAX_LAST_SYMBOL_SIZE
        } else {
            MAX_SYMBOL_SIZE
        };
        let offset = address - symbol.address;
        (offset < limit).then_some((symbol, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81ff8090 T ip_forward
ffffffff81ff8400 t ip_forward_finish
ffffffff82001000 t ip_fragment.constprop.0
ffffffff820b76e0 T xfrm_input
ffffffff820b7f00 d some_data
ffffffff82a0c200 R __per_cpu_offset
ffffffffc0a01000 t esp_input\t[esp4]
";

    #[test]
    fn symbolizes_addresses_inside_functions() {
        let syms = Kallsyms::parse(SAMPLE);
        let (sym, off) = syms.symbolize(0xffffffff81ff80a0).unwrap();
        assert_eq!((sym.name, off), ("ip_forward", 0x10));
        let (sym, off) = syms.symbolize(0xffffffffc0a01004).unwrap();
        assert_eq!((sym.name, sym.module, off), ("esp_input", Some("esp4"), 4));
        assert!(syms.symbolize(0x10).is_none());
    }

    #[test]
    fn tells_exact_module_and_clone_only_functions() {
        let syms = Kallsyms::parse(SAMPLE);
        assert_eq!(
            syms.presence("xfrm_input"),
            Presence::Exact { module: None }
        );
        assert_eq!(
            syms.presence("esp_input"),
            Presence::Exact {
                module: Some("esp4".into())
            }
        );
        assert_eq!(
            syms.presence("ip_fragment"),
            Presence::CloneOnly("ip_fragment.constprop.0".into())
        );
        assert_eq!(syms.presence("some_data"), Presence::Absent);
        assert_eq!(syms.presence("nothing"), Presence::Absent);
        assert!(syms.has_addresses());
        assert_eq!(
            syms.data_address("__per_cpu_offset"),
            Some(0xffffffff82a0c200)
        );
        assert_eq!(syms.data_address("some_data"), None);
    }

    /// Lines of the host's /proc/kallsyms (6.18, x86_64) recorded while
    /// xfrm-trace ran: vmlinux around `ip_forward`, `xfrm_input` and the
    /// ends of the text, the ftrace trampoline page, and JITed programs
    /// (ours among them: `mtu_fragment_kprobe`). That host has no modules
    /// and no fentry, so a module and a trampoline are added in the
    /// kernel's own format (`bpf_trampoline_<key>`, key = BTF object id <<
    /// 32 | BTF id of the function).
    const RECORDED: &str = "\
ffffffff81000000 T _stext
ffffffff82057bf0 T __pfx_ip_forward
ffffffff82057c00 T ip_forward
ffffffff82058380 T __pfx___ip_options_compile
ffffffff821149b0 T __pfx_xfrm_input
ffffffff821149c0 T xfrm_input
ffffffff82116100 T __pfx_xfrm_input_resume
ffffffff82269a80 T __SCT__tp_func_ma_write
ffffffff82269a88 T _etext
ffffffff82400000 D __start_rodata
ffffffff8377c000 T _sinittext
ffffffff837f26a0 T _einittext
ffffffffc0010000 t handshake_req_alloc\t[handshake]
ffffffffc0010400 t handshake_exit\t[handshake]
ffffffffc0201000 t ftrace_trampoline\t[__builtin__ftrace]
";
    const BPF_LOADED_LATER: &str = "\
ffffffffc0027388 t bpf_prog_aa1fa657af38baff_kfree_skb\t[bpf]
ffffffffc0023954 t bpf_prog_4f9302ba65b90ccd_memset\t[bpf]
ffffffffc002b750 t bpf_prog_e15c959def6d4a90_mtu_fragment_kprobe\t[bpf]
ffffffffc002c44c t bpf_prog_e15c959def6d4a90_mtu_fragment6_kprobe\t[bpf]
ffffffffc0031000 t bpf_trampoline_6442516531\t[bpf]
";

    fn name_at(syms: &Kallsyms, address: u64) -> Option<(String, Option<&str>, u64)> {
        syms.symbolize(address)
            .map(|(s, off)| (s.name.to_string(), s.module, off))
    }

    #[test]
    fn offsets_stay_within_the_symbol() {
        let syms = Kallsyms::parse(RECORDED);
        assert_eq!(
            name_at(&syms, 0xffffffff82057c84),
            Some(("ip_forward".into(), None, 0x84))
        );
        // The last byte before the next symbol, and the next symbol.
        assert_eq!(
            name_at(&syms, 0xffffffff820580ff + 0x280),
            Some(("ip_forward".into(), None, 0x77f))
        );
        assert_eq!(
            name_at(&syms, 0xffffffff82058380),
            Some(("__pfx___ip_options_compile".into(), None, 0))
        );
        // Past the end of the kernel's text (and its init text): no function.
        assert_eq!(name_at(&syms, 0xffffffff82269a90), None);
        assert_eq!(name_at(&syms, 0xffffffff83000000), None);
        assert_eq!(name_at(&syms, 0xffffffff837f3000), None);
        // A gap inside vmlinux longer than any function: `_sinittext` is
        // followed by 0x766a0 bytes of init code without symbols here.
        assert_eq!(name_at(&syms, 0xffffffff8377c000 + 0x20000), None);
        assert_eq!(
            name_at(&syms, 0xffffffff8377c000 + 0x100),
            Some(("_sinittext".into(), None, 0x100))
        );
    }

    #[test]
    fn an_address_past_the_last_symbol_of_a_module_is_not_named_after_it() {
        let syms = Kallsyms::parse(RECORDED);
        assert_eq!(
            name_at(&syms, 0xffffffffc0010420),
            Some(("handshake_exit".into(), Some("handshake"), 0x20))
        );
        // The bogus frame of the issue: a trampoline unknown to the
        // snapshot, named after the module before it.
        assert_eq!(name_at(&syms, 0xffffffffc0010400 + 0x1a0b8ef8), None);
        assert_eq!(name_at(&syms, 0xffffffffc0010400 + 0x1000), None);
        assert_eq!(
            name_at(&syms, 0xffffffffc0010400 + 0xfff).map(|s| s.2),
            Some(0xfff)
        );
    }

    #[test]
    fn bpf_programs_and_trampolines_loaded_after_the_snapshot_are_named() {
        let before = Kallsyms::parse(RECORDED);
        // Before: the program's address is past the last symbol of
        // `handshake`, so it is not named after it.
        assert_eq!(name_at(&before, 0xffffffffc002b7a0), None);
        let text = format!("{RECORDED}{BPF_LOADED_LATER}");
        let after = before.with_bpf_symbols_from(&text);
        assert_eq!(
            name_at(&after, 0xffffffffc002b7a0),
            Some((
                "bpf_prog_e15c959def6d4a90_mtu_fragment_kprobe".into(),
                Some(BPF_MODULE),
                0x50
            ))
        );
        assert_eq!(
            name_at(&after, 0xffffffffc0031072),
            Some(("bpf_trampoline_6442516531".into(), Some(BPF_MODULE), 0x72))
        );
        // A program's code may run to 64 KiB even as the last of its pack.
        assert_eq!(
            name_at(&after, 0xffffffffc0031000 + 0x8000).map(|s| s.2),
            Some(0x8000)
        );
        assert_eq!(name_at(&after, 0xffffffffc0031000 + 0x10000), None);
        // vmlinux and modules unchanged; a second refresh replaces, not
        // duplicates, the programs.
        assert_eq!(
            name_at(&after, 0xffffffff821149c8),
            Some(("xfrm_input".into(), None, 8))
        );
        let again = after.with_bpf_symbols_from(&text);
        assert_eq!(again.text.len(), after.text.len());
        assert_eq!(after.text.len(), before.text.len() + 5);
    }

    #[test]
    fn hidden_addresses_are_detected() {
        let syms = Kallsyms::parse("0000000000000000 T xfrm_input\n");
        assert!(!syms.has_addresses());
        assert!(syms.symbolize(0x1234).is_none());
    }
}
