//! The running kernel's BTF: struct member offsets, enum values and the set
//! of functions, read at load time so that one binary fits every kernel.

use std::{collections::HashSet, path::Path};

use btfparse::{Offset, Readable, TypeInformation, TypeVariant};

/// Where the kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    // `error` is not a `source`: printed once, the line stays one cause long.
    #[error(
        "kernel BTF not available at {path} (kernel built without CONFIG_DEBUG_INFO_BTF?): {error}"
    )]
    Missing { path: String, error: std::io::Error },
    #[error("cannot parse BTF {path}: {message}")]
    Parse { path: String, message: String },
    #[error("BTF has no type {0}")]
    NoType(String),
    #[error("BTF type {ty} has no member {member}")]
    NoMember { ty: String, member: String },
    #[error("BTF member {ty}.{member} is a bitfield")]
    Bitfield { ty: String, member: String },
}

/// The parsed BTF of one kernel image.
pub struct KernelBtf {
    types: TypeInformation,
    functions: HashSet<String>,
}

struct Bytes(Vec<u8>);

impl Readable for Bytes {
    fn read(&self, offset: u64, buffer: &mut [u8]) -> btfparse::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(buffer.len())
            .and_then(|end| self.0.get(start..end))
        {
            Some(src) => {
                buffer.copy_from_slice(src);
                Ok(())
            }
            None => Err(btfparse::Error::new(
                btfparse::ErrorKind::IOError,
                "read past the end of the BTF data",
            )),
        }
    }
}

