//! The planner on recorded kernels: prototypes as their BTF gives them,
//! kallsyms presence as /proc/kallsyms shows it, and what the doctor's
//! probes found.

use super::{
    plan::{FunctionFacts, Step},
    *,
};
use crate::{attribution, ike, kallsyms::Presence, masquerade, mtu, netns::exits};

const ALL: [&[HookSpec]; 6] = [
    ike::HOOKS,
    attribution::HOOKS,
    attribution::claims::HOOKS,
    mtu::HOOKS,
    masquerade::HOOKS,
    exits::HOOKS,
];

/// Prototypes every supported kernel shares.
const COMMON: &[(&str, &[&str])] = &[
    ("xfrm_input", &["skb", "nexthdr", "spi", "encap_type"]),
    ("__xfrm_policy_check", &["sk", "dir", "skb", "family"]),
    ("__xfrm_route_forward", &["skb", "family"]),
    (
        "xfrm_lookup_with_ifid",
        &["net", "dst_orig", "fl", "sk", "flags", "if_id"],
    ),
    ("xfrm_output", &["sk", "skb"]),
    (
        "xfrm_state_lookup",
        &["net", "mark", "daddr", "spi", "proto", "family"],
    ),
    (
        "xfrm_policy_lookup_bytype",
        &["net", "type", "fl", "family", "dir", "if_id"],
    ),
    ("xfrm4_output", &["net", "sk", "skb"]),
    ("__xfrm4_output", &["net", "sk", "skb"]),
    ("xfrm6_output", &["net", "sk", "skb"]),
    ("__xfrm6_output", &["net", "sk", "skb"]),
    ("ip_do_fragment", &["net", "sk", "skb", "output"]),
    ("ip6_fragment", &["net", "sk", "skb", "output"]),
    ("__icmp_send", &["skb_in", "type", "code", "info", "opt"]),
    (
        "icmp6_send",
        &["skb", "type", "code", "info", "force_saddr", "parm"],
    ),
    ("xfrm_local_error", &["skb", "mtu"]),
    ("__skb_gso_segment", &["skb", "features", "tx_path"]),
    ("xfrm_net_exit", &["net"]),
    ("ip_send_skb", &["net", "skb"]),
    ("ip6_send_skb", &["skb"]),
    ("__udp_enqueue_schedule_skb", &["sk", "skb"]),
    ("icmp_rcv", &["skb"]),
    ("icmpv6_rcv", &["skb"]),
];

const VMLINUX: Presence = Presence::Exact { module: None };

fn kernel(extra: &[(&str, &[&str])], works: (Works, Works)) -> KernelFacts {
    let functions = COMMON
        .iter()
        .chain(extra)
        .map(|(name, params)| {
            let facts = FunctionFacts {
                params: Some(params.iter().map(|p| p.to_string()).collect()),
                kallsyms: VMLINUX,
            };
            (name.to_string(), facts)
        })
        .collect();
    KernelFacts {
        functions,
        fentry: works.0,
        kprobe: works.1,
        tracepoint: Works::Yes,
    }
}

/// Debian 11's 5.10: xfrm_output_resume(skb, err), no
/// xfrm_input_state_lookup.
fn kernel_5_10(works: (Works, Works)) -> KernelFacts {
    kernel(&[("xfrm_output_resume", &["skb", "err"])], works)
}

/// Debian 13's 6.12.
fn kernel_6_12(works: (Works, Works)) -> KernelFacts {
    kernel(
        &[
            ("xfrm_output_resume", &["sk", "skb", "err"]),
            (
                "xfrm_input_state_lookup",
                &["net", "mark", "daddr", "spi", "proto", "family"],
            ),
        ],
        works,
    )
}

const BOTH: (Works, Works) = (Works::Yes, Works::Yes);

