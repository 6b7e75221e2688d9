//! seine-dns: a CoreDNS-compatible cluster DNS server. Started as CoreDNS is:
//! `seine-dns -conf /etc/coredns/Corefile [-dns.port 53]`; reads the same Corefile, serves DNS on
//! UDP and TCP, `/health`, `/ready` and `/metrics` where the Corefile says, reloads a changed
//! Corefile when it has `reload`, and on SIGTERM keeps answering for the `health` block's
//! `lameduck` time before it stops.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, RwLock},
    time::Duration,
};

use clap::Parser;
use seine_dns::{
    app::{self, HttpState, Listener, Views},
    metrics::Metrics,
};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "seine-dns",
    version,
    about = "Seine's CoreDNS-compatible cluster DNS server"
)]
struct Args {
    /// Corefile to load (CoreDNS's `-conf`).
    #[arg(long = "conf", default_value = "Corefile")]
    conf: PathBuf,
    /// Default port for server blocks that name none (CoreDNS's `-dns.port`).
    #[arg(long = "dns.port", default_value_t = 53)]
    dns_port: u16,
    /// Log only errors (CoreDNS's `-quiet`).
    #[arg(long = "quiet")]
    quiet: bool,
    /// Log as JSON lines.
    #[arg(long = "log-json")]
    log_json: bool,
    /// Write the PID here (CoreDNS's `-pidfile`).
    #[arg(long = "pidfile")]
    pidfile: Option<PathBuf>,
}

/// CoreDNS's flags have one dash (`-conf`, `-dns.port`); accept them as clap's long flags.
fn normalized_args() -> Vec<String> {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            if i > 0 && a.starts_with('-') && !a.starts_with("--") && a.len() > 2 {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let args = Args::parse_from(normalized_args());
    let filter = if args.quiet {
        "error"
    } else {
        "info,hickory_server=warn,hickory_proto=warn,hickory_net=warn"
    };
    seine_component_base::init_logging(args.log_json, filter);
    seine_component_base::block_on("seine-dns", run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (servers, text) = app::load(&args.conf, args.dns_port)?;
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))?;
    }
    let metrics = Arc::new(Metrics::new());
    app::build_info(&metrics);
    // coredns_panics_total: a panic in a query's task ends that task, not the server.
    let panics = metrics.panics.clone();
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        panics.inc();
        report(info);
    }));
    let registry = Arc::new(metrics.registry());
    let mut views = Views::default();
    let pipelines = app::build(&servers, &mut views, &metrics).await?;

    let handlers = Arc::new(RwLock::new(Vec::new()));
    let stop = CancellationToken::new();
    let state = HttpState {
        metrics: metrics.clone(),
        registry,
        handlers: handlers.clone(),
    };
    // Health and metrics come up first (CoreDNS serves /health while the kubernetes plugin syncs).
    app::serve_http(&servers, state, stop.clone()).await?;
    app::wait_synced(&pipelines).await;

    let mut listeners: BTreeMap<u16, Listener> = BTreeMap::new();
    for (port, pipeline) in pipelines {
        let l = app::listen(port, pipeline, &metrics).await?;
        info!(port, udp = %l.udp, "serving DNS on udp and tcp");
        listeners.insert(port, l);
    }
    set_handlers(&handlers, &listeners);
    app::spawn_loop_probes(&listeners);

    let reload = servers.iter().filter_map(|s| s.reload).min();
    let lameduck = servers
        .iter()
        .filter_map(|s| s.health.map(|(_, d)| d))
        .max()
        .unwrap_or_default();
    // CoreDNS compares a hash of the file; keeping the text it ran is as good.
    let mut running = text;
    // SIGTERM and SIGINT stop it as every daemon stops; SIGHUP re-reads the Corefile (CoreDNS's
    // reload signal).
    let stopping = CancellationToken::new();
    seine_component_base::cancel_on_stop_signal(stopping.clone());
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let wait = match reload {
            Some((interval, jitter)) => {
                let j = if jitter.is_zero() {
                    Duration::ZERO
                } else {
                    Duration::from_millis(rand::random::<u64>() % jitter.as_millis().max(1) as u64)
                };
                interval + j
            }
            None => Duration::from_secs(3600),
        };
        let check = tokio::select! {
            _ = stopping.cancelled() => break,
            _ = hup.recv() => true,
            _ = tokio::time::sleep(wait) => reload.is_some(),
        };
        if !check {
            continue;
        }
        let text = match std::fs::read_to_string(&args.conf) {
            Ok(t) => t,
            Err(e) => {
                warn!(path = %args.conf.display(), error = %e, "reload: cannot read the Corefile; keeping the running one");
                metrics.reload_failed.inc();
                continue;
            }
        };
        if text == running {
            continue;
        }
        match reload_into(&text, &args, &mut views, &metrics, &mut listeners).await {
            Ok(()) => {
                running = text;
                set_handlers(&handlers, &listeners);
                info!(path = %args.conf.display(), "reload: running the changed Corefile");
            }
            Err(e) => {
                metrics.reload_failed.inc();
                error!("reload: {e:#}; keeping the running Corefile");
            }
        }
    }

    if !lameduck.is_zero() {
        info!(?lameduck, "shutting down after lameduck; still answering");
        tokio::time::sleep(lameduck).await;
    }
    for (_, l) in listeners {
        l.stop().await;
    }
    stop.cancel();
    info!("stopped");
    Ok(())
}

fn set_handlers(
    handlers: &RwLock<Vec<seine_dns::server::Handler>>,
    listeners: &BTreeMap<u16, Listener>,
) {
    let list = listeners.values().map(|l| l.handler.clone()).collect();
    match handlers.write() {
        Ok(mut h) => *h = list,
        Err(e) => *e.into_inner() = list,
    }
}

/// Applies a changed Corefile: new pipelines swapped into the running listeners (queries in flight
/// finish on the old one), listeners opened for new ports and closed for ports no longer named.
/// Nothing changes unless the whole Corefile is valid and every new port can be bound.
async fn reload_into(
    text: &str,
    args: &Args,
    views: &mut Views,
    metrics: &Arc<Metrics>,
    listeners: &mut BTreeMap<u16, Listener>,
) -> anyhow::Result<()> {
    let servers = app::parse(text, &args.conf, args.dns_port)?;
    let pipelines = app::build(&servers, views, metrics).await?;
    let mut opened = BTreeMap::new();
    let mut swaps = Vec::new();
    for (port, pipeline) in pipelines {
        if listeners.contains_key(&port) {
            swaps.push((port, pipeline));
        } else {
            opened.insert(port, app::listen(port, pipeline, metrics).await?);
        }
    }
    let keep: Vec<u16> = swaps
        .iter()
        .map(|(p, _)| *p)
        .chain(opened.keys().copied())
        .collect();
    for (port, pipeline) in swaps {
        if let Some(l) = listeners.get(&port) {
            l.handler.swap(pipeline);
        }
    }
    let gone: Vec<u16> = listeners
        .keys()
        .copied()
        .filter(|p| !keep.contains(p))
        .collect();
    for port in gone {
        if let Some(l) = listeners.remove(&port) {
            l.stop().await;
        }
    }
    listeners.extend(opened);
    app::spawn_loop_probes(listeners);
    Ok(())
}
