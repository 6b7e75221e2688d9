//! `cargo xtask setup`: what the build, the tests and the lab need on a fresh Debian machine (apt
//! packages, the Rust toolchains and rust-src, bpf-linker, cargo-fuzz, a bpffs mount), each
//! installed only when missing.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{cargo, check, output};

/// The apt packages the build, the tests and the lab use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    // The kubelet tests fetch from pods inside the node namespace with it.
    "wget",
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

const BPFFS: &str = "/sys/fs/bpf";

/// Written when Seine mounted bpffs, so that it unmounts what it mounted once nothing of its own is
/// pinned there (the test harness writes it too when it mounts).
const BPFFS_MARKER: &str = "/run/seine/bpffs-mounted-by-seine";

/// What the kernel's bpf_preload pins in every new bpffs mount: not ours to remove one by one,
/// gone with the mount.
const BPFFS_KERNEL_ENTRIES: [&str; 2] = ["maps.debug", "progs.debug"];

pub(crate) fn setup() -> Result<()> {
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

pub(crate) fn nightly_clippy() -> bool {
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
pub(crate) fn release_bpffs() -> Result<()> {
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
