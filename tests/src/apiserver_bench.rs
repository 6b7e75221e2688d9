//! `seine-bench apiserver`: seine-apiserver (release build) on a real etcd, driven by kube-rs
//! clients, against raw etcd puts from the same machine in the same run.
//!
//! - raw etcd put rate and latency with 1, 16 and 64 concurrent writers (1 KiB values): the ceiling;
//! - pod create, get, update (PUT with the resourceVersion) and list rates and p50/p99 latency with
//!   1, 16 and 64 concurrent clients; the creates of the three levels add up to 10,000 pods, and
//!   the gets, updates and lists that follow run against all of them (each list returns 10,000);
//! - watch delivery: 100 watchers on one resource while writes arrive at 500/s; latency from the
//!   moment the write is sent to the moment each watcher has the event (so it includes the write).

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    api::{ListParams, PostParams, WatchEvent, WatchParams},
    Api, Client,
};
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::{apiserver::ApiServer, etcd::Etcd, stats::quantile};

const LEVELS: [usize; 3] = [1, 16, 64];
/// Pods created at each level; together the 10,000 the lists return.
const CREATES: [usize; 3] = [1_000, 3_000, 6_000];
const GETS: [usize; 3] = [2_000, 6_000, 12_000];
const UPDATES: [usize; 3] = [1_000, 3_000, 6_000];
const LISTS: [usize; 3] = [5, 16, 64];
const PUTS: [usize; 3] = [2_000, 6_000, 12_000];
const WATCHERS: usize = 100;
const WRITE_RATE: u64 = 500;
const WATCH_SECONDS: u64 = 10;
const NAMESPACE: &str = "bench";

/// Rate and latency of one operation at one concurrency.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    ops: usize,
    per_second: f64,
    p50: f64,
    p99: f64,
}

impl Figures {
    fn from(mut latencies: Vec<f64>, elapsed: Duration) -> Self {
        let ops = latencies.len();
        Figures {
            ops,
            per_second: ops as f64 / elapsed.as_secs_f64().max(1e-9),
            p50: quantile(&mut latencies, 0.5),
            p99: quantile(&mut latencies, 0.99),
        }
    }

    fn json(&self) -> Value {
        json!({"ops": self.ops, "per_second": self.per_second,
               "p50_seconds": self.p50, "p99_seconds": self.p99})
    }
}

/// Runs `total` operations on `clients` concurrent tasks; `op(client, i)` does operation i.
async fn drive<F, Fut>(clients: usize, total: usize, op: F) -> Result<Figures>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let (latencies, elapsed) = crate::in_parallel(clients, total, op).await?;
    Ok(Figures::from(latencies, elapsed))
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "bench", "tier": "load"}},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27",
                                 "ports": [{"containerPort": 80}],
                                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}
    }))
    .unwrap_or_default()
}

async fn etcd_puts(endpoints: &[String]) -> Result<Vec<(usize, Figures)>> {
    let client = etcd_client::Client::connect(endpoints, None)
        .await
        .context("connecting to etcd")?;
    let value = "x".repeat(1024);
    let mut out = Vec::new();
    for (level, &clients) in LEVELS.iter().enumerate() {
        let (client, value) = (client.clone(), value.clone());
        let figures = drive(clients, PUTS[level], move |_, i| {
            let (mut client, value) = (client.clone(), value.clone());
            async move {
                client
                    .put(format!("/bench/raw/{clients}/{i}"), value, None)
                    .await?;
                Ok(())
            }
        })
        .await?;
        println!(
            "bench apiserver: etcd put, {clients:>2} writers: {:>7.0}/s",
            figures.per_second
        );
        out.push((clients, figures));
    }
    Ok(out)
}

struct Level {
    clients: usize,
    /// Pods in the namespace when this level listed them.
    pods: usize,
    create: Figures,
    get: Figures,
    update: Figures,
    list: Figures,
}

