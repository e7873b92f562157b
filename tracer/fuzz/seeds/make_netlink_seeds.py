#!/usr/bin/env python3
"""Writes the netlink/ seeds: NETLINK_XFRM messages laid out as
<linux/xfrm.h> says (the same offsets tracer/src/xfrm_state/netlink.rs
reads and its unit tests build), with fake key bytes. Run it from this
folder; the output is committed, so this only documents where it came from."""

import socket
import struct

AF_INET, AF_INET6 = 2, 10
NLMSG_ERROR, NLMSG_DONE, XFRM_MSG_NEWSA, XFRM_MSG_NEWPOLICY = 2, 3, 16, 19
XFRMA_ALG_AUTH, XFRMA_ALG_CRYPT, XFRMA_ENCAP, XFRMA_TMPL = 1, 2, 4, 5
XFRMA_ALG_AEAD, XFRMA_ALG_AUTH_TRUNC, XFRMA_MARK, XFRMA_IF_ID = 18, 20, 21, 31


def addr(text):
    family = AF_INET6 if ":" in text else AF_INET
    return socket.inet_pton(family, text).ljust(16, b"\0")


def pad4(b):
    return b + b"\0" * (-len(b) % 4)


def attr(kind, value):
    return pad4(struct.pack("=HH", 4 + len(value), kind) + value)


def alg(name, key_bits, icv_bits=None):
    fixed = name.encode().ljust(64, b"\0") + struct.pack("=I", key_bits)
    if icv_bits is not None:
        fixed += struct.pack("=I", icv_bits)
    return fixed + b"\xa5" * (key_bits // 8)  # the key, never read


def selector(src, dst, family, plen_s, plen_d, proto=0, dport=0, sport=0):
    return (
        addr(dst)
        + addr(src)
        + struct.pack(">HHHH", dport, 0, sport, 0)
    ) + struct.pack("=HBBBxxxiI", family, plen_d, plen_s, proto, 0, 0)


def usersa(src, dst, spi, reqid, family, sel, mode=1):
    m = bytearray(224)
    m[0:56] = sel
    m[56:72] = addr(dst)
    m[72:76] = struct.pack(">I", spi)
    m[76] = 50
    m[80:96] = addr(src)
    m[96:160] = struct.pack("=8Q", *([2**64 - 1] * 6), 0, 0)
    m[160:176] = struct.pack("=QQ", 123456, 789)
    m[196:204] = struct.pack("=II", 2, 1)
    m[208:212] = struct.pack("=I", reqid)
    m[212:214] = struct.pack("=H", family)
    m[214] = mode
    m[215] = 32
    return bytes(m)


def userpolicy(sel, index, direction, priority=375423):
    m = bytearray(168)
    m[0:56] = sel
    m[152:160] = struct.pack("=II", priority, index)
    m[160] = direction
    return bytes(m)


def tmpl(src, dst, family, reqid, spi=0, mode=1, optional=0):
    t = bytearray(64)
    t[0:16] = addr(dst)
    t[16:20] = struct.pack(">I", spi)
    t[20] = 50
    t[24:26] = struct.pack("=H", family)
    t[28:44] = addr(src)
    t[44:48] = struct.pack("=I", reqid)
    t[48] = mode
    t[50] = optional
    t[52:64] = struct.pack("=III", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    return bytes(t)


def nlmsg(kind, payload, flags=2):
    return pad4(struct.pack("=IHHII", 16 + len(payload), kind, flags, 1, 0) + payload)


sel4 = selector("10.0.2.0", "192.168.0.0", AF_INET, 24, 16)
sel6 = selector("2001:db8:1::", "2001:db8:2::", AF_INET6, 64, 64, proto=6, dport=443)
sa_aead = usersa("192.0.2.1", "203.0.113.1", 0x1001, 7, AF_INET, sel4) + attr(
    XFRMA_ALG_AEAD, alg("rfc4106(gcm(aes))", 160, 128)
)
sa_cbc6 = (
    usersa("2001:db8::1", "2001:db8::9", 0x9E9E96DB, 16389, AF_INET6, sel6)
    + attr(XFRMA_ALG_AUTH, alg("hmac(sha256)", 256))
    + attr(XFRMA_ALG_AUTH_TRUNC, alg("hmac(sha256)", 256, 128))
    + attr(XFRMA_ALG_CRYPT, alg("cbc(aes)", 128))
    + attr(XFRMA_ENCAP, struct.pack("=H", 2) + struct.pack(">HH", 4500, 4500) + bytes(18))
    + attr(XFRMA_MARK, struct.pack("=II", 1, 0xFFFFFFFF))
    + attr(XFRMA_IF_ID, struct.pack("=I", 9))
)
pol_out = (
    userpolicy(sel4, 0x3E9, 1)
    + attr(XFRMA_TMPL, tmpl("192.0.2.1", "192.0.2.2", AF_INET, 16389))
    + attr(XFRMA_MARK, struct.pack("=II", 1, 0xFFFFFFFF))
    + attr(XFRMA_IF_ID, struct.pack("=I", 9))
)
pol_fwd6 = userpolicy(sel6, 0x3F2, 2) + attr(
    XFRMA_TMPL,
    tmpl("2001:db8::9", "2001:db8::1", AF_INET6, 1, mode=0)
    + tmpl("2001:db8::9", "2001:db8::1", AF_INET6, 2, spi=0x1002, optional=1),
)
seeds = {
    "sa-aead-v4.bin": sa_aead,
    "sa-cbc-v6-natt.bin": sa_cbc6,
    "policy-out-v4.bin": pol_out,
    "policy-fwd-v6.bin": pol_fwd6,
    "dump-sas-done.bin": nlmsg(XFRM_MSG_NEWSA, sa_aead)
    + nlmsg(XFRM_MSG_NEWSA, sa_cbc6)
    + nlmsg(NLMSG_DONE, struct.pack("=i", 0)),
    "dump-policy-error.bin": nlmsg(XFRM_MSG_NEWPOLICY, pol_out)
    + nlmsg(NLMSG_ERROR, struct.pack("=i", -1) + nlmsg(0x15, b"", 0x301)[:16], 0),
    # Once a panic: the errno of i32::MIN was negated with overflow.
    "nlmsg-error-min.bin": nlmsg(NLMSG_ERROR, struct.pack("=i", -(2**31)), 0),
}
for name, data in seeds.items():
    with open(f"netlink/{name}", "wb") as f:
        f.write(data)