/// What a run would attach, as the doctor shows it.
fn expected(
    facts: &KernelFacts,
    choice: HookChoice,
    specs: &'static [HookSpec],
) -> Vec<HookOutcome> {
    plan(facts, choice, specs)
        .iter()
        .map(HookOutcome::expected)
        .collect()
}

fn listed(
    facts: &KernelFacts,
    choice: HookChoice,
    specs: &'static [HookSpec],
) -> crate::model::HookList {
    hook_list(&expected(facts, choice, specs), "all")
}

fn mode(facts: &KernelFacts, choice: HookChoice) -> String {
    attribution::Coverage::of(&expected(facts, choice, attribution::HOOKS))
        .mode()
        .to_string()
}

#[test]
fn kernel_5_10_takes_the_old_output_resume_and_has_no_input_state_lookup() {
    let facts = kernel_5_10(BOTH);
    let planned = plan(&facts, HookChoice::Auto, attribution::HOOKS);
    let resume = planned
        .iter()
        .find(|p| p.spec.function == "xfrm_output_resume")
        .unwrap();
    assert_eq!(resume.programs.fentry, Some("output_resume_old_entry"));
    assert_eq!(resume.first_try(), Some(Method::Fentry));
    assert_eq!(
        listed(&facts, HookChoice::Auto, attribution::HOOKS).attached,
        [
            "xfrm_input (fentry)",
            "__xfrm_policy_check (fentry)",
            "__xfrm_route_forward (fentry)",
            "xfrm_lookup_with_ifid (fentry)",
            "xfrm_output (fentry)",
            "xfrm_output_resume (fentry)",
            "xfrm_state_lookup (fexit)",
            "xfrm_policy_lookup_bytype (fexit)",
        ]
    );
    assert_eq!(mode(&facts, HookChoice::Auto), "fentry");

    let facts = kernel_6_12(BOTH);
    let planned = plan(&facts, HookChoice::Auto, attribution::HOOKS);
    assert_eq!(planned.len(), 9);
    assert_eq!(planned[5].programs.fentry, Some("output_resume_entry"));
    assert_eq!(planned[7].spec.function, "xfrm_input_state_lookup");
}

#[test]
fn fentry_refused_hooks_everything_with_kprobes() {
    // A host whose fentry gives EPERM, kprobes built in.
    let facts = kernel_6_12((Works::No, Works::Yes));
    assert_eq!(mode(&facts, HookChoice::Auto), "kprobe");
    let nat = listed(&facts, HookChoice::Auto, masquerade::HOOKS);
    assert_eq!(
        nat.attached,
        ["__xfrm4_output (kprobe)", "__xfrm6_output (kprobe)"]
    );
    assert!(nat.missing.is_empty(), "{nat:?}");
    assert_eq!(
        listed(&facts, HookChoice::Auto, attribution::HOOKS).attached[6],
        "xfrm_state_lookup (kretprobe)"
    );
}

#[test]
fn neither_fentry_nor_kprobes_leaves_the_tracepoints() {
    let facts = kernel_6_12((Works::No, Works::No));
    assert_eq!(mode(&facts, HookChoice::Auto), "tracepoint-only");
    let mtu = listed(&facts, HookChoice::Auto, mtu::HOOKS);
    assert!(mtu.attached.is_empty());
    assert_eq!(
        mtu.missing[0],
        (
            "ip_do_fragment".to_string(),
            "fentry: does not work here; kprobe: does not work here".to_string()
        )
    );
    let ike = listed(&facts, HookChoice::Auto, ike::HOOKS);
    assert_eq!(ike.attached, ["net:net_dev_queue", "net:netif_receive_skb"]);
    // The tracepoints do the socket hooks' work: nothing is missing.
    assert_eq!(ike.missing, []);
    // One okfn per family, each planned (and each missing).
    assert_eq!(plan(&facts, HookChoice::Auto, masquerade::HOOKS).len(), 2);
}

