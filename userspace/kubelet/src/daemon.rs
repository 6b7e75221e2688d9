//! The kubelet daemon: its flags (the kubelet's names), the health server on 10248, the Node's
//! registration, and the loops that keep the Node's status and Lease and run the pods, until
//! SIGTERM. Stopping leaves the containers running: the next kubelet adopts them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context as _};
use seine_component_base::{daemon::parse_duration, events::Recorder};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    cri::{Runtime, RuntimeHealth, RuntimeVersion},
    node::{self, StatusReporter},
    pods, Config,
};

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "seine-kubelet",
    version,
    about = "Seine's kubelet: runs the pods bound to this node through a CRI runtime"
)]
pub struct Args {
    /// The kubeconfig to reach the API server with (default: in-cluster, then $KUBECONFIG).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The Node's name (default: the hostname).
    #[arg(long)]
    pub hostname_override: Option<String>,
    /// The Node's InternalIP.
    #[arg(long)]
    pub node_ip: Option<IpAddr>,
    /// Labels of the Node, `key=value,...` (node-role.kubernetes.io/... among them).
    #[arg(long, value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// The CRI runtime's socket.
    #[arg(long, default_value = "unix:///run/containerd/containerd.sock")]
    pub container_runtime_endpoint: String,
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub root_dir: PathBuf,
    /// Where container logs go (the kubelet's /var/log/pods).
    #[arg(long, default_value = "/var/log/pods")]
    pub pod_logs_dir: PathBuf,
    #[arg(long, default_value_t = 110)]
    pub max_pods: u32,
    /// How often the Node's status is checked (written when it changes, else every 5 minutes).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub node_status_update_frequency: Duration,
    /// The kubelet API's port, as the Node advertises it.
    #[arg(long, default_value_t = 10250)]
    pub port: u16,
    #[arg(long, default_value = "127.0.0.1")]
    pub healthz_bind_address: IpAddr,
    /// The port of /healthz and /metrics (0 picks one).
    #[arg(long, default_value_t = 10248)]
    pub healthz_port: u16,
    /// The cluster DNS servers that ClusterFirst pods resolve through.
    #[arg(long, value_delimiter = ',')]
    pub cluster_dns: Vec<IpAddr>,
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The resolver configuration of `dnsPolicy: Default` pods.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// The directory of static pod manifests, run without the API server and shown in it as
    /// mirror pods.
    #[arg(long)]
    pub pod_manifest_path: Option<PathBuf>,
    /// How often the static pod manifests are read again.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub file_check_frequency: Duration,
    /// The hard eviction thresholds, `signal<value,...` (memory.available, nodefs.available,
    /// pid.available; an amount or a percentage): below one, its pressure condition is true.
    #[arg(
        long,
        default_value = "memory.available<100Mi,nodefs.available<10%,pid.available<5%"
    )]
    pub eviction_hard: String,
    /// Logs as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

impl Args {
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut node_labels = BTreeMap::new();
        for pair in self.node_labels.iter().filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                bail!("--node-labels: {pair:?} is not key=value");
            };
            node_labels.insert(k.to_string(), v.to_string());
        }
        let node_name = self
            .hostname_override
            .clone()
            .unwrap_or_else(seine_component_base::hostname)
            .to_lowercase();
        if node_name.is_empty() {
            bail!("the node name is empty");
        }
        Ok(Config {
            node_name,
            node_ip: self.node_ip,
            node_labels,
            root_dir: self.root_dir.clone(),
            pod_logs_dir: self.pod_logs_dir.clone(),
            max_pods: self.max_pods,
            port: self.port,
            cluster_dns: self.cluster_dns.clone(),
            cluster_domain: self.cluster_domain.clone(),
            resolv_conf: self.resolv_conf.clone(),
            pod_manifest_path: self.pod_manifest_path.clone(),
            file_check_frequency: self.file_check_frequency,
            eviction_hard: crate::eviction::Thresholds::parse(&self.eviction_hard)
                .map_err(|e| anyhow::anyhow!("--eviction-hard: {e}"))?,
        })
    }
}

/// Registers the Node, retrying while the API server is not reachable.
async fn register(
    client: &kube::Client,
    config: &Config,
    shutdown: &CancellationToken,
) -> Option<k8s_openapi::api::core::v1::Node> {
    let mut delay = Duration::from_millis(200);
    loop {
        match node::register(client, config).await {
            Ok(node) => return Some(node),
            Err(e) => warn!("registering the node: {e:#}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(7));
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let config = args.config()?;
    std::fs::create_dir_all(&config.root_dir)
        .with_context(|| format!("creating --root-dir {}", config.root_dir.display()))?;
    let shutdown = CancellationToken::new();
    seine_component_base::cancel_on_stop_signal(shutdown.clone());
    let ready = Arc::new(AtomicBool::new(false));
    seine_component_base::health::serve(
        SocketAddr::new(args.healthz_bind_address, args.healthz_port),
        ready.clone(),
        shutdown.clone(),
    )
    .await?;
    let runtime = Runtime::connect(&args.container_runtime_endpoint)?;
    let client = seine_component_base::client(args.kubeconfig.as_deref()).await?;
    let Some(node) = register(&client, &config, &shutdown).await else {
        return Ok(());
    };
    let mut reporter = StatusReporter::new(client.clone(), config.clone(), &node);
    let ctx = Arc::new(pods::Context {
        client: client.clone(),
        runtime: runtime.clone(),
        config: Arc::new(config.clone()),
        recorder: Recorder::new(client.clone(), "kubelet", Some(config.node_name.clone())),
    });
    let pod_loop = tokio::spawn(pods::run(ctx, shutdown.clone()));
    info!(node = %config.node_name, runtime = %args.container_runtime_endpoint, "kubelet running");

    let mut version: Option<RuntimeVersion> = None;
    let mut tick = tokio::time::interval(args.node_status_update_frequency);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        if version.is_none() {
            version = runtime.version().await.ok();
        }
        let health = match runtime.health().await {
            Ok(h) => h,
            Err(e) => RuntimeHealth {
                runtime_ready: Some(format!("{} ({})", e.message, runtime.endpoint)),
                network_ready: None,
            },
        };
        match reporter.report(&health, version.as_ref()).await {
            Ok(node_ready) => ready.store(node_ready, Ordering::SeqCst),
            Err(e) => warn!("{e:#}"),
        }
        if let Err(e) = reporter.renew_lease().await {
            warn!("{e:#}");
        }
    }
    ready.store(false, Ordering::SeqCst);
    match tokio::time::timeout(Duration::from_secs(5), pod_loop).await {
        Ok(Ok(result)) => result?,
        Ok(Err(e)) => warn!("the pod loop ended: {e}"),
        Err(_) => warn!("the pod loop did not stop in time"),
    }
    info!("kubelet stopped");
    Ok(())
}
