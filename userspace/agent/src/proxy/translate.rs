//! kube-proxy's reading of one Service and its EndpointSlices: the frontends (one per cluster
//! IP and port) and, for each, the backends this node sends connections to.
//!
//! - Not programmed: ExternalName and headless Services, Services labelled
//!   `service.kubernetes.io/service-proxy-name` (another proxy's), slices labelled
//!   `service.kubernetes.io/headless`, and ports of a protocol the datapath lacks (SCTP), which
//!   are named in the log.
//! - Backends: endpoints whose slice port has the Service port's name (the EndpointSlice
//!   controller resolved named target ports into it), ready ones as active and
//!   serving-and-terminating ones as terminating (the datapath uses those only when no ready one
//!   is left), merged over all of the Service's slices.
//! - `internalTrafficPolicy: Local`: only the endpoints on this node.
//! - Topology (`trafficDistribution: PreferClose`, or the `service.kubernetes.io/topology-mode`
//!   annotation): only the endpoints hinted for this node's zone, when every endpoint has hints
//!   and one is for this zone; otherwise all of them, as kube-proxy falls back.

use std::net::IpAddr;

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::{Endpoint, EndpointSlice},
};
use tracing::warn;

use crate::model::{BackendSpec, BackendState, Frontend, Protocol, ServiceSpec};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
pub const TOPOLOGY_MODE_ANNOTATION: &str = "service.kubernetes.io/topology-mode";
/// The deprecated name of the same annotation, which kube-proxy still reads.
pub const TOPOLOGY_HINTS_ANNOTATION: &str = "service.kubernetes.io/topology-aware-hints";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// kube-proxy's default ClientIP affinity timeout (three hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// What a node's proxy needs to know of its node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: Option<String>,
    /// `topology.kubernetes.io/zone` of the node.
    pub zone: Option<String>,
}

/// Whether this proxy programs `service` at all.
pub fn proxied(service: &Service) -> bool {
    let labelled = service
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL));
    let Some(spec) = &service.spec else {
        return false;
    };
    !labelled && spec.type_.as_deref() != Some("ExternalName")
}

/// Whether a slice feeds this proxy (the headless label marks slices of headless Services).
pub fn slice_proxied(slice: &EndpointSlice) -> bool {
    !slice
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(HEADLESS_LABEL))
}

/// The `namespace/name` of the Service a slice belongs to, from its service-name label.
pub fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let namespace = slice.metadata.namespace.clone().unwrap_or_default();
    Some((namespace, name.clone()))
}

/// The frontends of `service` with the backends this node uses, from its `slices`.
pub fn service_specs(
    service: &Service,
    slices: &[&EndpointSlice],
    node: &NodeInfo,
) -> Vec<ServiceSpec> {
    if !proxied(service) {
        return Vec::new();
    }
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let ips = cluster_ips(service);
    if ips.is_empty() {
        return Vec::new();
    }
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, |t| t.max(1) as u32)
    });
    let local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
    let slices: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| s.address_type == "IPv4" && slice_proxied(s))
        .collect();
    let mut out = Vec::new();
    for port in spec.ports.iter().flatten() {
        let Some((number, protocol)) = port_of(service, port) else {
            continue;
        };
        let port_name = port.name.as_deref().unwrap_or("");
        let mut endpoints: Vec<(&Endpoint, u16)> = slices
            .iter()
            .filter_map(|s| Some((s, slice_port(s, port_name, protocol)?)))
            .flat_map(|(s, target)| s.endpoints.iter().map(move |e| (e, target)))
            .collect();
        if local_only {
            endpoints.retain(|(e, _)| node.name.is_some() && e.node_name == node.name);
        } else if topology_aware(service) {
            endpoints = for_zone(endpoints, node.zone.as_deref());
        }
        let backends: Vec<BackendSpec> = endpoints
            .into_iter()
            .filter_map(|(e, target)| backend(e, target))
            .collect();
        for ip in &ips {
            out.push(
                ServiceSpec {
                    frontend: Frontend {
                        ip: *ip,
                        port: number,
                        protocol,
                    },
                    backends: backends.clone(),
                    affinity_timeout_secs: affinity,
                }
                .normalized(),
            );
        }
    }
    out
}

/// The Service's IPv4 cluster IPs (the datapath has no IPv6 yet; an IPv6 one is left out).
fn cluster_ips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let listed: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    listed
        .into_iter()
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .filter(IpAddr::is_ipv4)
        .collect()
}

