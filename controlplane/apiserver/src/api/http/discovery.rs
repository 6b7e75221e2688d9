//! Discovery (`/api`, `/apis`, the resource lists), `/version`, OpenAPI documents, `/metrics`
//! and `/readyz`.

use std::sync::Arc;

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use crate::api::{registry::resources, status::ApiError, ApiState};

pub async fn openapi_root(State(state): State<Arc<ApiState>>) -> Response {
    ([("content-type", "application/json")], state.openapi.root()).into_response()
}

pub async fn openapi_document(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    match state.openapi.document(&path) {
        Some(document) => ([("content-type", "application/json")], document).into_response(),
        None => ApiError::not_found(format!("no OpenAPI document for {path}")).into_response(),
    }
}

pub async fn render_metrics(State(state): State<Arc<ApiState>>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

pub async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    if state.storage.healthy().await {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "[-]etcd failed: reason withheld\nreadyz check failed",
        )
            .into_response()
    }
}

pub async fn version() -> Json<Value> {
    Json(json!({
        "major": "1", "minor": seine_component_base::KUBERNETES_MINOR,
        "gitVersion": seine_component_base::KUBERNETES_VERSION,
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
        "goVersion": "", "compiler": "rustc", "platform": "linux/amd64"
    }))
}

pub async fn api_versions() -> Json<Value> {
    Json(json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}))
}

fn group_json(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv], "preferredVersion": gv})
}

/// `/apis/GROUP`: the group's versions.
pub fn group(name: &str) -> Response {
    match resources::groups().into_iter().find(|(g, _)| *g == name) {
        Some((g, v)) => {
            let mut body = group_json(g, v);
            body["kind"] = "APIGroup".into();
            body["apiVersion"] = "v1".into();
            Json(body).into_response()
        }
        None => {
            ApiError::not_found("the server could not find the requested resource").into_response()
        }
    }
}

pub async fn api_groups() -> Json<Value> {
    let groups: Vec<Value> = resources::groups()
        .into_iter()
        .map(|(g, v)| group_json(g, v))
        .collect();
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
}

pub fn resource_list(group: &str, version: &str) -> Value {
    let list: Vec<Value> = resources::RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(|r| std::iter::once(r.discovery()).chain(r.subresource_discovery()))
        .collect();
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
}
