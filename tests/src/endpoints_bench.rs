//! `seine-bench endpoints`: how long after a Pod turns Ready its EndpointSlice says so, with
//! 1,000 Services (one Pod each) in the cluster, seine-controller-manager running only the
//! EndpointSlice controller.
//!
//! The baseline, in the same run: how long the same status write takes to reach a watcher of
//! the Pods (the API server's write and watch delivery, which the controller's figure includes
//! and cannot beat). Samples are paced (one Pod every `PACE`), so the figure is a latency, not a
//! backlog.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{watcher, WatchStreamExt as _},
    Api,
};
use serde_json::json;

use crate::{apiserver::ApiServer, controllers::Daemon, dns_bench::create_all, stats::quantile};

const SERVICES: usize = 1_000;
const SAMPLES: usize = 400;
const PACE: Duration = Duration::from_millis(25);
const NS: &str = "bench";

pub fn run(json_path: &Path) -> Result<()> {
    crate::on_api_server(async |api| bench(api, json_path).await)
}

fn ip(i: usize) -> String {
    format!("10.244.{}.{}", i / 250, i % 250 + 2)
}

async fn set_ready(pods: &Api<Pod>, i: usize, ready: bool) -> Result<()> {
    let status = json!({"status": {"phase": "Running", "podIP": ip(i), "podIPs": [{"ip": ip(i)}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
    pods.patch_status(
        &format!("pod-{i}"),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await
    .with_context(|| format!("status of pod-{i}"))?;
    Ok(())
}

fn index(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.parse().ok()
}

async fn bench(api: &ApiServer, json_path: &Path) -> Result<()> {
    let client = api.kube_client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    create_all(&client, "endpoints", "services", SERVICES, |i| {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": format!("svc-{i}")},
            "spec": {"selector": {"app": format!("svc-{i}")},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap_or_default();
        (NS.to_string(), svc)
    })
    .await?;
    create_all(&client, "endpoints", "pods", SERVICES, |i| {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("pod-{i}"), "labels": {"app": format!("svc-{i}")}},
            "spec": {"nodeName": "node-a",
                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}
        }))
        .unwrap_or_default();
        (NS.to_string(), pod)
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let mut writes = futures::stream::iter(0..SERVICES)
        .map(|i| {
            let pods = pods.clone();
            async move { set_ready(&pods, i, false).await }
        })
        .buffer_unordered(32);
    while let Some(done) = writes.next().await {
        done?;
    }

    let started = Instant::now();
    let cm = Daemon::controller_manager(
        api,
        &["--leader-elect=false", "--controllers", "endpointslice"],
    )?;
    // The first sync: every Service's slice holds its not-ready Pod.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NS);
    loop {
        let list = slices.list(&ListParams::default()).await?;
        let held: usize = list.items.iter().map(|s| s.endpoints.len()).sum();
        if held == SERVICES {
            break;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!(
                "the first sync did not finish ({held}/{SERVICES}):\n{}",
                cm.log_text()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_sync = started.elapsed().as_secs_f64();
    println!("bench endpoints: first sync of {SERVICES} services in {first_sync:.2} s");

    // Watch Pods (the baseline) and slices, recording when sample i shows Ready.
    let sent: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let pod_seen: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let slice_seen: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let pod_watch = {
        let (sent, seen) = (sent.clone(), pod_seen.clone());
        let stream = watcher(pods.clone(), watcher::Config::default()).default_backoff();
        tokio::spawn(async move {
            let mut stream = stream.boxed();
            while let Some(Ok(event)) = stream.next().await {
                let watcher::Event::Apply(p) = event else {
                    continue;
                };
                let ready = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let Some(i) = p.metadata.name.as_deref().and_then(|n| index(n, "pod-")) else {
                    continue;
                };
                if ready && sent.lock().is_ok_and(|s| s.contains_key(&i)) {
                    if let Ok(mut seen) = seen.lock() {
                        seen.entry(i).or_insert_with(Instant::now);
                    }
                }
            }
        })
    };
    let slice_watch = {
        let (sent, seen) = (sent.clone(), slice_seen.clone());
        let stream = watcher(slices.clone(), watcher::Config::default()).default_backoff();
        tokio::spawn(async move {
            let mut stream = stream.boxed();
            while let Some(Ok(event)) = stream.next().await {
                let watcher::Event::Apply(s) = event else {
                    continue;
                };
                let Some(i) = s
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    .and_then(|n| index(n, "svc-"))
                else {
                    continue;
                };
                let ready = s
                    .endpoints
                    .iter()
                    .any(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false));
                if ready && sent.lock().is_ok_and(|s| s.contains_key(&i)) {
                    if let Ok(mut seen) = seen.lock() {
                        seen.entry(i).or_insert_with(Instant::now);
                    }
                }
            }
        })
    };
    // Both watches have listed before the first sample.
    tokio::time::sleep(Duration::from_secs(2)).await;

    println!("bench endpoints: {SAMPLES} pods turn ready, one every {PACE:?}");
    let mut ticker = tokio::time::interval(PACE);
    let mut inflight = Vec::new();
    // Spread over the Services: sample k is Service k * (SERVICES / SAMPLES).
    for k in 0..SAMPLES {
        ticker.tick().await;
        let i = k * (SERVICES / SAMPLES);
        let pods = pods.clone();
        let sent = sent.clone();
        inflight.push(tokio::spawn(async move {
            if let Ok(mut s) = sent.lock() {
                s.insert(i, Instant::now());
            }
            set_ready(&pods, i, true).await
        }));
    }
    for t in inflight {
        t.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while slice_seen.lock().map(|s| s.len()).unwrap_or(0) < SAMPLES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pod_watch.abort();
    slice_watch.abort();

    let sent = sent.lock().map(|s| s.clone()).unwrap_or_default();
    let latencies = |seen: &Arc<Mutex<HashMap<usize, Instant>>>| -> Vec<f64> {
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        sent.iter()
            .filter_map(|(i, t0)| Some(seen.get(i)?.saturating_duration_since(*t0).as_secs_f64()))
            .collect()
    };
    let mut slice_lat = latencies(&slice_seen);
    let mut pod_lat = latencies(&pod_seen);
    if slice_lat.len() < SAMPLES {
        bail!(
            "only {}/{SAMPLES} slice updates seen within 60 s:\n{}",
            slice_lat.len(),
            cm.log_text()
        );
    }
    let (s50, s99, smax) = (
        quantile(&mut slice_lat, 0.5),
        quantile(&mut slice_lat, 0.99),
        quantile(&mut slice_lat, 1.0),
    );
    let (p50, p99) = (quantile(&mut pod_lat, 0.5), quantile(&mut pod_lat, 0.99));
    let metrics = cm.http("/metrics").map(|(_, m)| m).unwrap_or_default();
    let writes: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("seine_endpointslice_writes_total{controller=\"EndpointSlice\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();

    println!();
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "PATH (pod turns Ready -> seen)", "P50(ms)", "P99(ms)", "SAMPLES"
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>10}",
        "pod watch (API server baseline)",
        p50 * 1e3,
        p99 * 1e3,
        pod_lat.len()
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>10}",
        "EndpointSlice (seine-controller-manager)",
        s50 * 1e3,
        s99 * 1e3,
        slice_lat.len()
    );
    println!(
        "\nendpoint update p99: {:.1} ms (target < 1000 ms; max {:.1} ms); first sync of {SERVICES} services {first_sync:.2} s; {writes} slice writes",
        s99 * 1e3,
        smax * 1e3
    );
    let report = json!({
        "services": SERVICES,
        "samples": SAMPLES,
        "pace_seconds": PACE.as_secs_f64(),
        "first_sync_seconds": first_sync,
        "endpointslice": {"p50_seconds": s50, "p99_seconds": s99, "max_seconds": smax},
        "baseline_pod_watch": {"p50_seconds": p50, "p99_seconds": p99},
        "endpointslice_writes": writes,
        "summary": {
            "endpoint_update_p50_seconds": s50,
            "endpoint_update_p99_seconds": s99,
            "baseline_pod_watch_p99_seconds": p99,
            "target_p99_seconds": 1.0,
        },
    });
    crate::write_report(json_path, &report)?;
    println!("bench endpoints: wrote {}", json_path.display());
    Ok(())
}
