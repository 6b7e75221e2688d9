//! seine-agent's metrics, in the process registry that seine-component-base's health server
//! serves on `/metrics`. The packet counters live in the eBPF `STATS` map and are read into
//! their gauges when `/metrics` is scraped.

use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use seine_component_base::metrics::register;

type Labels = Vec<(String, String)>;

pub struct AgentMetrics {
    /// `seine_services`: frontends programmed.
    pub services: Gauge,
    /// `seine_sync_total{result}`: reconciliations of the desired state.
    pub syncs: Family<Labels, Counter>,
    pub sync_seconds: Histogram,
    /// `seine_attached_interfaces`.
    pub attached: Gauge,
    /// `seine_datapath_packets{outcome}`: the eBPF counters, summed over CPUs.
    pub packets: Family<Labels, Gauge>,
}

impl AgentMetrics {
    /// Registers the agent's metrics, with `seine_datapath_mode{mode}` set to 1 for `mode`.
    pub fn register(mode: &str) -> Self {
        let metrics = AgentMetrics {
            services: Gauge::default(),
            syncs: Family::default(),
            sync_seconds: Histogram::new([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0]),
            attached: Gauge::default(),
            packets: Family::default(),
        };
        let mode_gauge = Family::<Labels, Gauge>::default();
        mode_gauge
            .get_or_create(&vec![("mode".into(), mode.into())])
            .set(1);
        register("seine_datapath_mode", "The datapath in use", mode_gauge);
        register(
            "seine_services",
            "Service frontends programmed by the agent",
            metrics.services.clone(),
        );
        register(
            "seine_sync",
            "Reconciliations of the desired services, by result",
            metrics.syncs.clone(),
        );
        register(
            "seine_sync_duration_seconds",
            "Time to apply a new desired state",
            metrics.sync_seconds.clone(),
        );
        register(
            "seine_attached_interfaces",
            "Interfaces with the datapath attached",
            metrics.attached.clone(),
        );
        register(
            "seine_datapath_packets",
            "Packets by datapath outcome, summed over CPUs",
            metrics.packets.clone(),
        );
        metrics
    }

    /// Counts one reconciliation with `result` (`ok`, `error`, `invalid_input`).
    pub fn synced(&self, result: &str) {
        self.syncs
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }
}
