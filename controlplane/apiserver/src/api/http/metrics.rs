//! Request metrics under kube-apiserver's names: `apiserver_request_total{verb,resource,code}` and
//! `apiserver_request_duration_seconds{verb,resource}`.

use std::time::Instant;

use axum::{
    extract::{Request, State},
    http::Method,
    middleware::Next,
    response::Response,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(String, String)>;

pub struct RequestMetrics {
    registry: Registry,
    total: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let total = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0])
        });
        registry.register(
            "apiserver_request",
            "Counter of apiserver requests broken out for each verb, resource and HTTP response code",
            total.clone(),
        );
        registry.register(
            "apiserver_request_duration_seconds",
            "Response latency distribution in seconds for each verb and resource",
            duration.clone(),
        );
        RequestMetrics {
            registry,
            total,
            duration,
        }
    }
}

impl RequestMetrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        match encode(&mut out, &self.registry) {
            Ok(()) => out,
            Err(e) => format!("# encoding failed: {e}\n"),
        }
    }
}

/// The verb and resource labels of a request, as kube-apiserver labels them.
fn classify(method: &Method, path: &str, query: &str) -> (String, String) {
    let info = crate::api::http::request_info::parse(method, path, query);
    if !info.resource_request {
        return (method.as_str().to_ascii_uppercase(), String::new());
    }
    let verb = match info.verb.as_str() {
        "create" => "POST",
        "update" => "PUT",
        other => return (other.to_ascii_uppercase(), info.resource),
    };
    (verb.to_string(), info.resource)
}

pub async fn record(
    State(metrics): State<std::sync::Arc<RequestMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let (verb, resource) = classify(
        request.method(),
        request.uri().path(),
        request.uri().query().unwrap_or(""),
    );
    let start = Instant::now();
    let response = next.run(request).await;
    let code = response.status().as_u16().to_string();
    metrics
        .total
        .get_or_create(&vec![
            ("verb".into(), verb.clone()),
            ("resource".into(), resource.clone()),
            ("code".into(), code),
        ])
        .inc();
    metrics
        .duration
        .get_or_create(&vec![("verb".into(), verb), ("resource".into(), resource)])
        .observe(start.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_classified_as_kubernetes_verbs() {
        let get = Method::GET;
        assert_eq!(
            classify(&get, "/api/v1/namespaces/default/pods/a", ""),
            ("GET".into(), "pods".into())
        );
        assert_eq!(
            classify(&get, "/api/v1/namespaces/default/pods", ""),
            ("LIST".into(), "pods".into())
        );
        assert_eq!(
            classify(&get, "/api/v1/pods", "watch=true"),
            ("WATCH".into(), "pods".into())
        );
        assert_eq!(
            classify(&get, "/api/v1/namespaces/kube-system", ""),
            ("GET".into(), "namespaces".into())
        );
        assert_eq!(
            classify(&Method::DELETE, "/apis/batch/v1/namespaces/a/jobs", ""),
            ("DELETECOLLECTION".into(), "jobs".into())
        );
    }
}
