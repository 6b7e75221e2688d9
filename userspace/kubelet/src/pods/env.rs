//! A container's environment as the kubelet builds it: the Service variables of the pod's
//! namespace (`<SVC>_SERVICE_HOST`, `<SVC>_PORT_...`, with `enableServiceLinks`), then `envFrom`,
//! then `env` with `$(VAR)` expansion and `valueFrom` (fieldRef, resourceFieldRef,
//! configMapKeyRef, secretKeyRef).

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ConfigMap, Container, Pod, Secret, Service},
    ByteString,
};
use kube::{api::ListParams, Api, Client};

use super::config::{expand, identity};

/// The API objects an environment reads, fetched once per container start.
struct Sources<'a> {
    client: &'a Client,
    namespace: String,
}

impl Sources<'_> {
    async fn config_map(&self, name: &str, optional: bool) -> Result<Option<ConfigMap>, String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.get_opt(name).await {
            Ok(Some(c)) => Ok(Some(c)),
            Ok(None) if optional => Ok(None),
            Ok(None) => Err(format!("configmap \"{name}\" not found")),
            Err(e) => Err(format!("reading configmap \"{name}\": {e}")),
        }
    }

    async fn secret(&self, name: &str, optional: bool) -> Result<Option<Secret>, String> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
        match api.get_opt(name).await {
            Ok(Some(s)) => Ok(Some(s)),
            Ok(None) if optional => Ok(None),
            Ok(None) => Err(format!("secret \"{name}\" not found")),
            Err(e) => Err(format!("reading secret \"{name}\": {e}")),
        }
    }
}

fn config_map_data(c: &ConfigMap) -> BTreeMap<String, String> {
    c.data.clone().unwrap_or_default()
}

fn secret_data(s: &Secret) -> BTreeMap<String, String> {
    let mut data: BTreeMap<String, String> = s
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, ByteString(v))| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    data.extend(s.string_data.clone().unwrap_or_default());
    data
}

/// The docker-links variables of one Service, as the kubelet writes them.
pub fn service_variables(service: &Service) -> Vec<(String, String)> {
    let Some(spec) = &service.spec else {
        return vec![];
    };
    let ip = spec.cluster_ip.clone().unwrap_or_default();
    if ip.is_empty() || ip == "None" {
        return vec![];
    }
    let name = service
        .metadata
        .name
        .clone()
        .unwrap_or_default()
        .to_uppercase()
        .replace('-', "_");
    let ports = spec.ports.clone().unwrap_or_default();
    let Some(first) = ports.first() else {
        return vec![];
    };
    let mut vars = vec![
        (format!("{name}_SERVICE_HOST"), ip.clone()),
        (format!("{name}_SERVICE_PORT"), first.port.to_string()),
    ];
    for port in &ports {
        if let Some(port_name) = &port.name {
            vars.push((
                format!(
                    "{name}_SERVICE_PORT_{}",
                    port_name.to_uppercase().replace('-', "_")
                ),
                port.port.to_string(),
            ));
        }
    }
    let url = |p: &k8s_openapi::api::core::v1::ServicePort| {
        let proto = p
            .protocol
            .clone()
            .unwrap_or_else(|| "TCP".into())
            .to_lowercase();
        format!("{proto}://{ip}:{}", p.port)
    };
    vars.push((format!("{name}_PORT"), url(first)));
    for port in &ports {
        let proto = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        let prefix = format!("{name}_PORT_{}_{proto}", port.port);
        vars.push((prefix.clone(), url(port)));
        vars.push((format!("{prefix}_PROTO"), proto.to_lowercase()));
        vars.push((format!("{prefix}_PORT"), port.port.to_string()));
        vars.push((format!("{prefix}_ADDR"), ip.clone()));
    }
    vars
}

/// A `fieldRef` of the downward API, read from the pod.
pub fn field_value(pod: &Pod, path: &str) -> Result<String, String> {
    let status = pod.status.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let m = &pod.metadata;
    let from_map = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_default()
    };
    let keyed = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.node_name.unwrap_or_default(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.podIP" => status.pod_ip.unwrap_or_default(),
        "status.podIPs" => status
            .pod_ips
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.ip)
            .collect::<Vec<_>>()
            .join(","),
        "status.hostIP" => status.host_ip.unwrap_or_default(),
        "status.hostIPs" => status
            .host_ips
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.ip)
            .collect::<Vec<_>>()
            .join(","),
        _ => {
            if let Some(key) = keyed("metadata.labels") {
                from_map(&m.labels, key)
            } else if let Some(key) = keyed("metadata.annotations") {
                from_map(&m.annotations, key)
            } else {
                return Err(format!("unsupported fieldRef fieldPath {path:?}"));
            }
        }
    })
}

