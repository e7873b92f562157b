//! Checked against the BTF of the machine running the tests, against
//! `bpftool`'s reading of it, and on crafted and garbled files.

use super::*;
use std::collections::HashMap;
use tracer_common::layout::{KernelOffsets, OffsetSource};

// These run against the BTF of the machine running the tests; the values
// are checked against `bpftool btf dump` by the test that runs it.
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

/// `bpftool btf dump file /sys/kernel/btf/vmlinux format raw`, parsed:
/// an independent reading of the same BTF to check ours against.
struct RawDump {
    /// By type id: kind, name, referenced type, and for structs and
    /// unions their members (name, type, bit offset, bitfield size).
    types: HashMap<u32, RawType>,
    by_name: HashMap<(String, String), Vec<u32>>,
}

#[derive(Default)]
struct RawType {
    kind: String,
    name: String,
    type_id: u32,
    members: Vec<(String, u32, u32, u32)>,
    values: Vec<(String, i128)>,
}

/// `'name' key=value key=value …`, as bpftool prints each type and member.
fn raw_fields(line: &str) -> (String, HashMap<&str, &str>) {
    let (name, rest) = match line.trim().strip_prefix('\'') {
        Some(quoted) => quoted.split_once('\'').unwrap_or((quoted, "")),
        None => ("", line),
    };
    let fields = rest
        .split_whitespace()
        .filter_map(|f| f.trim_end_matches(',').split_once('='))
        .collect();
    (name.replace("(anon)", ""), fields)
}

impl RawDump {
    /// None when bpftool is not installed or cannot read the BTF.
    fn running() -> Option<Self> {
        let out = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX_BTF, "format", "raw"])
            .output()
            .ok()
            .filter(|out| out.status.success())?;
        let text = String::from_utf8(out.stdout).ok()?;
        let mut types = HashMap::new();
        let mut current = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                // [873] STRUCT 'sk_buff' size=224 vlen=28
                let (id, rest) = rest.split_once("] ")?;
                let (kind, rest) = rest.split_once(' ')?;
                let (name, fields) = raw_fields(rest);
                current = id.parse().ok()?;
                let type_id = fields.get("type_id").map_or(0, |t| t.parse().unwrap());
                let kind = kind.to_string();
                types.insert(
                    current,
                    RawType {
                        kind,
                        name,
                        type_id,
                        ..RawType::default()
                    },
                );
            } else {
                // \t'dev' type_id=2776 bits_offset=0 [bitfield_size=1]
                // \t'SKB_DROP_REASON_NOT_SPECIFIED' val=2
                let (name, fields) = raw_fields(line);
                let ty = types.get_mut(&current)?;
                let number = |key| fields.get(key).map_or(0, |v: &&str| v.parse().unwrap());
                if let Some(value) = fields.get("val") {
                    // ENUM64 values end in "ULL".
                    let value = value.trim_end_matches("ULL").parse().unwrap();
                    ty.values.push((name, value));
                } else {
                    let member = (
                        name,
                        number("type_id"),
                        number("bits_offset"),
                        number("bitfield_size"),
                    );
                    ty.members.push(member);
                }
            }
        }
        let mut by_name: HashMap<(String, String), Vec<u32>> = HashMap::new();
        for (id, ty) in &types {
            let key = (ty.kind.clone(), ty.name.clone());
            by_name.entry(key).or_default().push(*id);
        }
        by_name.values_mut().for_each(|ids| ids.sort_unstable());
        Some(Self { types, by_name })
    }

    /// The ids of the types of `kind` named `name`, in order.
    fn ids(&self, kind: &str, name: &str) -> &[u32] {
        self.by_name
            .get(&(kind.to_string(), name.to_string()))
            .map_or(&[], Vec::as_slice)
    }

    /// Bit offset and bitfield size of `path` in type `id`, walked the
    /// plain way: behind typedefs, anonymous members searched depth first.
    fn place(&self, mut id: u32, path: &[&str]) -> Option<(u32, u32)> {
        let [first, rest @ ..] = path else {
            return Some((0, 0));
        };
        let mut ty = self.types.get(&id)?;
        while matches!(
            ty.kind.as_str(),
            "TYPEDEF" | "CONST" | "VOLATILE" | "RESTRICT"
        ) {
            id = ty.type_id;
            ty = self.types.get(&id)?;
        }
        for (name, member_ty, bits, size) in &ty.members {
            let found = if name.is_empty() {
                self.place(*member_ty, path)
            } else if name == first {
                self.place(*member_ty, rest)
                    .map(|(b, s)| if rest.is_empty() { (0, *size) } else { (b, s) })
            } else {
                None
            };
            if let Some((inner, inner_size)) = found {
                return Some((bits + inner, inner_size));
            }
        }
        None
    }
}