#[test]
fn a_function_in_a_module_gets_a_kprobe() {
    // IPv6 built as a module: its functions are in kallsyms under [ipv6],
    // not in vmlinux BTF.
    let mut facts = kernel_6_12(BOTH);
    for function in ["ip6_fragment", "icmp6_send"] {
        facts.functions.insert(
            function.to_string(),
            FunctionFacts {
                params: None,
                kallsyms: Presence::Exact {
                    module: Some("ipv6".into()),
                },
            },
        );
    }
    let planned = plan(&facts, HookChoice::Auto, mtu::HOOKS);
    assert_eq!(
        planned[1].steps,
        [
            (
                Method::Fentry,
                Step::RuledOut(AttachFailure::InModule("ipv6".into()))
            ),
            (Method::Kprobe, Step::Try)
        ]
    );
    let list = listed(&facts, HookChoice::Auto, mtu::HOOKS);
    assert_eq!(list.attached[1], "ip6_fragment (kprobe)");
    let forced = listed(&facts, HookChoice::Fentry, mtu::HOOKS);
    assert_eq!(
        forced.missing,
        [
            (
                "ip6_fragment".to_string(),
                "fentry: in module ipv6: fentry reaches vmlinux functions only".to_string()
            ),
            (
                "icmp6_send".to_string(),
                "fentry: in module ipv6: fentry reaches vmlinux functions only".to_string()
            )
        ]
    );
}

#[test]
fn compiler_clones_and_absent_functions_are_named() {
    let mut facts = kernel_6_12(BOTH);
    facts.functions.insert(
        "ip_do_fragment".into(),
        FunctionFacts {
            params: None,
            kallsyms: Presence::CloneOnly("ip_do_fragment.constprop.0".into()),
        },
    );
    facts.functions.remove("__xfrm_route_forward");
    let mtu = listed(&facts, HookChoice::Auto, mtu::HOOKS);
    assert_eq!(
        mtu.missing,
        [(
            "ip_do_fragment".to_string(),
            "only the compiler clone ip_do_fragment.constprop.0 exists".to_string()
        )]
    );
    let brackets = listed(&facts, HookChoice::Auto, attribution::HOOKS);
    assert_eq!(
        brackets.missing,
        [(
            "__xfrm_route_forward".to_string(),
            "not in /proc/kallsyms (inlined or not built)".to_string()
        )]
    );
    assert_eq!(mode(&facts, HookChoice::Auto), "fentry (partial)");
}

#[test]
fn a_bracket_without_btf_mixes_the_methods() {
    let mut facts = kernel_5_10(BOTH);
    facts
        .functions
        .get_mut("__xfrm_route_forward")
        .unwrap()
        .params = None;
    let brackets = listed(&facts, HookChoice::Auto, attribution::HOOKS);
    assert_eq!(brackets.attached[2], "__xfrm_route_forward (kprobe)");
    assert_eq!(mode(&facts, HookChoice::Auto), "fentry+kprobe");
}

