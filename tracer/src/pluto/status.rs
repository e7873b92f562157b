//! pluto's view of its connections and SAs, from `ipsec whack --status`.
//!
//! The format is libreswan 4.10's, as captured in the lab: every line
//! starts with whack's 3-digit code (`000 `), connections are listed as
//! `"lab": TOPOLOGY; ROUTING; eroute owner: #N` followed by
//! `"lab":   key: value; ...` lines, and states as `#N: "lab":500 STATE_...`
//! plus, for established Child SAs, `#N: "lab" esp.SPI@DST ... Traffic: ...`.

use std::{
    io::Read as _,
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Error, check_socket, split_connection};

/// How long whack may take before it is killed.
const WHACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The connections and states of one pluto.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Status {
    pub connections: Vec<Connection>,
    pub states: Vec<State>,
}

/// One loaded connection (`conn` section), as pluto resolved it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// The name within the quotes, plus `[N]` for an instance.
    pub name: String,
    /// None for `%any`, `%dns<...>` and other unresolved hosts.
    pub local_addr: Option<IpAddr>,
    pub remote_addr: Option<IpAddr>,
    /// The `[...]` after the host, e.g. `@west`; None when pluto prints
    /// none (the ID is the host address).
    pub local_id: Option<String>,
    pub remote_id: Option<String>,
    /// Selectors as printed (`10.0.2.0/24`); one per topology line.
    pub local_subnets: Vec<String>,
    pub remote_subnets: Vec<String>,
    /// `unrouted`, `prospective erouted`, `erouted`, ... as printed.
    pub routing: String,
    pub newest_ike: Option<u32>,
    pub newest_child: Option<u32>,
    /// `IKE algorithms:` as printed, e.g. `AES_GCM_16_256-HMAC_SHA2_256-DH19`.
    pub ike_algorithms: Option<String>,
    /// `ESP algorithms:` as printed, e.g. `AES_GCM_16_128-NONE`.
    pub esp_algorithms: Option<String>,
    pub mtu: Option<u32>,
    /// `policy:` as printed, e.g. `IKEv2+PSK+ENCRYPT+TUNNEL+PFS+UP+...`.
    pub policy: String,
    pub ikev2: bool,
}

/// Whether a state negotiates or holds an IKE (ISAKMP) SA or a Child (IPsec) SA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateKind {
    #[default]
    Ike,
    Child,
}

/// One pluto state (`#N`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub serial: u32,
    pub connection: String,
    pub kind: StateKind,
    /// e.g. `STATE_V2_ESTABLISHED_CHILD_SA`, `STATE_V2_PARENT_I1`, `STATE_QUICK_I1`.
    pub name: String,
    pub established: bool,
    /// The IKE SA of an established Child SA (`IKE SA #1` / `ISAKMP SA #1`).
    pub parent_ike: Option<u32>,
    /// ESP SPIs (host order) with their destination: the outbound SA
    /// (to the peer) comes first, then the inbound one.
    pub esp_spis: Vec<(u32, IpAddr)>,
    /// ESP bytes; pluto rounds down to KB or MB above 1023 B. 0 when pluto
    /// shows no traffic line (not an established Child SA).
    pub in_bytes: u64,
    pub out_bytes: u64,
}

/// Asks the pluto behind `socket` for its status (`ipsec whack --status`).
/// A unix socket: works from any netns. whack is killed after 5 s.
pub fn query(socket: &Path) -> Result<Status, Error> {
    check_socket(socket)?;
    let output = run_whack(socket)?;
    parse_status(&output)
}

