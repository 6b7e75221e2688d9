//! Node-local IPAM: addresses of the node's pod CIDR, one file per allocated address in a directory
//! (`<dir>/<ip>` holding the container ID and interface name), under an exclusive `flock` so that
//! concurrent plugin processes never hand out an address twice. A file is written whole (to a
//! temporary name, then renamed) so that a process killed mid-ADD leaves either a complete
//! allocation, which its DEL or a GC releases, or nothing. The network address, the first address
//! (the node's gateway) and the broadcast address are never handed out.
//!
//! The files are not fsynced: a plugin that dies loses nothing (the kernel has the data), and what
//! a power loss could lose is the allocation of a pod that did not survive it either; a file left
//! empty counts as taken until GC releases it. Syncing would put a journal commit into every ADD.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use crate::spec::{CniError, Code};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("{0:?} is not an IPv4 CIDR with a prefix length from 8 to 30")]
    BadCidr(String),
    #[error("no free address in {0}")]
    Exhausted(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let code = match e {
            IpamError::BadCidr(_) => Code::InvalidNetworkConfig,
            IpamError::Exhausted(_) => Code::PluginLimited,
            IpamError::Io { .. } => Code::IoFailure,
        };
        CniError::new(code, "IPAM failed", e.to_string())
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An address handed to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

/// One allocated address and its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owned {
    pub ip: Ipv4Addr,
    pub container: String,
    pub ifname: String,
}

pub struct Store {
    dir: PathBuf,
    network: u32,
    prefix_len: u8,
}

/// The exclusive lock on a store, released when dropped (or when the process dies).
struct Lock {
    _file: File,
}

impl Store {
    /// The network address and prefix length of an IPv4 CIDR the store can serve.
    pub fn parse_cidr(cidr: &str) -> Option<(u32, u8)> {
        seine_apimachinery::cidr::Ipv4Cidr::parse(cidr)
            .filter(|c| (8..=30).contains(&c.len))
            .map(|c| (u32::from(c.network), c.len))
    }

