//! Turning a Corefile into running servers: a pipeline per port (server blocks with their plugins),
//! the kubernetes plugin's API client (`endpoint`, `tls`, `kubeconfig`, else in-cluster), the HTTP
//! endpoints of `health`, `ready` and `prometheus`, and `reload`, which rebuilds the pipelines from a
//! changed Corefile and swaps them in while queries keep being answered.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use axum::{extract::State, http::StatusCode, routing::get, Router};
use hickory_server::Server as DnsServer;
use kube::Client;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    corefile::{self, CorefileError},
    forward::Forwarder,
    metrics::{BuildLabels, Metrics},
    server::{Block, Handler, Pipeline},
    sync::{self, ViewHandle},
};

/// How long changes from the watches are gathered before a new view is built.
pub const VIEW_SETTLE: Duration = Duration::from_millis(50);

/// Reads and parses a Corefile; errors name the file and line.
pub fn load(path: &Path, default_port: u16) -> anyhow::Result<(Vec<corefile::Server>, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading Corefile {}", path.display()))?;
    Ok((parse(&text, path, default_port)?, text))
}

/// Parses the text of the Corefile at `path` (`{$ENV}` from the environment).
pub fn parse(text: &str, path: &Path, default_port: u16) -> anyhow::Result<Vec<corefile::Server>> {
    corefile::parse(text, default_port, &|k| std::env::var(k).ok())
        .map_err(|e: CorefileError| anyhow!("{}:{}: {}", path.display(), e.line, e.message))
}

/// The API client the kubernetes block asks for, as CoreDNS picks it: `kubeconfig` (with its
/// context), else `endpoint` (with `tls` client certificates when given), else in-cluster.
pub async fn kube_client(k: &corefile::Kubernetes) -> anyhow::Result<Client> {
    let config = if let Some((path, context)) = &k.kubeconfig {
        let file = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("kubernetes: reading kubeconfig {}", path.display()))?;
        let options = kube::config::KubeConfigOptions {
            context: context.clone(),
            ..Default::default()
        };
        kube::Config::from_custom_kubeconfig(file, &options)
            .await
            .with_context(|| format!("kubernetes: kubeconfig {}", path.display()))?
    } else if let Some(endpoint) = &k.endpoint {
        match &k.tls {
            Some((cert, key, ca)) => {
                let q = |p: &PathBuf| serde_json::to_string(&p.display().to_string());
                let yaml = format!(
                    "{{\"apiVersion\":\"v1\",\"kind\":\"Config\",\"current-context\":\"c\",\
                     \"clusters\":[{{\"name\":\"c\",\"cluster\":{{\"server\":{},\"certificate-authority\":{}}}}}],\
                     \"users\":[{{\"name\":\"u\",\"user\":{{\"client-certificate\":{},\"client-key\":{}}}}}],\
                     \"contexts\":[{{\"name\":\"c\",\"context\":{{\"cluster\":\"c\",\"user\":\"u\"}}}}]}}",
                    serde_json::to_string(endpoint)?,
                    q(ca)?,
                    q(cert)?,
                    q(key)?
                );
                let file = kube::config::Kubeconfig::from_yaml(&yaml)?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .context("kubernetes: endpoint with tls")?
            }
            None => kube::Config::new(
                endpoint
                    .parse()
                    .with_context(|| format!("kubernetes: endpoint {endpoint:?} is not a URL"))?,
            ),
        }
    } else {
        kube::Config::incluster().context(
            "kubernetes: not running in a cluster (no KUBERNETES_SERVICE_HOST or service account); \
             give the kubernetes block `kubeconfig` or `endpoint`",
        )?
    };
    Ok(Client::try_from(config)?)
}

/// Views by the kubernetes configuration they were started from, kept across reloads.
#[derive(Default)]
pub struct Views {
    views: Vec<(corefile::Kubernetes, ViewHandle)>,
}

/// Whether two kubernetes blocks watch the same thing (the same API server, the same kinds), so
/// that they can share one view whatever else differs (zones, ttl, fallthrough...).
fn same_watches(a: &corefile::Kubernetes, b: &corefile::Kubernetes) -> bool {
    let pods = |k: &corefile::Kubernetes| k.pods == corefile::PodsMode::Verified;
    a.endpoint == b.endpoint && a.tls == b.tls && a.kubeconfig == b.kubeconfig && pods(a) == pods(b)
}

