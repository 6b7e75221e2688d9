//! The filters that decide whether a pod may run on a node, in kube-scheduler's order and with
//! its reasons word for word: NodeUnschedulable, TaintToleration (readiness included),
//! NodeAffinity (nodeSelector and required affinity), NodePorts, NodeResourcesFit,
//! PodTopologySpread and InterPodAffinity. A node is rejected by the first filter that fails,
//! as in kube-scheduler.

use std::collections::HashSet;

pub use super::framework::{Plugin, Rejection};
use super::{
    cluster::{Cluster, NodeUsage},
    node::{no_schedule, NodeInfo, UNSCHEDULABLE},
    pod::{node_affinity_matches, PodInfo},
    topology_spread::SpreadFilter,
};
use seine_apimachinery::{labels::Labels, scheduling::tolerated};

pub const UNSCHEDULABLE_REASON: &str = "node(s) were unschedulable";
pub const NODE_AFFINITY_REASON: &str = "node(s) didn't match Pod's node affinity/selector";
pub const NODE_PORTS_REASON: &str = "node(s) didn't have free ports for the requested pod ports";
pub const TOO_MANY_PODS_REASON: &str = "Too many pods";
pub const AFFINITY_REASON: &str = "node(s) didn't match pod affinity rules";
pub const ANTI_AFFINITY_REASON: &str = "node(s) didn't match pod anti-affinity rules";
pub const EXISTING_ANTI_AFFINITY_REASON: &str =
    "node(s) didn't satisfy existing pods anti-affinity rules";

type Pair = (String, String);

/// What InterPodAffinity works out once per pod (kube-scheduler's PreFilter state): the
/// topology domains where a running pod's anti-affinity forbids this pod, where pods this pod's
/// affinity wants run, and where pods its anti-affinity shuns run.
#[derive(Debug, Default)]
struct AffinityState {
    existing_anti: HashSet<Pair>,
    affinity: HashSet<Pair>,
    anti: HashSet<Pair>,
    /// No running pod matches the affinity terms, and the pod matches them itself: the first
    /// of a group that wants to be together may go anywhere its topology keys exist.
    first_of_group: bool,
}

/// The filters, prepared for one pod against the cluster.
pub struct Filters<'a> {
    pod: &'a PodInfo,
    spread: Option<SpreadFilter>,
    affinity: Option<AffinityState>,
}

impl<'a> Filters<'a> {
    /// `skip` leaves pods out of the picture (the victims of a preemption dry run).
    pub fn new(pod: &'a PodInfo, cluster: &Cluster, skip: &dyn Fn(&PodInfo) -> bool) -> Self {
        let needed = pod.has_affinity_terms() || cluster.has_pods_with_terms();
        Filters {
            pod,
            spread: SpreadFilter::new(pod, cluster, skip),
            affinity: needed.then(|| affinity_state(pod, cluster, skip)),
        }
    }

    /// Whether the pod may run on `node` with `usage` already there.
    pub fn check(&self, node: &NodeInfo, usage: &NodeUsage) -> Result<(), Rejection> {
        let pod = self.pod;
        if node.unschedulable && !tolerated(&pod.tolerations, &no_schedule(UNSCHEDULABLE)) {
            return Err(Rejection::new(
                Plugin::NodeUnschedulable,
                UNSCHEDULABLE_REASON,
                true,
            ));
        }
        if let Some(taint) = node.taints.iter().find(|t| {
            (t.effect == "NoSchedule" || t.effect == "NoExecute") && !tolerated(&pod.tolerations, t)
        }) {
            let reason = format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key,
                taint.value.as_deref().unwrap_or_default()
            );
            return Err(Rejection::new(Plugin::TaintToleration, reason, true));
        }
        if !node_affinity_matches(pod, node) {
            return Err(Rejection::new(
                Plugin::NodeAffinity,
                NODE_AFFINITY_REASON,
                true,
            ));
        }
        if pod
            .host_ports
            .iter()
            .any(|want| usage.host_ports.iter().any(|used| used.conflicts(want)))
        {
            return Err(Rejection::new(Plugin::NodePorts, NODE_PORTS_REASON, false));
        }
        resources_fit(pod, node, usage)?;
        if let Some(spread) = &self.spread {
            spread.check(node)?;
        }
        if let Some(state) = &self.affinity {
            self.inter_pod_affinity(state, node)?;
        }
        Ok(())
    }

    fn inter_pod_affinity(&self, state: &AffinityState, node: &NodeInfo) -> Result<(), Rejection> {
        let pod = self.pod;
        let mut together = true;
        for term in &pod.required_affinity {
            match node.topology_value(&term.topology_key) {
                Some(v) => {
                    if !state
                        .affinity
                        .contains(&(term.topology_key.clone(), v.to_string()))
                    {
                        together = false;
                    }
                }
                None => {
                    return Err(Rejection::new(
                        Plugin::InterPodAffinity,
                        AFFINITY_REASON,
                        true,
                    ))
                }
            }
        }
        if !together && !state.first_of_group {
            return Err(Rejection::new(
                Plugin::InterPodAffinity,
                AFFINITY_REASON,
                true,
            ));
        }
        for term in &pod.required_anti_affinity {
            if let Some(v) = node.topology_value(&term.topology_key) {
                if state
                    .anti
                    .contains(&(term.topology_key.clone(), v.to_string()))
                {
                    return Err(Rejection::new(
                        Plugin::InterPodAffinity,
                        ANTI_AFFINITY_REASON,
                        false,
                    ));
                }
            }
        }
        if !state.existing_anti.is_empty() {
            let forbidden = state
                .existing_anti
                .iter()
                .any(|(key, value)| node.topology_value(key) == Some(value.as_str()));
            if forbidden {
                return Err(Rejection::new(
                    Plugin::InterPodAffinity,
                    EXISTING_ANTI_AFFINITY_REASON,
                    false,
                ));
            }
        }
        Ok(())
    }
}

