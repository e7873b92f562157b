//! libreswan's IKE daemon, pluto: finding the running instances, asking them
//! for their status over the control socket (`status`), and following their
//! logs as typed events (`log`).
//!
//! Secrets stay out: nothing here reads `ipsec.secrets` (pluto's
//! `--secretsfile` argument is ignored), and of `ipsec.conf` only the
//! `logfile=` value is kept. whack status and pluto logs carry no keys.

pub mod log;
pub mod session;
pub mod status;

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// pluto's defaults when its command line does not say otherwise.
const DEFAULT_RUNDIR: &str = "/run/pluto";
const DEFAULT_CONFIG: &str = "/etc/ipsec.conf";
const CTL_SOCKET_NAME: &str = "pluto.ctl";

/// One running pluto (or a control socket given by the user).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// 0 when the socket was given explicitly and no running pluto owns it.
    pub pid: u32,
    /// Inode of the pluto's network namespace; 0 when unknown (pid 0).
    pub netns_inode: u64,
    pub ctl_socket: PathBuf,
    pub log: LogSource,
}

/// Where a pluto writes its log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogSource {
    /// `--logfile` or `logfile=` in `config setup`.
    File(PathBuf),
    /// No log file configured: pluto logs to syslog, i.e. the journal.
    Journal,
    /// A socket given explicitly that no running pluto owns.
    Unknown,
}

/// Why pluto could not be found, asked or followed; each prints as one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pluto control socket {0} not found (is pluto running? see --pluto-socket)")]
    SocketNotFound(PathBuf),
    #[error("{0} is not a socket (pluto's control socket is, e.g. /run/pluto/pluto.ctl)")]
    NotASocket(PathBuf),
    #[error("permission denied on {0} (run as root)")]
    PermissionDenied(PathBuf),
    #[error("`ipsec` not found in PATH: install libreswan's tools to ask pluto for its status")]
    WhackMissing,
    #[error("`ipsec whack --status` on {0} did not answer within 5 s")]
    WhackTimeout(PathBuf),
    #[error("`ipsec whack --status` on {socket} failed: {reason}")]
    WhackFailed { socket: PathBuf, reason: String },
    #[error("unreadable pluto status: {0}")]
    Malformed(String),
    #[error("pluto log file {0} not found")]
    LogNotFound(PathBuf),
    #[error("journalctl not found: cannot follow pluto's log in the journal")]
    JournalctlMissing,
    #[error("pluto's log destination is unknown (socket given without a running pluto)")]
    LogUnknown,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// Maps an I/O error on `path` to the plain variants when one fits.
    fn io(path: &Path, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied(path.to_path_buf()),
            _ => Error::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// Every running pluto; with `explicit_sockets`, only those sockets (matched
/// to their pluto when one runs, else with pid 0 and an unknown log).
pub fn discover(explicit_sockets: &[PathBuf]) -> Result<Vec<Instance>, Error> {
    discover_in(Path::new("/proc"), explicit_sockets)
}

/// `discover` over a given proc root, so tests can use a fake one.
fn discover_in(proc_root: &Path, explicit_sockets: &[PathBuf]) -> Result<Vec<Instance>, Error> {
    let running = scan_proc(proc_root)?;
    if explicit_sockets.is_empty() {
        return Ok(running);
    }
    explicit_sockets
        .iter()
        .map(|socket| {
            check_socket(socket)?;
            let owner = running
                .iter()
                .find(|i| same_file(&i.ctl_socket, socket))
                .cloned();
            Ok(owner.unwrap_or_else(|| Instance {
                pid: 0,
                netns_inode: 0,
                ctl_socket: socket.clone(),
                log: LogSource::Unknown,
            }))
        })
        .collect()
}

/// Fails plainly when `socket` is missing, not a socket, or we may not
/// connect to it.
pub(crate) fn check_socket(socket: &Path) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::metadata(socket) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::SocketNotFound(socket.to_path_buf()));
        }
        Err(e) => return Err(Error::io(socket, e)),
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(Error::NotASocket(socket.to_path_buf()));
        }
        Ok(_) => {}
    }
    // connect(2) on a unix socket needs write permission on it.
    nix::unistd::access(socket, nix::unistd::AccessFlags::W_OK)
        .map_err(|errno| Error::io(socket, errno.into()))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The plutos in `proc_root`. Processes that exit mid-scan are skipped; a
