//! The VM kernel matrix: Debian kernels fetched with `apt-get download`
//! through a private apt configuration (the machine's own sources are never
//! changed), unpacked into a cache outside the repository, with their
//! modules where virtme-ng looks for them (`/lib/modules/<release>`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::util::{output, run};

/// One kernel of the matrix: the newest `linux-image-amd64` of the first
/// suite that has it. Which tests run on it: `crate::placement` (each test
/// says so next to itself).
pub struct KernelSpec {
    pub name: &'static str,
    pub suites: &'static [&'static str],
}

pub const MATRIX: &[KernelSpec] = &[
    KernelSpec {
        name: "5.10",
        suites: &["bullseye-security", "bullseye"],
    },
    KernelSpec {
        name: "6.1",
        suites: &["bookworm-security", "bookworm"],
    },
    KernelSpec {
        name: "6.12",
        suites: &["trixie-security", "trixie"],
    },
    KernelSpec {
        name: "sid",
        suites: &["sid"],
    },
];

/// Where a test may say it runs: the host and each kernel of the matrix.
pub fn targets() -> Vec<&'static str> {
    std::iter::once(crate::placement::HOST)
        .chain(MATRIX.iter().map(|k| k.name))
        .collect()
}

const SOURCES: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security trixie-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main
";

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub release: String,
    pub vmlinuz: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    // Not under /var or /tmp: virtme-ng hides those from the guest.
    home.join(".cache/xfrm-trace")
}

/// `apt-get`/`apt-cache` with the private configuration.
fn apt(tool: &str) -> Command {
    let dir = cache_dir().join("apt");
    let mut cmd = Command::new(tool);
    for (key, value) in [
        ("Dir::Etc::SourceList", dir.join("sources.list")),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.clone()),
        ("Dir::Cache::Archives", dir.join("archives")),
        ("APT::Sandbox::User", PathBuf::from("root")),
    ] {
        cmd.arg("-o").arg(format!("{key}={}", value.display()));
    }
    cmd
}

fn apt_update() -> anyhow::Result<()> {
    let dir = cache_dir().join("apt");
    for sub in ["lists/partial", "archives/partial"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    std::fs::write(dir.join("sources.list"), SOURCES)?;
    eprintln!("vm: updating the private apt lists (kernels of every suite)");
    run(apt("apt-get").args(["update", "-qq"]))
}

/// The kernel of `spec`, fetched and unpacked on first use.
pub fn ensure(spec: &KernelSpec) -> anyhow::Result<Kernel> {
    let root = cache_dir().join("kernels").join(spec.name);
    let marker = root.join("ready");
    if !marker.exists() {
        fetch(spec, &root).with_context(|| format!("fetching the {} kernel", spec.name))?;
        std::fs::write(&marker, b"")?;
    }
    let kernel = locate(&root)?;
    link_modules(&root, &kernel.release)?;
    Ok(kernel)
}

fn fetch(spec: &KernelSpec, root: &Path) -> anyhow::Result<()> {
    if !cache_dir().join("apt/lists").is_dir() || resolve(spec).is_err() {
        apt_update()?;
    }
    let packages = resolve(spec)?;
    eprintln!("vm: fetching {}", packages.join(" "));
    let debs = cache_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    run(apt("apt-get")
        .arg("download")
        .args(&packages)
        .current_dir(&debs))?;
    let _ = std::fs::remove_dir_all(root);
    std::fs::create_dir_all(root)?;
    for package in &packages {
        let deb = std::fs::read_dir(&debs)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("{package}: no .deb after download"))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root))?;
    }
    let kernel = locate(root)?;
    let (base, _) = modules_dir(root, &kernel.release)?;
    run(Command::new("depmod")
        .arg("-b")
        .arg(base)
        .arg(&kernel.release))
}

/// The image package of the newest kernel in the spec's first suite that
/// has one, plus the packages holding its vmlinuz and modules (split out of
/// the image package since 7.x).
fn resolve(spec: &KernelSpec) -> anyhow::Result<Vec<String>> {
    for suite in spec.suites {
        let out = output(apt("apt-cache").args(["show", &format!("linux-image-amd64/{suite}")]))?;
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(image) = depends(&text)
            .into_iter()
            .find(|d| d.starts_with("linux-image-"))
        else {
            continue;
        };
        let out = output(apt("apt-cache").args(["show", &image]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut packages = vec![image];
        packages.extend(
            depends(&text)
                .into_iter()
                .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-")),
        );
        return Ok(packages);
    }
    bail!("no linux-image-amd64 in {:?}", spec.suites)
}

/// Package names of the first `Depends:` line (alternatives flattened).
fn depends(show: &str) -> Vec<String> {
    show.lines()
        .find_map(|l| l.strip_prefix("Depends:"))
        .map(|deps| {
            deps.split([',', '|'])
                .filter_map(|d| d.split_whitespace().next())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The kernel image: `boot/vmlinuz-<release>`, or (7.x, usr-merged)
/// `usr/lib/modules/<release>/vmlinuz`.
fn locate(root: &Path) -> anyhow::Result<Kernel> {
    let in_boot = std::fs::read_dir(root.join("boot"))
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix("vmlinuz-")?.to_string();
            Some(Kernel {
                release,
                vmlinuz: e.path(),
            })
        });
    let in_modules = || {
        std::fs::read_dir(root.join("usr/lib/modules"))
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                let vmlinuz = e.path().join("vmlinuz");
                vmlinuz.exists().then(|| Kernel {
                    release: e.file_name().to_string_lossy().into_owned(),
                    vmlinuz,
                })
            })
    };
    in_boot
        .or_else(in_modules)
        .with_context(|| format!("no vmlinuz under {}", root.display()))
}

/// (depmod base dir, modules dir): `lib/modules` or, usr-merged, `usr/lib/modules`.
fn modules_dir(root: &Path, release: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    for base in [root.to_path_buf(), root.join("usr")] {
        let dir = base.join("lib/modules").join(release);
        if dir.is_dir() {
            return Ok((base, dir));
        }
    }
    bail!("no modules for {release} under {}", root.display())
}

/// virtme-ng finds a kernel's modules at `/lib/modules/<release>` on the
/// host: point that at the cache (only when nothing else is there).
fn link_modules(root: &Path, release: &str) -> anyhow::Result<()> {
    let (_, dir) = modules_dir(root, release)?;
    let link = Path::new("/lib/modules").join(release);
    match std::fs::read_link(&link) {
        Ok(target) if target == dir => return Ok(()),
        Ok(_) => std::fs::remove_file(&link)?,
        Err(_) if link.exists() => return Ok(()), // the host's own modules
        Err(_) => {}
    }
    std::fs::create_dir_all("/lib/modules")?;
    std::os::unix::fs::symlink(&dir, &link).with_context(|| format!("linking {}", link.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn depends_lists_package_names() {
        let show = "Package: linux-image-7.2.13+deb14-amd64\nDepends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)\n";
        let deps = super::depends(show);
        assert!(deps.contains(&"linux-binary-7.2.13+deb14-amd64".to_string()));
        assert!(deps.contains(&"linux-modules-7.2.13+deb14-amd64".to_string()));
        assert!(deps.contains(&"initramfs-tools".to_string()));
    }
}
