//! seine-bench: the benchmarks behind `cargo xtask bench`. Each compares against a baseline measured
//! in the same run, prints a table and writes JSON.
//!
//! `apiserver`: see `seine_tests::apiserver_bench` (seine-apiserver against raw etcd).
//!
//! `cni`: see `seine_tests::cni_bench` (plugin latency, leaks, pod-to-pod across and within nodes).
//!
//! `scheduler`: see `seine_tests::scheduler_bench` (seine-scheduler against the raw bind rate).
//!
//! `programming`: see `seine_tests::programming_bench` (seine-agent's API-to-datapath latency
//! against the API's own watch delivery).
//!
//! `lb`, for every datapath in the same run (eBPF, iptables with the legacy backend, kube-proxy's
//! nftables mode, iptables with the nft backend): short TCP connections per second and kept-alive
//! request latency through a service VIP versus directly to the backend pod, with 1, 1,000 and
//! 10,000 services installed (the probe uses the last service inserted); the time to program
//! 10,000 services x 10 backends from empty; the time to change one service while 10,000 are
//! present; and the agent's resident memory with 10,000 services of its own.

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
use seine_agent::{
    datapath::{
        ebpf::{EbpfDatapath, Owner},
        iptables::{IptablesBackend, IptablesDatapath},
        nftables::NftablesDatapath,
        Datapath,
    },
    model::{BackendSpec, BackendState, Frontend, Protocol, ServiceSpec},
};
use seine_tests::{stats::quantile, KeepAlive, Node};
use serde_json::{json, Value};

const PORT: u16 = 8080;
/// The most services each datapath is measured with.
const TOP: u32 = 10_000;
const ROUNDS: usize = 8;
const ROUND: Duration = Duration::from_millis(1500);
const CLIENT_THREADS: usize = 2;
const LATENCY_SAMPLES: usize = 5_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let name = args.first().cloned().unwrap_or_default();
    let json = value("--json")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("target/bench/{name}.json")));
    let result = match name.as_str() {
        "lb" => lb(&json),
        "apiserver" => seine_tests::apiserver_bench::run(&json),
        "cni" => seine_tests::cni_bench::run(&json),
        "dns" => seine_tests::dns_bench::run(&json),
        "endpoints" => seine_tests::endpoints_bench::run(&json),
        "scheduler" => seine_tests::scheduler_bench::run(&json),
        "programming" => seine_tests::programming_bench::run(&json),
        _ => {
            eprintln!(
                "usage: seine-bench lb [--json PATH]\n       seine-bench apiserver [--json PATH]\n       seine-bench cni [--json PATH]\n       seine-bench dns [--json PATH]\n       seine-bench endpoints [--json PATH]\n       seine-bench scheduler [--json PATH]\n       seine-bench programming [--json PATH]"
            );
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ebpf,
    Iptables(IptablesBackend),
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables(IptablesBackend::Legacy) => "iptables-legacy",
            Mode::Iptables(IptablesBackend::Nft) => "iptables-nft",
            Mode::Nftables => "nftables",
        }
    }

    /// The agent's flags for this mode.
    fn agent_args(self) -> Vec<&'static str> {
        match self {
            Mode::Ebpf => vec!["--datapath", "ebpf"],
            Mode::Iptables(b) => vec!["--datapath", "iptables", "--iptables-backend", b.name()],
            Mode::Nftables => vec!["--datapath", "nftables"],
        }
    }
}

#[derive(Clone, Copy, Default)]
struct PathFigures {
    conn_rate: f64,
    p50_us: f64,
    p99_us: f64,
}

struct ModeFigures {
    mode: Mode,
    /// The services of the programming, update and memory figures.
    top: u32,
    /// (services, direct, vip)
    sizes: Vec<(u32, PathFigures, PathFigures)>,
    program_seconds: f64,
    update_median: f64,
    update_p99: f64,
    update_samples: usize,
    agent_rss_bytes: u64,
}

impl ModeFigures {
    fn at(&self, n: u32) -> (PathFigures, PathFigures) {
        self.sizes
            .iter()
            .find(|(s, _, _)| *s == n)
            .map(|(_, d, v)| (*d, *v))
            .unwrap_or_default()
    }
}

