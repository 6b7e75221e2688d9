//! The resources the API server serves, with what discovery says about each and the strategy
//! that holds each kind's rules.

use super::{
    configmap, endpoints, event, job, lease, namespace, node, pod, rbac, secret, service,
    serviceaccount, servicecidr,
    strategy::{Plain, Strategy},
};

/// One served resource.
#[derive(Debug, Clone, Copy)]
pub struct Resource {
    /// API group; "" for core/v1.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Subresources: `status`, `binding`, `finalize`, `token`.
    pub subresources: &'static [&'static str],
    /// A review (SelfSubjectAccessReview, TokenReview, ...): created and answered, never stored.
    pub review: bool,
    /// The kind's rules: defaults, validation, deletion, field selectors, columns.
    pub strategy: &'static dyn Strategy,
}

impl std::fmt::Debug for dyn Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Strategy")
    }
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

pub const RESOURCES: &[Resource] = &[
    core("Namespace", "namespaces", "namespace", false, &["ns"])
        .with_subresources(&["status", "finalize"])
        .with_strategy(&namespace::Namespaces),
    core("Node", "nodes", "node", false, &["no"])
        .with_subresources(&["status"])
        .with_strategy(&node::Nodes),
    core("Pod", "pods", "pod", true, &["po"])
        .with_subresources(&["status", "binding"])
        .with_strategy(&pod::Pods),
    core("Service", "services", "service", true, &["svc"])
        .with_subresources(&["status"])
        .with_strategy(&service::Services),
    core("Endpoints", "endpoints", "endpoints", true, &["ep"]).with_strategy(&endpoints::Endpoints),
    core("ConfigMap", "configmaps", "configmap", true, &["cm"])
        .with_strategy(&configmap::ConfigMaps),
    core("Secret", "secrets", "secret", true, &[]).with_strategy(&secret::Secrets),
    core(
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        &["sa"],
    )
    .with_subresources(&["token"])
    .with_strategy(&serviceaccount::ServiceAccounts),
    core("Event", "events", "event", true, &["ev"]).with_strategy(&event::Events),
    grouped("discovery.k8s.io", "EndpointSlice", "endpointslices", true)
        .with_singular("endpointslice")
        .with_strategy(&endpoints::EndpointSlices),
    grouped("coordination.k8s.io", "Lease", "leases", true)
        .with_singular("lease")
        .with_strategy(&lease::Leases),
    grouped("batch", "Job", "jobs", true)
        .with_singular("job")
        .with_subresources(&["status"])
        .with_strategy(&job::Jobs),
    // The service ranges (the default "kubernetes" one from --service-cluster-ip-range, more
    // added at run time) and the allocator's record of every cluster IP, as in Kubernetes 1.33.
    grouped("networking.k8s.io", "ServiceCIDR", "servicecidrs", false)
        .with_subresources(&["status"])
        .with_strategy(&servicecidr::ServiceCidrs),
    Resource {
        short_names: &["ip"],
        ..grouped("networking.k8s.io", "IPAddress", "ipaddresses", false)
    }
    .with_strategy(&servicecidr::IpAddresses),
    grouped(
        "rbac.authorization.k8s.io",
        "ClusterRole",
        "clusterroles",
        false,
    )
    .with_strategy(&rbac::Roles("ClusterRole")),
    grouped(
        "rbac.authorization.k8s.io",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    )
    .with_strategy(&rbac::Bindings {
        kind: "ClusterRoleBinding",
        role_kinds: &["ClusterRole"],
    }),
    grouped("rbac.authorization.k8s.io", "Role", "roles", true).with_strategy(&rbac::Roles("Role")),
    grouped(
        "rbac.authorization.k8s.io",
        "RoleBinding",
        "rolebindings",
        true,
    )
    .with_strategy(&rbac::Bindings {
        kind: "RoleBinding",
        role_kinds: &["Role", "ClusterRole"],
    }),
    review(
        "authorization.k8s.io",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
    ),
    review(
        "authorization.k8s.io",
        "SubjectAccessReview",
        "subjectaccessreviews",
    ),
    review(
        "authentication.k8s.io",
        "SelfSubjectReview",
        "selfsubjectreviews",
    ),
    review("authentication.k8s.io", "TokenReview", "tokenreviews"),
];

const fn grouped(
    group: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
) -> Resource {
    Resource {
        group,
        version: "v1",
        kind,
        plural,
        singular: "",
        namespaced,
        short_names: &[],
        subresources: &[],
        review: false,
        strategy: &Plain,
    }
}

const fn review(group: &'static str, kind: &'static str, plural: &'static str) -> Resource {
    Resource {
        review: true,
        ..grouped(group, kind, plural, false)
    }
}

const fn core(
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    namespaced: bool,
    short_names: &'static [&'static str],
) -> Resource {
    Resource {
        group: "",
        version: "v1",
        kind,
        plural,
        singular,
        namespaced,
        short_names,
        subresources: &[],
        review: false,
        strategy: &Plain,
    }
}

impl Resource {
    const fn with_subresources(self, subresources: &'static [&'static str]) -> Resource {
        Resource {
            subresources,
            ..self
        }
    }

    const fn with_singular(self, singular: &'static str) -> Resource {
        Resource { singular, ..self }
    }

    const fn with_strategy(self, strategy: &'static dyn Strategy) -> Resource {
        Resource { strategy, ..self }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name in etcd keys: the plural, for grouped resources too, as Kubernetes keys its own
    /// (`/registry/jobs/...`, `/registry/endpointslices/...`).
    pub fn storage_name(&self) -> &'static str {
        self.plural
    }

    /// The discovery entries of the subresources (`pods/status`, ...).
    pub fn subresource_discovery(&self) -> Vec<serde_json::Value> {
        self.subresources
            .iter()
            .map(|sub| {
                let (kind, verbs): (&str, &[&str]) = match *sub {
                    "binding" => ("Binding", &["create"]),
                    "token" => ("TokenRequest", &["create"]),
                    "finalize" => (self.kind, &["update"]),
                    _ => (self.kind, &["get", "patch", "update"]),
                };
                let mut entry = serde_json::json!({
                    "name": format!("{}/{sub}", self.plural),
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": kind,
                    "verbs": verbs,
                });
                if *sub == "token" {
                    entry["group"] = "authentication.k8s.io".into();
                    entry["version"] = "v1".into();
                }
                entry
            })
            .collect()
    }

    pub fn discovery(&self) -> serde_json::Value {
        let verbs: &[&str] = if self.review { &["create"] } else { &VERBS };
        serde_json::json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": verbs,
            "shortNames": self.short_names,
        })
    }
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The groups other than core, with their versions, in discovery order.
pub fn groups() -> Vec<(&'static str, &'static str)> {
    let mut groups: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !groups.contains(&(r.group, r.version)) {
            groups.push((r.group, r.version));
        }
    }
    groups
}
