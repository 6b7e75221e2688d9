//! `seine-bench programming`: how long after an API write the node's datapath holds it, with
//! 10,000 Services x 10 endpoints in the API, for seine-agent in eBPF mode and in iptables mode
//! (the nft backend, kube-proxy's default `--min-sync-period` of 1 s).
//!
//! A change is one write: a Service created (its EndpointSlice made beforehand), an endpoint
//! added to a Service's slice, or one removed; a third of the samples each, one every
//! `PACE`, each on a Service of its own. The datapath holds a change when the kernel does:
//! the Service's entry in the pinned services map with the new endpoint count (eBPF, looked up
//! every `POLL`), or the commit that leaves its iptables chain with that many DNAT rules, as
//! the kernel's nf_tables events report it (iptables). The cold sync is the time from the agent's start to
//! the datapath holding all 10,000 Services with their endpoints.
//!
//! The baseline, in the same run: when the same writes reach a watcher of the API (the API
//! server's write and watch delivery, which the agent's figure includes and cannot beat).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    api::{Patch, PatchParams, PostParams},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use seine_agent::{
    bpf::PinnedMaps,
    datapath::{ebpf::service_key, iptables::service_chain},
    model::{Frontend, Protocol},
};
use serde_json::{json, Value};

use crate::{
    apiserver::ApiServer,
    cni::Relay,
    dns_bench::create_all,
    nft_monitor::{NatTable, NftMonitor},
    proxy::MANAGED_BY,
    stats::quantile,
    Node,
};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;
/// Samples per mode: a third of each kind.
const CHANGES: usize = 300;
/// 100 changes a second.
const PACE: Duration = Duration::from_millis(10);
const POLL: Duration = Duration::from_millis(1);
const NS: &str = "default";
const PORT: u16 = 80;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ebpf,
    Iptables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
        }
    }

    fn agent_args(self) -> &'static [&'static str] {
        match self {
            Mode::Ebpf => &["--datapath", "ebpf"],
            Mode::Iptables => &["--datapath", "iptables", "--iptables-backend", "nft"],
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Created,
    Added,
    Removed,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Created => "service created",
            Kind::Added => "endpoint added",
            Kind::Removed => "endpoint removed",
        }
    }
}

/// One change waiting for the datapath: the Service's VIP holds `want` endpoints.
struct Probe {
    id: usize,
    vip: Ipv4Addr,
    want: usize,
}

/// What the observer and the API watch share with the writer.
#[derive(Default)]
struct Board {
    sent: HashMap<usize, Instant>,
    pending: Vec<Probe>,
    /// When the datapath held each change.
    held: HashMap<usize, Instant>,
    /// What a watcher of the API will see of each change: an object's name and, for a slice,
    /// its endpoint count.
    unwatched: HashMap<(String, Option<usize>), usize>,
    /// When a watcher of the API saw each change (the baseline).
    watched: HashMap<usize, Instant>,
    /// The cold sync: VIPs still to be held with their endpoint counts, and when they all were.
    cold: HashMap<Ipv4Addr, usize>,
    cold_done: Option<Instant>,
}

type Shared = Arc<Mutex<Board>>;

fn lock(board: &Shared) -> std::sync::MutexGuard<'_, Board> {
    board.lock().unwrap_or_else(|e| e.into_inner())
}

impl Board {
    /// Settles every probe and cold entry that `holds(vip)` says is now held, at `at`.
    fn settle(&mut self, at: Instant, mut holds: impl FnMut(Ipv4Addr) -> Option<usize>) {
        let mut held = Vec::new();
        self.pending.retain(|p| {
            let done = holds(p.vip) == Some(p.want);
            if done {
                held.push(p.id);
            }
            !done
        });
        for id in held {
            self.held.entry(id).or_insert(at);
        }
        if self.cold_done.is_none() && !self.cold.is_empty() {
            self.cold.retain(|vip, want| holds(*vip) != Some(*want));
            if self.cold.is_empty() {
                self.cold_done = Some(at);
            }
        }
    }

    fn busy(&self) -> bool {
        !self.pending.is_empty() || (self.cold_done.is_none() && !self.cold.is_empty())
    }
}

fn frontend(vip: Ipv4Addr) -> Frontend {
    Frontend {
        ip: vip.into(),
        port: PORT,
        protocol: Protocol::Tcp,
    }
}

