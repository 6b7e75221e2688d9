//! The Kubernetes REST API over the storage layer: discovery, and get, list, create, update and
//! delete for the served resources, with errors as `Status` objects.

pub mod auth;
pub mod metrics;
pub mod patch;
pub mod resources;
pub mod status;
pub mod table;
pub mod tls;

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Request, State},
    http::{Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use rand::Rng as _;
use serde_json::{json, Value};

use crate::storage::{list_prefix, resource_version, ObjectKey, Storage, StorageError};
use resources::Resource;
use status::ApiError;

/// Kubernetes refuses request bodies larger than this.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub struct ApiState {
    pub storage: Storage,
    pub tokens: auth::TokenAuthenticator,
    pub metrics: Arc<metrics::RequestMetrics>,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/version", get(version))
        .route("/api", get(api_versions))
        .route("/apis", get(api_groups))
        .route("/metrics", get(render_metrics))
        .fallback(dispatch)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::record,
        ))
        .with_state(state)
}

/// Namespaces every cluster has; created at start when missing.
pub async fn bootstrap(storage: &Storage) -> Result<(), StorageError> {
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let object = json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": name, "uid": uid(), "creationTimestamp": now()},
                            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        match storage
            .create(&ObjectKey::new("namespaces", None, name), object)
            .await
        {
            Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn authenticate(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let public = matches!(path, "/healthz" | "/livez" | "/readyz" | "/version");
    if public || state.tokens.authenticate(request.headers()).is_some() {
        next.run(request).await
    } else {
        ApiError::unauthorized().into_response()
    }
}

async fn render_metrics(State(state): State<Arc<ApiState>>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
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

async fn version() -> Json<Value> {
    Json(json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-seine",
        "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
        "goVersion": "", "compiler": "rustc", "platform": "linux/amd64"
    }))
}

async fn api_versions() -> Json<Value> {
    Json(json!({"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}]}))
}

fn group_json(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv], "preferredVersion": gv})
}

async fn api_groups() -> Json<Value> {
    let groups: Vec<Value> = resources::groups()
        .into_iter()
        .map(|(g, v)| group_json(g, v))
        .collect();
    Json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
}

fn resource_list(group: &str, version: &str) -> Value {
    let list: Vec<Value> = resources::RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .map(Resource::discovery)
        .collect();
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
}

/// What a resource path names.
struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
}

/// Everything under /api/v1 and /apis/GROUP/VERSION: discovery documents and resource requests.
async fn dispatch(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] if method == Method::GET => {
            return match resources::groups().into_iter().find(|(g, _)| g == group) {
                Some((g, v)) => {
                    let mut body = group_json(g, v);
                    body["kind"] = "APIGroup".into();
                    body["apiVersion"] = "v1".into();
                    Json(body).into_response()
                }
                None => ApiError::not_found("the server could not find the requested resource")
                    .into_response(),
            };
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => {
            return ApiError::not_found("the server could not find the requested resource")
                .into_response()
        }
    };
    if rest.is_empty() {
        let known = (group.is_empty() && version == "v1")
            || resources::groups().contains(&(group, version));
        return if known && method == Method::GET {
            Json(resource_list(group, version)).into_response()
        } else {
            ApiError::not_found("the server could not find the requested resource").into_response()
        };
    }
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => {
            return ApiError::not_found("the server could not find the requested resource")
                .into_response()
        }
    };
    let Some(resource) = resources::find(group, version, plural) else {
        return ApiError::not_found(format!(
            "the server could not find the requested resource ({plural})"
        ))
        .into_response();
    };
    // A namespaced resource named through its cluster-wide path can only be listed.
    if resource.namespaced && namespace.is_none() && (name.is_some() || method != Method::GET) {
        return ApiError::not_found("the server could not find the requested resource")
            .into_response();
    }
    if !resource.namespaced && namespace.is_some() {
        return ApiError::not_found("the server could not find the requested resource")
            .into_response();
    }
    let target = Target {
        resource,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    };
    let query = uri.query().unwrap_or("").to_string();
    let as_table = request
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(table::wanted);
    let media = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    // JSON only: protobuf, CBOR and YAML (server-side apply) bodies are refused.
    {
        let media = media.as_str();
        if !(media == "application/json" || media.ends_with("+json") || media.is_empty()) {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the body of the request was in an unknown format - accepted media types include: application/json (got {media})"),
            )
            .into_response();
        }
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestEntityTooLarge",
            format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        )
        .into_response()
    };
    // Refused before reading when the length is announced (a client waiting on 100-continue then
    // sends nothing); otherwise once the limit is passed.
    let announced = request
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES) {
        return too_large();
    }
    let body = match axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => return too_large(),
    };
    let result = match (method.clone(), target.name.is_some()) {
        (Method::GET, false) => list(&state, &target, &query).await,
        (Method::GET, true) => get_one(&state, &target).await,
        (Method::POST, false) => create(&state, &target, &body).await,
        (Method::PUT, true) => update(&state, &target, &body).await,
        (Method::PATCH, true) => patch_one(&state, &target, &media, &body).await,
        (Method::DELETE, true) => delete(&state, &target).await,
        (Method::DELETE, false) => delete_collection(&state, &target, &query).await,
        _ => Err(ApiError::method_not_allowed()),
    };
    match result {
        Ok((code, value)) if as_table && method == Method::GET => {
            let include = parse_query(&query)
                .into_iter()
                .find(|(k, _)| k == "includeObject")
                .map(|(_, v)| v)
                .unwrap_or_default();
            let (items, rv) = match value.get("items").and_then(Value::as_array) {
                Some(items) => (items.clone(), value["metadata"]["resourceVersion"].clone()),
                None => (
                    vec![value.clone()],
                    value["metadata"]["resourceVersion"].clone(),
                ),
            };
            let rv = rv.as_str().unwrap_or_default().to_string();
            (
                code,
                Json(table::render(target.resource.kind, &items, &rv, &include)),
            )
                .into_response()
        }
        Ok((code, value)) => (code, Json(value)).into_response(),
        Err(e) => e.into_response(),
    }
}

