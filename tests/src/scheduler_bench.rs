//! `seine-bench scheduler`: how fast seine-scheduler (release build) places 1,000 pods on 100
//! registered Nodes, against the API server's raw bind rate measured in the same run.
//!
//! - ceiling: the bench creates 1,000 pods, then binds them itself through pods/binding, 16
//!   binds in flight (the scheduler's own limit), as fast as the API server takes them: from
//!   the first bind sent to the last pod seen bound through a watch;
//! - scheduler: those pods deleted, seine-scheduler runs (its caches synced by a warm-up pod)
//!   and 1,000 fresh pods are created while it is paused (SIGSTOP), so that it meets the whole
//!   burst at once; from its resumption (SIGCONT) to the last pod seen bound through the same
//!   kind of watch. Its Scheduled events are written after the burst; when the last one is
//!   there is reported beside.
//!
//! Each phase runs three rounds (fresh pods each time); the figures are the medians.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Binding, Event, Namespace, Node, ObjectReference, Pod},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status},
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use serde_json::json;

use crate::{apiserver::ApiServer, controllers::Daemon, sh};

const NODES: usize = 100;
const PODS: usize = 1_000;
/// Requests in flight at once: the bench's binds and creates, and the scheduler's binds.
const CONCURRENCY: usize = 16;
/// Rounds of each phase; the figures are their medians.
const ROUNDS: usize = 3;
const WARMUP_NS: &str = "bench-warmup";
const WAIT: Duration = Duration::from_secs(300);

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

fn pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10",
                                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}
    }))?)
}

/// Runs `op(i)` for i in 0..total with `CONCURRENCY` in flight; returns the elapsed time.
async fn drive<F, Fut>(total: usize, op: F) -> Result<Duration>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let (_, elapsed) = crate::in_parallel(CONCURRENCY, total, move |_, i| op(i)).await?;
    Ok(elapsed)
}

async fn create_pods(client: &Client, namespace: &str) -> Result<Duration> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    drive(PODS, move |i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &pod(&format!("pod-{i:04}"))?)
                .await
                .with_context(|| format!("creating pod {i}"))?;
            Ok(())
        }
    })
    .await
}

/// When the watch has seen every one of `count` pods in `namespace` bound to a node.
async fn all_bound(client: Client, namespace: String, count: usize) -> Result<Instant> {
    let api: Api<Pod> = Api::namespaced(client, &namespace);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut bound: HashSet<String> = HashSet::new();
    while let Some(event) = events.next().await {
        let pods = match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
            Ok(_) => Vec::new(),
            Err(e) => {
                eprintln!("bench scheduler: watching pods: {e}");
                Vec::new()
            }
        };
        for p in pods {
            if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                bound.insert(p.metadata.name.unwrap_or_default());
            }
        }
        if bound.len() >= count {
            return Ok(Instant::now());
        }
    }
    bail!("the pod watch ended with {} of {count} bound", bound.len())
}

async fn register_nodes(client: &Client) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    drive(NODES, move |i| {
        let nodes = nodes.clone();
        async move {
            let name = node_name(i);
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}
            }))?;
            nodes.create(&PostParams::default(), &node).await?;
            let resources = json!({"cpu": "32", "memory": "128Gi", "pods": "110"});
            let status = json!({"status": {"capacity": resources, "allocatable": resources,
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .with_context(|| format!("the status of {name}"))?;
            Ok(())
        }
    })
    .await?;
    Ok(())
}

/// Binds every pod of the namespace itself, round the nodes, `CONCURRENCY` at a time.
async fn bind_all(client: &Client, namespace: &str) -> Result<Duration> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    drive(PODS, move |i| {
        let api = api.clone();
        async move {
            let name = format!("pod-{i:04}");
            let binding = Binding {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                target: ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Node".into()),
                    name: Some(node_name(i % NODES)),
                    ..Default::default()
                },
            };
            api.create_subresource::<_, Status>("binding", &name, &PostParams::default(), &binding)
                .await
                .with_context(|| format!("binding {name}"))?;
            Ok(())
        }
    })
    .await
}

/// Sends SIGCONT on drop, so that a failing bench never leaves the scheduler stopped.
struct Paused(u32);

impl Paused {
    fn stop(pid: u32) -> Result<Self> {
        sh("kill", &["-STOP", &pid.to_string()])?;
        Ok(Paused(pid))
    }

    fn resume(self) -> Result<()> {
        sh("kill", &["-CONT", &self.0.to_string()])?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = sh("kill", &["-CONT", &self.0.to_string()]);
    }
}

