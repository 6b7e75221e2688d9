//! Socket-level load balancing for the node's own processes: the cgroup programs of
//! `seine-ebpf`'s `sock` module, attached to a cgroup v2 directory (by default the root of the
//! unified hierarchy, so every host-network process is served) through links pinned next to the
//! maps, so that they outlive the agent as the tc filters do.

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::Array,
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr,
    },
    Ebpf,
};
use seine_common::*;

use crate::bpf::BpfError;

const PROGRAMS: [&str; 4] = [
    PROG_SOCK_CONNECT4,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_GETPEERNAME4,
];

/// Where the unified cgroup hierarchy (cgroup v2) is mounted, if it is.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
    })
}

/// Attaches the socket programs to `cgroup`, serving the sockets of the current network namespace.
/// A previous agent's links are removed only once these are attached, so no connect passes
/// untranslated meanwhile (a connect that both see is translated by the first; the second finds
/// a backend address, not a frontend). On failure none is left attached: a connect translated
/// without its getpeername and recvmsg would be worse than none.
pub fn attach(ebpf: &mut Ebpf, dir: &Path, cgroup: &Path) -> Result<(), BpfError> {
    attach_all(ebpf, dir, cgroup).inspect_err(|_| detach(dir))
}

fn attach_all(ebpf: &mut Ebpf, dir: &Path, cgroup: &Path) -> Result<(), BpfError> {
    let io_err = |context: String| move |source| BpfError::Io { context, source };
    let cookie =
        netns_cookie().map_err(io_err("reading this network namespace's cookie".into()))?;
    let map = ebpf.map_mut(MAP_SOCK_NETNS).ok_or(BpfError::Map {
        name: MAP_SOCK_NETNS,
        source: aya::maps::MapError::InvalidName {
            name: MAP_SOCK_NETNS.into(),
        },
    })?;
    let mut netns: Array<_, u64> = Array::try_from(map).map_err(|source| BpfError::Map {
        name: MAP_SOCK_NETNS,
        source,
    })?;
    netns.set(0, cookie, 0).map_err(|source| BpfError::Map {
        name: MAP_SOCK_NETNS,
        source,
    })?;
    let cgroup_dir = File::open(cgroup).map_err(io_err(format!("opening {}", cgroup.display())))?;
    for name in PROGRAMS {
        let program_err = |source| BpfError::Program { name, source };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(BpfError::Program {
                name,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(program_err)?;
        prog.load().map_err(program_err)?;
        // A link (Linux 5.7) always lets other programs share the cgroup; the kernel refuses
        // attach flags on one, so the mode asks for none.
        let id = prog
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(program_err)?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(program_err)?
            .try_into()
            .map_err(|e| BpfError::Attach {
                interface: cgroup.display().to_string(),
                message: format!("{name}: {e}"),
            })?;
        let pin = link_pin(dir, name);
        remove_link(&pin);
        link.pin(&pin).map_err(|e| BpfError::Attach {
            interface: cgroup.display().to_string(),
            message: format!("pinning {name}'s link at {}: {e}", pin.display()),
        })?;
    }
    Ok(())
}

/// Detaches the socket programs an agent attached with its pins in `dir`, if any.
pub fn detach(dir: &Path) {
    for name in PROGRAMS {
        remove_link(&link_pin(dir, name));
    }
}

fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("{program}_link"))
}

/// Unpins a link; with no file descriptor left open on it, the kernel detaches it.
fn remove_link(pin: &Path) {
    if let Ok(link) = PinnedLink::from_pin(pin) {
        let _ = link.unpin();
    }
}

/// The kernel's cookie for the current network namespace (Linux 5.14).
fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
