//! Prometheus metrics under CoreDNS's names and labels, so dashboards and alerts written for CoreDNS
//! keep working: `coredns_dns_*` for the server, `coredns_cache_*` for the cache,
//! `coredns_forward_*` (in `forward`) for the forwarder, and the build, reload and plugin gauges.

use std::{
    collections::HashSet,
    sync::{Mutex, OnceLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::forward::ForwardMetrics;

/// A label value that lives as long as the process: server and zone names come from the Corefile
/// and are few, so each distinct one is kept once (a reload with the same names adds nothing).
pub fn intern(text: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let mut names = match names.lock() {
        Ok(n) => n,
        Err(e) => e.into_inner(),
    };
    if let Some(known) = names.get(text) {
        return known;
    }
    let leaked: &'static str = Box::leak(text.to_string().into_boxed_str());
    names.insert(leaked);
    leaked
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub proto: &'static str,
    pub family: &'static str,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub rcode: &'static str,
    pub plugin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SizeLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub proto: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub server: &'static str,
    pub zones: &'static str,
    pub view: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheTypeLabels {
    pub server: &'static str,
    pub r#type: &'static str,
    pub zones: &'static str,
    pub view: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub server: &'static str,
    pub zone: &'static str,
    pub view: &'static str,
    pub name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub revision: &'static str,
    pub goversion: &'static str,
}

fn size_histogram() -> Histogram {
    // CoreDNS's buckets: 0, 100, 200, 300, 400, 511, 1023, 2047, 4095, 8291, 16000, 32000, 48000,
    // 64000.
    Histogram::new([
        0.0, 100.0, 200.0, 300.0, 400.0, 511.0, 1023.0, 2047.0, 4095.0, 8291.0, 16e3, 32e3, 48e3,
        64e3,
    ])
}

fn duration_histogram() -> Histogram {
    // CoreDNS: 0.00025 s doubling 16 times.
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

/// Every metric seine-dns exports. One instance lives for the process; reloads keep it.
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub responses: Family<ResponseLabels, Counter>,
    pub duration: Family<DurationLabels, Histogram, fn() -> Histogram>,
    pub request_size: Family<SizeLabels, Histogram, fn() -> Histogram>,
    pub panics: Counter,
    pub plugin_enabled: Family<PluginLabels, Gauge>,
    pub build_info: Family<BuildLabels, Gauge>,
    pub reload_failed: Counter,
    pub cache_entries: Family<CacheTypeLabels, Gauge>,
    pub cache_hits: Family<CacheTypeLabels, Counter>,
    pub cache_misses: Family<CacheLabels, Counter>,
    pub cache_requests: Family<CacheLabels, Counter>,
    pub cache_prefetch: Family<CacheLabels, Counter>,
    pub cache_served_stale: Family<CacheLabels, Counter>,
    pub cache_evictions: Family<CacheTypeLabels, Counter>,
    pub kubernetes_sync: Gauge,
    pub forward: ForwardMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            requests: Family::default(),
            responses: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_size: Family::new_with_constructor(size_histogram),
            panics: Counter::default(),
            plugin_enabled: Family::default(),
            build_info: Family::default(),
            reload_failed: Counter::default(),
            cache_entries: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            cache_requests: Family::default(),
            cache_prefetch: Family::default(),
            cache_served_stale: Family::default(),
            cache_evictions: Family::default(),
            kubernetes_sync: Gauge::default(),
            forward: ForwardMetrics::new(),
        }
    }

    /// A registry holding every metric (the `/metrics` endpoint encodes it).
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "coredns_dns_requests",
            "Counter of DNS requests made per zone, protocol and family",
            self.requests.clone(),
        );
        r.register(
            "coredns_dns_responses",
            "Counter of response status codes",
            self.responses.clone(),
        );
        r.register(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took per zone",
            self.duration.clone(),
        );
        r.register(
            "coredns_dns_request_size_bytes",
            "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol",
            self.request_size.clone(),
        );
        r.register(
            "coredns_panics",
            "A metrics that counts the number of panics",
            self.panics.clone(),
        );
        r.register(
            "coredns_plugin_enabled",
            "A metric that indicates whether a plugin is enabled on per server and zone basis",
            self.plugin_enabled.clone(),
        );
        r.register(
            "coredns_build_info",
            "A metric with a constant '1' value labeled by version, revision, and goversion from which CoreDNS was built",
            self.build_info.clone(),
        );
        r.register(
            "coredns_reload_failed",
            "Counter of the number of failed reload attempts",
            self.reload_failed.clone(),
        );
        r.register(
            "coredns_cache_entries",
            "The number of elements in the cache",
            self.cache_entries.clone(),
        );
        r.register(
            "coredns_cache_hits",
            "The count of cache hits",
            self.cache_hits.clone(),
        );
        r.register(
            "coredns_cache_misses",
            "The count of cache misses. Deprecated, derive misses from cache hits/requests counters",
            self.cache_misses.clone(),
        );
        r.register(
            "coredns_cache_requests",
            "The count of cache requests",
            self.cache_requests.clone(),
        );
        r.register(
            "coredns_cache_prefetch",
            "The number of times the cache has prefetched a cached item",
            self.cache_prefetch.clone(),
        );
        r.register(
            "coredns_cache_served_stale",
            "The number of requests served from stale cache entries",
            self.cache_served_stale.clone(),
        );
        r.register(
            "coredns_cache_evictions",
            "The count of cache evictions",
            self.cache_evictions.clone(),
        );
        r.register(
            "seine_dns_kubernetes_synced",
            "1 once every watch of the kubernetes plugin has listed, else 0",
            self.kubernetes_sync.clone(),
        );
        self.forward.register(&mut r);
        r
    }
}
