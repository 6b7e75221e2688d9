//! What the scheduler reads of a Pod, parsed once per change: its requests (as the kubelet will
//! account them), host ports, tolerations, node selector and affinity, topology spread
//! constraints, and whether it is this scheduler's to place.

use std::{
    collections::BTreeSet,
    fmt,
    hash::{DefaultHasher, Hash as _, Hasher as _},
};

use k8s_openapi::api::core::v1::{
    Container, NodeSelectorTerm, Pod, PodAffinityTerm, PodSpec, Toleration,
};

use k8s_openapi::api::core::v1::TopologySpreadConstraint;

use seine_apimachinery::{
    labels::{Labels, Requirement, Selector},
    quantity::{milli_value, Resources},
    scheduling::{term_matches, tolerated},
};

use super::node::NodeInfo;

/// kube-scheduler's stand-ins for a container that requests no CPU or memory, used only to
/// score (100 millicores, 200 MiB), so that empty pods still spread.
pub const DEFAULT_MILLI_CPU_REQUEST: i64 = 100;
pub const DEFAULT_MEMORY_REQUEST: i64 = 200 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
}

impl PodKey {
    pub fn of(pod: &Pod) -> Self {
        PodKey {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A host port a pod takes on its node. An empty host IP is every address (`0.0.0.0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub ip: String,
    pub protocol: String,
    pub port: i32,
}

impl HostPort {
    /// Whether two pods asking for these could not share a node.
    pub fn conflicts(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || self.ip == "0.0.0.0" || other.ip == "0.0.0.0")
    }
}

/// Which namespaces an affinity term looks at: those listed, plus those its namespace
/// selector picks (an empty selector: all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    pub names: BTreeSet<String>,
    pub selector: Option<Selector>,
}

/// One required pod (anti-)affinity term, its selector completed from `matchLabelKeys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffinityTerm {
    pub selector: Selector,
    pub namespaces: Namespaces,
    pub topology_key: String,
}

impl AffinityTerm {
    fn parse(term: &PodAffinityTerm, namespace: &str, labels: &Labels) -> Self {
        let mut selector = Selector::from_label_selector(term.label_selector.as_ref());
        for key in term.match_label_keys.iter().flatten() {
            if let Some(v) = labels.get(key) {
                selector.push(Requirement::In(key.clone(), vec![v.clone()]));
            }
        }
        for key in term.mismatch_label_keys.iter().flatten() {
            if let Some(v) = labels.get(key) {
                selector.push(Requirement::NotIn(key.clone(), vec![v.clone()]));
            }
        }
        let mut names: BTreeSet<String> = term.namespaces.iter().flatten().cloned().collect();
        let ns_selector = term
            .namespace_selector
            .as_ref()
            .map(|s| Selector::from_label_selector(Some(s)));
        if names.is_empty() && ns_selector.is_none() {
            names.insert(namespace.to_string());
        }
        AffinityTerm {
            selector,
            namespaces: Namespaces {
                names,
                selector: ns_selector,
            },
            topology_key: term.topology_key.clone(),
        }
    }

    /// Whether `pod` is one of the pods this term is about; `ns_labels` gives a namespace's
    /// labels for namespace selectors.
    pub fn selects(&self, pod: &PodInfo, ns_labels: &dyn Fn(&str) -> Option<Labels>) -> bool {
        let in_namespace = self.namespaces.names.contains(&pod.key.namespace)
            || self.namespaces.selector.as_ref().is_some_and(|s| {
                s.is_everything()
                    || ns_labels(&pod.key.namespace).is_some_and(|labels| s.matches(&labels))
            });
        in_namespace && self.selector.matches(&pod.labels)
    }
}

/// The PodScheduled condition as the pod carries it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScheduledCondition {
    pub status: String,
    pub reason: String,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct PodInfo {
    pub key: PodKey,
    pub uid: String,
    pub resource_version: String,
    pub labels: Labels,
    pub node_name: Option<String>,
    pub scheduler_name: String,
    pub priority: i32,
    pub preemption_never: bool,
    /// Being deleted (it still holds its node's resources until it is gone).
    pub deleting: bool,
    /// Succeeded or Failed: it holds nothing any more.
    pub terminal: bool,
    /// Scheduling gates not yet removed.
    pub gated: bool,
    pub requests: Resources,
    /// CPU and memory requests with kube-scheduler's defaults for containers without one.
    pub non_zero_milli_cpu: i64,
    pub non_zero_memory: i64,
    pub host_ports: Vec<HostPort>,
    pub tolerations: Vec<Toleration>,
    pub node_selector: Labels,
    pub required_node_affinity: Option<Vec<NodeSelectorTerm>>,
    pub preferred_node_affinity: Vec<(i32, NodeSelectorTerm)>,
    pub required_affinity: Vec<AffinityTerm>,
    pub required_anti_affinity: Vec<AffinityTerm>,
    pub topology_spread: Vec<SpreadConstraint>,
    /// A hash of everything scheduling reads (spec and labels): a status-only change leaves
    /// it as it was. Computed only for pods without a node (0 for bound ones).
    pub fingerprint: u64,
    pub condition: Option<ScheduledCondition>,
    /// Quantities that do not parse; such a pod cannot be placed.
    pub problems: Vec<String>,
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// One container's requests: its limits stand in for requests it does not give, as API
/// defaulting does. Also its CPU and memory with a missing request replaced by the defaults
/// (only those two are set in the second).
fn container_requests(c: &Container, problems: &mut Vec<String>) -> [Resources; 2] {
    let mut r = Resources::default();
    let resources = c.resources.as_ref();
    let requests = resources.and_then(|r| r.requests.as_ref());
    let limits = resources.and_then(|r| r.limits.as_ref());
    let mut names: BTreeSet<&String> = requests.into_iter().flatten().map(|(k, _)| k).collect();
    names.extend(limits.into_iter().flatten().map(|(k, _)| k));
    for name in names {
        let q = requests
            .and_then(|m| m.get(name))
            .or_else(|| limits.and_then(|m| m.get(name)));
        if let Some(q) = q {
            match milli_value(&q.0) {
                Ok(v) => r.set(name, v),
                Err(e) => problems.push(format!("container {}: {name}: {e}", c.name)),
            }
        }
    }
    let has = |n: &str| {
        requests.is_some_and(|m| m.contains_key(n)) || limits.is_some_and(|m| m.contains_key(n))
    };
    let non_zero = Resources {
        milli_cpu: if has("cpu") {
            r.milli_cpu
        } else {
            DEFAULT_MILLI_CPU_REQUEST
        },
        memory: if has("memory") {
            r.memory
        } else {
            DEFAULT_MEMORY_REQUEST
        },
        ..Resources::default()
    };
    [r, non_zero]
}

/// The pod's requests as kube-scheduler computes them: the containers' sum, or more if an
/// init container (with the sidecars started before it) needs more, plus the pod overhead.
/// Both the requests and their non-zero CPU and memory (see `container_requests`).
fn pod_requests(spec: &PodSpec, problems: &mut Vec<String>) -> [Resources; 2] {
    let mut total: [Resources; 2] = Default::default();
    for c in &spec.containers {
        let r = container_requests(c, problems);
        for (t, r) in total.iter_mut().zip(&r) {
            t.add(r);
        }
    }
    let mut sidecars: [Resources; 2] = Default::default();
    let mut init_max: [Resources; 2] = Default::default();
    for c in spec.init_containers.iter().flatten() {
        let r = container_requests(c, problems);
        for (i, r) in r.into_iter().enumerate() {
            if is_sidecar(c) {
                total[i].add(&r);
                sidecars[i].add(&r);
                init_max[i].max_with(&sidecars[i]);
            } else {
                let mut with_sidecars = r;
                with_sidecars.add(&sidecars[i]);
                init_max[i].max_with(&with_sidecars);
            }
        }
    }
    for (t, m) in total.iter_mut().zip(&init_max) {
        t.max_with(m);
    }
    if let Some(overhead) = &spec.overhead {
        match Resources::from_list(overhead) {
            Ok(o) => total.iter_mut().for_each(|t| t.add(&o)),
            Err(e) => problems.push(format!("overhead: {e}")),
        }
    }
    total
}

fn host_ports(spec: &PodSpec) -> Vec<HostPort> {
    let host_network = spec.host_network.unwrap_or(false);
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| is_sidecar(c));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = match p.host_port {
                Some(h) if h > 0 => h,
                _ if host_network && p.container_port > 0 => p.container_port,
                _ => return None,
            };
            let ip = p.host_ip.clone().filter(|ip| !ip.is_empty());
            Some(HostPort {
                ip: ip.unwrap_or_else(|| "0.0.0.0".into()),
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port,
            })
        })
        .collect()
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> Self {
        let key = PodKey::of(pod);
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let default_spec = PodSpec::default();
        let spec = pod.spec.as_ref().unwrap_or(&default_spec);
        let mut problems = Vec::new();
        let [requests, non_zero] = pod_requests(spec, &mut problems);
        let affinity = spec.affinity.as_ref();
        let node_affinity = affinity.and_then(|a| a.node_affinity.as_ref());
        let terms = |list: Option<&Vec<PodAffinityTerm>>| -> Vec<AffinityTerm> {
            list.into_iter()
                .flatten()
                .map(|t| AffinityTerm::parse(t, &key.namespace, &labels))
                .collect()
        };
        let required_affinity = terms(affinity.and_then(|a| a.pod_affinity.as_ref()).and_then(
            |a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            },
        ));
        let required_anti_affinity = terms(
            affinity
                .and_then(|a| a.pod_anti_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                }),
        );
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let condition = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
            .map(|c| ScheduledCondition {
                status: c.status.clone(),
                reason: c.reason.clone().unwrap_or_default(),
                message: c.message.clone().unwrap_or_default(),
            });
        let node_name = spec.node_name.clone().filter(|n| !n.is_empty());
        // Only the queue reads it, and only of pods without a node: bound ones skip the work.
        let fingerprint = node_name.is_none().then(|| {
            let mut hasher = DefaultHasher::new();
            serde_json::to_string(spec)
                .unwrap_or_default()
                .hash(&mut hasher);
            labels.hash(&mut hasher);
            hasher.finish()
        });
        PodInfo {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            resource_version: pod.metadata.resource_version.clone().unwrap_or_default(),
            node_name,
            scheduler_name: spec
                .scheduler_name
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default-scheduler".into()),
            priority: spec.priority.unwrap_or(0),
            preemption_never: spec.preemption_policy.as_deref() == Some("Never"),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            terminal: matches!(phase, Some("Succeeded" | "Failed")),
            gated: spec
                .scheduling_gates
                .as_ref()
                .is_some_and(|g| !g.is_empty()),
            non_zero_milli_cpu: non_zero.milli_cpu,
            non_zero_memory: non_zero.memory,
            requests,
            host_ports: host_ports(spec),
            tolerations: spec.tolerations.clone().unwrap_or_default(),
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_node_affinity: node_affinity
                .and_then(|n| {
                    n.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .map(|s| s.node_selector_terms.clone()),
            preferred_node_affinity: node_affinity
                .and_then(|n| {
                    n.preferred_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .into_iter()
                .flatten()
                .map(|p| (p.weight, p.preference.clone()))
                .collect(),
            required_affinity,
            required_anti_affinity,
            topology_spread: spec
                .topology_spread_constraints
                .iter()
                .flatten()
                .filter_map(|c| SpreadConstraint::parse(c, &labels))
                .collect(),
            fingerprint: fingerprint.unwrap_or(0),
            condition,
            problems,
            labels,
            key,
        }
    }

    /// Whether a scheduler named `scheduler_name` should place this pod now.
    pub fn wants_scheduling_by(&self, scheduler_name: &str) -> bool {
        self.node_name.is_none()
            && !self.deleting
            && !self.terminal
            && !self.gated
            && self.scheduler_name == scheduler_name
    }

    pub fn has_affinity_terms(&self) -> bool {
        !self.required_affinity.is_empty() || !self.required_anti_affinity.is_empty()
    }
}

/// One constraint, its selector completed from `matchLabelKeys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpreadConstraint {
    pub max_skew: i64,
    pub topology_key: String,
    /// `DoNotSchedule` (a filter) rather than `ScheduleAnyway` (a score).
    pub hard: bool,
    pub selector: Selector,
    pub min_domains: i64,
    /// nodeAffinityPolicy: Honor (the default) counts only nodes the pod's node selector and
    /// required node affinity accept.
    pub honor_node_affinity: bool,
    /// nodeTaintsPolicy: Honor counts only nodes whose taints the pod tolerates (default Ignore).
    pub honor_taints: bool,
}

impl SpreadConstraint {
    /// None for a `whenUnsatisfiable` the API does not know (the API server rejects those).
    pub fn parse(c: &TopologySpreadConstraint, pod_labels: &Labels) -> Option<Self> {
        let hard = match c.when_unsatisfiable.as_str() {
            "DoNotSchedule" => true,
            "ScheduleAnyway" => false,
            _ => return None,
        };
        let mut selector = Selector::from_label_selector(c.label_selector.as_ref());
        for key in c.match_label_keys.iter().flatten() {
            if let Some(v) = pod_labels.get(key) {
                selector.push(Requirement::In(key.clone(), vec![v.clone()]));
            }
        }
        Some(SpreadConstraint {
            max_skew: i64::from(c.max_skew),
            topology_key: c.topology_key.clone(),
            hard,
            selector,
            min_domains: i64::from(c.min_domains.unwrap_or(1)),
            honor_node_affinity: c.node_affinity_policy.as_deref() != Some("Ignore"),
            honor_taints: c.node_taints_policy.as_deref() == Some("Honor"),
        })
    }

    /// Whether `node`'s pods count towards this constraint's domains.
    pub fn includes(&self, pod: &PodInfo, node: &NodeInfo) -> bool {
        if self.honor_node_affinity && !node_affinity_matches(pod, node) {
            return false;
        }
        if self.honor_taints {
            let untolerated = node.taints.iter().any(|t| {
                (t.effect == "NoSchedule" || t.effect == "NoExecute")
                    && !tolerated(&pod.tolerations, t)
            });
            if untolerated {
                return false;
            }
        }
        true
    }
}

/// Whether `node` passes the pod's node selector and required node affinity.
pub fn node_affinity_matches(pod: &PodInfo, node: &NodeInfo) -> bool {
    let selector_ok = pod
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v));
    selector_ok
        && pod.required_node_affinity.as_ref().is_none_or(|terms| {
            terms
                .iter()
                .any(|t| term_matches(t, &node.name, &node.labels))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> PodInfo {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "web"}},
            "spec": spec
        }))
        .unwrap();
        PodInfo::from_pod(&pod)
    }

    #[test]
    fn requests_add_containers_and_take_the_largest_init_step() {
        let p = pod(serde_json::json!({
            "containers": [
                {"name": "a", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
                {"name": "b", "resources": {"limits": {"cpu": "200m"}}}
            ],
            "initContainers": [
                {"name": "sidecar", "restartPolicy": "Always",
                 "resources": {"requests": {"cpu": "50m"}}},
                {"name": "setup", "resources": {"requests": {"cpu": "1", "example.com/gpu": "1"}}}
            ],
            "overhead": {"cpu": "10m"}
        }));
        // max(100 + 200 + 50 sidecar, 1000 + 50 sidecar) + 10 overhead.
        assert_eq!(p.requests.milli_cpu, 1060);
        assert_eq!(p.requests.memory, 64 * 1024 * 1024);
        assert_eq!(p.requests.scalar("example.com/gpu"), 1);
        // Container b gets the default memory for scoring.
        assert!(p.non_zero_memory >= 64 * 1024 * 1024 + DEFAULT_MEMORY_REQUEST);
        assert!(p.problems.is_empty());
    }

    #[test]
    fn host_ports_default_to_every_address_and_tcp() {
        let p = pod(serde_json::json!({"containers": [{"name": "a", "ports": [
            {"containerPort": 80, "hostPort": 8080},
            {"containerPort": 53, "hostPort": 53, "protocol": "UDP", "hostIP": "10.0.0.1"},
            {"containerPort": 9090}
        ]}]}));
        assert_eq!(p.host_ports.len(), 2);
        assert_eq!(p.host_ports[0].ip, "0.0.0.0");
        let tcp = HostPort {
            ip: "10.0.0.2".into(),
            protocol: "TCP".into(),
            port: 8080,
        };
        assert!(p.host_ports[0].conflicts(&tcp));
        let udp = HostPort {
            ip: "10.0.0.2".into(),
            protocol: "UDP".into(),
            port: 53,
        };
        assert!(!p.host_ports[1].conflicts(&udp), "another address");
    }

    #[test]
    fn only_unassigned_live_pods_of_this_scheduler_are_to_be_placed() {
        let p = pod(serde_json::json!({"containers": [{"name": "a"}]}));
        assert!(p.wants_scheduling_by("default-scheduler"));
        assert!(!p.wants_scheduling_by("other"));
        let bound = pod(serde_json::json!({"nodeName": "n", "containers": [{"name": "a"}]}));
        assert!(!bound.wants_scheduling_by("default-scheduler"));
        let gated = pod(serde_json::json!({"schedulingGates": [{"name": "g"}],
                                           "containers": [{"name": "a"}]}));
        assert!(!gated.wants_scheduling_by("default-scheduler"));
    }
}
