//! Everything under /api/v1 and /apis/GROUP/VERSION, in the order kube-apiserver's handler chain
//! takes it: the path to a resource (or a discovery document), the request's parameters to a
//! `Target`, the body read within its limits and decoded, the verb to its handler, and the
//! answer as JSON or a Table with the warnings gathered on the way.

use std::sync::Arc;

use axum::{
    body::Bytes,
    extract::{Request, State},
    http::{header, HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use serde_json::Value;

use super::{
    discovery,
    handlers::{self, Target},
    query::{parse_query, Selector},
    table, watch,
};
use crate::api::{
    codec::{protobuf, typed},
    registry::resources::{self, Resource},
    security::{auth, reviews},
    status::ApiError,
    ApiState,
};

const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// Kubernetes refuses request bodies larger than this.
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

pub async fn dispatch(State(state): State<Arc<ApiState>>, request: Request) -> Response {
    match serve(state, request).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}

/// What a path names: a discovery document, answered at once, or a resource.
enum Route {
    Answered(Response),
    Resource(Path),
}

/// A resource path: `[namespaces/NS/]PLURAL[/NAME[/SUBRESOURCE]]` in a group version.
struct Path {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    /// The deprecated `/api/v1/watch/...` form.
    watch: bool,
}

fn not_found() -> ApiError {
    ApiError::not_found("the server could not find the requested resource")
}

async fn serve(state: Arc<ApiState>, request: Request) -> Result<Response, ApiError> {
    let method = request.method().clone();
    let path = match route(&method, request.uri().path())? {
        Route::Answered(response) => return Ok(response),
        Route::Resource(path) => path,
    };
    let query = request.uri().query().unwrap_or("").to_string();
    let params = parse_query(&query);
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    if param("dryRun").is_some() {
        return Err(ApiError::bad_request(
            "dryRun is not supported by this server",
        ));
    }
    let target = target(&path, &params, &request)?;
    let headers = request.headers().clone();
    let as_table = header_text(&headers, "accept").is_some_and(table::wanted);
    let media = media_type(&headers, param("fieldManager").is_some())?;
    let watching = path.watch
        || params
            .iter()
            .any(|(k, v)| k == "watch" && (v == "true" || v == "1"));
    if watching && method == Method::GET && !path.resource.review {
        let selector = Selector::from_params(&params, path.resource)?;
        let selector = match &target.name {
            Some(name) => selector.with_name(name),
            None => selector,
        };
        let request = watch::WatchRequest {
            resource: path.resource,
            namespace: target.namespace.clone(),
            selector,
            params,
            as_table,
        };
        return watch::serve(state, request).await;
    }
    let (media, body) = read_body(request, media).await?;
    if let Some(answer) = answer(&state, &method, &target, &body).await {
        return Ok(answer);
    }
    let result = match verb(&state, &method, &target, &query, &media, &body, as_table).await {
        Ok(Served::Raw(bytes)) => {
            return Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response())
        }
        Ok(Served::Value(code, value)) => Ok((code, value)),
        Err(e) => Err(e),
    };
    let mut response = match result {
        Ok((code, value)) if as_table && method == Method::GET => {
            let include = param("includeObject").unwrap_or_default();
            (code, Json(as_table_of(target.resource, &value, include))).into_response()
        }
        Ok((code, value)) => (code, Json(value)).into_response(),
        Err(e) => e.into_response(),
    };
    add_warnings(&mut response, &target);
    Ok(response)
}

/// The path to a resource, or a discovery document for `/api/v1`, `/apis/GROUP` and
/// `/apis/GROUP/VERSION`.
fn route(method: &Method, path: &str) -> Result<Route, ApiError> {
    let mut segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // The deprecated /api/v1/watch/... paths: a watch of what follows.
    let mut watch = false;
    if segments.len() > 2 && segments[0] == "api" && segments[2] == "watch" {
        segments.remove(2);
        watch = true;
    } else if segments.len() > 3 && segments[0] == "apis" && segments[3] == "watch" {
        segments.remove(3);
        watch = true;
    }
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group] if method == Method::GET => {
            return Ok(Route::Answered(discovery::group(group)));
        }
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(not_found()),
    };
    if rest.is_empty() {
        let known = (group.is_empty() && version == "v1")
            || resources::groups().contains(&(group, version));
        return if known && method == Method::GET {
            Ok(Route::Answered(
                Json(discovery::resource_list(group, version)).into_response(),
            ))
        } else {
            Err(not_found())
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
        _ => return Err(not_found()),
    };
    let Some(resource) = resources::find(group, version, plural) else {
        return Err(ApiError::not_found(format!(
            "the server could not find the requested resource ({plural})"
        )));
    };
    if subresource.is_some_and(|s| !resource.subresources.contains(&s)) {
        return Err(not_found());
    }
    // A namespaced resource named through its cluster-wide path can only be listed.
    if resource.namespaced && namespace.is_none() && (name.is_some() || method != Method::GET) {
        return Err(not_found());
    }
    if !resource.namespaced && namespace.is_some() {
        return Err(not_found());
    }
    Ok(Route::Resource(Path {
        resource,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
        subresource: subresource.map(str::to_string),
        watch,
    }))
}

