//! pluto's log lines as typed events, and a follower that yields the lines
//! logged while the tool runs (from a log file or the journal).
//!
//! Message texts are libreswan 4.10's, checked against the lab's logs
//! (/work/explore/out*, both sides, IKEv1 and IKEv2). Texts the lab did not
//! produce come from libreswan 4.10's source and say so at their rule.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{Receiver, channel},
};

use serde::{Deserialize, Serialize};

use super::{Error, LogSource, split_connection};

/// One pluto log line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEvent {
    /// The timestamp as written (`Nov 29 07:44:44.603320`); empty if none.
    pub time: String,
    /// `lab`, `vpn.example.com`, or `rw[3]` for an instance.
    pub connection: Option<String>,
    /// The state (`#N`) the line is about.
    pub serial: Option<u32>,
    pub kind: EventKind,
    /// The message after the time, connection and serial.
    pub text: String,
}

impl LogEvent {
    /// For a `TsUnacceptable` event: whether this pluto refused the peer's
    /// traffic selectors (as responder), rather than the peer ours.
    pub fn refused_here(&self) -> bool {
        self.text
            .starts_with("No IKEv2 connection found with compatible Traffic Selectors")
            || self.text.starts_with("cannot respond to IPsec SA request")
    }

    /// The selectors a peer proposed, as a responder's refusal quotes
    /// them (IKEv1: `... no connection is known for
    /// 192.168.9.0/24===192.0.2.2[@east]...192.0.2.1[@west]===10.0.2.0/24`):
    /// (for our side, for the peer's side).
    pub fn proposed_selectors(&self) -> Option<(String, String)> {
        let (_, topology) = self.text.split_once("no connection is known for ")?;
        let (ours, theirs) = topology.split_once("...")?;
        let (our_subnet, _) = ours.split_once("===")?;
        let (_, their_subnet) = theirs.rsplit_once("===")?;
        Some((our_subnet.to_string(), their_subnet.trim().to_string()))
    }
}

/// What a log line tells about the negotiation: only what the diagnosis
/// needs, `Other` for the rest. "I" = initiator, "R" = responder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// I starts an IKE SA or a Child SA (v1: Main/Aggressive/Quick Mode).
    Initiating,
    /// I sent a request again: no (acceptable) answer yet.
    Retransmit,
    /// I gave up on its first message: no answer, or none acceptable.
    NoResponseTimeout,
    /// I gave up on its first encrypted message (IKE_AUTH / Main Mode I3):
    /// often the peer could not authenticate or decrypt it.
    NoAuthResponseTimeout,
    /// IKEv1 I gave up on Quick Mode: peer refused the proposal or selectors.
    QuickModeTimeout,
    /// The IKE SA proposal (algorithms) was refused.
    IkeProposalRejected,
    /// The Child SA (ESP/AH) proposal was refused.
    ChildProposalRejected,
    /// The traffic selectors (subnets) were refused.
    TsUnacceptable,
    /// IKEv2 authentication failed (e.g. PSK mismatch).
    AuthFailed,
    /// IKEv1 hash check failed (typically a PSK mismatch).
    InvalidHash,
    /// ICMP port unreachable from the peer: no IKE daemon listens there.
    ConnectionRefused {
        peer: IpAddr,
    },
    /// Sending an IKE packet failed locally (e.g. an OUTPUT firewall rule:
    /// `Operation not permitted`); the reason is in `text`.
    SendFailed,
    IkeEstablished,
    /// A Child SA is up; SPIs (host order) as pluto printed them.
    ChildEstablished {
        outbound_spi: Option<u32>,
        inbound_spi: Option<u32>,
    },
    /// pluto deletes a state.
    Deleting,
    Other,
}

/// Parses one log line; None for blank lines and journalctl's own
/// `-- ... --` notices.
pub fn parse_line(line: &str) -> Option<LogEvent> {
    let line = line.trim_end_matches(['\n', '\r']);
    if line.trim().is_empty() || line.starts_with("-- ") {
        return None;
    }
    let (time, message) = split_time(line);
    // Seen (fwout): `ERROR: "lab" #1: send on wan0 ... failed ...`.
    let message = match message.strip_prefix("ERROR: ") {
        Some(rest) if rest.starts_with('"') => rest,
        _ => message,
    };
    let (connection, serial, text) = match split_connection(message) {
        Some((name, rest)) => {
            // rest: `: text`, ` #3: text`, or an instance's ` 192.0.2.9 #3: text`.
            let (head, text) = rest.split_once(": ").unwrap_or((rest, ""));
            let serial = head
                .split_whitespace()
                .find_map(|t| t.strip_prefix('#').and_then(|n| n.parse().ok()));
            (Some(name), serial, text)
        }
        None => (None, None, message),
    };
    Some(LogEvent {
        time: time.to_string(),
        connection,
        serial,
        kind: classify(text),
        text: text.to_string(),
    })
}

