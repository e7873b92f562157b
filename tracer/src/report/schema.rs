//! The schema contract: the field paths of a fully populated report, as
//! the JSON has them, compared with `schema.txt`. A new field is added to
//! the snapshot; a field is never renamed or removed (scripts and
//! dashboards read them).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{Counter, Kernel, NetnsDelta, PlutoReport, Report};
use crate::{
    attribution::{AttributionErrors, Coverage, SampleReport, Source},
    drops::DropRow,
    ike::{IkeDrop, IkePath},
    masquerade::{Leak, MasqCoverage, MasqueradeReport},
    model::{CaptureCounts, Finding, FindingKind, HookList, NetnsInfo},
    mtu::{InterfaceType, SaSizes, SizeEvent},
    pluto::{
        log::{EventKind, LogEvent},
        session::Observed,
        status::{Connection, State, StateKind},
    },
    xfrm_state::EspGeometry,
};

/// The committed snapshot: one `path: type` a line.
const SNAPSHOT: &str = include_str!("schema.txt");

/// Every `path: type` of a JSON value: `.field` for an object's field,
/// `[]` for an array's items, `{}` for a map's values (integer keys).
pub fn field_paths(value: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk(value, String::new(), &mut out);
    out
}

fn walk(value: &Value, path: String, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(fields)
            if !fields.is_empty() && fields.keys().all(|k| k.parse::<u64>().is_ok()) =>
        {
            for v in fields.values() {
                walk(v, format!("{path}{{}}"), out);
            }
        }
        Value::Object(fields) => {
            out.insert(format!("{path}: object"));
            for (k, v) in fields {
                walk(v, format!("{path}.{k}"), out);
            }
        }
        Value::Array(items) => {
            out.insert(format!("{path}: array"));
            for v in items {
                walk(v, format!("{path}[]"), out);
            }
        }
        Value::String(_) => {
            out.insert(format!("{path}: string"));
        }
        Value::Number(_) => {
            out.insert(format!("{path}: number"));
        }
        Value::Bool(_) => {
            out.insert(format!("{path}: bool"));
        }
        Value::Null => {
            out.insert(format!("{path}: null"));
        }
    }
}

fn source() -> Source {
    Source {
        count: 5,
        function: "xfrm_input".into(),
        netns: 4026532001,
        netns_label: "west".into(),
        dir: "in".into(),
        family: "ipv4".into(),
        src: "192.0.2.2".into(),
        dst: "192.0.2.1".into(),
        proto: "esp".into(),
        sport: 0,
        dport: 0,
        spi: "0xcd0255de".into(),
        reqid: 16389,
        policy_index: 10,
        policy_dir: "in".into(),
        ifindex: 2,
        ifname: "wan0".into(),
        policy_selector: "192.168.0.0/16 -> 10.0.2.0/24".into(),
        connection: "lab".into(),
        pluto_state: 2,
    }
}

fn hooks() -> HookList {
    HookList {
        attached: vec!["xfrm_input (fentry)".into()],
        missing: vec![("xfrm_output".into(), "not in BTF".into())],
    }
}

fn counter() -> Counter {
    Counter {
        name: "XfrmInNoStates".into(),
        kernel_delta: 5,
        attributed: 5,
        gap: 0,
        coverage: super::ATTRIBUTED.into(),
        by_netns: vec![NetnsDelta {
            netns: 4026532001,
            label: "west".into(),
            delta: 5,
            attributed: 5,
            deleted: false,
        }],
        sources: vec![source()],
        samples: vec![SampleReport {
            time_ms: 12,
            time_ns: 0,
            captured: None,
            source: source(),
            seq: Some(7),
            stack: vec!["xfrm_input+0x1a".into()],
            own_frames_left_out: 1,
        }],
    }
}

