//! The cluster view from Kubernetes objects: Namespaces, Services, EndpointSlices and Pods as the
//! API serves them (what the watchers hold) turned into what `cluster` answers from.

use std::net::IpAddr;

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as K8sService},
    discovery::v1::EndpointSlice,
};

use crate::cluster::{ClusterView, Endpoint, Port, Service, ServiceKind};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A port of a Service or an EndpointSlice (the protocol defaults to TCP, as in the API).
fn port(name: &Option<String>, protocol: &Option<String>, number: i32) -> Option<Port> {
    Some(Port {
        name: name.clone().unwrap_or_default(),
        protocol: protocol
            .as_deref()
            .map_or("tcp".to_string(), str::to_ascii_lowercase),
        port: u16::try_from(number).ok()?,
    })
}

pub fn service(s: &K8sService) -> Option<Service> {
    let namespace = s
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = s.metadata.name.clone()?;
    let spec = s.spec.as_ref()?;
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        ServiceKind::ExternalName(spec.external_name.clone()?)
    } else if spec.cluster_ip.as_deref() == Some("None") {
        ServiceKind::Headless
    } else {
        let ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .collect(),
        };
        if ips.is_empty() {
            // Not allocated yet: nothing to answer with.
            return None;
        }
        ServiceKind::ClusterIp(ips)
    };
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| port(&p.name, &p.protocol, p.port))
        .collect();
    Some(Service {
        namespace,
        name,
        kind,
        ports,
    })
}

/// What one EndpointSlice contributes: its Service (namespace, name) and endpoints. Only slices
/// labelled with their Service's name count.
pub type SliceEndpoints = ((String, String), Vec<Endpoint>);

pub fn namespace(n: &Namespace) -> Option<String> {
    n.metadata.name.clone()
}

pub fn slice(slice: &EndpointSlice) -> Option<SliceEndpoints> {
    let service = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))?;
    let namespace = slice
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let ports: Vec<Port> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| port(&p.name, &p.protocol, p.port?))
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .map(|e| Endpoint {
            addresses: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            hostname: e.hostname.clone(),
            pod_name: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone()),
            // The API's rule: a missing ready condition means ready.
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            ports: ports.clone(),
        })
        .collect();
    Some(((namespace, service.clone()), endpoints))
}

/// A Pod's namespace and addresses (`podIP` and `podIPs`), when it has any.
pub fn pod(pod: &Pod) -> Option<(String, Vec<IpAddr>)> {
    let namespace = pod.metadata.namespace.clone()?;
    let status = pod.status.as_ref()?;
    let mut ips: Vec<IpAddr> = status
        .pod_ip
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .chain(
            status
                .pod_ips
                .iter()
                .flatten()
                .filter_map(|ip| ip.ip.parse().ok()),
        )
        .collect();
    ips.sort();
    ips.dedup();
    (!ips.is_empty()).then_some((namespace, ips))
}

/// The view from what the objects contribute (what the watches keep, already converted).
pub fn assemble<'a>(
    namespaces: impl IntoIterator<Item = &'a String>,
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a SliceEndpoints>,
    pods: impl IntoIterator<Item = &'a (String, Vec<IpAddr>)>,
) -> ClusterView {
    let mut view = ClusterView::default();
    view.namespaces.extend(namespaces.into_iter().cloned());
    for s in services {
        view.services
            .insert((s.namespace.clone(), s.name.clone()), s.clone());
    }
    for (key, endpoints) in slices {
        view.endpoints
            .entry(key.clone())
            .or_default()
            .extend(endpoints.iter().cloned());
    }
    for (namespace, ips) in pods {
        view.pod_ips
            .entry(namespace.clone())
            .or_default()
            .extend(ips.iter().copied());
    }
    view.index_addresses();
    view
}

/// Builds the view from the objects as the API serves them.
pub fn build(
    namespaces: &[Namespace],
    services: &[K8sService],
    slices: &[EndpointSlice],
    pods: &[Pod],
) -> ClusterView {
    let namespaces: Vec<String> = namespaces.iter().filter_map(namespace).collect();
    let services: Vec<Service> = services.iter().filter_map(service).collect();
    let slices: Vec<SliceEndpoints> = slices.iter().filter_map(slice).collect();
    let pods: Vec<(String, Vec<IpAddr>)> = pods.iter().filter_map(pod).collect();
    assemble(&namespaces, &services, &slices, &pods)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn objects_become_the_view_the_spec_answers_from() {
        let namespaces: Vec<Namespace> = vec![from(json!({"metadata": {"name": "web"}}))];
        let services: Vec<K8sService> = vec![
            from(json!({"metadata": {"name": "front", "namespace": "web"},
                        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00::a"],
                                 "ports": [{"name": "http", "port": 80}, {"port": 53, "protocol": "UDP"}]}})),
            from(json!({"metadata": {"name": "db", "namespace": "web"},
                        "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}})),
            from(json!({"metadata": {"name": "search", "namespace": "web"},
                        "spec": {"type": "ExternalName", "externalName": "www.example.org"}})),
            from(json!({"metadata": {"name": "pending", "namespace": "web"}, "spec": {}})),
        ];
        let slices: Vec<EndpointSlice> = vec![
            from(json!({"metadata": {"name": "db-abc", "namespace": "web",
                                     "labels": {"kubernetes.io/service-name": "db"}},
                        "addressType": "IPv4",
                        "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
                        "endpoints": [
                            {"addresses": ["10.244.1.5"], "hostname": "db-0",
                             "targetRef": {"kind": "Pod", "name": "db-0"}},
                            {"addresses": ["10.244.2.6"], "conditions": {"ready": false}}]})),
            from(json!({"metadata": {"name": "orphan", "namespace": "web"},
                        "addressType": "IPv4", "endpoints": [{"addresses": ["10.1.1.1"]}]})),
        ];
        let pods: Vec<Pod> = vec![from(json!({"metadata": {"name": "p", "namespace": "web"},
                                               "status": {"podIP": "10.244.1.5",
                                                          "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}]}}))];
        let v = build(&namespaces, &services, &slices, &pods);
        assert!(v.namespaces.contains("web"));
        let front = &v.services[&("web".into(), "front".into())];
        assert_eq!(
            front.kind,
            ServiceKind::ClusterIp(vec![
                "10.96.0.10".parse().unwrap(),
                "fd00::a".parse().unwrap()
            ])
        );
        assert_eq!(front.ports[0].protocol, "tcp");
        assert_eq!(front.ports[1].protocol, "udp");
        assert_eq!(
            v.services[&("web".into(), "db".into())].kind,
            ServiceKind::Headless
        );
        assert_eq!(
            v.services[&("web".into(), "search".into())].kind,
            ServiceKind::ExternalName("www.example.org".into())
        );
        assert!(!v.services.contains_key(&("web".into(), "pending".into())));
        let db = &v.endpoints[&("web".into(), "db".into())];
        assert_eq!(db.len(), 2);
        assert!(db[0].ready && !db[1].ready);
        assert_eq!(db[0].pod_name.as_deref(), Some("db-0"));
        assert_eq!(db[0].ports[0].port, 5432);
        assert_eq!(
            v.endpoints.len(),
            1,
            "a slice without its service label is skipped"
        );
        assert_eq!(v.pod_ips["web"].len(), 2);
    }
}
