//! The one health and metrics server of every daemon but the API server (which serves these
//! paths behind its own authentication): `/healthz` and `/livez` answer 200 while
//! [`Probes::live`] holds (by default, while the process runs), `/readyz` 200 only while
//! [`Probes::ready`] holds, `/metrics` the [`crate::metrics`]
//! registry. It stops with the daemon's shutdown token.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use anyhow::Context as _;
use axum::{extract::State, http::StatusCode, routing::get, Router};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;

/// What the server asks of its daemon.
pub trait Probes: Send + Sync + 'static {
    /// Whether `/readyz` answers 200.
    fn ready(&self) -> bool;
    /// Whether `/healthz` and `/livez` answer 200: the daemon does its work (kube-proxy's is
    /// unhealthy while a change waits too long to be written).
    fn live(&self) -> bool {
        true
    }
    /// Runs before `/metrics` renders, to read figures kept elsewhere (eBPF maps, say).
    fn refresh_metrics(&self) {}
}

/// A daemon whose readiness is one flag.
impl Probes for AtomicBool {
    fn ready(&self) -> bool {
        self.load(Ordering::SeqCst)
    }
}

type Shared = Arc<dyn Probes>;

async fn healthz(State(probes): State<Shared>) -> (StatusCode, &'static str) {
    if probes.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
    }
}

async fn readyz(State(probes): State<Shared>) -> (StatusCode, &'static str) {
    if probes.ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics_text(State(probes): State<Shared>) -> ([(&'static str, &'static str); 1], String) {
    probes.refresh_metrics();
    ([("content-type", metrics::CONTENT_TYPE)], metrics::text())
}

/// Listens on `addr` (port 0 picks one) and serves in the background until `shutdown`; returns
/// the address it listens on.
pub async fn serve(
    addr: SocketAddr,
    probes: Arc<dyn Probes>,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(probes);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for /healthz and /metrics"))?;
    let local = listener.local_addr().unwrap_or(addr);
    info!(addr = %local, "serving /healthz, /livez, /readyz, /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            warn!(error = %e, "the health server stopped");
        }
    });
    Ok(local)
}
