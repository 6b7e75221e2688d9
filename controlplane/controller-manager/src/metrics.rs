//! The Prometheus metrics every controller and the scheduler report into, in one registry that
//! the daemon's `/metrics` serves. Names follow kube-controller-manager's where one exists
//! (`leader_election_master_status`); the rest carry a `seine_` prefix.

use std::sync::{LazyLock, Mutex};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Metric, Registry},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub controller: String,
    /// `success` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabels {
    pub name: String,
}

pub struct Metrics {
    /// `seine_controller_syncs_total{controller,result}`: one per object reconciled.
    pub syncs: Family<SyncLabels, Counter>,
    /// `leader_election_master_status{name}`: 1 while this replica leads.
    pub leader: Family<LeaseLabels, Gauge>,
    registry: Mutex<Registry>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let syncs = Family::<SyncLabels, Counter>::default();
    registry.register(
        "seine_controller_syncs",
        "Objects reconciled, by controller and result",
        syncs.clone(),
    );
    let leader = Family::<LeaseLabels, Gauge>::default();
    registry.register(
        "leader_election_master_status",
        "1 while this replica holds the leader Lease, else 0",
        leader.clone(),
    );
    Metrics {
        syncs,
        leader,
        registry: Mutex::new(registry),
    }
});

pub fn global() -> &'static Metrics {
    &METRICS
}

/// Counts one reconcile of `controller`.
pub fn synced(controller: &str, ok: bool) {
    METRICS
        .syncs
        .get_or_create(&SyncLabels {
            controller: controller.to_string(),
            result: if ok { "success" } else { "error" }.to_string(),
        })
        .inc();
}

/// Adds a metric of a component's own (the scheduler's, say) to the served registry.
pub fn register(name: &str, help: &str, metric: impl Metric) {
    if let Ok(mut registry) = METRICS.registry.lock() {
        registry.register(name, help, metric);
    }
}

/// The registry in the Prometheus text format.
pub fn text() -> String {
    let mut out = String::new();
    if let Ok(registry) = METRICS.registry.lock() {
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
    }
    out
}
