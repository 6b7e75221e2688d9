//! kube-scheduler's PodTopologySpread plugin for a pod's `topologySpreadConstraints`:
//! `DoNotSchedule` constraints filter nodes by the skew their domain would reach, and
//! `ScheduleAnyway` ones score domains with fewer matching pods higher. Pods are counted from
//! the cache, so pods assumed on a node and not yet bound count as well.

use std::collections::HashMap;

use super::{
    cluster::{Cluster, NodeUsage},
    framework::{Plugin, Rejection, MAX_NODE_SCORE},
    node::{NodeInfo, HOSTNAME},
    pod::{PodInfo, SpreadConstraint},
};
use seine_apimachinery::labels::Selector;

pub const MISSING_LABEL_REASON: &str =
    "node(s) didn't match pod topology spread constraints (missing required label)";
pub const SKEW_REASON: &str = "node(s) didn't match pod topology spread constraints";

/// Whether `node` has every constraint's topology key (nodes without one are left out of the
/// counts altogether, as in kube-scheduler).
fn has_all_keys<'a>(
    node: &NodeInfo,
    mut constraints: impl Iterator<Item = &'a SpreadConstraint>,
) -> bool {
    constraints.all(|c| node.labels.contains_key(&c.topology_key))
}

/// Pods on a node the constraint's selector picks in `namespace`; terminating pods do not
/// count, and an empty selector counts nothing (kube-scheduler's countPodsMatchSelector).
fn count_matching(
    selector: &Selector,
    namespace: &str,
    usage: &NodeUsage,
    cluster: &Cluster,
    skip: &dyn Fn(&PodInfo) -> bool,
) -> i64 {
    if selector.is_everything() {
        return 0;
    }
    usage
        .pods
        .iter()
        .filter_map(|k| cluster.pod(k))
        .filter(|p| {
            !p.deleting && p.key.namespace == namespace && !skip(p) && selector.matches(&p.labels)
        })
        .count() as i64
}

/// The skew the pod would make in a domain holding `count` matching pods, where the smallest
/// eligible domain holds `min` and there are `domains` eligible domains.
pub fn skew(count: i64, self_match: bool, min: i64, domains: usize, min_domains: i64) -> i64 {
    let global_min = if (domains as i64) < min_domains {
        0
    } else {
        min
    };
    count + i64::from(self_match) - global_min
}

/// The `DoNotSchedule` constraints with their matching pods per domain, worked out once per
/// pod (kube-scheduler's PreFilter state).
#[derive(Debug)]
pub struct SpreadFilter {
    constraints: Vec<SpreadConstraint>,
    /// Per constraint: matching pods by topology value, every eligible domain present.
    counts: Vec<HashMap<String, i64>>,
    self_match: Vec<bool>,
}

impl SpreadFilter {
    /// None when the pod has no `DoNotSchedule` constraint. `skip` leaves pods out.
    pub fn new(pod: &PodInfo, cluster: &Cluster, skip: &dyn Fn(&PodInfo) -> bool) -> Option<Self> {
        let constraints: Vec<SpreadConstraint> = pod
            .topology_spread
            .iter()
            .filter(|c| c.hard)
            .cloned()
            .collect();
        if constraints.is_empty() {
            return None;
        }
        let mut counts = vec![HashMap::new(); constraints.len()];
        for node in cluster.nodes() {
            if !has_all_keys(node, constraints.iter()) {
                continue;
            }
            let usage = cluster.usage(&node.name);
            for (c, counts) in constraints.iter().zip(&mut counts) {
                if !c.includes(pod, node) {
                    continue;
                }
                let Some(value) = node.labels.get(&c.topology_key) else {
                    continue;
                };
                let n = count_matching(&c.selector, &pod.key.namespace, usage, cluster, skip);
                *counts.entry(value.clone()).or_insert(0) += n;
            }
        }
        let self_match = constraints
            .iter()
            .map(|c| c.selector.matches(&pod.labels))
            .collect();
        Some(SpreadFilter {
            constraints,
            counts,
            self_match,
        })
    }

