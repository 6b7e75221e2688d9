//! Seine's task runner: `cargo xtask setup | test | lab | bench | image`.
//!
//! It depends on no other workspace crate but seine-image (which builds with plain std) and
//! otherwise shells out: the agent crate's build script needs the eBPF toolchain (nightly
//! rust-src, bpf-linker) that `setup` installs, so xtask must build on a machine that has none of
//! it yet.

use std::env;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod cmd;
mod image;
mod lab;
mod setup;
mod test;

use bench::{bench_apiserver, run_bench};
use lab::lab;
use setup::setup;
use test::test;

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
    /// Build the images (seine, pause, seine-echo) as OCI archives and import them into
    /// containerd's k8s.io namespace.
    Image {
        /// Where the archives go [default: target/images in the workspace].
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// containerd's socket to import into (skipped when there is none).
        #[arg(long, value_name = "SOCKET")]
        containerd_address: Option<PathBuf>,
    },
    /// Run a benchmark on a release build.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
pub(crate) enum LabAction {
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
    /// seine-agent on the API: time from an API write to the datapath holding it, p50/p99 over
    /// 300 changes at 100/s with 10,000 Services x 10 endpoints, and the cold sync of them all,
    /// eBPF and iptables; the API server's watch delivery as the baseline.
    Programming {
        /// Where to write the results [default: target/bench/programming.json in the workspace].
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
}

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
        Cmd::Image {
            out,
            containerd_address,
        } => image::image(&root, out, containerd_address),
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
            Bench::Programming { json } => run_bench(
                &root,
                "programming",
                json,
                &["seine-agent", "seine-apiserver", "seine-tests"],
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
