//! `seine-bench dns`: seine-dns (release build) against knotd in the same run, each pinned to the
//! same one CPU, with dnsperf on the other.
//!
//! - A real etcd and seine-apiserver hold 10,000 Services (10 namespaces, a named port each) and
//!   50,000 Pods with addresses; seine-dns watches them with the kubeadm Corefile (`pods verified`,
//!   so Pods are watched too) and its resident memory is read before and after.
//! - Cluster names: a shuffled mix of A, SRV (`_http._tcp`), PTR of the cluster IPs and names that
//!   do not exist (NXDOMAIN), a quarter each, 40,000 queries over the 10,000 services.
//! - The ceiling: knotd serving the same names as static zones (`cluster.local` and
//!   `10.in-addr.arpa`), the same query file.
//! - Cached external names: 100 names under `example.test` forwarded to a knotd upstream once and
//!   then answered by seine-dns's cache.
//!
//! dnsperf runs with `-v` so every answer's latency is read: p50/p99 are under full load (100
//! queries outstanding), the same for both servers.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use rand::seq::SliceRandom as _;
use serde_json::{json, Value};

use crate::{
    apiserver::ApiServer,
    dns::{dig, kubeadm_corefile, DnsPorts, Knot, SeineDns},
    stats::quantile,
};

const NAMESPACES: usize = 10;
const SERVICES: usize = 10_000;
const PODS: usize = 50_000;
const EXTERNAL_NAMES: usize = 100;
const CREATORS: usize = 32;
/// Where the servers run, and where dnsperf runs.
const SERVER_CPU: usize = 1;
const CLIENT_CPU: usize = 0;

