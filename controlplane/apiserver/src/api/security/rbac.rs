//! RBAC authorization: Roles, ClusterRoles, RoleBindings and ClusterRoleBindings, read from etcd
//! and kept current from the watch caches, plus the built-in roles and bindings every cluster
//! starts with (for the admin, the nodes and each control-plane component).
//!
//! As in Kubernetes, members of `system:masters` are allowed everything without a lookup.

use std::{collections::HashMap, sync::Arc, time::Duration};

use serde_json::{json, Value};
use tokio::sync::RwLock;
use tracing::{debug, warn};

use crate::api::{http::request_info::RequestInfo, security::auth::User};
use crate::{
    storage::{list_prefix, ObjectKey, Storage, StorageError},
    watch_cache::{Signal, WatchCaches},
};

pub const SUPERUSER_GROUP: &str = "system:masters";

#[derive(Debug, Clone, Default, PartialEq)]
struct Rule {
    verbs: Vec<String>,
    api_groups: Vec<String>,
    resources: Vec<String>,
    resource_names: Vec<String>,
    non_resource_urls: Vec<String>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

impl Rule {
    fn parse(v: &Value) -> Self {
        Rule {
            verbs: strings(&v["verbs"]),
            api_groups: strings(&v["apiGroups"]),
            resources: strings(&v["resources"]),
            resource_names: strings(&v["resourceNames"]),
            non_resource_urls: strings(&v["nonResourceURLs"]),
        }
    }

