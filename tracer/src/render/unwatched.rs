//! One summary line per capability that is not (fully) watched: what and
//! the one class of reason, not every function's error (those are logged
//! at info level, `-v`, and `xfrm-trace doctor` shows what the kernel
//! allows).

/// Where the details are.
const DETAILS: &str = "see `xfrm-trace doctor`, -v";

/// Functions named in a partial line before `(+N more)`.
const NAMED: usize = 2;

/// Longest reason given as it is (a longer one is summarized).
const SHORT_REASON: usize = 100;

/// `capability: not watched[ at f, g (+N more)]: reason; see ...`, or
/// `None` when nothing is missing. `attached` says whether some hooks of
/// the capability did attach (then the missing functions are named).
pub fn line(capability: &str, attached: bool, missing: &[(String, String)]) -> Option<String> {
    if missing.is_empty() {
        return None;
    }
    let mut classes: Vec<String> = Vec::new();
    for (_, why) in missing {
        let class = reason_class(why);
        if !classes.contains(&class) {
            classes.push(class);
        }
    }
    let reason = match classes.len() {
        1 => classes.remove(0),
        2 => format!("{} (and 1 other reason)", classes[0]),
        n => format!("{} (and {} other reasons)", classes[0], n - 1),
    };
    let what = if attached {
        let names: Vec<&str> = missing
            .iter()
            .take(NAMED)
            .map(|(f, _)| f.as_str())
            .collect();
        let more = match missing.len().saturating_sub(NAMED) {
            0 => String::new(),
            n => format!(" (+{n} more)"),
        };
        format!(" at {}{more}", names.join(", "))
    } else {
        String::new()
    };
    Some(format!(
        "{capability}: not watched{what}: {reason}; {DETAILS}"
    ))
}

/// The kind of failure behind one function's reason. Attach errors read
/// `fentry: <error>; kprobe: <error>`: when the kernel refuses fentry
/// (EPERM) and has no kprobes at all (aya finds no kprobe PMU in sysfs),
/// that is said once for all of them.
fn reason_class(why: &str) -> String {
    let part = |method: &str| {
        why.split("; ")
            .find_map(|p| p.strip_prefix(method))
            .unwrap_or("")
    };
    let fentry_refused = part("fentry: ").contains("(os error 1)");
    let no_kprobes = part("kprobe: ").contains("devices/kprobe/type");
    if fentry_refused && no_kprobes {
        "this kernel allows neither fentry (EPERM) nor kprobes (not built in)".into()
    } else if why.len() <= SHORT_REASON && !why.contains("; ") {
        why.to_string()
    } else {
        "fentry and kprobes could not attach".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason the host (6.18, tracepoint-only) gives for each function.
    const HOST: &str = "fentry: the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1). Verifier output: : Operation not permitted (os error 1); kprobe: `/sys/bus/event_source/devices/kprobe/type`: No such file or directory (os error 2)";

    fn missing(functions: &[&str], why: &str) -> Vec<(String, String)> {
        functions
            .iter()
            .map(|f| (f.to_string(), why.to_string()))
            .collect()
    }

    #[test]
    fn a_kernel_without_fentry_and_kprobes_is_one_short_line() {
        let six = missing(
            &[
                "ip_do_fragment",
                "ip6_fragment",
                "__icmp_send",
                "icmp6_send",
                "xfrm_local_error",
                "xfrm_output",
            ],
            HOST,
        );
        assert_eq!(
            line("oversize ESP", false, &six).unwrap(),
            "oversize ESP: not watched: this kernel allows neither fentry (EPERM) nor kprobes (not built in); see `xfrm-trace doctor`, -v"
        );
        assert_eq!(line("oversize ESP", true, &[]), None);
    }

    #[test]
    fn partly_watched_names_what_is_missing_and_mixed_reasons_are_counted() {
        let mut some = missing(&["xfrm_output", "xfrm_output_resume", "xfrm_input"], HOST);
        some.push((
            "__xfrm_route_forward".into(),
            "kprobe: not in /proc/kallsyms (inlined?)".into(),
        ));
        assert_eq!(
            line("per-packet attribution", true, &some).unwrap(),
            "per-packet attribution: not watched at xfrm_output, xfrm_output_resume (+2 more): this kernel allows neither fentry (EPERM) nor kprobes (not built in) (and 1 other reason); see `xfrm-trace doctor`, -v"
        );
        let asked = missing(&["MASQUERADE detection"], "--hooks tracepoint");
        assert_eq!(
            line("MASQUERADE detection", false, &asked).unwrap(),
            "MASQUERADE detection: not watched: --hooks tracepoint; see `xfrm-trace doctor`, -v"
        );
        let long = missing(
            &["xfrm_input"],
            "fentry: the BPF_PROG_LOAD syscall returned Invalid argument (os error 22). Verifier output: a long log; kprobe: busy",
        );
        assert_eq!(
            line("x", false, &long).unwrap(),
            "x: not watched: fentry and kprobes could not attach; see `xfrm-trace doctor`, -v"
        );
    }
}
