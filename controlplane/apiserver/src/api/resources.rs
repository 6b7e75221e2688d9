//! The resources the API server serves, with what discovery says about each.

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
    with_subresources(
        core("Namespace", "namespaces", "namespace", false, &["ns"]),
        &["status", "finalize"],
    ),
    with_subresources(core("Node", "nodes", "node", false, &["no"]), &["status"]),
    with_subresources(
        core("Pod", "pods", "pod", true, &["po"]),
        &["status", "binding"],
    ),
    with_subresources(
        core("Service", "services", "service", true, &["svc"]),
        &["status"],
    ),
    core("Endpoints", "endpoints", "endpoints", true, &["ep"]),
    core("ConfigMap", "configmaps", "configmap", true, &["cm"]),
    core("Secret", "secrets", "secret", true, &[]),
    with_subresources(
        core(
            "ServiceAccount",
            "serviceaccounts",
            "serviceaccount",
            true,
            &["sa"],
        ),
        &["token"],
    ),
    core("Event", "events", "event", true, &["ev"]),
    Resource {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        review: false,
    },
    Resource {
        group: "coordination.k8s.io",
        version: "v1",
        kind: "Lease",
        plural: "leases",
        singular: "lease",
        namespaced: true,
        short_names: &[],
        subresources: &[],
        review: false,
    },
    Resource {
        group: "batch",
        version: "v1",
        kind: "Job",
        plural: "jobs",
        singular: "job",
        namespaced: true,
        short_names: &[],
        subresources: &["status"],
        review: false,
    },
    // The service ranges (the default "kubernetes" one from --service-cluster-ip-range, more
    // added at run time) and the allocator's record of every cluster IP, as in Kubernetes 1.33.
    with_subresources(
        grouped("networking.k8s.io", "ServiceCIDR", "servicecidrs", false),
        &["status"],
    ),
    Resource {
        short_names: &["ip"],
        ..grouped("networking.k8s.io", "IPAddress", "ipaddresses", false)
    },
    grouped(
        "rbac.authorization.k8s.io",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    grouped(
        "rbac.authorization.k8s.io",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
    grouped("rbac.authorization.k8s.io", "Role", "roles", true),
    grouped(
        "rbac.authorization.k8s.io",
        "RoleBinding",
        "rolebindings",
        true,
    ),
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
    }
}

const fn with_subresources(resource: Resource, subresources: &'static [&'static str]) -> Resource {
    Resource {
        subresources,
        ..resource
    }
}

impl Resource {
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
