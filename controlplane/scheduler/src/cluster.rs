//! The scheduler's cache of the cluster: Nodes, what the pods assigned to each one take
//! (requests, host ports), Services' selectors and namespaces' labels. A pod the scheduler has
//! just bound is *assumed* on its node at once, so the next decision sees it before the watch
//! does; a bind that fails forgets it again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, LazyLock},
};

use super::{
    node::NodeInfo,
    pod::{HostPort, PodInfo, PodKey},
};
use seine_apimachinery::{
    labels::{Labels, Selector},
    quantity::Resources,
};

/// What the pods on one node take.
#[derive(Debug, Default, Clone)]
pub struct NodeUsage {
    pub requested: Resources,
    pub non_zero_milli_cpu: i64,
    pub non_zero_memory: i64,
    pub pods: BTreeSet<PodKey>,
    pub host_ports: Vec<HostPort>,
}

impl NodeUsage {
    fn add(&mut self, pod: &PodInfo) {
        self.requested.add(&pod.requests);
        self.non_zero_milli_cpu += pod.non_zero_milli_cpu;
        self.non_zero_memory += pod.non_zero_memory;
        self.pods.insert(pod.key.clone());
        self.host_ports.extend(pod.host_ports.iter().cloned());
    }

    pub fn remove(&mut self, pod: &PodInfo) {
        self.requested.subtract(&pod.requests);
        self.non_zero_milli_cpu -= pod.non_zero_milli_cpu;
        self.non_zero_memory -= pod.non_zero_memory;
        self.pods.remove(&pod.key);
        for port in &pod.host_ports {
            if let Some(i) = self.host_ports.iter().position(|p| p == port) {
                self.host_ports.swap_remove(i);
            }
        }
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }
}

static NO_USAGE: LazyLock<NodeUsage> = LazyLock::new(NodeUsage::default);

/// How an assigned pod's arrival changed the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodChange {
    Added,
    /// Already known; whether its labels (which affinity terms select on) changed.
    Updated {
        labels_changed: bool,
    },
}

#[derive(Debug, Default)]
pub struct Cluster {
    nodes: BTreeMap<String, NodeInfo>,
    /// By node name; a pod may name a node the cache has not seen yet.
    usage: HashMap<String, NodeUsage>,
    /// Pods assigned to a node (bound, or assumed).
    pods: HashMap<PodKey, Arc<PodInfo>>,
    /// Bound by this scheduler, not yet seen bound through the watch.
    assumed: HashSet<PodKey>,
    /// Assigned pods with required (anti-)affinity terms, which every decision consults.
    with_terms: BTreeSet<PodKey>,
    /// Services' selectors by (namespace, name).
    services: BTreeMap<(String, String), Selector>,
    namespaces: HashMap<String, Labels>,
}

impl Cluster {
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn usage(&self, node: &str) -> &NodeUsage {
        self.usage.get(node).unwrap_or(&NO_USAGE)
    }

