//! seine-scheduler: places pods on nodes through the pods/binding subresource, an API client
//! like kube-scheduler (it never touches etcd), safe as several replicas through leader
//! election on the `kube-system/kube-scheduler` Lease.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use seine_component_base::daemon::{self, DaemonArgs};
use seine_scheduler::{self as scheduler, SchedulerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "seine-scheduler",
    version,
    about = "Binds pending pods to nodes that fit them, as kube-scheduler does"
)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Schedule the pods whose spec.schedulerName is this (kube-scheduler's profile name).
    #[arg(long, default_value = "default-scheduler")]
    scheduler_name: String,
    /// Binds in flight at once; decisions stay one at a time.
    #[arg(long, default_value_t = scheduler::DEFAULT_PARALLEL_BINDS, value_parser = clap::value_parser!(u16).range(1..=1024))]
    parallel_binds: u16,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = SchedulerConfig::new(&args.scheduler_name);
    config.parallel_binds = usize::from(args.parallel_binds);
    daemon::main(
        "kube-scheduler",
        &args.daemon,
        10259,
        |client, shutdown| async move {
            scheduler::run(client, config, shutdown)
                .await
                .context("scheduler")
        },
    )
}