fn lb(json_path: &PathBuf) -> Result<()> {
    let mut modes = vec![Mode::Ebpf];
    for (mode, tool) in [
        (
            Mode::Iptables(IptablesBackend::Legacy),
            "iptables-legacy-restore",
        ),
        (Mode::Nftables, "nft"),
        (Mode::Iptables(IptablesBackend::Nft), "iptables-nft-restore"),
    ] {
        if seine_tests::sh("which", &[tool]).is_ok() {
            modes.push(mode);
        } else {
            println!(
                "bench lb: {tool} is not installed; {} is left out",
                mode.name()
            );
        }
    }
    let figures: Vec<ModeFigures> = modes.into_iter().map(bench_mode).collect::<Result<_>>()?;
    let find = |name: &str| figures.iter().find(|f| f.mode.name() == name);
    let ebpf = find("ebpf").context("no eBPF figures")?;

    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let (e1d, e1v) = ebpf.at(1);
    let (e10d, e10v) = ebpf.at(10_000);
    let mut summary = json!({
        "vip_over_direct_conn_rate_1": ratio(e1v.conn_rate, e1d.conn_rate),
        "vip_over_direct_conn_rate_10000": ratio(e10v.conn_rate, e10d.conn_rate),
        "program_10000x10_seconds": ebpf.program_seconds,
        "update_one_with_10000_seconds": ebpf.update_median,
        "ebpf_conn_rate_10000_over_1": ratio(e10v.conn_rate, e1v.conn_rate),
        "agent_rss_bytes_10000": ebpf.agent_rss_bytes,
    });
    for f in figures.iter().filter(|f| f.mode != Mode::Ebpf) {
        let key = f.mode.name().replace('-', "_");
        let top = f.top;
        summary[format!("{key}_program_{top}x10_seconds")] = json!(f.program_seconds);
        summary[format!("{key}_update_one_with_{top}_seconds")] = json!(f.update_median);
        summary[format!("{key}_agent_rss_bytes_{top}")] = json!(f.agent_rss_bytes);
        if top == 10_000 {
            let (_, v) = f.at(10_000);
            summary[format!("ebpf_over_{key}_conn_rate_10000")] =
                json!(ratio(e10v.conn_rate, v.conn_rate));
            summary[format!("{key}_over_ebpf_program_time_10000x10")] =
                json!(ratio(f.program_seconds, ebpf.program_seconds));
        }
    }
    let path_json = |f: PathFigures| json!({"conn_per_second": f.conn_rate, "latency_p50_us": f.p50_us, "latency_p99_us": f.p99_us});
    let mode_json = |m: &ModeFigures| -> Value {
        let sizes: serde_json::Map<String, Value> = m
            .sizes
            .iter()
            .map(|(n, d, v)| {
                (
                    format!("services_{n}"),
                    json!({"direct": path_json(*d), "vip": path_json(*v)}),
                )
            })
            .collect();
        json!({
            "sizes": sizes,
            "services": m.top,
            "program_seconds": m.program_seconds,
            "update_one_seconds": {"median": m.update_median, "p99": m.update_p99,
                                   "samples": m.update_samples},
            "agent_rss_bytes": m.agent_rss_bytes,
        })
    };
    let mut report = json!({
        "bench": "lb",
        "machine": {"cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                    "kernel": seine_tests::sh("uname", &["-r"]).unwrap_or_default().trim(),
                    "iptables": seine_tests::sh("iptables", &["--version"]).unwrap_or_default().trim(),
                    "nft": seine_tests::sh("nft", &["--version"]).unwrap_or_default().trim()},
        "method": {"client_threads": CLIENT_THREADS, "rounds": ROUNDS, "round_seconds": ROUND.as_secs_f64(),
                   "latency_samples": LATENCY_SAMPLES,
                   "note": "direct and VIP alternate round by round; rates are medians of the rounds; \
                            programming and update times are the datapath library's; RSS is the agent's \
                            with the mode's largest service count x 10 backends from its services file;"},
        "summary": summary,
    });
    for f in &figures {
        report[f.mode.name()] = mode_json(f);
    }

    println!();
    println!(
        "{:<16} {:>8} {:<7} {:>9} {:>9} {:>9} {:>11}",
        "MODE", "SERVICES", "PATH", "CONN/S", "P50(us)", "P99(us)", "VS DIRECT"
    );
    for m in &figures {
        for (n, d, v) in &m.sizes {
            for (path, f) in [("direct", d), ("vip", v)] {
                let versus = if path == "vip" {
                    format!("{:.3}", ratio(v.conn_rate, d.conn_rate))
                } else {
                    String::new()
                };
                println!(
                    "{:<16} {:>8} {:<7} {:>9.0} {:>9.1} {:>9.1} {:>11}",
                    m.mode.name(),
                    n,
                    path,
                    f.conn_rate,
                    f.p50_us,
                    f.p99_us,
                    versus
                );
            }
        }
    }
    println!();
    println!(
        "{:<16} {:>8} {:>16} {:>16} {:>12} {:>14}",
        "MODE", "SERVICES", "PROGRAM x10 (s)", "CHANGE ONE (s)", "RSS (MiB)", "PROGRAM/EBPF"
    );
    for m in &figures {
        println!(
            "{:<16} {:>8} {:>16.3} {:>16.6} {:>12.1} {:>14}",
            m.mode.name(),
            m.top,
            m.program_seconds,
            m.update_median,
            m.agent_rss_bytes as f64 / 1048576.0,
            if m.top == ebpf.top {
                format!("{:.1}", ratio(m.program_seconds, ebpf.program_seconds))
            } else {
                "-".to_string()
            }
        );
    }

    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(json_path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("\nwrote {}", json_path.display());
    Ok(())
}

/// `count` services of 10 unreachable backends each at 10.97.0.0/16, then the probe: one more
/// service, at `probe_ip`, whose only backend is the real one.
fn services(count: u32, probe_ip: Ipv4Addr, real: BackendSpec) -> Vec<ServiceSpec> {
    let mut specs: Vec<ServiceSpec> = (0..count)
        .map(|i| ServiceSpec {
            frontend: frontend(Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8)),
            backends: (0..10u32)
                .map(|j| BackendSpec {
                    ip: Ipv4Addr::from(0x0af4_0100u32 + (i * 10 + j) % 60_000).into(),
                    port: PORT,
                    state: BackendState::Active,
                })
                .collect(),
            affinity_timeout_secs: None,
        })
        .collect();
    specs.push(ServiceSpec {
        frontend: frontend(probe_ip),
        backends: vec![real],
        affinity_timeout_secs: None,
    });
    specs
}