fn run_whack(socket: &Path) -> Result<String, Error> {
    use std::os::unix::process::CommandExt as _;
    let mut child = Command::new("ipsec")
        .arg("whack")
        .arg("--ctlsocket")
        .arg(socket)
        .arg("--status")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: killed whole on timeout (`ipsec` may be a
        // script whose children would outlive it), and a Ctrl-C on the
        // terminal, meant for us, does not kill it mid-answer.
        .process_group(0)
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::WhackMissing,
            _ => Error::io(Path::new("ipsec"), e),
        })?;
    // Read on threads: a large status would otherwise fill the pipe and
    // whack would never exit.
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stdout.read_to_end(&mut bytes);
        bytes
    });
    let err_reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr.read_to_end(&mut bytes);
        bytes
    });
    let started = Instant::now();
    let exit = loop {
        match child.try_wait() {
            Ok(Some(exit)) => break exit,
            Ok(None) if started.elapsed() < WHACK_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => {
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return Err(Error::WhackTimeout(socket.to_path_buf()));
            }
            Err(e) => return Err(Error::io(Path::new("ipsec"), e)),
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    if !exit.success() {
        let reason = stderr
            .lines()
            .chain(stdout.lines())
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output")
            .trim()
            .to_string();
        return Err(Error::WhackFailed {
            socket: socket.to_path_buf(),
            reason: format!("{exit}: {reason}"),
        });
    }
    Ok(stdout)
}

/// Parses the full output of `ipsec whack --status`. Output cut short
/// (it must reach the `Bare Shunt list:` that ends the states) or lines
/// that do not parse give `Error::Malformed`.
pub fn parse_status(text: &str) -> Result<Status, Error> {
    let malformed = |reason: String| Error::Malformed(reason);
    if !text.lines().any(|l| strip_code(l) == "Connection list:") {
        return Err(malformed(
            "no `Connection list:` (not --status output?)".into(),
        ));
    }
    if !text.lines().any(|l| strip_code(l) == "Bare Shunt list:") {
        return Err(malformed(
            "no `Bare Shunt list:` at the end (output cut short?)".into(),
        ));
    }
    let mut status = Status::default();
    for (number, line) in text.lines().enumerate() {
        let line = strip_code(line);
        let parsed = if line.starts_with('"') {
            parse_connection_line(line, &mut status.connections)
        } else if line.starts_with('#') {
            parse_state_line(line, &mut status.states)
        } else {
            Ok(())
        };
        parsed.map_err(|reason| malformed(format!("line {}: {reason}", number + 1)))?;
    }
    Ok(status)
}

/// Drops whack's 3-digit reply code (`000 `, `006 `) when present.
fn strip_code(line: &str) -> &str {
    let bytes = line.as_bytes();
    if bytes.len() >= 3 && bytes[..3].iter().all(u8::is_ascii_digit) {
        match bytes.get(3) {
            None => return "",
            Some(b' ') => return &line[4..],
            Some(_) => {}
        }
    }
    line
}

/// `"lab": TOPOLOGY; ROUTING; eroute owner: #2` or `"lab":   key: value; ...`.
fn parse_connection_line(line: &str, connections: &mut Vec<Connection>) -> Result<(), String> {
    let (name, rest) = split_connection(line).ok_or("unterminated connection name")?;
    // An instance's peer address may sit between the name and the colon
    // (`"rw"[1] 192.0.2.9: ...`); IPv6 addresses never contain ": ".
    let body = match rest.find(": ") {
        Some(colon) => &rest[colon + 1..],
        None => return Err(format!("no `: ` after connection {name:?}")),
    };
    if body.starts_with("  ") {
        let connection = connections
            .iter_mut()
            .rev()
            .find(|c| c.name == name)
            .ok_or_else(|| format!("details of {name:?} before its topology line"))?;
        apply_details(body, connection)
    } else {
        parse_topology_line(&name, body.trim_start(), connections)
    }
}

fn parse_topology_line(
    name: &str,
    body: &str,
    connections: &mut Vec<Connection>,
) -> Result<(), String> {
    let mut parts = body.split("; ");
    let topology = parts.next().unwrap_or_default();
    let routing = parts
        .next()
        .ok_or_else(|| format!("no routing after the topology of {name:?}"))?;
    let (local, remote) = topology
        .split_once("...")
        .ok_or_else(|| format!("no `...` in the topology of {name:?}"))?;
    let local = parse_end(local, End::Local);
    let remote = parse_end(remote, End::Remote);
    // A connection with several routes prints one topology line per route.
    if let Some(known) = connections.iter_mut().find(|c| c.name == name) {
        known.local_subnets.extend(local.client);
        known.remote_subnets.extend(remote.client);
        return Ok(());
    }
    connections.push(Connection {
        name: name.to_string(),
        local_addr: local.addr,
        remote_addr: remote.addr,
        local_id: local.id,
        remote_id: remote.id,
        local_subnets: local.client.into_iter().collect(),
        remote_subnets: remote.client.into_iter().collect(),
        routing: routing.trim().to_string(),
        ..Connection::default()
    });
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Local,
    Remote,
}

struct ParsedEnd {
    addr: Option<IpAddr>,
    id: Option<String>,
    client: Option<String>,
}

/// One side of `CLIENT===HOST[ID]---HOP...HOP---HOST[ID]===CLIENT`
/// (libreswan's jam_end; only the plain form was captured).
fn parse_end(text: &str, end: End) -> ParsedEnd {
    let (host_part, client) = match end {
        End::Local => match text.split_once("===") {
            Some((client, host)) => (host, Some(client)),
            None => (text, None),
        },
        End::Remote => match text.split_once("===") {
            Some((host, client)) => (host, Some(client)),
            None => (text, None),
        },
    };
    let host_part = match end {
        End::Local => host_part.split("---").next().unwrap_or_default(),
        End::Remote => host_part.rsplit("---").next().unwrap_or_default(),
    };
    let (host, id) = match host_part.strip_suffix(']').and_then(|h| h.rsplit_once('[')) {
        Some((host, id)) => (host, Some(id.to_string())),
        None => (host_part, None),
    };
    // Drop `<hostname>` and an explicit `:port` (IPv6 then comes as `[addr]:port`).
    let host = host.split('<').next().unwrap_or_default();
    let addr = match host.strip_prefix('[').and_then(|h| h.split_once(']')) {
        Some((wrapped, _port)) => wrapped.parse().ok(),
        None => host
            .parse()
            .ok()
            .or_else(|| host.rsplit_once(':').and_then(|(a, _port)| a.parse().ok())),
    };
    ParsedEnd {
        addr,
        id,
        client: client.map(str::to_string),
    }
}

/// The `key: value; key: value;` pairs of a connection detail line.
fn apply_details(body: &str, connection: &mut Connection) -> Result<(), String> {
    for part in body.split(';') {
        let Some((key, value)) = part.trim().split_once(": ") else {
            continue;
        };
        let value = value.trim();
        match key {
            "newest IKE SA" | "newest ISAKMP SA" => connection.newest_ike = parse_serial(value)?,
            "newest IPsec SA" => connection.newest_child = parse_serial(value)?,
            "IKE algorithms" => connection.ike_algorithms = Some(value.to_string()),
            "ESP algorithms" => connection.esp_algorithms = Some(value.to_string()),
            "mtu" => connection.mtu = value.parse().ok(),
            "policy" => {
                connection.policy = value.to_string();
                connection.ikev2 = value.split('+').any(|p| p == "IKEv2");
            }
            _ => {}
        }
    }
    Ok(())
}

/// `#2` → Some(2); `#0` (none) → None.
fn parse_serial(text: &str) -> Result<Option<u32>, String> {
    let number = text
        .strip_prefix('#')
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| format!("bad state serial {text:?}"))?;
    Ok((number != 0).then_some(number))
}