    pub fn check(&self, node: &NodeInfo) -> Result<(), Rejection> {
        for (i, c) in self.constraints.iter().enumerate() {
            let Some(value) = node.labels.get(&c.topology_key) else {
                return Err(Rejection::new(
                    Plugin::PodTopologySpread,
                    MISSING_LABEL_REASON,
                    true,
                ));
            };
            let counts = &self.counts[i];
            let min = counts.values().copied().min().unwrap_or(0);
            let count = counts.get(value).copied().unwrap_or(0);
            if skew(count, self.self_match[i], min, counts.len(), c.min_domains) > c.max_skew {
                return Err(Rejection::new(
                    Plugin::PodTopologySpread,
                    SKEW_REASON,
                    false,
                ));
            }
        }
        Ok(())
    }
}

/// kube-scheduler's weight of a constraint's domain count: ln(domains + 2).
fn normalizing_weight(domains: usize) -> f64 {
    ((domains + 2) as f64).ln()
}

/// kube-scheduler's NormalizeScore for this plugin: fewest matching pods score 100; nodes
/// without every topology key (`None`) score 0.
fn normalize(raw: &[Option<i64>]) -> Vec<i64> {
    let valid = raw.iter().flatten().copied();
    let min = valid.clone().min().unwrap_or(0);
    let max = valid.max().unwrap_or(0);
    raw.iter()
        .map(|s| match s {
            None => 0,
            Some(_) if max == 0 => MAX_NODE_SCORE,
            Some(s) => MAX_NODE_SCORE * (max + min - s) / max,
        })
        .collect()
}

