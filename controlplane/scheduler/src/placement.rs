//! One scheduling decision: filter every node, score those left, take the best (ties broken at
//! random, as kube-scheduler does). When no node is left, the failure is described in
//! kube-scheduler's words: the histogram of reasons over all nodes, then what preemption would
//! make of it (Seine does not preempt, but says what kube-scheduler would have found).

use std::collections::{BTreeMap, HashSet};

use super::{
    cluster::{Cluster, NodeUsage},
    filter::Filters,
    framework::{Plugin, Rejection},
    node::NodeInfo,
    pod::PodInfo,
    score,
};

pub const NO_NODES: &str = "no nodes available to schedule pods";
const NOT_HELPFUL: &str = "Preemption is not helpful for scheduling";
const NO_VICTIMS: &str = "No preemption victims found for incoming pod";

/// Why a pod could not be placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The FailedScheduling event's and the PodScheduled condition's message.
    pub message: String,
    /// The PodScheduled condition's reason: `Unschedulable`, or `SchedulerError`.
    pub reason: &'static str,
    /// The filters that turned nodes down (which cluster changes may help).
    pub plugins: HashSet<Plugin>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Bind(String),
    Fail(Failure),
}

/// "0/N nodes are available: <count> <reason>, ...." with the entries sorted as text.
fn histogram<'a>(nodes: usize, reasons: impl Iterator<Item = &'a str>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in reasons {
        *counts.entry(r).or_default() += 1;
    }
    let mut entries: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
    entries.sort();
    format!("0/{nodes} nodes are available: {}.", entries.join(", "))
}

/// What kube-scheduler's DefaultPreemption reports for a pod no node fits, or None when
/// evicting lower-priority pods would make room (kube-scheduler would preempt; the message
/// then carries no preemption part).
fn preemption(
    pod: &PodInfo,
    cluster: &Cluster,
    rejected: &[(&NodeInfo, Rejection)],
) -> Option<String> {
    if pod.preemption_never {
        return Some("preemption: not eligible due to preemptionPolicy=Never.".into());
    }
    let mut reasons: Vec<String> = Vec::new();
    let mut helps = false;
    for (node, rejection) in rejected {
        if rejection.unresolvable {
            reasons.push(NOT_HELPFUL.into());
            continue;
        }
        let usage = cluster.usage(&node.name);
        let victims: Vec<&PodInfo> = usage
            .pods
            .iter()
            .filter_map(|k| cluster.pod(k))
            .filter(|p| p.priority < pod.priority)
            .map(|p| p.as_ref())
            .collect();
        if victims.is_empty() {
            reasons.push(NO_VICTIMS.into());
            continue;
        }
        let mut without: NodeUsage = usage.clone();
        for v in &victims {
            without.remove(v);
        }
        let name = node.name.as_str();
        let skip = |p: &PodInfo| p.node_name.as_deref() == Some(name) && p.priority < pod.priority;
        match Filters::new(pod, cluster, &skip).check(node, &without) {
            Ok(()) => helps = true,
            Err(r) => reasons.extend(r.reasons),
        }
    }
    if helps {
        return None;
    }
    Some(format!(
        "preemption: {}",
        histogram(rejected.len(), reasons.iter().map(String::as_str))
    ))
}

