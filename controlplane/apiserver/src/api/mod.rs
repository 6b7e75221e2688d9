//! The Kubernetes REST API over the storage layer: discovery, and get, list, create, update and
//! delete for the served resources, with errors as `Status` objects.

pub mod alloc;
pub mod apply;
pub mod auth;
pub mod endpoints;
pub mod handlers;
pub mod meta;
pub mod metrics;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod query;
pub mod rbac;
pub mod request_info;
pub mod resources;
pub mod reviews;
pub mod sa_token;
pub mod status;
pub mod strategy;
pub mod table;
pub mod tls;
pub mod typed;
pub mod watch;

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::{json, Value};

use crate::{
    storage::{ObjectKey, Storage, StorageError},
    watch_cache::WatchCaches,
};
use handlers::Target;
use query::{parse_query, Selector};
use status::ApiError;

const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// Kubernetes refuses request bodies larger than this.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub struct ApiState {
    pub storage: Storage,
    pub auth: auth::Authenticator,
    pub authorizer: Arc<rbac::Authorizer>,
    /// False with `--authorization-mode=AlwaysAllow`.
    pub authorize: bool,
    pub metrics: Arc<metrics::RequestMetrics>,
    pub watches: Arc<WatchCaches>,
    pub ranges: alloc::ServiceRanges,
    pub openapi: openapi::OpenApi,
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
        .route("/openapi/v3", get(openapi_root))
        .route("/openapi/v3/{*path}", get(openapi_document))
        .fallback(dispatch)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::record,
        ))
        .with_state(state)
}

/// What every cluster has, created at start when missing: the built-in RBAC policy, the system
/// namespaces, and the `default/kubernetes` service on the first address of the service range,
/// whose endpoints are the API servers that are up (see `endpoints`).
pub async fn bootstrap(state: &ApiState, advertise: std::net::SocketAddr) -> Result<(), ApiError> {
    let storage = &state.storage;
    rbac::bootstrap(storage).await?;
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let object = json!({"apiVersion": "v1", "kind": "Namespace",
                            "metadata": {"name": name, "uid": meta::uid(), "creationTimestamp": meta::now(),
                                         "labels": {"kubernetes.io/metadata.name": name}},
                            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
        match storage
            .create(&ObjectKey::new("namespaces", None, name), object)
            .await
        {
            Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The default ServiceCIDR, from --service-cluster-ip-range, as kube-apiserver makes it.
    let cidrs: Vec<String> = state
        .ranges
        .ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    let service_cidr = json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
        "metadata": {"name": "kubernetes", "uid": meta::uid(), "creationTimestamp": meta::now()},
        "spec": {"cidrs": cidrs},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "",
                                   "message": "Kubernetes Service CIDR is ready",
                                   "lastTransitionTime": meta::now()}]}});
    match storage
        .create(
            &ObjectKey::new("servicecidrs", None, "kubernetes"),
            service_cidr,
        )
        .await
    {
        Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    alloc::repair(storage).await?;
    let ip = state.ranges.kubernetes_ip().to_string();
    let labels = json!({"component": "apiserver", "provider": "kubernetes"});
    let service = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default", "uid": meta::uid(),
                     "creationTimestamp": meta::now(), "labels": labels},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "sessionAffinity": "None",
                 "ipFamilies": [state.ranges.primary().family.name()], "ipFamilyPolicy": "SingleStack", "internalTrafficPolicy": "Cluster",
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": advertise.port()}]},
        "status": {"loadBalancer": {}}});
    let key = ObjectKey::new("services", Some("default"), "kubernetes");
    match alloc::write_service(&state.ranges, storage, &key, None, service, None).await {
        Ok(_) => {}
        Err(e) if e.reason == "AlreadyExists" => {}
        Err(e) => return Err(e),
    }
    endpoints::reconcile(storage, advertise).await?;
    Ok(())
}