fn seconds() -> u64 {
    std::env::var("SEINE_BENCH_DNS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// One dnsperf run.
#[derive(Debug, Clone, Default)]
struct Run {
    qps: f64,
    completed: u64,
    lost: u64,
    p50: f64,
    p99: f64,
    rcodes: std::collections::BTreeMap<String, u64>,
}

impl Run {
    fn json(&self) -> Value {
        json!({"qps": self.qps, "completed": self.completed, "lost": self.lost,
               "p50_seconds": self.p50, "p99_seconds": self.p99, "rcodes": self.rcodes})
    }
}

/// dnsperf on `CLIENT_CPU` against 127.0.0.1:`port` for `secs` seconds with `file`.
fn dnsperf(port: u16, file: &Path, secs: u64) -> Result<Run> {
    let mut child = Command::new("taskset")
        .args(["-c", &CLIENT_CPU.to_string(), "dnsperf", "-s", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-l", &secs.to_string(), "-v", "-d"])
        .arg(file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running dnsperf (Debian package dnsperf)")?;
    let out = child.stdout.take().context("dnsperf stdout")?;
    let mut run = Run::default();
    let mut latencies = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("> ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(rcode), Some(lat)) = (parts.first(), parts.last()) {
                if let Ok(l) = lat.parse::<f64>() {
                    latencies.push(l);
                    *run.rcodes.entry(rcode.to_string()).or_default() += 1;
                }
            }
        } else if let Some(v) = line.trim().strip_prefix("Queries per second:") {
            run.qps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = line.trim().strip_prefix("Queries completed:") {
            run.completed = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = line.trim().strip_prefix("Queries lost:") {
            run.lost = v
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    let status = child.wait()?;
    if !status.success() || run.completed == 0 {
        bail!("dnsperf against port {port} failed ({status})");
    }
    run.p50 = quantile(&mut latencies, 0.5);
    run.p99 = quantile(&mut latencies, 0.99);
    Ok(run)
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

fn reverse(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
}

/// Creates `count` objects with `make(i)` on `CREATORS` tasks; a progress line every 10,000
/// (prefixed `bench NAME:`).
pub async fn create_all<K, F>(
    client: &Client,
    bench: &str,
    what: &str,
    count: usize,
    make: F,
) -> Result<Vec<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default,
    F: Fn(usize) -> (String, K) + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CREATORS {
        let (client, make) = (client.clone(), make.clone());
        let (what, bench) = (what.to_string(), bench.to_string());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            let mut i = worker;
            while i < count {
                let (ns, object) = make(i);
                let api: Api<K> = Api::namespaced(client.clone(), &ns);
                let created = api
                    .create(&PostParams::default(), &object)
                    .await
                    .with_context(|| format!("creating {what} {i}"))?;
                made.push((i, created));
                if worker == 0 && i % 10_000 < CREATORS {
                    println!("bench {bench}: {what}: {i}/{count}");
                }
                i += CREATORS;
            }
            anyhow::Ok(made)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort_by_key(|(i, _)| *i);
    println!(
        "bench {bench}: {count} {what} created in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(all.into_iter().map(|(_, o)| o).collect())
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i as u32 + 2)
}

fn ns_of(i: usize) -> String {
    format!("bench-{}", i % NAMESPACES)
}

pub fn run(json_path: &Path) -> Result<()> {
    let dir = std::env::temp_dir().join(crate::unique_prefix("dns-bench"));
    std::fs::create_dir_all(&dir)?;
    let result = crate::on_api_server(async |api| bench(api, &dir, json_path).await);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(api: &ApiServer, dir: &Path, json_path: &Path) -> Result<()> {
    let secs = seconds();
    // The upstream for external names (not pinned: it sees one query per name per 30 s).
    let mut external = String::from(
        "$ORIGIN example.test.\n$TTL 300\n@ SOA ns hm 1 3600 600 86400 60\n@ NS ns\nns A 127.0.0.1\n",
    );
    for i in 0..EXTERNAL_NAMES {
        external.push_str(&format!("host-{i} A 192.0.2.{}\n", i % 250 + 1));
    }
    let upstream = Knot::start(&[("example.test.", external)], None)?;

    let ports = DnsPorts::pick()?;
    let dns = SeineDns::start_on_cpu(
        ports,
        // kubeadm's Corefile, with the Pods watched (`pods verified`) for the memory figure.
        &kubeadm_corefile(
            ports,
            &api.kubeconfig,
            &format!("127.0.0.1:{}", upstream.port),
        )
        .replace("pods insecure", "pods verified"),
        Some(SERVER_CPU),
    )?;
    dns.wait_serving()?;
    let dns_pid = dns.process.pid();
    let rss_empty = rss_bytes(dns_pid)?;

    let client = api.kube_client().await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for n in 0..NAMESPACES {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_of(n)}}))?;
        namespaces.create(&PostParams::default(), &ns).await?;
    }
    let services: Vec<Service> = create_all(&client, "dns", "services", SERVICES, |i| {
        let svc = serde_json::from_value(json!({
            "metadata": {"name": format!("svc-{i}")},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap_or_default();
        (ns_of(i), svc)
    })
    .await?;
    let _pods: Vec<Pod> = create_all(&client, "dns", "pods", PODS, |i| {
        let pod = serde_json::from_value(json!({
            "metadata": {"name": format!("pod-{i}"), "labels": {"app": format!("svc-{}", i % SERVICES)}},
            "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}
        }))
        .unwrap_or_default();
        (ns_of(i), pod)
    })
    .await?;
    // Addresses come through the status subresource, as a kubelet reports them.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..CREATORS {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut i = worker;
            while i < PODS {
                let ip = pod_ip(i).to_string();
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns_of(i));
                let status =
                    json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
                api.patch_status(
                    &format!("pod-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&status),
                )
                .await
                .with_context(|| format!("the status of pod {i}"))?;
                i += CREATORS;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "bench dns: {PODS} pod addresses set in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(client);

    // Everything is in the view once the last service and the last pod answer.
    let last_svc = format!(
        "svc-{}.{}.svc.cluster.local",
        SERVICES - 1,
        ns_of(SERVICES - 1)
    );
    let last_pod_ip = pod_ip(PODS - 1);
    let last_pod = format!(
        "{}.{}.pod.cluster.local",
        last_pod_ip.to_string().replace('.', "-"),
        ns_of(PODS - 1)
    );
    let synced_at = Instant::now();
    loop {
        let svc = dig(ports.dns, &[&last_svc, "A"]).map(|d| !d.answer.is_empty());
        let pod = dig(ports.dns, &[&last_pod, "A"]).map(|d| !d.answer.is_empty());
        if matches!((svc, pod), (Ok(true), Ok(true))) {
            break;
        }
        if synced_at.elapsed() > Duration::from_secs(300) {
            bail!("seine-dns did not see every object within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "bench dns: seine-dns answers for all objects {:.1} s after the last create",
        synced_at.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_loaded = rss_bytes(dns_pid)?;

    // The query files and knotd's equivalent zones.
    let mut cluster_zone = String::from(
        "$ORIGIN cluster.local.\n$TTL 30\n@ SOA ns.dns hostmaster 1 7200 1800 86400 30\n@ NS ns.dns\nns.dns A 10.96.0.10\n",
    );
    let mut reverse_zone = String::from(
        "$ORIGIN 10.in-addr.arpa.\n$TTL 30\n@ SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 30\n@ NS ns.dns.cluster.local.\n",
    );
    let mut queries = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let ns = ns_of(i);
        let ip: Ipv4Addr = svc
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .context("a service without a cluster IP")?;
        let name = format!("svc-{i}.{ns}.svc.cluster.local.");
        cluster_zone.push_str(&format!("svc-{i}.{ns}.svc A {ip}\n"));
        cluster_zone.push_str(&format!(
            "_http._tcp.svc-{i}.{ns}.svc SRV 0 100 80 {name}\n"
        ));
        reverse_zone.push_str(&format!("{} PTR {name}\n", reverse(ip)));
        queries.push(format!("{name} A"));
        queries.push(format!("_http._tcp.{name} SRV"));
        queries.push(format!("{} PTR", reverse(ip)));
        queries.push(format!("missing-{i}.{ns}.svc.cluster.local. A"));
    }
    queries.shuffle(&mut rand::rng());
    let cluster_file = dir.join("cluster.queries");
    std::fs::write(&cluster_file, queries.join("\n") + "\n")?;
    let external_file = dir.join("external.queries");
    let external_queries: Vec<String> = (0..EXTERNAL_NAMES)
        .map(|i| format!("host-{i}.example.test. A"))
        .collect();
    std::fs::write(&external_file, external_queries.join("\n") + "\n")?;

    println!("bench dns: seine-dns, cluster names, {secs} s");
    // A short warm-up first (the cache fills as CoreDNS's would).
    dnsperf(ports.dns, &cluster_file, 2)?;
    let seine_cluster = dnsperf(ports.dns, &cluster_file, secs)?;
    println!("bench dns: seine-dns, cached external names, {secs} s");
    dnsperf(ports.dns, &external_file, 1)?;
    let seine_external = dnsperf(ports.dns, &external_file, secs)?;
    let rss_after = rss_bytes(dns_pid)?;
    drop(dns);

    let knot = Knot::start(
        &[
            ("cluster.local.", cluster_zone),
            ("10.in-addr.arpa.", reverse_zone),
        ],
        Some(SERVER_CPU),
    )?;
    println!("bench dns: knotd, cluster names, {secs} s");
    dnsperf(knot.port, &cluster_file, 2)?;
    let knot_cluster = dnsperf(knot.port, &cluster_file, secs)?;
    drop(knot);

    for (what, run) in [("seine-dns", &seine_cluster), ("knotd", &knot_cluster)] {
        let nx = run.rcodes.get("NXDOMAIN").copied().unwrap_or(0);
        let ok = run.rcodes.get("NOERROR").copied().unwrap_or(0);
        if ok + nx != run.completed || nx == 0 {
            bail!(
                "{what} answered {:?}: not the NOERROR/NXDOMAIN mix asked for",
                run.rcodes
            );
        }
    }
    report(
        json_path,
        &seine_cluster,
        &seine_external,
        &knot_cluster,
        [rss_empty, rss_loaded, rss_after],
        secs,
    )
}

fn report(
    json_path: &Path,
    cluster: &Run,
    external: &Run,
    knot: &Run,
    rss: [u64; 3],
    secs: u64,
) -> Result<()> {
    let summary = json!({
        "cluster_qps": cluster.qps,
        "cluster_qps_over_knotd": cluster.qps / knot.qps.max(1e-9),
        "cluster_p99_seconds": cluster.p99,
        "external_cached_qps": external.qps,
        "memory_rss_bytes_10k_services_50k_pods": rss[1],
    });
    let report = json!({
        "bench": "dns",
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "kernel": crate::sh("uname", &["-r"]).unwrap_or_default().trim()},
        "method": {
            "servers": format!("seine-dns (kubeadm Corefile, pods verified, cache 30) and knotd 1 UDP worker, each pinned to CPU {SERVER_CPU} with taskset, one after the other"),
            "client": format!("dnsperf 2.10 on CPU {CLIENT_CPU}, UDP, 100 queries outstanding, {secs} s per run after a warm-up, -v for each answer's latency"),
            "cluster_names": format!("{SERVICES} services in {NAMESPACES} namespaces, {PODS} pods; A, SRV, PTR and NXDOMAIN names a quarter each, shuffled"),
            "knotd_zone": "the same names as static zones cluster.local and 10.in-addr.arpa",
            "external_names": format!("{EXTERNAL_NAMES} names forwarded to a knotd upstream once, then from the cache"),
        },
        "seine_dns": {"cluster": cluster.json(), "external_cached": external.json(),
                      "memory_rss_bytes": {"empty_cluster": rss[0],
                                           "with_10k_services_50k_pods": rss[1],
                                           "after_the_runs": rss[2]}},
        "knotd": {"cluster": knot.json()},
        "summary": summary,
    });
    println!();
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>8}",
        "SERVER / NAMES", "QPS", "P50(ms)", "P99(ms)", "LOST"
    );
    for (name, r) in [
        ("seine-dns / cluster", cluster),
        ("seine-dns / external (cached)", external),
        ("knotd / cluster (ceiling)", knot),
    ] {
        println!(
            "{:<32} {:>10.0} {:>10.3} {:>10.3} {:>8}",
            name,
            r.qps,
            r.p50 * 1e3,
            r.p99 * 1e3,
            r.lost
        );
    }
    println!(
        "\nseine-dns / knotd (cluster names): {:.2}   memory: {:.1} MiB empty, {:.1} MiB with {SERVICES} services and {PODS} pods",
        cluster.qps / knot.qps.max(1e-9),
        rss[0] as f64 / 1048576.0,
        rss[1] as f64 / 1048576.0
    );
    crate::write_report(json_path, &report)?;
    println!("bench dns: wrote {}", json_path.display());
    Ok(())
}