/// `#1: "lab":500 STATE_... (story); ...` or `#2: "lab" esp.X@A ... Traffic: ...`.
fn parse_state_line(line: &str, states: &mut Vec<State>) -> Result<(), String> {
    let (serial, rest) = line[1..]
        .split_once(": ")
        .ok_or_else(|| "state line without `: `".to_string())?;
    let serial: u32 = serial
        .parse()
        .map_err(|_| format!("bad state serial #{serial:?}"))?;
    // Other `#N: ...` lines (e.g. `#1: pending CHILD SA for "lab"`) say
    // nothing we need.
    if !rest.starts_with('"') {
        return Ok(());
    }
    let (connection, rest) = split_connection(rest).ok_or("unterminated connection name")?;
    if let Some((_, traffic)) = rest.split_once(" Traffic:") {
        let state = states
            .iter_mut()
            .rev()
            .find(|s| s.serial == serial)
            .ok_or_else(|| format!("traffic of #{serial} before its state line"))?;
        for token in rest.split_whitespace() {
            if let Some(said) = token
                .strip_prefix("esp.")
                .or_else(|| token.strip_prefix("esp:"))
            {
                state.esp_spis.push(parse_said(said)?);
            }
        }
        for token in traffic.split_whitespace() {
            if let Some(amount) = token.strip_prefix("ESPin=") {
                state.in_bytes = parse_bytes(amount)?;
            } else if let Some(amount) = token.strip_prefix("ESPout=") {
                state.out_bytes = parse_bytes(amount)?;
            }
        }
        return Ok(());
    }
    let name = rest
        .split_whitespace()
        .find(|t| t.starts_with("STATE_"))
        .ok_or_else(|| format!("no STATE_ name for #{serial}"))?;
    let story = rest
        .split_once(" (")
        .and_then(|(_, s)| s.split_once(");"))
        .map(|(story, _)| story)
        .ok_or_else(|| format!("no (story) for #{serial}"))?;
    let parent_ike = rest
        .split(';')
        .map(str::trim)
        .find_map(|p| {
            p.strip_prefix("IKE SA ")
                .or_else(|| p.strip_prefix("ISAKMP SA "))
        })
        .map(parse_serial)
        .transpose()?
        .flatten();
    states.push(State {
        serial,
        connection,
        kind: state_kind(name),
        name: name.to_string(),
        // IKEv2 stories: "established IKE SA"; IKEv1: "IKE SA established".
        established: story.contains("established"),
        parent_ike,
        ..State::default()
    });
    Ok(())
}