fn resources_fit(pod: &PodInfo, node: &NodeInfo, usage: &NodeUsage) -> Result<(), Rejection> {
    let mut reasons = Vec::new();
    let mut unresolvable = false;
    let alloc = &node.allocatable;
    let used = &usage.requested;
    if usage.pod_count() as i64 + 1 > alloc.pods {
        reasons.push(TOO_MANY_PODS_REASON.to_string());
    }
    let req = &pod.requests;
    let mut check = |name: &str, want: i64, have: i64, taken: i64| {
        if want > 0 && want > have.saturating_sub(taken) {
            reasons.push(format!("Insufficient {name}"));
            unresolvable |= want > have;
        }
    };
    check("cpu", req.milli_cpu, alloc.milli_cpu, used.milli_cpu);
    check("memory", req.memory, alloc.memory, used.memory);
    check(
        "ephemeral-storage",
        req.ephemeral_storage,
        alloc.ephemeral_storage,
        used.ephemeral_storage,
    );
    for (name, want) in &req.scalar {
        check(name, *want, alloc.scalar(name), used.scalar(name));
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(Rejection {
            plugin: Plugin::NodeResourcesFit,
            reasons,
            unresolvable,
        })
    }
}

fn affinity_state(
    pod: &PodInfo,
    cluster: &Cluster,
    skip: &dyn Fn(&PodInfo) -> bool,
) -> AffinityState {
    let ns_labels = |ns: &str| -> Option<Labels> { cluster.namespace_labels(ns) };
    let mut state = AffinityState::default();
    for other in cluster.pods_with_terms() {
        if skip(other) || other.key == pod.key {
            continue;
        }
        let Some(node) = other.node_name.as_deref().and_then(|n| cluster.node(n)) else {
            continue;
        };
        for term in &other.required_anti_affinity {
            if term.selects(pod, &ns_labels) {
                if let Some(v) = node.topology_value(&term.topology_key) {
                    state
                        .existing_anti
                        .insert((term.topology_key.clone(), v.to_string()));
                }
            }
        }
    }
    if pod.has_affinity_terms() {
        for other in cluster.assigned_pods() {
            if skip(other) || other.key == pod.key {
                continue;
            }
            let Some(node) = other.node_name.as_deref().and_then(|n| cluster.node(n)) else {
                continue;
            };
            let all = !pod.required_affinity.is_empty()
                && pod
                    .required_affinity
                    .iter()
                    .all(|t| t.selects(other, &ns_labels));
            if all {
                for term in &pod.required_affinity {
                    if let Some(v) = node.topology_value(&term.topology_key) {
                        state
                            .affinity
                            .insert((term.topology_key.clone(), v.to_string()));
                    }
                }
            }
            for term in &pod.required_anti_affinity {
                if term.selects(other, &ns_labels) {
                    if let Some(v) = node.topology_value(&term.topology_key) {
                        state
                            .anti
                            .insert((term.topology_key.clone(), v.to_string()));
                    }
                }
            }
        }
    }
    state.first_of_group = state.affinity.is_empty()
        && pod
            .required_affinity
            .iter()
            .all(|t| t.selects(pod, &ns_labels));
    state
}
