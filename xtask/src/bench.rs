//! `cargo xtask bench ...`: builds the measured binaries in release and runs seine-bench, which
//! prints its table and writes the JSON.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::cmd::{cargo_in, check, target_dir};
use crate::setup::{release_bpffs, setup};

pub(crate) fn bench_apiserver(root: &Path, json: Option<PathBuf>) -> Result<()> {
    run_bench(
        root,
        "apiserver",
        json,
        &["seine-apiserver", "seine-tests"],
        &[],
    )
}

/// Builds `packages` for release and runs `seine-bench <name> --json <json> <extra>`.
pub(crate) fn run_bench(
    root: &Path,
    name: &str,
    json: Option<PathBuf>,
    packages: &[&str],
    extra: &[&str],
) -> Result<()> {
    // A path given on the command line is relative to where the user is, the default to the workspace.
    let json = match json {
        Some(p) if p.is_relative() => env::current_dir()
            .context("reading the current directory")?
            .join(p),
        Some(p) => p,
        None => target_dir(root).join(format!("bench/{name}.json")),
    };
    setup()?;
    let mut build = cargo_in(root);
    build.args(["build", "--release"]);
    for package in packages {
        build.args(["-p", package]);
    }
    check(&mut build)?;
    if let Some(dir) = json.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let ran = check(
        Command::new(target_dir(root).join("release/seine-bench"))
            .current_dir(root)
            .arg(name)
            .arg("--json")
            .arg(&json)
            .args(extra),
    );
    release_bpffs()?;
    ran
}
