//! Running commands: cargo from the workspace, the target directory, and a command's status or
//! output as an error that names it.

use std::env;
use std::ffi::OsStr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

/// The cargo that runs xtask, so nested builds use the same toolchain.
pub(crate) fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub(crate) fn cargo_in(root: &Path) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root);
    cmd
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    // Honour an override so we find the binaries where cargo put them.
    match env::var_os("CARGO_TARGET_DIR") {
        // A relative one resolves against the workspace, where we run cargo.
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

pub(crate) fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    // Show `cargo`, not the toolchain's full path that $CARGO holds.
    let name = if program.file_name() == Some(OsStr::new("cargo")) {
        OsStr::new("cargo")
    } else {
        cmd.get_program()
    };
    std::iter::once(name)
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
pub(crate) fn check(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("xtask: running {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` for its standard output, which it returns; fails unless it exits successfully.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// Replaces xtask with `cmd`, so its exit code and signals reach the caller unchanged.
pub(crate) fn exec(root: &Path, cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("xtask: running {shown}");
    let err = cmd.current_dir(root).exec();
    Err(err).with_context(|| format!("executing `{shown}` (did the build produce it?)"))
}