/// The request in the handlers' terms: what it names, who asks, and its write options.
fn target(path: &Path, params: &[(String, String)], request: &Request) -> Result<Target, ApiError> {
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let field_validation =
        typed::FieldValidation::parse(param("fieldValidation")).map_err(ApiError::bad_request)?;
    // The writer's name for managed fields: fieldManager, else the client's name, as
    // kube-apiserver derives it from the User-Agent ("kubectl/v1.32 ..." is "kubectl").
    let field_manager = param("fieldManager")
        .map(str::to_string)
        .unwrap_or_else(|| {
            header_text(request.headers(), "user-agent")
                .map(|ua| ua.split('/').next().unwrap_or("").trim().to_string())
                .unwrap_or_default()
        });
    Ok(Target {
        resource: path.resource,
        namespace: path.namespace.clone(),
        name: path.name.clone(),
        subresource: path.subresource.clone(),
        field_validation,
        field_manager,
        force: param("force") == Some("true"),
        warnings: Default::default(),
        user: request
            .extensions()
            .get::<auth::User>()
            .cloned()
            .unwrap_or_else(auth::User::anonymous),
    })
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The body's media type, if the server reads it: JSON, protobuf for the kinds kubectl sends
/// so, and YAML for server-side apply (which must name its field manager).
fn media_type(headers: &HeaderMap, has_field_manager: bool) -> Result<String, ApiError> {
    let media = header_text(headers, "content-type")
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_default();
    if media == handlers::APPLY && !has_field_manager {
        return Err(ApiError::bad_request(
            "PATCH requests with the apply content type must have a fieldManager",
        ));
    }
    if !(media == "application/json"
        || media.ends_with("+json")
        || media.is_empty()
        || media == PROTOBUF
        || media == handlers::APPLY)
    {
        return Err(unsupported(format!("the body of the request was in an unknown format - accepted media types include: application/json (got {media})")));
    }
    // Refused before reading when the length is announced (a client waiting on 100-continue
    // then sends nothing); otherwise once the limit is passed, in `read_body`.
    let announced = header_text(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(too_large());
    }
    Ok(media)
}

fn unsupported(message: String) -> ApiError {
    ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        message,
    )
}

fn too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// The body, up to the limit, with a protobuf one decoded to JSON: (media type, body).
async fn read_body(request: Request, media: String) -> Result<(String, Bytes), ApiError> {
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| too_large())?;
    if media != PROTOBUF || body.is_empty() {
        return Ok((media, body));
    }
    match protobuf::decode(&body) {
        Ok(object) => Ok(("application/json".into(), Bytes::from(object.to_string()))),
        Err(protobuf::DecodeError::Unsupported(what)) => Err(unsupported(format!(
            "protobuf request bodies of {what} are not supported; send application/json"
        ))),
        Err(protobuf::DecodeError::Malformed(why)) => Err(ApiError::bad_request(format!(
            "the protobuf request body is malformed: {why}"
        ))),
    }
}

/// Requests answered rather than stored: reviews and TokenRequests.
async fn answer(
    state: &ApiState,
    method: &Method,
    target: &Target,
    body: &Bytes,
) -> Option<Response> {
    let answered = if target.resource.review {
        match *method {
            Method::POST if target.name.is_none() => {
                reviews::answer(state, target, &target.user, body).await
            }
            _ => Err(ApiError::method_not_allowed()),
        }
    } else if target.subresource.as_deref() == Some("token") {
        match *method {
            Method::POST => reviews::token_request(state, target, body).await,
            _ => Err(ApiError::method_not_allowed()),
        }
    } else {
        return None;
    };
    Some(match answered {
        Ok((code, value)) => (code, Json(value)).into_response(),
        Err(e) => e.into_response(),
    })
}

/// What a verb's handler gives back: an object, or a list already serialized.
enum Served {
    Value(StatusCode, Value),
    Raw(Bytes),
}

async fn verb(
    state: &ApiState,
    method: &Method,
    target: &Target,
    query: &str,
    media: &str,
    body: &Bytes,
    as_table: bool,
) -> Result<Served, ApiError> {
    let named = target.name.is_some();
    let creates_subresource = named && target.subresource.is_some() && *method == Method::POST;
    let (code, value) = match *method {
        Method::GET if named => handlers::get_one(state, target).await?,
        Method::GET => {
            return match handlers::list(state, target, query, as_table).await? {
                handlers::Listed::Value(value) => Ok(Served::Value(StatusCode::OK, value)),
                handlers::Listed::Raw(bytes) => Ok(Served::Raw(bytes)),
            }
        }
        Method::POST if !named || creates_subresource => {
            handlers::create(state, target, body).await?
        }
        Method::PUT if named => handlers::update(state, target, body).await?,
        Method::PATCH if named => handlers::patch_one(state, target, media, body).await?,
        Method::DELETE => {
            let options = handlers::DeleteOptions::parse(body, query)?;
            if named {
                handlers::delete(state, target, &options).await?
            } else {
                handlers::delete_collection(state, target, query, &options).await?
            }
        }
        _ => return Err(ApiError::method_not_allowed()),
    };
    Ok(Served::Value(code, value))
}

/// A list or one object as the Table kubectl asked for.
fn as_table_of(resource: &Resource, value: &Value, include_object: &str) -> Value {
    let items = match value.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![value.clone()],
    };
    let rv = value["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    table::render(&resource.strategy.printer(), &items, rv, include_object)
}

/// The warnings the handlers gathered, as `Warning: 299` headers.
fn add_warnings(response: &mut Response, target: &Target) {
    let warnings = target
        .warnings
        .lock()
        .map(|w| w.clone())
        .unwrap_or_default();
    for warning in warnings {
        let text = format!("299 - {}", Value::String(warning));
        if let Ok(value) = HeaderValue::from_str(&text) {
            response.headers_mut().append("warning", value);
        }
    }
}
