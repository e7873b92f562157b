//! Watching every pluto during a run: its status asked at the start, every
//! few seconds and at the end (states come and go with rekeys: every one
//! seen is kept), and its log followed, so the diagnosis can join what the
//! kernel did with the connection and state pluto had for it.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    Instance, LogSource,
    log::{LogEvent, LogFollower},
    status::{self, Connection, State, StateKind, Status},
};

/// How often pluto's status is asked during the run.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// Log events kept per pluto (the first ones: they name the cause).
const EVENTS_KEPT: usize = 2000;

/// What one pluto said during the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Observed {
    pub pid: u32,
    pub netns: u64,
    /// `host`, the `ip netns` name, or `netns:<inode>`: named when the report
    /// is assembled (the watch starts before the names are known).
    pub netns_label: String,
    pub ctl_socket: PathBuf,
    /// The log file, `journal`, or `unknown`.
    pub log: String,
    /// Its connections as last seen.
    pub connections: Vec<Connection>,
    /// Connections with an established Child SA when the run began.
    pub up_at_start: Vec<String>,
    /// Every IKE and Child SA state seen during the run, latest version.
    pub states: Vec<State>,
    pub events: Vec<LogEvent>,
    /// What could not be read (socket, log), one line each.
    pub problems: Vec<String>,
}

impl Observed {
    /// The connection's newest Child SA, if it is established now.
    pub fn current_child(&self, connection: &str) -> Option<&State> {
        let serial = self
            .connections
            .iter()
            .find(|c| c.name == connection)?
            .newest_child?;
        self.states
            .iter()
            .find(|s| s.serial == serial && s.kind == StateKind::Child && s.established)
    }

    /// Whether the connection has an established Child SA now.
    pub fn is_up(&self, connection: &str) -> bool {
        self.current_child(connection).is_some()
    }

    /// The connection and Child SA state that own this ESP SPI (host order).
    pub fn owner_of_spi(&self, spi: u32) -> Option<(&str, u32)> {
        self.states
            .iter()
            .find(|s| s.esp_spis.iter().any(|(s_spi, _)| *s_spi == spi))
            .map(|s| (s.connection.as_str(), s.serial))
    }

    /// The connection whose subnets are this selector (either direction).
    pub fn owner_of_selector(&self, src: &str, dst: &str) -> Option<&Connection> {
        self.connections.iter().find(|c| {
            (c.local_subnets.iter().any(|s| s == src) && c.remote_subnets.iter().any(|s| s == dst))
                || (c.local_subnets.iter().any(|s| s == dst)
                    && c.remote_subnets.iter().any(|s| s == src))
        })
    }

    /// Log events of one connection.
    pub fn events_of<'a>(&'a self, connection: &'a str) -> impl Iterator<Item = &'a LogEvent> {
        self.events
            .iter()
            .filter(move |e| e.connection.as_deref() == Some(connection))
    }

    fn absorb(&mut self, status: Status) {
        for state in status.states {
            match self.states.iter_mut().find(|s| s.serial == state.serial) {
                Some(known) => *known = state,
                None => self.states.push(state),
            }
        }
        self.connections = status.connections;
    }
}

/// The plutos being watched.
pub struct Watch {
    observed: Vec<Observed>,
    followers: Vec<Option<LogFollower>>,
    /// Per pluto: whack timed out once, so it is not asked again (each ask
    /// would stall the run, and Ctrl-C, for the whole timeout).
    hung: Vec<bool>,
    last_status: Instant,
}

impl Watch {
    /// Finds the plutos (or takes the given control sockets), asks each for
    /// its status and starts following its log. Problems are kept per
    /// pluto; none stops the run.
    pub fn start(explicit_sockets: &[PathBuf]) -> (Self, Vec<String>) {
        let mut problems = Vec::new();
        let instances = match super::discover(explicit_sockets) {
            Ok(found) => found,
            Err(e) => {
                problems.push(e.to_string());
                Vec::new()
            }
        };
        let mut watch = Self {
            observed: Vec::new(),
            followers: Vec::new(),
            hung: Vec::new(),
            last_status: Instant::now(),
        };
        for instance in instances {
            watch.add(instance);
        }
        for observed in &mut watch.observed {
            let up: Vec<String> = observed
                .connections
                .iter()
                .map(|c| c.name.clone())
                .collect();
            observed.up_at_start = up.into_iter().filter(|c| observed.is_up(c)).collect();
        }
        (watch, problems)
    }

    fn add(&mut self, instance: Instance) {
        let mut observed = Observed {
            pid: instance.pid,
            netns: instance.netns_inode,
            netns_label: String::new(),
            ctl_socket: instance.ctl_socket.clone(),
            log: match &instance.log {
                LogSource::File(path) => path.display().to_string(),
                LogSource::Journal => "journal".into(),
                LogSource::Unknown => "unknown".into(),
            },
            connections: Vec::new(),
            up_at_start: Vec::new(),
            states: Vec::new(),
            events: Vec::new(),
            problems: Vec::new(),
        };
        let mut hung = false;
        match status::query(&instance.ctl_socket) {
            Ok(status) => observed.absorb(status),
            Err(e) => {
                hung = matches!(e, super::Error::WhackTimeout(_));
                observed.problems.push(e.to_string());
            }
        }
        let follower = match LogFollower::new(&instance.log, instance.pid) {
            Ok(follower) => Some(follower),
            Err(e) => {
                observed.problems.push(e.to_string());
                None
            }
        };
        self.observed.push(observed);
        self.followers.push(follower);
        self.hung.push(hung);
    }

    /// Reads new log lines; asks for the status every few seconds.
    pub fn tick(&mut self) {
        self.read_logs();
        if self.last_status.elapsed() >= STATUS_EVERY {
            self.ask_status();
        }
    }

    fn read_logs(&mut self) {
        for (observed, follower) in self.observed.iter_mut().zip(&mut self.followers) {
            let Some(follower) = follower else { continue };
            for event in follower.poll() {
                if observed.events.len() < EVENTS_KEPT {
                    observed.events.push(event);
                }
            }
        }
    }

    fn ask_status(&mut self) {
        self.last_status = Instant::now();
        for (observed, hung) in self.observed.iter_mut().zip(&mut self.hung) {
            if *hung {
                continue;
            }
            match status::query(&observed.ctl_socket) {
                Ok(status) => observed.absorb(status),
                Err(e) => {
                    *hung = matches!(e, super::Error::WhackTimeout(_));
                    let line = e.to_string();
                    if !observed.problems.contains(&line) {
                        observed.problems.push(line);
                    }
                }
            }
        }
    }

    /// What each pluto said so far.
    pub fn observed(&self) -> Vec<Observed> {
        self.observed.clone()
    }

    /// The last status and log lines; what each pluto said.
    pub fn finish(mut self) -> Vec<Observed> {
        self.ask_status();
        self.read_logs();
        self.observed
    }
}

/// The connection and state owning an SPI written as `0x0000abcd`: the
/// pluto of `netns` first (both ends list an SA), then any other (ESP seen
/// on a router belongs to the gateways).
pub fn owner_of_spi_text<'a>(
    plutos: &'a [Observed],
    netns: u64,
    spi: &str,
) -> Option<(&'a str, u32)> {
    let spi = u32::from_str_radix(spi.strip_prefix("0x")?, 16).ok()?;
    let (here, elsewhere): (Vec<&Observed>, Vec<&Observed>) =
        plutos.iter().partition(|p| p.netns == netns);
    here.into_iter()
        .chain(elsewhere)
        .find_map(|p| p.owner_of_spi(spi))
}