/// IKEv1 Child SAs are negotiated in Quick Mode; IKEv2 names say CHILD.
fn state_kind(name: &str) -> StateKind {
    if name.starts_with("STATE_QUICK_") || name.contains("CHILD") {
        StateKind::Child
    } else {
        StateKind::Ike
    }
}

/// `9e9e96db@192.0.2.2` (the part after `esp.`; IPv6 uses `esp:`).
fn parse_said(said: &str) -> Result<(u32, IpAddr), String> {
    let (spi, dst) = said
        .split_once('@')
        .ok_or_else(|| format!("bad SA id {said:?}"))?;
    let spi = u32::from_str_radix(spi, 16).map_err(|_| format!("bad SPI {spi:?}"))?;
    let dst = dst.parse().map_err(|_| format!("bad SA address {dst:?}"))?;
    Ok((spi, dst))
}

/// `0B`, `12KB`, `3MB` (pluto's rounding) → bytes.
fn parse_bytes(amount: &str) -> Result<u64, String> {
    let (digits, scale) = if let Some(d) = amount.strip_suffix("MB") {
        (d, 1024 * 1024)
    } else if let Some(d) = amount.strip_suffix("KB") {
        (d, 1024)
    } else if let Some(d) = amount.strip_suffix('B') {
        (d, 1)
    } else {
        return Err(format!("bad byte count {amount:?}"));
    };
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("bad byte count {amount:?}"))?;
    Ok(count.saturating_mul(scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real `ipsec whack --status` of the lab's west (libreswan 4.10,
    // /work/explore/out/log), with the algorithm tables shortened.
    const HEALTHY: &str = include_str!("testdata/status-healthy-west.txt");

    #[test]
    fn healthy_connection() {
        let status = parse_status(HEALTHY).unwrap();
        assert_eq!(
            status.connections,
            vec![Connection {
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
                mtu: None,
                policy: "IKEv2+PSK+ENCRYPT+TUNNEL+PFS+UP+IKE_FRAG_ALLOW+ESN_NO+ESN_YES".into(),
                ikev2: true,
            }]
        );
    }

    #[test]
    fn healthy_states() {
        let status = parse_status(HEALTHY).unwrap();
        assert_eq!(
            status.states,
            vec![
                State {
                    serial: 1,
                    connection: "lab".into(),
                    kind: StateKind::Ike,
                    name: "STATE_V2_ESTABLISHED_IKE_SA".into(),
                    established: true,
                    parent_ike: None,
                    esp_spis: vec![],
                    in_bytes: 0,
                    out_bytes: 0,
                },
                State {
                    serial: 2,
                    connection: "lab".into(),
                    kind: StateKind::Child,
                    name: "STATE_V2_ESTABLISHED_CHILD_SA".into(),
                    established: true,
                    parent_ike: Some(1),
                    esp_spis: vec![
                        (0x9e9e96db, "192.0.2.2".parse().unwrap()),
                        (0xcd0255de, "192.0.2.1".parse().unwrap()),
                    ],
                    in_bytes: 0,
                    out_bytes: 0,
                },
            ]
        );
    }

    #[test]
    fn refused_child_leaves_no_child_state() {
        // Real lines of west's --status after the v2esp run (out/log; only
        // its tail was captured, so the topology line is the healthy one).
        let mut connections = Vec::new();
        parse_connection_line(
            "\"lab\": 10.0.2.0/24===192.0.2.1[@west]...192.0.2.2[@east]===192.168.0.0/16; erouted; eroute owner: #2",
            &mut connections,
        )
        .unwrap();
        for line in [
            "\"lab\":   conn_prio: 24,16; interface: wan0; metric: 0; mtu: unset; sa_prio:auto; sa_tfc:none;",
            "\"lab\":   newest IKE SA: #1; newest IPsec SA: #0; conn serial: $1;",
            "\"lab\":   ESP algorithms: AES_GCM_16_128-NONE",
        ] {
            parse_connection_line(line, &mut connections).unwrap();
        }
        assert_eq!(connections[0].newest_ike, Some(1));
        assert_eq!(connections[0].newest_child, None, "#0 means none");
        assert_eq!(connections[0].mtu, None, "mtu: unset");
        let mut states = Vec::new();
        let ike = "#1: \"lab\":500 STATE_V2_ESTABLISHED_IKE_SA (established IKE SA); REKEY in 28114s; REPLACE in 28799s; newest; idle;";
        parse_state_line(ike, &mut states).unwrap();
        assert_eq!(states.len(), 1);
        assert!(states[0].established);
    }

    #[test]
    fn half_open_and_ikev1_states() {
        // Real: `--showstates` during the nopeer run (out/log).
        let mut states = Vec::new();
        let line = "#1: \"lab\":500 STATE_V2_PARENT_I1 (sent IKE_SA_INIT request); RETRANSMIT in 1s; idle;";
        parse_state_line(line, &mut states).unwrap();
        parse_state_line("#1: pending CHILD SA for \"lab\"", &mut states).unwrap();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].name, "STATE_V2_PARENT_I1");
        assert!(!states[0].established);
        assert_eq!(states[0].kind, StateKind::Ike);
        // Real IKEv1: `--showstates` during the v1esp run (out2/log).
        let mut states = Vec::new();
        for line in [
            "#1: \"lab\":500 STATE_MAIN_I4 (IKE SA established); REPLACE in 27896s; newest; lastdpd=-1s(seq in:0 out:0); idle;",
            "#2: \"lab\":500 STATE_QUICK_I1 (sent Quick Mode request); RETRANSMIT in 3s; lastdpd=-1s(seq in:0 out:0); idle;",
        ] {
            parse_state_line(line, &mut states).unwrap();
        }
        assert_eq!(
            (states[0].kind, states[0].established),
            (StateKind::Ike, true)
        );
        assert_eq!(
            (states[1].kind, states[1].established),
            (StateKind::Child, false)
        );
        assert_eq!(states[1].name, "STATE_QUICK_I1");
    }

    #[test]
    fn traffic_units_and_parent() {
        let mut states = Vec::new();
        let state = "#4: \"lab\":500 STATE_QUICK_I2 (IPsec SA established); EVENT_SA_REPLACE in 27000s; newest; eroute owner; ISAKMP SA #3; idle;";
        parse_state_line(state, &mut states).unwrap();
        let traffic = "#4: \"lab\" used 2s ago; esp.1@192.0.2.2 esp.2@192.0.2.1 Traffic: ESPin=12KB ESPout=3MB ESPmax=2^63B ";
        parse_state_line(traffic, &mut states).unwrap();
        assert_eq!(states[0].parent_ike, Some(3));
        assert_eq!(
            (states[0].in_bytes, states[0].out_bytes),
            (12 * 1024, 3 * 1024 * 1024)
        );
        assert_eq!(states[0].esp_spis.len(), 2);
    }

    #[test]
    fn instance_and_ipv6_connection() {
        // Not captured: shapes from libreswan 4.10's jam_connection_instance
        // and jam_end (instance peer address; `[v6]:port`; `esp:` SA ids).
        let mut connections = Vec::new();
        let topo = "\"rw\"[3] 2001:db8::9: 2001:db8:1::/64===[2001:db8::1]:4500[@gw]...2001:db8::9[@road]===2001:db8:2::/64; erouted; eroute owner: #5";
        parse_connection_line(topo, &mut connections).unwrap();
        parse_connection_line(
            "\"rw\"[3] 2001:db8::9:   mtu: 1400; sa_prio:auto;",
            &mut connections,
        )
        .unwrap();
        let rw = &connections[0];
        assert_eq!(rw.name, "rw[3]");
        assert_eq!(rw.local_addr, Some("2001:db8::1".parse().unwrap()));
        assert_eq!(rw.remote_addr, Some("2001:db8::9".parse().unwrap()));
        assert_eq!(rw.remote_id.as_deref(), Some("@road"));
        assert_eq!(rw.remote_subnets, vec!["2001:db8:2::/64".to_string()]);
        assert_eq!(rw.mtu, Some(1400));
        assert_eq!(
            parse_said("9e9e96db@2001:db8::9"),
            Ok((0x9e9e96db, "2001:db8::9".parse().unwrap()))
        );

        let any = "\"rw\": 10.0.2.0/24===192.0.2.1[@gw]---192.0.2.254...%any[@road]; unrouted; eroute owner: #0";
        parse_connection_line(any, &mut connections).unwrap();
        assert_eq!(
            connections[1].local_addr,
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(connections[1].remote_addr, None);
        assert!(connections[1].remote_subnets.is_empty());
    }

    #[test]
    fn truncated_or_garbage_is_an_error_never_a_panic() {
        for text in [HEALTHY] {
            for end in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
                let prefix = &text[..end];
                let complete = prefix.contains("Bare Shunt list:");
                assert_eq!(
                    parse_status(prefix).is_ok(),
                    complete,
                    "prefix of {end} bytes"
                );
            }
        }
        // Cut lines inside an otherwise complete output.
        for cut in [
            "000 \"lab\": 10.0.2.0/24===192.0.2.1[@we",
            "000 #2: \"lab\" esp.9e9e96db@192.0.2.2 esp.cd02",
            "000 #2: \"lab\":500 STATE_V2_ESTABLISHED_CHI",
            "000 #x: \"lab\":500 STATE_V2_PARENT_I1 (sent); idle;",
            "000 \"lab",
        ] {
            let text = format!("000 Connection list:\n{cut}\n000 Bare Shunt list:\n");
            assert!(
                matches!(parse_status(&text), Err(Error::Malformed(_))),
                "{cut}"
            );
        }
        const ALPHABET: &[u8] = b"\"#:;.@[]=- 0123456789abcdefSTATE_\n\xff";
        let mut seed = 0x2545f491u32;
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..300)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    ALPHABET[seed as usize % ALPHABET.len()]
                })
                .collect();
            let garbage = String::from_utf8_lossy(&bytes);
            let _ = parse_status(&garbage);
            let _ = parse_status(&format!(
                "000 Connection list:\n{garbage}\n000 Bare Shunt list:\n"
            ));
        }
        assert!(parse_status("").is_err());
    }

    #[test]
    fn query_of_a_missing_socket_is_a_plain_error() {
        let err = query(Path::new("/nonexistent/pluto.ctl")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pluto control socket /nonexistent/pluto.ctl not found (is pluto running? see --pluto-socket)"
        );
    }

    #[test]
    fn whack_that_hangs_is_killed_and_a_stale_socket_fails_plainly() {
        if Command::new("ipsec").arg("--version").output().is_err() {
            return; // no libreswan tools on this machine
        }
        let dir = crate::pluto::tests::temp_dir("whack");
        // A listener that never answers: whack waits for its reply.
        let silent = dir.join("silent.ctl");
        let _listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
        let started = Instant::now();
        let err = query(&silent).unwrap_err();
        assert!(matches!(err, Error::WhackTimeout(_)), "{err}");
        assert!(started.elapsed() < WHACK_TIMEOUT + Duration::from_secs(2));
        // A socket file nobody listens on (pluto died).
        let stale = dir.join("stale.ctl");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let err = query(&stale).unwrap_err();
        assert!(matches!(err, Error::WhackFailed { .. }), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
