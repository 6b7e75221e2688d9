//! seine-controller-manager: Kubernetes' controllers as tasks of one process, an API client
//! like kube-controller-manager (it never touches etcd), safe as several replicas through
//! leader election on the `kube-system/kube-controller-manager` Lease.

use std::{collections::BTreeSet, process::ExitCode, time::Duration};

use anyhow::bail;
use clap::Parser;
use futures::future::BoxFuture;
use kube::Client;
use seine_component_base::daemon::{self, parse_duration, DaemonArgs};
use seine_controller_manager::serviceaccount::{self, root_ca, token};
use seine_controller_manager::{
    endpointslice, gc, ipam, job, namespace, nodelifecycle, servicecidr,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Every controller this binary runs, by the name `--controllers` takes (kube's names).
const CONTROLLERS: &[&str] = &[
    "garbagecollector",
    "job",
    "namespace",
    "endpointslice",
    "endpoint",
    "nodeipam",
    "nodelifecycle",
    "serviceaccount",
    "serviceaccount-token",
    "root-ca-cert-publisher",
    "service-cidr-controller",
];

#[derive(Debug, Parser)]
#[command(
    name = "seine-controller-manager",
    version,
    about = "Kubernetes' controllers (endpoints, node lifecycle, node IPAM, service accounts and tokens, jobs, namespaces, garbage collection, service CIDRs) as API clients"
)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Controllers to run: `*` for all, a name to add one, `-name` to leave one out
    /// (as kube-controller-manager's `--controllers`).
    #[arg(long, value_delimiter = ',', default_value = "*")]
    controllers: Vec<String>,
    /// The range Node podCIDRs are taken from.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// The prefix length of each Node's podCIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// Whether Nodes get podCIDRs (the node IPAM controller runs only then).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    allocate_node_cidrs: bool,
    /// How long a Node may go without a heartbeat before it is marked Unknown.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    node_monitor_grace_period: Duration,
    /// Endpoints per EndpointSlice at most.
    #[arg(long, default_value_t = 100)]
    max_endpoints_per_slice: usize,
    /// Services synced at once by the endpoints controller.
    #[arg(long, default_value_t = 5)]
    concurrent_service_endpoint_syncs: usize,
    /// How often Node heartbeats are checked.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    node_monitor_period: Duration,
    /// The PKCS#8 P-256 key (PEM) legacy service account tokens are signed with: the file the
    /// API server's `--service-account-signing-key-file` names. Without it the
    /// serviceaccount-token controller does not run.
    #[arg(long)]
    service_account_private_key_file: Option<std::path::PathBuf>,
    /// The cluster's root CA (PEM): `ca.crt` of token Secrets and of every namespace's
    /// `kube-root-ca.crt` ConfigMap. Without it the root-ca-cert-publisher does not run.
    #[arg(long)]
    root_ca_file: Option<std::path::PathBuf>,
}

/// The controllers `--controllers` selects, or an error naming an unknown one.
fn selected(list: &[String]) -> anyhow::Result<BTreeSet<&'static str>> {
    let mut on = BTreeSet::new();
    let mut off = BTreeSet::new();
    for item in list.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        if item == "*" {
            on.extend(CONTROLLERS.iter().copied());
            continue;
        }
        let (name, add) = match item.strip_prefix('-') {
            Some(n) => (n, false),
            None => (item, true),
        };
        let Some(known) = CONTROLLERS.iter().copied().find(|c| *c == name) else {
            bail!(
                "--controllers: unknown controller {name:?} (known: {})",
                CONTROLLERS.join(", ")
            );
        };
        if add {
            on.insert(known);
        } else {
            off.insert(known);
        }
    }
    let mut names: BTreeSet<&'static str> = on.difference(&off).copied().collect();
    if names.contains("endpointslice") {
        names.remove("endpoint");
    }
    Ok(names)
}