impl KernelBtf {
    /// Parses the running kernel's BTF.
    pub fn running() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|error| BtfError::Missing {
            path: path.display().to_string(),
            error,
        })?;
        Self::from_bytes(data).map_err(|message| BtfError::Parse {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn from_bytes(data: Vec<u8>) -> Result<Self, String> {
        if data.is_empty() {
            return Err("the file is empty".into());
        }
        let types =
            TypeInformation::new(&Bytes(data)).map_err(|e| e.message().trim().to_string())?;
        let functions = types
            .get()
            .values()
            .filter_map(|t| match t {
                TypeVariant::Func(f) => f.name().clone(),
                _ => None,
            })
            .collect();
        Ok(Self { types, functions })
    }

    /// Whether a FUNC record exists: what fentry/fexit need to attach.
    pub fn has_function(&self, name: &str) -> bool {
        self.functions.contains(name)
    }

    /// Parameter names of a function, from its BTF prototype.
    pub fn function_params(&self, name: &str) -> Option<Vec<String>> {
        let proto = self.types.get().values().find_map(|t| match t {
            TypeVariant::Func(f) if f.name().as_deref() == Some(name) => Some(*f.prototype_tid()),
            _ => None,
        })?;
        match self.types.from_id(proto)? {
            TypeVariant::FuncProto(p) => Some(
                p.parameter_list()
                    .iter()
                    .map(|param| param.name().unwrap_or_default())
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Byte offset of `path` (e.g. `"dev"`, `"id.spi"`; anonymous unions
    /// are looked through) inside `struct ty`.
    pub fn member_offset(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        let tid = self
            .struct_id(ty)
            .ok_or_else(|| BtfError::NoType(format!("struct {ty}")))?;
        match self.types.offset_of(tid, path) {
            Ok((_, Offset::ByteOffset(offset))) => Ok(offset),
            Ok((_, Offset::BitOffsetAndSize(..))) => Err(BtfError::Bitfield {
                ty: ty.into(),
                member: path.into(),
            }),
            Err(_) => Err(BtfError::NoMember {
                ty: ty.into(),
                member: path.into(),
            }),
        }
    }

    /// Like `member_offset`, `None` when the member does not exist.
    pub fn optional_offset(&self, ty: &str, path: &str) -> Option<u32> {
        self.member_offset(ty, path).ok()
    }

    /// The id of a struct (not a forward declaration or a same-named func).
    fn struct_id(&self, name: &str) -> Option<u32> {
        let by_name = self.types.id_of(name);
        if let Some(id) = by_name
            && matches!(self.types.from_id(id), Some(TypeVariant::Struct(_)))
        {
            return Some(id);
        }
        self.types.get().iter().find_map(|(id, t)| match t {
            TypeVariant::Struct(s) if s.name().as_deref() == Some(name) => Some(*id),
            _ => None,
        })
    }

    /// All enumerators of the named enum, e.g. `skb_drop_reason`.
    pub fn enum_values(&self, enum_name: &str) -> Option<Vec<(String, u64)>> {
        self.types.get().values().find_map(|t| match t {
            TypeVariant::Enum(e) if e.name().as_deref() == Some(enum_name) => Some(
                e.named_value_list()
                    .iter()
                    .map(|v| (v.name.clone(), enum32(v.value)))
                    .collect(),
            ),
            TypeVariant::Enum64(e) if e.name().as_deref() == Some(enum_name) => Some(
                e.named_value_list()
                    .iter()
                    .map(|v| (v.name.clone(), enum64(v.value)))
                    .collect(),
            ),
            _ => None,
        })
    }

    /// All enumerators of the (possibly anonymous) enum that contains
    /// `member`; the kernel's LINUX_MIB_* values live in an anonymous one.
    pub fn enum_containing(&self, member: &str) -> Option<Vec<(String, u64)>> {
        self.types.get().values().find_map(|t| match t {
            TypeVariant::Enum(e) if e.named_value_list().iter().any(|v| v.name == member) => Some(
                e.named_value_list()
                    .iter()
                    .map(|v| (v.name.clone(), enum32(v.value)))
                    .collect(),
            ),
            _ => None,
        })
    }
}

fn enum32(value: btfparse::Integer32Value) -> u64 {
    match value {
        btfparse::Integer32Value::Signed(v) => v as u64,
        btfparse::Integer32Value::Unsigned(v) => u64::from(v),
    }
}

fn enum64(value: btfparse::Integer64Value) -> u64 {
    match value {
        btfparse::Integer64Value::Signed(v) => v as u64,
        btfparse::Integer64Value::Unsigned(v) => v,
    }
}

/// Drop reason names by value, from `enum skb_drop_reason`, without the
/// `SKB_DROP_REASON_` prefix (as the kernel's tracepoint prints them).
pub fn drop_reason_names(btf: &KernelBtf) -> std::collections::HashMap<u32, String> {
    btf.enum_values("skb_drop_reason")
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, value)| {
            let short = name.strip_prefix("SKB_DROP_REASON_")?.to_string();
            Some((u32::try_from(value).ok()?, short))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // These run against the BTF of the machine running the tests; the values
    // are checked against `bpftool btf dump` in the foundation issue notes.
    fn running() -> Option<KernelBtf> {
        KernelBtf::running().ok()
    }

    #[test]
    fn empty_or_truncated_btf_is_one_plain_line() {
        assert_eq!(
            KernelBtf::from_bytes(Vec::new()).err().as_deref(),
            Some("the file is empty")
        );
        let Ok(whole) = std::fs::read(VMLINUX_BTF) else {
            return;
        };
        let message = KernelBtf::from_bytes(whole[..100].to_vec()).err().unwrap();
        assert!(
            !message.contains("Error {") && !message.contains('\n'),
            "{message}"
        );
    }

    #[test]
    fn resolves_members_through_anonymous_unions() {
        let Some(btf) = running() else { return };
        // sk_buff.dev sits inside an anonymous union/struct on every kernel.
        let dev = btf.member_offset("sk_buff", "dev").unwrap();
        let len = btf.member_offset("sk_buff", "len").unwrap();
        assert!(dev < len, "dev={dev} len={len}");
        assert!(btf.member_offset("sk_buff", "no_such_member").is_err());
        assert!(matches!(
            btf.member_offset("no_such_struct", "x"),
            Err(BtfError::NoType(_))
        ));
    }

    #[test]
    fn drop_reasons_come_from_btf_by_name() {
        let Some(btf) = running() else { return };
        let names = drop_reason_names(&btf);
        assert!(names.values().any(|n| n == "XFRM_POLICY"));
        assert!(names.values().any(|n| n == "NOT_SPECIFIED"));
    }

    #[test]
    fn mib_counters_are_found_in_their_anonymous_enum() {
        let Some(btf) = running() else { return };
        let mib = btf.enum_containing("LINUX_MIB_XFRMINNOSTATES").unwrap();
        assert!(
            mib.iter()
                .any(|(n, v)| n == "LINUX_MIB_XFRMINNOSTATES" && *v == 4)
        );
    }

    #[test]
    fn function_prototypes_name_their_parameters() {
        let Some(btf) = running() else { return };
        let params = btf.function_params("xfrm_input").unwrap();
        assert_eq!(params, ["skb", "nexthdr", "spi", "encap_type"]);
        assert!(btf.function_params("no_such_function_xyz").is_none());
    }

    #[test]
    fn functions_are_listed() {
        let Some(btf) = running() else { return };
        assert!(btf.has_function("xfrm_input"));
        assert!(!btf.has_function("no_such_function_xyz"));
    }
}