async fn api_levels(api: Api<Pod>) -> Result<Vec<Level>> {
    // Creates first, level by level, so that every later operation sees all 10,000 pods. Each
    // level keeps the pods it created, to update them (with the version it last saw).
    let mut creates = Vec::new();
    let mut created = 0usize;
    for (level, &clients) in LEVELS.iter().enumerate() {
        let first = created;
        let owned: Arc<Vec<Mutex<Option<Pod>>>> =
            Arc::new((0..CREATES[level]).map(|_| Mutex::new(None)).collect());
        let (a, o) = (api.clone(), owned.clone());
        let create = drive(clients, CREATES[level], move |_, i| {
            let (api, owned) = (a.clone(), o.clone());
            async move {
                let made = api
                    .create(&PostParams::default(), &pod(&format!("p{}", first + i)))
                    .await?;
                *owned[i].lock().await = Some(made);
                Ok(())
            }
        })
        .await?;
        println!(
            "bench apiserver: {clients:>2} clients: create {:>6.0}/s",
            create.per_second
        );
        created += CREATES[level];
        creates.push((create, owned));
    }
    let total = created;
    let mut levels = Vec::new();
    for ((level, &clients), (create, owned)) in LEVELS.iter().enumerate().zip(creates) {
        let a = api.clone();
        let get = drive(clients, GETS[level], move |_, i| {
            let api = a.clone();
            async move {
                api.get(&format!("p{}", (i * 7919) % total)).await?;
                Ok(())
            }
        })
        .await?;
        let (a, o) = (api.clone(), owned.clone());
        let update = drive(clients, UPDATES[level], move |_, i| {
            let (api, owned) = (a.clone(), o.clone());
            async move {
                let mut slot = owned[i % owned.len()].lock().await;
                let mut current = slot.clone().context("a pod this level created")?;
                let name = current.metadata.name.clone().unwrap_or_default();
                current
                    .metadata
                    .labels
                    .get_or_insert_with(Default::default)
                    .insert("round".into(), i.to_string());
                *slot = Some(api.replace(&name, &PostParams::default(), &current).await?);
                Ok(())
            }
        })
        .await?;
        let a = api.clone();
        let list = drive(clients, LISTS[level], move |_, _| {
            let api = a.clone();
            async move {
                let pods = api.list(&ListParams::default()).await?;
                anyhow::ensure!(pods.items.len() == total, "listed {}", pods.items.len());
                Ok(())
            }
        })
        .await?;
        println!(
            "bench apiserver: {clients:>2} clients: get {:>6.0}/s  update {:>6.0}/s  list({total}) {:>5.1}/s",
            get.per_second, update.per_second, list.per_second
        );
        levels.push(Level {
            clients,
            pods: total,
            create,
            get,
            update,
            list,
        });
    }
    Ok(levels)
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

struct WatchFigures {
    writes: usize,
    write_rate: f64,
    events: usize,
    missing: usize,
    p50: f64,
    p99: f64,
}

/// 100 watchers on config maps while writers create them at 500/s; each config map carries the
/// time its create was sent.
async fn watch_latency(client: Client) -> Result<WatchFigures> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "bench-watch");
    let rv = api
        .list(&ListParams::default().limit(1))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let total = (WRITE_RATE * WATCH_SECONDS) as usize;
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let api = api.clone();
        let rv = rv.clone();
        watchers.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(total);
            let params = WatchParams::default().timeout(WATCH_SECONDS as u32 + 50);
            let mut stream = api.watch(&params, &rv).await?.boxed();
            while latencies.len() < total {
                let next = tokio::time::timeout(Duration::from_secs(15), stream.try_next()).await;
                let event = match next {
                    Ok(Ok(Some(event))) => event,
                    _ => break,
                };
                if let WatchEvent::Added(cm) = event {
                    let sent: u128 = cm
                        .data
                        .as_ref()
                        .and_then(|d| d.get("sent"))
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    latencies.push(now_nanos().saturating_sub(sent) as f64 / 1e9);
                }
            }
            anyhow::Ok(latencies)
        }));
    }
    // Let every watch open before the writes start.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    let mut writes = Vec::new();
    let interval = Duration::from_nanos(1_000_000_000 / WRITE_RATE);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let api = api.clone();
        writes.push(tokio::spawn(async move {
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"name": format!("w{i}")},
                "data": {"sent": now_nanos().to_string()}
            }))?;
            api.create(&PostParams::default(), &cm).await?;
            anyhow::Ok(())
        }));
    }
    let mut written = 0usize;
    for w in writes {
        if w.await.is_ok_and(|r| r.is_ok()) {
            written += 1;
        }
    }
    let write_time = start.elapsed();
    let mut all = Vec::new();
    let mut missing = 0;
    for w in watchers {
        let latencies = w.await.context("a watcher failed")??;
        missing += written.saturating_sub(latencies.len());
        all.extend(latencies);
    }
    let events = all.len();
    Ok(WatchFigures {
        writes: written,
        write_rate: written as f64 / write_time.as_secs_f64(),
        events,
        missing,
        p50: quantile(&mut all, 0.5),
        p99: quantile(&mut all, 0.99),
    })
}