/// pluto we may not inspect (not root) is an error.
fn scan_proc(proc_root: &Path) -> Result<Vec<Instance>, Error> {
    let entries = std::fs::read_dir(proc_root).map_err(|e| Error::io(proc_root, e))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let is_pluto = std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "pluto");
        if !is_pluto {
            continue;
        }
        match instance_of(pid, &dir) {
            Ok(instance) => found.push(instance),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    found.sort_by_key(|i| i.pid);
    Ok(found)
}

fn instance_of(pid: u32, proc_dir: &Path) -> Result<Instance, Error> {
    let cmdline_path = proc_dir.join("cmdline");
    let cmdline = std::fs::read(&cmdline_path).map_err(|e| Error::io(&cmdline_path, e))?;
    let args = PlutoArgs::parse(&cmdline);
    let netns_path = proc_dir.join("ns/net");
    let netns_inode = std::fs::metadata(&netns_path)
        .map_err(|e| Error::io(&netns_path, e))?
        .ino();
    let ctl_socket = args.ctl_socket.unwrap_or_else(|| {
        args.rundir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUNDIR))
            .join(CTL_SOCKET_NAME)
    });
    let log = match args.logfile {
        Some(file) => LogSource::File(file),
        None => {
            // Read the config as pluto sees it: `ip netns exec` may have
            // bind-mounted /etc/netns/NAME/ipsec.conf over /etc/ipsec.conf.
            let config = args.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            let seen_by_pluto = proc_dir
                .join("root")
                .join(config.strip_prefix("/").unwrap_or(&config));
            std::fs::read_to_string(seen_by_pluto)
                .ok()
                .and_then(|text| logfile_from_config(&text))
                .map_or(LogSource::Journal, LogSource::File)
        }
    };
    Ok(Instance {
        pid,
        netns_inode,
        ctl_socket,
        log,
    })
}

/// The few pluto options that say where its socket, log and config are.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PlutoArgs {
    rundir: Option<PathBuf>,
    ctl_socket: Option<PathBuf>,
    logfile: Option<PathBuf>,
    config: Option<PathBuf>,
}

impl PlutoArgs {
    /// Parses a NUL-separated `/proc/PID/cmdline`. pluto uses getopt_long,
    /// so both `--opt value` and `--opt=value` are accepted.
    pub fn parse(cmdline: &[u8]) -> Self {
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let mut parsed = PlutoArgs::default();
        let mut i = 1; // skip argv[0]
        while i < args.len() {
            let (option, inline_value) = match args[i].split_once('=') {
                Some((o, v)) => (o, Some(v.to_string())),
                None => (args[i].as_str(), None),
            };
            let slot = match option {
                "--rundir" => &mut parsed.rundir,
                "--ctlsocket" => &mut parsed.ctl_socket,
                "--logfile" => &mut parsed.logfile,
                "--config" => &mut parsed.config,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let value = match inline_value {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i).cloned().unwrap_or_default()
                }
            };
            if !value.is_empty() {
                *slot = Some(PathBuf::from(value));
            }
            i += 1;
        }
        parsed
    }
}

/// `logfile=` of the `config setup` section of an ipsec.conf, if any.
/// Sections start at column 0; their settings are indented. `include`
/// directives are not followed.
pub fn logfile_from_config(text: &str) -> Option<PathBuf> {
    let mut in_setup = false;
    let mut logfile = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if !line.starts_with([' ', '\t']) {
            in_setup = trimmed.split_whitespace().eq(["config", "setup"]);
            continue;
        }
        if !in_setup {
            continue;
        }
        if let Some((key, value)) = trimmed.split_once('=')
            && key.trim() == "logfile"
        {
            let value = value
                .split('#')
                .next()
                .unwrap_or("")
                .trim()
                .trim_matches('"');
            logfile = (!value.is_empty()).then(|| PathBuf::from(value));
        }
    }
    logfile
}