/// Watches the datapath of one node until `stop`.
struct Observer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Observer {
    /// eBPF: point lookups in the pinned services map (opened once the agent has pinned it).
    fn ebpf(node: &Node, board: Shared) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, stopping) = (node.bpffs_dir.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<()> {
            let maps = loop {
                if stopping.load(Ordering::Relaxed) {
                    return Ok(());
                }
                match PinnedMaps::open(&dir) {
                    Ok(maps) => break maps,
                    Err(_) => std::thread::sleep(POLL),
                }
            };
            let holds = |vip: Ipv4Addr| {
                let key = service_key(&frontend(vip))?;
                let value = maps.services.get(&key, 0).ok()?;
                Some(value.count as usize)
            };
            while !stopping.load(Ordering::Relaxed) {
                let mut board = lock(&board);
                if board.busy() {
                    board.settle(Instant::now(), holds);
                }
                drop(board);
                std::thread::sleep(POLL);
            }
            Ok(())
        });
        Observer {
            stop,
            thread: Some(thread),
        }
    }

    /// iptables: the node's nf_tables events, each commit checked as it happens. The monitor
    /// listens before this returns, so that it sees every rule the agent writes.
    fn iptables(node: &Node, board: Shared) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, stopping) = (node.ns.path(), stop.clone());
        let (opened, listening) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<()> {
            let monitor = crate::enter(&path).and_then(|()| NftMonitor::open());
            let mut monitor = match monitor {
                Ok(m) => {
                    let _ = opened.send(Ok(()));
                    m
                }
                Err(e) => {
                    let _ = opened.send(Err(format!("{e:#}")));
                    return Err(e);
                }
            };
            let mut table = NatTable::default();
            let mut chains: HashMap<Ipv4Addr, String> = HashMap::new();
            while !stopping.load(Ordering::Relaxed) {
                let Some(at) = monitor.next_commit(&mut table)? else {
                    continue;
                };
                let mut board = lock(&board);
                if board.busy() {
                    board.settle(at, |vip| {
                        let chain = chains
                            .entry(vip)
                            .or_insert_with(|| service_chain(&frontend(vip)));
                        table
                            .jumps("SEINE-SERVICES", chain)
                            .then(|| table.dnats(chain))
                    });
                }
            }
            Ok(())
        });
        match listening.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("monitoring nf_tables: {e}"),
            Err(_) => bail!("the nf_tables monitor ended"),
        }
        Ok(Observer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Observer {
    /// Why the observer stopped, once its thread has ended.
    fn ended(&mut self) -> Option<String> {
        if !self.thread.as_ref()?.is_finished() {
            return None;
        }
        match self.thread.take()?.join() {
            Ok(Ok(())) => Some("the observer stopped".into()),
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("the observer panicked".into()),
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn slice_endpoints(first: usize, count: usize) -> Value {
    let endpoints: Vec<Value> = (first..first + count)
        .map(|n| {
            let ip = Ipv4Addr::from(0x0af4_0000u32 + n as u32);
            json!({"addresses": [ip.to_string()],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": "node-1"})
        })
        .collect();
    Value::Array(endpoints)
}

fn slice(service: &str, endpoints: Value) -> Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("{service}-a"),
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))?)
}

fn service(name: &str, cluster_ip: Option<Ipv4Addr>) -> Result<Service> {
    let mut spec = json!({"ports": [{"name": "http", "port": PORT, "targetPort": 8080}]});
    if let Some(ip) = cluster_ip {
        spec["clusterIP"] = json!(ip.to_string());
    }
    Ok(serde_json::from_value(
        json!({"metadata": {"name": name}, "spec": spec}),
    )?)
}

/// The figures of one mode.
struct Figures {
    mode: Mode,
    cold_sync: f64,
    /// (kind, latency in seconds) of every change.
    samples: Vec<(Kind, f64)>,
    watch: Vec<f64>,
    /// Watch delivery to datapath, per change.
    agent: Vec<f64>,
}

pub fn run(json_path: &Path) -> Result<()> {
    crate::on_api_server(async |api| bench(api, json_path).await)
}

/// What the API holds: each Service's VIP and endpoint count, and the next endpoint address.
struct Cluster {
    client: Client,
    vips: Vec<Ipv4Addr>,
    expected: HashMap<Ipv4Addr, usize>,
    next_endpoint: usize,
}

async fn bench(api: &ApiServer, json_path: &Path) -> Result<()> {
    let client = api.kube_client().await;
    let (code, body) = api.post("/api/v1/nodes", &json!({"metadata": {"name": "node-1"}}))?;
    if code != 201 {
        bail!("creating the Node: {code} {body}");
    }
    println!("bench programming: creating {SERVICES} Services x {ENDPOINTS} endpoints");
    let started = Instant::now();
    let services = create_all(&client, "programming", "services", SERVICES, |i| {
        let svc = service(&format!("svc-{i}"), None).unwrap_or_default();
        (NS.to_string(), svc)
    })
    .await?;
    create_all(&client, "programming", "endpointslices", SERVICES, |i| {
        let slice = slice(
            &format!("svc-{i}"),
            slice_endpoints(i * ENDPOINTS, ENDPOINTS),
        )
        .unwrap_or_default();
        (NS.to_string(), slice)
    })
    .await?;
    println!(
        "bench programming: {} objects in {:.1} s",
        2 * SERVICES,
        started.elapsed().as_secs_f64()
    );
    let mut vips = Vec::with_capacity(SERVICES);
    for svc in &services {
        let ip = svc
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .context("a Service without a cluster IP")?;
        vips.push(ip);
    }
    let mut cluster = Cluster {
        client,
        expected: vips.iter().map(|ip| (*ip, ENDPOINTS)).collect(),
        vips,
        next_endpoint: SERVICES * ENDPOINTS,
    };

    let mut figures = Vec::new();
    for (round, mode) in [Mode::Ebpf, Mode::Iptables].into_iter().enumerate() {
        figures.push(bench_mode(api, &mut cluster, mode, round).await?);
    }
    report(&figures, json_path)
}

async fn bench_mode(
    api: &ApiServer,
    cluster: &mut Cluster,
    mode: Mode,
    round: usize,
) -> Result<Figures> {
    let name = mode.name();
    let client = cluster.client.clone();
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);

    // The Services this round creates: their slices first, their VIPs free ones of the range.
    let taken: HashSet<Ipv4Addr> = cluster.expected.keys().copied().collect();
    let mut free = (1u32..)
        .map(|n| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 128, 0)) + n))
        .filter(|ip| !taken.contains(ip));
    let mut created = Vec::new();
    for k in (0..CHANGES).filter(|k| k % 3 == 0) {
        let svc = format!("new-{name}-{k}");
        let first = cluster.next_endpoint;
        cluster.next_endpoint += ENDPOINTS;
        slices
            .create(
                &PostParams::default(),
                &slice(&svc, slice_endpoints(first, ENDPOINTS))?,
            )
            .await
            .with_context(|| format!("creating the slice of {svc}"))?;
        created.push((svc, free.next().context("no free VIP")?));
    }

    println!("bench programming [{name}]: starting the agent with {SERVICES}+ Services in the API");
    let mut node = Node::create("bp")?;
    let _relay = Relay::start(&node.ns, api.addr.port())?;
    node.services_from_api = true;
    let board: Shared = Arc::default();
    lock(&board).cold = cluster.expected.clone();
    let mut observer = match mode {
        Mode::Ebpf => Observer::ebpf(&node, board.clone()),
        Mode::Iptables => Observer::iptables(&node, board.clone())?,
    };
    let kubeconfig = api.kubeconfig.display().to_string();
    let mut args = mode.agent_args().to_vec();
    args.extend([
        "--kubeconfig",
        &kubeconfig,
        "--node-name",
        "node-1",
        "--no-pod-network",
    ]);
    let start = Instant::now();
    node.start_agent(&args)?;
    let agent_log = |node: &Node| {
        let log = node
            .agent
            .as_ref()
            .map(|a| a.log_text())
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    let cold_sync = loop {
        if let Some(done) = lock(&board).cold_done {
            break done.duration_since(start).as_secs_f64();
        }
        if let Some(e) = observer.ended() {
            bail!("[{name}] watching the datapath: {e}");
        }
        if start.elapsed() > Duration::from_secs(180) {
            bail!(
                "[{name}] the datapath did not hold every Service within 180 s ({} left):\n{}",
                lock(&board).cold.len(),
                agent_log(&node)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    println!("bench programming [{name}]: cold sync of {SERVICES}+ Services in {cold_sync:.2} s");

    let watch = spawn_watch(&client, board.clone());
    // The watch has listed before the first change.
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!("bench programming [{name}]: {CHANGES} changes, one every {PACE:?}");
    // Added to and removed from Services of this round's own range.
    let base = round * CHANGES;
    let mut kinds = HashMap::new();
    let mut writes = Vec::new();
    let mut ticker = tokio::time::interval(PACE);
    let mut created = created.into_iter();
    for k in 0..CHANGES {
        ticker.tick().await;
        let (kind, vip, want, watch_key, write) = match k % 3 {
            0 => {
                let (svc, vip) = created.next().context("no Service to create")?;
                let watch_key = (svc.clone(), None);
                let services = services.clone();
                let write = tokio::spawn(async move {
                    services
                        .create(&PostParams::default(), &service(&svc, Some(vip))?)
                        .await
                        .with_context(|| format!("creating {svc}"))?;
                    anyhow::Ok(())
                });
                (Kind::Created, vip, ENDPOINTS, watch_key, write)
            }
            n => {
                let i = base + k;
                let vip = cluster.vips[i];
                let (kind, want) = if n == 1 {
                    (Kind::Added, ENDPOINTS + 1)
                } else {
                    (Kind::Removed, ENDPOINTS - 1)
                };
                let endpoints = if kind == Kind::Added {
                    let mut all = slice_endpoints(i * ENDPOINTS, ENDPOINTS);
                    if let (Value::Array(all), Value::Array(more)) =
                        (&mut all, slice_endpoints(cluster.next_endpoint, 1))
                    {
                        all.extend(more);
                    }
                    cluster.next_endpoint += 1;
                    all
                } else {
                    slice_endpoints(i * ENDPOINTS, ENDPOINTS - 1)
                };
                let slices = slices.clone();
                let name = format!("svc-{i}-a");
                let watch_key = (name.clone(), Some(want));
                let write = tokio::spawn(async move {
                    slices
                        .patch(
                            &name,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"endpoints": endpoints})),
                        )
                        .await
                        .with_context(|| format!("changing {name}"))?;
                    anyhow::Ok(())
                });
                (kind, vip, want, watch_key, write)
            }
        };
        {
            let mut board = lock(&board);
            board.sent.insert(k, Instant::now());
            board.pending.push(Probe { id: k, vip, want });
            board.unwatched.insert(watch_key, k);
        }
        cluster.expected.insert(vip, want);
        kinds.insert(k, kind);
        writes.push(write);
    }
    for w in writes {
        w.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock(&board).busy() || lock(&board).watched.len() < CHANGES {
        if let Some(e) = observer.ended() {
            bail!("[{name}] watching the datapath: {e}");
        }
        if Instant::now() > deadline {
            let board = lock(&board);
            bail!(
                "[{name}] {} of {CHANGES} changes not in the datapath, {} not watched, after 60 s:\n{}",
                board.pending.len(),
                CHANGES - board.watched.len(),
                agent_log(&node)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    drop(observer);
    node.stop_agent()?;

    let board = lock(&board);
    let since = |at: &HashMap<usize, Instant>, id: &usize| -> Option<f64> {
        Some(
            at.get(id)?
                .saturating_duration_since(board.sent[id])
                .as_secs_f64(),
        )
    };
    let samples = kinds
        .iter()
        .filter_map(|(id, kind)| Some((*kind, since(&board.held, id)?)))
        .collect();
    let watch = kinds
        .keys()
        .filter_map(|id| since(&board.watched, id))
        .collect();
    // The agent's own share: from the bench's watcher seeing a change to the datapath holding
    // it (both watchers hear the API server at about the same moment).
    let agent = kinds
        .keys()
        .filter_map(|id| {
            let (held, watched) = (board.held.get(id)?, board.watched.get(id)?);
            Some(held.saturating_duration_since(*watched).as_secs_f64())
        })
        .collect();
    Ok(Figures {
        mode,
        cold_sync,
        samples,
        watch,
        agent,
    })
}

/// Records when each change reaches a watcher of Services and EndpointSlices: a Service by its
/// name, a slice by its name and endpoint count.
fn spawn_watch(client: &Client, board: Shared) -> tokio::task::JoinHandle<()> {
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    tokio::spawn(async move {
        let services = watcher(services, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .filter_map(|s| async move { Some((s.ok()?.metadata.name?, None)) });
        let slices = watcher(slices, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .filter_map(|s| async move {
                let s = s.ok()?;
                let count = s.endpoints.len();
                Some((s.metadata.name?, Some(count)))
            });
        let mut events = futures::stream::select(services.boxed(), slices.boxed());
        while let Some(key) = events.next().await {
            let now = Instant::now();
            let mut board = lock(&board);
            if let Some(id) = board.unwatched.remove(&key) {
                board.watched.insert(id, now);
            }
        }
    })
}

fn report(figures: &[Figures], json_path: &Path) -> Result<()> {
    let mut summary = json!({"target_p99_seconds_ebpf": 0.05, "target_cold_sync_seconds": 2.0});
    let mut modes = serde_json::Map::new();
    println!();
    println!(
        "{:<9} {:<34} {:>9} {:>9} {:>9} {:>8}",
        "MODE", "CHANGE (API write -> datapath)", "P50(ms)", "P99(ms)", "MAX(ms)", "SAMPLES"
    );
    for f in figures {
        let name = f.mode.name();
        // (what the table says, the JSON key, samples)
        let of_kind = |kind: Kind| -> Vec<f64> {
            f.samples
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, s)| *s)
                .collect()
        };
        let rows: Vec<(&str, &str, Vec<f64>)> = vec![
            (
                "all changes",
                "all",
                f.samples.iter().map(|(_, s)| *s).collect(),
            ),
            (
                Kind::Created.name(),
                "service_created",
                of_kind(Kind::Created),
            ),
            (Kind::Added.name(), "endpoint_added", of_kind(Kind::Added)),
            (
                Kind::Removed.name(),
                "endpoint_removed",
                of_kind(Kind::Removed),
            ),
            (
                "baseline: API watch delivery",
                "baseline_watch",
                f.watch.clone(),
            ),
            (
                "agent's share: watch -> datapath",
                "agent_share",
                f.agent.clone(),
            ),
        ];
        let mut by_row = serde_json::Map::new();
        for (row, key, mut samples) in rows {
            let (p50, p99, max) = (
                quantile(&mut samples, 0.5),
                quantile(&mut samples, 0.99),
                quantile(&mut samples, 1.0),
            );
            println!(
                "{:<9} {:<34} {:>9.1} {:>9.1} {:>9.1} {:>8}",
                name,
                row,
                p50 * 1e3,
                p99 * 1e3,
                max * 1e3,
                samples.len()
            );
            by_row.insert(
                key.to_string(),
                json!({"p50_seconds": p50, "p99_seconds": p99, "max_seconds": max,
                       "samples": samples.len()}),
            );
            match key {
                "all" => {
                    summary[format!("programming_p50_seconds_{name}")] = json!(p50);
                    summary[format!("programming_p99_seconds_{name}")] = json!(p99);
                }
                "baseline_watch" | "agent_share" => {
                    summary[format!("{key}_p99_seconds_{name}")] = json!(p99);
                }
                _ => {}
            }
        }
        summary[format!("cold_sync_seconds_{name}")] = json!(f.cold_sync);
        modes.insert(
            name.to_string(),
            json!({"cold_sync_seconds": f.cold_sync, "changes": by_row,
                   "agent_args": f.mode.agent_args()}),
        );
    }
    println!();
    for f in figures {
        println!(
            "{:<9} cold sync of {SERVICES} Services x {ENDPOINTS} endpoints: {:.2} s",
            f.mode.name(),
            f.cold_sync
        );
    }
    let report = json!({
        "bench": "programming",
        "services": SERVICES,
        "endpoints_per_service": ENDPOINTS,
        "changes_per_mode": CHANGES,
        "changes_per_second": 1.0 / PACE.as_secs_f64(),
        "method": "each change on a Service of its own; held when the pinned services map holds \
                   the new endpoint count (eBPF, polled every 1 ms) or at the commit that leaves \
                   the Service's chain with that many DNATs, from the kernel's nf_tables events \
                   (iptables, nft backend); the baseline is a watcher of the API in the bench",
        "modes": modes,
        "summary": summary,
    });
    crate::write_report(json_path, &report)?;
    println!("bench programming: wrote {}", json_path.display());
    Ok(())
}