fn esp_sizes() -> SaSizes {
    SaSizes {
        spi: "0x9e9e96db".into(),
        sa_dst: "192.0.2.2".into(),
        sa_netns: "west".into(),
        mode: "tunnel".into(),
        algorithms: "rfc4106(gcm(aes))".into(),
        geometry: Some(EspGeometry {
            header: 36,
            iv: 8,
            block: 4,
            icv: 16,
            transport_ip: 0,
        }),
        packets_out: 10,
        gso_packets_out: 1,
        max_inner_len: 1500,
        max_tcp_mss: 1460,
        events: vec![SizeEvent {
            kind: "frag_needed".into(),
            count: 3,
            netns: 4026532001,
            netns_label: "west".into(),
            ifname: "ipsec0".into(),
            mtu: 1400,
            mtu_is_inner: true,
            via_xfrm_interface: true,
            via_interface: Some(InterfaceType::Xfrm),
            max_len: 1500,
        }],
        max_inner_fitting: Some(1438),
    }
}

fn pluto() -> Observed {
    let event = |kind| LogEvent {
        time: "Nov 29 07:45:01.408411".into(),
        connection: Some("lab".into()),
        serial: Some(1),
        kind,
        text: "initiating IKEv2 connection".into(),
    };
    Observed {
        pid: 240,
        netns: 4026532001,
        netns_label: "west".into(),
        ctl_socket: "/run/pluto/pluto.ctl".into(),
        log: "/var/log/pluto.log".into(),
        connections: vec![Connection {
            name: "lab".into(),
            local_addr: Some("192.0.2.1".parse().unwrap()),
            remote_addr: Some("192.0.2.2".parse().unwrap()),
            local_id: Some("@west".into()),
            remote_id: Some("@east".into()),
            local_subnets: vec!["10.0.2.0/24".into()],
            remote_subnets: vec!["192.168.0.0/16".into()],
            routing: "erouted".into(),
            newest_ike: Some(1),
            newest_child: Some(2),
            ike_algorithms: Some("AES_GCM_16_256-HMAC_SHA2_256-DH19".into()),
            esp_algorithms: Some("AES_GCM_16_128-NONE".into()),
            mtu: Some(1400),
            policy: "IKEv2+PSK+ENCRYPT+TUNNEL".into(),
            ikev2: true,
        }],
        up_at_start: vec!["lab".into()],
        states: vec![State {
            serial: 2,
            connection: "lab".into(),
            kind: StateKind::Child,
            name: "STATE_V2_ESTABLISHED_CHILD_SA".into(),
            established: true,
            parent_ike: Some(1),
            esp_spis: vec![(0x9e9e96db, "192.0.2.2".parse().unwrap())],
            in_bytes: 84,
            out_bytes: 84,
        }],
        // One event of each shape: a name, and a name with its fields.
        events: vec![
            event(EventKind::Initiating),
            event(EventKind::ConnectionRefused {
                peer: "192.0.2.2".parse().unwrap(),
            }),
            event(EventKind::ChildEstablished {
                outbound_spi: Some(0x9e9e96db),
                inbound_spi: Some(0xcd0255de),
            }),
        ],
        problems: vec!["the log is unreadable".into()],
    }
}

fn leak() -> Leak {
    Leak {
        packets: 6,
        bytes: 600,
        sent: 6,
        dropped: 0,
        outcome_known: true,
        family: "ipv4".into(),
        origin: "forwarded".into(),
        pre_src: "10.0.2.10".into(),
        pre_dst: "192.168.1.10".into(),
        post_src: "192.0.2.1".into(),
        post_dst: "192.168.1.10".into(),
        proto: "udp".into(),
        spi: "0x9e9e96db".into(),
        reqid: 16389,
        sa_dst: "192.0.2.2".into(),
        policy_index: 10,
        policy_src: "10.0.2.0/24".into(),
        policy_dst: "192.168.0.0/16".into(),
        netns: 4026532001,
        netns_label: "west".into(),
        ifindex: 2,
        ifname: "wan0".into(),
        captured: Vec::new(),
    }
}

