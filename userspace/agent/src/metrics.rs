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
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: one write of the datapath.
    pub sync_seconds: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`: when the last write succeeded.
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `kubeproxy_network_programming_duration_seconds`: from a change in the API (its
    /// EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`, else the watch event)
    /// to the datapath holding it.
    pub programming_seconds: Histogram,
    /// `seine_attached_interfaces`.
    pub attached: Gauge,
    /// `seine_datapath_packets{outcome}`: the eBPF counters, summed over CPUs.
    pub packets: Family<Labels, Gauge>,
    /// `seine_bpf_map_entries{map_name}`: what each eBPF map holds.
    pub map_entries: Family<Labels, Gauge>,
    /// `seine_bpf_map_pressure{map_name}`: entries over capacity, as Cilium's
    /// `cilium_bpf_map_pressure` (a map at 1 refuses new entries).
    pub map_pressure: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl AgentMetrics {
    /// Registers the agent's metrics, with `seine_datapath_mode{mode}` set to 1 for `mode`.
    pub fn register(mode: &str) -> Self {
        let metrics = AgentMetrics {
            services: Gauge::default(),
            syncs: Family::default(),
            sync_seconds: Histogram::new([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0]),
            last_sync: Gauge::default(),
            // kube-proxy's buckets: 0.25 s to 20 min would say nothing of an eBPF datapath.
            programming_seconds: Histogram::new([
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 30.0, 60.0,
            ]),
            attached: Gauge::default(),
            packets: Family::default(),
            map_entries: Family::default(),
            map_pressure: Family::default(),
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
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "One write of the changed services into the datapath",
            metrics.sync_seconds.clone(),
        );
        register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the datapath was last written successfully (Unix time)",
            metrics.last_sync.clone(),
        );
        register(
            "kubeproxy_network_programming_duration_seconds",
            "From a service or endpoint change in the API to the datapath holding it",
            metrics.programming_seconds.clone(),
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
        register(
            "seine_bpf_map_entries",
            "Entries in each eBPF map",
            metrics.map_entries.clone(),
        );
        register(
            "seine_bpf_map_pressure",
            "Fill of each eBPF map: entries over capacity",
            metrics.map_pressure.clone(),
        );
        metrics
    }

    /// Sets the map fill gauges from (map, entries, capacity).
    pub fn map_fill(&self, fill: &[(&str, usize, u32)]) {
        for (name, entries, capacity) in fill {
            let labels = vec![("map_name".to_string(), name.to_string())];
            self.map_entries.get_or_create(&labels).set(*entries as i64);
            let pressure = if *capacity > 0 {
                *entries as f64 / *capacity as f64
            } else {
                0.0
            };
            self.map_pressure.get_or_create(&labels).set(pressure);
        }
    }

    /// Counts one reconciliation with `result` (`ok`, `error`, `invalid_input`).
    pub fn synced(&self, result: &str) {
        self.syncs
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }
}