#[test]
fn offsets_enums_and_functions_agree_with_bpftool() {
    let Some(btf) = running() else { return };
    let Some(raw) = RawDump::running() else {
        eprintln!("bpftool cannot dump {VMLINUX_BTF}: skipped");
        return;
    };
    // Every member the programs read (the `KernelOffsets` table), a
    // bitfield, one more nested member, and every member of their structs.
    let mut paths: Vec<(&str, String)> = KernelOffsets::FIELDS
        .iter()
        .filter_map(|field| match field.source {
            OffsetSource::Required { ty, path } | OffsetSource::Optional { ty, path } => {
                Some((ty, path.to_string()))
            }
            OffsetSource::Computed => None,
        })
        .chain([
            ("sk_buff", "cloned".to_string()),
            ("xfrm_state", "props.saddr".to_string()),
        ])
        .collect();
    for ty in [
        "sk_buff",
        "net_device",
        "sock",
        "net",
        "xfrm_state",
        "xfrm_policy",
    ] {
        let id = raw.ids("STRUCT", ty)[0];
        let members = &raw.types[&id].members;
        paths.extend(
            members
                .iter()
                .filter(|m| !m.0.is_empty())
                .map(|m| (ty, m.0.clone())),
        );
    }
    let mut checked = 0;
    for (ty, path) in &paths {
        let ids = raw.ids("STRUCT", ty);
        assert_eq!(ids.len(), 1, "struct {ty}: {ids:?}");
        let parts: Vec<&str> = path.split('.').collect();
        let got = btf.member_offset(ty, path);
        match raw.place(ids[0], &parts) {
            // Members this kernel lacks (dst_entry.xfrm without CONFIG_XFRM).
            None => assert!(
                matches!(got, Err(BtfError::NoMember { .. })),
                "{ty}.{path}: {got:?}"
            ),
            Some((bits, 0)) if bits % 8 == 0 => {
                assert_eq!(got.ok(), Some(bits / 8), "{ty}.{path}");
                checked += 1;
            }
            Some(_) => assert!(
                matches!(got, Err(BtfError::Bitfield { .. })),
                "{ty}.{path}: {got:?}"
            ),
        }
    }
    assert!(checked > 300, "{checked} offsets checked");
    assert!(matches!(
        btf.member_offset("sk_buff", "cloned"),
        Err(BtfError::Bitfield { .. })
    ));

    let reasons = raw.ids("ENUM", "skb_drop_reason");
    let expected: Vec<(String, u64)> = raw.types[&reasons[0]]
        .values
        .iter()
        .map(|(name, value)| (name.clone(), *value as u64))
        .collect();
    assert_eq!(btf.enum_values("skb_drop_reason"), Some(expected));
    // Signed enums and ENUM64s as the kernel has them (by name when no
    // other enum has it), and the anonymous LINUX_MIB_* one.
    let values = |ty: &RawType| -> Vec<(String, u64)> {
        ty.values
            .iter()
            .map(|(n, v)| (n.clone(), *v as i64 as u64))
            .collect()
    };
    let mut enums = 0;
    for (id, ty) in &raw.types {
        let signed = ty.kind == "ENUM" && ty.values.iter().any(|v| v.1 < 0);
        let ids = [raw.ids("ENUM", &ty.name), raw.ids("ENUM64", &ty.name)].concat();
        if (signed || ty.kind == "ENUM64") && !ty.name.is_empty() && ids == [*id] {
            assert_eq!(
                btf.enum_values(&ty.name),
                Some(values(ty)),
                "enum {}",
                ty.name
            );
            enums += 1;
        }
    }
    let mut mib_ids: Vec<&u32> = raw
        .types
        .iter()
        .filter(|(_, t)| {
            t.kind == "ENUM" && t.values.iter().any(|v| v.0 == "LINUX_MIB_XFRMINNOSTATES")
        })
        .map(|(id, _)| id)
        .collect();
    mib_ids.sort_unstable();
    assert_eq!(
        btf.enum_containing("LINUX_MIB_XFRMINNOSTATES"),
        Some(values(&raw.types[mib_ids[0]]))
    );

    let mut funcs = 0;
    for ty in raw.types.values().filter(|t| t.kind == "FUNC") {
        assert!(btf.has_function(&ty.name), "{}", ty.name);
        funcs += 1;
    }
    assert!(funcs > 1000);
    eprintln!("checked against bpftool: {checked} offsets, {enums} enums, {funcs} functions");
    let input = raw.ids("FUNC", "xfrm_input")[0];
    let proto = &raw.types[&raw.types[&input].type_id];
    let params: Vec<String> = proto.members.iter().map(|m| m.0.clone()).collect();
    assert_eq!(btf.function_params("xfrm_input"), Some(params));
}

