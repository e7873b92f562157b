//! The policy and SA a leaked packet was meant for. The bundle NAT dropped
//! is gone by the time the leak is seen, so they are found again the way
//! the kernel found them: the pre-NAT flow against the `out` policies of
//! the netns, then the SA the chosen policy's template names.

use std::net::IpAddr;

use tracer_common::masquerade::LeakKey;

use crate::xfrm_state::{Policy, Sa, Selector, XfrmState, covers};

/// The flow the policy lookup saw (before SNAT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
}

impl Flow {
    /// The key's pre-NAT flow, if conntrack gave one.
    pub fn of(key: &LeakKey) -> Option<Self> {
        if key.seen == 0 {
            return None;
        }
        let address = |bytes: &[u8; 16]| -> Option<IpAddr> {
            match key.family {
                2 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
                10 => Some(IpAddr::from(*bytes)),
                _ => None,
            }
        };
        Some(Self {
            src: address(&key.pre_src)?,
            dst: address(&key.pre_dst)?,
            proto: key.proto,
        })
    }
}

/// Whether the selector matches the flow. Ports are not in the flow (the
/// leak table keeps one row per address pair), so a selector's ports are
/// not compared.
fn matches(selector: &Selector, flow: &Flow) -> bool {
    covers(&selector.src, flow.src)
        && covers(&selector.dst, flow.dst)
        && (selector.proto == 0 || selector.proto == flow.proto)
}

/// The policy the flow matched on its way out: of the `out` policies that
/// allow it, without a mark or an interface id (those also need the
/// packet's mark or route), the one with the lowest priority value, the
/// first listed on a tie (the kernel's order). With it, the SA its first
/// template names, if the netns has one: ESP or AH as the template says,
/// its reqid, its tunnel endpoints (in transport mode the packet's).
pub fn policy_and_sa<'a>(
    state: &'a XfrmState,
    flow: &Flow,
) -> Option<(&'a Policy, Option<&'a Sa>)> {
    let policy = state
        .policies
        .iter()
        .filter(|p| p.dir == "out" && p.action == "allow")
        .filter(|p| p.mark.is_none_or(|(_, mask)| mask == 0) && p.if_id.is_none_or(|id| id == 0))
        .filter(|p| matches(&p.selector, flow))
        .min_by_key(|p| p.priority)?;
    let sa = policy.templates.first().and_then(|t| {
        let dst = if t.dst.is_unspecified() {
            flow.dst
        } else {
            t.dst
        };
        state.sas.iter().find(|sa| {
            sa.proto == t.proto
                && (t.reqid == 0 || sa.reqid == t.reqid)
                && sa.dst == dst
                && (t.src.is_unspecified() || sa.src == t.src)
        })
    });
    Some((policy, sa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xfrm_state::{Mode, Template};

    fn selector(src: &str, dst: &str) -> Selector {
        Selector {
            src: src.into(),
            dst: dst.into(),
            ..Selector::default()
        }
    }

    fn policy(index: u32, dir: &'static str, priority: u32, sel: Selector, reqid: u32) -> Policy {
        Policy {
            selector: sel,
            dir,
            action: "allow",
            index,
            priority,
            templates: vec![Template {
                src: "192.0.2.1".parse().unwrap(),
                dst: "203.0.113.1".parse().unwrap(),
                proto: 50,
                spi: 0,
                reqid,
                mode: Mode::Tunnel,
                optional: false,
            }],
            mark: None,
            if_id: None,
        }
    }

    fn sa(spi: u32, reqid: u32, dst: &str) -> Sa {
        Sa::example(spi, reqid, dst, Mode::Tunnel)
    }

    fn flow(src: &str, dst: &str) -> Flow {
        Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: 17,
        }
    }

    fn gateway() -> XfrmState {
        XfrmState {
            sas: vec![
                sa(0x2002, 1, "192.0.2.1"),
                sa(0x1001, 1, "203.0.113.1"),
                sa(0x3003, 2, "203.0.113.1"),
            ],
            policies: vec![
                // The inbound twin matches the reversed flow only.
                policy(10, "fwd", 0, selector("192.168.0.0/16", "10.0.2.0/24"), 1),
                policy(9, "out", 100, selector("0.0.0.0/0", "0.0.0.0/0"), 2),
                policy(1, "out", 10, selector("10.0.2.0/24", "192.168.0.0/16"), 1),
            ],
            interfaces: Vec::new(),
        }
    }

    #[test]
    fn the_most_specific_priority_wins_and_its_template_names_the_sa() {
        let state = gateway();
        let (policy, sa) = policy_and_sa(&state, &flow("10.0.2.10", "192.168.1.10")).unwrap();
        assert_eq!(policy.index, 1);
        assert_eq!(sa.map(|sa| sa.spi), Some(0x1001));
        // Outside the subnets only the catch-all policy (reqid 2) matches.
        let (policy, sa) = policy_and_sa(&state, &flow("10.9.0.1", "192.168.1.10")).unwrap();
        assert_eq!((policy.index, sa.map(|sa| sa.spi)), (9, Some(0x3003)));
    }

    #[test]
    fn no_matching_policy_or_sa_is_said_as_none() {
        let mut state = gateway();
        state.policies.retain(|p| p.index != 9);
        assert!(policy_and_sa(&state, &flow("10.9.0.1", "192.168.1.10")).is_none());
        assert!(policy_and_sa(&state, &flow("fd00:2::10", "fd00:168::10")).is_none());
        state.sas.clear();
        let (policy, sa) = policy_and_sa(&state, &flow("10.0.2.10", "192.168.1.10")).unwrap();
        assert_eq!((policy.index, sa), (1, None));
    }

    #[test]
    fn prefixes_compare_only_their_bits() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(covers("10.0.2.0/24", v4("10.0.2.255")));
        assert!(!covers("10.0.2.0/24", v4("10.0.3.0")));
        assert!(covers("0.0.0.0/0", v4("198.51.100.7")));
        assert!(covers("fd00:2::/64", v4("fd00:2::10")));
        assert!(!covers("fd00:2::/64", v4("fd00:3::10")));
        assert!(covers("::/0", v4("fd00:3::10")));
        assert!(!covers("::/0", v4("10.0.2.1")));
        assert!(!covers("10.0.2.0/33", v4("10.0.2.1")));
        assert!(!covers("garbage", v4("10.0.2.1")));
    }
}
