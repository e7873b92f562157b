//! The running kernel's BTF: struct member offsets, enum values and the set
//! of functions, read at load time so that one binary fits every kernel.
//!
//! Our own small reader of the format (include/uapi/linux/btf.h): one pass
//! records where each type starts, and queries read names in place in the
//! string section. A general parser builds an object and strings per type
//! (120k+ types): 2-3 s of every start under QEMU TCG emulation.

use std::{ops::Range, path::Path};

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

// Type kinds (BTF_KIND_*).
const INT: u32 = 1;
const PTR: u32 = 2;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FWD: u32 = 7;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const FUNC: u32 = 12;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const FLOAT: u32 = 16;
const DECL_TAG: u32 = 17;
const TYPE_TAG: u32 = 18;
const ENUM64: u32 = 19;

/// The file starts with it, little-endian: every host we run on is.
const MAGIC: u16 = 0xeb9f;
/// magic, version, flags, hdr_len, type_off, type_len, str_off, str_len.
const HEADER_LEN: usize = 24;
/// name_off, info, size/type: the start of every type record.
const TYPE_HEADER_LEN: usize = 12;

/// How many typedefs or nested (anonymous) members a lookup follows: real
/// kernels need a handful; it keeps a garbled, cyclic file from looping.
const MAX_DEPTH: u32 = 32;
/// How many members one `member_offset` may look at: a whole sk_buff takes
/// about 100, any struct of 6.18 under 300; the anonymous members of a
/// garbled file could fan out for ever.
const MEMBER_BUDGET: u32 = 1 << 14;

/// The parsed BTF of one kernel image.
pub struct KernelBtf {
    data: Vec<u8>,
    /// Where each type record starts in `data`: type id `n` (from 1; 0 is
    /// void) at index `n - 1`.
    types: Vec<u32>,
    /// The string section, within `data`.
    strings: Range<usize>,
    /// (name hash, id) of every FUNC, sorted: `has_function` and
    /// `function_params` find theirs by binary search, where a scan of
    /// every type took 0.5 ms (a start asks about 30 functions). No String
    /// per function (50k+) either.
    functions: Vec<(u64, u32)>,
}

/// A type record's header, and where its kind's trailing data starts.
#[derive(Clone, Copy)]
struct Type {
    name: u32,
    info: u32,
    /// The size for INT, STRUCT, UNION, ENUM…; the type for PTR, TYPEDEF, FUNC….
    size_or_type: u32,
    /// Offset in `data` of the data after the header.
    extra: usize,
}

