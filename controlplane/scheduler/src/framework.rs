//! The scheduling framework's shared vocabulary: which plugin turned a node down and why, and
//! the score scale. Filters, scores and the queue import it; it imports none of them.

/// The filter (kube-scheduler's plugin) that turned a node down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plugin {
    NodeUnschedulable,
    TaintToleration,
    NodeAffinity,
    NodePorts,
    NodeResourcesFit,
    PodTopologySpread,
    InterPodAffinity,
}

/// Why a node cannot take the pod. `unresolvable` when evicting pods would not help either
/// (kube-scheduler's UnschedulableAndUnresolvable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub plugin: Plugin,
    pub reasons: Vec<String>,
    pub unresolvable: bool,
}

impl Rejection {
    pub fn new(plugin: Plugin, reason: impl Into<String>, unresolvable: bool) -> Self {
        Rejection {
            plugin,
            reasons: vec![reason.into()],
            unresolvable,
        }
    }
}

/// The highest score a score plugin gives a node (kube-scheduler's MaxNodeScore).
pub const MAX_NODE_SCORE: i64 = 100;