/// Authenticates (certificate, token), applies impersonation, authorizes (RBAC) and hands the
/// user on to the handlers. Health paths and /version are open to everyone.
async fn authenticate(
    State(state): State<Arc<ApiState>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if matches!(path, "/healthz" | "/livez" | "/readyz" | "/version") {
        return next.run(request).await;
    }
    let certificate = request.extensions().get::<auth::CertificateUser>().cloned();
    let user = match state
        .auth
        .authenticate(request.headers(), certificate.as_ref(), &state.storage)
        .await
    {
        Ok(user) => user,
        Err(auth::AuthError::Unauthorized) => return ApiError::unauthorized().into_response(),
        Err(auth::AuthError::Unavailable(e)) => return ApiError::from(e).into_response(),
    };
    let user = match impersonate(&state, user, request.headers()).await {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    let info = request_info::parse(
        request.method(),
        request.uri().path(),
        request.uri().query().unwrap_or(""),
    );
    if state.authorize {
        let decision = state.authorizer.authorize(&user, &info).await;
        if !decision.allowed {
            let mut error = ApiError::forbidden(rbac::forbidden_message(&user, &info));
            if info.resource_request {
                error.details = Some(json!({"name": info.name, "group": info.api_group,
                                            "kind": info.resource}));
            }
            return error.into_response();
        }
    }
    request.extensions_mut().insert(user);
    next.run(request).await
}

/// `Impersonate-User` / `Impersonate-Group` headers: act as another user, if allowed to
/// impersonate them (kubectl --as, --as-group).
async fn impersonate(
    state: &ApiState,
    user: auth::User,
    headers: &axum::http::HeaderMap,
) -> Result<auth::User, ApiError> {
    let values = |name: &str| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_string)
            .collect()
    };
    let names = values("impersonate-user");
    let groups = values("impersonate-group");
    if names.is_empty() {
        if groups.is_empty() {
            return Ok(user);
        }
        return Err(ApiError::bad_request(
            "requested impersonation of groups without impersonating a user",
        ));
    }
    let name = names[0].clone();
    let mut checks = Vec::new();
    let mut new_groups = Vec::new();
    match name
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    {
        Some((ns, sa)) => {
            checks.push(("serviceaccounts", Some(ns.to_string()), sa.to_string()));
            new_groups.push("system:serviceaccounts".to_string());
            new_groups.push(format!("system:serviceaccounts:{ns}"));
        }
        None => checks.push(("users", None, name.clone())),
    }
    for group in &groups {
        checks.push(("groups", None, group.clone()));
        new_groups.push(group.clone());
    }
    for (resource, namespace, object) in checks {
        let info = request_info::RequestInfo {
            resource_request: true,
            verb: "impersonate".into(),
            resource: resource.into(),
            namespace,
            name: Some(object),
            ..Default::default()
        };
        if state.authorize && !state.authorizer.authorize(&user, &info).await.allowed {
            return Err(ApiError::forbidden(rbac::forbidden_message(&user, &info)));
        }
    }
    if !new_groups.iter().any(|g| g == "system:authenticated") {
        new_groups.push("system:authenticated".into());
    }
    Ok(auth::User {
        name,
        uid: String::new(),
        groups: new_groups,
    })
}

async fn openapi_root(State(state): State<Arc<ApiState>>) -> Response {
    ([("content-type", "application/json")], state.openapi.root()).into_response()
}