/// Decides where `pod` goes.
pub fn place(pod: &PodInfo, cluster: &Cluster) -> Decision {
    if !pod.problems.is_empty() {
        return Decision::Fail(Failure {
            message: format!("invalid resource quantities: {}", pod.problems.join("; ")),
            reason: "SchedulerError",
            plugins: HashSet::new(),
        });
    }
    if cluster.node_count() == 0 {
        return Decision::Fail(Failure {
            message: NO_NODES.into(),
            reason: "Unschedulable",
            plugins: HashSet::new(),
        });
    }
    let filters = Filters::new(pod, cluster, &|_| false);
    let mut feasible: Vec<(&NodeInfo, &NodeUsage)> = Vec::new();
    let mut rejected: Vec<(&NodeInfo, Rejection)> = Vec::new();
    for node in cluster.nodes() {
        let usage = cluster.usage(&node.name);
        match filters.check(node, usage) {
            Ok(()) => feasible.push((node, usage)),
            Err(r) => rejected.push((node, r)),
        }
    }
    if feasible.is_empty() {
        let mut message = histogram(
            rejected.len(),
            rejected
                .iter()
                .flat_map(|(_, r)| r.reasons.iter().map(String::as_str)),
        );
        if let Some(p) = preemption(pod, cluster, &rejected) {
            message.push(' ');
            message.push_str(&p);
        }
        return Decision::Fail(Failure {
            message,
            reason: "Unschedulable",
            plugins: rejected.iter().map(|(_, r)| r.plugin).collect(),
        });
    }
    let scores = score::scores(pod, &feasible, cluster);
    let mut best = 0;
    let mut ties = 0u32;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
            ties = 1;
        } else if *s == scores[best] {
            ties += 1;
            if rand::random_range(0..ties) == 0 {
                best = i;
            }
        }
    }
    Decision::Bind(feasible[best].0.name.clone())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{Node, Pod};
    use serde_json::{json, Value};

    use super::*;

    fn node(name: &str, labels: Value, ready: &str, spec: Value) -> NodeInfo {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
            "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": ready}]}
        }))
        .unwrap();
        NodeInfo::from_node(&node)
    }

    fn pod(name: &str, spec: Value) -> PodInfo {
        let mut spec = spec;
        if spec.get("containers").is_none() {
            spec["containers"] = json!([{"name": "c"}]);
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "db"}},
            "spec": spec
        }))
        .unwrap();
        PodInfo::from_pod(&pod)
    }

    fn failure(d: Decision) -> Failure {
        match d {
            Decision::Fail(f) => f,
            Decision::Bind(n) => panic!("placed on {n}"),
        }
    }

    #[test]
    fn the_message_is_kube_schedulers_histogram_with_preemption() {
        let mut c = Cluster::default();
        c.set_node(node("a", json!({"disk": "hdd"}), "True", json!({})));
        c.set_node(node("b", json!({"disk": "ssd"}), "Unknown", json!({})));
        c.set_node(node("c", json!({"disk": "ssd"}), "Unknown", json!({})));
        let p = pod("p", json!({"nodeSelector": {"disk": "ssd"}}));
        assert_eq!(
            failure(place(&p, &c)).message,
            "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
             2 node(s) had untolerated taint {node.kubernetes.io/unreachable: }. preemption: \
             0/3 nodes are available: 3 Preemption is not helpful for scheduling."
        );
        let never = pod(
            "p",
            json!({"nodeSelector": {"disk": "ssd"}, "preemptionPolicy": "Never"}),
        );
        assert!(failure(place(&never, &c))
            .message
            .ends_with(" preemption: not eligible due to preemptionPolicy=Never."));
        assert_eq!(failure(place(&p, &Cluster::default())).message, NO_NODES);
    }

    #[test]
    fn resources_name_each_shortfall_and_whether_eviction_could_help() {
        let mut c = Cluster::default();
        c.set_node(node("a", json!({}), "True", json!({})));
        c.set_node(node("b", json!({}), "True", json!({"unschedulable": true})));
        let big = pod(
            "big",
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "3", "memory": "1Gi"}}}]}),
        );
        assert_eq!(
            failure(place(&big, &c)).message,
            "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) were unschedulable. \
             preemption: 0/2 nodes are available: 2 Preemption is not helpful for scheduling."
        );
        let first = pod(
            "first",
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "1500m"}}}]}),
        );
        assert_eq!(place(&first, &c), Decision::Bind("a".into()));
        c.assume(&first, "a");
        let second = pod(
            "second",
            json!({"containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}),
        );
        assert_eq!(
            failure(place(&second, &c)).message,
            "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) were unschedulable. \
             preemption: 0/2 nodes are available: 1 No preemption victims found for incoming \
             pod, 1 Preemption is not helpful for scheduling."
        );
        // A higher-priority pod could have the first one evicted: no preemption part.
        let urgent = pod(
            "urgent",
            json!({"priority": 1000, "containers": [{"name": "c", "resources": {"requests": {"cpu": "1"}}}]}),
        );
        assert_eq!(
            failure(place(&urgent, &c)).message,
            "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) were unschedulable."
        );
    }

    #[test]
    fn anti_affinity_and_host_ports_keep_pods_apart() {
        let mut c = Cluster::default();
        c.set_node(node(
            "a",
            json!({"kubernetes.io/hostname": "a"}),
            "True",
            json!({}),
        ));
        c.set_node(node(
            "b",
            json!({"kubernetes.io/hostname": "b"}),
            "True",
            json!({}),
        ));
        let anti = json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}]}});
        let mut placed = Vec::new();
        for name in ["db-0", "db-1"] {
            let p = pod(name, json!({"affinity": anti}));
            let Decision::Bind(n) = place(&p, &c) else {
                panic!("{name} not placed")
            };
            c.assume(&p, &n);
            placed.push(n);
        }
        assert_ne!(placed[0], placed[1]);
        let third = pod("db-2", json!({"affinity": anti}));
        assert_eq!(
            failure(place(&third, &c)).message,
            "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules. \
             preemption: 0/2 nodes are available: 2 No preemption victims found for incoming pod."
        );
        let plain = pod("other", json!({}));
        assert!(failure(place(&plain, &c)).message.starts_with(
            "0/2 nodes are available: 2 node(s) didn't satisfy existing pods anti-affinity rules."
        ));

        let ports = json!({"containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}]}]});
        let mut c = Cluster::default();
        c.set_node(node("a", json!({}), "True", json!({})));
        let first = pod("web-0", ports.clone());
        c.set_assigned(Arc::new({
            let mut f = first.clone();
            f.node_name = Some("a".into());
            f
        }));
        assert!(failure(place(&pod("web-1", ports), &c))
            .message
            .starts_with("0/1 nodes are available: 1 node(s) didn't have free ports for the requested pod ports."));
    }

    #[test]
    fn tolerations_and_affinity_open_nodes() {
        let mut c = Cluster::default();
        c.set_node(node(
            "gpu",
            json!({"accel": "gpu"}),
            "True",
            json!({"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}),
        ));
        let p = pod("p", json!({}));
        assert!(failure(place(&p, &c)).message.starts_with(
            "0/1 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}."
        ));
        let tolerant = pod(
            "t",
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [{"key": "accel", "operator": "In", "values": ["gpu"]}]}]}}}}),
        );
        assert_eq!(place(&tolerant, &c), Decision::Bind("gpu".into()));
    }
}
