//! `xfrm-trace lab masquerade`: the MASQUERADE pitfall, live, in the
//! namespace lab: the leak, the finding, the fix, and the tunnel working
//! again.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

use crate::{
    lab::{EAST_SUBNET, EHOST, Host, Lab, StaticIpsec, WEST_SUBNET, WEST_WAN},
    model::FindingKind,
    privilege,
};

/// Datagrams sent in each phase.
const PACKETS: usize = 5;
const PORT: u16 = 7000;

/// The tool itself, tracing in a child process while the lab sends.
struct Traced {
    child: Child,
    json: PathBuf,
}

impl Traced {
    fn start(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let json = dir.join(format!("{name}.json"));
        let ready = dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let exe = std::env::current_exe().context("finding the xfrm-trace binary")?;
        let child = Command::new(exe)
            .arg("--json")
            .arg(&json)
            .arg("--ready-file")
            .arg(&ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the tracer")?;
        let mut traced = Self { child, json };
        let started = Instant::now();
        while !ready.exists() {
            if let Some(status) = traced.child.try_wait()? {
                let mut stderr = String::new();
                if let Some(mut err) = traced.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                }
                bail!("the tracer exited ({status}): {}", stderr.trim());
            }
            // Verifying every program takes minutes under emulation.
            if started.elapsed() > Duration::from_secs(600) {
                bail!("the tracer did not attach within 600 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(traced)
    }

    /// Stops the run (SIGINT, as Ctrl-C) and returns its JSON report.
    fn finish(mut self) -> anyhow::Result<Value> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)
            .context("stopping the tracer")?;
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn()?);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "the tracer failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = std::fs::read(&self.json)
            .with_context(|| format!("reading {}", self.json.display()))?;
        Ok(serde_json::from_slice(&text)?)
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What crossed the router's west link while `send` ran, and what arrived.
struct Wire {
    esp: usize,
    plaintext: usize,
    received: usize,
}

fn phase(lab: &Lab, send: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Wire> {
    let sink = lab.udp_sink(Host::Ehost, PORT)?;
    let capture = lab.capture(Host::Router, "r-west")?;
    send()?;
    let received = sink.receive(PACKETS, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    let packets = capture.stop();
    let ehost: std::net::Ipv4Addr = EHOST.parse()?;
    Ok(Wire {
        esp: packets.iter().filter(|p| p.is_esp()).count(),
        plaintext: packets
            .iter()
            .filter(|p| p.protocol == 17 && p.dst == ehost && p.udp_dport == Some(PORT))
            .count(),
        received,
    })
}

fn send(lab: &Lab) -> anyhow::Result<()> {
    let to: SocketAddr = format!("{EHOST}:{PORT}").parse()?;
    let refused = lab.send_udp(Host::Whost, to, PACKETS, 100)?;
    if refused > 0 {
        bail!("{refused} of {PACKETS} sends were refused by the kernel");
    }
    Ok(())
}

fn say(text: &str) {
    println!("{text}");
    let _ = std::io::stdout().flush();
}

fn wire_line(wire: &Wire) -> String {
    format!(
        "router saw {} ESP and {} plaintext UDP datagrams to {EHOST}; ehost received {} of {PACKETS}",
        wire.esp, wire.plaintext, wire.received
    )
}

fn findings(report: &Value) -> Vec<&Value> {
    report["findings"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter(|f| f["kind"] == FindingKind::MasqueradeBeforePolicy.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the scenario; an error is one line and a non-zero exit.
pub fn run() -> anyhow::Result<()> {
    privilege::require_privileges()?;
    let prefix = format!("xtl{}", std::process::id() % 100_000);
    let mut lab = Lab::create(&prefix)
        .map_err(|e| anyhow!("this kernel cannot host the lab: building the namespaces: {e}"))?;
    lab.static_ipsec(&StaticIpsec::default()).map_err(|e| {
        anyhow!("this kernel cannot host the lab: no IPsec (ESP) SA can be installed: {e}")
    })?;
    let west = lab.ns(Host::West);
    say(&format!(
        "1. lab up: whost - west - router - east - ehost (namespaces {prefix}-*), static ESP tunnel {WEST_SUBNET} <-> {EAST_SUBNET}"
    ));

    let wire = phase(&lab, || send(&lab))?;
    say(&format!("   tunnel works: {}", wire_line(&wire)));
    if wire.received != PACKETS || wire.plaintext != 0 {
        bail!(
            "the tunnel does not work before the NAT rule: {}",
            wire_line(&wire)
        );
    }

    let rule = Lab::MASQUERADE_RULE;
    lab.masquerade_everything(Host::West)
        .map_err(|e| anyhow!("this kernel cannot host the lab: iptables NAT: {e}"))?;
    say(&format!(
        "\n2. the mistake, on the west gateway: ip netns exec {west} iptables {}",
        rule.join(" ")
    ));
    say(&format!(
        "   tracing (xfrm-trace --json) while whost sends {PACKETS} UDP datagrams to {EHOST}:{PORT}..."
    ));
    let traced = Traced::start(&lab.run_dir, "leak")?;
    let wire = phase(&lab, || send(&lab))?;
    let report = traced.finish()?;
    let coverage = &report["masquerade"]["coverage"];
    if !coverage["detected"]
        .as_array()
        .is_some_and(|d| d.iter().any(|f| f == "ipv4"))
    {
        bail!(
            "this kernel cannot host the lab: MASQUERADE detection cannot hook __xfrm4_output here: {}",
            coverage["missing"]
        );
    }
    say(&format!("   leak: {}", wire_line(&wire)));
    let found = findings(&report);
    let Some(finding) = found.first() else {
        bail!(
            "the tool reported no {} finding",
            FindingKind::MasqueradeBeforePolicy
        );
    };
    say(&format!(
        "\n3. xfrm-trace finds it:\n   FINDING {}: {}",
        FindingKind::MasqueradeBeforePolicy,
        finding["summary"].as_str().unwrap_or_default()
    ));
    let fix = finding["fix"].as_str().unwrap_or_default();
    for (i, line) in fix.lines().enumerate() {
        say(&format!(
            "   {} {line}",
            if i == 0 { "fix:" } else { "    " }
        ));
    }
    for e in finding["evidence"].as_array().into_iter().flatten() {
        say(&format!("   - {}", e.as_str().unwrap_or_default()));
    }
    if wire.plaintext != PACKETS || wire.esp != 0 {
        bail!(
            "expected {PACKETS} plaintext datagrams and no ESP: {}",
            wire_line(&wire)
        );
    }

    let command: Vec<&str> = fix
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let (program, args) = command.split_first().ok_or_else(|| anyhow!("empty fix"))?;
    crate::lab::run(program, args).map_err(|e| anyhow!("applying the fix: {e}"))?;
    say(&format!(
        "\n4. the fix, as the finding says: {}",
        command.join(" ")
    ));
    say("   tracing again while whost sends the same datagrams...");
    let traced = Traced::start(&lab.run_dir, "fixed")?;
    let wire = phase(&lab, || send(&lab))?;
    let report = traced.finish()?;
    let found = findings(&report);
    say(&format!(
        "   encrypted again: {}; findings: {}",
        wire_line(&wire),
        found.len()
    ));
    if wire.received != PACKETS || wire.plaintext != 0 || !found.is_empty() {
        bail!("the fix did not restore the tunnel: {}", wire_line(&wire));
    }
    let nat = lab
        .exec_line(Host::West, "iptables -t nat -S POSTROUTING")
        .unwrap_or_default();
    say(&format!(
        "   west's nat POSTROUTING now:\n{}",
        nat.lines()
            .map(|l| format!("     {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    drop(lab);
    say(&format!(
        "\n5. cleaned up (namespaces {prefix}-* removed); the SNAT source was {WEST_WAN}"
    ));
    Ok(())
}
