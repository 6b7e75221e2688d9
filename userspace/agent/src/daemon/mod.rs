//! seine-agent, the node agent: its start-up and its loop (the binary only calls `main`).
//!
//! It runs the service datapath — eBPF (maps pinned per node, programs attached to pod veths) or, where eBPF cannot be used, nftables or iptables — and programs
//! services from a watched file of Service and EndpointSlice objects, and pods' hostPorts from
//! what seine-cni records (attaching the eBPF programs to the uplinks that carry them). Serves
//! /healthz, /readyz and /metrics; stops on SIGTERM leaving the datapath in place, so a restart
//! breaks no connection.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::{
    bpf::PinnedMaps,
    metrics::AgentMetrics,
    nodenet,
    proxy::{api::ApiSource, file::Objects},
};
use clap::Parser;
use seine_common::STAT_NAMES;
use seine_component_base::{health, metrics};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

mod active;
mod args;
mod services;

use active::{cleanup, start_ebpf, start_rules, write_status, Active};
pub use args::{Args, IptablesChoice, LogFormat, Mode};
use services::{FileWatch, Proxy, Source};

struct Shared {
    metrics: AgentMetrics,
    /// The pod network, when this agent runs it.
    overlay: Option<nodenet::Status>,
    ready: AtomicBool,
    /// Cancelled on SIGTERM: the loop, the health server and readiness stop on it.
    shutdown: CancellationToken,
    /// The eBPF counters, when the eBPF datapath runs.
    stats_maps: Option<std::sync::Mutex<PinnedMaps>>,
    /// The API source of the services, when they come from the API.
    api: Option<Arc<ApiSource>>,
    /// How long a change may wait to be written before /healthz fails.
    healthz_timeout: Duration,
}

