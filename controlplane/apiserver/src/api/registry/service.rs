//! Services: defaulting (type, session affinity, traffic policies, target ports), validation,
//! cluster IPs that may not change, and the columns. Allocation of cluster IPs and node ports is
//! `alloc`'s, where the cluster's ranges are known.

use serde_json::{json, Value};

use super::strategy::{invalid, required, set_default, Causes, Strategy};
use crate::api::{
    http::table::{text, Printer},
    status::ApiError,
};

pub struct Services;

impl Strategy for Services {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        object["status"] = json!({"loadBalancer": {}});
        default_service_spec(&mut object["spec"]);
        let causes = validate_service_spec(&object["spec"]);
        invalid("Service", object, causes)
    }

    /// An update that leaves the cluster IP out keeps it; one that changes it is refused.
    fn prepare_update(&self, current: &Value, new: &mut Value) -> Result<(), ApiError> {
        let spec = &mut new["spec"];
        if !spec.is_object() {
            *spec = json!({});
        }
        for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
            if spec.get(field).is_none_or(Value::is_null)
                || spec[field] == "" && current["spec"][field] != ""
            {
                spec[field] = current["spec"][field].clone();
            }
        }
        default_service_spec(spec);
        let mut causes = validate_service_spec(spec);
        if spec["clusterIP"] != current["spec"]["clusterIP"]
            && spec["type"] != "ExternalName"
            && current["spec"]["type"] != "ExternalName"
        {
            causes.push((
                "spec.clusterIPs[0]".into(),
                format!(
                    "Invalid value: {}: may not change once set",
                    spec["clusterIP"]
                ),
            ));
        }
        invalid("Service", new, causes)
    }

    fn status_subresource(&self) -> bool {
        true
    }

    fn printer(&self) -> Printer {
        Printer {
            columns: &[
                ("Type", "string"),
                ("Cluster-IP", "string"),
                ("External-IP", "string"),
                ("Port(s)", "string"),
            ],
            cells: |o| {
                let ports: Vec<String> = o["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| match p["nodePort"].as_i64() {
                        Some(node_port) => format!(
                            "{}:{node_port}/{}",
                            p["port"],
                            p["protocol"].as_str().unwrap_or("TCP")
                        ),
                        None => {
                            format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                        }
                    })
                    .collect();
                vec![
                    json!(o["spec"]["type"].as_str().unwrap_or("ClusterIP")),
                    text(&o["spec"]["clusterIP"]),
                    json!("<none>"),
                    json!(if ports.is_empty() {
                        "<none>".to_string()
                    } else {
                        ports.join(",")
                    }),
                ]
            },
            wide: &[("Selector", "string")],
            wide_cells: |o| {
                let selector: Vec<String> = o["spec"]["selector"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect();
                vec![json!(if selector.is_empty() {
                    "<none>".to_string()
                } else {
                    selector.join(",")
                })]
            },
            ..Printer::NAME_AGE
        }
    }
}

fn default_service_spec(spec: &mut Value) {
    if !spec.is_object() {
        *spec = json!({});
    }
    set_default(spec, "type", "ClusterIP".into());
    set_default(spec, "sessionAffinity", "None".into());
    let external_name = spec["type"] == "ExternalName";
    if !external_name {
        set_default(spec, "internalTrafficPolicy", "Cluster".into());
        // ipFamilies and ipFamilyPolicy depend on the cluster's ranges: the allocator sets them.
    }
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        set_default(spec, "externalTrafficPolicy", "Cluster".into());
    }
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            set_default(p, "protocol", "TCP".into());
            if p.get("targetPort").is_none_or(Value::is_null) {
                p["targetPort"] = p["port"].clone();
            }
        }
    }
}

fn validate_service_spec(spec: &Value) -> Causes {
    let mut causes = Causes::new();
    let kind = spec["type"].as_str().unwrap_or("ClusterIP");
    if !matches!(
        kind,
        "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName"
    ) {
        causes.push((
            "spec.type".into(),
            format!("Unsupported value: {kind:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""),
        ));
    }
    if kind == "ExternalName" && spec["externalName"].as_str().is_none_or(str::is_empty) {
        required(&mut causes, "spec.externalName");
    }
    let headless = spec["clusterIP"] == "None";
    let ports = spec["ports"].as_array().cloned().unwrap_or_default();
    if ports.is_empty() && !headless && kind != "ExternalName" {
        required(&mut causes, "spec.ports");
    }
    let mut names = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = p["port"].as_i64().unwrap_or(0);
        if !(1..=65535).contains(&port) {
            causes.push((
                format!("{at}.port"),
                format!("Invalid value: {port}: must be between 1 and 65535, inclusive"),
            ));
        }
        match p["protocol"].as_str() {
            Some("TCP" | "UDP" | "SCTP") => {}
            other => causes.push((
                format!("{at}.protocol"),
                format!(
                    "Unsupported value: {:?}: supported values: \"SCTP\", \"TCP\", \"UDP\"",
                    other.unwrap_or_default()
                ),
            )),
        }
        let name = p["name"].as_str().unwrap_or_default();
        if ports.len() > 1 && name.is_empty() {
            required(&mut causes, &format!("{at}.name"));
        } else if !name.is_empty() {
            if names.contains(&name) {
                causes.push((format!("{at}.name"), format!("Duplicate value: {name:?}")));
            }
            names.push(name);
        }
        if let Some(node_port) = p["nodePort"].as_i64() {
            if !matches!(kind, "NodePort" | "LoadBalancer") && node_port != 0 {
                causes.push((
                    format!("{at}.nodePort"),
                    "Forbidden: may not be used when `type` is 'ClusterIP'".into(),
                ));
            }
        }
    }
    match spec["sessionAffinity"].as_str() {
        Some("None" | "ClientIP") | None => {}
        Some(other) => causes.push((
            "spec.sessionAffinity".into(),
            format!("Unsupported value: {other:?}: supported values: \"ClientIP\", \"None\""),
        )),
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry::{resources::find, strategy::prepare_update};

    #[test]
    fn service_cluster_ips_are_immutable() {
        let services = find("", "v1", "services").unwrap();
        let current = json!({"kind": "Service", "apiVersion": "v1", "metadata": {"name": "s"},
                             "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                                      "ports": [{"port": 80}]}});
        let mut sent = current.clone();
        sent["spec"]["clusterIP"] = "".into();
        let kept = prepare_update(services.strategy, None, &current, sent).unwrap();
        assert_eq!(kept["spec"]["clusterIP"], "10.96.0.10");
        let mut sent = current.clone();
        sent["spec"]["clusterIP"] = "10.96.0.11".into();
        assert!(prepare_update(services.strategy, None, &current, sent).is_err());
    }
}
