//! Seine's task runner: `cargo xtask setup | test | lab | bench`.
//!
//! It deliberately depends on no other workspace crate and only shells out: the `seine` crate's build
//! script needs the eBPF toolchain (nightly rust-src, bpf-linker) that `setup` installs, so xtask must
//! build on a machine that has none of it yet.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Seine's developer tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh Debian 12 machine needs (as root); skips what is already there.
    Setup,
    /// Set up, then build, check formatting, run clippy and run every test serially.
    Test {
        /// Extra arguments for the test binaries, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Manage the demo lab (network namespaces on this machine).
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// Run a benchmark on a release build.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Set up, build and bring the lab up.
    Up,
    /// Remove the lab.
    Down,
    /// Show what of the lab exists.
    Status,
}

#[derive(Subcommand)]
enum Bench {
    /// ClusterIP load balancing: every datapath (eBPF, iptables with both backends, nftables)
    /// against direct pod access.
    Lb {
        /// Where to write the results [default: target/bench/lb.json in the workspace].
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// seine-apiserver on etcd: create/get/update/list rates and latency at 1, 16 and 64 clients,
    /// watch latency to 100 watchers, against raw etcd puts.
    Apiserver {
        /// Where to write the results [default: target/bench/apiserver.json in the workspace].
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// seine-cni: ADD/DEL latency (100 one by one, 20 at once), addresses leaked after 1,000
    /// cycles, pod-to-pod TCP throughput and latency across nodes against within a node.
    Cni {
        /// Where to write the results [default: target/bench/cni.json in the workspace].
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// seine-dns: dnsperf qps and p50/p99 for cluster names over 10,000 services and for cached
    /// external names, against knotd serving the same names, both on one CPU; memory with
    /// 10,000 services and 50,000 pods.
    Dns {
        /// Where to write the results [default: target/bench/dns.json in the workspace].
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// seine-controller-manager: time from a Pod turning Ready to its EndpointSlice showing it,
    /// p50/p99, with 1,000 Services; the API server's own watch delivery as the baseline.
    Endpoints {
        /// Where to write the results [default: target/bench/endpoints.json in the workspace].
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// seine-scheduler: pods bound per second for 1,000 pods on 100 Nodes, against the API
    /// server's raw bind rate (the bench binding them itself) in the same run.
    Scheduler {
        /// Where to write the results [default: target/bench/scheduler.json in the workspace].
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
}

/// The apt packages the build, the tests and the lab use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "iptables",
    // The nftables datapath (kube-proxy's nftables mode) writes its table with nft.
    "nftables",
    "bpftool",
    "ethtool",
    "iperf3",
    "wrk",
    "ncat",
    "socat",
    "netcat-openbsd",
    "conntrack",
    "tcpdump",
    "protobuf-compiler",
    "libprotobuf-dev",
    "etcd-server",
    "etcd-client",
    // The API server tests make client certificates with it.
    "openssl",
    // The CNI tests: DF-bit pings, the reference plugins to chain with, a real runtime.
    "iputils-ping",
    "containernetworking-plugins",
    "containerd",
    "runc",
    "busybox-static",
    // seine-dns: dig in its tests, knotd as upstream and as the bench's ceiling, dnsperf.
    "bind9-dnsutils",
    "knot",
    "dnsperf",
    "python3",
    "procps",
    "util-linux",
    "kmod",
    "ca-certificates",
];

/// 0.10.4 bundles its own LLVM, so it needs no system LLVM; newer releases default to an LLVM that does not
/// match the preinstalled nightly (see /work/shared/TOOLCHAIN.md).
const BPF_LINKER: &str = "bpf-linker@0.10.4";

/// The fuzzing front end for the DNS query path's fuzz target (built with nightly).
const CARGO_FUZZ: &str = "cargo-fuzz@0.13.2";
/// How long the fuzz target runs in `cargo xtask test` (a smoke run; fuzz longer by hand).
const FUZZ_SMOKE_SECONDS: u32 = 30;

const BPFFS: &str = "/sys/fs/bpf";
/// Written when Seine mounted bpffs, so that it unmounts what it mounted once nothing of its own is
/// pinned there (the test harness writes it too when it mounts).
const BPFFS_MARKER: &str = "/run/seine/bpffs-mounted-by-seine";
/// What the kernel's bpf_preload pins in every new bpffs mount: not ours to remove one by one,
/// gone with the mount.
const BPFFS_KERNEL_ENTRIES: [&str; 2] = ["maps.debug", "progs.debug"];

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root()?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => test(&root, &args),
        Cmd::Lab { action } => lab(&root, action),
        Cmd::Bench { bench } => match bench {
            Bench::Lb { json } => {
                run_bench(&root, "lb", json, &["seine-agent", "seine-tests"], &[])
            }
            Bench::Apiserver { json } => bench_apiserver(&root, json),
            Bench::Dns { json } => run_bench(
                &root,
                "dns",
                json,
                &["seine-dns", "seine-apiserver", "seine-tests"],
                &[],
            ),
            Bench::Endpoints { json } => run_bench(
                &root,
                "endpoints",
                json,
                &["seine-controller-manager", "seine-apiserver", "seine-tests"],
                &[],
            ),
            Bench::Scheduler { json } => run_bench(
                &root,
                "scheduler",
                json,
                &["seine-scheduler", "seine-apiserver", "seine-tests"],
                &[],
            ),
            Bench::Cni { json } => run_bench(
                &root,
                "cni",
                json,
                &["seine-agent", "seine-cni", "seine-apiserver", "seine-tests"],
                &[],
            ),
        },
    }
}

fn workspace_root() -> Result<PathBuf> {
    // Compile-time, so it holds whatever directory `cargo xtask` was started from.
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no parent directory", manifest_dir.display()))
}

fn setup() -> Result<()> {
    ensure_root()?;
    setup_apt()?;
    setup_rust()?;
    setup_bpf_linker()?;
    setup_cargo_fuzz()?;
    setup_bpffs()?;
    check_kubectl()?;
    println!("setup: done");
    Ok(())
}

/// kubectl drives the API server tests. No registry reachable here packages it; the machine image
/// ships it at /usr/bin/kubectl, so setup only checks and says what is missing.
fn check_kubectl() -> Result<()> {
    let version = Command::new("kubectl")
        .args(["version", "--client", "-o", "yaml"])
        .output();
    match version {
        Ok(out) if out.status.success() => {
            println!("setup: kubectl ... ok (already installed)");
            Ok(())
        }
        _ => bail!(
            "kubectl is not installed: the API server tests need a kubectl client (v1.32 or near) on PATH"
        ),
    }
}

fn ensure_root() -> Result<()> {
    let uid = output(Command::new("id").arg("-u"))?;
    if uid.trim() != "0" {
        bail!(
            "xtask must run as root: setup installs apt packages and mounts bpffs, and the \
             tests and the lab create network namespaces and load eBPF programs, which need root too"
        );
    }
    Ok(())
}

fn setup_apt() -> Result<()> {
    let mut missing = Vec::new();
    for &pkg in APT_PACKAGES {
        // `dpkg-query` fails for a package it has never heard of: that is just "missing" too.
        let status = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .stderr(Stdio::null())
            .output()
            .context("running dpkg-query (is this Debian?)")?;
        if !String::from_utf8_lossy(&status.stdout).contains("install ok installed") {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        println!("setup: apt packages ... ok (already installed)");
        return Ok(());
    }
    println!("setup: apt packages ... installing {}", missing.join(" "));
    // A fresh machine has empty package lists, but updating costs time, so only when needed.
    check(Command::new("apt-get").arg("update"))?;
    // Packages such as knot and containerd start their daemons on install where systemd runs;
    // Seine's tests start their own on free ports, so the host's are kept from starting (Debian's
    // policy-rc.d: 101 = action forbidden) unless a policy is already in place.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists();
    if own_policy {
        fs::write(
            policy,
            "#!/bin/sh\n# Written by Seine's setup while it installs packages.\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = check(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    );
    if own_policy {
        let _ = fs::remove_file(policy);
    }
    installed?;
    println!("setup: apt packages ... ok (installed)");
    Ok(())
}

fn setup_rust() -> Result<()> {
    // The eBPF crate builds with nightly's `-Z build-std=core`, hence rust-src.
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs)")?;
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: rust nightly toolchain ... ok (already installed)");
    } else {
        println!("setup: rust nightly toolchain ... installing");
        check(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
        println!("setup: rust nightly toolchain ... ok (installed)");
    }

    let nightly = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if nightly.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: nightly rust-src ... ok (already installed)");
    } else {
        println!("setup: nightly rust-src ... installing");
        check(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        println!("setup: nightly rust-src ... ok (installed)");
    }
    // clippy on nightly lints the eBPF crate for its own target in `cargo xtask test`. A nightly
    // may ship without clippy: then that one check is skipped, nothing else.
    if nightly_clippy() {
        println!("setup: nightly clippy ... ok (already installed)");
    } else {
        let added = Command::new("rustup")
            .args(["component", "add", "clippy", "--toolchain", "nightly"])
            .status()
            .is_ok_and(|s| s.success());
        if added {
            println!("setup: nightly clippy ... ok (installed)");
        } else {
            println!("setup: nightly clippy ... not available; the eBPF crate's lint is skipped");
        }
    }

    // `cargo xtask test` runs fmt and clippy on the toolchain that builds the workspace; a rustup
    // `minimal` profile leaves both out.
    let active = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    let absent: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !active.lines().any(|l| l.starts_with(c)))
        .collect();
    if absent.is_empty() {
        println!("setup: rustfmt and clippy ... ok (already installed)");
    } else {
        println!(
            "setup: rustfmt and clippy ... installing {}",
            absent.join(" ")
        );
        check(
            Command::new("rustup")
                .args(["component", "add"])
                .args(&absent),
        )?;
        println!("setup: rustfmt and clippy ... ok (installed)");
    }
    Ok(())
}

fn nightly_clippy() -> bool {
    output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_ok_and(|list| list.lines().any(|l| l.starts_with("clippy")))
}

fn setup_bpf_linker() -> Result<()> {
    let present = Command::new("bpf-linker")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        println!("setup: bpf-linker ... ok (already installed)");
        return Ok(());
    }
    println!("setup: bpf-linker ... installing {BPF_LINKER} (a few minutes)");
    check(Command::new(cargo()).args(["install", BPF_LINKER, "--locked"]))?;
    println!("setup: bpf-linker ... ok (installed)");
    Ok(())
}

fn setup_cargo_fuzz() -> Result<()> {
    let present = Command::new(cargo())
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        println!("setup: cargo-fuzz ... ok (already installed)");
        return Ok(());
    }
    println!("setup: cargo-fuzz ... installing {CARGO_FUZZ} (a minute or two)");
    check(Command::new(cargo()).args(["install", CARGO_FUZZ, "--locked"]))?;
    println!("setup: cargo-fuzz ... ok (installed)");
    Ok(())
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

fn setup_bpffs() -> Result<()> {
    // Not mounted at boot on these machines, and the datapath pins its maps there.
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.contains(&format!(" {BPFFS} bpf ")))
    {
        println!("setup: bpffs at {BPFFS} ... ok (already mounted)");
        return Ok(());
    }
    println!("setup: bpffs at {BPFFS} ... mounting");
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    check(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    if let Some(dir) = Path::new(BPFFS_MARKER).parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(BPFFS_MARKER, "").with_context(|| format!("writing {BPFFS_MARKER}"))?;
    println!("setup: bpffs at {BPFFS} ... ok (mounted; unmounted again when nothing of Seine's is pinned)");
    Ok(())
}

/// Unmounts bpffs if Seine mounted it and nothing but the kernel's own entries is left in it (a
/// running lab keeps it). The mount takes the kernel's preload entries with it.
fn release_bpffs() -> Result<()> {
    if !Path::new(BPFFS_MARKER).exists() {
        return Ok(());
    }
    let entries: Vec<String> = fs::read_dir(BPFFS)
        .with_context(|| format!("reading {BPFFS}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let ours: Vec<&String> = entries
        .iter()
        .filter(|e| !BPFFS_KERNEL_ENTRIES.contains(&e.as_str()))
        .collect();
    if !ours.is_empty() {
        println!("xtask: keeping bpffs at {BPFFS} mounted: it holds {ours:?}");
        return Ok(());
    }
    check(Command::new("umount").arg(BPFFS))?;
    fs::remove_file(BPFFS_MARKER).with_context(|| format!("removing {BPFFS_MARKER}"))?;
    // The agents' status and lock directories, when the tests and the lab left them empty.
    for dir in ["/run/seine/agents", "/run/seine/locks", "/run/seine"] {
        let _ = fs::remove_dir(dir);
    }
    println!("xtask: unmounted bpffs at {BPFFS}, which setup had mounted");
    Ok(())
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
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

fn lab(root: &Path, action: LabAction) -> Result<()> {
    let verb = match action {
        LabAction::Up => {
            setup()?;
            "up"
        }
        LabAction::Down => "down",
        LabAction::Status => "status",
    };
    check(cargo_in(root).args([
        "build",
        "-p",
        "seine-agent",
        "-p",
        "seine-cni",
        "-p",
        "seine-apiserver",
        "-p",
        "seine-controller-manager",
        "-p",
        "seine-scheduler",
        "-p",
        "seine-dns",
        "-p",
        "seine-tests",
    ]))?;
    let lab = target_dir(root).join("debug/seine-lab");
    if verb == "down" {
        check(Command::new(lab).current_dir(root).arg(verb))?;
        return release_bpffs();
    }
    exec(root, Command::new(lab).arg(verb))
}

fn bench_apiserver(root: &Path, json: Option<PathBuf>) -> Result<()> {
    run_bench(
        root,
        "apiserver",
        json,
        &["seine-apiserver", "seine-tests"],
        &[],
    )
}

/// Builds `packages` for release and runs `seine-bench <name> --json <json> <extra>`.
fn run_bench(
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

/// The cargo that runs xtask, so nested builds use the same toolchain.
fn cargo() -> String {
    env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn cargo_in(root: &Path) -> Command {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(root);
    cmd
}

fn target_dir(root: &Path) -> PathBuf {
    // Honour an override so we find the binaries where cargo put them.
    match env::var_os("CARGO_TARGET_DIR") {
        // A relative one resolves against the workspace, where we run cargo.
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn display(cmd: &Command) -> String {
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
fn check(cmd: &mut Command) -> Result<()> {
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
fn output(cmd: &mut Command) -> Result<String> {
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
fn exec(root: &Path, cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("xtask: running {shown}");
    let err = cmd.current_dir(root).exec();
    Err(err).with_context(|| format!("executing `{shown}` (did the build produce it?)"))
}
