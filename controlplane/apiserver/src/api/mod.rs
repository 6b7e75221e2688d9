//! The Kubernetes REST API over the storage layer, grouped by concern:
//! - `http`: routing, the verbs, watches, tables, discovery, OpenAPI, request metrics;
//! - `codec`: protobuf and typed bodies, PATCH formats, server-side apply;
//! - `registry`: the served resources and each kind's rules (strategies), allocation;
//! - `security`: authentication, RBAC, service account tokens, certificates, reviews;
//! - `bootstrap`: what every cluster has from its first start;
//! - `status`: errors as Kubernetes `Status` objects, used by all of them.

pub mod bootstrap;
pub mod codec;
pub mod http;
pub mod registry;
pub mod security;
pub mod status;

use std::sync::Arc;

use axum::{middleware, routing::get, Router};

use crate::{storage::Storage, watch_cache::WatchCaches};
use http::{discovery, metrics, openapi};
use registry::alloc;
use security::{auth, rbac};

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
        .route("/readyz", get(discovery::readyz))
        .route("/version", get(discovery::version))
        .route("/api", get(discovery::api_versions))
        .route("/apis", get(discovery::api_groups))
        .route("/metrics", get(discovery::render_metrics))
        .route("/openapi/v3", get(discovery::openapi_root))
        .route("/openapi/v3/{*path}", get(discovery::openapi_document))
        .fallback(http::dispatch)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            security::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.metrics.clone(),
            metrics::record,
        ))
        .with_state(state)
}