pub fn run(json_path: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("bench apiserver: starting etcd and seine-apiserver");
    let etcd = Etcd::start()?;
    let server = ApiServer::start(&etcd)?;
    runtime.block_on(async {
        let puts = etcd_puts(&etcd.endpoints()).await?;
        let client = server.bench_client().await?;
        for ns in [NAMESPACE, "bench-watch"] {
            let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
            let object = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
            namespaces.create(&PostParams::default(), &object).await?;
        }
        let levels = api_levels(Api::namespaced(client.clone(), NAMESPACE)).await?;
        println!(
            "bench apiserver: {WATCHERS} watchers, writes at {WRITE_RATE}/s for {WATCH_SECONDS} s"
        );
        let watch = watch_latency(client).await?;
        report(json_path, &puts, &levels, &watch)
    })
}

fn report(
    json_path: &Path,
    puts: &[(usize, Figures)],
    levels: &[Level],
    watch: &WatchFigures,
) -> Result<()> {
    let put_at = |c: usize| {
        puts.iter()
            .find(|(n, _)| *n == c)
            .map(|(_, f)| *f)
            .unwrap_or_default()
    };
    let level_at = |c: usize| levels.iter().find(|l| l.clients == c);
    let at64 = level_at(64).context("the 64-client level")?;
    let summary = json!({
        "create_rate_over_etcd_put_rate": at64.create.per_second / put_at(64).per_second,
        "mutating_p99_seconds_64_clients": at64.create.p99.max(at64.update.p99),
        "watch_p99_seconds_100_watchers": watch.p99,
    });
    let mut by_level = serde_json::Map::new();
    for l in levels {
        by_level.insert(
            format!("clients_{}", l.clients),
            json!({"create": l.create.json(), "get": l.get.json(), "update": l.update.json(),
                   "list": l.list.json(), "list_pods": l.pods,
                   "etcd_put": put_at(l.clients).json()}),
        );
    }
    let report = json!({
        "bench": "apiserver",
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "kernel": crate::sh("uname", &["-r"]).unwrap_or_default().trim()},
        "method": {"client": "kube-rs 5 (HTTP/1.1 connection pool), one process, same machine as etcd and the server",
                   "etcd": "one member, data directory on the local disk; raw puts of 1 KiB values with etcd-client",
                   "list": "creates run first at each level (1,000 + 3,000 + 6,000 pods); gets, updates and lists then run against all 10,000; each list returns 10,000 pods",
                   "watch": format!("{WATCHERS} watchers, {WRITE_RATE} creates/s for {WATCH_SECONDS} s; latency from sending the create to the watcher decoding the event")},
        "levels": by_level,
        "watch": {"watchers": WATCHERS, "writes": watch.writes, "write_rate": watch.write_rate,
                  "events": watch.events, "missing_events": watch.missing,
                  "p50_seconds": watch.p50, "p99_seconds": watch.p99},
        "summary": summary,
    });
    println!();
    println!(
        "{:>7} {:<10} {:>9} {:>10} {:>10}",
        "CLIENTS", "OP", "OPS/S", "P50(ms)", "P99(ms)"
    );
    for l in levels {
        let put = put_at(l.clients);
        let list = format!("list-{}", l.pods);
        for (name, f) in [
            ("etcd-put", &put),
            ("create", &l.create),
            ("get", &l.get),
            ("update", &l.update),
            (list.as_str(), &l.list),
        ] {
            println!(
                "{:>7} {:<10} {:>9.1} {:>10.2} {:>10.2}",
                l.clients,
                name,
                f.per_second,
                f.p50 * 1e3,
                f.p99 * 1e3
            );
        }
    }
    println!(
        "\nwatch: {} watchers, {} writes at {:.0}/s, {} events ({} missing): p50 {:.1} ms, p99 {:.1} ms",
        WATCHERS,
        watch.writes,
        watch.write_rate,
        watch.events,
        watch.missing,
        watch.p50 * 1e3,
        watch.p99 * 1e3
    );
    println!("\nsummary: {summary}");
    crate::write_report(json_path, &report)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("wrote {}", json_path.display());
    Ok(())
}