/// A Service port as the datapath takes it; SCTP (which it lacks) is logged and left out.
fn port_of(service: &Service, port: &ServicePort) -> Option<(u16, Protocol)> {
    let name = |s: &Service| {
        format!(
            "{}/{}",
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default()
        )
    };
    let protocol = match port
        .protocol
        .as_deref()
        .unwrap_or("TCP")
        .parse::<Protocol>()
    {
        Ok(p) => p,
        Err(_) => {
            warn!(service = %name(service), port = port.port, protocol = ?port.protocol,
                  "this port's protocol is not supported by the datapath (TCP and UDP are); it is not programmed");
            return None;
        }
    };
    let number = u16::try_from(port.port).ok().filter(|p| *p > 0)?;
    Some((number, protocol))
}

/// The target port a slice gives the Service port named `name`.
fn slice_port(slice: &EndpointSlice, name: &str, protocol: Protocol) -> Option<u16> {
    let port = slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == name
            && p.protocol
                .as_deref()
                .unwrap_or("TCP")
                .parse::<Protocol>()
                .ok()
                == Some(protocol)
    })?;
    port.port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
}

fn topology_aware(service: &Service) -> bool {
    let distribution = service
        .spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref());
    let annotations = service.metadata.annotations.as_ref();
    let mode = annotations.and_then(|a| {
        a.get(TOPOLOGY_MODE_ANNOTATION)
            .or_else(|| a.get(TOPOLOGY_HINTS_ANNOTATION))
    });
    distribution == Some("PreferClose") || mode.is_some_and(|m| m.eq_ignore_ascii_case("auto"))
}

/// The endpoints hinted for `zone`, if every usable endpoint carries hints and one is for it;
/// otherwise all of them (kube-proxy's fallback when hints are missing or name other zones).
fn for_zone<'a>(
    endpoints: Vec<(&'a Endpoint, u16)>,
    zone: Option<&str>,
) -> Vec<(&'a Endpoint, u16)> {
    let Some(zone) = zone else {
        return endpoints;
    };
    let zones = |e: &Endpoint| -> Vec<String> {
        e.hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| z.name.clone())
            .collect()
    };
    let usable = endpoints.iter().filter(|(e, _)| state(e).is_some());
    let all_hinted = usable.clone().all(|(e, _)| !zones(e).is_empty());
    let any_here = usable
        .clone()
        .any(|(e, _)| zones(e).iter().any(|z| z == zone));
    if !all_hinted || !any_here {
        return endpoints;
    }
    endpoints
        .into_iter()
        .filter(|(e, _)| zones(e).iter().any(|z| z == zone))
        .collect()
}

/// Ready: takes new connections; serving and terminating: only when nothing is ready; else
/// none (kube-proxy reads missing conditions as ready).
fn state(endpoint: &Endpoint) -> Option<BackendState> {
    let cond = endpoint.conditions.as_ref();
    let ready = cond.and_then(|c| c.ready).unwrap_or(true);
    let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
    let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
    if ready && !terminating {
        Some(BackendState::Active)
    } else if serving && terminating {
        Some(BackendState::Terminating)
    } else {
        None
    }
}

