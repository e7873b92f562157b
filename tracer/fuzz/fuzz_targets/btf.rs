//! The kernel's BTF (`/sys/kernel/btf/vmlinux`): `KernelBtf::from_bytes`,
//! then every lookup the tracer makes at start (member offsets through
//! anonymous members and typedefs, enums, function prototypes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xfrm_trace::btf::{KernelBtf, drop_reason_names};

fuzz_target!(|bytes: &[u8]| {
    let Ok(btf) = KernelBtf::from_bytes(bytes.to_vec()) else {
        return;
    };
    for (ty, path) in [
        ("sk_buff", "dev"),
        ("sk_buff", "len"),
        ("sk_buff", "cloned"),
        ("sock", "__sk_common.skc_net"),
        ("xfrm_state", "id.spi"),
        ("xfrm_state", "props.family"),
        ("flowi", "u.ip4.uli.ports.sport"),
        ("sk_buff", ""),
    ] {
        let _ = btf.member_offset(ty, path);
    }
    let _ = drop_reason_names(&btf);
    let _ = btf.enum_values("wide");
    let _ = btf.enum_containing("LINUX_MIB_XFRMINNOSTATES");
    for function in ["xfrm_input", "xfrm_output", ""] {
        let _ = btf.has_function(function);
        let _ = btf.function_params(function);
    }
});