type ApiResult = Result<(StatusCode, Value), ApiError>;

fn object_key(target: &Target, name: &str) -> ObjectKey {
    ObjectKey::new(
        target.resource.storage_name(),
        target.namespace.as_deref(),
        name,
    )
}

async fn get_one(state: &ApiState, target: &Target) -> ApiResult {
    let name = target.name.as_deref().unwrap_or_default();
    let object = state.storage.get(&object_key(target, name)).await?;
    Ok((StatusCode::OK, object))
}

async fn list(state: &ApiState, target: &Target, query: &str) -> ApiResult {
    let params = parse_query(query);
    let limit: i64 = match params.iter().find(|(k, _)| k == "limit") {
        Some((_, v)) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {v:?}")))?,
        None => 0,
    };
    if params
        .iter()
        .any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
    {
        return Err(ApiError::method_not_allowed());
    }
    let after = match params.iter().find(|(k, _)| k == "continue") {
        Some((_, token)) if !token.is_empty() => Some(decode_continue(token)?),
        _ => None,
    };
    let selector = Selector::from_params(&params)?;
    let prefix = list_prefix(target.resource.storage_name(), target.namespace.as_deref());
    let page = state.storage.list(&prefix, limit, after.as_deref()).await?;
    let items: Vec<Value> = page
        .items
        .into_iter()
        .filter(|o| selector.matches(o))
        .collect();
    let mut metadata = json!({"resourceVersion": page.revision.to_string()});
    if let Some(key) = page.continue_after {
        metadata["continue"] = encode_continue(&key).into();
    }
    Ok((
        StatusCode::OK,
        json!({"kind": format!("{}List", target.resource.kind),
               "apiVersion": target.resource.api_version(),
               "metadata": metadata, "items": items}),
    ))
}

async fn create(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
    let mut object = parse_object(body, target.resource)?;
    let meta = object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::bad_request("metadata is required"))?;
    if let Some(ns) = &target.namespace {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(given) if given != ns => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({given}) does not match the namespace sent on the request ({ns})"
                )))
            }
            _ => {
                meta.insert("namespace".into(), ns.clone().into());
            }
        }
    }
    let name = match (
        meta.get("name").and_then(Value::as_str),
        meta.get("generateName").and_then(Value::as_str),
    ) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) => format!("{prefix}{}", random_suffix()),
        _ => {
            return Err(ApiError::invalid(
                target.resource.kind,
                "",
                vec![(
                    "metadata.name".into(),
                    "Required value: name or generateName is required".into(),
                )],
            ))
        }
    };
    if let Some(problem) = dns_subdomain_problem(&name) {
        return Err(ApiError::invalid(
            target.resource.kind,
            &name,
            vec![(
                "metadata.name".into(),
                format!("Invalid value: {name:?}: {problem}"),
            )],
        ));
    }
    meta.insert("name".into(), name.clone().into());
    meta.insert("uid".into(), uid().into());
    meta.insert("creationTimestamp".into(), now().into());
    meta.remove("resourceVersion");
    if target.resource.kind == "Namespace" {
        object["status"] = json!({"phase": "Active"});
    }
    if let Some(ns) = &target.namespace {
        // Objects live in namespaces that exist.
        let ns_key = ObjectKey::new("namespaces", None, ns);
        if let Err(StorageError::NotFound { .. }) = state.storage.get(&ns_key).await {
            return Err(ApiError::not_found(format!("namespaces {ns:?} not found")));
        }
    }
    let created = state
        .storage
        .create(&object_key(target, &name), object)
        .await?;
    Ok((StatusCode::CREATED, created))
}