    fn allows(&self, info: &RequestInfo) -> bool {
        let any = |list: &[String], value: &str| list.iter().any(|v| v == "*" || v == value);
        if !any(&self.verbs, &info.verb) {
            return false;
        }
        if !info.resource_request {
            return self.non_resource_urls.iter().any(|pattern| {
                pattern == "*"
                    || pattern == &info.path
                    || pattern
                        .strip_suffix('*')
                        .is_some_and(|prefix| info.path.starts_with(prefix))
            });
        }
        if !any(&self.api_groups, &info.api_group) {
            return false;
        }
        let combined = if info.subresource.is_empty() {
            info.resource.clone()
        } else {
            format!("{}/{}", info.resource, info.subresource)
        };
        let resource_ok = self.resources.iter().any(|r| {
            r == "*"
                || *r == combined
                || (!info.subresource.is_empty() && *r == format!("*/{}", info.subresource))
                || (info.subresource.is_empty() && r.strip_suffix("/*") == Some(&info.resource))
                || (!info.subresource.is_empty()
                    && r.strip_suffix("/*") == Some(info.resource.as_str()))
        });
        if !resource_ok {
            return false;
        }
        self.resource_names.is_empty()
            || info
                .name
                .as_ref()
                .is_some_and(|n| self.resource_names.contains(n))
    }
}

fn rules_of(role: &Value) -> Vec<Rule> {
    role["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(Rule::parse)
        .collect()
}

#[derive(Debug, Clone)]
struct Subject {
    kind: String,
    name: String,
    namespace: String,
}

impl Subject {
    fn matches(&self, user: &User, binding_namespace: &str) -> bool {
        match self.kind.as_str() {
            "User" => self.name == user.name,
            "Group" => user.groups.contains(&self.name),
            "ServiceAccount" => {
                let ns = if self.namespace.is_empty() {
                    binding_namespace
                } else {
                    &self.namespace
                };
                user.name == format!("system:serviceaccount:{ns}:{}", self.name)
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
struct Binding {
    name: String,
    /// None for ClusterRoleBindings.
    namespace: Option<String>,
    role_kind: String,
    role_name: String,
    subjects: Vec<Subject>,
}

impl Binding {
    fn parse(v: &Value) -> Self {
        let namespace = v["metadata"]["namespace"].as_str().map(str::to_string);
        Binding {
            name: v["metadata"]["name"].as_str().unwrap_or_default().into(),
            role_kind: v["roleRef"]["kind"].as_str().unwrap_or_default().into(),
            role_name: v["roleRef"]["name"].as_str().unwrap_or_default().into(),
            subjects: v["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| Subject {
                    kind: s["kind"].as_str().unwrap_or_default().into(),
                    name: s["name"].as_str().unwrap_or_default().into(),
                    namespace: s["namespace"].as_str().unwrap_or_default().into(),
                })
                .collect(),
            namespace,
        }
    }
}

#[derive(Default)]
struct Policy {
    cluster_roles: HashMap<String, Vec<Rule>>,
    roles: HashMap<(String, String), Vec<Rule>>,
    bindings: Vec<Binding>,
}

/// The answer to "may this user do this?", with the reason Kubernetes would give.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: String,
}

pub struct Authorizer {
    policy: RwLock<Policy>,
}

impl Authorizer {
    pub fn new() -> Arc<Self> {
        Arc::new(Authorizer {
            policy: RwLock::new(Policy::default()),
        })
    }

    pub async fn authorize(&self, user: &User, info: &RequestInfo) -> Decision {
        if user.groups.iter().any(|g| g == SUPERUSER_GROUP) {
            return Decision {
                allowed: true,
                reason: String::new(),
            };
        }
        let policy = self.policy.read().await;
        for binding in &policy.bindings {
            // A RoleBinding grants only inside its namespace.
            if let Some(ns) = &binding.namespace {
                if info.namespace.as_deref() != Some(ns.as_str()) {
                    continue;
                }
            }
            let binding_ns = binding.namespace.as_deref().unwrap_or_default();
            if !binding.subjects.iter().any(|s| s.matches(user, binding_ns)) {
                continue;
            }
            let rules = match (binding.role_kind.as_str(), &binding.namespace) {
                ("ClusterRole", _) => policy.cluster_roles.get(&binding.role_name),
                ("Role", Some(ns)) => policy.roles.get(&(ns.clone(), binding.role_name.clone())),
                _ => None,
            };
            if rules.is_some_and(|rules| rules.iter().any(|r| r.allows(info))) {
                let kind = if binding.namespace.is_some() {
                    "RoleBinding"
                } else {
                    "ClusterRoleBinding"
                };
                return Decision {
                    allowed: true,
                    reason: format!(
                        "RBAC: allowed by {kind} \"{}\" of {} \"{}\" to {}",
                        binding.name, binding.role_kind, binding.role_name, user.name
                    ),
                };
            }
        }
        Decision {
            allowed: false,
            reason: String::new(),
        }
    }

    /// Refuses (with the first rule not covered) to let `user` grant, in a Role or ClusterRole
    /// (`namespace`: where it applies), what the user may not do: RBAC's escalation check.
    pub async fn confirm_no_escalation(
        &self,
        user: &User,
        namespace: Option<&str>,
        rules: &[Value],
    ) -> Result<(), String> {
        let rules: Vec<Rule> = rules.iter().map(Rule::parse).collect();
        self.confirm_covered(user, namespace, &rules).await
    }

    /// Refuses to let `user` bind a role it does not hold every rule of, unless it may `bind` it.
    pub async fn confirm_may_bind(
        &self,
        user: &User,
        namespace: Option<&str>,
        role_kind: &str,
        role_name: &str,
    ) -> Result<(), String> {
        let (resource, role_ns) = match role_kind {
            "ClusterRole" => ("clusterroles", None),
            _ => ("roles", namespace.map(str::to_string)),
        };
        let bind = RequestInfo {
            resource_request: true,
            verb: "bind".into(),
            api_group: "rbac.authorization.k8s.io".into(),
            namespace: namespace.map(str::to_string),
            resource: resource.into(),
            name: Some(role_name.to_string()),
            ..Default::default()
        };
        if self.authorize(user, &bind).await.allowed {
            return Ok(());
        }
        let rules = {
            let policy = self.policy.read().await;
            match role_ns {
                None => policy.cluster_roles.get(role_name).cloned(),
                Some(ns) => policy.roles.get(&(ns, role_name.to_string())).cloned(),
            }
        };
        // A role that does not exist (yet) grants nothing: binding it escalates nothing.
        match rules {
            Some(rules) => self.confirm_covered(user, namespace, &rules).await,
            None => Ok(()),
        }
    }

    async fn confirm_covered(
        &self,
        user: &User,
        namespace: Option<&str>,
        rules: &[Rule],
    ) -> Result<(), String> {
        if user.groups.iter().any(|g| g == SUPERUSER_GROUP) {
            return Ok(());
        }
        for rule in rules {
            for info in atomic_requests(rule, namespace) {
                if !self.authorize(user, &info).await.allowed {
                    return Err(describe_atomic(&info));
                }
            }
        }
        Ok(())
    }

    /// Reads every role and binding from etcd and replaces the policy.
    pub async fn reload(&self, storage: &Storage) -> Result<(), StorageError> {
        let mut policy = Policy::default();
        let list = |resource: &'static str| async move {
            storage
                .list(&list_prefix(resource, None), 0, None, None)
                .await
                .map(|p| p.items)
        };
        for role in list("clusterroles").await? {
            let name = role["metadata"]["name"].as_str().unwrap_or_default();
            policy
                .cluster_roles
                .insert(name.to_string(), rules_of(&role));
        }
        for role in list("roles").await? {
            let ns = role["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = role["metadata"]["name"].as_str().unwrap_or_default();
            policy
                .roles
                .insert((ns.to_string(), name.to_string()), rules_of(&role));
        }
        for resource in ["clusterrolebindings", "rolebindings"] {
            policy
                .bindings
                .extend(list(resource).await?.iter().map(Binding::parse));
        }
        *self.policy.write().await = policy;
        Ok(())
    }

    /// Keeps the policy current: loads it, then reloads whenever an RBAC object changes.
    pub async fn follow(self: Arc<Self>, storage: Storage, caches: Arc<WatchCaches>) {
        const RESOURCES: [&str; 4] = [
            "clusterroles",
            "roles",
            "clusterrolebindings",
            "rolebindings",
        ];
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        for resource in RESOURCES {
            let Some(cache) = caches.get(resource).cloned() else {
                continue;
            };
            let tx = tx.clone();
            let mut receiver = cache.receiver();
            tokio::spawn(async move {
                loop {
                    match receiver.recv().await {
                        Ok(Signal::Event(_) | Signal::Reset) => {
                            let _ = tx.try_send(());
                        }
                        Ok(Signal::Progress(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let _ = tx.try_send(());
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
        }
        drop(tx);
        loop {
            match self.reload(&storage).await {
                Ok(()) => debug!("RBAC policy loaded"),
                Err(e) => {
                    warn!("loading the RBAC policy: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            if rx.recv().await.is_none() {
                return;
            }
        }
    }
}

/// A rule broken into single requests (one verb, group, resource and name each), to check that
/// someone holds all of it. A "*" stays "*": only a "*" of the holder covers it.
fn atomic_requests(rule: &Rule, namespace: Option<&str>) -> Vec<RequestInfo> {
    let mut out = Vec::new();
    for verb in &rule.verbs {
        for url in &rule.non_resource_urls {
            out.push(RequestInfo {
                resource_request: false,
                verb: verb.clone(),
                path: url.clone(),
                ..Default::default()
            });
        }
        for group in &rule.api_groups {
            for resource in &rule.resources {
                let (resource, subresource) = match resource.split_once('/') {
                    Some((r, s)) => (r.to_string(), s.to_string()),
                    None => (resource.clone(), String::new()),
                };
                let names: Vec<Option<String>> = if rule.resource_names.is_empty() {
                    vec![None]
                } else {
                    rule.resource_names.iter().cloned().map(Some).collect()
                };
                for name in names {
                    out.push(RequestInfo {
                        resource_request: true,
                        verb: verb.clone(),
                        api_group: group.clone(),
                        namespace: namespace.map(str::to_string),
                        resource: resource.clone(),
                        subresource: subresource.clone(),
                        name,
                        path: String::new(),
                    });
                }
            }
        }
    }
    out
}

fn describe_atomic(info: &RequestInfo) -> String {
    if !info.resource_request {
        return format!("{{NonResourceURLs:[{}], Verbs:[{}]}}", info.path, info.verb);
    }
    let resource = if info.subresource.is_empty() {
        info.resource.clone()
    } else {
        format!("{}/{}", info.resource, info.subresource)
    };
    format!(
        "{{APIGroups:[\"{}\"], Resources:[\"{resource}\"], Verbs:[\"{}\"]}}",
        info.api_group, info.verb
    )
}

/// The message of a 403, as kube-apiserver words it.
pub fn forbidden_message(user: &User, info: &RequestInfo) -> String {
    if !info.resource_request {
        return format!(
            "forbidden: User \"{}\" cannot {} path \"{}\"",
            user.name, info.verb, info.path
        );
    }
    let resource = if info.subresource.is_empty() {
        info.resource.clone()
    } else {
        format!("{}/{}", info.resource, info.subresource)
    };
    let what = match &info.name {
        Some(name) => format!("{resource} \"{name}\" is forbidden"),
        None => format!("{resource} is forbidden"),
    };
    let scope = match &info.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".to_string(),
    };
    format!(
        "{what}: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\"{scope}",
        user.name, info.verb, info.api_group
    )
}

fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> Value {
    json!({"apiGroups": groups, "resources": resources, "verbs": verbs})
}

const READ: [&str; 3] = ["get", "list", "watch"];
const WRITE: [&str; 8] = [
    "get",
    "list",
    "watch",
    "create",
    "update",
    "patch",
    "delete",
    "deletecollection",
];

/// The built-in ClusterRoles and who they are bound to.
fn default_policy() -> Vec<(Value, Vec<Value>)> {
    let user =
        |name: &str| json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": name});
    let group = |name: &str| json!({"kind": "Group", "apiGroup": "rbac.authorization.k8s.io", "name": name});
    let sa =
        |ns: &str, name: &str| json!({"kind": "ServiceAccount", "namespace": ns, "name": name});
    let namespaced_kinds = [
        "pods",
        "services",
        "endpoints",
        "configmaps",
        "secrets",
        "serviceaccounts",
        "events",
        "endpointslices",
        "leases",
        "jobs",
        "pods/status",
        "services/status",
        "jobs/status",
    ];
    let all_groups = ["", "discovery.k8s.io", "coordination.k8s.io", "batch"];
    vec![
        (
            json!({"name": "cluster-admin", "rules": [
                rule(&["*"], &["*"], &["*"]),
                {"nonResourceURLs": ["*"], "verbs": ["*"]}]}),
            vec![group(SUPERUSER_GROUP)],
        ),
        (
            json!({"name": "admin", "rules": [
                rule(&all_groups, &namespaced_kinds, &WRITE),
                rule(&["rbac.authorization.k8s.io"], &["roles", "rolebindings"], &WRITE),
                rule(&[""], &["serviceaccounts/token"], &["create"])]}),
            vec![],
        ),
        (
            json!({"name": "edit", "rules": [
                rule(&all_groups, &namespaced_kinds, &WRITE),
                rule(&[""], &["serviceaccounts/token"], &["create"])]}),
            vec![],
        ),
        (
            json!({"name": "view", "rules": [
                rule(&all_groups, &["pods", "services", "endpoints", "configmaps", "serviceaccounts",
                                    "events", "endpointslices", "leases", "jobs", "pods/status",
                                    "services/status", "jobs/status"], &READ)]}),
            vec![],
        ),
        (
            json!({"name": "system:discovery", "rules": [
                {"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz",
                                     "/version", "/version/", "/openapi", "/openapi/*"],
                 "verbs": ["get"]}]}),
            vec![group("system:authenticated")],
        ),
        (
            json!({"name": "system:basic-user", "rules": [
                rule(&["authorization.k8s.io"], &["selfsubjectaccessreviews", "selfsubjectrulesreviews"], &["create"]),
                rule(&["authentication.k8s.io"], &["selfsubjectreviews"], &["create"])]}),
            vec![group("system:authenticated")],
        ),
        (
            json!({"name": "system:node", "rules": [
                rule(&[""], &["nodes"], &["get", "list", "watch", "create", "update", "patch", "delete"]),
                rule(&[""], &["nodes/status"], &["get", "update", "patch"]),
                rule(&[""], &["pods"], &["get", "list", "watch", "create", "delete"]),
                rule(&[""], &["pods/status"], &["get", "update", "patch"]),
                rule(&[""], &["services", "endpoints", "namespaces", "configmaps", "secrets"], &READ),
                rule(&["discovery.k8s.io"], &["endpointslices"], &READ),
                rule(&[""], &["events"], &["create", "update", "patch"]),
                rule(&["coordination.k8s.io"], &["leases"], &["get", "list", "watch", "create", "update", "patch", "delete"]),
                rule(&[""], &["serviceaccounts/token"], &["create"])]}),
            vec![group("system:nodes")],
        ),
        (
            json!({"name": "system:kube-scheduler", "rules": [
                rule(&[""], &["pods", "nodes", "namespaces", "services"], &READ),
                rule(&[""], &["pods"], &["delete"]),
                rule(&[""], &["pods/binding", "bindings"], &["create"]),
                rule(&[""], &["pods/status"], &["patch", "update"]),
                rule(&[""], &["events"], &["create", "patch", "update"]),
                rule(&["coordination.k8s.io"], &["leases"], &["get", "list", "watch", "create", "update"])]}),
            vec![user("system:kube-scheduler")],
        ),
        (
            json!({"name": "system:kube-controller-manager", "rules": [
                rule(&all_groups, &["*"], &["*"]),
                rule(&[""], &["namespaces", "namespaces/status", "namespaces/finalize", "nodes", "nodes/status"], &["*"])]}),
            vec![user("system:kube-controller-manager")],
        ),
        (
            json!({"name": "system:seine-dns", "rules": [
                rule(&[""], &["services", "endpoints", "namespaces", "pods"], &READ),
                rule(&["discovery.k8s.io"], &["endpointslices"], &READ)]}),
            vec![user("system:seine-dns"), sa("kube-system", "seine-dns")],
        ),
        (
            json!({"name": "system:seine-agent", "rules": [
                rule(&[""], &["services", "endpoints", "namespaces", "pods", "nodes"], &READ),
                rule(&["discovery.k8s.io"], &["endpointslices"], &READ),
                rule(&[""], &["nodes", "nodes/status"], &["patch", "update"]),
                rule(&[""], &["events"], &["create", "patch"])]}),
            vec![user("system:seine-agent"), sa("kube-system", "seine-agent")],
        ),
    ]
}

/// Creates the built-in ClusterRoles and ClusterRoleBindings that are missing.
pub async fn bootstrap(storage: &Storage) -> Result<(), StorageError> {
    let meta = |name: &str| {
        json!({"name": name, "uid": crate::api::registry::meta::uid(), "creationTimestamp": crate::api::registry::meta::now(),
               "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
               "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}})
    };
    for (role, subjects) in default_policy() {
        let name = role["name"].as_str().unwrap_or_default().to_string();
        let object = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                            "metadata": meta(&name), "rules": role["rules"]});
        match storage
            .create(&ObjectKey::new("clusterroles", None, &name), object)
            .await
        {
            Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        if subjects.is_empty() {
            continue;
        }
        let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": meta(&name),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": subjects});
        match storage
            .create(&ObjectKey::new("clusterrolebindings", None, &name), binding)
            .await
        {
            Ok(_) | Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    fn info(method: Method, path: &str) -> RequestInfo {
        crate::api::http::request_info::parse(&method, path, "")
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_names() {
        let r = Rule::parse(&rule(&[""], &["pods", "pods/status"], &["get", "list"]));
        assert!(r.allows(&info(Method::GET, "/api/v1/namespaces/a/pods/p")));
        assert!(r.allows(&info(Method::GET, "/api/v1/namespaces/a/pods/p/status")));
        assert!(!r.allows(&info(Method::DELETE, "/api/v1/namespaces/a/pods/p")));
        assert!(!r.allows(&info(Method::GET, "/apis/batch/v1/namespaces/a/jobs")));
        assert!(!r.allows(&info(Method::POST, "/api/v1/namespaces/a/pods/p/binding")));
        let named = Rule::parse(&json!({"apiGroups": [""], "resources": ["configmaps"],
                                        "resourceNames": ["x"], "verbs": ["get"]}));
        assert!(named.allows(&info(Method::GET, "/api/v1/namespaces/a/configmaps/x")));
        assert!(!named.allows(&info(Method::GET, "/api/v1/namespaces/a/configmaps/y")));
        let urls = Rule::parse(&json!({"nonResourceURLs": ["/apis/*"], "verbs": ["get"]}));
        assert!(urls.allows(&info(Method::GET, "/apis/batch/v1")));
        assert!(!urls.allows(&info(Method::GET, "/metrics")));
    }

    #[tokio::test]
    async fn bindings_grant_within_their_scope() {
        let authz = Authorizer::new();
        {
            let mut p = authz.policy.write().await;
            p.roles.insert(
                ("team".into(), "reader".into()),
                vec![Rule::parse(&rule(&[""], &["pods"], &READ))],
            );
            p.bindings.push(Binding::parse(&json!({
                "metadata": {"name": "b", "namespace": "team"},
                "roleRef": {"kind": "Role", "name": "reader"},
                "subjects": [{"kind": "User", "name": "alice"},
                             {"kind": "ServiceAccount", "name": "bot"}]})));
        }
        let alice = User {
            name: "alice".into(),
            uid: String::new(),
            groups: vec![],
        };
        let bot = User {
            name: "system:serviceaccount:team:bot".into(),
            uid: String::new(),
            groups: vec![],
        };
        let in_team = info(Method::GET, "/api/v1/namespaces/team/pods");
        let elsewhere = info(Method::GET, "/api/v1/namespaces/other/pods");
        assert!(authz.authorize(&alice, &in_team).await.allowed);
        assert!(authz.authorize(&bot, &in_team).await.allowed);
        assert!(!authz.authorize(&alice, &elsewhere).await.allowed);
        assert!(
            !authz
                .authorize(&alice, &info(Method::GET, "/api/v1/pods"))
                .await
                .allowed
        );
        let root = User {
            name: "root".into(),
            uid: String::new(),
            groups: vec![SUPERUSER_GROUP.into()],
        };
        assert!(authz.authorize(&root, &elsewhere).await.allowed);
        assert_eq!(
            forbidden_message(&alice, &elsewhere),
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"other\""
        );
    }
}
