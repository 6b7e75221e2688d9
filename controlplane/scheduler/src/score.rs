//! Ranking the nodes that passed the filters, with kube-scheduler's default scores and
//! weights: least allocated (1) and balanced allocation (1) of CPU and memory, the spread of a
//! Service's pods across nodes and zones (2, as SelectorSpread computed it), the pod's
//! ScheduleAnyway topology spread constraints (2), PreferNoSchedule taints (3) and preferred
//! node affinity (2). Every score is 0..=100 before its weight.

use super::{
    cluster::{Cluster, NodeUsage},
    framework::MAX_NODE_SCORE,
    node::NodeInfo,
    pod::PodInfo,
    topology_spread,
};
use seine_apimachinery::{
    labels::Selector,
    scheduling::{term_matches, tolerates},
};

const LEAST_ALLOCATED_WEIGHT: i64 = 1;
const BALANCED_ALLOCATION_WEIGHT: i64 = 1;
const SPREAD_WEIGHT: i64 = 2;
const TOPOLOGY_SPREAD_WEIGHT: i64 = 2;
const TAINT_WEIGHT: i64 = 3;
const NODE_AFFINITY_WEIGHT: i64 = 2;
const ZONE: &str = "topology.kubernetes.io/zone";
/// How much the zone counts against the node in the spread score (SelectorSpread's 2/3).
const ZONE_WEIGHTING: f64 = 2.0 / 3.0;

fn least_requested(requested: i64, capacity: i64) -> i64 {
    if capacity <= 0 || requested > capacity {
        return 0;
    }
    (capacity - requested) * MAX_NODE_SCORE / capacity
}

fn least_allocated(pod: &PodInfo, node: &NodeInfo, usage: &NodeUsage) -> i64 {
    let cpu = least_requested(
        usage.non_zero_milli_cpu + pod.non_zero_milli_cpu,
        node.allocatable.milli_cpu,
    );
    let memory = least_requested(
        usage.non_zero_memory + pod.non_zero_memory,
        node.allocatable.memory,
    );
    (cpu + memory) / 2
}

fn balanced_allocation(pod: &PodInfo, node: &NodeInfo, usage: &NodeUsage) -> i64 {
    let fraction = |requested: i64, capacity: i64| {
        (capacity > 0).then(|| (requested as f64 / capacity as f64).min(1.0))
    };
    let cpu = fraction(
        usage.requested.milli_cpu + pod.requests.milli_cpu,
        node.allocatable.milli_cpu,
    );
    let memory = fraction(
        usage.requested.memory + pod.requests.memory,
        node.allocatable.memory,
    );
    let std = match (cpu, memory) {
        (Some(c), Some(m)) => ((c - m) / 2.0).abs(),
        _ => 0.0,
    };
    ((1.0 - std) * MAX_NODE_SCORE as f64) as i64
}

/// Pods of the same Services as `pod` on each node, and the spread score from those counts.
fn spread(pod: &PodInfo, nodes: &[(&NodeInfo, &NodeUsage)], cluster: &Cluster) -> Vec<i64> {
    let selectors: Vec<&Selector> = cluster.service_selectors(pod);
    if selectors.is_empty() {
        return vec![MAX_NODE_SCORE; nodes.len()];
    }
    let counts: Vec<i64> = nodes
        .iter()
        .map(|(_, usage)| {
            usage
                .pods
                .iter()
                .filter_map(|k| cluster.pod(k))
                .filter(|p| {
                    p.key.namespace == pod.key.namespace
                        && !p.deleting
                        && selectors.iter().all(|s| s.matches(&p.labels))
                })
                .count() as i64
        })
        .collect();
    let max = counts.iter().copied().max().unwrap_or(0);
    let mut by_zone: std::collections::HashMap<&str, i64> = Default::default();
    for ((node, _), count) in nodes.iter().zip(&counts) {
        if let Some(zone) = node.labels.get(ZONE) {
            *by_zone.entry(zone.as_str()).or_default() += count;
        }
    }
    let max_zone = by_zone.values().copied().max().unwrap_or(0);
    nodes
        .iter()
        .zip(&counts)
        .map(|((node, _), count)| {
            let mut score = if max > 0 {
                MAX_NODE_SCORE as f64 * (max - count) as f64 / max as f64
            } else {
                MAX_NODE_SCORE as f64
            };
            if !by_zone.is_empty() {
                if let Some(zone) = node.labels.get(ZONE) {
                    let zone_score = if max_zone > 0 {
                        MAX_NODE_SCORE as f64 * (max_zone - by_zone[zone.as_str()]) as f64
                            / max_zone as f64
                    } else {
                        MAX_NODE_SCORE as f64
                    };
                    score = score * (1.0 - ZONE_WEIGHTING) + ZONE_WEIGHTING * zone_score;
                }
            }
            score as i64
        })
        .collect()
}