impl Type {
    fn kind(self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(self) -> usize {
        (self.info & 0xffff) as usize
    }

    fn kflag(self) -> bool {
        self.info >> 31 == 1
    }

    /// Offsets in `data` of the `vlen` records of `width` bytes after the
    /// header (members, enumerators, parameters).
    fn records(self, width: usize) -> impl Iterator<Item = usize> {
        (0..self.vlen()).map(move |i| self.extra + i * width)
    }
}

/// One member of a struct or union (`struct btf_member`).
struct Member {
    name: u32,
    ty: u32,
    offset: u32,
}

/// Where a member path ends.
enum Place {
    Byte(u32),
    Bitfield,
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// FNV-1a: quick on short names, and the same on every run.
fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The NUL-terminated string at `offset` of a string section.
fn c_str(strings: &[u8], offset: u32) -> &[u8] {
    let tail = strings.get(offset as usize..).unwrap_or_default();
    tail.split(|&b| b == 0).next().unwrap_or_default()
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

    /// Checks the header and that every type record fits its section, and
    /// notes where each starts; nothing else is read until asked for.
    pub fn from_bytes(data: Vec<u8>) -> Result<Self, String> {
        if data.is_empty() {
            return Err("the file is empty".into());
        }
        if let Some(&[low, high]) = data.get(..2)
            && u16::from_le_bytes([low, high]) != MAGIC
        {
            let magic = u16::from_le_bytes([low, high]);
            return Err(format!(
                "not BTF data (magic {magic:#06x}, expected {MAGIC:#06x} little-endian)"
            ));
        }
        let field = |at| u32_at(&data, at).map(|v| v as usize);
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (field(4), field(8), field(12), field(16), field(20))
        else {
            return Err(format!("truncated header ({} bytes)", data.len()));
        };
        if hdr_len < HEADER_LEN {
            return Err(format!("header length {hdr_len} is below {HEADER_LEN}"));
        }
        // Both sections are placed from the end of the header.
        let section = |name: &str, off: usize, len: usize| {
            let start = hdr_len.checked_add(off);
            match start.and_then(|s| Some(s..s.checked_add(len)?)) {
                Some(range) if range.end <= data.len() => Ok(range),
                _ => Err(format!(
                    "the {name} section ({len} bytes at {off} after the header) \
                     runs past the end of the data ({} bytes)",
                    data.len()
                )),
            }
        };
        let type_section = section("type", type_off, type_len)?;
        let strings = section("string", str_off, str_len)?;
        let string_bytes = data.get(strings.clone()).unwrap_or_default();
        // Offset 0 is the empty name; a final NUL ends every name.
        if string_bytes.first() != Some(&0) || string_bytes.last() != Some(&0) {
            return Err("the string section does not start and end with a NUL".into());
        }

        // Types are about 25 bytes on average: one allocation, rarely two.
        let mut types = Vec::with_capacity(type_len / 24);
        let mut functions = Vec::new();
        let mut at = type_section.start;
        while at < type_section.end {
            let id = types.len() + 1;
            let (Some(name), Some(info)) = (u32_at(&data, at), u32_at(&data, at + 4)) else {
                return Err(format!(
                    "type {id} is cut short by the end of the type section"
                ));
            };
            let ty = Type {
                name,
                info,
                size_or_type: 0,
                extra: at + TYPE_HEADER_LEN,
            };
            let trailing = match ty.kind() {
                PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
                INT | VAR | DECL_TAG => 4,
                ARRAY => 12,
                STRUCT | UNION | DATASEC | ENUM64 => ty.vlen() * 12,
                ENUM | FUNC_PROTO => ty.vlen() * 8,
                kind => return Err(format!("type {id} has unknown kind {kind}")),
            };
            let next = ty.extra + trailing;
            if next > type_section.end {
                return Err(format!(
                    "type {id} is cut short by the end of the type section"
                ));
            }
            if name as usize >= str_len {
                return Err(format!("type {id} has its name outside the string section"));
            }
            let Ok(offset) = u32::try_from(at) else {
                return Err("the type section lies beyond 4 GiB".into());
            };
            types.push(offset);
            if ty.kind() == FUNC {
                functions.push((name_hash(c_str(string_bytes, name)), id as u32));
            }
            at = next;
        }
        // By hash, then id: the first entry of a name is its first FUNC.
        functions.sort_unstable();
        Ok(Self {
            data,
            types,
            strings,
            functions,
        })
    }

    fn word(&self, at: usize) -> Option<u32> {
        u32_at(&self.data, at)
    }

    fn ty(&self, id: u32) -> Option<Type> {
        let at = *self.types.get((id as usize).checked_sub(1)?)? as usize;
        Some(Type {
            name: self.word(at)?,
            info: self.word(at + 4)?,
            size_or_type: self.word(at + 8)?,
            extra: at + TYPE_HEADER_LEN,
        })
    }

    /// Every type, in id order.
    fn all(&self) -> impl Iterator<Item = Type> + '_ {
        (1..=self.types.len() as u32).filter_map(|id| self.ty(id))
    }

    /// The first type of `kind` named `name`; the kind is checked first, as
    /// it is cheaper than the name.
    fn find(&self, kind: u32, name: &str) -> Option<Type> {
        self.all()
            .find(|t| t.kind() == kind && self.name_is(t.name, name))
    }

    fn string_section(&self) -> &[u8] {
        self.data.get(self.strings.clone()).unwrap_or_default()
    }

    /// The string at `offset` ("" when it is not UTF-8).
    fn name(&self, offset: u32) -> &str {
        std::str::from_utf8(c_str(self.string_section(), offset)).unwrap_or_default()
    }

