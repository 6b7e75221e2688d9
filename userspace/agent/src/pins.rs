//! Where this node's pinned maps are when nobody said: a lab or a test pins each node under its
//! own directory, so seinectl looks for the agent of the network namespace it runs in, then for
//! the default directory, then for the one directory under bpffs that holds Seine's maps.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use seine_common::MAP_SERVICES;

use crate::bpf::DEFAULT_BPFFS_DIR;

/// The bpffs mount that pin directories live under.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// How a pin directory was found, for the line that says which one is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The `--bpffs-dir` (or `SEINE_BPFFS_DIR`) of the seine-agent in this network namespace.
    Agent { pid: u32 },
    /// The default directory, which holds pins.
    Default,
    /// The only directory under bpffs that holds Seine's maps.
    Only,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Agent { pid } => write!(
                f,
                "the bpffs dir of seine-agent pid {pid} in this network namespace"
            ),
            Found::Default => write!(f, "the default bpffs dir"),
            Found::Only => write!(f, "the only Seine pin dir under {BPFFS_ROOT}"),
        }
    }
}

/// Why no directory could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    #[error(
        "no Seine pins found (no seine-agent in this network namespace, nothing in \
         {DEFAULT_BPFFS_DIR} or under {BPFFS_ROOT}); is the agent running? Pass --bpffs-dir"
    )]
    None,
    #[error("pins of several nodes under {BPFFS_ROOT}: {}; pass --bpffs-dir with one of them", list(.0))]
    Several(Vec<PathBuf>),
}

fn list(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `dir` holds Seine's pinned maps.
fn has_pins(dir: &Path) -> bool {
    dir.join(MAP_SERVICES).exists()
}

/// The pin directory of this node, and how it was found.
pub fn find() -> Result<(PathBuf, Found), FindError> {
    if let Some((dir, pid)) = agent_in_this_netns() {
        return Ok((dir, Found::Agent { pid }));
    }
    let default = PathBuf::from(DEFAULT_BPFFS_DIR);
    if has_pins(&default) {
        return Ok((default, Found::Default));
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(BPFFS_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|d| has_pins(d))
        .collect();
    dirs.sort();
    match dirs.len() {
        0 => Err(FindError::None),
        1 => Ok((dirs.remove(0), Found::Only)),
        _ => Err(FindError::Several(dirs)),
    }
}

/// The pin directory a seine-agent process of this network namespace was given, with its pid.
fn agent_in_this_netns() -> Option<(PathBuf, u32)> {
    let own_netns = std::fs::read_link("/proc/self/ns/net").ok()?;
    let mut agents: Vec<(u32, PathBuf)> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|ns| ns == own_netns)
        })
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            agent_bpffs_dir(&cmdline, &environ).map(|dir| (pid, dir))
        })
        .collect();
    agents.sort();
    agents.into_iter().next().map(|(pid, dir)| (dir, pid))
}

/// The `--bpffs-dir` of a seine-agent command line (NUL-separated, as /proc has it), else its
/// `SEINE_BPFFS_DIR`, else the default; None when the command is not seine-agent.
fn agent_bpffs_dir(cmdline: &[u8], environ: &[u8]) -> Option<PathBuf> {
    let mut args = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned());
    let program = args.next()?;
    if Path::new(&program).file_name()? != "seine-agent" {
        return None;
    }
    let args: Vec<String> = args.collect();
    for (i, arg) in args.iter().enumerate() {
        if let Some(dir) = arg.strip_prefix("--bpffs-dir=") {
            return Some(PathBuf::from(dir));
        }
        if arg == "--bpffs-dir" {
            return args.get(i + 1).map(PathBuf::from);
        }
    }
    let env_dir = environ
        .split(|b| *b == 0)
        .find_map(|v| v.strip_prefix(b"SEINE_BPFFS_DIR="))
        .map(|v| PathBuf::from(String::from_utf8_lossy(v).into_owned()));
    Some(env_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS_DIR)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_dir_comes_from_its_flag_its_environment_or_the_default() {
        let dir = |cmd: &str, env: &str| agent_bpffs_dir(cmd.as_bytes(), env.as_bytes());
        assert_eq!(
            dir(
                "/usr/bin/seine-agent\0--bpffs-dir\0/sys/fs/bpf/seine-n1\0",
                ""
            ),
            Some("/sys/fs/bpf/seine-n1".into())
        );
        assert_eq!(
            dir("seine-agent\0--bpffs-dir=/sys/fs/bpf/x\0", ""),
            Some("/sys/fs/bpf/x".into())
        );
        assert_eq!(
            dir(
                "./seine-agent\0--services-file\0f\0",
                "A=1\0SEINE_BPFFS_DIR=/sys/fs/bpf/e\0"
            ),
            Some("/sys/fs/bpf/e".into())
        );
        assert_eq!(dir("seine-agent\0", ""), Some(DEFAULT_BPFFS_DIR.into()));
        assert_eq!(
            dir("/usr/bin/seine-agent-wrapper\0--bpffs-dir\0/x\0", ""),
            None
        );
        assert_eq!(dir("bash\0-c\0seine-agent --bpffs-dir /x\0", ""), None);
        assert_eq!(dir("", ""), None);
    }
}
