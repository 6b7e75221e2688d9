//! What the scheduler reads of a Node: allocatable resources, labels, whether it is cordoned,
//! and its taints, to which a node that is not Ready adds the taint the node lifecycle
//! controller would (`node.kubernetes.io/not-ready`, or `unreachable` when its state is
//! Unknown), so that readiness is judged through tolerations as in Kubernetes.

use k8s_openapi::api::core::v1::{Node, Taint};

use seine_apimachinery::{labels::Labels, quantity::Resources};

pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
pub const HOSTNAME: &str = "kubernetes.io/hostname";

#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: Labels,
    pub allocatable: Resources,
    /// Its own taints and the readiness taint, if any.
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    /// An allocatable quantity that does not parse (the node is then taken as empty).
    pub problem: Option<String>,
}

pub(super) fn no_schedule(key: &str) -> Taint {
    Taint {
        key: key.into(),
        value: None,
        effect: "NoSchedule".into(),
        time_added: None,
    }
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let name = node.metadata.name.clone().unwrap_or_default();
        let status = node.status.as_ref();
        let list = status
            .and_then(|s| s.allocatable.as_ref())
            .or_else(|| status.and_then(|s| s.capacity.as_ref()));
        let (allocatable, problem) = match list.map(Resources::from_list) {
            Some(Ok(r)) => (r, None),
            Some(Err(e)) => (Resources::default(), Some(e.to_string())),
            None => (Resources::default(), None),
        };
        let spec = node.spec.as_ref();
        let mut taints = spec.and_then(|s| s.taints.clone()).unwrap_or_default();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.as_str());
        let readiness = match ready {
            Some("True") => None,
            Some("Unknown") => Some(UNREACHABLE),
            // False, or never reported: a kubelet registers its node tainted not-ready.
            _ => Some(NOT_READY),
        };
        if let Some(key) = readiness {
            if !taints.iter().any(|t| t.key == key) {
                taints.push(no_schedule(key));
            }
        }
        NodeInfo {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            allocatable,
            taints,
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            problem,
            name,
        }
    }

    /// The node's value of a topology key. A node without the hostname label (one not
    /// registered by a kubelet) is its own hostname domain.
    pub fn topology_value(&self, key: &str) -> Option<&str> {
        match self.labels.get(key) {
            Some(v) => Some(v),
            None if key == HOSTNAME => Some(&self.name),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(status: serde_json::Value, spec: serde_json::Value) -> NodeInfo {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"}, "spec": spec, "status": status
        }))
        .unwrap();
        NodeInfo::from_node(&node)
    }

    #[test]
    fn readiness_shows_as_the_lifecycle_controllers_taints() {
        let ready = node(
            serde_json::json!({"allocatable": {"cpu": "2", "memory": "1Gi", "pods": "10"},
                               "conditions": [{"type": "Ready", "status": "True"}]}),
            serde_json::json!({}),
        );
        assert!(ready.taints.is_empty());
        assert_eq!(ready.allocatable.milli_cpu, 2000);
        assert_eq!(ready.allocatable.pods, 10);
        let unknown = node(
            serde_json::json!({"conditions": [{"type": "Ready", "status": "Unknown"}]}),
            serde_json::json!({}),
        );
        assert_eq!(unknown.taints[0].key, UNREACHABLE);
        let never = node(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(never.taints[0].key, NOT_READY);
        let tainted = node(
            serde_json::json!({"conditions": [{"type": "Ready", "status": "False"}]}),
            serde_json::json!({"taints": [{"key": NOT_READY, "effect": "NoExecute"}]}),
        );
        assert_eq!(tainted.taints.len(), 1, "not added twice");
        assert_eq!(ready.topology_value(HOSTNAME), Some("n1"));
    }
}