fn bench_mode(mode: Mode) -> Result<ModeFigures> {
    let name = mode.name();
    let top = TOP;
    println!("bench lb [{name}]: building the topology (node, client pod, backend pod)");
    let mut node = Node::create("bn")?;
    node.add_pod("client", Ipv4Addr::new(10, 244, 0, 2))?;
    node.add_pod("backend", Ipv4Addr::new(10, 244, 0, 11))?;
    node.pod_mut("backend").serve(PORT)?;
    // iptables programs the namespace of the thread that runs it: this one.
    seine_tests::enter(&node.ns.path())?;
    let mut dp: Box<dyn Datapath> = match mode {
        Mode::Ebpf => {
            // The agent loads and attaches the programs; the library programs the maps beside it.
            node.start_agent(&mode.agent_args())?;
            Box::new(EbpfDatapath::open(&node.bpffs_dir, Owner::Cli)?)
        }
        // No agent yet: its resyncs would remove the rules the library writes.
        Mode::Iptables(backend) => Box::new(IptablesDatapath::new(backend)),
        Mode::Nftables => Box::new(NftablesDatapath::new()),
    };
    let backend_ip = node.pod("backend").ip;
    let direct: SocketAddr = (backend_ip, PORT).into();
    let real = BackendSpec {
        ip: backend_ip.into(),
        port: PORT,
        state: BackendState::Active,
    };
    // Above every other VIP, so that in iptables' services chain the probe comes last.
    let probe_ip = Ipv4Addr::new(10, 99, 0, 1);
    let probe: SocketAddr = (probe_ip, 80).into();

    let mut sizes = Vec::new();
    for n in [1, 1_000].into_iter().filter(|n| *n < top) {
        apply(dp.as_mut(), &services(n - 1, probe_ip, real))?;
        println!("bench lb [{name}]: {n} service(s): measuring direct and VIP");
        let (d, v) = measure_pair(&node, direct, probe)?;
        sizes.push((n, d, v));
    }

    println!("bench lb [{name}]: programming {top} services x 10 backends from empty");
    apply(dp.as_mut(), &[])?;
    let mut specs = services(top - 1, probe_ip, real);
    let probe_real = specs.last().cloned().context("no services")?;
    if let Some(last) = specs.last_mut() {
        // Ten backends like every other service; the changes below make the real one the only one.
        last.backends = services(1, probe_ip, real)[0].backends.clone();
    }
    let probe_ten = specs.last().cloned().context("no services")?;
    let start = Instant::now();
    apply(dp.as_mut(), &specs)?;
    let program_seconds = start.elapsed().as_secs_f64();

    // An odd count, so the last change leaves the probe on the real backend.
    let reps = if mode == Mode::Ebpf { 101 } else { 7 };
    println!("bench lb [{name}]: changing one service with {top} present ({reps} times)");
    let mut samples = Vec::new();
    for i in 0..reps {
        let spec = if i % 2 == 0 { &probe_real } else { &probe_ten };
        let start = Instant::now();
        dp.upsert(spec)?;
        samples.push(start.elapsed().as_secs_f64());
    }
    let update_median = quantile(&mut samples, 0.5);
    let update_p99 = quantile(&mut samples, 0.99);

    println!(
        "bench lb [{name}]: {top} services: measuring direct and VIP to the last one inserted"
    );
    let (d, v) = measure_pair(&node, direct, probe)?;
    sizes.push((top, d, v));
    drop(dp);

    println!("bench lb [{name}]: the agent programming {top} services x 10 backends of its own");
    // The agent's own set, at other VIPs: with eBPF the library's entries stay beside it.
    let agent_specs: Vec<ServiceSpec> = services(top - 1, probe_ip, real)
        .into_iter()
        .map(|mut s| {
            if let std::net::IpAddr::V4(ip) = s.frontend.ip {
                let o = ip.octets();
                s.frontend.ip = Ipv4Addr::new(10, 98, o[2], o[3]).into();
            }
            s
        })
        .collect();
    if mode != Mode::Ebpf {
        node.start_agent(&mode.agent_args())?;
    }
    node.replace_services(agent_specs)?;
    let pid = node.agent.as_ref().map(|a| a.pid()).context("no agent")?;
    let agent_rss_bytes = rss_bytes(pid)?;
    node.stop_agent()?;

    Ok(ModeFigures {
        mode,
        top,
        sizes,
        program_seconds,
        update_median,
        update_p99,
        update_samples: reps,
        agent_rss_bytes,
    })
}

fn apply(dp: &mut dyn Datapath, specs: &[ServiceSpec]) -> Result<()> {
    let report = dp.apply(specs);
    if let Some(e) = report.failed.first() {
        bail!("programming {} services failed: {e}", specs.len());
    }
    Ok(())
}

fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kib * 1024)
}

fn frontend(ip: Ipv4Addr) -> Frontend {
    Frontend {
        ip: ip.into(),
        port: 80,
        protocol: Protocol::Tcp,
    }
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
    let stop = Arc::new(AtomicBool::new(false));
    let path = node.pod("client").ns.path();
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            let (done, failed, stop, path) =
                (done.clone(), failed.clone(), stop.clone(), path.clone());
            let first_error = first_error.clone();
            std::thread::spawn(move || -> Result<()> {
                seine_tests::enter(&path)?;
                while !stop.load(Ordering::Relaxed) {
                    match short_connection(addr) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
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
        bail!("{failed} connections to {addr} failed, the first with: {first}");
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