    /// Whether the string at `offset` is `name` (never for ""): compared in
    /// place, without looking for its end first.
    fn name_is(&self, offset: u32, name: &str) -> bool {
        let start = offset as usize;
        let end = start.saturating_add(name.len());
        let strings = self.string_section();
        !name.is_empty()
            && strings.get(start..end) == Some(name.as_bytes())
            && strings.get(end) == Some(&0)
    }

    /// The first FUNC named `name`.
    fn function(&self, name: &str) -> Option<Type> {
        let hash = name_hash(name.as_bytes());
        let first = self.functions.partition_point(|&(h, _)| h < hash);
        let &(found, id) = self.functions.get(first)?;
        if found != hash {
            return None;
        }
        match self.ty(id)? {
            func if self.name_is(func.name, name) => Some(func),
            // Another name with the same hash came first: rare, so scan.
            _ => self.find(FUNC, name),
        }
    }

    /// Whether a FUNC record exists: what fentry/fexit need to attach.
    pub fn has_function(&self, name: &str) -> bool {
        self.function(name).is_some()
    }

    /// Parameter names of a function, from its BTF prototype.
    pub fn function_params(&self, name: &str) -> Option<Vec<String>> {
        let func = self.function(name)?;
        let proto = self
            .ty(func.size_or_type)
            .filter(|t| t.kind() == FUNC_PROTO)?;
        // `struct btf_param`: name_off, type; unnamed parameters give "".
        proto
            .records(8)
            .map(|at| Some(self.name(self.word(at)?).to_string()))
            .collect()
    }

    /// Byte offset of `path` (e.g. `"dev"`, `"id.spi"`; anonymous unions
    /// are looked through) inside `struct ty`.
    pub fn member_offset(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        let id = self
            .struct_id(ty)
            .ok_or_else(|| BtfError::NoType(format!("struct {ty}")))?;
        // The empty path is the struct itself (as btfparse had it).
        if path.is_empty() {
            return Ok(0);
        }
        let mut budget = MEMBER_BUDGET;
        match self.place(id, path, 0, &mut budget) {
            Some(Place::Byte(offset)) => Ok(offset),
            Some(Place::Bitfield) => Err(BtfError::Bitfield {
                ty: ty.into(),
                member: path.into(),
            }),
            None => Err(BtfError::NoMember {
                ty: ty.into(),
                member: path.into(),
            }),
        }
    }

    /// Like `member_offset`, `None` when the member does not exist.
    pub fn optional_offset(&self, ty: &str, path: &str) -> Option<u32> {
        self.member_offset(ty, path).ok()
    }

    /// The size in bytes of `struct name`.
    pub fn struct_size(&self, name: &str) -> Option<u32> {
        Some(self.ty(self.struct_id(name)?)?.size_or_type)
    }

    /// The id of a struct (not a forward declaration, a union or a
    /// same-named func): the first one, when two structs share a name.
    fn struct_id(&self, name: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find(|&id| {
            self.ty(id)
                .is_some_and(|t| t.kind() == STRUCT && self.name_is(t.name, name))
        })
    }

    /// Where the dotted `path` lies in the struct or union `id` (behind
    /// typedefs and qualifiers). Like btfparse: the anonymous members are
    /// tried first with the whole path, then the member named by its first
    /// part (C forbids a name twice, so the order only matters in a
    /// garbled file).
    fn place(&self, id: u32, path: &str, depth: u32, budget: &mut u32) -> Option<Place> {
        let parent = self.skip_modifiers(id)?;
        if depth > MAX_DEPTH || !matches!(parent.kind(), STRUCT | UNION) {
            return None;
        }
        let (first, rest) = match path.split_once('.') {
            Some((first, rest)) => (first, Some(rest)),
            None => (path, None),
        };
        let mut named = None;
        for member in self.members(parent) {
            *budget = budget.checked_sub(1)?;
            if member.name != 0 {
                if named.is_none() && self.name_is(member.name, first) {
                    named = Some(member);
                }
                continue;
            }
            // An unnamed bitfield is padding, with nothing inside.
            let Some(base) = self.byte_offset(parent, &member) else {
                continue;
            };
            if let Some(place) = self.place(member.ty, path, depth + 1, budget) {
                return add(base, place);
            }
        }
        let member = named?;
        match (self.byte_offset(parent, &member), rest) {
            (Some(offset), None) => Some(Place::Byte(offset)),
            (None, None) => Some(Place::Bitfield),
            // A bitfield is an integer, with no members.
            (None, Some(_)) => None,
            (Some(offset), Some(rest)) => {
                add(offset, self.place(member.ty, rest, depth + 1, budget)?)
            }
        }
    }

