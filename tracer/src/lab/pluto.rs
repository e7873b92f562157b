//! libreswan: one pluto per gateway namespace, each with its own config,
//! NSS database, run dir (control socket) and log file.

use std::{
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use super::{EAST_SUBNET, EAST_WAN, Host, Lab, LabError, Result, WEST_SUBNET, WEST_WAN, io, run};

/// The lab's connection name in both plutos.
pub const CONNECTION: &str = "lab";

/// One gateway's view of the `lab` connection.
#[derive(Clone, Debug)]
pub struct PlutoConfig {
    pub ike: String,
    pub esp: String,
    pub psk: String,
    /// Our subnet and the peer's (defaults: the lab's LANs).
    pub my_subnet: String,
    pub peer_subnet: String,
    pub retransmit_timeout: String,
    /// `None`: `leftupdown="%disabled"`: under TCG the 1000-line updown
    /// script delays the Child SA enough to cause IKE retransmissions.
    pub updown: Option<String>,
    /// Negotiate with IKEv1 instead of IKEv2 (libreswan 4 refuses IKEv1
    /// unless `ikev1-policy=accept`).
    pub ikev1: bool,
    /// Extra `key=value` lines for the conn section.
    pub extra: Vec<String>,
}

impl PlutoConfig {
    pub fn for_gateway(gw: Host) -> Self {
        let (my_subnet, peer_subnet) = match gw {
            Host::West => (WEST_SUBNET, EAST_SUBNET),
            _ => (EAST_SUBNET, WEST_SUBNET),
        };
        Self {
            ike: "aes_gcm256-sha2_256;dh19".into(),
            esp: "aes_gcm128".into(),
            psk: "lab-psk-0123456789abcdef".into(),
            my_subnet: my_subnet.into(),
            peer_subnet: peer_subnet.into(),
            retransmit_timeout: "60s".into(),
            updown: None,
            ikev1: false,
            extra: Vec::new(),
        }
    }
}

/// A running pluto.
pub struct PlutoInstance {
    pub gateway: Host,
    pub dir: PathBuf,
    namespace: String,
    child: Option<Child>,
}

impl PlutoInstance {
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("run/pluto.ctl")
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.join("pluto.log")
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let socket = self.control_socket();
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.namespace,
                "ipsec",
                "whack",
                "--ctlsocket",
            ])
            .arg(&socket)
            .arg("--shutdown")
            .output();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn config_text(gw: Host, dir: &std::path::Path, config: &PlutoConfig) -> String {
    let (me, peer, my_id, peer_id) = match gw {
        Host::West => (WEST_WAN, EAST_WAN, "@west", "@east"),
        _ => (EAST_WAN, WEST_WAN, "@east", "@west"),
    };
    let dir = dir.display();
    let updown = config.updown.as_deref().unwrap_or("%disabled");
    let (ikev1_policy, ikev2) = if config.ikev1 {
        ("\tikev1-policy=accept\n", "no")
    } else {
        ("", "yes")
    };
    let mut text = format!(
        "config setup\n\tlogfile={dir}/pluto.log\n\tlogappend=yes\n\tplutodebug=none\n\tdumpdir={dir}/run\n{ikev1_policy}\n\
         conn {CONNECTION}\n\tauthby=secret\n\tikev2={ikev2}\n\tleft={me}\n\tleftid={my_id}\n\tleftsubnet={}\n\t\
         right={peer}\n\trightid={peer_id}\n\trightsubnet={}\n\tike={}\n\tesp={}\n\tretransmit-timeout={}\n\t\
         leftupdown=\"{updown}\"\n\tauto=ignore\n",
        config.my_subnet, config.peer_subnet, config.ike, config.esp, config.retransmit_timeout
    );
    for line in &config.extra {
        let _ = writeln!(text, "\t{line}");
    }
    text
}