/// Writes BTF the way pahole does, for shapes a kernel's BTF may lack.
struct Builder {
    types: Vec<u8>,
    strings: Vec<u8>,
    next_id: u32,
}

impl Builder {
    fn new() -> Self {
        Self {
            types: Vec::new(),
            strings: vec![0],
            next_id: 1,
        }
    }

    fn str(&mut self, s: &str) -> u32 {
        if s.is_empty() {
            return 0;
        }
        let offset = self.strings.len() as u32;
        self.strings.extend_from_slice(s.as_bytes());
        self.strings.push(0);
        offset
    }

    /// A type record: its header, then `words` (members as name, type,
    /// offset triples etc.; `vlen` says how many records they hold).
    fn add(
        &mut self,
        name: &str,
        kind: u32,
        kflag: bool,
        vlen: u32,
        size_or_type: u32,
        words: &[u32],
    ) -> u32 {
        let name = self.str(name);
        let info = u32::from(kflag) << 31 | kind << 24 | vlen;
        for word in [name, info, size_or_type].iter().chain(words) {
            self.types.extend_from_slice(&word.to_le_bytes());
        }
        self.next_id += 1;
        self.next_id - 1
    }

    /// `members`: (name, type, offset word as the struct's kflag says).
    fn record(
        &mut self,
        name: &str,
        kind: u32,
        kflag: bool,
        size: u32,
        members: &[(&str, u32, u32)],
    ) -> u32 {
        let mut words = Vec::new();
        for (member, ty, offset) in members {
            words.extend([self.str(member), *ty, *offset]);
        }
        self.add(name, kind, kflag, members.len() as u32, size, &words)
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let (types, strings) = (self.types.len() as u32, self.strings.len() as u32);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]);
        for word in [HEADER_LEN as u32, 0, types, types, strings] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(&self.types);
        out.extend_from_slice(&self.strings);
        out
    }
}

