//! Loading, pinning and attaching the eBPF programs, and opening their pinned maps.
//!
//! Maps and programs are pinned under one directory per node (default `/sys/fs/bpf/seine`). The agent
//! loads the object with that directory as its map pin path, so a restarted agent reuses the maps of
//! the one before it and no flow loses its conntrack entry. seinectl only opens the pins.

use std::{io, path::Path};

use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray},
    programs::{
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use seine_common::*;

pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/seine-ebpf"));

pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/seine";

/// tc filter priority and handle of Seine's programs: fixed, so that a restarted agent replaces its
/// own filter in place instead of stacking a second one.
const TC_PRIORITY: u16 = 1;
const TC_HANDLE: TcHandle = TcHandle::new(0x5e1, 1);

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

/// Attaches the programs to a pod's host-side veth in the current network namespace: ingress
/// translates what the pod sends, egress restores replies. An existing Seine filter is replaced in
/// place, so packets never pass untranslated. The filters stay after this process exits.
pub fn attach(ebpf: &mut Ebpf, interface: &str) -> Result<(), BpfError> {
    add_clsact(interface)?;
    for (name, attach_type) in [
        (PROG_FROM_POD, TcAttachType::Ingress),
        (PROG_TO_POD, TcAttachType::Egress),
    ] {
        attach_one(classifier(ebpf, name)?, name, interface, attach_type)?;
    }
    Ok(())
}

/// Attaches the programs an agent pinned in `dir` to `interface` (current network namespace), as
/// the CNI plugin does for a new pod. Returns false, attaching nothing, when no agent pinned them
/// there (the iptables datapath, or no agent).
pub fn attach_pinned(dir: &Path, interface: &str) -> Result<bool, BpfError> {
    let pins = [
        (PROG_FROM_POD, TcAttachType::Ingress),
        (PROG_TO_POD, TcAttachType::Egress),
    ];
    if !pins.iter().all(|(name, _)| dir.join(name).exists()) {
        return Ok(false);
    }
    add_clsact(interface)?;
    for (name, attach_type) in pins {
        let mut prog = SchedClassifier::from_pin(dir.join(name))
            .map_err(|source| BpfError::Program { name, source })?;
        attach_one(&mut prog, name, interface, attach_type)?;
    }
    Ok(true)
}

fn add_clsact(interface: &str) -> Result<(), BpfError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        // EEXIST: the clsact qdisc is there already.
        Err(tc::TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(BpfError::Attach {
            interface: interface.to_string(),
            message: format!("adding clsact qdisc: {e}"),
        }),
    }
}

fn attach_one(
    prog: &mut SchedClassifier,
    name: &'static str,
    interface: &str,
    attach_type: TcAttachType,
) -> Result<(), BpfError> {
    let attach_err = |message: String| BpfError::Attach {
        interface: interface.to_string(),
        message,
    };
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        classid: None,
    });
    let link_id = match prog.attach_with_options(interface, attach_type, options) {
        Ok(id) => id,
        // Our filter is there already (an earlier agent): swap the program in place.
        Err(create_err) => {
            let existing =
                SchedClassifierLink::attached(interface, attach_type, TC_PRIORITY, TC_HANDLE, None)
                    .map_err(|e| attach_err(format!("{name}: {e}")))?;
            prog.attach_to_link(existing).map_err(|e| {
                attach_err(format!(
                    "{name}: creating the filter: {create_err}; replacing it: {e}"
                ))
            })?
        }
    };
    // Keep the filter when this process exits: dropping the link would detach it.
    let link = prog
        .take_link(link_id)
        .map_err(|e| attach_err(format!("{name}: {e}")))?;
    std::mem::forget(link);
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
/// status and its writers' lock), once its pins are gone.
pub fn remove_node_files(dir: &Path) {
    let _ = std::fs::remove_file(status_path(dir));
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

/// Removes Seine's filters from `interface` (current network namespace), if any.
pub fn detach(interface: &str) {
    for (name, attach_type) in [
        (PROG_FROM_POD, TcAttachType::Ingress),
        (PROG_TO_POD, TcAttachType::Egress),
    ] {
        let _ = tc::qdisc_detach_program(interface, attach_type, name);
    }
}
