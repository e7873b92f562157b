//! The names userspace finds the eBPF object's maps, programs and globals
//! by. Each constant is the ident of a `static` or `fn` in `tracer-ebpf`
//! (its value is the ident itself, so the two read the same); a unit test
//! in `tracer` (`ebpf::tests`) checks every list against the built object.

/// `pub const NAME: &str = "NAME";` for each ident, and a list of them.
macro_rules! names {
    ($(#[$meta:meta])* $list:ident: $($name:ident,)*) => {
        $(pub const $name: &str = stringify!($name);)*
        $(#[$meta])*
        pub const $list: &[&str] = &[$($name),*];
    };
}

pub mod maps {
    names! {
        /// Every map userspace opens.
        ALL:
        // Attribution (the brackets).
        SOURCES, ATTRIBUTION_ERRORS, SAMPLES, STACKS,
        // Attribution (diff at the drop).
        CLAIM_TABLES, SHADOWS,
        // Drops at skb:kfree_skb.
        DROPS, DROPS_UNTRACKED, DROP_SAMPLING, DROP_SAMPLES, DROP_SAMPLES_LOST,
        IKE_EVENTS,
        MASQ_LEAKS, MASQ_ERRORS, LEAK_SAMPLES,
        MTU_EVENTS,
        NETNS_EXITS,
    }

    /// The maps only the programs use (scratch space, state between two
    /// hooks, sample budgets): userspace never opens them.
    pub const KERNEL_ONLY: &[&str] = &[
        "FRAMES",
        "AFTER",
        "SAMPLE_BUDGET",
        "DROP_BUDGET",
        "MASQ_LEAVING",
        "LEAK_BUDGET",
        "NETNS_EXIT_CPU",
        "CLAIM_FRAME",
        "OPEN_LOOKUPS",
        "IKE_ENQUEUEING",
    ];
}

/// The globals userspace writes before loading (`EbpfLoader::override_global`).
pub mod globals {
    names! {
        ALL: KERNEL_OFFSETS, KFREE_SKB_RECORD, NET_RECORDS, POSSIBLE_CPUS,
    }
}

/// Every program of the object, named like the eBPF `fn`.
#[allow(non_upper_case_globals)]
pub mod programs {
    names! {
        ALL:
        // The brackets: fentry, fexit, kprobe, kretprobe of each function.
        xfrm_input_entry, xfrm_input_exit, xfrm_input_kprobe, xfrm_input_kretprobe,
        policy_check_entry, policy_check_exit, policy_check_kprobe, policy_check_kretprobe,
        route_forward_entry, route_forward_exit, route_forward_kprobe, route_forward_kretprobe,
        lookup_entry, lookup_exit, lookup_kprobe, lookup_kretprobe,
        output_entry, output_exit, output_kprobe, output_kretprobe,
        output_resume_entry, output_resume_exit, output_resume_kprobe, output_resume_kretprobe,
        output_resume_old_entry, output_resume_old_exit, output_resume_old_kprobe,
        output_resume_old_kretprobe,
        // Enrichment: the SA and policy behind an increment.
        state_lookup_exit, input_state_lookup_exit, policy_lookup_exit,
        state_lookup_kretprobe, policy_lookup_kretprobe,
        // Diff at the drop: the shadows' set-up, local route lookups.
        shadow_init, lookup_route_exit, lookup_route_kprobe, lookup_route_kretprobe,
        // Drops and the IKE path watch (tracepoints).
        kfree_skb, net_dev_queue, netif_receive_skb,
        // The IKE path watch at the sockets and ICMP.
        ike_send_fentry, ike_send_kprobe, ike_send6_fentry, ike_send6_kprobe,
        ike_icmp_fentry, ike_icmp_kprobe, ike_icmp6_fentry, ike_icmp6_kprobe,
        ike_enqueue_fentry, ike_enqueue_fexit, ike_enqueue_kprobe, ike_enqueue_kretprobe,
        // MASQUERADE before IPsec.
        masq_xfrm4_okfn, masq_xfrm6_okfn, masq_okfn_kprobe,
        // Oversize ESP.
        mtu_fragment_fentry, mtu_fragment_kprobe, mtu_fragment6_fentry, mtu_fragment6_kprobe,
        mtu_icmp_fentry, mtu_icmp_kprobe, mtu_icmp6_fentry, mtu_icmp6_kprobe,
        mtu_local_error_fentry, mtu_local_error_kprobe, mtu_gso_fentry, mtu_gso_kprobe,
        // Counters of a namespace at its teardown.
        netns_exit_fentry, netns_exit_kprobe,
        // The doctor's probes of which program types the kernel accepts.
        probe_fentry, probe_kprobe, probe_tracepoint, probe_raw_tracepoint,
        probe_btf_tracepoint,
    }
}