/// Splits off the timestamp: pluto's own log file writes
/// `Nov 29 07:44:44.603320: ` (day space-padded: `Dec  1`); syslog and
/// `journalctl -o short-precise` write `TIME HOST pluto[PID]: ` (not
/// captured: the lab logged to files).
fn split_time(line: &str) -> (&str, &str) {
    if let Some(at) = line.find(" pluto[")
        && !line[..at].contains('"')
        && let Some((pid, message)) = line[at + " pluto[".len()..].split_once("]: ")
        && pid.bytes().all(|b| b.is_ascii_digit())
    {
        let time = line[..at].rsplit_once(' ').map_or("", |(time, _host)| time);
        return (time, message);
    }
    if let Some((time, message)) = line.split_once(": ")
        && is_file_timestamp(time)
    {
        return (time, message);
    }
    ("", line)
}

/// `Nov 29 07:44:44.603320` or `Dec  1 07:44:44`.
fn is_file_timestamp(text: &str) -> bool {
    let fields: Vec<&str> = text.split_whitespace().collect();
    matches!(fields.as_slice(), [month, day, clock]
        if month.len() == 3 && month.bytes().all(|b| b.is_ascii_alphabetic())
            && day.len() <= 2 && day.bytes().all(|b| b.is_ascii_digit())
            && clock.len() >= 8 && clock.bytes().all(|b| b.is_ascii_digit() || b == b':' || b == b'.'))
}