impl Views {
    async fn get(&mut self, k: &corefile::Kubernetes) -> anyhow::Result<ViewHandle> {
        if let Some((_, v)) = self.views.iter().find(|(c, _)| same_watches(c, k)) {
            return Ok(v.clone());
        }
        let client = kube_client(k).await?;
        let view = sync::spawn(client, VIEW_SETTLE, k.pods == corefile::PodsMode::Verified);
        self.views.push((k.clone(), view.clone()));
        Ok(view)
    }

    /// Forgets views no pipeline uses any more (their watches stop).
    fn keep_only(&mut self, used: &[corefile::Kubernetes]) {
        self.views
            .retain(|(c, _)| used.iter().any(|u| same_watches(c, u)));
    }
}

/// Builds the pipelines (one per port) for `servers`.
pub async fn build(
    servers: &[corefile::Server],
    views: &mut Views,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<BTreeMap<u16, Pipeline>> {
    let mut pipelines: BTreeMap<u16, Pipeline> = BTreeMap::new();
    let mut used = Vec::new();
    for s in servers {
        let view = match &s.kubernetes {
            Some(k) => {
                used.push(k.clone());
                Some(views.get(k).await?)
            }
            None => None,
        };
        let forward = match &s.forward {
            Some(f) => {
                let forwarder = Forwarder::new(f, metrics.forward.clone())
                    .with_context(|| format!("forward (line {})", s.line))?;
                // Ends by itself when the forwarder is dropped (a reload replaces it).
                forwarder.spawn_health_checks();
                Some(forwarder)
            }
            None => None,
        };
        pipelines
            .entry(s.listen.port)
            .or_insert_with(|| Pipeline { blocks: Vec::new() })
            .blocks
            .push(Arc::new(Block::new(s, view, forward, metrics)));
    }
    views.keep_only(&used);
    Ok(pipelines)
}

/// Whether every kubernetes plugin in `pipelines` has synced.
pub fn all_synced<'a>(pipelines: impl IntoIterator<Item = &'a Pipeline>) -> bool {
    pipelines
        .into_iter()
        .flat_map(|p| &p.blocks)
        .filter_map(|b| b.kubernetes.as_ref())
        .all(|k| k.view.synced())
}

/// Waits for the kubernetes plugins to sync, at most the longest `startup_timeout` (CoreDNS holds
/// the server's start the same way; after that, cluster names are SERVFAIL until synced).
pub async fn wait_synced(pipelines: &BTreeMap<u16, Pipeline>) {
    let limit = pipelines
        .values()
        .flat_map(|p| &p.blocks)
        .filter_map(|b| b.kubernetes.as_ref())
        .map(|k| k.config.startup_timeout)
        .max();
    let Some(limit) = limit else { return };
    let deadline = Instant::now() + limit;
    while !all_synced(pipelines.values()) {
        if Instant::now() >= deadline {
            warn!(
                timeout = ?limit,
                "kubernetes: starting before the first sync; cluster names are SERVFAIL until it \
                 completes"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!("kubernetes: synced");
}

/// One port's listeners and the handler they share.
pub struct Listener {
    pub handler: Handler,
    /// TCP, on hickory-server.
    pub server: DnsServer<Handler>,
    pub udp: SocketAddr,
    /// UDP (`udp::serve`); aborted to stop.
    pub udp_task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Stops taking queries: UDP at once, TCP once its connections are done.
    pub async fn stop(mut self) {
        self.udp_task.abort();
        if let Err(e) = self.server.shutdown_gracefully().await {
            warn!(error = %e, "stopping the tcp listener");
        }
    }
}

/// Binds UDP and TCP on `port` (all addresses, as CoreDNS does without `bind`).
pub async fn listen(
    port: u16,
    pipeline: Pipeline,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Listener> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let udp = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("listen udp {addr}"))?;
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen tcp {addr}"))?;
    let udp_addr = udp.local_addr()?;
    let handler = Handler::new(pipeline, metrics.clone());
    let mut server = DnsServer::new(handler.clone());
    server.register_listener(tcp, Duration::from_secs(10), 64 * 1024);
    let udp_task = tokio::spawn(crate::udp::serve(udp, handler.clone()));
    Ok(Listener {
        handler,
        server,
        udp: udp_addr,
        udp_task,
    })
}

/// Sends the `loop` plugin's probe (`<random>.<random>.<zone> HINFO`) to this server a few times;
/// the handler exits the process if the probe comes back around more than twice.
pub fn spawn_loop_probes(listeners: &BTreeMap<u16, Listener>) {
    for l in listeners.values() {
        for block in &l.handler.current().blocks {
            let Some(probe) = &block.loop_probe else {
                continue;
            };
            let name = probe.name.clone();
            let target = SocketAddr::from(([127, 0, 0, 1], l.udp.port()));
            tokio::spawn(async move {
                for _ in 0..5 {
                    if probe_once(&name, target).await {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
    }
}

async fn probe_once(name: &str, target: SocketAddr) -> bool {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RecordType},
    };
    let Ok(qname) = Name::from_ascii(name) else {
        return true;
    };
    let mut m = Message::query();
    m.metadata.id = rand::random();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(qname, RecordType::HINFO));
    let Ok(bytes) = m.to_vec() else { return true };
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else {
        return false;
    };
    if sock.send_to(&bytes, target).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 512];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), sock.recv(&mut buf)).await,
        Ok(Ok(_))
    )
}