/// A report with every list non-empty and every optional field set.
pub fn populated() -> Report {
    Report {
        schema: super::SCHEMA.into(),
        kernel: Kernel {
            release: "6.12.0".into(),
            mode: "fentry".into(),
        },
        filter: vec!["netns=west".into()],
        duration_secs: 1.5,
        coverage: Coverage {
            strategy: Default::default(),
            complete: true,
            fentry_brackets: 12,
            kprobe_brackets: 0,
            attached: vec!["xfrm_input".into()],
            missing: vec![("xfrm_output".into(), "not in BTF".into())],
        },
        attribution_errors: AttributionErrors::default(),
        counters: vec![counter()],
        counters_unavailable: Some("/proc/net/xfrm_stat: not found".into()),
        drops: vec![DropRow {
            count: 4,
            reason: "XFRM_POLICY".into(),
            function: "__xfrm_policy_check".into(),
            netns: 4026532001,
            netns_label: "west".into(),
            ifindex: 2,
            ifname: "wan0".into(),
            protocol: "ipv4".into(),
            xfrm_related: true,
            captured: Vec::new(),
        }],
        drops_untracked: 0,
        capture: CaptureCounts::default(),
        netns: vec![NetnsInfo {
            inode: 4026532001,
            label: "west".into(),
            pids: vec![240],
            deleted: false,
            interfaces: BTreeMap::from([(2, "wan0".into())]),
        }],
        netns_teardown_hooks: hooks(),
        esp_sizes: vec![esp_sizes()],
        esp_sizes_hooks: hooks(),
        findings: vec![Finding {
            connection: "lab".into(),
            netns_label: "west".into(),
            spi: "0xcd0255de".into(),
            ..Finding::new(
                FindingKind::SaMissingInKernel,
                "summary".into(),
                "fix".into(),
                vec!["evidence".into()],
            )
        }],
        ike: vec![IkePath {
            netns: 4026532001,
            netns_label: "west".into(),
            local: "192.0.2.1".into(),
            peer: "192.0.2.2".into(),
            sent: 4,
            received: 0,
            port_unreachable: 0,
            dropped: vec![IkeDrop {
                count: 3,
                direction: "out".into(),
                function: "nf_hook_slow".into(),
                reason: "NETFILTER_DROP".into(),
                firewall: true,
            }],
            ports: vec![500],
        }],
        ike_hooks: hooks(),
        pluto: PlutoReport {
            instances: vec![pluto()],
            problems: vec!["no pluto".into()],
        },
        masquerade: MasqueradeReport {
            coverage: MasqCoverage {
                detected: vec!["ipv4".into()],
                explained: vec!["ipv4".into()],
                outcome: vec!["ipv4".into()],
                attached: vec!["__xfrm4_output (fentry)".into()],
                missing: vec![("ip6_finish_output".into(), "not in BTF".into())],
            },
            leaks: vec![leak()],
            table_full: 0,
            unseen: 0,
        },
    }
}

#[test]
fn the_schema_keeps_every_published_field() {
    let json = serde_json::to_value(populated()).unwrap();
    let now = field_paths(&json);
    let snapshot: BTreeSet<String> = SNAPSHOT.lines().map(str::to_string).collect();
    if std::env::var_os("XFRM_TRACE_UPDATE_SCHEMA").is_some() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/report/schema.txt");
        let text: String = now.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).unwrap();
        return;
    }
    let gone: Vec<&String> = snapshot.difference(&now).collect();
    let new: Vec<&String> = now.difference(&snapshot).collect();
    assert!(
        gone.is_empty(),
        "fields of the published xfrm-trace/1 schema were renamed, removed or changed type: {gone:#?}\n\
         (they may not be: scripts read them; add a new field instead{})",
        if new.is_empty() {
            String::new()
        } else {
            format!(", e.g. one of {new:#?}")
        }
    );
    assert!(
        new.is_empty(),
        "new fields in the report: {new:#?}\nadding a field is fine: fill it in report::schema::populated() and \
         update tracer/src/report/schema.txt (XFRM_TRACE_UPDATE_SCHEMA=1 cargo test --release -p tracer --lib schema)"
    );
}

#[test]
fn a_report_reads_back_as_it_was_written() {
    let json = serde_json::to_string(&populated()).unwrap();
    let read: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(serde_json::to_string(&read).unwrap(), json);
}
