//! The diagnosis against real plutos: each lab reproduces one failure
//! category between two libreswan instances (one per gateway netns), and
//! one tracer run watches all labs of a test at once: every pluto must get
//! exactly the finding of its failure, naming connection "lab", and no
//! other; a healthy tunnel gets none. VM-only (ESP, and the time pluto
//! takes under TCG).

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use serde_json::Value;
use tests::{traced_report, typed};
use xfrm_trace::lab::{Df, EHOST, Host, Lab, PlutoConfig, StaticIpsec, WHOST};
use xfrm_trace::model::Finding;

/// One lab: its name, how its gateways are set up, and the findings
/// (kind, gateway) it must produce.
struct Scenario {
    name: &'static str,
    setup: fn(&mut Lab),
    expected: &'static [(&'static str, Host)],
}

fn start(lab: &mut Lab, gw: Host, adjust: impl FnOnce(&mut PlutoConfig)) {
    let mut config = PlutoConfig::for_gateway(gw);
    // Failures must show within the traced window.
    config.retransmit_timeout = "6s".into();
    config.extra.push("keyingtries=1".into());
    adjust(&mut config);
    lab.start_pluto(gw, &config)
        .unwrap_or_else(|e| panic!("pluto in {gw:?}: {e}"));
}

fn both(lab: &mut Lab, west: impl FnOnce(&mut PlutoConfig), east: impl FnOnce(&mut PlutoConfig)) {
    start(lab, Host::West, west);
    start(lab, Host::East, east);
}

fn ikev1(config: &mut PlutoConfig) {
    config.ikev1 = true;
    config.ike = "aes256-sha2_256;modp2048".into();
    config.esp = "aes128-sha2_256".into();
}