/// A kernel-like BTF: a struct with an anonymous union, bitfields with
/// and without the kind flag, a typedef'd const struct member, a FWD
/// of the same name first, signed enums and an ENUM64, a function.
fn kernel_like() -> Builder {
    let mut b = Builder::new();
    let int = b.add("int", INT, false, 0, 4, &[1 << 24 | 32]); // signed, 32 bits
    let uchar = b.add("unsigned char", INT, false, 0, 1, &[8]);
    let ptr = b.add("", PTR, false, 0, 0, &[]); // void *
    let _fwd = b.add("sk_buff", FWD, false, 0, 0, &[]);
    let id = b.record(
        "xfrm_id",
        STRUCT,
        false,
        8,
        &[("daddr", int, 0), ("spi", int, 32)],
    );
    let cid = b.add("", CONST, false, 0, id, &[]);
    let tid = b.add("xfrm_id_t", TYPEDEF, false, 0, cid, &[]);
    let inner = b.record("", STRUCT, false, 16, &[("next", ptr, 0), ("dev", ptr, 64)]);
    let anon = b.record("", UNION, false, 16, &[("", inner, 0), ("rb", ptr, 0)]);
    let bits = b.add("", INT, false, 0, 1, &[3]); // a 3-bit field, the old way
    let skb = b.record(
        "sk_buff",
        STRUCT,
        true,
        64,
        &[
            ("", anon, 0),
            ("len", int, 128),
            ("cloned", uchar, 1 << 24 | 160),
            ("nohdr", uchar, 1 << 24 | 161),
            ("whole", uchar, 8 << 24 | 168),
            ("mark", uchar, 176),
            ("id", tid, 192),
        ],
    );
    b.record(
        "old_style",
        STRUCT,
        false,
        8,
        &[
            ("a", uchar, 0),
            ("b", bits, 8),
            ("c", uchar, 12),
            ("d", int, 32),
        ],
    );
    b.record("anon_union", UNION, false, 4, &[("x", int, 0)]);
    let (minus_one, two) = (b.str("MINUS_ONE"), b.str("TWO"));
    b.add(
        "signed_e",
        ENUM,
        true,
        2,
        4,
        &[minus_one, -1i32 as u32, two, 2],
    );
    let mib = b.str("LINUX_MIB_X");
    b.add("", ENUM, false, 1, 4, &[mib, 0xffff_fffe]);
    let big = b.str("BIG");
    b.add("wide", ENUM64, false, 1, 8, &[big, 1, 2]);
    let param = b.str("skb");
    let proto = b.add("", FUNC_PROTO, false, 2, int, &[param, skb, 0, int]);
    b.add("recv", FUNC, false, 0, proto, &[]);
    b.add("xmit", FUNC, false, 0, proto, &[]);
    b
}

fn crafted() -> Vec<u8> {
    kernel_like().bytes()
}

/// `crafted` with garbled shapes: typedefs in a loop, a struct made of
/// itself three times over.
fn with_loops() -> Vec<u8> {
    let mut b = kernel_like();
    let loop_a = b.next_id;
    b.add("loop_a", TYPEDEF, false, 0, loop_a + 1, &[]);
    b.add("loop_b", TYPEDEF, false, 0, loop_a, &[]);
    b.record("cyclic", STRUCT, false, 4, &[("m", loop_a, 0)]);
    let me = b.next_id;
    b.record(
        "selfish",
        STRUCT,
        false,
        4,
        &[("", me, 0), ("", me, 0), ("", me, 0)],
    );
    b.bytes()
}