    /// Adds or replaces a node; true when something scheduling reads changed.
    pub fn set_node(&mut self, node: NodeInfo) -> bool {
        match self.nodes.get(&node.name) {
            Some(old) if *old == node => false,
            _ => {
                self.nodes.insert(node.name.clone(), node);
                true
            }
        }
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    pub fn replace_nodes(&mut self, nodes: Vec<NodeInfo>) {
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
    }

    pub fn pod(&self, key: &PodKey) -> Option<&Arc<PodInfo>> {
        self.pods.get(key)
    }

    pub fn assigned_pods(&self) -> impl Iterator<Item = &Arc<PodInfo>> {
        self.pods.values()
    }

    pub fn pods_with_terms(&self) -> impl Iterator<Item = &Arc<PodInfo>> {
        self.with_terms.iter().filter_map(|k| self.pods.get(k))
    }

    pub fn has_pods_with_terms(&self) -> bool {
        !self.with_terms.is_empty()
    }

    pub fn is_assumed(&self, key: &PodKey) -> bool {
        self.assumed.contains(key)
    }

    /// Records a pod the watch shows on a node (confirming it if it was assumed).
    pub fn set_assigned(&mut self, pod: Arc<PodInfo>) -> PodChange {
        self.assumed.remove(&pod.key);
        let change = match self.remove_assigned(&pod.key) {
            Some(old) => PodChange::Updated {
                labels_changed: old.labels != pod.labels,
            },
            None => PodChange::Added,
        };
        self.insert(pod);
        change
    }

    fn insert(&mut self, pod: Arc<PodInfo>) {
        let Some(node) = pod.node_name.clone() else {
            return;
        };
        self.usage.entry(node).or_default().add(&pod);
        if pod.has_affinity_terms() {
            self.with_terms.insert(pod.key.clone());
        }
        self.pods.insert(pod.key.clone(), pod);
    }

    /// Removes an assigned pod (deleted, finished, or a forgotten assumption).
    fn remove_assigned(&mut self, key: &PodKey) -> Option<Arc<PodInfo>> {
        let pod = self.pods.remove(key)?;
        self.with_terms.remove(key);
        if let Some(node) = &pod.node_name {
            if let Some(usage) = self.usage.get_mut(node) {
                usage.remove(&pod);
                if usage.pods.is_empty() {
                    self.usage.remove(node);
                }
            }
        }
        Some(pod)
    }

    /// Places `pod` on `node` in the cache ahead of the watch.
    pub fn assume(&mut self, pod: &PodInfo, node: &str) {
        let mut placed = pod.clone();
        placed.node_name = Some(node.to_string());
        self.remove_assigned(&pod.key);
        self.insert(Arc::new(placed));
        self.assumed.insert(pod.key.clone());
    }

    /// Undoes `assume` after a failed bind.
    pub fn forget(&mut self, key: &PodKey) {
        if self.assumed.remove(key) {
            self.remove_assigned(key);
        }
    }

    /// Drops the assumption for a pod that is gone.
    pub fn delete_pod(&mut self, key: &PodKey) -> Option<Arc<PodInfo>> {
        self.assumed.remove(key);
        self.remove_assigned(key)
    }

    /// Replaces every assigned pod with a fresh listing, keeping assumptions the listing may
    /// predate (their binds are in flight or not yet visible).
    pub fn replace_assigned(&mut self, pods: Vec<Arc<PodInfo>>) {
        let kept: Vec<Arc<PodInfo>> = self
            .assumed
            .iter()
            .filter_map(|k| self.pods.get(k).cloned())
            .collect();
        self.pods.clear();
        self.usage.clear();
        self.with_terms.clear();
        let listed: HashSet<PodKey> = pods.iter().map(|p| p.key.clone()).collect();
        for pod in pods {
            self.assumed.remove(&pod.key);
            self.insert(pod);
        }
        for pod in kept {
            if !listed.contains(&pod.key) {
                self.insert(pod);
            }
        }
        let pods = &self.pods;
        self.assumed.retain(|k| pods.contains_key(k));
    }

    pub fn set_service(&mut self, namespace: &str, name: &str, selector: Selector) {
        self.services
            .insert((namespace.to_string(), name.to_string()), selector);
    }

    pub fn remove_service(&mut self, namespace: &str, name: &str) {
        self.services
            .remove(&(namespace.to_string(), name.to_string()));
    }

    pub fn replace_services(&mut self, services: Vec<(String, String, Selector)>) {
        self.services = services
            .into_iter()
            .map(|(ns, name, s)| ((ns, name), s))
            .collect();
    }

    /// The selectors of the Services in the pod's namespace that select it.
    pub fn service_selectors(&self, pod: &PodInfo) -> Vec<&Selector> {
        let ns = pod.key.namespace.clone();
        self.services
            .range((ns.clone(), String::new())..)
            .take_while(|((n, _), _)| *n == ns)
            .map(|(_, s)| s)
            .filter(|s| s.matches(&pod.labels))
            .collect()
    }

    /// Sets a namespace's labels; true when they changed.
    pub fn set_namespace(&mut self, name: &str, labels: Labels) -> bool {
        self.namespaces.insert(name.to_string(), labels.clone()) != Some(labels)
    }

    pub fn remove_namespace(&mut self, name: &str) {
        self.namespaces.remove(name);
    }

    pub fn replace_namespaces(&mut self, namespaces: Vec<(String, Labels)>) {
        self.namespaces = namespaces.into_iter().collect();
    }

    pub fn namespace_labels(&self, name: &str) -> Option<Labels> {
        self.namespaces.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(name: &str, node: Option<&str>, cpu: &str) -> Arc<PodInfo> {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}],
                     "resources": {"requests": {"cpu": cpu}}}]}
        }))
        .unwrap();
        Arc::new(PodInfo::from_pod(&pod))
    }

    #[test]
    fn assumed_pods_count_until_forgotten_or_confirmed() {
        let mut c = Cluster::default();
        c.set_assigned(pod("a", Some("n1"), "500m"));
        let p = pod("b", None, "250m");
        c.assume(&p, "n1");
        assert_eq!(c.usage("n1").requested.milli_cpu, 750);
        assert_eq!(c.usage("n1").host_ports.len(), 2);
        assert!(c.is_assumed(&p.key));
        c.forget(&p.key);
        assert_eq!(c.usage("n1").requested.milli_cpu, 500);
        assert_eq!(c.usage("n1").host_ports.len(), 1);

        c.assume(&p, "n2");
        // A relist from before the bind keeps the assumption; the watch confirms it later.
        c.replace_assigned(vec![pod("a", Some("n1"), "500m")]);
        assert_eq!(c.usage("n2").requested.milli_cpu, 250);
        assert_eq!(
            c.set_assigned(pod("b", Some("n2"), "250m")),
            PodChange::Updated {
                labels_changed: false
            }
        );
        assert!(!c.is_assumed(&p.key));
        c.forget(&p.key);
        assert_eq!(
            c.usage("n2").pod_count(),
            1,
            "a confirmed pod is not forgotten"
        );
        c.delete_pod(&p.key);
        assert_eq!(c.usage("n2").pod_count(), 0);
    }
}