/// Splits `"name"[N]rest` (as pluto prints a connection in logs and status)
/// into `name[N]` and `rest`. Names may hold spaces, dots and dashes but no
/// quote. The `[N]` of an instance was not captured (libreswan 4.10's
/// jam_connection); what follows it (the peer address) stays in `rest`.
pub(crate) fn split_connection(text: &str) -> Option<(String, &str)> {
    let quoted = text.strip_prefix('"')?;
    let (base, mut rest) = quoted.split_once('"')?;
    let mut name = base.to_string();
    if let Some(instance) = rest.strip_prefix('[') {
        let (number, after) = instance.split_once(']')?;
        name.push('[');
        name.push_str(number);
        name.push(']');
        rest = after;
    }
    Some((name, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh empty directory under the system temp dir.
    pub(crate) fn temp_dir(tag: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xfrm-trace-pluto-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn cmdline(args: &[&str]) -> Vec<u8> {
        let mut raw = args.join("\0").into_bytes();
        raw.push(0);
        raw
    }

    // The lab's pluto, from `ps` in /work/explore/out/log.
    const LAB_ARGS: &[&str] = &[
        "/usr/libexec/ipsec/pluto",
        "--config",
        "/run/xl/west/ipsec.conf",
        "--rundir",
        "/run/xl/west/run",
        "--nssdir",
        "/run/xl/west/nss",
        "--secretsfile",
        "/run/xl/west/ipsec.secrets",
        "--ipsecdir",
        "/run/xl/west",
        "--logfile",
        "/run/xl/west/pluto.log",
        "--nofork",
    ];

    #[test]
    fn cmdline_of_the_lab_pluto() {
        let args = PlutoArgs::parse(&cmdline(LAB_ARGS));
        assert_eq!(
            args,
            PlutoArgs {
                rundir: Some("/run/xl/west/run".into()),
                ctl_socket: None,
                logfile: Some("/run/xl/west/pluto.log".into()),
                config: Some("/run/xl/west/ipsec.conf".into()),
            }
        );
    }

    #[test]
    fn cmdline_with_equals_and_ctlsocket() {
        let args = PlutoArgs::parse(&cmdline(&[
            "pluto",
            "--ctlsocket=/run/a.ctl",
            "--leak-detective",
            "--config",
        ]));
        assert_eq!(args.ctl_socket, Some("/run/a.ctl".into()));
        assert_eq!(
            args.config, None,
            "a trailing option without value is ignored"
        );
        // The packaged service's command line: everything defaults.
        let args = PlutoArgs::parse(&cmdline(&[
            "/usr/libexec/ipsec/pluto",
            "--leak-detective",
            "--config",
            "/etc/ipsec.conf",
            "--nofork",
        ]));
        assert_eq!(args.rundir, None);
        assert_eq!(args.logfile, None);
    }

    #[test]
    fn logfile_only_from_config_setup() {
        // The lab's ipsec.conf (/work/explore/pluto.sh), plus a conn that
        // sets logfile (not a valid conn key; must not be taken).
        let conf = "config setup\n\tlogfile=/run/xl/west/pluto.log\n\tlogappend=yes\n\tplutodebug=none\n\n\
                    conn lab\n\tauthby=secret\n\tlogfile=/wrong\n";
        assert_eq!(
            logfile_from_config(conf),
            Some("/run/xl/west/pluto.log".into())
        );
        let quoted = "# comment\nconfig setup\n    logfile=\"/var/log/pluto.log\"  # here\n";
        assert_eq!(
            logfile_from_config(quoted),
            Some("/var/log/pluto.log".into())
        );
        let none = "config setup\n\tplutodebug=none\nconn x\n\tleft=1.2.3.4\n";
        assert_eq!(logfile_from_config(none), None);
        assert_eq!(logfile_from_config("config setup\n\tlogfile=\n"), None);
    }

    /// Builds a fake /proc with one pluto (pid 226) and one other process.
    fn fake_proc(pluto_args: &[&str], config: Option<(&str, &str)>) -> PathBuf {
        let proc_root = temp_dir("proc");
        let pluto = proc_root.join("226");
        std::fs::create_dir_all(pluto.join("ns")).unwrap();
        std::fs::write(pluto.join("comm"), "pluto\n").unwrap();
        std::fs::write(pluto.join("cmdline"), cmdline(pluto_args)).unwrap();
        std::fs::write(pluto.join("ns/net"), "").unwrap();
        if let Some((path, text)) = config {
            let in_root = pluto.join("root").join(path.trim_start_matches('/'));
            std::fs::create_dir_all(in_root.parent().unwrap()).unwrap();
            std::fs::write(in_root, text).unwrap();
        }
        let other = proc_root.join("158");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("comm"), "sh\n").unwrap();
        std::fs::create_dir_all(proc_root.join("self")).unwrap();
        proc_root
    }

    #[test]
    fn discovers_the_lab_pluto() {
        let proc_root = fake_proc(LAB_ARGS, None);
        let found = discover_in(&proc_root, &[]).unwrap();
        let netns_inode = std::fs::metadata(proc_root.join("226/ns/net"))
            .unwrap()
            .ino();
        assert_eq!(
            found,
            vec![Instance {
                pid: 226,
                netns_inode,
                ctl_socket: "/run/xl/west/run/pluto.ctl".into(),
                log: LogSource::File("/run/xl/west/pluto.log".into()),
            }]
        );
        std::fs::remove_dir_all(proc_root).unwrap();
    }

    #[test]
    fn defaults_config_logfile_and_journal() {
        let service = &["/usr/libexec/ipsec/pluto", "--leak-detective", "--nofork"];
        let proc_root = fake_proc(service, None);
        let found = discover_in(&proc_root, &[]).unwrap();
        assert_eq!(found[0].ctl_socket, PathBuf::from("/run/pluto/pluto.ctl"));
        assert_eq!(found[0].log, LogSource::Journal);
        std::fs::remove_dir_all(proc_root).unwrap();

        let conf = "config setup\n\tlogfile=/var/log/pluto.log\n";
        let proc_root = fake_proc(service, Some(("/etc/ipsec.conf", conf)));
        let found = discover_in(&proc_root, &[]).unwrap();
        assert_eq!(found[0].log, LogSource::File("/var/log/pluto.log".into()));
        std::fs::remove_dir_all(proc_root).unwrap();
    }

    #[test]
    fn explicit_sockets() {
        let dir = temp_dir("sock");
        let socket = dir.join("pluto.ctl");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let socket_str = socket.to_str().unwrap();
        let proc_root = fake_proc(
            &["pluto", "--ctlsocket", socket_str, "--logfile", "/l"],
            None,
        );

        let found = discover_in(&proc_root, std::slice::from_ref(&socket)).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pid, 226);
        assert_eq!(found[0].log, LogSource::File("/l".into()));

        let other = dir.join("other.ctl");
        let _other_listener = std::os::unix::net::UnixListener::bind(&other).unwrap();
        let found = discover_in(&proc_root, std::slice::from_ref(&other)).unwrap();
        assert_eq!(
            found,
            vec![Instance {
                pid: 0,
                netns_inode: 0,
                ctl_socket: other,
                log: LogSource::Unknown,
            }]
        );

        let not_a_socket = dir.join("file.ctl");
        std::fs::write(&not_a_socket, "").unwrap();
        let err = discover_in(&proc_root, std::slice::from_ref(&not_a_socket)).unwrap_err();
        assert!(matches!(err, Error::NotASocket(_)), "{err}");

        let missing = dir.join("missing.ctl");
        let err = discover_in(&proc_root, &[missing]).unwrap_err();
        assert!(matches!(err, Error::SocketNotFound(_)), "{err}");
        assert!(err.to_string().contains("missing.ctl not found"));
        std::fs::remove_dir_all(proc_root).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