/// Names the message after the connection and serial. Where a side logs the
/// reason and then the notification it sends back (`responding to ... with
/// ... notification X`), only the reason counts, so one failure is one event.
fn classify(text: &str) -> EventKind {
    let has = |fragment: &str| text.contains(fragment);
    let starts = |prefix: &str| text.starts_with(prefix);

    // I, v1+v2: `STATE_V2_PARENT_I1: 10 second timeout exceeded after 5
    // retransmits.  No response (or no acceptable response) to our first
    // IKEv2 message` (docs/pluto-log.md §1); v1 `... our first IKEv1 message`, Quick
    // Mode `STATE_QUICK_I1: ... timeout exceeded ...` and `max number of
    // retransmissions` are from the source.
    if has("timeout exceeded after") || has("max number of retransmissions") {
        return if starts("STATE_QUICK_") {
            EventKind::QuickModeTimeout
        } else if has("first encrypted message") {
            // Seen in an early lab run (docs/pluto-log.md §2): `Possible authentication
            // failure: no acceptable response to our first encrypted message`.
            EventKind::NoAuthResponseTimeout
        } else {
            EventKind::NoResponseTimeout
        };
    }
    // I, v2 `STATE_V2_PARENT_I1: retransmission; will wait 0.5 seconds for
    // response` (nopeer, fw, v2ike); v1 `STATE_QUICK_I1: ...` (v1esp).
    if has(": retransmission; will wait ") {
        return EventKind::Retransmit;
    }
    // I: `initiating IKEv2 connection`, `initiating IKEv1 Main Mode
    // connection`, `initiating Quick Mode IKEv1+PSK+...` (seen);
    // `initiating Child SA using IKE SA #1` (source).
    if starts("initiating IKEv2 connection")
        || starts("initiating IKEv1 ")
        || starts("initiating Quick Mode")
        || starts("initiating Child SA")
    {
        return EventKind::Initiating;
    }
    // R, v2: `no local proposal matches remote proposals 1:IKE:...` or
    // `1:ESP:...` (v2ike, v2esp).
    if starts("no local proposal matches remote proposals") {
        return if has(":IKE:") {
            EventKind::IkeProposalRejected
        } else {
            EventKind::ChildProposalRejected
        };
    }
    // I, v2: the responder's unauthenticated NO_PROPOSAL_CHOSEN, dropped
    // (v2ike). R, v1: `no acceptable Oakley Transform` (source).
    if starts("dropping unexpected IKE_SA_INIT message containing NO_PROPOSAL_CHOSEN")
        || starts("no acceptable Oakley Transform")
    {
        return EventKind::IkeProposalRejected;
    }
    // I, v2: `IKE_AUTH response rejected Child SA with NO_PROPOSAL_CHOSEN`
    // (v2esp), `CREATE_CHILD_SA failed with error notification
    // NO_PROPOSAL_CHOSEN` (docs/pluto-log.md §4). R, v1: `no acceptable Proposal in
    // IPsec SA` (v1esp). I, v1: `ignoring informational payload
    // NO_PROPOSAL_CHOSEN, msgid=00000000, length=12` (v1esp, Quick Mode; a
    // refused Main Mode may log the same line: its Retransmit events then
    // name STATE_MAIN_I1).
    if has("rejected Child SA with NO_PROPOSAL_CHOSEN")
        || has("CREATE_CHILD_SA failed with error notification NO_PROPOSAL_CHOSEN")
        || starts("no acceptable Proposal in IPsec SA")
        || starts("ignoring informational payload NO_PROPOSAL_CHOSEN")
    {
        return EventKind::ChildProposalRejected;
    }
    // I, v2: `IKE_AUTH response rejected Child SA with TS_UNACCEPTABLE`
    // (v2ts). R, v2: `No IKEv2 connection found with compatible Traffic
    // Selectors` (v2ts). R, v1: `cannot respond to IPsec SA request because
    // no connection is known for ...` (source); I, v1: the INVALID_ID_INFORMATION
    // it sends back, logged like the v1esp notification (inferred).
    if has("TS_UNACCEPTABLE")
        || starts("No IKEv2 connection found with compatible Traffic Selectors")
        || starts("cannot respond to IPsec SA request because no connection is known")
        || starts("ignoring informational payload INVALID_ID_INFORMATION")
    {
        return EventKind::TsUnacceptable;
    }
    // I, v2: `IKE SA authentication request rejected by peer:
    // AUTHENTICATION_FAILED` (v2psk). R, v2: `authentication failed:
    // computed hash does not match hash received from peer ID_FQDN '@west'`
    // (v2psk).
    if (has("AUTHENTICATION_FAILED") && !starts("responding to "))
        || starts("authentication failed")
    {
        return EventKind::AuthFailed;
    }
    // v1 PSK mismatch (source; the lab's v1psk run did not load its
    // connection): R `received Hash Payload does not match computed value`,
    // `probable authentication failure (mismatch of preshared secrets?):
    // malformed payload in packet`; either side: INVALID_HASH_INFORMATION.
    if (has("INVALID_HASH_INFORMATION") && !starts("sending "))
        || starts("received Hash Payload does not match computed value")
        || has("probable authentication failure (mismatch of preshared secrets?)")
    {
        return EventKind::InvalidHash;
    }
    // I: `ERROR: asynchronous network error report on wan0 (192.0.2.1:500),
    // complainant 192.0.2.2: Connection refused [errno 111, origin ICMP type
    // 3 code 3 (not authenticated)]` (nopeer).
    if has("asynchronous network error report")
        && has(": Connection refused")
        && let Some(peer) = text
            .split_once("complainant ")
            .and_then(|(_, rest)| rest.split_once(": "))
            .and_then(|(peer, _)| peer.parse().ok())
    {
        return EventKind::ConnectionRefused { peer };
    }
    // I: `send on wan0 from 192.0.2.1:500 to 192.0.2.2:500 using UDP failed
    // in STATE_V2_PARENT_I0: Operation not permitted (errno 1)` (fwout).
    if starts("send on ") && has(" failed in ") {
        return EventKind::SendFailed;
    }
    // v2 both sides: `initiator established IKE SA; authenticated peer ...`,
    // `responder established IKE SA; ...`; v1 both sides: `IKE SA
    // established {auth=PRESHARED_KEY ...}` (seen).
    if has("established IKE SA") || starts("IKE SA established {") {
        return EventKind::IkeEstablished;
    }
    // v2 both sides: `initiator established Child SA using #1; IPsec tunnel
    // [...] {ESP/ESN=>0x9e9e96db <0xcd0255de xfrm=...}` (healthy); v1: `IPsec
    // SA established tunnel mode {ESP=>0x... <0x... ...}` (source).
    if has("established Child SA") || starts("IPsec SA established") {
        return EventKind::ChildEstablished {
            outbound_spi: spi_after(text, "=>0x"),
            inbound_spi: spi_after(text, " <0x"),
        };
    }
    // Both sides: `deleting state (STATE_V2_ESTABLISHED_IKE_SA) aged 5.49s
    // and sending notification` (seen).
    if starts("deleting state (") {
        return EventKind::Deleting;
    }
    EventKind::Other
}

/// The 8 hex digits after `marker`, as pluto prints SPIs (`%08x`).
fn spi_after(text: &str, marker: &str) -> Option<u32> {
    let (_, rest) = text.split_once(marker)?;
    u32::from_str_radix(rest.get(..8)?, 16).ok()
}

