//! Packet drops at `skb:kfree_skb`: counted in the kernel per (location,
//! netns, reason, interface, protocol), named here from kallsyms and BTF.

use std::collections::{BTreeMap, HashMap};

use aya::{
    Ebpf,
    maps::{Array, PerCpuArray, PerCpuHashMap},
    programs::TracePoint,
};
use serde::{Deserialize, Serialize};
use tracer_common::{
    capture::DropSampling,
    drops::{DropKey, DropSample},
    names::{maps, programs},
};

use crate::{kallsyms::Kallsyms, model::Names};

#[derive(Debug, thiserror::Error)]
pub enum DropsError {
    #[error("attaching to skb:kfree_skb: {0}")]
    Attach(String),
    #[error("reading the drop table: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Loads the kfree_skb program and attaches it. The link lives as long as
/// `ebpf`: dropping it detaches.
pub fn attach(ebpf: &mut Ebpf) -> Result<(), DropsError> {
    let program: &mut TracePoint = ebpf
        .program_mut(programs::kfree_skb)
        .ok_or_else(|| DropsError::Attach("program kfree_skb missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DropsError::Attach(e.to_string()))?;
    program
        .load()
        .map_err(|e| DropsError::Attach(format!("load: {e}")))?;
    program
        .attach("skb", "kfree_skb")
        .map_err(|e| DropsError::Attach(e.to_string()))?;
    Ok(())
}

/// The in-kernel table, summed over CPUs, and drops that did not fit it.
pub fn read(ebpf: &Ebpf) -> Result<(Vec<(DropKey, u64)>, u64), DropsError> {
    let table: PerCpuHashMap<_, DropKey, u64> = PerCpuHashMap::try_from(
        ebpf.map(maps::DROPS)
            .ok_or(aya::maps::MapError::InvalidName {
                name: maps::DROPS.into(),
            })?,
    )?;
    let mut rows = Vec::new();
    for entry in table.iter() {
        let (key, per_cpu) = entry?;
        rows.push((key, per_cpu.iter().sum()));
    }
    let untracked: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map(maps::DROPS_UNTRACKED)
            .ok_or(aya::maps::MapError::InvalidName {
                name: maps::DROPS_UNTRACKED.into(),
            })?,
    )?;
    let untracked = untracked.get(&0, 0)?.iter().sum();
    Ok((rows, untracked))
}

/// XFRM drops the rate limit or a full ring kept out of the pcapng.
pub fn samples_lost(ebpf: &Ebpf) -> Result<u64, DropsError> {
    let lost: PerCpuArray<_, u64> = PerCpuArray::try_from(
        ebpf.map(maps::DROP_SAMPLES_LOST)
            .ok_or(aya::maps::MapError::InvalidName {
                name: maps::DROP_SAMPLES_LOST.into(),
            })?,
    )?;
    Ok(lost.get(&0, 0)?.iter().sum())
}

/// Drops with the same netns, reason, function and interface, added up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRow {
    pub count: u64,
    pub reason: String,
    /// Kernel function that freed the packet (`module:function` for modules).
    pub function: String,
    pub netns: u32,
    /// `host`, the `ip netns` name, or `netns:<inode>`.
    pub netns_label: String,
    pub ifindex: u32,
    pub ifname: String,
    pub protocol: String,
    /// Dropped for an XFRM/IPsec reason or by an XFRM/ESP function.
    pub xfrm_related: bool,
    /// Sampled packets of this row (for the pcapng; tracepoint-only mode).
    #[serde(skip)]
    pub captured: Vec<crate::model::Captured>,
}

/// Names and groups raw rows; the most frequent first.
pub fn summarize(
    rows: &[(DropKey, u64)],
    kallsyms: &Kallsyms,
    reasons: &HashMap<u32, String>,
    names: &Names,
) -> Vec<DropRow> {
    let mut grouped: BTreeMap<(u32, String, String, u32, u16), u64> = BTreeMap::new();
    for (key, count) in rows {
        let function = function_at(kallsyms, key.location);
        let reason = reason_name(reasons, key.reason);
        *grouped
            .entry((key.netns, reason, function, key.ifindex, key.protocol))
            .or_default() += count;
    }
    let mut out: Vec<DropRow> = grouped
        .into_iter()
        .map(
            |((netns, reason, function, ifindex, protocol), count)| DropRow {
                xfrm_related: is_xfrm_related(&reason, &function),
                captured: Vec::new(),
                count,
                reason,
                function,
                netns,
                ifindex,
                protocol: protocol_name(protocol),
                netns_label: names.label(u64::from(netns)),
                ifname: names.ifname(u64::from(netns), ifindex),
            },
        )
        .collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.function.cmp(&b.function))
    });
    out
}

