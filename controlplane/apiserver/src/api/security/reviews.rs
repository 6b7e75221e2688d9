//! Requests that are answered rather than stored: access reviews (`kubectl auth can-i`), self
//! subject reviews (`kubectl auth whoami`), token reviews, and TokenRequests for service accounts
//! (`kubectl create token`).

use axum::{body::Bytes, http::StatusCode};
use serde_json::{json, Value};

use crate::api::{
    http::handlers::{parse_object, ApiResult, Target},
    http::request_info::RequestInfo,
    registry::meta::now,
    security::auth::{AuthError, User},
    security::rbac::Decision,
    security::sa_token::TokenClaims,
    status::ApiError,
    ApiState,
};
use crate::storage::{ObjectKey, StorageError};

/// The RequestInfo an access review asks about.
fn review_attributes(spec: &Value, kind: &str) -> Result<RequestInfo, ApiError> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    if let Some(attrs) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
        let namespace = text(&attrs["namespace"]);
        let name = text(&attrs["name"]);
        return Ok(RequestInfo {
            resource_request: true,
            verb: text(&attrs["verb"]),
            api_group: text(&attrs["group"]),
            namespace: (!namespace.is_empty()).then_some(namespace),
            resource: text(&attrs["resource"]),
            subresource: text(&attrs["subresource"]),
            name: (!name.is_empty()).then_some(name),
            path: String::new(),
        });
    }
    if let Some(attrs) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
        return Ok(RequestInfo {
            resource_request: false,
            verb: text(&attrs["verb"]),
            path: text(&attrs["path"]),
            ..Default::default()
        });
    }
    Err(ApiError::invalid(
        kind,
        "",
        vec![(
            "spec.resourceAttributes".into(),
            "Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified".into(),
        )],
    ))
}

fn review_status(decision: &Decision) -> Value {
    let mut status = json!({"allowed": decision.allowed});
    if !decision.reason.is_empty() {
        status["reason"] = decision.reason.clone().into();
    }
    status
}

/// POST of a review: the answer, with the request's spec echoed as Kubernetes does.
pub async fn answer(state: &ApiState, target: &Target, user: &User, body: &Bytes) -> ApiResult {
    let resource = target.resource;
    let mut review = parse_object(body, resource)?;
    review["metadata"]["creationTimestamp"] = Value::Null;
    match resource.kind {
        "SelfSubjectAccessReview" => {
            let info = review_attributes(&review["spec"], resource.kind)?;
            let decision = state.authorizer.authorize(user, &info).await;
            review["status"] = review_status(&decision);
        }
        "SubjectAccessReview" => {
            let spec = &review["spec"];
            let info = review_attributes(spec, resource.kind)?;
            let subject = User {
                name: spec["user"].as_str().unwrap_or_default().to_string(),
                uid: spec["uid"].as_str().unwrap_or_default().to_string(),
                groups: spec["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
            };
            if subject.name.is_empty() && subject.groups.is_empty() {
                return Err(ApiError::invalid(
                    resource.kind,
                    "",
                    vec![(
                        "spec.user".into(),
                        "Invalid value: \"\": at least one of user or group must be specified"
                            .into(),
                    )],
                ));
            }
            let decision = state.authorizer.authorize(&subject, &info).await;
            review["status"] = review_status(&decision);
        }
        "SelfSubjectReview" => {
            review["status"] = json!({"userInfo": {"username": user.name, "uid": user.uid,
                                                   "groups": user.groups}});
        }
        "TokenReview" => {
            let token = review["spec"]["token"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut headers = axum::http::HeaderMap::new();
            if let Ok(value) = format!("Bearer {token}").parse() {
                headers.insert("authorization", value);
            }
            review["status"] = match state
                .auth
                .authenticate(&headers, None, &state.storage)
                .await
            {
                Ok(user) => json!({"authenticated": true,
                                   "user": {"username": user.name, "uid": user.uid, "groups": user.groups},
                                   "audiences": state.auth.signer.audiences}),
                Err(AuthError::Unauthorized) => {
                    json!({"authenticated": false, "error": "invalid bearer token"})
                }
                Err(AuthError::Unavailable(e)) => return Err(e.into()),
            };
        }
        _ => return Err(ApiError::method_not_allowed()),
    }
    Ok((StatusCode::CREATED, review))
}

/// serviceaccounts/NAME/token: a token for the service account, optionally bound to a pod.
pub async fn token_request(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
    let name = target.name.as_deref().unwrap_or_default();
    let namespace = target.namespace.as_deref().unwrap_or_default();
    let request: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if request["kind"]
        .as_str()
        .is_some_and(|k| k != "TokenRequest")
    {
        return Err(ApiError::bad_request(format!(
            "expected a TokenRequest, got {}",
            request["kind"]
        )));
    }
    let spec = &request["spec"];
    let seconds = spec["expirationSeconds"].as_i64().unwrap_or(3600);
    if seconds < 600 {
        return Err(ApiError::invalid(
            "TokenRequest",
            name,
            vec![(
                "spec.expirationSeconds".into(),
                format!(
                    "Invalid value: {seconds}: may not specify a duration less than 10 minutes"
                ),
            )],
        ));
    }
    let seconds = seconds.min(48 * 3600);
    let account = state
        .storage
        .get(&ObjectKey::new("serviceaccounts", Some(namespace), name))
        .await?;
    let mut pod = None;
    let bound = &spec["boundObjectRef"];
    if bound.is_object() {
        if bound["kind"] != "Pod" {
            return Err(ApiError::invalid(
                "TokenRequest",
                name,
                vec![(
                    "spec.boundObjectRef.kind".into(),
                    format!(
                        "Unsupported value: {}: supported values: \"Pod\"",
                        bound["kind"]
                    ),
                )],
            ));
        }
        let pod_name = bound["name"].as_str().unwrap_or_default();
        let object = match state
            .storage
            .get(&ObjectKey::new("pods", Some(namespace), pod_name))
            .await
        {
            Ok(o) => o,
            Err(StorageError::NotFound { .. }) => {
                return Err(ApiError::not_found(format!("pods {pod_name:?} not found")))
            }
            Err(e) => return Err(e.into()),
        };
        let uid = object["metadata"]["uid"].as_str().unwrap_or_default();
        if bound["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u != uid)
        {
            return Err(ApiError::conflict(format!(
                "the UID in the bound object reference ({}) does not match the UID in record ({uid}). The object might have been deleted and then recreated",
                bound["uid"].as_str().unwrap_or_default()
            )));
        }
        pod = Some((pod_name.to_string(), uid.to_string()));
    }
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect();
    let issued_at = chrono::Utc::now().timestamp();
    let claims = TokenClaims {
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: account["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        pod,
        expires: issued_at + seconds,
    };
    let token = state
        .auth
        .signer
        .issue(&claims, &audiences, issued_at)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let expiration = chrono::DateTime::from_timestamp(claims.expires, 0)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    let audiences = if audiences.is_empty() {
        state.auth.signer.audiences.clone()
    } else {
        audiences
    };
    Ok((
        StatusCode::CREATED,
        json!({"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
               "metadata": {"name": name, "namespace": namespace, "creationTimestamp": now()},
               "spec": {"audiences": audiences, "expirationSeconds": seconds,
                        "boundObjectRef": if bound.is_object() { bound.clone() } else { Value::Null }},
               "status": {"token": token, "expirationTimestamp": expiration}}),
    ))
}