/// Follows a pluto log and yields the events logged since it started.
pub struct LogFollower {
    source: Following,
}

enum Following {
    File(FileFollower),
    Journal(JournalFollower),
}

impl LogFollower {
    /// Follows `source` from now on. `pid` narrows the journal to one pluto
    /// (several plutos share the `pluto` identifier); 0 takes them all.
    pub fn new(source: &LogSource, pid: u32) -> Result<Self, Error> {
        let source = match source {
            LogSource::File(path) => Following::File(FileFollower::open(path, true)?),
            LogSource::Journal => Following::Journal(JournalFollower::spawn(pid)?),
            LogSource::Unknown => return Err(Error::LogUnknown),
        };
        Ok(Self { source })
    }

    /// Follows a log file from its first line (for tests and replays).
    pub fn from_start(path: &Path) -> Result<Self, Error> {
        Ok(Self {
            source: Following::File(FileFollower::open(path, false)?),
        })
    }

    /// The events of the complete lines logged since the last poll.
    pub fn poll(&mut self) -> Vec<LogEvent> {
        match &mut self.source {
            Following::File(file) => file.poll(),
            Following::Journal(journal) => journal.lines.try_iter().collect(),
        }
    }
}

/// Reads new lines of a file; reopens it when rotated or truncated.
struct FileFollower {
    path: PathBuf,
    file: File,
    inode: u64,
    offset: u64,
    /// The start of a line whose newline is not written yet.
    partial: Vec<u8>,
}

impl FileFollower {
    fn open(path: &Path, at_end: bool) -> Result<Self, Error> {
        let mut file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::LogNotFound(path.to_path_buf()),
            _ => Error::io(path, e),
        })?;
        let inode = file.metadata().map_err(|e| Error::io(path, e))?.ino();
        let offset = if at_end {
            file.seek(SeekFrom::End(0))
                .map_err(|e| Error::io(path, e))?
        } else {
            0
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            inode,
            offset,
            partial: Vec::new(),
        })
    }

    fn poll(&mut self) -> Vec<LogEvent> {
        let mut events = self.read_new_lines();
        match std::fs::metadata(&self.path) {
            // Rotated: what the old file got last was read above; the new
            // file is read from its start.
            Ok(meta) if meta.ino() != self.inode => {
                if let Ok(reopened) = Self::open(&self.path, false) {
                    *self = reopened;
                    events.extend(self.read_new_lines());
                }
            }
            // Truncated in place (`> pluto.log`, copytruncate).
            Ok(meta) if meta.len() < self.offset => {
                self.offset = 0;
                self.partial.clear();
                events.extend(self.read_new_lines());
            }
            // Unchanged, or gone until the new file appears.
            _ => {}
        }
        events
    }

    fn read_new_lines(&mut self) -> Vec<LogEvent> {
        let mut bytes = Vec::new();
        let read = self
            .file
            .seek(SeekFrom::Start(self.offset))
            .and_then(|_| self.file.read_to_end(&mut bytes));
        if let Err(e) = read {
            log::debug!("reading {}: {e}", self.path.display());
            return Vec::new();
        }
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.partial.drain(..=last_newline).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .filter_map(parse_line)
            .collect()
    }
}

/// `journalctl --follow` on a background thread.
struct JournalFollower {
    child: Child,
    lines: Receiver<LogEvent>,
}

impl JournalFollower {
    fn spawn(pid: u32) -> Result<Self, Error> {
        let mut command = Command::new("journalctl");
        // short-precise keeps the time (`Nov 29 07:45:01.123456 host
        // pluto[123]: ...`); --identifier is -t, pluto's syslog ident.
        command.args([
            "--follow",
            "--no-pager",
            "--quiet",
            "--output=short-precise",
            "--since=now",
            "--identifier=pluto",
        ]);
        if pid != 0 {
            command.arg(format!("_PID={pid}"));
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::JournalctlMissing,
                _ => Error::io(Path::new("journalctl"), e),
            })?;
        let stdout = child.stdout.take().expect("piped");
        let (sender, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(event) = parse_line(&line)
                    && sender.send(event).is_err()
                {
                    break;
                }
            }
        });
        Ok(Self { child, lines })
    }
}

