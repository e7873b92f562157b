//! Checked against the BTF of the machine running the tests and on
//! crafted files.

use super::*;

// These run against the BTF of the machine running the tests.
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