/// Builds the labs in parallel (pluto start-up is slow under TCG).
fn build(scenarios: &[Scenario]) -> Vec<Lab> {
    let first = Lab::create(&format!("xd{}w", std::process::id() % 1000)).expect("lab");
    first.warm_crypto().expect("crypto warm-up");
    drop(first);
    std::thread::scope(|scope| {
        let handles: Vec<_> = scenarios
            .iter()
            .map(|s| {
                scope.spawn(move || {
                    let mut lab =
                        Lab::create(&format!("xd{}{}", std::process::id() % 1000, s.name))
                            .expect("lab topology");
                    (s.setup)(&mut lab);
                    lab
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("lab setup"))
            .collect()
    })
}

/// Starts every negotiation, waits for the failures to show, and returns
/// the report.
fn trace(name: &str, labs: &[Lab], window: Duration) -> Value {
    traced_report(name, &[], || {
        for lab in labs {
            if lab.pluto(Host::West).is_some() {
                let out = lab
                    .whack(
                        Host::West,
                        &["--initiate", "--name", "lab", "--asynchronous"],
                    )
                    .expect("whack");
                assert!(out.status.success(), "{out:?}");
            }
        }
        std::thread::sleep(window);
    })
}

fn check(report: &Value, scenarios: &[Scenario], labs: &[Lab]) {
    let report = typed(report);
    let mut problems = Vec::new();
    for (scenario, lab) in scenarios.iter().zip(labs) {
        let gateways = [Host::West, Host::East].map(|gw| lab.ns(gw));
        let here: Vec<&Finding> = report
            .findings
            .iter()
            .filter(|f| gateways.contains(&f.netns_label))
            .collect();
        let found: BTreeSet<(String, String)> = here
            .iter()
            .map(|f| (f.kind.to_string(), f.netns_label.clone()))
            .collect();
        let expected: BTreeSet<(String, String)> = scenario
            .expected
            .iter()
            .map(|(kind, gw)| (kind.to_string(), lab.ns(*gw)))
            .collect();
        if found != expected {
            problems.push(format!(
                "{}: expected {expected:?}, found {found:?}",
                scenario.name
            ));
        }
        for f in here.iter().filter(|f| f.connection != "lab") {
            problems.push(format!(
                "{}: finding without its connection: {f:#?}",
                scenario.name
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nfindings: {:#?}\npluto: {:#?}",
        problems.join("\n"),
        report.findings,
        report.pluto
    );
}

fn healthy(lab: &mut Lab) {
    both(lab, |_| {}, |_| {});
}

/// Runs on: 6.12 (a pluto diagnosis lab: pluto and the rules do not differ between kernels)
#[test]
fn diagnosis_of_ikev2_failures_names_cause_and_connection() {
    let scenarios = [
        Scenario {
            name: "ok",
            setup: healthy,
            expected: &[],
        },
        Scenario {
            name: "psk",
            setup: |lab| {
                both(
                    lab,
                    |_| {},
                    |c| c.psk = "another-psk-fedcba9876543210".into(),
                )
            },
            expected: &[("auth_failed", Host::West), ("auth_failed", Host::East)],
        },
        Scenario {
            name: "ike",
            setup: |lab| both(lab, |_| {}, |c| c.ike = "aes256-sha2_512;dh20".into()),
            expected: &[
                ("ike_proposal_mismatch", Host::West),
                ("ike_proposal_mismatch", Host::East),
            ],
        },
        Scenario {
            name: "esp",
            setup: |lab| both(lab, |_| {}, |c| c.esp = "aes256-sha2_256".into()),
            expected: &[
                ("esp_proposal_mismatch", Host::West),
                ("esp_proposal_mismatch", Host::East),
            ],
        },
        Scenario {
            name: "ts",
            setup: |lab| both(lab, |_| {}, |c| c.peer_subnet = "10.0.3.0/24".into()),
            expected: &[("ts_mismatch", Host::West), ("ts_mismatch", Host::East)],
        },
    ];
    let labs = build(&scenarios);
    let report = trace("diagnosis-v2", &labs, Duration::from_secs(12));
    check(&report, &scenarios, &labs);
    // The healthy tunnel carries traffic: no finding is not no tunnel.
    let status = labs[0].whack(Host::West, &["--trafficstatus"]).unwrap();
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("type=ESP"),
        "{status:?}"
    );
}

/// Runs on: 6.12 (a pluto diagnosis lab: pluto and the rules do not differ between kernels)
#[test]
fn diagnosis_of_network_and_ikev1_failures_names_cause_and_connection() {
    let scenarios = [
        Scenario {
            name: "rfw",
            setup: |lab| {
                healthy(lab);
                lab.exec_line(
                    Host::Router,
                    "iptables -A FORWARD -p udp -m multiport --dports 500,4500 -j DROP",
                )
                .unwrap();
            },
            expected: &[("ike_unanswered", Host::West)],
        },
        Scenario {
            name: "lfw",
            setup: |lab| {
                healthy(lab);
                lab.exec_line(
                    Host::West,
                    "iptables -A OUTPUT -p udp -m multiport --dports 500,4500 -j DROP",
                )
                .unwrap();
            },
            expected: &[("ike_blocked_locally", Host::West)],
        },
        Scenario {
            name: "nop",
            setup: |lab| start(lab, Host::West, |_| {}),
            expected: &[("peer_not_running_ike", Host::West)],
        },
        Scenario {
            name: "psk1",
            setup: |lab| {
                both(lab, ikev1, |c| {
                    ikev1(c);
                    c.psk = "another-psk-fedcba9876543210".into();
                })
            },
            expected: &[("auth_failed", Host::West), ("auth_failed", Host::East)],
        },
        Scenario {
            name: "ts1",
            setup: |lab| {
                both(lab, ikev1, |c| {
                    ikev1(c);
                    c.peer_subnet = "10.0.3.0/24".into();
                })
            },
            expected: &[("ts_mismatch", Host::West), ("ts_mismatch", Host::East)],
        },
    ];
    let labs = build(&scenarios);
    let report = trace("diagnosis-net", &labs, Duration::from_secs(14));
    check(&report, &scenarios, &labs);
}

/// MASQUERADE and MTU findings name the pluto connection of their SA; a
/// policy left without SA and without a key manager is a tunnel down.
/// Runs on: 6.12 (a pluto diagnosis lab: pluto and the rules do not differ between kernels)
#[test]
fn diagnosis_names_the_connection_of_nat_and_mtu_findings_and_down_tunnels() {
    let scenarios = [
        Scenario {
            name: "nat",
            setup: healthy,
            expected: &[("masquerade_before_policy", Host::West)],
        },
        Scenario {
            name: "mtu",
            setup: healthy,
            expected: &[("esp_oversize", Host::West)],
        },
    ];
    let labs = build(&scenarios);
    for lab in &labs {
        let out = lab
            .whack(Host::West, &["--initiate", "--name", "lab"])
            .expect("whack");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("established Child SA"),
            "{out:?}"
        );
    }
    labs[0].masquerade_everything(Host::West).unwrap();
    labs[1]
        .ip_line(Host::Router, "link set r-east mtu 1400")
        .unwrap();
    // A gateway whose key manager is gone: a static policy, no SA.
    let mut down = Lab::create(&format!("xd{}dn", std::process::id() % 1000)).expect("lab");
    down.static_ipsec(&StaticIpsec::default()).unwrap();
    down.ip_line(
        Host::West,
        "xfrm state delete src 192.0.2.1 dst 203.0.113.1 proto esp spi 0x00001001",
    )
    .unwrap();
    let to: SocketAddr = format!("{EHOST}:7000").parse().unwrap();
    let report = traced_report("diagnosis-names", &[], || {
        labs[0].send_udp(Host::Whost, to, 4, 100).unwrap();
        labs[1]
            .send_udp_df(Host::Whost, WHOST, to, 4, 1400, Df::SetIgnoringPmtu)
            .unwrap();
        down.send_udp(Host::Whost, to, 3, 100).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    check(&report, &scenarios, &labs);
    let findings = report["findings"].as_array().unwrap();
    let tunnel_down: Vec<&Value> = findings
        .iter()
        .filter(|f| f["netns_label"] == down.ns(Host::West).as_str())
        .collect();
    assert_eq!(tunnel_down.len(), 1, "{findings:#?}");
    assert_eq!(tunnel_down[0]["kind"], "tunnel_down");
    assert!(
        tunnel_down[0]["summary"]
            .as_str()
            .unwrap()
            .contains("3 packets dropped"),
        "{:#}",
        tunnel_down[0]
    );
}

/// Brings the tunnel up from west; returns the SPI (8 hex digits) of its
/// west-to-east SA: west's outbound, east's inbound.
fn bring_up(lab: &Lab) -> String {
    let out = lab
        .whack(Host::West, &["--initiate", "--name", "lab"])
        .expect("whack");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // `{ESP/ESN=>0x9ef58f1c <0xe02e73ef ...`
    text.split("=>0x")
        .nth(1)
        .and_then(|rest| rest.get(..8))
        .unwrap_or_else(|| panic!("no SPI in {text}"))
        .to_string()
}

/// ESP of a Child SA that a rekey replaced, arriving after the rekey: the
/// kernel no longer has the SA (XfrmInNoStates), pluto no longer lists the
/// state, and the drop still names connection "lab" and the old state.
/// Runs on: 6.12 (a pluto diagnosis lab: pluto and the rules do not differ between kernels)
#[test]
fn diagnosis_drops_after_a_rekey_still_name_their_connection_and_state() {
    let scenarios = [Scenario {
        name: "rk",
        setup: healthy,
        // Late ESP of the replaced SA: informational, and named.
        expected: &[("esp_for_replaced_sa", Host::East)],
    }];
    let labs = build(&scenarios);
    let lab = &labs[0];
    let old_spi = bring_up(lab);
    // East's Child SA state: `006 #2: "lab", type=ESP, ...`.
    let status = lab.whack(Host::East, &["--trafficstatus"]).expect("whack");
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let old_state: u32 = status
        .split('#')
        .nth(1)
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no state in {status}"));
    let to: SocketAddr = format!("{EHOST}:7000").parse().unwrap();
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    let capture = lab.capture(Host::Router, "r-east").unwrap();
    lab.send_udp(Host::Whost, to, 3, 100).unwrap();
    assert_eq!(sink.receive(3, Duration::from_secs(10)), 3);
    let frames: Vec<Vec<u8>> = capture
        .stop()
        .into_iter()
        .filter(|p| p.protocol == 50 && p.dst.to_string() == xfrm_trace::lab::EAST_WAN)
        .map(|p| p.frame)
        .collect();
    assert_eq!(frames.len(), 3, "captured ESP frames");
    let report = traced_report("diagnosis-rekey", &[], || {
        let out = lab
            .whack(Host::West, &["--rekey-ipsec", "--name", "lab"])
            .expect("whack");
        assert!(out.status.success(), "{out:?}");
        // Until east has deleted the replaced inbound SA.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while lab
            .ip_line(Host::East, &format!("xfrm state list spi 0x{old_spi}"))
            .unwrap()
            .contains("proto esp")
        {
            assert!(std::time::Instant::now() < deadline, "old SA never deleted");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(lab.inject(Host::Router, "r-east", frames).unwrap(), 3);
        std::thread::sleep(Duration::from_millis(500));
    });
    let no_states = report["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "XfrmInNoStates")
        .unwrap_or_else(|| panic!("no XfrmInNoStates: {:#}", report["counters"]));
    let sources: Vec<&Value> = no_states["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["netns_label"] == lab.ns(Host::East).as_str())
        .collect();
    let counted: u64 = sources.iter().map(|s| s["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, 3, "{sources:#?}");
    // A replaced SA is no SA missing from the kernel: only the
    // informational finding.
    check(&report, &scenarios, &labs);
    for s in &sources {
        assert_eq!(s["spi"], format!("0x{old_spi}"), "{s}");
        assert_eq!(s["connection"], "lab", "{s}");
        assert_eq!(s["pluto_state"], old_state, "{s}");
    }
    // The state was replaced: pluto's last status no longer has it.
    let east = report["pluto"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["netns_label"] == lab.ns(Host::East).as_str())
        .expect("east's pluto");
    assert!(
        east["connections"][0]["newest_child"].as_u64() != Some(u64::from(old_state)),
        "{east:#}"
    );
}

/// The inbound SA of an established Child SA deleted behind pluto's back
/// (`ip xfrm state delete`, as a script or a second IKE daemon would):
/// pluto still calls the tunnel up, the peer's ESP is dropped
/// (XfrmInNoStates), and the finding says so and names the fix, which
/// works.
/// Runs on: 6.12 (a pluto diagnosis lab: pluto and the rules do not differ between kernels)
#[test]
fn diagnosis_names_an_sa_the_kernel_lost_behind_plutos_back() {
    let scenarios = [Scenario {
        name: "gone",
        setup: healthy,
        expected: &[("sa_missing_in_kernel", Host::East)],
    }];
    let labs = build(&scenarios);
    let lab = &labs[0];
    let spi = bring_up(lab);
    lab.ip(
        Host::East,
        &[
            "xfrm",
            "state",
            "delete",
            "src",
            xfrm_trace::lab::WEST_WAN,
            "dst",
            xfrm_trace::lab::EAST_WAN,
            "proto",
            "esp",
            "spi",
            &format!("0x{spi}"),
        ],
    )
    .unwrap();
    let to: SocketAddr = format!("{EHOST}:7000").parse().unwrap();
    let sink = lab.udp_sink(Host::Ehost, 7000).unwrap();
    let report = traced_report("diagnosis-gone", &[], || {
        lab.send_udp(Host::Whost, to, 4, 100).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    assert_eq!(
        sink.receive(4, Duration::from_secs(1)),
        0,
        "ESP got through"
    );
    check(&report, &scenarios, &labs);
    let finding = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "sa_missing_in_kernel")
        .unwrap();
    assert_eq!(finding["spi"], format!("0x{spi}"), "{finding:#}");
    let summary = finding["summary"].as_str().unwrap();
    assert!(summary.contains("4 packets were dropped"), "{finding:#}");
    let fix = finding["fix"].as_str().unwrap();
    assert!(fix.contains("--rekey-ipsec --name lab"), "{finding:#}");

    // The fix: a new Child SA, installed at both ends.
    let out = lab
        .whack(Host::East, &["--rekey-ipsec", "--name", "lab"])
        .expect("whack");
    assert!(out.status.success(), "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        lab.send_udp(Host::Whost, to, 1, 100).unwrap();
        if sink.receive(1, Duration::from_secs(1)) == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no traffic after the rekey"
        );
    }
    lab.send_udp(Host::Whost, to, 4, 100).unwrap();
    assert_eq!(sink.receive(4, Duration::from_secs(10)), 4);
}