impl Drop for JournalFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(line: &str) -> EventKind {
        parse_line(line).unwrap().kind
    }

    #[test]
    fn prefix_connection_and_serial() {
        let event = parse_line(
            "Nov 29 07:44:44.603320: \"lab\" #1: proposal 1:IKE=AES_GCM_C_256-HMAC_SHA2_256-ECP_256 chosen from remote proposals 1:IKE:ENCR=AES_GCM_C_256;PRF=HMAC_SHA2_256;DH=ECP_256[first-match]",
        )
        .unwrap();
        assert_eq!(event.time, "Nov 29 07:44:44.603320");
        assert_eq!(event.connection.as_deref(), Some("lab"));
        assert_eq!(event.serial, Some(1));
        assert!(event.text.starts_with("proposal 1:IKE=AES_GCM_C_256"));
        assert_eq!(event.kind, EventKind::Other);

        let event = parse_line("Nov 29 07:44:40.622148: \"lab\": added IKEv2 connection").unwrap();
        assert_eq!(
            (event.connection.as_deref(), event.serial),
            (Some("lab"), None)
        );
        assert_eq!(event.text, "added IKEv2 connection");

        let event = parse_line("Nov 29 07:44:49.907463: Pluto is shutting down\n").unwrap();
        assert_eq!((event.connection, event.serial), (None, None));
        assert_eq!(event.text, "Pluto is shutting down");

        // Not captured: `%e` pads the day with a space.
        assert_eq!(
            parse_line("Dec  1 07:44:49.907463: Pluto is shutting down")
                .unwrap()
                .time,
            "Dec  1 07:44:49.907463"
        );
        assert_eq!(parse_line(""), None);
        assert_eq!(parse_line("-- No entries --"), None);
    }

    #[test]
    fn syslog_prefix_names_and_instances() {
        // Not captured (the lab logs to files): syslog / journalctl
        // short-precise prefix, a dotted name, an instance with its peer.
        let event = parse_line(
            "Nov 29 07:45:01.408411 gw pluto[240]: \"vpn.example.com\" #1: initiating IKEv2 connection",
        )
        .unwrap();
        assert_eq!(event.time, "Nov 29 07:45:01.408411");
        assert_eq!(event.connection.as_deref(), Some("vpn.example.com"));
        assert_eq!((event.serial, event.kind), (Some(1), EventKind::Initiating));

        let event = parse_line("Nov 29 07:45:01 gw pluto[240]: \"road warrior-1\"[3] 198.51.100.7 #12: deleting state (STATE_V2_ESTABLISHED_IKE_SA) aged 5.4s and sending notification").unwrap();
        assert_eq!(event.connection.as_deref(), Some("road warrior-1[3]"));
        assert_eq!((event.serial, event.kind), (Some(12), EventKind::Deleting));

        let event = parse_line(
            "Nov 29 07:45:01 gw pluto[240]: \"rw\"[3] 2001:db8::7 #4: initiating IKEv2 connection",
        )
        .unwrap();
        assert_eq!(
            (event.connection.as_deref(), event.serial),
            (Some("rw[3]"), Some(4))
        );
        assert_eq!(event.text, "initiating IKEv2 connection");
    }

    #[test]
    fn initiating() {
        // v2 I (healthy), v1 I Main and Quick Mode (v1esp).
        for line in [
            "Nov 29 07:44:44.428773: \"lab\" #1: initiating IKEv2 connection",
            "Nov 29 07:49:00.943613: \"lab\" #1: initiating IKEv1 Main Mode connection",
            "Nov 29 07:49:01.610701: \"lab\" #2: initiating Quick Mode IKEv1+PSK+ENCRYPT+TUNNEL+PFS+UP+IKE_FRAG_ALLOW+ESN_NO+ESN_YES {using isakmp#1 msgid:bbcd2b28 proposal=AES_CBC_128-HMAC_SHA1_96 pfsgroup=MODP2048}",
        ] {
            assert_eq!(kind(line), EventKind::Initiating, "{line}");
        }
        // Not the start of a negotiation.
        assert_eq!(
            kind("Nov 29 07:45:19.331608: initiating all conns with alias='lab'"),
            EventKind::Other
        );
    }

    #[test]
    fn retransmit() {
        // v2 I (fw), v1 I Quick Mode (v1esp).
        for line in [
            "Nov 29 07:50:43.400957: \"lab\" #1: STATE_V2_PARENT_I1: retransmission; will wait 0.5 seconds for response",
            "Nov 29 07:49:02.148868: \"lab\" #2: STATE_QUICK_I1: retransmission; will wait 0.5 seconds for response",
        ] {
            assert_eq!(kind(line), EventKind::Retransmit, "{line}");
        }
    }

    #[test]
    fn timeouts() {
        // v2 I (docs/pluto-log.md §1, whack's copy of the log line).
        let v2 = "\"lab\" #1: STATE_V2_PARENT_I1: 10 second timeout exceeded after 5 retransmits.  No response (or no acceptable response) to our first IKEv2 message";
        assert_eq!(kind(v2), EventKind::NoResponseTimeout);
        // v2 I (docs/pluto-log.md §2).
        let auth = "\"lab\" #1: STATE_V2_PARENT_I2: 10 second timeout exceeded after 5 retransmits.  Possible authentication failure: no acceptable response to our first encrypted message";
        assert_eq!(kind(auth), EventKind::NoAuthResponseTimeout);
        // v1 I, texts from libreswan 4.10's retransmit.c (not captured).
        let v1 = "\"lab\" #1: STATE_MAIN_I1: 10 second timeout exceeded after 5 retransmits.  No response (or no acceptable response) to our first IKEv1 message";
        assert_eq!(kind(v1), EventKind::NoResponseTimeout);
        let quick = "\"lab\" #2: STATE_QUICK_I1: 10 second timeout exceeded after 5 retransmits.  No acceptable response to our first Quick Mode message: perhaps peer likes no proposal";
        assert_eq!(kind(quick), EventKind::QuickModeTimeout);
    }

    #[test]
    fn ike_proposal_rejected() {
        // v2 I and R (v2ike); v1 R from the source.
        for line in [
            "Nov 29 07:50:06.091271: \"lab\" #1: dropping unexpected IKE_SA_INIT message containing NO_PROPOSAL_CHOSEN notification; message payloads: N; missing payloads: SA,KE,Ni",
            "Nov 29 07:50:06.065450: \"lab\" #1: no local proposal matches remote proposals 1:IKE:ENCR=AES_GCM_C_256;PRF=HMAC_SHA2_256;DH=ECP_256",
            "\"lab\" #1: no acceptable Oakley Transform",
        ] {
            assert_eq!(kind(line), EventKind::IkeProposalRejected, "{line}");
        }
        // R's echo of the reason is not a second event.
        let echo = "Nov 29 07:50:06.071292: \"lab\" #1: responding to IKE_SA_INIT message (ID 0) from 192.0.2.1:500 with unencrypted notification NO_PROPOSAL_CHOSEN";
        assert_eq!(kind(echo), EventKind::Other);
    }

    #[test]
    fn child_proposal_rejected() {
        // v2 I and R (v2esp), v2 I CREATE_CHILD_SA (docs/pluto-log.md §4), v1 R and I (v1esp).
        for line in [
            "Nov 29 07:46:15.731668: \"lab\" #2: IKE_AUTH response rejected Child SA with NO_PROPOSAL_CHOSEN",
            "Nov 29 07:46:15.709132: \"lab\" #2: no local proposal matches remote proposals 1:ESP:ENCR=AES_GCM_C_128;ESN=ENABLED;ESN=DISABLED",
            "\"lab\" #3: CREATE_CHILD_SA failed with error notification NO_PROPOSAL_CHOSEN",
            "Nov 29 07:49:01.677169: \"lab\" #2: no acceptable Proposal in IPsec SA",
            "Nov 29 07:49:01.690463: \"lab\" #1: ignoring informational payload NO_PROPOSAL_CHOSEN, msgid=00000000, length=12",
        ] {
            assert_eq!(kind(line), EventKind::ChildProposalRejected, "{line}");
        }
        for echo in [
            "Nov 29 07:46:15.710957: \"lab\" #2: IKE_AUTH responder matching remote ESP/AH proposals failed, responder SA processing returned NO_PROPOSAL_CHOSEN",
            "Nov 29 07:49:01.681854: \"lab\" #2: sending encrypted notification NO_PROPOSAL_CHOSEN to 192.0.2.1:500",
            "Nov 29 07:49:01.690918: \"lab\" #1: received and ignored notification payload: NO_PROPOSAL_CHOSEN",
        ] {
            assert_eq!(kind(echo), EventKind::Other, "{echo}");
        }
    }

    #[test]
    fn ts_unacceptable() {
        // v2 I and R (v2ts); v1 R from the source.
        for line in [
            "Nov 29 07:49:49.276933: \"lab\" #2: IKE_AUTH response rejected Child SA with TS_UNACCEPTABLE",
            "Nov 29 07:49:49.257225: \"lab\" #2: No IKEv2 connection found with compatible Traffic Selectors",
            "\"lab\" #1: cannot respond to IPsec SA request because no connection is known for 192.168.9.0/24===192.0.2.2[@east]...192.0.2.1[@west]===10.0.2.0/24",
        ] {
            assert_eq!(kind(line), EventKind::TsUnacceptable, "{line}");
        }
    }

    #[test]
    fn auth_failed() {
        // v2 I and R (v2psk).
        for line in [
            "Nov 29 07:49:32.170524: \"lab\" #1: IKE SA authentication request rejected by peer: AUTHENTICATION_FAILED",
            "Nov 29 07:49:32.150575: \"lab\" #1: authentication failed: computed hash does not match hash received from peer ID_FQDN '@west'",
        ] {
            assert_eq!(kind(line), EventKind::AuthFailed, "{line}");
        }
        let echo = "Nov 29 07:49:32.152967: \"lab\" #1: responding to IKE_AUTH message (ID 1) from 192.0.2.1:500 with encrypted notification AUTHENTICATION_FAILED";
        assert_eq!(kind(echo), EventKind::Other);
    }

    #[test]
    fn invalid_hash() {
        // v1, texts from libreswan 4.10's ikev1*.c (not captured).
        for line in [
            "\"lab\" #1: received Hash Payload does not match computed value",
            "\"lab\" #1: probable authentication failure (mismatch of preshared secrets?): malformed payload in packet",
            "\"lab\" #1: ignoring informational payload INVALID_HASH_INFORMATION, msgid=00000000, length=12",
        ] {
            assert_eq!(kind(line), EventKind::InvalidHash, "{line}");
        }
    }

    #[test]
    fn connection_refused_and_send_failed() {
        // v2 I (nopeer, fwout).
        let refused = "Nov 29 07:45:01.408411: \"lab\" #1: ERROR: asynchronous network error report on wan0 (192.0.2.1:500), complainant 192.0.2.2: Connection refused [errno 111, origin ICMP type 3 code 3 (not authenticated)]";
        assert_eq!(
            kind(refused),
            EventKind::ConnectionRefused {
                peer: "192.0.2.2".parse().unwrap()
            }
        );
        let send = parse_line("Nov 29 07:51:13.326598: ERROR: \"lab\" #1: send on wan0 from 192.0.2.1:500 to 192.0.2.2:500 using UDP failed in STATE_V2_PARENT_I0: Operation not permitted (errno 1)").unwrap();
        assert_eq!(
            (send.connection.as_deref(), send.serial),
            (Some("lab"), Some(1))
        );
        assert_eq!(send.kind, EventKind::SendFailed);
        assert!(send.text.ends_with("Operation not permitted (errno 1)"));
    }

    #[test]
    fn established() {
        // v2 I and R (healthy), v1 I and R (v1esp).
        for line in [
            "Nov 29 07:44:44.911116: \"lab\" #1: initiator established IKE SA; authenticated peer using authby=secret and ID_FQDN '@east'",
            "Nov 29 07:44:44.794800: \"lab\" #1: responder established IKE SA; authenticated peer using authby=secret and ID_FQDN '@west'",
            "Nov 29 07:49:01.603479: \"lab\" #1: IKE SA established {auth=PRESHARED_KEY cipher=AES_CBC_256 integ=HMAC_SHA2_256 group=MODP2048}",
            "Nov 29 07:49:01.578505: \"lab\" #1: IKE SA established {auth=PRESHARED_KEY cipher=AES_CBC_256 integ=HMAC_SHA2_256 group=MODP2048}",
        ] {
            assert_eq!(kind(line), EventKind::IkeEstablished, "{line}");
        }
        let west = "Nov 29 07:44:44.944183: \"lab\" #2: initiator established Child SA using #1; IPsec tunnel [10.0.2.0-10.0.2.255:0-65535 0] -> [192.168.0.0-192.168.255.255:0-65535 0] {ESP/ESN=>0x9e9e96db <0xcd0255de xfrm=AES_GCM_16_128-NONE DPD=passive}";
        let east = "Nov 29 07:44:44.878995: \"lab\" #2: responder established Child SA using #1; IPsec tunnel [192.168.0.0-192.168.255.255:0-65535 0] -> [10.0.2.0-10.0.2.255:0-65535 0] {ESP/ESN=>0xcd0255de <0x9e9e96db xfrm=AES_GCM_16_128-NONE DPD=passive}";
        assert_eq!(
            kind(west),
            EventKind::ChildEstablished {
                outbound_spi: Some(0x9e9e96db),
                inbound_spi: Some(0xcd0255de)
            }
        );
        assert_eq!(
            kind(east),
            EventKind::ChildEstablished {
                outbound_spi: Some(0xcd0255de),
                inbound_spi: Some(0x9e9e96db)
            }
        );
        // v1, shape from libreswan 4.10's ipsec_doi.c (not captured).
        let v1 = "\"lab\" #2: IPsec SA established tunnel mode {ESP=>0x11223344 <0x55667788 xfrm=AES_CBC_128-HMAC_SHA1_96 DPD=passive}";
        assert_eq!(
            kind(v1),
            EventKind::ChildEstablished {
                outbound_spi: Some(0x11223344),
                inbound_spi: Some(0x55667788)
            }
        );
    }

    #[test]
    fn deleting() {
        // I (healthy west) and R (healthy east), v1 (v1esp).
        for line in [
            "Nov 29 07:44:49.914640: \"lab\" #1: deleting state (STATE_V2_ESTABLISHED_IKE_SA) aged 5.494029s and sending notification",
            "Nov 29 07:44:49.939130: \"lab\" #1: deleting state (STATE_V2_ESTABLISHED_IKE_SA) aged 5.341857s and NOT sending notification",
            "Nov 29 07:49:14.530243: \"lab\" #2: deleting state (STATE_QUICK_I1) aged 12.923706s and NOT sending notification",
        ] {
            assert_eq!(kind(line), EventKind::Deleting, "{line}");
        }
    }

    #[test]
    fn whole_real_logs_classify() {
        // Every line of two real logs parses; the interesting ones in order.
        let west = include_str!("testdata/nopeer-west.log");
        let kinds: Vec<EventKind> = west
            .lines()
            .filter_map(parse_line)
            .map(|e| e.kind)
            .filter(|k| *k != EventKind::Other)
            .collect();
        let refused = EventKind::ConnectionRefused {
            peer: "192.0.2.2".parse().unwrap(),
        };
        let retransmit_refused = [EventKind::Retransmit, refused.clone()];
        let mut expected = vec![EventKind::Initiating, refused.clone()];
        for _ in 0..4 {
            expected.extend(retransmit_refused.clone());
        }
        expected.push(EventKind::Deleting);
        assert_eq!(kinds, expected);
    }

    // ---- follower ----

    fn temp_log(tag: &str) -> PathBuf {
        super::super::tests::temp_dir(tag).join("pluto.log")
    }

    fn append(path: &Path, text: &str) {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        file.write_all(text.as_bytes()).unwrap();
    }

    const INIT: &str = "Nov 29 07:44:44.428773: \"lab\" #1: initiating IKEv2 connection\n";
    const UP: &str = "Nov 29 07:44:44.911116: \"lab\" #1: initiator established IKE SA; authenticated peer using authby=secret and ID_FQDN '@east'\n";
    const DOWN: &str = "Nov 29 07:49:14.530243: \"lab\" #2: deleting state (STATE_QUICK_I1) aged 12.923706s and NOT sending notification\n";

    fn kinds(events: Vec<LogEvent>) -> Vec<EventKind> {
        events.into_iter().map(|e| e.kind).collect()
    }

    #[test]
    fn follower_partial_lines_and_truncation() {
        let path = temp_log("follow");
        append(&path, INIT);
        let mut follower = LogFollower::from_start(&path).unwrap();
        assert_eq!(kinds(follower.poll()), vec![EventKind::Initiating]);
        assert!(follower.poll().is_empty());

        let (head, tail) = UP.split_at(40);
        append(&path, head);
        assert!(follower.poll().is_empty(), "a partial line waits");
        append(&path, tail);
        assert_eq!(kinds(follower.poll()), vec![EventKind::IkeEstablished]);

        std::fs::write(&path, "").unwrap();
        append(&path, DOWN);
        assert_eq!(
            kinds(follower.poll()),
            vec![EventKind::Deleting],
            "truncated: read from the start"
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn follower_starts_at_the_end_and_survives_rotation() {
        let path = temp_log("rotate");
        append(&path, INIT);
        let mut follower = LogFollower::new(&LogSource::File(path.clone()), 0).unwrap();
        assert!(
            follower.poll().is_empty(),
            "lines before the run are skipped"
        );
        append(&path, UP);
        // Rotation: the old file gets one more line, a new file appears.
        let rotated = path.with_extension("log.1");
        std::fs::rename(&path, &rotated).unwrap();
        append(&rotated, DOWN);
        append(&path, INIT);
        assert_eq!(
            kinds(follower.poll()),
            vec![
                EventKind::IkeEstablished,
                EventKind::Deleting,
                EventKind::Initiating
            ]
        );
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn follower_errors_are_values() {
        let missing = Path::new("/nonexistent/pluto.log");
        let err = LogFollower::new(&LogSource::File(missing.into()), 0)
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "pluto log file /nonexistent/pluto.log not found"
        );
        assert!(matches!(
            LogFollower::new(&LogSource::Unknown, 0),
            Err(Error::LogUnknown)
        ));
    }
}