#[test]
fn crafted_shapes_resolve_like_the_kernel_lays_them_out() {
    let btf = KernelBtf::from_bytes(with_loops()).unwrap();
    let offset = |ty, path| btf.member_offset(ty, path);
    // Through the anonymous union and the anonymous struct inside it;
    // the FWD of the same name comes first and is passed over.
    assert_eq!(offset("sk_buff", "dev").unwrap(), 8);
    assert_eq!(offset("sk_buff", "next").unwrap(), 0);
    assert_eq!(offset("sk_buff", "rb").unwrap(), 0);
    assert_eq!(offset("sk_buff", "len").unwrap(), 16);
    assert_eq!(offset("sk_buff", "mark").unwrap(), 22);
    // A typedef of a const struct is followed into.
    assert_eq!(offset("sk_buff", "id").unwrap(), 24);
    assert_eq!(offset("sk_buff", "id.spi").unwrap(), 28);
    assert_eq!(offset("sk_buff", "").unwrap(), 0);
    // Kind flag set: a bitfield size, even a byte-aligned one (8 bits
    // at bit 168), makes a bitfield.
    for member in ["cloned", "nohdr", "whole"] {
        assert!(
            matches!(offset("sk_buff", member), Err(BtfError::Bitfield { .. })),
            "{member}"
        );
    }
    // Kind flag clear: off a byte boundary, or an INT narrower than its size.
    assert_eq!(offset("old_style", "a").unwrap(), 0);
    assert_eq!(offset("old_style", "d").unwrap(), 4);
    for member in ["b", "c"] {
        assert!(
            matches!(offset("old_style", member), Err(BtfError::Bitfield { .. })),
            "{member}"
        );
    }
    for (ty, path) in [
        ("sk_buff", "id.nope"),
        ("sk_buff", "len.x"),
        ("sk_buff", "cloned.x"),
        ("sk_buff", "id."),
        ("sk_buff", ".dev"),
        ("cyclic", "m.x"),
        ("selfish", "zz"),
    ] {
        assert!(
            matches!(offset(ty, path), Err(BtfError::NoMember { .. })),
            "{ty}.{path}"
        );
    }
    // Only a STRUCT: not a typedef's name, nor a union's, nor "".
    for ty in ["xfrm_id_t", "", "anon_union"] {
        assert!(matches!(offset(ty, "x"), Err(BtfError::NoType(_))), "{ty}");
    }
    assert_eq!(
        btf.member_offset("nope", "x").unwrap_err().to_string(),
        "BTF has no type struct nope"
    );

    assert_eq!(
        btf.enum_values("signed_e"),
        Some(vec![("MINUS_ONE".into(), u64::MAX), ("TWO".into(), 2)])
    );
    assert_eq!(
        btf.enum_values("wide"),
        Some(vec![("BIG".into(), 2 << 32 | 1)])
    );
    assert_eq!(
        btf.enum_containing("LINUX_MIB_X"),
        Some(vec![("LINUX_MIB_X".into(), 0xffff_fffe)])
    );
    // Only 32-bit enums are searched by member, as before.
    assert_eq!(btf.enum_containing("BIG"), None);
    assert_eq!(btf.enum_values(""), None);

    assert_eq!(
        btf.function_params("xmit"),
        Some(vec!["skb".into(), String::new()])
    );
    assert!(btf.has_function("xmit"));
    assert!(!btf.has_function("sk_buff"));
    assert!(!btf.has_function(""));
    assert_eq!(btf.function_params("sk_buff"), None);
}

#[test]
fn functions_are_found_by_hash_and_exactly() {
    let mut btf = KernelBtf::from_bytes(crafted()).unwrap();
    let id = |btf: &KernelBtf, name| {
        let ids = btf.functions.iter().map(|&(_, id)| id);
        ids.filter(|&id| btf.name_is(btf.ty(id).unwrap().name, name))
            .collect::<Vec<_>>()
    };
    let (recv, xmit) = (id(&btf, "recv"), id(&btf, "xmit"));
    assert_eq!((recv.len(), xmit.len()), (1, 1));
    assert!(btf.has_function("recv") && btf.has_function("xmit"));
    assert!(!btf.has_function("xmi") && !btf.has_function("xmitt"));
    // As if "recv" (first) hashed like "xmit": still found, exactly.
    let hash = name_hash(b"xmit");
    btf.functions = vec![(hash, recv[0]), (hash, xmit[0])];
    assert_eq!(
        btf.function_params("xmit"),
        Some(vec!["skb".into(), String::new()])
    );
    assert!(btf.has_function("xmit"));
}

#[test]
fn fuzz_seeds_hold_what_the_tracer_looks_up() {
    // tracer/fuzz/seeds/make_btf_seeds.py: the same shapes in Python.
    for seed in [
        &include_bytes!("../../fuzz/seeds/btf/kernel-like-kflag.btf")[..],
        &include_bytes!("../../fuzz/seeds/btf/kernel-like-old-bitfields.btf")[..],
    ] {
        let btf = KernelBtf::from_bytes(seed.to_vec()).unwrap();
        let offset = |ty, path| btf.member_offset(ty, path).unwrap();
        assert_eq!(offset("sk_buff", "dev"), 8);
        assert_eq!(offset("sk_buff", "mark"), 21);
        assert!(matches!(
            btf.member_offset("sk_buff", "cloned"),
            Err(BtfError::Bitfield { .. })
        ));
        assert_eq!(offset("sock", "__sk_common.skc_net"), 0);
        assert_eq!(offset("xfrm_state", "id.spi"), 4);
        assert_eq!(offset("xfrm_state", "props.family"), 8);
        assert_eq!(offset("flowi", "u.ip4.uli.ports.sport"), 2);
        let reasons = drop_reason_names(&btf);
        assert_eq!(reasons.get(&40).map(String::as_str), Some("XFRM_POLICY"));
        let mib = btf.enum_containing("LINUX_MIB_XFRMINNOSTATES").unwrap();
        assert_eq!(mib[1], ("LINUX_MIB_XFRMINNOSTATES".into(), 4));
        assert_eq!(btf.enum_values("signed").unwrap()[0].1, u64::MAX);
        assert_eq!(btf.enum_values("wide").unwrap()[0].1, 2 << 32 | 1);
        assert_eq!(
            btf.function_params("xfrm_input"),
            Some(vec!["skb".into(), String::new()])
        );
    }
}

