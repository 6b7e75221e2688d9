//! Loading, pinning and attaching the eBPF programs, and opening their pinned maps.
//!
//! Maps and programs are pinned under one directory per node (default `/sys/fs/bpf/seine`). The agent
//! loads the object with that directory as its map pin path, so a restarted agent reuses the maps of
//! the one before it and no flow loses its conntrack entry. seinectl only opens the pins.

use std::{io, path::Path};

use aya::{
    maps::{HashMap, IterableMap as _, Map, MapData, PerCpuArray},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use seine_common::{tc, *};

pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/seine-ebpf"));

pub use seine_common::{
    tc::{attach_pinned, detach},
    DEFAULT_BPFFS_DIR,
};

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(
        "the datapath maps are not pinned under {dir}: is seine-agent running with --bpffs-dir {dir}? ({source})"
    )]
    NotPinned {
        dir: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("permission denied opening {path}: seinectl and seine-agent need root (CAP_BPF and CAP_SYS_ADMIN)")]
    PermissionDenied { path: String },
    #[error("bpffs is not mounted at {0}: mount it with `mount -t bpf bpf /sys/fs/bpf` (cargo xtask setup does)")]
    NoBpffs(String),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "the map pinned at {path} has another layout ({found}) than this version expects ({expected}); \
         remove the old datapath with `seine-agent --cleanup --bpffs-dir {dir}` (established connections \
         through services lose their state)"
    )]
    Incompatible {
        path: String,
        dir: String,
        found: String,
        expected: String,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching to {interface}: {message}")]
    Attach { interface: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl From<tc::AttachError> for BpfError {
    fn from(e: tc::AttachError) -> Self {
        BpfError::Attach {
            interface: e.interface,
            message: e.message,
        }
    }
}

/// Map capacities, fixed when the maps are first created.
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: DEFAULT_MAX_SERVICES,
            backends: DEFAULT_MAX_BACKENDS,
            conntrack: DEFAULT_CT_SIZE,
            affinity: DEFAULT_AFFINITY_SIZE,
        }
    }
}

/// The pinned maps, typed.
pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, u32>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub revnat: HashMap<MapData, u32, RevNat>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub stats: PerCpuArray<MapData, u64>,
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self, BpfError> {
        check_bpffs(dir)?;
        Ok(PinnedMaps {
            services: open_hash(dir, MAP_SERVICES)?,
            slots: open_hash(dir, MAP_SLOTS)?,
            backends: open_hash(dir, MAP_BACKENDS)?,
            conntrack: open_hash(dir, MAP_CT)?,
            revnat: open_hash(dir, MAP_REVNAT)?,
            affinity: open_hash(dir, MAP_AFFINITY)?,
            stats: {
                let map = open_map(dir, MAP_STATS)?;
                PerCpuArray::try_from(map).map_err(|source| BpfError::Map {
                    name: MAP_STATS,
                    source,
                })?
            },
        })
    }

    /// Each hash map's name, entries and capacity. Counting walks the keys: one syscall an entry,
    /// fine at a scrape's pace.
    pub fn fill(&self) -> Vec<(&'static str, usize, u32)> {
        fn of<K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            map: &HashMap<MapData, K, V>,
        ) -> (&'static str, usize, u32) {
            let capacity = map.map().info().map(|i| i.max_entries()).unwrap_or(0);
            (name, map.keys().filter(Result::is_ok).count(), capacity)
        }
        vec![
            of(MAP_SERVICES, &self.services),
            of(MAP_SLOTS, &self.slots),
            of(MAP_BACKENDS, &self.backends),
            of(MAP_CT, &self.conntrack),
            of(MAP_REVNAT, &self.revnat),
            of(MAP_AFFINITY, &self.affinity),
        ]
    }

    /// The counters summed over CPUs, indexed as `seine_common::STAT_*`.
    pub fn stats(&self) -> Result<Vec<u64>, BpfError> {
        (0..STAT_COUNT)
            .map(|i| {
                self.stats
                    .get(&i, 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .map_err(|source| BpfError::Map {
                        name: MAP_STATS,
                        source,
                    })
            })
            .collect()
    }
}

