//! What the kubelet reads of its machine: capacity, identity, and what is still available for the
//! pressure conditions (the cAdvisor part of the real kubelet, from /proc and statvfs).

use std::path::Path;

/// The machine's size, as the Node's capacity.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub ephemeral_storage_bytes: u64,
}

/// What is left now, for MemoryPressure, DiskPressure and PIDPressure.
#[derive(Debug, Clone, PartialEq)]
pub struct Available {
    pub memory_bytes: u64,
    pub memory_total_bytes: u64,
    pub nodefs_bytes: u64,
    pub nodefs_total_bytes: u64,
    pub pids: u64,
    pub pid_max: u64,
}

/// `status.nodeInfo` as the machine gives it.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
    pub kernel_version: String,
    pub os_image: String,
    pub architecture: String,
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A field of /proc/meminfo in bytes.
fn meminfo(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// (total, available) bytes of the filesystem holding `path`.
fn filesystem(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `stat` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = stat.f_frsize as u64;
    Ok((stat.f_blocks as u64 * block, stat.f_bavail as u64 * block))
}

/// The nearest existing directory of `path` (the root dir may not exist yet).
fn existing(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
}

pub fn capacity(root_dir: &Path) -> Capacity {
    let meminfo_text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Capacity {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1),
        memory_bytes: meminfo(&meminfo_text, "MemTotal").unwrap_or(0),
        ephemeral_storage_bytes: filesystem(existing(root_dir)).map(|f| f.0).unwrap_or(0),
    }
}

pub fn available(root_dir: &Path) -> Available {
    let meminfo_text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let (nodefs_total_bytes, nodefs_bytes) = filesystem(existing(root_dir)).unwrap_or((0, 0));
    let pids = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u64
        })
        .unwrap_or(0);
    Available {
        memory_bytes: meminfo(&meminfo_text, "MemAvailable").unwrap_or(u64::MAX),
        memory_total_bytes: meminfo(&meminfo_text, "MemTotal").unwrap_or(0),
        nodefs_bytes,
        nodefs_total_bytes,
        pids,
        pid_max: read_trimmed("/proc/sys/kernel/pid_max")
            .parse()
            .unwrap_or(u64::MAX),
    }
}

/// The Go name of this architecture, as Kubernetes labels it.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

fn os_image() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

pub fn identity() -> Identity {
    let machine_id = read_trimmed("/etc/machine-id");
    let product_uuid = read_trimmed("/sys/class/dmi/id/product_uuid");
    Identity {
        system_uuid: if product_uuid.is_empty() {
            machine_id.clone()
        } else {
            product_uuid
        },
        machine_id,
        boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
        kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
        os_image: os_image(),
        architecture: go_arch().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2000 kB\n";
        assert_eq!(meminfo(text, "MemTotal"), Some(24_000_000 * 1024));
        assert_eq!(meminfo(text, "MemAvailable"), Some(2000 * 1024));
        assert_eq!(meminfo(text, "Missing"), None);
    }

    #[test]
    fn this_machine_is_read() {
        let c = capacity(Path::new("/nonexistent/kubelet"));
        assert!(c.cpus >= 1 && c.memory_bytes > 0 && c.ephemeral_storage_bytes > 0);
        let a = available(Path::new("/"));
        assert!(a.pids > 0 && a.pid_max >= a.pids);
        assert!(!identity().kernel_version.is_empty());
    }
}