#[test]
fn hooks_choice_restricts_the_methods() {
    let facts = kernel_6_12(BOTH);
    for specs in ALL {
        for planned in plan(&facts, HookChoice::Kprobe, specs) {
            assert!(
                planned
                    .steps
                    .iter()
                    .all(|(method, _)| *method != Method::Fentry),
                "{}",
                planned.spec.function
            );
        }
    }
    assert_eq!(mode(&facts, HookChoice::Kprobe), "kprobe");
    assert_eq!(mode(&facts, HookChoice::Fentry), "fentry");
    let forced_kprobe = listed(&facts, HookChoice::Kprobe, masquerade::HOOKS);
    assert!(forced_kprobe.missing.is_empty(), "{forced_kprobe:?}");
    let fentry_only = plan(&facts, HookChoice::Fentry, mtu::HOOKS);
    assert!(
        fentry_only
            .iter()
            .all(|p| p.steps == [(Method::Fentry, Step::Try)])
    );

    let tracepoint =
        |specs, whole| hook_list(&expected(&facts, HookChoice::Tracepoint, specs), whole);
    let asked = |what: &str| crate::model::HookList {
        attached: Vec::new(),
        missing: vec![(what.to_string(), "--hooks tracepoint".to_string())],
    };
    for (specs, whole) in [
        (attribution::HOOKS, "all brackets"),
        (mtu::HOOKS, "oversize ESP hooks"),
        (masquerade::HOOKS, "MASQUERADE detection"),
        (exits::HOOKS, "xfrm_net_exit"),
    ] {
        let list = tracepoint(specs, whole);
        assert_eq!(
            (list.attached, list.missing),
            (asked(whole).attached, asked(whole).missing)
        );
    }
    assert_eq!(
        tracepoint(ike::HOOKS, "IKE watch").attached,
        ["net:net_dev_queue", "net:netif_receive_skb"]
    );
    assert_eq!(mode(&facts, HookChoice::Tracepoint), "tracepoint-only");
}

#[test]
fn prototypes_pick_the_programs_or_say_why_not() {
    let mut facts = kernel_6_12(BOTH);
    let set = |facts: &mut KernelFacts, function: &str, params: &[&str]| {
        facts.functions.get_mut(function).unwrap().params =
            Some(params.iter().map(|p| p.to_string()).collect());
    };
    set(&mut facts, "xfrm_output_resume", &["net", "sk", "err"]);
    set(
        &mut facts,
        "xfrm_state_lookup",
        &["net", "mark", "daddr", "spi", "proto", "family", "extra"],
    );
    set(&mut facts, "__xfrm4_output", &["skb"]);
    let brackets = listed(&facts, HookChoice::Auto, attribution::HOOKS);
    assert_eq!(
        brackets.missing,
        [(
            "xfrm_output_resume".to_string(),
            "unexpected prototype xfrm_output_resume(net, sk, err)".to_string()
        )]
    );
    // fexit reads the return value at a fixed slot; a kretprobe does not care.
    assert!(
        brackets
            .attached
            .contains(&"xfrm_state_lookup (kretprobe)".to_string())
    );
    let nat = listed(&facts, HookChoice::Auto, masquerade::HOOKS);
    assert_eq!(
        nat.missing,
        [(
            "__xfrm4_output".to_string(),
            "unexpected prototype __xfrm4_output(skb)".to_string()
        )]
    );
    // Without BTF the masquerade programs trust the (net, sk, skb) layout.
    facts.functions.get_mut("__xfrm6_output").unwrap().params = None;
    let planned = plan(&facts, HookChoice::Auto, masquerade::HOOKS);
    let okfn6 = planned
        .iter()
        .find(|p| p.spec.function == "__xfrm6_output")
        .unwrap();
    assert_eq!(
        okfn6.steps,
        [
            (Method::Fentry, Step::RuledOut(AttachFailure::NotInBtf)),
            (Method::Kprobe, Step::Try)
        ]
    );
}

#[test]
fn mode_names_are_the_reports() {
    let name = |fentry, kprobe, complete| Mode::of_brackets(fentry, kprobe, complete).to_string();
    assert_eq!(name(6, 0, true), "fentry");
    assert_eq!(name(0, 6, true), "kprobe");
    assert_eq!(name(5, 1, true), "fentry+kprobe");
    assert_eq!(name(5, 0, false), "fentry (partial)");
    assert_eq!(name(3, 2, false), "fentry+kprobe (partial)");
    assert_eq!(name(0, 0, false), "tracepoint-only");
    assert_eq!(Mode::COUNTERS_ONLY.to_string(), "counters-only");
    assert_eq!(
        serde_json::to_string(&Mode::of_brackets(1, 1, true)).unwrap(),
        "\"fentry+kprobe\""
    );
}