#[test]
fn not_btf_or_unknown_kinds_are_one_plain_line() {
    let mut data = crafted();
    data[..2].copy_from_slice(&[0xeb, 0x9f]);
    assert_eq!(
        KernelBtf::from_bytes(data).err().as_deref(),
        Some("not BTF data (magic 0x9feb, expected 0xeb9f little-endian)")
    );
    let mut b = Builder::new();
    b.add("int", INT, false, 0, 4, &[32]);
    b.add("future", 20, false, 0, 0, &[]);
    assert_eq!(
        KernelBtf::from_bytes(b.bytes()).err().as_deref(),
        Some("type 2 has unknown kind 20")
    );
    assert_eq!(
        KernelBtf::from_bytes(vec![0x9f, 0xeb, 1]).err().as_deref(),
        Some("truncated header (3 bytes)")
    );
}

/// Runs every query, on names the file holds and on the tracer's own:
/// a garbled file must give answers or errors, never a panic or a hang.
fn exercise(btf: &KernelBtf, own_names: bool) {
    let mut names: Vec<String> = ["sk_buff", "old_style", "xmit", "signed_e", "wide"]
        .map(String::from)
        .into();
    if own_names {
        names.extend(
            (1..=btf.types.len() as u32)
                .filter_map(|id| Some(btf.name(btf.ty(id)?.name).to_string())),
        );
    }
    for name in &names {
        for path in ["dev", "id.spi", "b", "a.b.c", ""] {
            let _ = btf.member_offset(name, path);
        }
        let _ = btf.enum_values(name);
        let _ = btf.enum_containing(name);
        let _ = btf.function_params(name);
        let _ = btf.has_function(name);
    }
    let _ = drop_reason_names(btf);
}

/// The same BTF with its type section cut to `type_len` (a header field).
fn with_type_len(data: &[u8], type_len: u32) -> Vec<u8> {
    let mut data = data.to_vec();
    data[12..16].copy_from_slice(&type_len.to_le_bytes());
    data
}

/// Cuts the type section at `cuts`: parsed exactly when a cut falls
/// between two records (with the records before it), else an error.
fn check_type_cuts(data: &[u8], cuts: impl Iterator<Item = u32>) {
    let btf = KernelBtf::from_bytes(data.to_vec()).unwrap();
    // Where each record ends, as a length of the type section.
    let type_len = u32::from_le_bytes(data[12..16].try_into().unwrap());
    let ends: Vec<u32> = btf
        .types
        .iter()
        .skip(1)
        .map(|at| at - HEADER_LEN as u32)
        .chain([type_len])
        .collect();
    for cut in cuts {
        match KernelBtf::from_bytes(with_type_len(data, cut)) {
            Ok(short) => {
                let records = ends.iter().position(|&end| end == cut).map_or(0, |i| i + 1);
                assert!(
                    cut == 0 || records > 0,
                    "parsed with the type section cut at {cut}"
                );
                assert_eq!(short.types.len(), records, "cut at {cut}");
            }
            Err(message) => {
                assert!(!ends.contains(&cut) && cut != 0, "cut at {cut}: {message}");
                assert!(
                    message.contains("cut short") && !message.contains('\n'),
                    "{message}"
                );
            }
        }
    }
}

