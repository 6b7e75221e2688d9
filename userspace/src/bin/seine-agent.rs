//! seine-agent: the node agent. Loads the datapath (maps pinned per node), attaches it to pod veths,
//! and programs services from a watched file of Service and EndpointSlice objects. Serves
//! /healthz, /readyz and /metrics; stops on SIGTERM leaving the datapath in place, so a restart
//! breaks no connection.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use clap::{Parser, ValueEnum};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use seine::{
    bpf::{self, MapSizes, PinnedMaps, DEFAULT_BPFFS_DIR},
    datapath::{
        ebpf::{EbpfDatapath, Owner},
        Datapath,
    },
    k8s::Objects,
};
use seine_common::STAT_NAMES;
use tracing::{error, info, warn};

#[derive(Parser, Clone)]
#[command(
    name = "seine-agent",
    version,
    about = "Seine's node agent: the eBPF service datapath"
)]
struct Args {
    /// Where this node's maps and programs are pinned.
    #[arg(long, env = "SEINE_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Service and EndpointSlice objects (YAML or JSON), re-read when the file changes.
    #[arg(long)]
    services_file: Option<PathBuf>,
    /// Attach the datapath to every interface whose name starts with one of these prefixes
    /// (the host side of pod veths).
    #[arg(long = "attach-prefix", default_values = ["lxc"])]
    attach_prefixes: Vec<String>,
    /// Datapath implementation.
    #[arg(long, value_enum, default_value_t = Mode::Ebpf)]
    datapath: Mode,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:9962")]
    health_addr: std::net::SocketAddr,
    #[arg(long, default_value_t = seine_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_CT_SIZE)]
    ct_size: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_AFFINITY_SIZE)]
    affinity_size: u32,
    /// Remove Seine's filters from matching interfaces and its pinned maps, then exit.
    #[arg(long)]
    cleanup: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Mode {
    Ebpf,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

struct Metrics {
    registry: Registry,
    services: Gauge,
    syncs: Family<Vec<(String, String)>, Counter>,
    sync_seconds: Histogram,
    attached: Gauge,
    packets: Family<Vec<(String, String)>, Gauge>,
}

impl Metrics {
    fn new(mode: &str) -> Self {
        let mut registry = Registry::default();
        let services = Gauge::default();
        let syncs = Family::<Vec<(String, String)>, Counter>::default();
        let sync_seconds = Histogram::new([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0]);
        let attached = Gauge::default();
        let packets = Family::<Vec<(String, String)>, Gauge>::default();
        let mode_gauge = Family::<Vec<(String, String)>, Gauge>::default();
        mode_gauge
            .get_or_create(&vec![("mode".into(), mode.into())])
            .set(1);
        registry.register("seine_datapath_mode", "The datapath in use", mode_gauge);
        registry.register(
            "seine_services",
            "Service frontends programmed by the agent",
            services.clone(),
        );
        registry.register(
            "seine_sync",
            "Reconciliations of the services file, by result",
            syncs.clone(),
        );
        registry.register(
            "seine_sync_duration_seconds",
            "Time to apply a new desired state",
            sync_seconds.clone(),
        );
        registry.register(
            "seine_attached_interfaces",
            "Interfaces with the datapath attached",
            attached.clone(),
        );
        registry.register(
            "seine_datapath_packets",
            "Packets by datapath outcome, summed over CPUs",
            packets.clone(),
        );
        Metrics {
            registry,
            services,
            syncs,
            sync_seconds,
            attached,
            packets,
        }
    }
}

struct Shared {
    metrics: Metrics,
    ready: AtomicBool,
    stopping: AtomicBool,
    stats_maps: std::sync::Mutex<PinnedMaps>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("seine-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.cleanup {
        return cleanup(&args);
    }
    // Bad input is refused before anything is touched.
    let initial = match &args.services_file {
        Some(path) => match Objects::from_file(path) {
            Ok(objects) => Some(objects.service_specs()),
            Err(e) => {
                eprintln!("seine-agent: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => None,
    };

    let sizes = MapSizes {
        services: args.max_services,
        backends: args.max_backends,
        conntrack: args.ct_size,
        affinity: args.affinity_size,
    };
    let mut ebpf = bpf::load(&args.bpffs_dir, sizes)?;
    let mut datapath = EbpfDatapath::open(&args.bpffs_dir, Owner::Agent)?;
    info!(
        dir = %args.bpffs_dir.display(),
        reused_services = datapath.service_count(),
        "datapath loaded"
    );
    let shared = Arc::new(Shared {
        metrics: Metrics::new(datapath.mode()),
        ready: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        stats_maps: std::sync::Mutex::new(PinnedMaps::open(&args.bpffs_dir)?),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind(args.health_addr))?;
    info!(addr = %args.health_addr, "serving /healthz, /readyz and /metrics");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    let server_shared = shared.clone();
    runtime.spawn(async move {
        let shutdown = async move {
            wait_for_signal().await;
            server_shared.stopping.store(true, Ordering::SeqCst);
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            error!("health server: {e}");
        }
    });

    let mut watcher = args.services_file.clone().map(FileWatch::new);
    if let Some(specs) = initial {
        apply(&mut datapath, &specs, &args.bpffs_dir, &shared.metrics);
    }
    if let Some(w) = watcher.as_mut() {
        w.changed();
    }
    let mut attached: HashMap<String, u32> = HashMap::new();
    attach_new(
        &mut ebpf,
        &args.attach_prefixes,
        &mut attached,
        &shared.metrics,
    );
    shared.ready.store(true, Ordering::SeqCst);
    info!("ready");

    let mut last_gc = Instant::now();
    while !shared.stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if let Some(w) = watcher.as_mut() {
            if w.changed() {
                match Objects::from_file(&w.path) {
                    Ok(objects) => apply(
                        &mut datapath,
                        &objects.service_specs(),
                        &args.bpffs_dir,
                        &shared.metrics,
                    ),
                    Err(e) => {
                        // Keep serving the last good state.
                        error!("{e}; keeping the previous state");
                        shared
                            .metrics
                            .syncs
                            .get_or_create(&vec![("result".into(), "invalid_input".into())])
                            .inc();
                    }
                }
            }
        }
        attach_new(
            &mut ebpf,
            &args.attach_prefixes,
            &mut attached,
            &shared.metrics,
        );
        if last_gc.elapsed() > Duration::from_secs(30) {
            last_gc = Instant::now();
            match datapath.collect_garbage() {
                Ok(n) if n > 0 => info!(removed = n, "expired conntrack entries removed"),
                Ok(_) => {}
                Err(e) => warn!("conntrack garbage collection: {e}"),
            }
        }
    }
    info!("stopping; the datapath stays in place");
    // Dropping the loaded object would not detach the filters (their links were released), but the
    // process exits right away anyway.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

fn apply(
    datapath: &mut EbpfDatapath,
    specs: &[seine::model::ServiceSpec],
    dir: &Path,
    metrics: &Metrics,
) {
    let _lock = match bpf::lock(dir) {
        Ok(lock) => lock,
        Err(e) => {
            error!("{e}");
            return;
        }
    };
    let start = Instant::now();
    let report = datapath.apply(specs);
    let elapsed = start.elapsed();
    metrics.sync_seconds.observe(elapsed.as_secs_f64());
    metrics.services.set(datapath.service_count() as i64);
    for failure in &report.failed {
        error!("{failure}");
    }
    let result = if report.failed.is_empty() {
        "ok"
    } else {
        "error"
    };
    metrics
        .syncs
        .get_or_create(&vec![("result".into(), result.into())])
        .inc();
    info!(
        created = report.created,
        updated = report.updated,
        deleted = report.deleted,
        unchanged = report.unchanged,
        failed = report.failed.len(),
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        "services applied"
    );
}

fn attach_new(
    ebpf: &mut aya::Ebpf,
    prefixes: &[String],
    attached: &mut HashMap<String, u32>,
    metrics: &Metrics,
) {
    let current = bpf::interfaces();
    attached.retain(|name, index| current.iter().any(|(i, n)| n == name && i == index));
    for (index, name) in current {
        if !prefixes.iter().any(|p| name.starts_with(p.as_str()))
            || attached.get(&name) == Some(&index)
        {
            continue;
        }
        match bpf::attach(ebpf, &name) {
            Ok(()) => {
                info!(interface = %name, "datapath attached");
                attached.insert(name, index);
            }
            Err(e) => warn!("{e}"),
        }
    }
    metrics.attached.set(attached.len() as i64);
}

fn cleanup(args: &Args) -> anyhow::Result<ExitCode> {
    for (_, name) in bpf::interfaces() {
        if args
            .attach_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
        {
            bpf::detach(&name);
        }
    }
    bpf::unpin_all(&args.bpffs_dir)?;
    info!(dir = %args.bpffs_dir.display(), "filters detached and pins removed");
    Ok(ExitCode::SUCCESS)
}

/// Notices changes of a file by modification time and size.
struct FileWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl FileWatch {
    fn new(path: PathBuf) -> Self {
        FileWatch { path, seen: None }
    }

    fn changed(&mut self) -> bool {
        let now = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if now.is_some() && now != self.seen {
            self.seen = now;
            return true;
        }
        false
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.ready.load(Ordering::SeqCst) && !shared.stopping.load(Ordering::SeqCst) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if let Ok(maps) = shared.stats_maps.lock() {
        if let Ok(values) = maps.stats() {
            for (value, name) in values.into_iter().zip(STAT_NAMES) {
                shared
                    .metrics
                    .packets
                    .get_or_create(&vec![("outcome".into(), name.into())])
                    .set(value as i64);
            }
        }
    }
    let mut body = String::new();
    match encode(&mut body, &shared.metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            e.to_string(),
        ),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (exit) still applies.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}
