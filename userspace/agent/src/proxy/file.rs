//! A file as the source of the services (`--services-file`, for tests and offline use): Services
//! and EndpointSlices as YAML documents, a JSON object or a `List`, read again when the file
//! changes and turned into frontends and backends by the same rules as the API's (`translate`).

use std::{collections::HashMap, path::Path};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    translate::{self, NodeInfo},
    ServiceKey,
};
use crate::model::ServiceSpec;

#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {doc}: {message}")]
    Invalid {
        path: String,
        doc: usize,
        message: String,
    },
}

/// Services and EndpointSlices read from one file.
#[derive(Debug, Default)]
pub struct Objects {
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
}

impl Objects {
    pub fn from_file(path: &Path) -> Result<Self, ObjectsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ObjectsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|(doc, message)| ObjectsError::Invalid {
            path: path.display().to_string(),
            doc,
            message,
        })
    }

    /// Parses YAML (one or more documents) or JSON. Errors carry the 1-based document number.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut objects = Objects::default();
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') || trimmed.starts_with('[') {
            objects.add_json(text)?;
            return Ok(objects);
        }
        let mut bytes = text.as_bytes();
        for (i, doc) in serde_saphyr::read::<_, serde_json::Value>(&mut bytes).enumerate() {
            let value = doc.map_err(|e| (i + 1, e.to_string()))?;
            if value.is_null() {
                continue;
            }
            objects.add(value, i + 1)?;
        }
        Ok(objects)
    }

    /// JSON goes straight from text into the typed objects, item by item: a generic tree of a
    /// 10,000-service List would cost the agent hundreds of megabytes.
    fn add_json(&mut self, text: &str) -> Result<(), (usize, String)> {
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            kind: Option<String>,
            #[serde(borrow)]
            items: Option<Vec<&'a serde_json::value::RawValue>>,
        }
        let err = |e: serde_json::Error| (1, e.to_string());
        if text.trim_start().starts_with('[') {
            let items: Vec<&serde_json::value::RawValue> =
                serde_json::from_str(text).map_err(err)?;
            return items.iter().try_for_each(|item| self.add_json(item.get()));
        }
        let head: Head = serde_json::from_str(text).map_err(err)?;
        let kind = head.kind.ok_or((1, "object has no kind".to_string()))?;
        match kind.as_str() {
            "List" | "ServiceList" | "EndpointSliceList" => head
                .items
                .unwrap_or_default()
                .iter()
                .try_for_each(|item| self.add_json(item.get())),
            "Service" => {
                let svc: Service =
                    serde_json::from_str(text).map_err(|e| (1, format!("invalid Service: {e}")))?;
                self.services.push(svc);
                Ok(())
            }
            "EndpointSlice" => {
                let slice: EndpointSlice = serde_json::from_str(text)
                    .map_err(|e| (1, format!("invalid EndpointSlice: {e}")))?;
                self.slices.push(slice);
                Ok(())
            }
            other => Err((
                1,
                format!("unsupported kind {other:?}: expected Service or EndpointSlice"),
            )),
        }
    }

    fn add(&mut self, value: serde_json::Value, doc: usize) -> Result<(), (usize, String)> {
        if let serde_json::Value::Array(items) = value {
            for item in items {
                self.add(item, doc)?;
            }
            return Ok(());
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .ok_or((doc, "object has no kind".to_string()))?
            .to_string();
        match kind.as_str() {
            "List" | "ServiceList" | "EndpointSliceList" => {
                let items = value.get("items").cloned().unwrap_or_default();
                if !items.is_array() {
                    return Err((doc, format!("{kind}.items is not a list")));
                }
                self.add(items, doc)
            }
            "Service" => {
                let svc: Service = serde_json::from_value(value)
                    .map_err(|e| (doc, format!("invalid Service: {e}")))?;
                self.services.push(svc);
                Ok(())
            }
            "EndpointSlice" => {
                let slice: EndpointSlice = serde_json::from_value(value)
                    .map_err(|e| (doc, format!("invalid EndpointSlice: {e}")))?;
                self.slices.push(slice);
                Ok(())
            }
            other => Err((
                doc,
                format!("unsupported kind {other:?}: expected Service or EndpointSlice"),
            )),
        }
    }

    /// Each Service's frontends and backends, in the file's order, for a proxy on `node`.
    pub fn by_service(&self, node: &NodeInfo) -> Vec<(ServiceKey, Vec<ServiceSpec>)> {
        let mut slices: HashMap<ServiceKey, Vec<&EndpointSlice>> = HashMap::new();
        for slice in &self.slices {
            if let Some((ns, name)) = translate::slice_service(slice) {
                slices
                    .entry((or_default(ns), name))
                    .or_default()
                    .push(slice);
            }
        }
        self.services
            .iter()
            .map(|svc| {
                let key = (
                    or_default(svc.metadata.namespace.clone().unwrap_or_default()),
                    svc.metadata.name.clone().unwrap_or_default(),
                );
                let specs = translate::service_specs(
                    svc,
                    slices.get(&key).map(Vec::as_slice).unwrap_or_default(),
                    node,
                );
                (key, specs)
            })
            .collect()
    }

    /// Every frontend, in the file's order.
    pub fn service_specs(&self, node: &NodeInfo) -> Vec<ServiceSpec> {
        self.by_service(node)
            .into_iter()
            .flat_map(|(_, specs)| specs)
            .collect()
    }
}