#[test]
fn the_preload_list_is_the_fentry_part_of_the_plan() {
    let facts = kernel_6_12(BOTH);
    let programs = plan::trampolines(&plan(&facts, HookChoice::Auto, attribution::HOOKS));
    assert_eq!(programs.len(), 6 * 2 + 3);
    assert!(programs.contains(&("output_resume_exit", "xfrm_output_resume")));
    assert!(!programs.iter().any(|(p, _)| p.contains("_old_")));
    assert!(plan::trampolines(&plan(&facts, HookChoice::Kprobe, attribution::HOOKS)).is_empty());
}

/// Every program the tables name is in the embedded eBPF object, as the
/// kind of program its method needs.
#[test]
fn every_program_in_the_tables_is_in_the_object() {
    use aya_obj::ProgramSection as S;
    let object = crate::ebpf::parsed_object();
    let mut checked = 0;
    for spec in ALL.iter().flat_map(|specs| specs.iter()) {
        for variant in spec.variants {
            let p = &variant.programs;
            for (name, kind) in [
                (p.fentry, "fentry"),
                (p.fexit, "fexit"),
                (p.kprobe, "kprobe"),
                (p.kretprobe, "kretprobe"),
                (p.tracepoint.map(|t| t.program), "tracepoint"),
            ] {
                let Some(name) = name else { continue };
                let program = object
                    .programs
                    .get(name)
                    .unwrap_or_else(|| panic!("{name} ({}) is not in the object", spec.function));
                let found = match &program.section {
                    S::FEntry { .. } => "fentry",
                    S::FExit { .. } => "fexit",
                    S::KProbe => "kprobe",
                    S::KRetProbe => "kretprobe",
                    S::TracePoint => "tracepoint",
                    other => panic!("{name}: unexpected section {other:?}"),
                };
                assert_eq!(found, kind, "{name}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 69);
}

/// Where functions can be hooked, the IKE watch takes the socket layer and
/// ICMP, and its per-packet tracepoints are left out.
#[test]
fn the_ike_watch_takes_the_sockets_where_functions_can_be_hooked() {
    for (works, method) in [(BOTH, "fentry"), ((Works::No, Works::Yes), "kprobe")] {
        let facts = kernel_6_12(works);
        let ike = listed(&facts, HookChoice::Auto, ike::HOOKS);
        assert_eq!(
            ike.attached,
            [
                format!("ip_send_skb ({method})"),
                format!("ip6_send_skb ({method})"),
                format!("__udp_enqueue_schedule_skb ({method})"),
                format!("icmp_rcv ({method})"),
                format!("icmpv6_rcv ({method})"),
            ]
        );
        assert_eq!(ike.missing, []);
    }
}

/// A run does not ask which program types work: it plans the fallback
/// tracepoints too, and the attacher leaves them out if the socket hooks
/// attach.
#[test]
fn a_run_plans_the_ike_fallback_for_the_attacher_to_decide() {
    let facts = kernel_6_12((Works::Untested, Works::Untested));
    let planned = plan(&facts, HookChoice::Auto, ike::HOOKS);
    let functions: Vec<&str> = planned.iter().map(|p| p.spec.function).collect();
    assert_eq!(
        functions,
        [
            "ip_send_skb",
            "ip6_send_skb",
            "__udp_enqueue_schedule_skb",
            "icmp_rcv",
            "icmpv6_rcv",
            "net_dev_queue",
            "netif_receive_skb",
        ]
    );
    let hooked_by = |attached: &'static [&'static str]| {
        move |function: &str| Some(attached.contains(&function).then_some(Method::Fentry))
    };
    let fallback = |p: &Planned| plan::dependency(p.spec.needs, hooked_by(&["icmp_rcv"]));
    // One receive hook attached: the receive tracepoint stays out, the
    // send tracepoint goes in.
    assert_eq!(fallback(&planned[5]), Ok(()));
    assert_eq!(fallback(&planned[6]), Err(None));
}