fn check_bpffs(dir: &Path) -> Result<(), BpfError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|source| BpfError::Io {
        context: "reading /proc/mounts".into(),
        source,
    })?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, target, fstype) = (fields.next(), fields.next(), fields.next());
        fstype == Some("bpf") && target.is_some_and(|t| dir.starts_with(t))
    });
    if mounted {
        Ok(())
    } else {
        Err(BpfError::NoBpffs(dir.display().to_string()))
    }
}

fn open_map(dir: &Path, name: &'static str) -> Result<Map, BpfError> {
    let path = dir.join(name);
    let data =
        MapData::from_pin(&path).map_err(|source| classify_open_error(dir, &path, source))?;
    Map::from_map_data(data).map_err(|source| BpfError::Map { name, source })
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, BpfError> {
    let map = open_map(dir, name)?;
    HashMap::try_from(map).map_err(|source| BpfError::Map { name, source })
}

fn classify_open_error(dir: &Path, path: &Path, source: aya::maps::MapError) -> BpfError {
    let kind = match &source {
        aya::maps::MapError::SyscallError(e) => Some(e.io_error.kind()),
        aya::maps::MapError::IoError(e) => Some(e.kind()),
        _ => None,
    };
    if kind == Some(io::ErrorKind::PermissionDenied) {
        BpfError::PermissionDenied {
            path: path.display().to_string(),
        }
    } else {
        BpfError::NotPinned {
            dir: dir.display().to_string(),
            source,
        }
    }
}

/// Loads the object with its maps pinned under `dir` (reusing maps pinned there already) and pins
/// both programs there too, for the CNI plugin to attach to new pods.
pub fn load(dir: &Path, sizes: MapSizes) -> Result<Ebpf, BpfError> {
    std::fs::create_dir_all(dir).map_err(|source| BpfError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    check_bpffs(dir)?;
    check_pinned_layouts(dir)?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .map_max_entries(MAP_SERVICES, sizes.services)
        .map_max_entries(MAP_REVNAT, sizes.services)
        .map_max_entries(MAP_BACKENDS, sizes.backends)
        .map_max_entries(MAP_SLOTS, sizes.backends.saturating_mul(2))
        .map_max_entries(MAP_CT, sizes.conntrack)
        .map_max_entries(MAP_AFFINITY, sizes.affinity)
        .load(EBPF_OBJECT)?;
    for name in [PROG_FROM_POD, PROG_TO_POD] {
        let prog = classifier(&mut ebpf, name)?;
        prog.load()
            .map_err(|source| BpfError::Program { name, source })?;
        let pin = dir.join(name);
        // A pin left by the previous agent names the previous program: replace it.
        if pin.exists() {
            std::fs::remove_file(&pin).map_err(|source| BpfError::Io {
                context: format!("replacing {}", pin.display()),
                source,
            })?;
        }
        prog.pin(&pin).map_err(|e| BpfError::Program {
            name,
            source: aya::programs::ProgramError::IOError(io::Error::other(e.to_string())),
        })?;
    }
    Ok(ebpf)
}

/// Maps pinned by an earlier agent are reused as they are: refuse ones whose key or value layout
/// (or, for the counters, size) differs from what this version's programs read.
fn check_pinned_layouts(dir: &Path) -> Result<(), BpfError> {
    use std::mem::size_of;
    let expected: [(&str, usize, usize, u32); 9] = [
        (
            MAP_SERVICES,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            0,
        ),
        (MAP_SLOTS, size_of::<SlotKey>(), size_of::<u32>(), 0),
        (MAP_BACKENDS, size_of::<u32>(), size_of::<Backend>(), 0),
        (MAP_CT, size_of::<CtKey>(), size_of::<CtValue>(), 0),
        (MAP_REVNAT, size_of::<u32>(), size_of::<RevNat>(), 0),
        (
            MAP_AFFINITY,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            0,
        ),
        (MAP_STATS, size_of::<u32>(), size_of::<u64>(), STAT_COUNT),
        (MAP_SOCK_NETNS, size_of::<u32>(), size_of::<u64>(), 1),
        (
            MAP_SOCK_REVNAT,
            size_of::<SockRevKey>(),
            size_of::<RevNat>(),
            0,
        ),
    ];
    for (name, key, value, min_entries) in expected {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info =
            aya::maps::MapInfo::from_pin(&path).map_err(|source| BpfError::Map { name, source })?;
        let (k, v, n) = (
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        if k != key || v != value || n < min_entries {
            return Err(BpfError::Incompatible {
                path: path.display().to_string(),
                dir: dir.display().to_string(),
                found: format!("key {k} B, value {v} B, {n} entries"),
                expected: format!("key {key} B, value {value} B, at least {min_entries} entries"),
            });
        }
    }
    Ok(())
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, BpfError> {
    let prog = ebpf.program_mut(name).ok_or(BpfError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into()
        .map_err(|source| BpfError::Program { name, source })
}

/// Attaches the programs to a pod's host-side veth in the current network namespace (see
/// `seine_common::tc`).
pub fn attach(ebpf: &mut Ebpf, interface: &str) -> Result<(), BpfError> {
    tc::add_clsact(interface)?;
    for (name, attach_type) in tc::PROGRAMS {
        tc::attach_one(classifier(ebpf, name)?, name, interface, attach_type)?;
    }
    Ok(())
}

/// Removes the pins under `dir` (maps and programs). Filters already attached keep their programs.
pub fn unpin_all(dir: &Path) -> Result<(), BpfError> {
    if !dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(dir).map_err(|source| BpfError::Io {
        context: format!("removing {}", dir.display()),
        source,
    })
}

/// An exclusive lock on one node's maps, held while a writer reads back and updates them, so that
/// two writers of the same owner never hand out the same id.
pub struct DirLock {
    _file: std::fs::File,
}

/// Where the agent of the node whose maps live in `dir` records its mode, for `seinectl status`.
pub fn status_path(dir: &Path) -> std::path::PathBuf {
    Path::new("/run/seine/agents").join(format!("{}.json", flat_name(dir)))
}

/// Where that agent records what it programmed, by Service (for `seinectl service list`), and
/// where its services come from (for `seinectl status`).
pub fn proxy_path(dir: &Path) -> std::path::PathBuf {
    Path::new("/run/seine/agents").join(format!("{}.proxy.json", flat_name(dir)))
}

fn flat_name(dir: &Path) -> String {
    dir.display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

const LOCKS: &str = "/run/seine/locks";

fn lock_path(dir: &Path) -> std::path::PathBuf {
    Path::new(LOCKS).join(format!("{}.lock", flat_name(dir)))
}

/// Removes what Seine keeps outside bpffs for the node whose maps lived in `dir` (its agent's
/// status and record, and its writers' lock), once its pins are gone.
pub fn remove_node_files(dir: &Path) {
    let _ = std::fs::remove_file(status_path(dir));
    let _ = std::fs::remove_file(proxy_path(dir));
    let _ = std::fs::remove_file(lock_path(dir));
}

pub fn lock(dir: &Path) -> Result<DirLock, BpfError> {
    let io_err = |context: String| move |source| BpfError::Io { context, source };
    std::fs::create_dir_all(LOCKS).map_err(io_err(format!("creating {LOCKS}")))?;
    let path = lock_path(dir);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    if rc != 0 {
        return Err(io_err(format!("locking {}", path.display()))(
            io::Error::last_os_error(),
        ));
    }
    Ok(DirLock { _file: file })
}

/// Interface names in the current network namespace (from the kernel through netlink, not /sys,
/// which may show another namespace).
pub fn interfaces() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return out;
        }
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}