fn start(
    name: &'static str,
    args: &Args,
    client: Client,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<BoxFuture<'static, anyhow::Result<()>>>> {
    Ok(match name {
        // One task writes both (the Endpoints follow the same Pods); `endpoint`, kube's name for
        // the legacy half, runs the same task (once, see `selected`).
        "endpointslice" | "endpoint" => {
            let config = endpointslice::Config {
                max_endpoints_per_slice: args.max_endpoints_per_slice,
                workers: args.concurrent_service_endpoint_syncs,
            };
            Some(Box::pin(endpointslice::run(client, config, shutdown)))
        }
        "nodelifecycle" => Some(Box::pin(nodelifecycle::run(
            client,
            nodelifecycle::Config {
                grace_period: args.node_monitor_grace_period,
                monitor_period: args.node_monitor_period,
            },
            shutdown,
        ))),
        "nodeipam" => {
            if !args.allocate_node_cidrs {
                return Ok(None);
            }
            let set = ipam::CidrSet::new(&args.cluster_cidr, args.node_cidr_mask_size)?;
            Some(Box::pin(async move {
                ipam::run(client, set, shutdown).await;
                Ok(())
            }))
        }
        "serviceaccount" => Some(Box::pin(async move {
            serviceaccount::run(client, shutdown).await;
            Ok(())
        })),
        "serviceaccount-token" => {
            let Some(key) = &args.service_account_private_key_file else {
                info!(
                    controller = name,
                    "not started: no --service-account-private-key-file to sign tokens with"
                );
                return Ok(None);
            };
            let config = token::TokenConfig {
                generator: token::TokenGenerator::from_file(key)?,
                root_ca: args
                    .root_ca_file
                    .as_deref()
                    .map(root_ca::read)
                    .transpose()?,
            };
            Some(Box::pin(async move {
                token::run(client, config, shutdown).await;
                Ok(())
            }))
        }
        "root-ca-cert-publisher" => {
            let Some(path) = &args.root_ca_file else {
                info!(
                    controller = name,
                    "not started: no --root-ca-file to publish"
                );
                return Ok(None);
            };
            let ca = root_ca::read(path)?;
            Some(Box::pin(async move {
                root_ca::run(client, ca, shutdown).await;
                Ok(())
            }))
        }
        "garbagecollector" => Some(Box::pin(async move {
            gc::run(client, shutdown).await;
            Ok(())
        })),
        "job" => Some(Box::pin(async move {
            job::run(client, shutdown).await;
            Ok(())
        })),
        "namespace" => Some(Box::pin(async move {
            namespace::run(client, shutdown).await;
            Ok(())
        })),
        "service-cidr-controller" => Some(Box::pin(async move {
            servicecidr::run(client, shutdown).await;
            Ok(())
        })),
        other => bail!("controller {other} is not wired"),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let names = match selected(&args.controllers) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("seine-controller-manager: {e}");
            return ExitCode::from(2);
        }
    };
    // Flags that are wrong are reported now, not once this replica leads.
    if names.contains("nodeipam") && args.allocate_node_cidrs {
        if let Err(e) = ipam::CidrSet::new(&args.cluster_cidr, args.node_cidr_mask_size) {
            eprintln!("seine-controller-manager: --cluster-cidr/--node-cidr-mask-size: {e}");
            return ExitCode::from(2);
        }
    }
    let daemon_args = args.daemon.clone();
    daemon::main(
        "kube-controller-manager",
        &daemon_args,
        10257,
        |client, shutdown| async move {
            let mut tasks = JoinSet::new();
            for name in names {
                if let Some(task) = start(name, &args, client.clone(), shutdown.clone())? {
                    info!(controller = name, "starting");
                    tasks.spawn(async move { (name, task.await) });
                }
            }
            // A controller that stops is an error (the process exits and is restarted), unless
            // it stopped for the shutdown: then each finishes what it does.
            match tasks.join_next().await {
                Some(Ok((name, _))) if shutdown.is_cancelled() => {
                    info!(controller = name, "stopped");
                    while let Some(Ok((name, _))) = tasks.join_next().await {
                        info!(controller = name, "stopped");
                    }
                    Ok(())
                }
                Some(Ok((name, Ok(())))) => bail!("controller {name} stopped"),
                Some(Ok((name, Err(e)))) => Err(e.context(format!("controller {name}"))),
                Some(Err(e)) => bail!("a controller panicked: {e}"),
                None => std::future::pending().await,
            }
        },
    )
}