/// The real BTF's first 64 KiB of types, with the strings they name,
/// as a BTF file of its own (about 100 KiB: cheap to copy often).
fn real_excerpt() -> Option<Vec<u8>> {
    let real = std::fs::read(VMLINUX_BTF).ok()?;
    let btf = KernelBtf::from_bytes(real.clone()).unwrap();
    let strings = &real[btf.strings.clone()];
    let str_len = strings[..strings.len().min(64 << 10)]
        .iter()
        .rposition(|&b| b == 0)?
        + 1;
    let starts: Vec<usize> = btf.types.iter().map(|&at| at as usize).collect();
    let kept = starts
        .windows(2)
        .enumerate()
        .take_while(|&(i, w)| {
            w[1] - starts[0] <= 64 << 10 && (btf.ty(i as u32 + 1).unwrap().name as usize) < str_len
        })
        .count();
    let types = &real[starts[0]..starts[kept]];
    let mut out = real[..4].to_vec();
    for word in [HEADER_LEN, 0, types.len(), types.len(), str_len] {
        out.extend_from_slice(&(word as u32).to_le_bytes());
    }
    out.extend_from_slice(types);
    out.extend_from_slice(&strings[..str_len]);
    assert_eq!(
        KernelBtf::from_bytes(out.clone()).unwrap().types.len(),
        kept
    );
    Some(out)
}

#[test]
fn truncated_btf_is_an_error_at_every_length() {
    let crafted = crafted();
    for len in 1..crafted.len() {
        let message = KernelBtf::from_bytes(crafted[..len].to_vec())
            .err()
            .unwrap();
        assert!(!message.contains('\n'), "{message}");
    }
    let type_len = u32::from_le_bytes(crafted[12..16].try_into().unwrap());
    check_type_cuts(&crafted, 0..=type_len);

    let Ok(real) = std::fs::read(VMLINUX_BTF) else {
        return;
    };
    // Its header promises megabytes: every prefix is short of them.
    for len in (1..4096).chain((4096..=64 << 10).step_by(31)) {
        assert!(
            KernelBtf::from_bytes(real[..len].to_vec()).is_err(),
            "{len} bytes"
        );
    }
    let excerpt = real_excerpt().unwrap();
    for len in (1..excerpt.len()).step_by(13) {
        assert!(
            KernelBtf::from_bytes(excerpt[..len].to_vec()).is_err(),
            "{len} bytes"
        );
    }
    let type_len = u32::from_le_bytes(excerpt[12..16].try_into().unwrap());
    // Every cut in the first records, then every 97th byte.
    check_type_cuts(&excerpt, (0..2048).chain((2048..=type_len).step_by(97)));
}

#[test]
fn garbled_btf_gives_answers_or_errors_never_a_panic() {
    // Each byte of the crafted file set to a few values in turn.
    let crafted = crafted();
    exercise(&KernelBtf::from_bytes(crafted.clone()).unwrap(), true);
    for at in 0..crafted.len() {
        for value in [
            0x00,
            0x01,
            0x07,
            0x13,
            0x80,
            0xff,
            crafted[at] ^ 0x01,
            crafted[at] ^ 0x10,
        ] {
            let mut data = crafted.clone();
            data[at] = value;
            if let Ok(btf) = KernelBtf::from_bytes(data) {
                exercise(&btf, true);
            }
        }
    }
    // The real excerpt with a few bytes garbled at random places.
    let Some(excerpt) = real_excerpt() else {
        return;
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut random = |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as usize
    };
    for _ in 0..2000 {
        let mut data = excerpt.clone();
        for _ in 0..1 + random(4) {
            let at = random(data.len());
            data[at] = random(256) as u8;
        }
        if let Ok(btf) = KernelBtf::from_bytes(data) {
            exercise(&btf, false);
        }
    }
}

/// `cargo test --release -p tracer --lib time_running -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn time_running() {
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let btf = KernelBtf::running().unwrap();
        let read = started.elapsed();
        let dev = btf.member_offset("sk_buff", "dev").unwrap();
        let functions = btf.has_function("xfrm_input");
        eprintln!(
            "KernelBtf::running() in {read:?}, {:?} with a lookup (dev at {dev}, xfrm_input {functions})",
            started.elapsed()
        );
    }
}