async fn update(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
    let name = target.name.as_deref().unwrap_or_default();
    let mut object = parse_object(body, target.resource)?;
    let given = object["metadata"]["name"].as_str().unwrap_or_default();
    if given != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let key = object_key(target, name);
    let current = state.storage.get(&key).await?;
    let expected = object["metadata"]
        .get("resourceVersion")
        .and_then(Value::as_str)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))
        })
        .transpose()?
        .or(Some(resource_version(&current)));
    // What the server owns stays as it was.
    for field in ["uid", "creationTimestamp", "namespace"] {
        if let Some(v) = current["metadata"].get(field) {
            object["metadata"][field] = v.clone();
        }
    }
    let updated = state.storage.update(&key, object, expected).await?;
    Ok((StatusCode::OK, updated))
}

async fn patch_one(state: &ApiState, target: &Target, media: &str, body: &Bytes) -> ApiResult {
    let name = target.name.as_deref().unwrap_or_default();
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
    let key = object_key(target, name);
    // Without a resourceVersion in the patch, a concurrent write is retried on, as Kubernetes does.
    let precondition = patch["metadata"]["resourceVersion"]
        .as_str()
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))
        })
        .transpose()?;
    for _ in 0..5 {
        let current = state.storage.get(&key).await?;
        let mut object = current.clone();
        match media {
            "application/merge-patch+json" => patch::merge_patch(&mut object, &patch),
            "application/json-patch+json" => patch::json_patch(&mut object, &patch)
                .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e))?,
            "application/strategic-merge-patch+json" => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "strategic merge patch is not supported yet: use a merge patch \
                     (kubectl patch --type=merge) or a JSON patch (--type=json)",
                ))
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("unsupported patch type {other:?}"),
                ))
            }
        }
        // What the server owns stays as it was.
        for field in ["name", "namespace", "uid", "creationTimestamp"] {
            match (
                current["metadata"].get(field),
                object["metadata"].as_object_mut(),
            ) {
                (Some(v), Some(meta)) => {
                    meta.insert(field.into(), v.clone());
                }
                (None, Some(meta)) => {
                    meta.remove(field);
                }
                (_, None) => object["metadata"] = current["metadata"].clone(),
            }
        }
        object["kind"] = current["kind"].clone();
        object["apiVersion"] = current["apiVersion"].clone();
        let expected = precondition.unwrap_or_else(|| resource_version(&current));
        match state.storage.update(&key, object, Some(expected)).await {
            Ok(updated) => return Ok((StatusCode::OK, updated)),
            Err(StorageError::Conflict { .. }) if precondition.is_none() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StorageError::Conflict {
        resource: target.resource.plural.to_string(),
        name: name.to_string(),
    }
    .into())
}

/// Deletes every object of the collection that the selectors match; returns them as a list.
async fn delete_collection(state: &ApiState, target: &Target, query: &str) -> ApiResult {
    let selector = Selector::from_params(&parse_query(query))?;
    let prefix = list_prefix(target.resource.storage_name(), target.namespace.as_deref());
    let page = state.storage.list(&prefix, 0, None).await?;
    let mut deleted = Vec::new();
    for object in page.items.into_iter().filter(|o| selector.matches(o)) {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = object["metadata"]["namespace"].as_str();
        let key = ObjectKey::new(target.resource.storage_name(), namespace, name);
        match state
            .storage
            .delete(&key, Some(resource_version(&object)))
            .await
        {
            Ok(gone) => deleted.push(gone),
            // Deleted or changed meanwhile: not this request's to delete.
            Err(StorageError::NotFound { .. } | StorageError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok((
        StatusCode::OK,
        json!({"kind": format!("{}List", target.resource.kind),
               "apiVersion": target.resource.api_version(),
               "metadata": {}, "items": deleted}),
    ))
}

async fn delete(state: &ApiState, target: &Target) -> ApiResult {
    let name = target.name.as_deref().unwrap_or_default();
    let deleted = state
        .storage
        .delete(&object_key(target, name), None)
        .await?;
    Ok((StatusCode::OK, deleted))
}

/// Parses a request body as an object of the resource's kind.
fn parse_object(body: &Bytes, resource: &Resource) -> Result<Value, ApiError> {
    let object: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !object.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let kind = object["kind"].as_str().unwrap_or(resource.kind);
    let api_version = object["apiVersion"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| resource.api_version());
    if kind != resource.kind || api_version != resource.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) and kind ({kind}) do not match the request ({}, {})",
            resource.api_version(),
            resource.kind
        )));
    }
    let mut object = object;
    object["kind"] = resource.kind.into();
    object["apiVersion"] = resource.api_version().into();
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    Ok(object)
}