pub fn run(json_path: &Path) -> Result<()> {
    crate::on_api_server(async |api| bench(api, json_path).await)
}

/// One round of one phase.
#[derive(Debug, Clone, Copy)]
struct Round {
    seconds: f64,
    per_second: f64,
}

impl Round {
    fn of(elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64();
        Round {
            seconds,
            per_second: PODS as f64 / seconds.max(1e-9),
        }
    }
}

/// The round with the median rate.
fn median(rounds: &[Round]) -> Round {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| a.per_second.total_cmp(&b.per_second));
    sorted[sorted.len() / 2]
}

fn ceiling_ns(round: usize) -> String {
    format!("bench-ceiling-{round}")
}

fn scheduler_ns(round: usize) -> String {
    format!("bench-{round}")
}

/// One ceiling round: create the pods (timed for scale), then bind them all.
async fn ceiling_round(client: &Client, namespace: &str) -> Result<(Round, Round)> {
    let watch = tokio::spawn(all_bound(client.clone(), namespace.into(), PODS));
    let create = Round::of(create_pods(client, namespace).await?);
    let started = Instant::now();
    bind_all(client, namespace).await?;
    let done = tokio::time::timeout(WAIT, watch)
        .await
        .context("the ceiling's binds were not all seen")???;
    Ok((create, Round::of(done - started)))
}

