//! Who a request is and whether it may do what it asks: authentication (`auth`), service account
//! tokens (`sa_token`), RBAC authorization (`rbac`), the serving certificates (`tls`) and the
//! reviews that answer these questions for clients (`reviews`). The request filter that applies
//! them, with impersonation, is here.

pub mod auth;
pub mod rbac;
pub mod reviews;
pub mod sa_token;
pub mod tls;

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::api::{http::request_info, status::ApiError, ApiState};

/// Authenticates (certificate, token), applies impersonation, authorizes (RBAC) and hands the
/// user on to the handlers. Health paths and /version are open to everyone.
pub async fn authenticate(
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
