//! `/proc/kallsyms`: turns drop locations into function names, and tells
//! whether a function exists under its exact name (not only as a
//! `.constprop`/`.isra` clone) and whether it lives in a module.

use std::collections::HashMap;

/// One text symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub address: u64,
    pub name: String,
    /// `None` for vmlinux, else the module name.
    pub module: Option<String>,
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

#[derive(Debug, Default)]
pub struct Kallsyms {
    /// Text symbols sorted by address.
    text: Vec<Symbol>,
    by_name: HashMap<String, usize>,
    /// Base name -> first clone symbol seen (e.g. `ip_fragment.constprop.0`).
    clones: HashMap<String, String>,
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
        let mut text_symbols = Vec::new();
        let mut clones = HashMap::new();
        let mut data = HashMap::new();
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
                data.insert(name.to_string(), address);
            }
            if !matches!(kind, "t" | "T" | "w" | "W") {
                continue;
            }
            let module = fields
                .next()
                .map(|m| m.trim_start_matches('[').trim_end_matches(']').to_string());
            if let Some((base, _)) = name.split_once('.') {
                clones
                    .entry(base.to_string())
                    .or_insert_with(|| name.to_string());
            }
            text_symbols.push(Symbol {
                address,
                name: name.to_string(),
                module,
            });
        }
        text_symbols.sort_by_key(|s| s.address);
        let by_name = text_symbols
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Self {
            text: text_symbols,
            by_name,
            clones,
            data,
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

    pub fn presence(&self, function: &str) -> Presence {
        if let Some(&i) = self.by_name.get(function) {
            return Presence::Exact {
                module: self.text[i].module.clone(),
            };
        }
        match self.clones.get(function) {
            Some(clone) => Presence::CloneOnly(clone.clone()),
            None => Presence::Absent,
        }
    }

    /// `function+0xoff` for a kernel text address.
    pub fn symbolize(&self, address: u64) -> Option<(&Symbol, u64)> {
        let index = self.text.partition_point(|s| s.address <= address);
        let symbol = self.text.get(index.checked_sub(1)?)?;
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
        assert_eq!((sym.name.as_str(), off), ("ip_forward", 0x10));
        let (sym, off) = syms.symbolize(0xffffffffc0a01004).unwrap();
        assert_eq!(
            (sym.name.as_str(), sym.module.as_deref(), off),
            ("esp_input", Some("esp4"), 4)
        );
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
