//! CoreDNS's forward metrics (`coredns_forward_*`, `coredns_proxy_*`) and their labels.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use super::PROXY_NAME;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToLabels {
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToRcodeLabels {
    pub to: String,
    pub rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyToLabels {
    pub proxy_name: &'static str,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyRcodeLabels {
    pub proxy_name: &'static str,
    pub to: String,
    pub rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyConnLabels {
    pub proxy_name: &'static str,
    pub to: String,
    pub proto: &'static str,
}

pub(super) fn duration_histogram() -> Histogram {
    // CoreDNS's plugin.TimeBuckets: 0.25 ms doubling 16 times (to about 8 s).
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

/// The forwarder's metrics under CoreDNS's names and labels. `to` is the upstream as `ip:port`
/// (`[v6]:port`), `rcode` CoreDNS's name of the upstream's RCODE (`NOERROR`, `NXDOMAIN`, ...).
///
/// CoreDNS 1.11 moved the per-upstream series to `coredns_proxy_*{proxy_name="forward"}` and kept
/// `coredns_forward_healthcheck_broken_total` and `coredns_forward_max_concurrent_rejects_total`;
/// the older `coredns_forward_{requests,responses}_total`, `coredns_forward_request_duration_seconds`
/// and `coredns_forward_healthcheck_failures_total` are exported as well so dashboards of either
/// generation work. Clones share the same series (one instance per process survives reloads).
#[derive(Clone, Debug)]
pub struct ForwardMetrics {
    /// `coredns_forward_requests_total{to}` (before CoreDNS 1.11).
    pub requests: Family<ToLabels, Counter>,
    /// `coredns_forward_responses_total{to,rcode}` (before CoreDNS 1.11).
    pub responses: Family<ToRcodeLabels, Counter>,
    /// `coredns_forward_request_duration_seconds{to,rcode}` (before CoreDNS 1.11).
    pub request_duration: Family<ToRcodeLabels, Histogram, fn() -> Histogram>,
    /// `coredns_forward_healthcheck_failures_total{to}` (before CoreDNS 1.11).
    pub healthcheck_failures: Family<ToLabels, Counter>,
    /// `coredns_forward_healthcheck_broken_total`: every upstream was down, one was picked at random.
    pub healthcheck_broken: Counter,
    /// `coredns_forward_max_concurrent_rejects_total`.
    pub max_concurrent_rejects: Counter,
    /// `coredns_proxy_request_duration_seconds{proxy_name,to,rcode}`.
    pub proxy_request_duration: Family<ProxyRcodeLabels, Histogram, fn() -> Histogram>,
    /// `coredns_proxy_healthcheck_failures_total{proxy_name,to}`.
    pub proxy_healthcheck_failures: Family<ProxyToLabels, Counter>,
    /// `coredns_proxy_conn_cache_hits_total{proxy_name,to,proto}`.
    pub proxy_conn_cache_hits: Family<ProxyConnLabels, Counter>,
    /// `coredns_proxy_conn_cache_misses_total{proxy_name,to,proto}`.
    pub proxy_conn_cache_misses: Family<ProxyConnLabels, Counter>,
}

impl Default for ForwardMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ForwardMetrics {
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            responses: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            healthcheck_failures: Family::default(),
            healthcheck_broken: Counter::default(),
            max_concurrent_rejects: Counter::default(),
            proxy_request_duration: Family::new_with_constructor(duration_histogram),
            proxy_healthcheck_failures: Family::default(),
            proxy_conn_cache_hits: Family::default(),
            proxy_conn_cache_misses: Family::default(),
        }
    }

    /// Registers every series under its full name (counters get `_total` from the encoder).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "coredns_forward_requests",
            "Counter of requests made per upstream",
            self.requests.clone(),
        );
        registry.register(
            "coredns_forward_responses",
            "Counter of responses received per upstream",
            self.responses.clone(),
        );
        registry.register(
            "coredns_forward_request_duration_seconds",
            "Histogram of the time each request took",
            self.request_duration.clone(),
        );
        registry.register(
            "coredns_forward_healthcheck_failures",
            "Counter of the number of failed healthchecks",
            self.healthcheck_failures.clone(),
        );
        registry.register(
            "coredns_forward_healthcheck_broken",
            "Counter of the number of complete failures of the healthchecks",
            self.healthcheck_broken.clone(),
        );
        registry.register(
            "coredns_forward_max_concurrent_rejects",
            "Counter of the number of queries rejected because the concurrent queries were at maximum",
            self.max_concurrent_rejects.clone(),
        );
        registry.register(
            "coredns_proxy_request_duration_seconds",
            "Histogram of the time each request took",
            self.proxy_request_duration.clone(),
        );
        registry.register(
            "coredns_proxy_healthcheck_failures",
            "Counter of the number of failed healthchecks",
            self.proxy_healthcheck_failures.clone(),
        );
        registry.register(
            "coredns_proxy_conn_cache_hits",
            "Counter of connection cache hits per upstream and protocol",
            self.proxy_conn_cache_hits.clone(),
        );
        registry.register(
            "coredns_proxy_conn_cache_misses",
            "Counter of connection cache misses per upstream and protocol",
            self.proxy_conn_cache_misses.clone(),
        );
    }

    pub(super) fn conn(&self, to: &str, proto: &'static str, hit: bool) {
        let labels = ProxyConnLabels {
            proxy_name: PROXY_NAME,
            to: to.to_string(),
            proto,
        };
        if hit {
            self.proxy_conn_cache_hits.get_or_create(&labels).inc();
        } else {
            self.proxy_conn_cache_misses.get_or_create(&labels).inc();
        }
    }

    pub(super) fn request(&self, to: &str) {
        self.requests
            .get_or_create(&ToLabels { to: to.to_string() })
            .inc();
    }

    pub(super) fn response(&self, to: &str, rcode: String, took: Duration) {
        let labels = ToRcodeLabels {
            to: to.to_string(),
            rcode,
        };
        self.responses.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.proxy_request_duration
            .get_or_create(&ProxyRcodeLabels {
                proxy_name: PROXY_NAME,
                to: labels.to,
                rcode: labels.rcode,
            })
            .observe(took.as_secs_f64());
    }

    pub(super) fn healthcheck_failure(&self, to: &str) {
        self.healthcheck_failures
            .get_or_create(&ToLabels { to: to.to_string() })
            .inc();
        self.proxy_healthcheck_failures
            .get_or_create(&ProxyToLabels {
                proxy_name: PROXY_NAME,
                to: to.to_string(),
            })
            .inc();
    }
}

/// CoreDNS's (miekg/dns's) name of an RCODE, the number for the unnamed ones.
pub(super) fn rcode_name(rcode: u16) -> String {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        11 => "DSOTYPENI",
        16 => "BADSIG",
        17 => "BADKEY",
        18 => "BADTIME",
        19 => "BADMODE",
        20 => "BADNAME",
        21 => "BADALG",
        22 => "BADTRUNC",
        23 => "BADCOOKIE",
        other => return other.to_string(),
    };
    name.to_string()
}

// ---------------------------------------------------------------------------------------------
// Wire format helpers
