//! Booting a kernel under QEMU (software emulation: KVM hangs here) with
//! the host filesystem shared in, through virtme-ng, and getting a script's
//! output and exit status back.
//!
//! vng's own exit code and stdout path do not work on these hosts (no udev:
//! it always exits 255), so the guest writes its results into a read-write
//! shared folder (`--rwdir`) and we read them from there.

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::kernels::Kernel;

/// What a script run inside a VM produced.
pub struct Outcome {
    /// `None` when the VM died or timed out before the script finished.
    pub exit_code: Option<i32>,
    pub log: String,
    pub release: Option<String>,
    pub elapsed: Duration,
    pub timed_out: bool,
}

/// Boots `kernel`, runs `script` (a shell script on the host filesystem) as
/// root inside with `$OUT` set to `out_dir`, and powers off.
pub fn run_script(
    kernel: &Kernel,
    script: &Path,
    out_dir: &Path,
    limit: Duration,
) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(out_dir)?;
    for file in ["log", "rc", "release", "console", "dmesg"] {
        let _ = std::fs::remove_file(out_dir.join(file));
    }
    let out = out_dir.display();
    let guest = format!(
        "uname -r > {out}/release; OUT={out} sh {script} > {out}/log 2>&1; echo $? > {out}/rc; dmesg > {out}/dmesg",
        script = script.display()
    );
    let console = std::fs::File::create(out_dir.join("console"))?;
    let started = Instant::now();
    let mut child = Command::new("vng")
        .arg("--run")
        .arg(&kernel.vmlinuz)
        .args(["--disable-kvm", "--cpus", "2", "--memory", "2G"])
        .arg(format!("--rwdir={out}"))
        .arg("--exec")
        .arg(guest)
        // vng crashes when stdin is closed.
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // Own process group, so a timeout kills QEMU too.
        .process_group(0)
        .spawn()
        .context("starting vng (pip install virtme-ng)")?;
    let mut timed_out = false;
    while child.try_wait()?.is_none() {
        if started.elapsed() > limit {
            timed_out = true;
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let read = |name: &str| std::fs::read_to_string(out_dir.join(name)).ok();
    Ok(Outcome {
        exit_code: read("rc").and_then(|rc| rc.trim().parse().ok()),
        log: read("log").unwrap_or_default(),
        release: read("release").map(|r| r.trim().to_string()),
        elapsed: started.elapsed(),
        timed_out,
    })
}

/// Where a kernel's results go.
pub fn out_dir(kernel_name: &str) -> PathBuf {
    crate::util::target_dir().join("vm").join(kernel_name)
}