/// One scheduler round: the pods created while it is paused, then bound by it.
async fn scheduler_round(
    client: &Client,
    scheduler: &Daemon,
    namespace: &str,
) -> Result<(Round, Option<f64>)> {
    let watch = tokio::spawn(all_bound(client.clone(), namespace.into(), PODS));
    let paused = Paused::stop(scheduler.process.pid())?;
    create_pods(client, namespace).await?;
    let resumed = Instant::now();
    paused.resume()?;
    let done = match tokio::time::timeout(WAIT, watch).await {
        Ok(done) => done??,
        Err(_) => bail!(
            "seine-scheduler did not bind every pod within {WAIT:?}:\n{}",
            scheduler.log_text()
        ),
    };
    let round = Round::of(done - resumed);
    // The next round starts once this one's Scheduled events are all written.
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let scheduled_events = ListParams::default().fields("reason=Scheduled");
    let deadline = Instant::now() + Duration::from_secs(120);
    let written = loop {
        let n = events.list(&scheduled_events).await?.items.len();
        if n >= PODS {
            break Some(resumed.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            eprintln!("bench scheduler: only {n} of {PODS} Scheduled events were written");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok((round, written))
}

async fn bench(api: &ApiServer, json_path: &Path) -> Result<()> {
    let client = api.bench_client().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut names = vec![WARMUP_NS.to_string()];
    names.extend((0..ROUNDS).flat_map(|r| [ceiling_ns(r), scheduler_ns(r)]));
    for ns in names {
        let object: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        namespaces.create(&PostParams::default(), &object).await?;
    }
    register_nodes(&client).await?;
    println!("bench scheduler: {NODES} nodes registered (32 CPUs, 128 GiB, 110 pods, Ready)");

    // The ceiling: the API server binding pods as fast as it can.
    let mut creates = Vec::new();
    let mut ceiling = Vec::new();
    for r in 0..ROUNDS {
        let (create, bind) = ceiling_round(&client, &ceiling_ns(r)).await?;
        println!(
            "bench scheduler: round {r}: {PODS} pods created in {:.2} s ({:.0}/s), bound directly in {:.2} s ({:.0}/s)",
            create.seconds, create.per_second, bind.seconds, bind.per_second
        );
        creates.push(create);
        ceiling.push(bind);
    }
    for r in 0..ROUNDS {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ceiling_ns(r));
        pods.delete_collection(
            &DeleteParams::default().grace_period(0),
            &ListParams::default(),
        )
        .await?;
        let deadline = Instant::now() + WAIT;
        while !pods
            .list(&ListParams::default().limit(1))
            .await?
            .items
            .is_empty()
        {
            if Instant::now() > deadline {
                bail!("the ceiling's pods were not deleted");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The scheduler, its caches synced (a warm-up pod bound), meeting each burst.
    let scheduler = Daemon::scheduler(api, &["--leader-elect=false"])?;
    let warmup: Api<Pod> = Api::namespaced(client.clone(), WARMUP_NS);
    warmup
        .create(&PostParams::default(), &pod("warmup")?)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while warmup
        .get("warmup")
        .await?
        .spec
        .and_then(|s| s.node_name)
        .is_none()
    {
        if Instant::now() > deadline {
            bail!(
                "seine-scheduler did not bind the warm-up pod:\n{}",
                scheduler.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut scheduled = Vec::new();
    let mut events_written = Vec::new();
    for r in 0..ROUNDS {
        let (round, written) = scheduler_round(&client, &scheduler, &scheduler_ns(r)).await?;
        println!(
            "bench scheduler: round {r}: seine-scheduler bound {PODS} pods in {:.2} s ({:.0}/s); Scheduled events all written after {}",
            round.seconds,
            round.per_second,
            written.map_or("(not all)".to_string(), |s| format!("{s:.1} s"))
        );
        scheduled.push(round);
        events_written.push(written);
    }

    // Where the pods of the scheduler's rounds went.
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for r in 0..ROUNDS {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &scheduler_ns(r));
        for p in pods.list(&ListParams::default()).await?.items {
            if let Some(node) = p.spec.and_then(|s| s.node_name) {
                *per_node.entry(node).or_default() += 1;
            }
        }
    }
    let (min, max) = (0..NODES)
        .map(|i| per_node.get(&node_name(i)).copied().unwrap_or(0))
        .fold((usize::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
    drop(scheduler);

    report(
        json_path,
        &Phases {
            ceiling,
            scheduled,
            creates,
            events_written,
            spread: (min, max),
        },
    )
}

struct Phases {
    ceiling: Vec<Round>,
    scheduled: Vec<Round>,
    creates: Vec<Round>,
    events_written: Vec<Option<f64>>,
    /// Fewest and most pods per node over the scheduler's rounds.
    spread: (usize, usize),
}

fn report(json_path: &Path, phases: &Phases) -> Result<()> {
    let ceiling = median(&phases.ceiling);
    let scheduled = median(&phases.scheduled);
    let create = median(&phases.creates);
    let ratio = scheduled.per_second / ceiling.per_second.max(1e-9);
    let rounds = |rs: &[Round]| -> Vec<serde_json::Value> {
        rs.iter()
            .map(|r| json!({"seconds": r.seconds, "per_second": r.per_second}))
            .collect()
    };
    let (min, max) = phases.spread;
    let summary = json!({
        "pods_per_second": scheduled.per_second,
        "bind_ceiling_per_second": ceiling.per_second,
        "scheduled_over_bind_ceiling": ratio,
    });
    let report = json!({
        "bench": "scheduler",
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "kernel": sh("uname", &["-r"]).unwrap_or_default().trim()},
        "method": {
            "nodes": NODES, "pods_per_round": PODS, "rounds": ROUNDS, "in_flight": CONCURRENCY,
            "pod": "one container requesting 100m CPU and 128Mi",
            "ceiling": "the bench binds the pods itself through pods/binding, round the nodes; from the first bind sent to the last pod seen bound through a watch",
            "scheduler": "seine-scheduler (--leader-elect=false, caches synced by a warm-up pod) is paused with SIGSTOP while the round's pods are created; from SIGCONT to the last pod seen bound through a watch; the next round starts once the round's Scheduled events are written",
            "figures": "medians of the rounds",
        },
        "ceiling": {"binds_per_second": ceiling.per_second, "seconds": ceiling.seconds,
                    "rounds": rounds(&phases.ceiling)},
        "scheduler": {"pods_per_second": scheduled.per_second, "seconds": scheduled.seconds,
                      "rounds": rounds(&phases.scheduled),
                      "scheduled_events_written_seconds": phases.events_written,
                      "pods_per_node_min": min, "pods_per_node_max": max},
        "creates": {"per_second": create.per_second, "seconds": create.seconds,
                    "rounds": rounds(&phases.creates)},
        "summary": summary,
    });
    println!();
    println!(
        "{:<48} {:>6} {:>9} {:>9}",
        "WHAT (median of 3 rounds)", "PODS", "SECONDS", "PODS/S"
    );
    for (what, r) in [
        ("raw binds, 16 in flight (ceiling)", ceiling),
        ("seine-scheduler, 100 nodes, 16 binds in flight", scheduled),
        ("pod creates, 16 in flight (for scale)", create),
    ] {
        println!(
            "{:<48} {:>6} {:>9.3} {:>9.0}",
            what, PODS, r.seconds, r.per_second
        );
    }
    println!(
        "\nseine-scheduler / raw bind rate: {ratio:.2} (target >= 0.8); pods per node after {} rounds: {min}..{max}",
        ROUNDS
    );
    crate::write_report(json_path, &report)?;
    println!("bench scheduler: wrote {}", json_path.display());
    Ok(())
}