async fn openapi_document(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(path): axum::extract::Path<String>,
) -> Response {
    match state.openapi.document(&path) {
        Some(document) => ([("content-type", "application/json")], document).into_response(),
        None => ApiError::not_found(format!("no OpenAPI document for {path}")).into_response(),
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
        .flat_map(|r| std::iter::once(r.discovery()).chain(r.subresource_discovery()))
        .collect();
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
}

/// Everything under /api/v1 and /apis/GROUP/VERSION: discovery documents and resource requests.
async fn dispatch(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let mut segments: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    // The deprecated /api/v1/watch/... paths: a watch of what follows.
    let mut watch_path = false;
    if segments.len() > 2 && segments[0] == "api" && segments[2] == "watch" {
        segments.remove(2);
        watch_path = true;
    } else if segments.len() > 3 && segments[0] == "apis" && segments[3] == "watch" {
        segments.remove(3);
        watch_path = true;
    }
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
    let (namespace, plural, name, subresource) = match rest {
        // namespaces/NAME/status and namespaces/NAME/finalize, not resources in a namespace.
        ["namespaces", name, sub @ ("status" | "finalize")] if group.is_empty() => {
            (None, "namespaces", Some(*name), Some(*sub))
        }
        ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
        ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
        [plural] => (None, *plural, None, None),
        [plural, name] => (None, *plural, Some(*name), None),
        [plural, name, sub] => (None, *plural, Some(*name), Some(*sub)),
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
    if subresource.is_some_and(|s| !resource.subresources.contains(&s)) {
        return ApiError::not_found("the server could not find the requested resource")
            .into_response();
    }
    // A namespaced resource named through its cluster-wide path can only be listed.
    if resource.namespaced && namespace.is_none() && (name.is_some() || method != Method::GET) {
        return ApiError::not_found("the server could not find the requested resource")
            .into_response();
    }
    if !resource.namespaced && namespace.is_some() {
        return ApiError::not_found("the server could not find the requested resource")
            .into_response();
    }
    let query = uri.query().unwrap_or("").to_string();
    let params = parse_query(&query);
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let field_validation = match typed::FieldValidation::parse(param("fieldValidation")) {
        Ok(v) => v,
        Err(e) => return ApiError::bad_request(e).into_response(),
    };
    if param("dryRun").is_some() {
        return ApiError::bad_request("dryRun is not supported by this server").into_response();
    }
    // The writer's name for managed fields: fieldManager, else the client's name, as
    // kube-apiserver derives it from the User-Agent ("kubectl/v1.32 ..." is "kubectl").
    let field_manager = param("fieldManager")
        .map(str::to_string)
        .unwrap_or_else(|| {
            request
                .headers()
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .map(|ua| ua.split('/').next().unwrap_or("").trim().to_string())
                .unwrap_or_default()
        });
    let force = param("force") == Some("true");
    let target = Target {
        resource,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        subresource: subresource.map(str::to_string),
        field_validation,
        field_manager,
        force,
        warnings: Default::default(),
        user: request
            .extensions()
            .get::<auth::User>()
            .cloned()
            .unwrap_or_else(auth::User::anonymous),
    };
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
    if media == handlers::APPLY && param("fieldManager").is_none() {
        return ApiError::bad_request(
            "PATCH requests with the apply content type must have a fieldManager",
        )
        .into_response();
    }
    // JSON bodies, protobuf ones for the kinds kubectl sends so, and YAML for server-side apply.
    {
        let media = media.as_str();
        if !(media == "application/json"
            || media.ends_with("+json")
            || media.is_empty()
            || media == PROTOBUF
            || media == handlers::APPLY)
        {
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
    let watching = watch_path
        || params
            .iter()
            .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    if watching && method == Method::GET && !resource.review {
        let selector = match Selector::from_params(&params, resource.kind) {
            Ok(s) => s,
            Err(e) => return e.into_response(),
        };
        let selector = match &target.name {
            Some(name) => selector.with_name(name),
            None => selector,
        };
        let request = watch::WatchRequest {
            resource,
            namespace: target.namespace.clone(),
            selector,
            params,
            as_table,
        };
        return match watch::serve(state, request).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
    }
    let user = target.user.clone();
    let mut body = match axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(_) => return too_large(),
    };
    let mut media = media;
    if media == PROTOBUF && !body.is_empty() {
        match protobuf::decode(&body) {
            Ok(object) => {
                body = axum::body::Bytes::from(object.to_string());
                media = "application/json".into();
            }
            Err(protobuf::DecodeError::Unsupported(what)) => {
                return ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!(
                    "protobuf request bodies of {what} are not supported; send application/json"
                ),
                )
                .into_response()
            }
            Err(protobuf::DecodeError::Malformed(why)) => {
                return ApiError::bad_request(format!(
                    "the protobuf request body is malformed: {why}"
                ))
                .into_response()
            }
        }
    }
    if resource.review {
        return match method {
            Method::POST if target.name.is_none() => {
                match reviews::answer(&state, &target, &user, &body).await {
                    Ok((code, value)) => (code, Json(value)).into_response(),
                    Err(e) => e.into_response(),
                }
            }
            _ => ApiError::method_not_allowed().into_response(),
        };
    }
    if target.subresource.as_deref() == Some("token") {
        return match method {
            Method::POST => match reviews::token_request(&state, &target, &body).await {
                Ok((code, value)) => (code, Json(value)).into_response(),
                Err(e) => e.into_response(),
            },
            _ => ApiError::method_not_allowed().into_response(),
        };
    }
    let named = target.name.is_some();
    let creates_subresource = named && target.subresource.is_some() && method == Method::POST;
    let result = match method.clone() {
        Method::GET if named => handlers::get_one(&state, &target).await,
        Method::GET => match handlers::list(&state, &target, &query, as_table).await {
            Ok(handlers::Listed::Value(value)) => Ok((StatusCode::OK, value)),
            Ok(handlers::Listed::Raw(bytes)) => {
                return (
                    StatusCode::OK,
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    bytes,
                )
                    .into_response()
            }
            Err(e) => Err(e),
        },
        Method::POST if !named || creates_subresource => {
            handlers::create(&state, &target, &body).await
        }
        Method::PUT if named => handlers::update(&state, &target, &body).await,
        Method::PATCH if named => handlers::patch_one(&state, &target, &media, &body).await,
        Method::DELETE => match handlers::DeleteOptions::parse(&body, &query) {
            Ok(options) if named => handlers::delete(&state, &target, &options).await,
            Ok(options) => handlers::delete_collection(&state, &target, &query, &options).await,
            Err(e) => Err(e),
        },
        _ => Err(ApiError::method_not_allowed()),
    };
    let mut response = match result {
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
    };
    let warnings = target
        .warnings
        .lock()
        .map(|w| w.clone())
        .unwrap_or_default();
    for warning in warnings {
        let text = format!("299 - {}", serde_json::Value::String(warning));
        if let Ok(value) = axum::http::HeaderValue::from_str(&text) {
            response.headers_mut().append("warning", value);
        }
    }
    response
}
