//! tracefs: where classic tracepoints describe their record layout.

use std::path::{Path, PathBuf};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0}")]
    Mount(nix::Error),
    #[error("tracefs is not mounted (at /sys/kernel/tracing or /sys/kernel/debug/tracing)")]
    NotMounted,
    #[error("tracepoint {0} not found in tracefs (kernel built without it?)")]
    NoTracepoint(String),
    #[error("tracepoint {tracepoint} has no field {field} in its format")]
    NoField { tracepoint: String, field: String },
}

/// The tracefs root, if tracefs is mounted.
pub fn root() -> Result<PathBuf, TracefsError> {
    CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.join("events").is_dir())
        .map(Path::to_path_buf)
        .ok_or(TracefsError::NotMounted)
}

/// tracefs, mounted for as long as this lives: what was mounted stays,
/// what we had to mount (minimal hosts mount nothing) is unmounted again
/// on drop, so a run leaves the machine's mounts as it found them.
/// Tracepoints stay attached without it: only attaching reads tracefs.
#[must_use]
pub struct Mounted {
    /// Where we mounted it ourselves.
    ours: Option<PathBuf>,
}

/// Mounts tracefs at /sys/kernel/tracing unless it is mounted already.
pub fn mount() -> Result<Mounted, TracefsError> {
    if root().is_ok() {
        return Ok(Mounted { ours: None });
    }
    let target = Path::new(CANDIDATES[0]);
    nix::mount::mount(
        Some("tracefs"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(TracefsError::Mount)?;
    Ok(Mounted {
        ours: Some(target.to_path_buf()),
    })
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(target) = &self.ours {
            // Detached: whoever opened it meanwhile keeps their files.
            if let Err(e) = nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
                log::warn!(
                    "unmounting the tracefs we mounted at {}: {e}",
                    target.display()
                );
            }
        }
    }
}

/// The `format` file text of `category:name`.
pub fn format(category: &str, name: &str) -> Result<String, TracefsError> {
    let path = root()?
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    std::fs::read_to_string(path)
        .map_err(|_| TracefsError::NoTracepoint(format!("{category}:{name}")))
}

/// Offset of `field` in a tracepoint record, from its format text.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        let offset = line
            .split(';')
            .find_map(|part| part.trim().strip_prefix("offset:"))?;
        offset.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KFREE_SKB_6_18: &str = "name: kfree_skb\nID: 2310\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n";
    const KFREE_SKB_5_10: &str = "format:\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n";

    #[test]
    fn reads_offsets_of_each_kernel_layout() {
        assert_eq!(field_offset(KFREE_SKB_6_18, "skbaddr"), Some(8));
        assert_eq!(field_offset(KFREE_SKB_6_18, "protocol"), Some(32));
        assert_eq!(field_offset(KFREE_SKB_6_18, "reason"), Some(36));
        assert_eq!(field_offset(KFREE_SKB_5_10, "protocol"), Some(24));
        assert_eq!(field_offset(KFREE_SKB_5_10, "reason"), None);
        assert_eq!(field_offset(KFREE_SKB_6_18, "common_type"), Some(0));
    }
}
