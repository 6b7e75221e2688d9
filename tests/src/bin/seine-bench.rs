//! seine-bench: the benchmarks behind `cargo xtask bench`. Each compares against a baseline measured
//! in the same run, prints a table and writes JSON.
//!
//! `lb`: short TCP connections per second and kept-alive request latency through a service VIP
//! versus directly to the backend pod, with 1 and with 10,000 services installed (the probe uses the
//! last service inserted); the time to program 10,000 services x 10 backends from empty; the time to
//! change one service while 10,000 are present.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use seine::{
    datapath::{
        ebpf::{EbpfDatapath, Owner},
        Datapath,
    },
    model::{BackendSpec, BackendState, Frontend, Protocol, ServiceSpec},
};
use seine_tests::{stats::quantile, KeepAlive, Node};
use serde_json::json;

const PORT: u16 = 8080;
const ROUNDS: usize = 8;
const ROUND: Duration = Duration::from_millis(1500);
const CLIENT_THREADS: usize = 2;
const LATENCY_SAMPLES: usize = 5_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("lb") => {
            let json = args
                .iter()
                .position(|a| a == "--json")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target/bench/lb.json"));
            lb(&json)
        }
        _ => {
            eprintln!("usage: seine-bench lb [--json PATH]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seine-bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[derive(Clone, Copy, Default)]
struct PathFigures {
    conn_rate: f64,
    p50_us: f64,
    p99_us: f64,
}

fn lb(json_path: &PathBuf) -> Result<()> {
    println!("bench lb: building the topology (node, client pod, backend pod)");
    let mut node = Node::create("bn")?;
    node.add_pod("client", Ipv4Addr::new(10, 244, 0, 2))?;
    node.add_pod("backend", Ipv4Addr::new(10, 244, 0, 11))?;
    node.pod_mut("backend").serve(PORT)?;
    node.start_agent(&[])?;
    let mut dp = EbpfDatapath::open(&node.bpffs_dir, Owner::Cli)?;
    let backend_ip = node.pod("backend").ip;
    let direct: SocketAddr = (backend_ip, PORT).into();
    let real_backend = BackendSpec {
        ip: backend_ip.into(),
        port: PORT,
        state: BackendState::Active,
    };

    // 1 service.
    let one = ServiceSpec {
        frontend: frontend(Ipv4Addr::new(10, 96, 0, 1)),
        backends: vec![real_backend],
        affinity_timeout_secs: None,
    };
    dp.upsert(&one)?;
    println!("bench lb: 1 service: measuring direct and VIP");
    let (direct_1, vip_1) = measure_pair(&node, direct, sock(one.frontend))?;
    dp.delete(&one.frontend)?;

    // 10,000 services x 10 backends, from empty.
    let mut specs: Vec<ServiceSpec> = (0..10_000u32)
        .map(|i| ServiceSpec {
            frontend: frontend(Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8)),
            backends: (0..10u32)
                .map(|j| BackendSpec {
                    ip: Ipv4Addr::from(0x0af4_0000u32 + (i * 10 + j) % 60_000 + 256).into(),
                    port: PORT,
                    state: BackendState::Active,
                })
                .collect(),
            affinity_timeout_secs: None,
        })
        .collect();
    println!("bench lb: programming 10,000 services x 10 backends from empty");
    let start = Instant::now();
    let report = dp.apply(&specs);
    let program_seconds = start.elapsed().as_secs_f64();
    if !report.failed.is_empty() || report.created != 10_000 {
        bail!(
            "programming failed: {} created, first error: {:?}",
            report.created,
            report.failed.first().map(|e| e.to_string())
        );
    }

    // One change with 10,000 present: the last service flips between two backend sets.
    println!("bench lb: changing one service with 10,000 present (101 times)");
    let last = specs.last().cloned().context("no services")?;
    let mut alternate = last.clone();
    alternate.backends.truncate(9);
    let mut update_samples = Vec::new();
    for i in 0..101 {
        let spec = if i % 2 == 0 { &alternate } else { &last };
        let start = Instant::now();
        dp.upsert(spec)?;
        update_samples.push(start.elapsed().as_secs_f64());
    }
    let update_median = quantile(&mut update_samples, 0.5);
    let update_p99 = quantile(&mut update_samples, 0.99);
    // The same change through a full desired-state apply (the diff the agent runs).
    if let Some(spec) = specs.last_mut() {
        spec.backends = vec![real_backend];
    }
    let start = Instant::now();
    let report = dp.apply(&specs);
    let apply_one_change_seconds = start.elapsed().as_secs_f64();
    if report.updated != 1 || !report.failed.is_empty() {
        bail!("the diff updated {} services (expected 1)", report.updated);
    }

    println!("bench lb: 10,000 services: measuring direct and VIP to the last one inserted");
    let last_vip = sock(last.frontend);
    let (direct_10k, vip_10k) = measure_pair(&node, direct, last_vip)?;

    let summary = json!({
        "vip_over_direct_conn_rate_1": vip_1.conn_rate / direct_1.conn_rate,
        "vip_over_direct_conn_rate_10000": vip_10k.conn_rate / direct_10k.conn_rate,
        "program_10000x10_seconds": program_seconds,
        "update_one_with_10000_seconds": update_median,
    });
    let figures = |f: PathFigures| json!({"conn_per_second": f.conn_rate, "latency_p50_us": f.p50_us, "latency_p99_us": f.p99_us});
    let report = json!({
        "bench": "lb",
        "datapath": "ebpf",
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "kernel": seine_tests::sh("uname", &["-r"]).unwrap_or_default().trim()},
        "method": {"client_threads": CLIENT_THREADS, "rounds": ROUNDS, "round_seconds": ROUND.as_secs_f64(),
                   "latency_samples": LATENCY_SAMPLES,
                   "note": "direct and VIP alternate within each round set; rates are medians of the rounds"},
        "services_1": {"direct": figures(direct_1), "vip": figures(vip_1)},
        "services_10000": {"direct": figures(direct_10k), "vip": figures(vip_10k)},
        "program_10000x10_seconds": program_seconds,
        "update_one_with_10000_seconds": {"median": update_median, "p99": update_p99, "samples": 101},
        "apply_full_state_with_one_change_seconds": apply_one_change_seconds,
        "summary": summary,
    });

    println!();
    println!(
        "{:<10} {:<7} {:>12} {:>10} {:>10} {:>14}",
        "SERVICES", "PATH", "CONN/S", "P50(us)", "P99(us)", "VIP/DIRECT"
    );
    for (n, d, v) in [("1", direct_1, vip_1), ("10000", direct_10k, vip_10k)] {
        println!(
            "{:<10} {:<7} {:>12.0} {:>10.1} {:>10.1} {:>14}",
            n, "direct", d.conn_rate, d.p50_us, d.p99_us, ""
        );
        println!(
            "{:<10} {:<7} {:>12.0} {:>10.1} {:>10.1} {:>14.3}",
            n,
            "vip",
            v.conn_rate,
            v.p50_us,
            v.p99_us,
            v.conn_rate / d.conn_rate
        );
    }
    println!();
    println!(
        "program 10,000 services x 10 backends from empty: {program_seconds:.3} s (target < 1 s)"
    );
    println!(
        "change one service with 10,000 present: median {:.1} us, p99 {:.1} us (target < 1 ms)",
        update_median * 1e6,
        update_p99 * 1e6
    );
    println!(
        "same change through a full desired-state diff: {:.2} ms",
        apply_one_change_seconds * 1e3
    );

    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(json_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("\nwrote {}", json_path.display());
    // Remove the services before the node goes, so the bench leaves nothing behind.
    drop(dp);
    node.stop_agent()?;
    Ok(())
}

fn frontend(ip: Ipv4Addr) -> Frontend {
    Frontend {
        ip: ip.into(),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn sock(f: Frontend) -> SocketAddr {
    SocketAddr::new(f.ip, f.port)
}

/// Direct and VIP, alternating round by round so that drift of a shared machine hits both alike.
fn measure_pair(
    node: &Node,
    direct: SocketAddr,
    vip: SocketAddr,
) -> Result<(PathFigures, PathFigures)> {
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, addr) in [direct, vip].into_iter().enumerate() {
            rates[i].push(conn_rate(node, addr)?);
        }
    }
    let mut out = [PathFigures::default(); 2];
    for (i, addr) in [direct, vip].into_iter().enumerate() {
        let (p50, p99) = latency(node, addr)?;
        out[i] = PathFigures {
            conn_rate: quantile(&mut rates[i], 0.5),
            p50_us: p50,
            p99_us: p99,
        };
    }
    Ok((out[0], out[1]))
}

/// Short connections per second: connect, one request/response, close; `CLIENT_THREADS` loops.
fn conn_rate(node: &Node, addr: SocketAddr) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let first_at = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let path = node.pod("client").ns.path();
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            let (done, failed, stop, path) =
                (done.clone(), failed.clone(), stop.clone(), path.clone());
            let first_error = first_error.clone();
            let first_at2 = first_at.clone();
            std::thread::spawn(move || -> Result<()> {
                seine_tests::enter(&path)?;
                while !stop.load(Ordering::Relaxed) {
                    match short_connection(addr) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if let Ok(mut at) = first_at2.lock() {
                                at.get_or_insert(t0.elapsed());
                            }
                            if let Ok(mut first) = first_error.lock() {
                                first.get_or_insert_with(|| format!("{e:#}"));
                            }
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
                Ok(())
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(ROUND);
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::SeqCst);
    if failed > 0 {
        let first = first_error
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_default();
        eprintln!(
            "bench lb: {failed} connections to {addr} failed, the first with: {first} (at {:?})",
            first_at.lock().ok().and_then(|f| *f)
        );
    }
    Ok(done.load(Ordering::SeqCst) as f64 / elapsed)
}

/// Connect, one request/response, close. The client closes first and with a zero linger (a reset),
/// as load generators do: otherwise tens of thousands of TIME_WAIT sockets make the client kernel's
/// port search, not the path under test, the bottleneck within seconds.
fn short_connection(addr: SocketAddr) -> Result<String> {
    let mut conn = KeepAlive::connect(addr)?;
    let body = conn.get()?;
    conn.reset();
    Ok(body)
}

/// Request/response latency on one kept-alive connection: (p50, p99) in microseconds.
fn latency(node: &Node, addr: SocketAddr) -> Result<(f64, f64)> {
    node.pod("client").run(move || -> Result<(f64, f64)> {
        let mut conn = KeepAlive::connect(addr)?;
        for _ in 0..200 {
            conn.get()?;
        }
        let mut samples = Vec::with_capacity(LATENCY_SAMPLES);
        for _ in 0..LATENCY_SAMPLES {
            let start = Instant::now();
            conn.get()?;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
        Ok((quantile(&mut samples, 0.5), quantile(&mut samples, 0.99)))
    })?
}
