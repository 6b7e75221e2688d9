//! Service specs written as the Kubernetes objects the agent reads: a Service and its
//! EndpointSlices (one per backend port), with ready/serving/terminating conditions.

use std::collections::BTreeMap;

use seine_agent::model::{BackendState, Protocol, ServiceSpec};
use serde_json::{json, Value};

pub fn services_to_objects<'a>(specs: impl IntoIterator<Item = &'a ServiceSpec>) -> Vec<Value> {
    let mut items = Vec::new();
    for spec in specs {
        let f = spec.frontend;
        let name = format!(
            "svc-{}-{}-{}",
            f.ip.to_string().replace('.', "-"),
            f.port,
            match f.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
        );
        let protocol = f.protocol.to_string();
        let mut service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": f.ip.to_string(),
                     "ports": [{"name": "p", "port": f.port, "protocol": protocol}]}
        });
        if let Some(timeout) = spec.affinity_timeout_secs {
            service["spec"]["sessionAffinity"] = "ClientIP".into();
            service["spec"]["sessionAffinityConfig"] =
                json!({"clientIP": {"timeoutSeconds": timeout}});
        }
        items.push(service);
        let mut by_port: BTreeMap<u16, Vec<Value>> = BTreeMap::new();
        for b in &spec.backends {
            let ready = b.state == BackendState::Active;
            by_port.entry(b.port).or_default().push(json!({
                "addresses": [b.ip.to_string()],
                "conditions": {"ready": ready, "serving": true, "terminating": !ready}
            }));
        }
        for (port, endpoints) in by_port {
            items.push(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-{port}"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "ports": [{"name": "p", "port": port, "protocol": protocol}],
                "endpoints": endpoints
            }));
        }
    }
    items
}