    fn members(&self, parent: Type) -> impl Iterator<Item = Member> + '_ {
        parent.records(12).filter_map(|at| {
            Some(Member {
                name: self.word(at)?,
                ty: self.word(at + 4)?,
                offset: self.word(at + 8)?,
            })
        })
    }

    /// A member's byte offset, `None` for a bitfield. With the kind flag,
    /// the offset holds the bit offset (low 24 bits) and the bitfield size
    /// (high 8, 0 when not a bitfield). Without it, the offset is in bits
    /// and a bitfield is an INT type narrower than its size (the format
    /// before the flag), or simply a member off a byte boundary.
    fn byte_offset(&self, parent: Type, member: &Member) -> Option<u32> {
        let (bits, bitfield) = if parent.kflag() {
            let bits = member.offset & 0xff_ffff;
            (bits, member.offset >> 24 != 0)
        } else {
            (member.offset, self.is_narrow_int(member.ty))
        };
        (!bitfield && bits % 8 == 0).then_some(bits / 8)
    }

    /// An INT (behind typedefs and qualifiers) whose bits do not fill its
    /// size, or start past its first bit: a bitfield's type without the kind flag.
    fn is_narrow_int(&self, id: u32) -> bool {
        let Some(t) = self.skip_modifiers(id).filter(|t| t.kind() == INT) else {
            return false;
        };
        // The INT's trailing word: encoding (bits 24-27), offset (16-23), bits (0-7).
        let encoding = self.word(t.extra).unwrap_or(0);
        let (offset, bits) = ((encoding >> 16) & 0xff, encoding & 0xff);
        offset != 0 || u64::from(bits) != u64::from(t.size_or_type) * 8
    }

    /// The type `id` is, behind typedefs, const, volatile and restrict.
    fn skip_modifiers(&self, mut id: u32) -> Option<Type> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t.kind() {
                TYPEDEF | CONST | VOLATILE | RESTRICT => id = t.size_or_type,
                _ => return Some(t),
            }
        }
        None
    }

    /// All enumerators of the named enum, e.g. `skb_drop_reason`.
    pub fn enum_values(&self, enum_name: &str) -> Option<Vec<(String, u64)>> {
        let e = self
            .all()
            .find(|t| matches!(t.kind(), ENUM | ENUM64) && self.name_is(t.name, enum_name))?;
        Some(self.enumerators(e))
    }

    /// All enumerators of the (possibly anonymous) enum that contains
    /// `member`; the kernel's LINUX_MIB_* values live in an anonymous one.
    pub fn enum_containing(&self, member: &str) -> Option<Vec<(String, u64)>> {
        let e = self.all().find(|t| {
            t.kind() == ENUM
                && t.records(8)
                    .any(|at| self.word(at).is_some_and(|name| self.name_is(name, member)))
        })?;
        Some(self.enumerators(e))
    }

    /// An ENUM's (name, value) records are 8 bytes, signed with the kind
    /// flag; an ENUM64's are 12: name, low and high 32 bits.
    fn enumerators(&self, e: Type) -> Vec<(String, u64)> {
        let wide = e.kind() == ENUM64;
        e.records(if wide { 12 } else { 8 })
            .filter_map(|at| {
                let name = self.name(self.word(at)?).to_string();
                let low = self.word(at + 4)?;
                let value = if wide {
                    u64::from(self.word(at + 8)?) << 32 | u64::from(low)
                } else if e.kflag() {
                    // Negative values widen with their sign, as before.
                    low as i32 as u64
                } else {
                    u64::from(low)
                };
                Some((name, value))
            })
            .collect()
    }
}

/// `place` moved by a member's byte offset.
fn add(base: u32, place: Place) -> Option<Place> {
    match place {
        Place::Byte(offset) => base.checked_add(offset).map(Place::Byte),
        Place::Bitfield => Some(Place::Bitfield),
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
mod tests;