/// What the HTTP endpoints need.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<prometheus_client::registry::Registry>,
    pub handlers: Arc<std::sync::RwLock<Vec<Handler>>>,
}

async fn health() -> &'static str {
    "OK"
}

/// Whether a kubernetes plugin has yet to sync (also kept in `seine_dns_kubernetes_synced`).
fn waiting(s: &HttpState) -> bool {
    let handlers = match s.handlers.read() {
        Ok(h) => h.clone(),
        Err(e) => e.into_inner().clone(),
    };
    // Before the listeners exist (the first sync is awaited before them) nothing is ready.
    let pipelines: Vec<_> = handlers.iter().map(Handler::current).collect();
    let waiting = pipelines.is_empty() || !all_synced(pipelines.iter().map(|p| &**p));
    s.metrics.kubernetes_sync.set(i64::from(!waiting));
    waiting
}

async fn ready(State(s): State<HttpState>) -> (StatusCode, String) {
    if waiting(&s) {
        (StatusCode::SERVICE_UNAVAILABLE, "kubernetes\n".into())
    } else {
        (StatusCode::OK, "OK".into())
    }
}

async fn metrics(
    State(s): State<HttpState>,
) -> (StatusCode, [(&'static str, &'static str); 1], String) {
    waiting(&s);
    let mut out = String::new();
    let status = match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => StatusCode::OK,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (
        status,
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
}

/// Serves `/health`, `/ready` and `/metrics` on the addresses the Corefile gives each (several on
/// one address share a listener).
pub async fn serve_http(
    servers: &[corefile::Server],
    state: HttpState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut routes: BTreeMap<SocketAddr, BTreeSet<&'static str>> = BTreeMap::new();
    for s in servers {
        if let Some((addr, _)) = s.health {
            routes.entry(addr).or_default().insert("/health");
        }
        if let Some(addr) = s.ready {
            routes.entry(addr).or_default().insert("/ready");
        }
        if let Some(addr) = s.prometheus {
            routes.entry(addr).or_default().insert("/metrics");
        }
    }
    for (addr, paths) in routes {
        let mut router = Router::new();
        for p in &paths {
            router = match *p {
                "/health" => router.route("/health", get(health)),
                "/ready" => router.route("/ready", get(ready)),
                _ => router.route("/metrics", get(metrics)),
            };
        }
        let router = router.with_state(state.clone());
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!(
                "listen http {addr} ({})",
                paths.iter().copied().collect::<Vec<_>>().join(", ")
            )
        })?;
        info!(%addr, paths = ?paths, "serving");
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                warn!(%addr, error = %e, "http server stopped");
            }
        });
    }
    Ok(())
}

/// Sets `coredns_build_info`.
pub fn build_info(metrics: &Metrics) {
    metrics
        .build_info
        .get_or_create(&BuildLabels {
            version: env!("CARGO_PKG_VERSION"),
            revision: "",
            goversion: "",
        })
        .set(1);
}