/// The container's environment, in the order the runtime is given it.
pub async fn environment(
    client: &Client,
    pod: &Pod,
    container: &Container,
) -> Result<Vec<(String, String)>, String> {
    let (_, namespace, _) = identity(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let sources = Sources {
        client,
        namespace: namespace.clone(),
    };
    let mut env: Vec<(String, String)> = Vec::new();
    if spec.enable_service_links.unwrap_or(true) {
        let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
        let mut listed = services
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing services for the environment: {e}"))?
            .items;
        // The API server's own Service is seen from every namespace.
        if namespace != "default" {
            let default: Api<Service> = Api::namespaced(client.clone(), "default");
            if let Ok(Some(kubernetes)) = default.get_opt("kubernetes").await {
                listed.push(kubernetes);
            }
        }
        for service in &listed {
            env.extend(service_variables(service));
        }
    }
    for from in container.env_from.clone().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            sources
                .config_map(&r.name, r.optional.unwrap_or(false))
                .await?
                .map(|c| config_map_data(&c))
        } else if let Some(r) = &from.secret_ref {
            sources
                .secret(&r.name, r.optional.unwrap_or(false))
                .await?
                .map(|s| secret_data(&s))
        } else {
            None
        };
        for (k, v) in data.unwrap_or_default() {
            env.push((format!("{prefix}{k}"), v));
        }
    }
    for var in container.env.clone().unwrap_or_default() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    Some(field_value(pod, &field.field_path)?)
                } else if let Some(r) = &from.config_map_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match sources.config_map(&r.name, optional).await? {
                        Some(c) => match config_map_data(&c).get(&r.key) {
                            Some(v) => Some(v.clone()),
                            None if optional => None,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in ConfigMap {namespace}/{}",
                                    r.key, r.name
                                ))
                            }
                        },
                        None => None,
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let optional = r.optional.unwrap_or(false);
                    match sources.secret(&r.name, optional).await? {
                        Some(s) => match secret_data(&s).get(&r.key) {
                            Some(v) => Some(v.clone()),
                            None if optional => None,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in Secret {namespace}/{}",
                                    r.key, r.name
                                ))
                            }
                        },
                        None => None,
                    }
                } else if let Some(r) = &from.resource_field_ref {
                    Some(resource_value(container, &r.resource)?)
                } else {
                    return Err(format!("env {}: valueFrom names no source", var.name));
                }
            }
            (Some(value), None) => Some(expand(value, &env)),
            (None, None) => Some(String::new()),
        };
        if let Some(value) = value {
            env.retain(|(k, _)| *k != var.name);
            env.push((var.name, value));
        }
    }
    Ok(env)
}

/// A `resourceFieldRef`: a container's request or limit in the unit the downward API uses
/// (cores rounded up, bytes).
fn resource_value(container: &Container, resource: &str) -> Result<String, String> {
    let resources = container.resources.clone().unwrap_or_default();
    let (list, name) = match resource.split_once('.') {
        Some(("limits", n)) => (resources.limits, n),
        Some(("requests", n)) => (resources.requests, n),
        _ => return Err(format!("unsupported resourceFieldRef {resource:?}")),
    };
    let milli = list
        .as_ref()
        .and_then(|l| l.get(name))
        .map(|q| seine_apimachinery::quantity::milli_value(&q.0).map_err(|e| e.0))
        .transpose()?
        .unwrap_or(0);
    Ok(if name == "cpu" {
        ((milli + 999) / 1000).to_string()
    } else {
        (milli / 1000).to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_variables_are_docker_links() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-api"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
        }))
        .unwrap();
        let vars: BTreeMap<_, _> = service_variables(&svc).into_iter().collect();
        assert_eq!(vars["WEB_API_SERVICE_HOST"], "10.96.0.20");
        assert_eq!(vars["WEB_API_SERVICE_PORT"], "80");
        assert_eq!(vars["WEB_API_SERVICE_PORT_HTTP"], "80");
        assert_eq!(vars["WEB_API_PORT"], "tcp://10.96.0.20:80");
        assert_eq!(vars["WEB_API_PORT_80_TCP_ADDR"], "10.96.0.20");
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}
        }))
        .unwrap();
        assert!(service_variables(&headless).is_empty());
    }

    #[test]
    fn field_refs_read_the_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"podIP": "10.244.0.5"}
        }))
        .unwrap();
        assert_eq!(field_value(&pod, "metadata.name").unwrap(), "p");
        assert_eq!(field_value(&pod, "spec.nodeName").unwrap(), "n1");
        assert_eq!(field_value(&pod, "status.podIP").unwrap(), "10.244.0.5");
        assert_eq!(field_value(&pod, "metadata.labels['app']").unwrap(), "web");
        assert!(field_value(&pod, "spec.bogus").is_err());
    }
}
