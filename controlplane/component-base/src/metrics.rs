//! The process's one Prometheus registry, which [`crate::health`] serves on `/metrics`. Each
//! component registers its own metrics here, in upstream names where Kubernetes has them
//! (`leader_election_master_status`, `scheduler_pending_pods`) and with a `seine_` prefix
//! otherwise.

use std::sync::{LazyLock, Mutex};

use prometheus_client::{
    encoding::text::encode,
    registry::{Metric, Registry},
};

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

/// The content type of [`text`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Adds `metric` to the served registry.
pub fn register(name: &str, help: &str, metric: impl Metric) {
    if let Ok(mut registry) = REGISTRY.lock() {
        registry.register(name, help, metric);
    }
}

/// The registry in the OpenMetrics text format.
pub fn text() -> String {
    let mut out = String::new();
    if let Ok(registry) = REGISTRY.lock() {
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
    }
    out
}