/// kube-scheduler's DefaultNormalizeScore: scales to 0..=100 by the highest, reversed when
/// fewer is better.
fn normalize(scores: &mut [i64], reverse: bool) {
    let max = scores.iter().copied().max().unwrap_or(0);
    for s in scores.iter_mut() {
        *s = if max == 0 {
            if reverse {
                MAX_NODE_SCORE
            } else {
                0
            }
        } else {
            let scaled = MAX_NODE_SCORE * *s / max;
            if reverse {
                MAX_NODE_SCORE - scaled
            } else {
                scaled
            }
        };
    }
}

fn prefer_no_schedule(pod: &PodInfo, node: &NodeInfo) -> i64 {
    node.taints
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule")
        .filter(|t| {
            !pod.tolerations.iter().any(|tol| {
                matches!(
                    tol.effect.as_deref(),
                    None | Some("") | Some("PreferNoSchedule")
                ) && tolerates(tol, t)
            })
        })
        .count() as i64
}

fn preferred_affinity(pod: &PodInfo, node: &NodeInfo) -> i64 {
    pod.preferred_node_affinity
        .iter()
        .filter(|(_, term)| term_matches(term, &node.name, &node.labels))
        .map(|(weight, _)| *weight as i64)
        .sum()
}

/// The total weighted score of each node, in the order given.
pub fn scores(pod: &PodInfo, nodes: &[(&NodeInfo, &NodeUsage)], cluster: &Cluster) -> Vec<i64> {
    let mut taints: Vec<i64> = nodes
        .iter()
        .map(|(n, _)| prefer_no_schedule(pod, n))
        .collect();
    normalize(&mut taints, true);
    let mut affinity: Vec<i64> = nodes
        .iter()
        .map(|(n, _)| preferred_affinity(pod, n))
        .collect();
    normalize(&mut affinity, false);
    let spread = spread(pod, nodes, cluster);
    let topology_spread = topology_spread::scores(pod, nodes, cluster);
    nodes
        .iter()
        .enumerate()
        .map(|(i, (node, usage))| {
            LEAST_ALLOCATED_WEIGHT * least_allocated(pod, node, usage)
                + BALANCED_ALLOCATION_WEIGHT * balanced_allocation(pod, node, usage)
                + SPREAD_WEIGHT * spread[i]
                + TOPOLOGY_SPREAD_WEIGHT * topology_spread[i]
                + TAINT_WEIGHT * taints[i]
                + NODE_AFFINITY_WEIGHT * affinity[i]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_allocated_and_balanced_allocation_follow_kube_scheduler() {
        assert_eq!(least_requested(250, 1000), 75);
        assert_eq!(least_requested(2000, 1000), 0);
        assert_eq!(least_requested(1, 0), 0);
        let mut s = vec![0, 2, 4];
        normalize(&mut s, true);
        assert_eq!(s, vec![100, 50, 0]);
        let mut zero = vec![0, 0];
        normalize(&mut zero, false);
        assert_eq!(zero, vec![0, 0]);

        // BalancedAllocation: with two resources kube's std is |cpu - memory| / 2 and the
        // score (1 - std) * 100. Half the CPU and no memory: std 0.25, score 75.
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "status": {"allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"}}
        }))
        .unwrap();
        let node = NodeInfo::from_node(&node);
        let pod = |resources: serde_json::Value| {
            let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "ns"},
                "spec": {"containers": [{"name": "c", "resources": {"requests": resources}}]}
            }))
            .unwrap();
            PodInfo::from_pod(&pod)
        };
        let idle = NodeUsage::default();
        let half_cpu = pod(serde_json::json!({"cpu": "1"}));
        assert_eq!(balanced_allocation(&half_cpu, &node, &idle), 75);
        // Half of each: std 0, score 100.
        let half_each = pod(serde_json::json!({"cpu": "1", "memory": "2Gi"}));
        assert_eq!(balanced_allocation(&half_each, &node, &idle), 100);
        // What is already on the node counts: all the CPU and half the memory, std 0.25.
        let mut busy = NodeUsage::default();
        busy.requested.milli_cpu = 1000;
        assert_eq!(balanced_allocation(&half_each, &node, &busy), 75);
    }
}