/// Why `name` is not a DNS-1123 subdomain, as Kubernetes explains it; `None` when it is one.
fn dns_subdomain_problem(name: &str) -> Option<&'static str> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!valid).then_some(
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
         and must start and end with an alphanumeric character",
    )
}

fn random_suffix() -> String {
    const CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

fn uid() -> String {
    let b: [u8; 16] = rand::rng().random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                i += 2;
                hi * 16 + lo
            }
            (b'+', _, _) => b' ',
            (b, _, _) => b,
        };
        out.push(decoded);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode_continue(key: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key)
}

fn decode_continue(token: &str) -> Result<String, ApiError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|k| k.starts_with("/registry/"))
        .ok_or_else(|| ApiError::bad_request("invalid continue token"))
}

/// The label and field selectors of a list or deletecollection request.
#[derive(Default)]
struct Selector {
    labels: Vec<LabelRequirement>,
    /// (field path, value, negated): only the fields every resource supports.
    fields: Vec<(&'static str, String, bool)>,
}

impl Selector {
    fn from_params(params: &[(String, String)]) -> Result<Self, ApiError> {
        let mut selector = Selector::default();
        for (key, value) in params {
            match key.as_str() {
                "labelSelector" => selector.labels.extend(parse_label_selector(value)?),
                "fieldSelector" => {
                    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let (field, wanted, negated) = if let Some((f, v)) = part.split_once("!=") {
                            (f, v, true)
                        } else if let Some((f, v)) =
                            part.split_once("==").or_else(|| part.split_once('='))
                        {
                            (f, v, false)
                        } else {
                            return Err(ApiError::bad_request(format!(
                                "invalid field selector {part:?}"
                            )));
                        };
                        let field = match field.trim() {
                            "metadata.name" => "name",
                            "metadata.namespace" => "namespace",
                            other => {
                                return Err(ApiError::bad_request(format!(
                                    "field label not supported: {other}"
                                )))
                            }
                        };
                        selector
                            .fields
                            .push((field, wanted.trim().to_string(), negated));
                    }
                }
                _ => {}
            }
        }
        Ok(selector)
    }

    fn matches(&self, object: &Value) -> bool {
        self.labels.iter().all(|r| r.matches(object))
            && self.fields.iter().all(|(field, value, negated)| {
                let actual = object["metadata"][*field].as_str().unwrap_or("");
                (actual == value) != *negated
            })
    }
}

/// One requirement of an equality-based label selector.
#[derive(Debug, PartialEq)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

impl LabelRequirement {
    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        match self {
            LabelRequirement::Equals(k, v) => label(k) == Some(v.as_str()),
            LabelRequirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            LabelRequirement::Exists(k) => label(k).is_some(),
            LabelRequirement::NotExists(k) => label(k).is_none(),
        }
    }
}

fn parse_label_selector(text: &str) -> Result<Vec<LabelRequirement>, ApiError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let requirement = if let Some((k, v)) = part.split_once("!=") {
            LabelRequirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            LabelRequirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some(k) = part.strip_prefix('!') {
            LabelRequirement::NotExists(k.trim().into())
        } else if part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            LabelRequirement::Exists(part.into())
        } else {
            return Err(ApiError::bad_request(format!(
                "unable to parse requirement: {part:?}"
            )));
        };
        out.push(requirement);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_dns_subdomains() {
        assert!(dns_subdomain_problem("web-1.example").is_none());
        for bad in ["", "Web", "-a", "a-", "a..b", "a_b"] {
            assert!(dns_subdomain_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn label_selectors_parse_equality_and_existence() {
        let sel = parse_label_selector("app=web,tier!=db,env,!legacy").unwrap();
        assert_eq!(sel.len(), 4);
        let obj = json!({"metadata": {"labels": {"app": "web", "env": "prod"}}});
        assert!(sel.iter().all(|r| r.matches(&obj)));
        assert!(parse_label_selector("a in (b)").is_err());
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = encode_continue("/registry/pods/default/a");
        assert_eq!(decode_continue(&token).unwrap(), "/registry/pods/default/a");
        assert!(decode_continue("!!!").is_err());
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query("labelSelector=app%3Dweb&limit=5");
        assert_eq!(q[0], ("labelSelector".into(), "app=web".into()));
    }
}
