//! What seine-controller-manager and seine-scheduler share as daemons: the API client from
//! `--kubeconfig` (or the in-cluster configuration), structured logs, `/healthz`, `/livez`,
//! `/readyz` and `/metrics`, leader election on a Lease (`--leader-elect`, on by default as in
//! Kubernetes), and a graceful stop on SIGTERM or SIGINT that gives the Lease up.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, LazyLock,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use kube::Client;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    health,
    leader::{Elector, LeaderConfig},
    metrics,
};

pub use seine_apimachinery::duration::parse_flag as parse_duration;

/// The flags both daemons take, with kube-controller-manager's and kube-scheduler's names.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// The kubeconfig to reach the API server with (default: the in-cluster configuration, then
    /// $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Run only while holding the leader Lease, so that several replicas are safe.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: bool,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
    /// The Lease's name (default: the daemon's, as in Kubernetes).
    #[arg(long)]
    pub leader_elect_resource_name: Option<String>,
    #[arg(long, default_value = "kube-system")]
    pub leader_elect_resource_namespace: String,
    /// Where /healthz, /livez, /readyz and /metrics are served (plain HTTP).
    #[arg(long, default_value = "127.0.0.1")]
    pub bind_address: IpAddr,
    /// The port of the health and metrics endpoints (0 picks a free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// Logs as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeaseLabels {
    name: String,
}

/// `leader_election_master_status{name}`: 1 while this replica holds the Lease, as in Kubernetes.
static LEADER: LazyLock<Family<LeaseLabels, Gauge>> = LazyLock::new(|| {
    let gauge = Family::<LeaseLabels, Gauge>::default();
    metrics::register(
        "leader_election_master_status",
        "1 while this replica holds the leader Lease, else 0",
        gauge.clone(),
    );
    gauge
});

/// How long the work may take to finish after SIGTERM, leaving time to give the Lease up
/// within a supervisor's usual grace period.
const FINISH_WITHIN: Duration = Duration::from_secs(3);

fn identity() -> String {
    format!("{}_{:016x}", crate::hostname(), rand::random::<u64>())
}

/// Runs a daemon: logs, health and metrics on `default_port` (unless `--port`), then `work`
/// (given the client and the shutdown token) while this replica leads. Exits 0 on SIGTERM after
/// giving the Lease up, 1 when `work` fails or leadership is lost (as Kubernetes' components
/// do, so that a supervisor restarts them as candidates).
pub fn main<F, Fut>(name: &str, args: &DaemonArgs, default_port: u16, work: F) -> ExitCode
where
    F: FnOnce(Client, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::init_logging(args.log_json, "info");
    // Errors name the program (seine-scheduler), not the component it stands in for.
    let program = std::env::args()
        .next()
        .and_then(|a| a.rsplit('/').next().map(str::to_string))
        .unwrap_or_else(|| name.to_string());
    crate::block_on(&program, run(name, args, default_port, work))
}

async fn run<F, Fut>(
    name: &str,
    args: &DaemonArgs,
    default_port: u16,
    work: F,
) -> anyhow::Result<()>
where
    F: FnOnce(Client, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    if args.leader_elect && args.leader_elect_renew_deadline >= args.leader_elect_lease_duration {
        bail!("--leader-elect-renew-deadline must be shorter than --leader-elect-lease-duration");
    }
    let shutdown = CancellationToken::new();
    crate::cancel_on_stop_signal(shutdown.clone());
    let ready = Arc::new(AtomicBool::new(false));
    let addr = SocketAddr::new(args.bind_address, args.port.unwrap_or(default_port));
    health::serve(addr, ready.clone(), shutdown.clone()).await?;
    let client = crate::client(args.kubeconfig.as_deref()).await?;

    let lease_name = args
        .leader_elect_resource_name
        .clone()
        .unwrap_or_else(|| name.to_string());
    let gauge = LEADER
        .get_or_create(&LeaseLabels {
            name: lease_name.clone(),
        })
        .clone();
    let elector = if args.leader_elect {
        let mut config = LeaderConfig::new(&lease_name, &identity());
        config.namespace = args.leader_elect_resource_namespace.clone();
        config.lease_duration = args.leader_elect_lease_duration;
        config.renew_deadline = args.leader_elect_renew_deadline;
        config.retry_period = args.leader_elect_retry_period;
        info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, "waiting to lead");
        let elector = Elector::new(client.clone(), config);
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        gauge.set(1);
        Some(elector)
    } else {
        None
    };
    ready.store(true, Ordering::Relaxed);
    info!(component = name, "running");

    let stop = shutdown.clone();
    let work = work(client, shutdown.clone());
    tokio::pin!(work);
    let lost = async {
        match &elector {
            Some(e) => e.hold().await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        result = &mut work => result.context("stopped"),
        _ = lost => Err(anyhow::anyhow!("leader election lost")),
        // The work sees the token too: it finishes what is in flight, within a bound.
        _ = stop.cancelled() => match tokio::time::timeout(FINISH_WITHIN, &mut work).await {
            Ok(result) => result.context("stopping"),
            Err(_) => {
                warn!(within = ?FINISH_WITHIN, "the work did not finish; stopping anyway");
                Ok(())
            }
        },
    };
    gauge.set(0);
    ready.store(false, Ordering::Relaxed);
    shutdown.cancel();
    if let Some(elector) = &elector {
        if outcome.is_ok() {
            match tokio::time::timeout(Duration::from_secs(5), elector.release()).await {
                Ok(Ok(())) => info!("gave the lease up"),
                Ok(Err(e)) => warn!("giving the lease up: {e}"),
                Err(_) => warn!("giving the lease up timed out"),
            }
        }
    }
    outcome
}
