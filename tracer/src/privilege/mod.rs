//! Whether we may load eBPF programs: the effective capabilities, not the
//! uid (root without them cannot, a service user holding them can).

/// A capability a run needs: its name and its bit in `CapEff`.
struct Needed {
    name: &'static str,
    bit: u32,
}

/// Loading and attaching the programs (CAP_BPF, CAP_PERFMON); dumping
/// SAs and policies over NETLINK_XFRM (CAP_NET_ADMIN); entering every
/// netns, mounting tracefs (CAP_SYS_ADMIN); reading tracefs, which only
/// root's uid may open (CAP_DAC_READ_SEARCH).
const NEEDED: [Needed; 5] = [
    Needed {
        name: "CAP_BPF",
        bit: 39,
    },
    Needed {
        name: "CAP_PERFMON",
        bit: 38,
    },
    Needed {
        name: "CAP_NET_ADMIN",
        bit: 12,
    },
    Needed {
        name: "CAP_SYS_ADMIN",
        bit: 21,
    },
    Needed {
        name: "CAP_DAC_READ_SEARCH",
        bit: 2,
    },
];

#[derive(Debug, thiserror::Error)]
#[error(
    "xfrm-trace needs root, or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_DAC_READ_SEARCH, to load eBPF programs and read other namespaces (missing: {}): run it with sudo",
    .missing.join(", ")
)]
pub struct NotPrivileged {
    missing: Vec<&'static str>,
}

/// Fails unless every capability a run needs is effective.
pub fn require_privileges() -> Result<(), NotPrivileged> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let missing = missing_from(&status);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(NotPrivileged { missing })
    }
}

/// The needed capabilities not in the `CapEff:` line of a
/// `/proc/PID/status` text (all of them when it cannot be read).
fn missing_from(status: &str) -> Vec<&'static str> {
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    NEEDED
        .iter()
        .filter(|cap| effective & (1 << cap.bit) == 0)
        .map(|cap| cap.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let status =
            |cap_eff: &str| format!("Name:\tx\nCapInh:\t0\nCapEff:\t{cap_eff}\nCapBnd:\t0\n");
        // Root's full set (kernel 6.x: 41 capabilities).
        assert!(missing_from(&status("000001ffffffffff")).is_empty());
        // Exactly BPF, PERFMON, NET_ADMIN, SYS_ADMIN and DAC_READ_SEARCH.
        assert!(missing_from(&status("000000c000201004")).is_empty());
        assert_eq!(missing_from(&status("000000c000001004")), ["CAP_SYS_ADMIN"]);
        assert_eq!(
            missing_from(&status("0000000000000000")),
            [
                "CAP_BPF",
                "CAP_PERFMON",
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_DAC_READ_SEARCH"
            ]
        );
        assert_eq!(missing_from("garbage").len(), 5);
    }
}
