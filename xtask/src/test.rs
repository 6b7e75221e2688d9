//! `cargo xtask test` (README's test command, and CI's): setup, then formatting, clippy, the
//! build, every test one at a time, and the DNS fuzz target's smoke run, with a count at the end.

use std::env;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{cargo_in, check, display};
use crate::setup::{nightly_clippy, release_bpffs, setup};

/// How long the fuzz target runs in `cargo xtask test` (a smoke run; fuzz longer by hand).
const FUZZ_SMOKE_SECONDS: u32 = 30;

pub(crate) fn test(root: &Path, extra: &[String]) -> Result<()> {
    setup()?;
    // seine-ebpf builds only for the BPF target, from userspace/agent/build.rs.
    let exclude = ["--workspace", "--exclude", "seine-ebpf"];
    check(cargo_in(root).arg("build").args(exclude))?;
    check(cargo_in(root).args(["fmt", "--all", "--", "--check"]))?;
    check(cargo_in(root).arg("clippy").args(exclude).args([
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The eBPF crate, for the target it is built for.
    if !nightly_clippy() {
        println!("xtask: skipping clippy of seine-ebpf: nightly has no clippy");
    } else {
        check(Command::new("rustup").current_dir(root).args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "seine-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    fuzz_smoke(root)?;
    // The integration tests create network namespaces and bpffs pins: run them one at a time.
    let mut cmd = cargo_in(root);
    cmd.arg("test")
        .args(exclude)
        .args([
            "--no-fail-fast",
            "--lib",
            "--bins",
            "--tests",
            "--",
            "--test-threads=1",
        ])
        .args(extra);
    let counted = run_counting_tests(&mut cmd);
    // Whatever the tests did, leave bpffs as it was before setup (when they left nothing pinned).
    release_bpffs()?;
    let (passed, failed, ok) = counted?;
    // One closing line for the whole run: cargo prints one result line per test binary.
    println!("xtask: {passed} passed, {failed} failed");
    if !ok || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and adds up its `test result:` lines.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64, bool)> {
    println!("xtask: running {}", display(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {}", display(cmd)))?;
    let stdout = child.stdout.take().context("no stdout from cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            passed += count_before(rest, " passed");
            failed += count_before(rest, " failed");
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    Ok((passed, failed, status.success()))
}

/// The number just before `label` in "ok. 9 passed; 0 failed; ...".
fn count_before(text: &str, label: &str) -> u64 {
    text.split(';')
        .find_map(|part| {
            part.trim()
                .rsplit_once(' ')
                .filter(|(_, l)| label.trim() == *l)
        })
        .and_then(|(n, _)| n.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs the DNS query path's fuzz target briefly from its seeds (a fresh corpus each time, so
/// the run does not depend on earlier ones); a crash fails the run and leaves its input under
/// dns/fuzz/artifacts.
fn fuzz_smoke(root: &Path) -> Result<()> {
    let corpus = env::temp_dir().join(format!("seine-dns-fuzz-{}", std::process::id()));
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    println!("xtask: fuzzing the DNS query path for {FUZZ_SMOKE_SECONDS} s");
    let ran = check(
        Command::new("rustup")
            .current_dir(root)
            .args([
                "run",
                "nightly",
                "cargo",
                "fuzz",
                "run",
                "--fuzz-dir",
                "dns/fuzz",
                "query",
            ])
            .arg(&corpus)
            .arg("dns/fuzz/seeds")
            .args([
                "--",
                &format!("-max_total_time={FUZZ_SMOKE_SECONDS}"),
                "-max_len=1500",
                "-print_final_stats=1",
            ]),
    );
    let _ = fs::remove_dir_all(&corpus);
    ran.context("the DNS fuzz target found a crash (input under dns/fuzz/artifacts/query)")
}