/// The `ScheduleAnyway` score (0..=100) of each feasible node, or all 0 when the pod has no
/// such constraint (kube-scheduler skips the plugin then).
pub fn scores(pod: &PodInfo, nodes: &[(&NodeInfo, &NodeUsage)], cluster: &Cluster) -> Vec<i64> {
    let constraints: Vec<&SpreadConstraint> =
        pod.topology_spread.iter().filter(|c| !c.hard).collect();
    if constraints.is_empty() {
        return vec![0; nodes.len()];
    }
    let eligible: Vec<bool> = nodes
        .iter()
        .map(|(n, _)| has_all_keys(n, constraints.iter().copied()))
        .collect();
    // Domains of the feasible nodes; pods are counted over all nodes in them.
    let mut counts: Vec<HashMap<&str, i64>> = vec![HashMap::new(); constraints.len()];
    for ((node, _), _) in nodes.iter().zip(&eligible).filter(|(_, e)| **e) {
        for (c, counts) in constraints.iter().zip(&mut counts) {
            if c.topology_key != HOSTNAME {
                if let Some(v) = node.labels.get(&c.topology_key) {
                    counts.insert(v.as_str(), 0);
                }
            }
        }
    }
    for node in cluster.nodes() {
        if !has_all_keys(node, constraints.iter().copied()) {
            continue;
        }
        let usage = cluster.usage(&node.name);
        for (c, counts) in constraints.iter().zip(&mut counts) {
            if c.topology_key == HOSTNAME || !c.includes(pod, node) {
                continue;
            }
            let Some(count) = node
                .labels
                .get(&c.topology_key)
                .and_then(|v| counts.get_mut(v.as_str()))
            else {
                continue;
            };
            *count += count_matching(&c.selector, &pod.key.namespace, usage, cluster, &|_| false);
        }
    }
    let feasible = eligible.iter().filter(|e| **e).count();
    let weights: Vec<f64> = constraints
        .iter()
        .zip(&counts)
        .map(|(c, counts)| {
            normalizing_weight(if c.topology_key == HOSTNAME {
                feasible
            } else {
                counts.len()
            })
        })
        .collect();
    let raw: Vec<Option<i64>> = nodes
        .iter()
        .zip(&eligible)
        .map(|((node, usage), eligible)| {
            if !eligible {
                return None;
            }
            let mut score = 0.0;
            for (i, c) in constraints.iter().enumerate() {
                let Some(value) = node.labels.get(&c.topology_key) else {
                    continue;
                };
                let count = if c.topology_key == HOSTNAME {
                    count_matching(&c.selector, &pod.key.namespace, usage, cluster, &|_| false)
                } else {
                    counts[i].get(value.as_str()).copied().unwrap_or(0)
                };
                score += count as f64 * weights[i] + (c.max_skew - 1) as f64;
            }
            Some(score.round() as i64)
        })
        .collect();
    normalize(&raw)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::{Node, Pod};
    use serde_json::{json, Value};

    use super::*;
    use crate::placement::{place, Decision};

    fn node(name: &str, zone: Option<&str>) -> NodeInfo {
        let mut labels = json!({"kubernetes.io/hostname": name});
        if let Some(z) = zone {
            labels["topology.kubernetes.io/zone"] = z.into();
        }
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        NodeInfo::from_node(&node)
    }

    fn pod(name: &str, labels: Value, constraints: Value) -> PodInfo {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"containers": [{"name": "c"}], "topologySpreadConstraints": constraints}
        }))
        .unwrap();
        PodInfo::from_pod(&pod)
    }

    fn zone_constraint(when: &str, max_skew: i32) -> Value {
        json!([{"maxSkew": max_skew, "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": when, "labelSelector": {"matchLabels": {"app": "web"}}}])
    }

    fn cluster(zones: &[(&str, Option<&str>)]) -> Cluster {
        let mut c = Cluster::default();
        for (name, zone) in zones {
            c.set_node(node(name, *zone));
        }
        c
    }

    fn place_on(c: &mut Cluster, p: &PodInfo) -> String {
        match place(p, c) {
            Decision::Bind(n) => {
                c.assume(p, &n);
                n
            }
            Decision::Fail(f) => panic!("{} not placed: {}", p.key, f.message),
        }
    }

    fn message(c: &Cluster, p: &PodInfo) -> String {
        match place(p, c) {
            Decision::Fail(f) => f.message,
            Decision::Bind(n) => panic!("placed on {n}"),
        }
    }

    #[test]
    fn skew_counts_the_pod_itself_against_the_global_minimum() {
        assert_eq!(skew(1, true, 0, 2, 1), 2);
        assert_eq!(skew(1, false, 0, 2, 1), 1);
        assert_eq!(skew(2, true, 2, 2, 1), 1);
        // Fewer eligible domains than minDomains: the minimum is taken as 0.
        assert_eq!(skew(2, true, 2, 2, 3), 3);
        assert_eq!(normalizing_weight(0), 2f64.ln());
        assert_eq!(
            normalize(&[Some(0), Some(4), None, Some(2)]),
            vec![100, 0, 0, 50]
        );
        assert_eq!(normalize(&[Some(0), Some(0)]), vec![100, 100]);
    }

    #[test]
    fn do_not_schedule_evens_out_zones_counting_assumed_pods() {
        let mut c = cluster(&[("a1", Some("a")), ("a2", Some("a")), ("b1", Some("b"))]);
        let mut per_zone: HashMap<&str, usize> = HashMap::new();
        for i in 0..4 {
            let p = pod(
                &format!("web-{i}"),
                json!({"app": "web"}),
                zone_constraint("DoNotSchedule", 1),
            );
            let n = place_on(&mut c, &p);
            *per_zone
                .entry(if n == "b1" { "b" } else { "a" })
                .or_default() += 1;
        }
        assert_eq!(per_zone, HashMap::from([("a", 2), ("b", 2)]));

        // Zone b full by a third pod: a fifth pod must go to zone a.
        let extra = pod(
            "web-x",
            json!({"app": "web"}),
            zone_constraint("DoNotSchedule", 1),
        );
        c.assume(&extra, "b1");
        let fifth = pod(
            "web-5",
            json!({"app": "web"}),
            zone_constraint("DoNotSchedule", 1),
        );
        assert_ne!(place_on(&mut c, &fifth), "b1");
        let sixth = pod(
            "web-6",
            json!({"app": "web"}),
            zone_constraint("DoNotSchedule", 0),
        );
        assert_eq!(
            message(&c, &sixth),
            "0/3 nodes are available: 3 node(s) didn't match pod topology spread constraints. \
             preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."
        );
    }

    #[test]
    fn nodes_without_the_key_are_rejected_as_unresolvable() {
        let c = cluster(&[("a1", Some("a")), ("b1", Some("b")), ("n", None)]);
        let p = pod(
            "p",
            json!({"app": "web"}),
            json!([{"maxSkew": 1, "topologyKey": "example.com/rack",
                    "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {}}]),
        );
        assert_eq!(
            message(&c, &p),
            "0/3 nodes are available: 3 node(s) didn't match pod topology spread constraints \
             (missing required label). preemption: 0/3 nodes are available: 3 Preemption is not \
             helpful for scheduling."
        );
        let mut c = c;
        let zoned = pod(
            "z",
            json!({"app": "web"}),
            zone_constraint("DoNotSchedule", 1),
        );
        assert_ne!(place_on(&mut c, &zoned), "n");
    }

    #[test]
    fn min_domains_and_match_label_keys_shape_the_counts() {
        let mut c = cluster(&[("a1", Some("a")), ("b1", Some("b"))]);
        let other = pod("old", json!({"app": "web", "rev": "1"}), json!([]));
        c.assume(&other, "a1");
        c.assume(
            &pod("old-2", json!({"app": "web", "rev": "1"}), json!([])),
            "a1",
        );
        // matchLabelKeys: only pods of the same revision count, so a1's pods do not.
        let keyed = json!([{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}},
            "matchLabelKeys": ["rev"]}]);
        let rev2 = pod("new", json!({"app": "web", "rev": "2"}), keyed);
        let f = SpreadFilter::new(&rev2, &c, &|_| false).unwrap();
        assert!(f.check(c.node("a1").unwrap()).is_ok());
        // minDomains 3 with two zones: the minimum is 0, so one pod per zone at most.
        let min3 = json!([{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}},
            "minDomains": 3}]);
        c.assume(&pod("b-pod", json!({"app": "web"}), json!([])), "b1");
        c.assume(&pod("b-pod-2", json!({"app": "web"}), json!([])), "b1");
        let p = pod("p", json!({"app": "web"}), min3);
        let f = SpreadFilter::new(&p, &c, &|_| false).unwrap();
        let rejection = f.check(c.node("b1").unwrap()).unwrap_err();
        assert_eq!(rejection.reasons, vec![SKEW_REASON.to_string()]);
        assert!(!rejection.unresolvable);
    }

    #[test]
    fn schedule_anyway_prefers_the_emptier_zone() {
        let mut c = cluster(&[("a1", Some("a")), ("a2", Some("a")), ("b1", Some("b"))]);
        for i in 0..2 {
            c.assume(
                &pod(&format!("w{i}"), json!({"app": "web"}), json!([])),
                "b1",
            );
        }
        c.set_assigned(Arc::new({
            let mut p = pod("w-a", json!({"app": "web"}), json!([]));
            p.node_name = Some("a1".into());
            p
        }));
        let p = pod(
            "p",
            json!({"app": "web"}),
            zone_constraint("ScheduleAnyway", 1),
        );
        let nodes: Vec<&NodeInfo> = c.nodes().collect();
        let feasible: Vec<(&NodeInfo, &NodeUsage)> =
            nodes.iter().map(|n| (*n, c.usage(&n.name))).collect();
        // Zone a holds 1, zone b 2; weight ln(4): raw 1 and 3, normalized 100*(3+1-s)/3.
        assert_eq!(scores(&p, &feasible, &c), vec![100, 100, 33]);
        let plain = pod("q", json!({"app": "web"}), json!([]));
        assert_eq!(scores(&plain, &feasible, &c), vec![0, 0, 0]);
    }
}
