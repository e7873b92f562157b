//! The XFRM counters: their `/proc/net/xfrm_stat` names and their index in
//! the kernel's per-CPU array, which comes from the running kernel's BTF
//! (the set grows with the version: 28 in 6.1, 32 in 6.18).

use std::collections::BTreeMap;

use crate::btf::KernelBtf;

/// `LINUX_MIB_*` enumerator -> `/proc/net/xfrm_stat` name (from
/// net/xfrm/xfrm_proc.c; not derivable by case alone).
const PROC_NAMES: &[(&str, &str)] = &[
    ("LINUX_MIB_XFRMINERROR", "XfrmInError"),
    ("LINUX_MIB_XFRMINBUFFERERROR", "XfrmInBufferError"),
    ("LINUX_MIB_XFRMINHDRERROR", "XfrmInHdrError"),
    ("LINUX_MIB_XFRMINNOSTATES", "XfrmInNoStates"),
    ("LINUX_MIB_XFRMINSTATEPROTOERROR", "XfrmInStateProtoError"),
    ("LINUX_MIB_XFRMINSTATEMODEERROR", "XfrmInStateModeError"),
    ("LINUX_MIB_XFRMINSTATESEQERROR", "XfrmInStateSeqError"),
    ("LINUX_MIB_XFRMINSTATEEXPIRED", "XfrmInStateExpired"),
    ("LINUX_MIB_XFRMINSTATEMISMATCH", "XfrmInStateMismatch"),
    ("LINUX_MIB_XFRMINSTATEINVALID", "XfrmInStateInvalid"),
    ("LINUX_MIB_XFRMINTMPLMISMATCH", "XfrmInTmplMismatch"),
    ("LINUX_MIB_XFRMINNOPOLS", "XfrmInNoPols"),
    ("LINUX_MIB_XFRMINPOLBLOCK", "XfrmInPolBlock"),
    ("LINUX_MIB_XFRMINPOLERROR", "XfrmInPolError"),
    ("LINUX_MIB_XFRMOUTERROR", "XfrmOutError"),
    ("LINUX_MIB_XFRMOUTBUNDLEGENERROR", "XfrmOutBundleGenError"),
    (
        "LINUX_MIB_XFRMOUTBUNDLECHECKERROR",
        "XfrmOutBundleCheckError",
    ),
    ("LINUX_MIB_XFRMOUTNOSTATES", "XfrmOutNoStates"),
    ("LINUX_MIB_XFRMOUTSTATEPROTOERROR", "XfrmOutStateProtoError"),
    ("LINUX_MIB_XFRMOUTSTATEMODEERROR", "XfrmOutStateModeError"),
    ("LINUX_MIB_XFRMOUTSTATESEQERROR", "XfrmOutStateSeqError"),
    ("LINUX_MIB_XFRMOUTSTATEEXPIRED", "XfrmOutStateExpired"),
    ("LINUX_MIB_XFRMOUTPOLBLOCK", "XfrmOutPolBlock"),
    ("LINUX_MIB_XFRMOUTPOLDEAD", "XfrmOutPolDead"),
    ("LINUX_MIB_XFRMOUTPOLERROR", "XfrmOutPolError"),
    ("LINUX_MIB_XFRMFWDHDRERROR", "XfrmFwdHdrError"),
    ("LINUX_MIB_XFRMOUTSTATEINVALID", "XfrmOutStateInvalid"),
    ("LINUX_MIB_XFRMACQUIREERROR", "XfrmAcquireError"),
    ("LINUX_MIB_XFRMOUTSTATEDIRERROR", "XfrmOutStateDirError"),
    ("LINUX_MIB_XFRMINSTATEDIRERROR", "XfrmInStateDirError"),
    ("LINUX_MIB_XFRMINIPTFSERROR", "XfrmInIptfsError"),
    ("LINUX_MIB_XFRMOUTNOQSPACE", "XfrmOutNoQueueSpace"),
];

/// The running kernel's XFRM counters.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// `/proc` name by array index.
    pub names: BTreeMap<u32, String>,
    /// Length of the per-CPU array (`__LINUX_MIB_XFRMMAX`).
    pub array_len: u32,
}

impl Counters {
    pub fn from_btf(btf: &KernelBtf) -> Option<Self> {
        let values = btf.enum_containing("LINUX_MIB_XFRMINNOSTATES")?;
        Some(Self::from_enum(&values))
    }

    pub fn from_enum(values: &[(String, u64)]) -> Self {
        let mut counters = Self::default();
        for (name, value) in values {
            let Ok(value) = u32::try_from(*value) else {
                continue;
            };
            if name == "__LINUX_MIB_XFRMMAX" {
                counters.array_len = value;
            } else if let Some(&(_, proc_name)) = PROC_NAMES.iter().find(|(e, _)| e == name) {
                counters.names.insert(value, proc_name.to_string());
            } else if name.starts_with("LINUX_MIB_XFRM") && name != "LINUX_MIB_XFRMNUM" {
                counters.names.insert(value, name.clone());
            }
        }
        counters
    }

    pub fn name(&self, index: u32) -> String {
        self.names
            .get(&index)
            .cloned()
            .unwrap_or_else(|| format!("xfrm-counter-{index}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_enum_values_to_proc_names() {
        let values = [
            ("LINUX_MIB_XFRMNUM".to_string(), 0),
            ("LINUX_MIB_XFRMINNOSTATES".to_string(), 4),
            ("LINUX_MIB_XFRMOUTNOQSPACE".to_string(), 32),
            ("LINUX_MIB_XFRMFUTURE".to_string(), 33),
            ("__LINUX_MIB_XFRMMAX".to_string(), 34),
        ];
        let counters = Counters::from_enum(&values);
        assert_eq!(counters.array_len, 34);
        assert_eq!(counters.name(4), "XfrmInNoStates");
        assert_eq!(counters.name(32), "XfrmOutNoQueueSpace");
        assert_eq!(counters.name(33), "LINUX_MIB_XFRMFUTURE");
        assert!(!counters.names.contains_key(&0));
    }

    #[test]
    fn running_kernel_counters_match_xfrm_stat() {
        let (Ok(btf), Ok(text)) = (
            KernelBtf::running(),
            std::fs::read_to_string("/proc/net/xfrm_stat"),
        ) else {
            return;
        };
        let counters = Counters::from_btf(&btf).unwrap();
        let stat = crate::xfrm_stat::XfrmStat::parse(&text).unwrap();
        for name in stat.0.keys() {
            assert!(
                counters.names.values().any(|n| n == name),
                "{name} has no BTF counter"
            );
        }
        assert_eq!(counters.names.len(), stat.0.len());
    }
}