/// Objects in a file without a namespace are in `default`, as kubectl would create them.
fn or_default(namespace: String) -> String {
    if namespace.is_empty() {
        "default".into()
    } else {
        namespace
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BackendState;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [10.244.0.2]
  conditions: {ready: true}
- addresses: [10.244.0.3]
  conditions: {ready: false, serving: true, terminating: true}
- addresses: [10.244.0.4]
  conditions: {ready: false}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
"#;

    #[test]
    fn services_and_slices_become_frontends_with_ready_backends() {
        let objects = Objects::parse(OBJECTS).unwrap();
        let specs = objects.service_specs(&NodeInfo::default());
        assert_eq!(
            specs.len(),
            2,
            "headless service has no frontend: {specs:?}"
        );
        let http = &specs[0];
        assert_eq!(http.frontend.to_string(), "10.96.0.10:80/TCP");
        assert_eq!(http.affinity_timeout_secs, Some(10_800));
        let addrs: Vec<String> = http.backends.iter().map(|b| b.to_string()).collect();
        // Not ready and not serving (10.244.0.4) is left out.
        assert_eq!(
            addrs,
            ["10.244.0.2:8080 (active)", "10.244.0.3:8080 (terminating)"]
        );
        assert_eq!(specs[1].backends[0].port, 5353);
    }

    #[test]
    fn endpoints_without_conditions_count_as_ready() {
        let text = OBJECTS.replace("conditions: {ready: true}", "conditions: {}");
        let specs = Objects::parse(&text)
            .unwrap()
            .service_specs(&NodeInfo::default());
        assert_eq!(specs[0].backends[0].state, BackendState::Active);
    }

    #[test]
    fn a_json_list_is_read_item_by_item() {
        let text = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"},
             "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "a-1", "labels": {"kubernetes.io/service-name": "a"}},
             "addressType": "IPv4", "ports": [{"port": 8080}],
             "endpoints": [{"addresses": ["10.244.0.9"]}]}]}"#;
        let specs = Objects::parse(text)
            .unwrap()
            .service_specs(&NodeInfo::default());
        assert_eq!(specs[0].backends[0].to_string(), "10.244.0.9:8080 (active)");
        let bad = text.replace(r#""ports": [{"port": 8080}]"#, r#""ports": 7"#);
        let err = Objects::parse(&bad).unwrap_err();
        assert!(err.1.contains("invalid EndpointSlice"), "{}", err.1);
        assert!(Objects::parse(r#"{"kind": "Pod"}"#).is_err());
    }

    #[test]
    fn yaml_alias_bombs_are_refused_not_expanded() {
        // Ten levels of ten aliases each: 10^10 nodes if expanded.
        let mut text = String::from("l0: &l0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..10 {
            let refs = vec![format!("*l{}", level - 1); 10].join(", ");
            text += &format!("l{level}: &l{level} [{refs}]\n");
        }
        let err = Objects::parse(&text).unwrap_err();
        assert_eq!(err.0, 1, "{}", err.1);
    }

    #[test]
    fn malformed_documents_are_rejected_with_their_number() {
        let err = Objects::parse("kind: Service\n---\nkind: Pod\n").unwrap_err();
        assert_eq!(err.0, 2);
        assert!(Objects::parse("{not json").is_err());
        let err = Objects::parse("kind: Service\nspec: {ports: 5}\n").unwrap_err();
        assert!(err.1.contains("invalid Service"), "{}", err.1);
    }
}