/// The binary's whole body: parse the flags, run, and exit with a code that says how it went.
pub fn main() -> ExitCode {
    let args = Args::parse();
    seine_component_base::init_logging(args.log_format == LogFormat::Json, "info");
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("seine-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.cleanup {
        return cleanup(&args);
    }
    // Bad input is refused before anything is touched.
    let initial = match &args.services_file {
        Some(path) => match Objects::from_file(path) {
            Ok(objects) => Some(objects),
            Err(e) => {
                eprintln!("seine-agent: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => None,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The pod network's inputs are checked before anything is touched, like the services file.
    let plugin = cni_plugin(&args)?;
    let pod_network = args.node_name.is_some() && !args.no_pod_network;
    if pod_network && !args.no_cni_install && !plugin.is_file() {
        eprintln!(
            "seine-agent: the CNI plugin to install, {}, does not exist (--cni-plugin)",
            plugin.display()
        );
        return Ok(ExitCode::from(2));
    }
    let services_from_api = args.services_file.is_none()
        && (args.node_name.is_some()
            || args.kubeconfig.is_some()
            || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some());
    let client = if pod_network || services_from_api {
        match runtime.block_on(seine_component_base::client(args.kubeconfig.as_deref())) {
            Ok(client) => Some(client),
            Err(e) => {
                eprintln!("seine-agent: the API server client: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    } else {
        None
    };

    let mut active = match args.datapath {
        Mode::Ebpf => start_ebpf(&args)?,
        Mode::Iptables | Mode::Nftables => start_rules(&args, None)?,
        Mode::Auto => match start_ebpf(&args) {
            Ok(active) => active,
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(%reason, "the eBPF datapath cannot be used here; falling back to nftables or iptables");
                start_rules(&args, Some(reason))?
            }
        },
    };
    let stats_maps = match &active {
        Active::Ebpf { .. } => Some(std::sync::Mutex::new(PinnedMaps::open(&args.bpffs_dir)?)),
        Active::Rules { .. } => None,
    };
    let agent_metrics = AgentMetrics::register(active.datapath().mode());
    let overlay = pod_network.then(|| {
        let status = nodenet::Status::default();
        metrics::register(
            "seine_overlay_peers",
            "Other nodes the VXLAN overlay reaches",
            status.peers.clone(),
        );
        metrics::register(
            "seine_overlay_reconciles",
            "Reconciliations of the overlay's entries, by result",
            status.reconciles.clone(),
        );
        status
    });
    let shutdown = CancellationToken::new();
    let source = match (&args.services_file, &client) {
        (Some(path), _) => Source::File(FileWatch::new(path.clone())),
        (None, Some(client)) if services_from_api => {
            let _in_runtime = runtime.enter();
            Source::Api(ApiSource::start(
                client.clone(),
                args.node_name.clone(),
                shutdown.clone(),
            ))
        }
        _ => Source::Nothing,
    };
    let shared = Arc::new(Shared {
        metrics: agent_metrics,
        overlay: overlay.clone(),
        ready: AtomicBool::new(false),
        shutdown: shutdown.clone(),
        stats_maps,
        api: match &source {
            Source::Api(api) => Some(api.clone()),
            _ => None,
        },
        healthz_timeout: args.healthz_timeout,
    });
    write_status(&args, &active);

    {
        let _in_runtime = runtime.enter();
        seine_component_base::cancel_on_stop_signal(shutdown.clone());
    }
    runtime.block_on(health::serve(
        args.health_addr,
        shared.clone(),
        shutdown.clone(),
    ))?;

    if let (Some(status), Some(node_name), Some(client)) = (overlay, args.node_name.clone(), client)
    {
        let options = nodenet::Options {
            node_name,
            device: args.vxlan_device.clone(),
            vni: args.vxlan_vni,
            port: args.vxlan_port,
            vtep_address: args.vtep_address,
            cni_bin_dir: (!args.no_cni_install).then(|| args.cni_bin_dir.clone()),
            cni_conf_dir: (!args.no_cni_install).then(|| args.cni_conf_dir.clone()),
            cni_plugin: plugin,
            cni_data_dir: args.cni_data_dir.clone(),
            cni_network: args.cni_network.clone(),
            cni_chain: args.cni_chain.clone(),
            bpffs_dir: args.bpffs_dir.clone(),
            resync: Duration::from_secs(args.overlay_resync_seconds.max(1)),
        };
        runtime.spawn(async move {
            if let Err(e) = nodenet::run(client, options, status).await {
                error!("pod network: {e}");
            }
        });
    }

    // Rule-based datapaths write whole tables: a burst of changes is better one write.
    let min_sync = args.min_sync_period.unwrap_or(match active {
        Active::Ebpf { .. } => Duration::ZERO,
        Active::Rules { .. } => Duration::from_secs(1),
    });
    let mut proxy = Proxy::new(&args, source, initial, min_sync);
    proxy.step(&args, &mut active, &shared.metrics);
    active.tick(&args, &shared.metrics, proxy.synced());
    shared.ready.store(proxy.synced(), Ordering::SeqCst);
    info!(synced = proxy.synced(), "started");

    // Waits for the API's changes, and polls the file and the host-port records; the work runs
    // on this thread, not the runtime's worker, so the health server answers while a large
    // change is written.
    let mut tick = {
        let _in_runtime = runtime.enter();
        tokio::time::interval(Duration::from_millis(200))
    };
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let api = shared.api.clone();
    loop {
        let due_in = proxy.due_in();
        let stopped = runtime.block_on(async {
            let changed = async {
                match &api {
                    Some(api) => api.changed.notified().await,
                    None => std::future::pending().await,
                }
            };
            // Changes held back by --min-sync-period go out when it ends, not at the next tick.
            let due = async {
                match due_in {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tick.tick() => false,
                _ = changed => false,
                _ = due => false,
                _ = shutdown.cancelled() => true,
            }
        });
        if stopped {
            break;
        }
        proxy.step(&args, &mut active, &shared.metrics);
        if proxy.synced() && !shared.ready.swap(true, Ordering::SeqCst) {
            info!("ready: the services from the API are written");
        }
        active.tick(&args, &shared.metrics, proxy.synced());
    }
    info!("stopping; the datapath stays in place");
    // Dropping the loaded object would not detach the filters (their links were released), but the
    // process exits right away anyway.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

/// The plugin binary to install: `--cni-plugin`, else `seine-cni` next to this agent.
fn cni_plugin(args: &Args) -> anyhow::Result<PathBuf> {
    match &args.cni_plugin {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe()?.with_file_name("seine-cni")),
    }
}

impl health::Probes for Shared {
    fn ready(&self) -> bool {
        let overlay_ready = self
            .overlay
            .as_ref()
            .is_none_or(|o| o.ready.load(Ordering::SeqCst));
        self.ready.load(Ordering::SeqCst) && overlay_ready && !self.shutdown.is_cancelled()
    }

    /// As kube-proxy's healthz: unhealthy while a change from the API has waited too long.
    fn live(&self) -> bool {
        let waiting = self
            .api
            .as_ref()
            .and_then(|api| api.pending_since())
            .is_some_and(|since| since.elapsed() > self.healthz_timeout);
        !waiting
    }

    fn refresh_metrics(&self) {
        let Some(Ok(maps)) = self.stats_maps.as_ref().map(|m| m.lock()) else {
            return;
        };
        if let Ok(values) = maps.stats() {
            for (value, name) in values.into_iter().zip(STAT_NAMES) {
                self.metrics
                    .packets
                    .get_or_create(&vec![("outcome".into(), name.into())])
                    .set(value as i64);
            }
        }
        self.metrics.map_fill(&maps.fill());
    }
}
