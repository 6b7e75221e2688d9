//! `cargo xtask bench cni`: seine-cni's ADD and DEL latency (100 pods one after another, and 20 at
//! once), addresses leaked after 1,000 ADD/DEL cycles, and pod-to-pod TCP throughput and request
//! latency across nodes (over the VXLAN overlay) against within a node, in the same run.
//!
//! The plugin is executed the way a runtime executes it: a fresh process per call, with the
//! configuration on stdin, from the node's network namespace (forked from a thread that entered
//! it, so no `nsenter` exec is counted).

use std::{
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{
    cni::{allocated, cluster, invoke, plugin_config, seine_veths, ClusterNode},
    stats::quantile,
    unique_prefix, KeepAlive, Netns,
};

const SEQUENTIAL: usize = 100;
const PARALLEL: usize = 20;
const PARALLEL_ROUNDS: usize = 5;
const CYCLES: usize = 1_000;
const CYCLE_THREADS: usize = 4;
const LATENCY_SAMPLES: usize = 2_000;
const IPERF_SECONDS: u32 = 4;

/// CPU seconds (user + system) of the children this process has waited for.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// One plugin call from inside `node`; its wall time in seconds.
fn call(node: &Netns, plugin: &Path, command: &str, pod: &Netns, config: &Value) -> Result<f64> {
    let path = pod.path();
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", pod.name.as_str()),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    let out = invoke(node, plugin, &env, config)?;
    if !out.success {
        bail!("{command} {}: {}", pod.name, out.raw);
    }
    Ok(out.seconds)
}

fn summary(samples: &mut [f64]) -> Value {
    json!({
        "count": samples.len(),
        "p50_seconds": quantile(samples, 0.5),
        "p99_seconds": quantile(samples, 0.99),
        "max_seconds": quantile(samples, 1.0),
    })
}

struct AddDel {
    /// User and system CPU of one ADD process (the kernel's work done in its context included).
    add_cpu: f64,
    sequential_add: Vec<f64>,
    sequential_del: Vec<f64>,
    parallel_add: Vec<f64>,
    parallel_del: Vec<f64>,
}

fn add_del(n: &ClusterNode, plugin: &Path, config: &Value) -> Result<AddDel> {
    let prefix = unique_prefix("bc");
    let pods: Vec<Netns> = (0..SEQUENTIAL)
        .map(|i| Netns::create(&format!("{prefix}-{i}")))
        .collect::<Result<_>>()?;
    eprintln!("bench cni: {SEQUENTIAL} sequential ADDs and DELs");
    let mut sequential_add = Vec::new();
    let cpu_before = children_cpu_seconds();
    for pod in &pods {
        sequential_add.push(call(&n.node.ns, plugin, "ADD", pod, config)?);
    }
    let add_cpu = (children_cpu_seconds() - cpu_before) / SEQUENTIAL as f64;
    let mut sequential_del = Vec::new();
    for pod in &pods {
        sequential_del.push(call(&n.node.ns, plugin, "DEL", pod, config)?);
    }
    eprintln!("bench cni: {PARALLEL} ADDs at once, {PARALLEL_ROUNDS} rounds");
    let (mut parallel_add, mut parallel_del) = (Vec::new(), Vec::new());
    for _ in 0..PARALLEL_ROUNDS {
        for command in ["ADD", "DEL"] {
            let barrier = Arc::new(Barrier::new(PARALLEL));
            let times: Vec<f64> = std::thread::scope(|scope| {
                let handles: Vec<_> = pods[..PARALLEL]
                    .iter()
                    .map(|pod| {
                        let barrier = barrier.clone();
                        let node = &n.node.ns;
                        scope.spawn(move || {
                            barrier.wait();
                            call(node, plugin, command, pod, config)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .map_err(|_| anyhow::anyhow!("ADD thread panicked"))?
                    })
                    .collect::<Result<Vec<f64>>>()
            })?;
            if command == "ADD" {
                parallel_add.extend(times);
            } else {
                parallel_del.extend(times);
            }
        }
    }
    Ok(AddDel {
        add_cpu,
        sequential_add,
        sequential_del,
        parallel_add,
        parallel_del,
    })
}

/// 1,000 ADD/DEL cycles (on a few threads at once); what is left allocated afterwards.
fn cycles(n: &ClusterNode, plugin: &Path, config: &Value) -> Result<(usize, usize, f64)> {
    eprintln!("bench cni: {CYCLES} ADD/DEL cycles");
    let prefix = unique_prefix("cy");
    let pods: Vec<Netns> = (0..CYCLE_THREADS)
        .map(|i| Netns::create(&format!("{prefix}-{i}")))
        .collect::<Result<_>>()?;
    let before_addresses = allocated(&n.dirs.data()).len();
    let before_veths = seine_veths(&n.node.ns)?.len();
    let start = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let node = &n.node.ns;
                scope.spawn(move || -> Result<()> {
                    for _ in 0..CYCLES / CYCLE_THREADS {
                        call(node, plugin, "ADD", pod, config)?;
                        call(node, plugin, "DEL", pod, config)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("cycle thread panicked"))??;
        }
        Ok(())
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let leaked_addresses = allocated(&n.dirs.data())
        .len()
        .saturating_sub(before_addresses);
    let leaked_veths = seine_veths(&n.node.ns)?.len().saturating_sub(before_veths);
    Ok((leaked_addresses, leaked_veths, seconds))
}

/// iperf3 from `client` to a server in `server` (at `ip`); bits per second.
fn iperf(client: &Netns, server: &Netns, ip: std::net::Ipv4Addr) -> Result<f64> {
    let mut daemon = server
        .command(Path::new("iperf3"))
        .args(["-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = client.exec(
        "iperf3",
        &[
            "-c",
            &ip.to_string(),
            "-p",
            "5201",
            "-t",
            &IPERF_SECONDS.to_string(),
            "-J",
        ],
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    let report: Value = serde_json::from_str(&out?)?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no throughput in iperf3's report")
}

/// Kept-alive request/response latency from `client` to `addr`: (p50, p99) in seconds.
fn latency(client: &Netns, addr: SocketAddr) -> Result<(f64, f64)> {
    client.run(move || -> Result<(f64, f64)> {
        let mut conn = KeepAlive::connect(addr)?;
        for _ in 0..100 {
            conn.get()?;
        }
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        for _ in 0..LATENCY_SAMPLES {
            let start = Instant::now();
            conn.get()?;
            samples.push(start.elapsed().as_secs_f64());
        }
        conn.reset();
        Ok((quantile(&mut samples, 0.5), quantile(&mut samples, 0.99)))
    })?
}

pub fn run(json_path: &Path) -> Result<()> {
    eprintln!("bench cni: two nodes with agents, etcd and seine-apiserver");
    let mut c = cluster("bc", 2)?;
    c.add_pods(2)?;
    let n1 = &c.nodes[0];
    let conflist = n1.dirs.conflist()?;
    let config = plugin_config(&conflist, 0, None);
    let plugin = n1.dirs.bin().join("seine-cni");

    let mut ad = add_del(n1, &plugin, &config)?;
    let (leaked_addresses, leaked_veths, cycle_seconds) = cycles(n1, &plugin, &config)?;

    eprintln!("bench cni: pod-to-pod throughput and latency, within a node and across nodes");
    let (a, b) = (&c.nodes[0].node.pods[0], &c.nodes[0].node.pods[1]);
    let remote = &c.nodes[1].node.pods[0];
    let same_bps = iperf(&a.ns, &b.ns, b.ip)?;
    let cross_bps = iperf(&a.ns, &remote.ns, remote.ip)?;
    let (same_p50, same_p99) = latency(&a.ns, SocketAddr::from((b.ip, 8080)))?;
    let (cross_p50, cross_p99) = latency(&a.ns, SocketAddr::from((remote.ip, 8080)))?;

    let seq_add = summary(&mut ad.sequential_add);
    let seq_del = summary(&mut ad.sequential_del);
    let par_add = summary(&mut ad.parallel_add);
    let par_del = summary(&mut ad.parallel_del);
    let ratio = cross_bps / same_bps;
    let report = json!({
        "summary": {
            "add_p50_seconds_20_parallel": par_add["p50_seconds"],
            "add_p99_seconds_20_parallel": par_add["p99_seconds"],
            "leaked_addresses_after_1000_cycles": leaked_addresses,
            "cross_node_over_same_node_throughput": ratio,
        },
        "targets": {"add_p50_seconds_20_parallel": 0.010, "add_p99_seconds_20_parallel": 0.050,
                    "leaked_addresses_after_1000_cycles": 0},
        "add_del": {
            "sequential_100": {"add": seq_add, "del": seq_del},
            "parallel_20": {"rounds": PARALLEL_ROUNDS, "add": par_add, "del": par_del},
            "add_cpu_seconds": ad.add_cpu,
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
        "cycles": {"count": CYCLES, "threads": CYCLE_THREADS, "seconds": cycle_seconds,
                   "leaked_addresses": leaked_addresses, "leaked_veths": leaked_veths},
        "pod_to_pod": {
            "same_node": {"tcp_bits_per_second": same_bps, "latency_p50_seconds": same_p50,
                          "latency_p99_seconds": same_p99},
            "cross_node": {"tcp_bits_per_second": cross_bps, "latency_p50_seconds": cross_p50,
                           "latency_p99_seconds": cross_p99},
            "iperf3_seconds": IPERF_SECONDS,
            "latency_samples": LATENCY_SAMPLES,
        },
    });
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN) * 1000.0;
    println!("\nseine-cni ADD/DEL (ms)        p50      p99      max");
    for (label, v) in [
        (
            "ADD, 100 one by one",
            &report["add_del"]["sequential_100"]["add"],
        ),
        (
            "DEL, 100 one by one",
            &report["add_del"]["sequential_100"]["del"],
        ),
        ("ADD, 20 at once", &report["add_del"]["parallel_20"]["add"]),
        ("DEL, 20 at once", &report["add_del"]["parallel_20"]["del"]),
    ] {
        println!(
            "{label:<28} {:>7.2}  {:>7.2}  {:>7.2}",
            ms(&v["p50_seconds"]),
            ms(&v["p99_seconds"]),
            ms(&v["max_seconds"])
        );
    }
    println!(
        "one ADD uses {:.2} ms of CPU; 20 at once on {} CPUs need at least {:.1} ms for the last one",
        ad.add_cpu * 1e3,
        report["add_del"]["cpus"],
        ad.add_cpu * 1e3 * PARALLEL as f64 / report["add_del"]["cpus"].as_f64().unwrap_or(1.0)
    );
    println!(
        "\n{CYCLES} ADD/DEL cycles in {cycle_seconds:.1} s: {leaked_addresses} addresses and {leaked_veths} veths leaked"
    );
    println!("\npod to pod                 TCP Gbit/s   latency p50 (us)   p99 (us)");
    for (label, bps, p50, p99) in [
        ("same node", same_bps, same_p50, same_p99),
        ("across nodes (VXLAN)", cross_bps, cross_p50, cross_p99),
    ] {
        println!(
            "{label:<26} {:>10.2}   {:>16.1}   {:>8.1}",
            bps / 1e9,
            p50 * 1e6,
            p99 * 1e6
        );
    }
    println!("cross-node / same-node throughput: {ratio:.2}");
    crate::write_report(json_path, &report)?;
    println!("\nwritten to {}", json_path.display());
    Ok(())
}
