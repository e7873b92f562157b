//! `/proc/kallsyms`: turns drop locations into function names, and tells
//! whether a function exists under its exact name (not only as a
//! `.constprop`/`.isra` clone) and whether it lives in a module.

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

impl Kallsyms {
    pub fn read() -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string("/proc/kallsyms")?))
    }

    pub fn parse(text: &str) -> Self {
        let mut kallsyms = Self::default();
        for line in text.lines() {
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
                kallsyms.data.insert(name.to_string(), address);
            }
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let (Ok(name_start), Ok(name_len)) = (
                u32::try_from(kallsyms.names.len()),
                u16::try_from(name.len()),
            ) else {
                continue;
            };
            let module = match fields.next() {
                Some(m) => kallsyms.module_index(m.trim_start_matches('[').trim_end_matches(']')),
                None => NO_MODULE,
            };
            kallsyms.names.push_str(name);
            kallsyms.text.push(Entry {
                address,
                name_start,
                name_len,
                module,
            });
        }
        kallsyms.text.sort_unstable_by_key(|e| e.address);
        kallsyms.names.shrink_to_fit();
        kallsyms
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

    /// `function+0xoff` for a kernel text address.
    pub fn symbolize(&self, address: u64) -> Option<(Symbol<'_>, u64)> {
        let index = self.text.partition_point(|s| s.address <= address);
        let symbol = self.symbol(self.text.get(index.checked_sub(1)?)?);
        (symbol.address != 0).then(|| (symbol, address - symbol.address))
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

    #[test]
    fn hidden_addresses_are_detected() {
        let syms = Kallsyms::parse("0000000000000000 T xfrm_input\n");
        assert!(!syms.has_addresses());
        assert!(syms.symbolize(0x1234).is_none());
    }
}
