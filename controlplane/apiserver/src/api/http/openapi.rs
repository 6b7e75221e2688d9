//! OpenAPI v3 documents (`/openapi/v3` and one per group version), built once at start from
//! Kubernetes' own type schemas: `kubectl explain` reads them, and kubectl sees from them that the
//! server validates fields itself (`fieldValidation` on PATCH), so `kubectl create/apply` need no
//! `--validate=false`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use serde_json::{json, Map, Value};

use crate::api::{
    codec::typed::for_kind,
    registry::resources::{Resource, RESOURCES},
};

pub struct OpenApi {
    root: Bytes,
    /// Documents by path ("api/v1", "apis/batch/v1").
    documents: BTreeMap<String, Bytes>,
}

fn add_schema<T: schemars::JsonSchema>(generator: &mut schemars::SchemaGenerator) -> String {
    generator.subschema_for::<T>();
    T::schema_name().into_owned()
}

fn path_of(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn parameter(name: &str, place: &str, description: &str) -> Value {
    json!({"name": name, "in": place, "description": description, "schema": {"type": "string"},
           "required": place == "path", "uniqueItems": true})
}

fn operation(resource: &Resource, action: &str, schema: &str, body: bool) -> Value {
    let gvk = json!({"group": resource.group, "version": resource.version, "kind": resource.kind});
    let reference = json!({"$ref": format!("#/components/schemas/{schema}")});
    let mut op = json!({
        "operationId": format!("{action}{}", resource.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
        "responses": {"200": {"description": "OK",
                              "content": {"application/json": {"schema": reference}}}},
    });
    let mut parameters = Vec::new();
    if body {
        parameters.push(parameter(
            "fieldValidation",
            "query",
            "How the server treats fields the object does not have: Ignore, Warn (default) or Strict.",
        ));
        parameters.push(parameter(
            "fieldManager",
            "query",
            "The name of the actor making the change.",
        ));
        parameters.push(parameter(
            "dryRun",
            "query",
            "Not supported: requests with dryRun are refused.",
        ));
        op["requestBody"] = json!({"required": true,
                                   "content": {"application/json": {"schema": reference}}});
    }
    op["parameters"] = Value::Array(parameters);
    op
}

impl OpenApi {
    pub fn build() -> Self {
        let mut groups: Vec<(&str, &str)> = vec![("", "v1")];
        groups.extend(crate::api::registry::resources::groups());
        let mut documents = BTreeMap::new();
        let mut root_paths = Map::new();
        for (group, version) in groups {
            let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
            let mut paths = Map::new();
            let mut kinds = Vec::new();
            for resource in RESOURCES
                .iter()
                .filter(|r| r.group == group && r.version == version)
            {
                let Some(schema) = for_kind!(resource.kind, add_schema, &mut generator) else {
                    continue;
                };
                kinds.push((schema.clone(), resource));
                let prefix = format!("/{}", path_of(group, version));
                let collection = if resource.namespaced {
                    format!("{prefix}/namespaces/{{namespace}}/{}", resource.plural)
                } else {
                    format!("{prefix}/{}", resource.plural)
                };
                if resource.review {
                    paths.insert(
                        collection,
                        json!({"post": operation(resource, "post", &schema, true)}),
                    );
                    continue;
                }
                paths.insert(
                    collection.clone(),
                    json!({"get": operation(resource, "list", &schema, false),
                           "post": operation(resource, "post", &schema, true),
                           "delete": operation(resource, "deletecollection", &schema, false),
                           "parameters": [parameter("namespace", "path", "object name and auth scope")]}),
                );
                paths.insert(
                    format!("{collection}/{{name}}"),
                    json!({"get": operation(resource, "get", &schema, false),
                           "put": operation(resource, "put", &schema, true),
                           "patch": operation(resource, "patch", &schema, true),
                           "delete": operation(resource, "delete", &schema, false),
                           "parameters": [parameter("name", "path", "name of the object")]}),
                );
            }
            let mut schemas = generator.take_definitions(true);
            for (schema, resource) in kinds {
                if let Some(Value::Object(definition)) = schemas.get_mut(&schema) {
                    definition.insert(
                        "x-kubernetes-group-version-kind".into(),
                        json!([{"group": resource.group, "version": resource.version,
                                "kind": resource.kind}]),
                    );
                }
            }
            let document = json!({
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": seine_component_base::KUBERNETES_VERSION},
                "paths": paths,
                "components": {"schemas": schemas},
            });
            let bytes = Bytes::from(document.to_string());
            let digest = ring::digest::digest(&ring::digest::SHA512, &bytes);
            let hash: String = digest
                .as_ref()
                .iter()
                .take(32)
                .map(|b| format!("{b:02X}"))
                .collect();
            let path = path_of(group, version);
            root_paths.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}),
            );
            documents.insert(path, bytes);
        }
        OpenApi {
            root: Bytes::from(json!({"paths": root_paths}).to_string()),
            documents,
        }
    }

    pub fn root(&self) -> Bytes {
        self.root.clone()
    }

    /// The document at `/openapi/v3/<path>`.
    pub fn document(&self, path: &str) -> Option<Bytes> {
        self.documents.get(path).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_describe_every_served_kind_with_its_gvk() {
        let api = OpenApi::build();
        let root: Value = serde_json::from_slice(&api.root()).unwrap();
        assert!(root["paths"]["api/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .starts_with("/openapi/v3/api/v1?hash="));
        let core: Value = serde_json::from_slice(&api.document("api/v1").unwrap()).unwrap();
        let pod = &core["components"]["schemas"]["io.k8s.api.core.v1.Pod"];
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        assert!(pod["properties"]["spec"].is_object());
        assert!(core["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"].is_object());
        let patch = &core["paths"]["/api/v1/namespaces/{namespace}/pods/{name}"]["patch"];
        assert!(patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation"));
        let batch: Value = serde_json::from_slice(&api.document("apis/batch/v1").unwrap()).unwrap();
        assert!(batch["components"]["schemas"]["io.k8s.api.batch.v1.Job"].is_object());
    }
}
