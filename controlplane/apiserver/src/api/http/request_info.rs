//! What a request asks for in Kubernetes' terms (its RequestInfo): a resource request (verb, API
//! group, namespace, resource, subresource, name) or a non-resource URL. Authorization and the
//! request metrics both read it.

use axum::http::Method;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequestInfo {
    pub resource_request: bool,
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection; for
    /// non-resource URLs the lowercased method (get, post, ...).
    pub verb: String,
    pub api_group: String,
    pub namespace: Option<String>,
    pub resource: String,
    pub subresource: String,
    pub name: Option<String>,
    pub path: String,
}

pub fn parse(method: &Method, path: &str, query: &str) -> RequestInfo {
    let non_resource = || RequestInfo {
        resource_request: false,
        verb: method.as_str().to_ascii_lowercase(),
        path: path.to_string(),
        ..Default::default()
    };
    let mut parts: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let (group, rest_at) = match parts.as_slice() {
        ["api", _version, _, ..] => ("", 2),
        ["apis", group, _version, _, ..] => (*group, 3),
        _ => return non_resource(),
    };
    let mut watch = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1");
    if parts.get(rest_at) == Some(&"watch") {
        parts.remove(rest_at);
        watch = true;
    }
    let rest = &parts[rest_at..];
    let (namespace, resource, name, subresource) = match rest {
        ["namespaces"] => (None, "namespaces", None, ""),
        ["namespaces", name] => (None, "namespaces", Some(*name), ""),
        ["namespaces", name, sub @ ("status" | "finalize")] => {
            (None, "namespaces", Some(*name), *sub)
        }
        ["namespaces", ns, resource] => (Some(*ns), *resource, None, ""),
        ["namespaces", ns, resource, name] => (Some(*ns), *resource, Some(*name), ""),
        ["namespaces", ns, resource, name, sub, ..] => (Some(*ns), *resource, Some(*name), *sub),
        [resource] => (None, *resource, None, ""),
        [resource, name] => (None, *resource, Some(*name), ""),
        [resource, name, sub, ..] => (None, *resource, Some(*name), *sub),
        [] => return non_resource(),
    };
    let named = name.is_some();
    let verb = match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if named => "get",
        Method::GET | Method::HEAD => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => return non_resource(),
    };
    RequestInfo {
        resource_request: true,
        verb: verb.into(),
        api_group: group.into(),
        namespace: namespace.map(str::to_string),
        resource: resource.into(),
        subresource: subresource.into(),
        name: name.map(str::to_string),
        path: path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_become_kubernetes_request_attributes() {
        let i = parse(&Method::GET, "/api/v1/namespaces/default/pods/web", "");
        assert_eq!(
            (
                i.verb.as_str(),
                i.namespace.as_deref(),
                i.resource.as_str(),
                i.name.as_deref()
            ),
            ("get", Some("default"), "pods", Some("web"))
        );
        let i = parse(&Method::GET, "/api/v1/pods", "watch=true");
        assert_eq!((i.verb.as_str(), i.namespace), ("watch", None));
        let i = parse(&Method::GET, "/api/v1/watch/namespaces/a/pods", "");
        assert_eq!(
            (i.verb.as_str(), i.namespace.as_deref()),
            ("watch", Some("a"))
        );
        let i = parse(&Method::POST, "/api/v1/namespaces/a/pods/p/binding", "");
        assert_eq!(
            (i.verb.as_str(), i.subresource.as_str()),
            ("create", "binding")
        );
        let i = parse(&Method::PUT, "/api/v1/namespaces/team/finalize", "");
        assert_eq!(
            (
                i.resource.as_str(),
                i.name.as_deref(),
                i.subresource.as_str()
            ),
            ("namespaces", Some("team"), "finalize")
        );
        let i = parse(&Method::DELETE, "/apis/batch/v1/namespaces/a/jobs", "");
        assert_eq!(
            (i.verb.as_str(), i.api_group.as_str()),
            ("deletecollection", "batch")
        );
        let i = parse(&Method::GET, "/apis/batch/v1", "");
        assert!(!i.resource_request);
        assert_eq!(i.verb, "get");
        assert!(!parse(&Method::GET, "/version", "").resource_request);
    }
}
