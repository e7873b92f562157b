#!/usr/bin/env python3
"""Writes the btf/ seeds: small BTF files laid out as
include/uapi/linux/btf.h says, with the shapes tracer/src/btf reads in the
kernel's (the names the btf target looks up; the unit tests build the same
shapes in tracer/src/btf/tests.rs). Run it from this folder; the output is
committed, so this only documents where it came from."""

import struct

INT, PTR, STRUCT, UNION, ENUM, FWD, TYPEDEF, CONST = 1, 2, 4, 5, 6, 7, 8, 10
FUNC, FUNC_PROTO, ENUM64 = 12, 13, 19


class Btf:
    def __init__(self):
        self.types = b""
        self.strings = b"\0"
        self.next_id = 1

    def str(self, s):
        if not s:
            return 0
        offset = len(self.strings)
        self.strings += s.encode() + b"\0"
        return offset

    def add(self, name, kind, vlen, size_or_type, words=(), kflag=False):
        info = int(kflag) << 31 | kind << 24 | vlen
        self.types += struct.pack("<3I", self.str(name), info, size_or_type)
        self.types += struct.pack(f"<{len(words)}I", *words)
        self.next_id += 1
        return self.next_id - 1

    def record(self, name, kind, size, members, kflag=False):
        words = []
        for member, ty, offset in members:
            words += [self.str(member), ty, offset]
        return self.add(name, kind, len(members), size, words, kflag)

    def enum(self, name, values, kflag=False):
        words = []
        for value_name, value in values:
            words += [self.str(value_name), value & 0xFFFFFFFF]
        return self.add(name, ENUM, len(values), 4, words, kflag)

    def bytes(self):
        header = struct.pack(
            "<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(self.types),
            len(self.types), len(self.strings),
        )
        return header + self.types + self.strings


def kernel_like(kflag):
    """sk_buff with `dev` in an anonymous union and bitfields (with or
    without the kind flag), a typedef'd const struct inside xfrm_state,
    nested unions in flowi, the enums and a function the tracer reads."""
    b = Btf()
    int_ = b.add("int", INT, 0, 4, [1 << 24 | 32])
    u8 = b.add("unsigned char", INT, 0, 1, [8])
    u16 = b.add("short unsigned int", INT, 0, 2, [16])
    bit1 = b.add("", INT, 0, 1, [1])  # a 1-bit field without the kind flag
    ptr = b.add("", PTR, 0, 0)
    b.add("sk_buff", FWD, 0, 0)
    inner = b.record("", STRUCT, 16, [("next", ptr, 0), ("dev", ptr, 64)])
    anon = b.record("", UNION, 16, [("", inner, 0), ("rb", ptr, 0)])
    cloned = ("cloned", u8, 1 << 24 | 160) if kflag else ("cloned", bit1, 160)
    skb = b.record(
        "sk_buff", STRUCT, 32,
        [("", anon, 0), ("len", int_, 128), cloned, ("mark", u8, 168)],
        kflag,
    )
    common = b.record("sock_common", STRUCT, 8, [("skc_net", ptr, 0)])
    b.record("sock", STRUCT, 8, [("__sk_common", common, 0)])
    xid = b.record("xfrm_id", STRUCT, 8, [("daddr", int_, 0), ("spi", int_, 32)])
    cid = b.add("", CONST, 0, xid)
    tid = b.add("xfrm_id_t", TYPEDEF, 0, cid)
    props = b.record("", STRUCT, 2, [("family", u16, 0)])
    b.record("xfrm_state", STRUCT, 16, [("id", tid, 0), ("props", props, 64)])
    ports = b.record("", STRUCT, 4, [("dport", u16, 0), ("sport", u16, 16)])
    uli = b.record("", UNION, 4, [("ports", ports, 0)])
    ip4 = b.record("flowi4", STRUCT, 4, [("uli", uli, 0)])
    u = b.record("", UNION, 4, [("ip4", ip4, 0)])
    b.record("flowi", STRUCT, 4, [("u", u, 0)])
    b.enum("skb_drop_reason", [("SKB_DROP_REASON_NOT_SPECIFIED", 2),
                               ("SKB_DROP_REASON_XFRM_POLICY", 40)])
    b.enum("", [("LINUX_MIB_NUM", 0), ("LINUX_MIB_XFRMINNOSTATES", 4)])
    b.enum("signed", [("MINUS_ONE", -1)], kflag=True)
    b.add("wide", ENUM64, 1, 8, [b.str("BIG"), 1, 2])
    proto = b.add("", FUNC_PROTO, 2, int_, [b.str("skb"), skb, 0, int_])
    b.add("xfrm_input", FUNC, 0, proto)
    return b.bytes()


for name, data in {
    "kernel-like-kflag.btf": kernel_like(True),
    "kernel-like-old-bitfields.btf": kernel_like(False),
}.items():
    with open(f"btf/{name}", "wb") as f:
        f.write(data)