    /// The store for `cidr` in `dir` (created, mode 0700, when missing).
    pub fn open(dir: &Path, cidr: &str) -> Result<Self, IpamError> {
        let (network, prefix_len) =
            Self::parse_cidr(cidr).ok_or_else(|| IpamError::BadCidr(cidr.to_string()))?;
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            network,
            prefix_len,
        })
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.network), self.prefix_len)
    }

    fn lock(&self) -> Result<Lock, IpamError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock on a descriptor we own; it blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(&path)(std::io::Error::last_os_error()));
        }
        Ok(Lock { _file: file })
    }

    /// Every allocation (files that are not a complete allocation count as owned by nobody).
    fn read_all(&self) -> Result<Vec<Owned>, IpamError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let entry = entry.map_err(io(&self.dir))?;
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            let (container, ifname) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
            out.push(Owned {
                ip,
                container: container.to_string(),
                ifname: ifname.to_string(),
            });
        }
        out.sort_by_key(|o| o.ip);
        Ok(out)
    }

    pub fn allocations(&self) -> Result<Vec<Owned>, IpamError> {
        let _lock = self.lock()?;
        self.read_all()
    }

    /// How many addresses are still free.
    pub fn free(&self) -> Result<u32, IpamError> {
        let _lock = self.lock()?;
        let size = 1u32 << (32 - self.prefix_len);
        Ok((size - 3).saturating_sub(self.read_all()?.len() as u32))
    }

    /// An address for (container, interface): the one it already has, or the next free one after
    /// the last handed out (so that a released address is not reused at once).
    pub fn allocate(&self, container: &str, ifname: &str) -> Result<Allocation, IpamError> {
        let _lock = self.lock()?;
        let allocation = |ip| Allocation {
            ip,
            prefix_len: self.prefix_len,
            gateway: self.gateway(),
        };
        let taken = self.read_all()?;
        if let Some(own) = taken
            .iter()
            .find(|o| o.container == container && o.ifname == ifname)
        {
            return Ok(allocation(own.ip));
        }
        let size = 1u32 << (32 - self.prefix_len);
        // Usable: network+2 (after the gateway) to broadcast-1.
        let first = self.network + 2;
        let count = size - 3;
        let last_path = self.dir.join("last_reserved_ip");
        let last = fs::read_to_string(&last_path)
            .ok()
            .and_then(|t| t.trim().parse::<Ipv4Addr>().ok())
            .map(u32::from)
            .filter(|ip| (first..first + count).contains(ip))
            .map_or(0, |ip| ip - first + 1);
        let used: std::collections::HashSet<Ipv4Addr> = taken.iter().map(|o| o.ip).collect();
        for step in 0..count {
            let ip = Ipv4Addr::from(first + (last + step) % count);
            if used.contains(&ip) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            self.write_whole(&path, &format!("{container}\n{ifname}\n"))?;
            // Only a hint for the next search: no need to make it durable.
            self.write_whole(&last_path, &ip.to_string())?;
            return Ok(allocation(ip));
        }
        Err(IpamError::Exhausted(self.cidr()))
    }

    /// Writes a file so that it exists whole or not at all (a temporary file renamed over it).
    fn write_whole(&self, path: &Path, text: &str) -> Result<(), IpamError> {
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(text.as_bytes()).map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    }

    /// Releases what (container, interface) holds; fine when it holds nothing.
    pub fn release(&self, container: &str, ifname: &str) -> Result<Vec<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for own in self.read_all()? {
            if own.container == container && own.ifname == ifname {
                let path = self.dir.join(own.ip.to_string());
                fs::remove_file(&path).map_err(io(&path))?;
                released.push(own.ip);
            }
        }
        Ok(released)
    }

    /// Releases every address not held by one of `valid` (container, interface) pairs, and
    /// whatever an interrupted write left.
    pub fn gc(&self, valid: &[(String, String)]) -> Result<Vec<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for own in self.read_all()? {
            let keep = valid
                .iter()
                .any(|(c, i)| *c == own.container && *i == own.ifname);
            if !keep {
                let path = self.dir.join(own.ip.to_string());
                fs::remove_file(&path).map_err(io(&path))?;
                released.push(own.ip);
            }
        }
        for entry in fs::read_dir(&self.dir).map_err(io(&self.dir))?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn temp_store(tag: &str, cidr: &str) -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!("seine-ipam-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let store = Store::open(&dir, cidr).unwrap();
        (dir, store)
    }

    #[test]
    fn a_hundred_concurrent_allocations_get_distinct_addresses() {
        let (dir, _) = temp_store("concurrent", "10.244.1.0/24");
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    // A store of its own, as a separate plugin process would open.
                    let store = Store::open(&dir, "10.244.1.0/24").unwrap();
                    store.allocate(&format!("c{i}"), "eth0").unwrap().ip
                })
            })
            .collect();
        let ips: HashSet<Ipv4Addr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ips.len(), 100);
        assert!(!ips.contains(&Ipv4Addr::new(10, 244, 1, 0)));
        assert!(!ips.contains(&Ipv4Addr::new(10, 244, 1, 1)), "the gateway");
        assert!(!ips.contains(&Ipv4Addr::new(10, 244, 1, 255)));
        let reopened = Store::open(&dir, "10.244.1.0/24").unwrap();
        assert_eq!(
            reopened.allocations().unwrap().len(),
            100,
            "kept across opens"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn allocation_is_idempotent_and_release_and_gc_free_addresses() {
        let (dir, store) = temp_store("cycle", "10.244.2.0/29");
        let a = store.allocate("a", "eth0").unwrap();
        assert_eq!(a.ip, Ipv4Addr::new(10, 244, 2, 2));
        assert_eq!(a.gateway, Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(a.prefix_len, 29);
        assert_eq!(store.allocate("a", "eth0").unwrap(), a, "a retried ADD");
        // .2 to .6: five addresses.
        for c in ["b", "c", "d", "e"] {
            store.allocate(c, "eth0").unwrap();
        }
        assert!(matches!(
            store.allocate("f", "eth0"),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(store.release("b", "eth0").unwrap().len(), 1);
        assert!(store.release("b", "eth0").unwrap().is_empty(), "DEL twice");
        assert!(store.allocate("f", "eth0").is_ok());
        // A write cut short leaves an ownerless file; GC takes it and the invalid ones back.
        fs::write(dir.join("10.244.2.6"), "").ok();
        fs::write(dir.join("10.244.2.9.tmp"), "c").ok();
        let valid = vec![("a".to_string(), "eth0".to_string())];
        let released = store.gc(&valid).unwrap();
        assert_eq!(released.len(), 4);
        assert_eq!(store.allocations().unwrap().len(), 1);
        assert!(!dir.join("10.244.2.9.tmp").exists());
        assert!(Store::open(&dir, "10.244.2.0").is_err());
        assert!(Store::open(&dir, "10.244.2.0/31").is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