/// Samples drops of the XFRM reasons with their headers: for kernels where
/// no bracket attached (elsewhere the attribution samples carry them).
pub fn sample_xfrm_drops(
    ebpf: &mut Ebpf,
    reasons: &HashMap<u32, String>,
) -> Result<(), DropsError> {
    let mut sampling = DropSampling::default();
    for (value, _) in reasons.iter().filter(|(_, name)| name.starts_with("XFRM")) {
        if let Some(slot) = sampling.reasons.get_mut(sampling.count as usize) {
            *slot = *value;
            sampling.count += 1;
        }
    }
    let map = ebpf
        .map_mut(maps::DROP_SAMPLING)
        .ok_or(aya::maps::MapError::InvalidName {
            name: maps::DROP_SAMPLING.into(),
        })?;
    Array::try_from(map)?.set(0, &sampling, 0)?;
    Ok(())
}

/// Puts each sample's headers on the row it belongs to.
pub fn attach_samples(
    rows: &mut [DropRow],
    samples: &[DropSample],
    kallsyms: &Kallsyms,
    reasons: &HashMap<u32, String>,
) {
    for sample in samples {
        let key = &sample.key;
        let function = function_at(kallsyms, key.location);
        let reason = reason_name(reasons, key.reason);
        let protocol = protocol_name(key.protocol);
        let row = rows.iter_mut().find(|r| {
            r.netns == key.netns
                && r.ifindex == key.ifindex
                && r.function == function
                && r.reason == reason
                && r.protocol == protocol
        });
        if let (Some(row), Some(captured)) = (
            row,
            crate::model::Captured::from_headers(sample.time_ns, &sample.headers),
        ) {
            row.captured.push(captured);
        }
    }
}

/// The kernel function containing `location` (`module:function` for
/// modules), or the address when unknown.
pub fn function_at(kallsyms: &Kallsyms, location: u64) -> String {
    match kallsyms.symbolize(location) {
        Some((sym, _)) => match sym.module {
            Some(module) => format!("{module}:{}", sym.name),
            None => sym.name.to_string(),
        },
        None => format!("{location:#x}"),
    }
}

/// `enum skb_drop_reason` name; `-` on kernels without drop reasons.
pub fn reason_name(reasons: &HashMap<u32, String>, reason: u32) -> String {
    match reasons.get(&reason) {
        Some(name) => name.clone(),
        None if reasons.is_empty() => "-".into(),
        None => reason.to_string(),
    }
}

/// XFRM-related: an XFRM drop reason, or freed inside an IPsec function.
pub fn is_xfrm_related(reason: &str, function: &str) -> bool {
    let name = function.rsplit(':').next().unwrap_or(function);
    let name = name.trim_start_matches('_');
    reason.starts_with("XFRM")
        || ["xfrm", "esp", "ah4", "ah6", "ipcomp", "vti", "espintcp"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

fn protocol_name(ethertype: u16) -> String {
    match ethertype {
        0x0800 => "ipv4".into(),
        0x86dd => "ipv6".into(),
        0x0806 => "arp".into(),
        0 => "-".into(),
        other => format!("{other:#06x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfrm_relation_is_by_reason_or_function() {
        assert!(is_xfrm_related("XFRM_POLICY", "ip_forward"));
        assert!(is_xfrm_related("NOT_SPECIFIED", "xfrm_input"));
        assert!(is_xfrm_related("NOT_SPECIFIED", "__xfrm_policy_check"));
        assert!(is_xfrm_related("NOT_SPECIFIED", "esp4:esp_input_done2"));
        assert!(!is_xfrm_related("NO_SOCKET", "__udp4_lib_rcv"));
        assert!(!is_xfrm_related("NOT_SPECIFIED", "ip_rcv_finish"));
    }

    #[test]
    fn rows_group_by_function_and_name_reasons() {
        let syms = Kallsyms::parse("ffffffff81000000 T ip_forward\nffffffff81000400 T ip_rcv\n");
        let reasons = HashMap::from([(18, "XFRM_POLICY".to_string()), (2, "NOT_SPECIFIED".into())]);
        let key = |location, reason| DropKey {
            location,
            netns: 7,
            reason,
            ifindex: 3,
            protocol: 0x0800,
            _pad: 0,
        };
        let rows = [
            (key(0xffffffff81000010, 18), 2),
            (key(0xffffffff81000020, 18), 3),
            (key(0xffffffff81000410, 2), 1),
        ];
        let netns = [crate::model::NetnsInfo::with_interfaces(
            7,
            "router",
            &[(3, "r-east")],
        )];
        let out = summarize(&rows, &syms, &reasons, &Names::new(&netns));
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].netns_label.as_str(), out[0].ifname.as_str()),
            ("router", "r-east")
        );
        assert_eq!(
            (
                out[0].count,
                out[0].function.as_str(),
                out[0].reason.as_str()
            ),
            (5, "ip_forward", "XFRM_POLICY")
        );
        assert!(out[0].xfrm_related);
        assert_eq!(out[0].protocol, "ipv4");
        assert_eq!((out[1].count, out[1].function.as_str()), (1, "ip_rcv"));
        assert!(!out[1].xfrm_related);
    }
}