impl Lab {
    /// Instantiates the ESP transforms the lab uses once, in a throw-away
    /// netns: the first one loads and self-tests crypto modules, which
    /// costs seconds under TCG (enough to make IKE retransmit) and, on a
    /// loaded machine, can fail with ENOSYS: so it is retried.
    pub fn warm_crypto(&self) -> Result<()> {
        let ns = format!("{}-warm", self.prefix);
        let _ = run("ip", &["netns", "del", &ns]);
        run("ip", &["netns", "add", &ns])?;
        let algorithms: [&[&str]; 2] = [
            &[
                "aead",
                "rfc4106(gcm(aes))",
                "0x0102030405060708090a0b0c0d0e0f1011121314",
                "128",
            ],
            &[
                "enc",
                "cbc(aes)",
                "0x0102030405060708090a0b0c0d0e0f10",
                "auth-trunc",
                "hmac(sha256)",
                "0x0102030405060708090a0b0c0d0e0f100102030405060708090a0b0c0d0e0f10",
                "128",
            ],
        ];
        let mut result = Ok(String::new());
        for (spi, algorithm) in algorithms.iter().enumerate() {
            let spi = (spi + 1).to_string();
            let mut args = vec![
                "-n",
                &ns,
                "xfrm",
                "state",
                "add",
                "src",
                "198.51.100.1",
                "dst",
                "198.51.100.2",
                "proto",
                "esp",
                "spi",
                &spi,
                "mode",
                "tunnel",
            ];
            args.extend_from_slice(algorithm);
            for attempt in 0..3 {
                if attempt > 0 {
                    std::thread::sleep(Duration::from_secs(2));
                }
                result = run("ip", &args);
                if result.is_ok() {
                    break;
                }
            }
            if result.is_err() {
                break;
            }
        }
        let _ = run("ip", &["netns", "del", &ns]);
        result.map(drop)
    }

    /// Starts pluto in the gateway's namespace and loads the `lab` connection.
    pub fn start_pluto(&mut self, gw: Host, config: &PlutoConfig) -> Result<()> {
        let dir = self.run_dir.join(format!("pluto-{}", gw.role()));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["nss", "run"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        let nss = dir.join("nss");
        run(
            "ipsec",
            &["initnss", "--nssdir", &nss.display().to_string()],
        )?;
        let conf = dir.join("ipsec.conf");
        std::fs::write(&conf, config_text(gw, &dir, config)).map_err(io("writing ipsec.conf"))?;
        let secrets = dir.join("ipsec.secrets");
        let (my_id, peer_id) = if gw == Host::West {
            ("@west", "@east")
        } else {
            ("@east", "@west")
        };
        std::fs::write(
            &secrets,
            format!("{my_id} {peer_id} : PSK \"{}\"\n", config.psk),
        )
        .map_err(io("writing ipsec.secrets"))?;
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600))
            .map_err(io("chmod ipsec.secrets"))?;

        let namespace = self.ns(gw);
        let stderr =
            std::fs::File::create(dir.join("pluto.stderr")).map_err(io("creating pluto.stderr"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &namespace, "ipsec", "pluto", "--nofork"])
            .arg("--config")
            .arg(&conf)
            .arg("--rundir")
            .arg(dir.join("run"))
            .arg("--nssdir")
            .arg(&nss)
            .arg("--secretsfile")
            .arg(&secrets)
            .arg("--ipsecdir")
            .arg(&dir)
            .arg("--logfile")
            .arg(dir.join("pluto.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(io("starting pluto (is libreswan installed?)"))?;
        let mut instance = PlutoInstance {
            gateway: gw,
            dir,
            namespace,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !instance.control_socket().exists() {
            if Instant::now() > deadline {
                instance.stop();
                return Err(LabError::Other(format!(
                    "pluto in {} did not open its control socket",
                    self.ns(gw)
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let socket = instance.control_socket().display().to_string();
        self.plutos.push(instance);
        self.exec(
            gw,
            "ipsec",
            &[
                "auto",
                "--config",
                &conf.display().to_string(),
                "--ctlsocket",
                &socket,
                "--add",
                CONNECTION,
            ],
        )
        .map(drop)
    }

    pub fn pluto(&self, gw: Host) -> Option<&PlutoInstance> {
        self.plutos.iter().find(|p| p.gateway == gw)
    }

    /// `ipsec whack --ctlsocket <gw's socket> <args>`, whatever its exit code
    /// (it tells how a negotiation ended).
    pub fn whack(&self, gw: Host, args: &[&str]) -> Result<Output> {
        let pluto = self
            .pluto(gw)
            .ok_or_else(|| LabError::Other(format!("no pluto running in {}", self.ns(gw))))?;
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(gw),
                "ipsec",
                "whack",
                "--ctlsocket",
            ])
            .arg(pluto.control_socket())
            .args(args)
            .output()
            .map_err(io("running ipsec whack"))
    }
}