fn backend(endpoint: &Endpoint, port: u16) -> Option<BackendSpec> {
    let state = state(endpoint)?;
    // kube-proxy uses the first address of each endpoint.
    let ip = endpoint.addresses.first()?.parse::<IpAddr>().ok()?;
    Some(BackendSpec { ip, port, state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(
            json!({"metadata": {"name": "web", "namespace": "default"}, "spec": spec}),
        )
        .unwrap()
    }

    fn slice(value: serde_json::Value) -> EndpointSlice {
        let mut base = json!({"metadata": {"name": "web-1", "namespace": "default",
                                           "labels": {SERVICE_NAME_LABEL: "web"}},
                              "addressType": "IPv4",
                              "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
        for (k, v) in value.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    fn addresses(spec: &ServiceSpec) -> Vec<String> {
        spec.backends.iter().map(ToString::to_string).collect()
    }

    fn web() -> Service {
        service(
            json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                       "ports": [{"name": "http", "port": 80, "targetPort": "web"}]}),
        )
    }

    #[test]
    fn endpoints_of_all_slices_are_merged_by_port_name_ready_first() {
        let a = slice(json!({"endpoints": [
            {"addresses": ["10.244.0.2"], "conditions": {"ready": true}},
            {"addresses": ["10.244.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            {"addresses": ["10.244.0.4"], "conditions": {"ready": false}}]}));
        let mut b = slice(
            json!({"endpoints": [{"addresses": ["10.244.0.2"]}, {"addresses": ["10.244.0.5"]}]}),
        );
        b.metadata.name = Some("web-2".into());
        let specs = service_specs(&web(), &[&a, &b], &NodeInfo::default());
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].frontend.to_string(), "10.96.0.10:80/TCP");
        assert_eq!(
            addresses(&specs[0]),
            [
                "10.244.0.2:8080 (active)",
                "10.244.0.5:8080 (active)",
                "10.244.0.3:8080 (terminating)"
            ]
        );
    }

    #[test]
    fn what_kube_proxy_leaves_alone_is_not_programmed() {
        let s = slice(json!({"endpoints": [{"addresses": ["10.244.0.2"]}]}));
        let none = NodeInfo::default();
        let mut other_proxy = web();
        other_proxy.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "x".to_string())].into());
        assert!(service_specs(&other_proxy, &[&s], &none).is_empty());
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        assert!(service_specs(&headless, &[&s], &none).is_empty());
        let external = service(json!({"type": "ExternalName", "externalName": "example.com"}));
        assert!(service_specs(&external, &[&s], &none).is_empty());
        let mut headless_slice = s.clone();
        headless_slice
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(HEADLESS_LABEL.into(), String::new());
        assert!(service_specs(&web(), &[&headless_slice], &none)[0]
            .backends
            .is_empty());
        let sctp = service(json!({"clusterIP": "10.96.0.10",
                                  "ports": [{"name": "a", "port": 80, "protocol": "SCTP"},
                                            {"name": "b", "port": 53, "protocol": "UDP"}]}));
        let specs = service_specs(&sctp, &[], &none);
        assert_eq!(specs.len(), 1, "only the UDP port: {specs:?}");
        assert_eq!(specs[0].frontend.to_string(), "10.96.0.10:53/UDP");
    }

    #[test]
    fn local_traffic_policy_keeps_this_nodes_endpoints() {
        let s = slice(json!({"endpoints": [
            {"addresses": ["10.244.1.2"], "nodeName": "node-1"},
            {"addresses": ["10.244.2.2"], "nodeName": "node-2"}]}));
        let mut local = web();
        local.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let node1 = NodeInfo {
            name: Some("node-1".into()),
            zone: None,
        };
        assert_eq!(
            addresses(&service_specs(&local, &[&s], &node1)[0]),
            ["10.244.1.2:8080 (active)"]
        );
        let elsewhere = NodeInfo {
            name: Some("node-3".into()),
            zone: None,
        };
        assert!(service_specs(&local, &[&s], &elsewhere)[0]
            .backends
            .is_empty());
    }

    #[test]
    fn topology_hints_keep_this_zones_endpoints_or_fall_back_to_all() {
        let hinted = slice(json!({"endpoints": [
            {"addresses": ["10.244.1.2"], "hints": {"forZones": [{"name": "a"}]}},
            {"addresses": ["10.244.2.2"], "hints": {"forZones": [{"name": "b"}]}}]}));
        let mut close = web();
        close.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
        let in_a = NodeInfo {
            name: None,
            zone: Some("a".into()),
        };
        assert_eq!(
            addresses(&service_specs(&close, &[&hinted], &in_a)[0]),
            ["10.244.1.2:8080 (active)"]
        );
        // Without the hint mode the hints are ignored.
        assert_eq!(
            service_specs(&web(), &[&hinted], &in_a)[0].backends.len(),
            2
        );
        // A zone no endpoint is hinted for, or an endpoint without hints: all of them.
        let in_c = NodeInfo {
            name: None,
            zone: Some("c".into()),
        };
        assert_eq!(
            service_specs(&close, &[&hinted], &in_c)[0].backends.len(),
            2
        );
        let partly = slice(json!({"endpoints": [
            {"addresses": ["10.244.1.2"], "hints": {"forZones": [{"name": "a"}]}},
            {"addresses": ["10.244.2.2"]}]}));
        assert_eq!(
            service_specs(&close, &[&partly], &in_a)[0].backends.len(),
            2
        );
        let mut annotated = web();
        annotated.metadata.annotations =
            Some([(TOPOLOGY_MODE_ANNOTATION.to_string(), "Auto".to_string())].into());
        assert_eq!(
            service_specs(&annotated, &[&hinted], &in_a)[0]
                .backends
                .len(),
            1
        );
    }

    #[test]
    fn every_ipv4_cluster_ip_gets_the_ports_and_affinity_defaults_to_three_hours() {
        let dual = service(
            json!({"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"],
                                  "sessionAffinity": "ClientIP",
                                  "ports": [{"name": "http", "port": 80}]}),
        );
        let specs = service_specs(&dual, &[], &NodeInfo::default());
        assert_eq!(specs.len(), 1, "the IPv6 address is left out: {specs:?}");
        assert_eq!(
            specs[0].affinity_timeout_secs,
            Some(DEFAULT_AFFINITY_TIMEOUT)
        );
    }
}
