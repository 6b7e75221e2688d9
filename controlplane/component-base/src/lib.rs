//! The frame every Seine daemon starts in, staged as Kubernetes stages its component-base:
//!
//! - [`init_logging`]: `tracing` to stderr, as text or JSON lines, filtered by `RUST_LOG`.
//! - [`block_on`]: a daemon's async main on a multi-threaded runtime, its error as exit status 1.
//! - [`stop_signal`]: the future a daemon's main loop stops on (SIGTERM or SIGINT).
//! - [`client`]: the API client from `--kubeconfig`, else in-cluster or the default kubeconfig.
//! - [`metrics`]: the process's one Prometheus registry; [`health`]: the one server of
//!   `/healthz`, `/livez`, `/readyz` and `/metrics`.
//! - [`events`]: Events about objects, repeats aggregated as client-go does.
//! - [`leader`]: leader election on a `coordination.k8s.io/v1` Lease; [`daemon`]: the
//!   leader-elected frame of the controller manager and the scheduler, with their common flags.
//!
//! A daemon starts as: logs, the stop signal to a shutdown token, the health server (not ready),
//! the client, then its work; SIGTERM cancels the token, readiness drops, the work returns.

mod client;
pub mod daemon;
pub mod events;
pub mod health;
pub mod leader;
mod logging;
pub mod metrics;
mod runtime;

pub use client::client;
pub use logging::init_logging;
pub use runtime::{block_on, cancel_on_stop_signal, stop_signal};

/// The Kubernetes release whose API and behaviour Seine's components follow: the API server's
/// `/version` and the kubelet's `status.nodeInfo.kubeletVersion`.
pub const KUBERNETES_VERSION: &str = "v1.32.0-seine";
/// Its minor version, as `/version` reports it.
pub const KUBERNETES_MINOR: &str = "32";

/// This machine's hostname ("seine" when it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "seine".into())
}
