//! The node lifecycle controller: Nodes heartbeat through their Lease in `kube-node-lease` and
//! their Ready condition. A Node whose heartbeat has not changed for the grace period (as this
//! controller observed it, by its own clock) gets its conditions set to Unknown ("Kubelet stopped
//! posting node status."), its Pods' Ready condition turned False (so their endpoints stop taking
//! traffic), and the `node.kubernetes.io/unreachable` taints; a NotReady Node gets the
//! `node.kubernetes.io/not-ready` taints. Pods on a Node with a NoExecute taint are evicted: at
//! once when they do not tolerate it, after their tolerationSeconds when they do, never when
//! they tolerate it without a limit.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt as _};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{
            Event, EventSource, Node, NodeCondition, ObjectReference, Pod, Taint, Toleration,
        },
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, ResourceExt as _,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;
use seine_apimachinery::scheduling::tolerates;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The conditions a kubelet reports; all turn Unknown when it goes silent.
const CONDITIONS: &[&str] = &["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];

#[derive(Debug, Clone)]
pub struct Config {
    /// `--node-monitor-grace-period`.
    pub grace_period: Duration,
    /// `--node-monitor-period`.
    pub monitor_period: Duration,
}

/// What was last seen of a Node's heartbeats, and when it last changed.
struct Probe {
    lease: Option<String>,
    heartbeat: Option<String>,
    changed: Instant,
}

/// Runs until the watches end for good.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (nodes, nodes_w) = reflector::store::<Node>();
    let (leases, leases_w) = reflector::store::<Lease>();
    let (pods, pods_w) = reflector::store::<Pod>();
    let watches = stream::select_all([
        reflector::reflector(
            nodes_w,
            watcher(Api::<Node>::all(client.clone()), Default::default()).default_backoff(),
        )
        .map(|e| e.map(|_| ()))
        .boxed(),
        reflector::reflector(
            leases_w,
            watcher(
                Api::<Lease>::namespaced(client.clone(), LEASE_NAMESPACE),
                Default::default(),
            )
            .default_backoff(),
        )
        .map(|e| e.map(|_| ()))
        .boxed(),
        reflector::reflector(
            pods_w,
            watcher(Api::<Pod>::all(client.clone()), Default::default()).default_backoff(),
        )
        .map(|e| e.map(|_| ()))
        .boxed(),
    ]);
    let watch = tokio::spawn(async move {
        let mut watches = watches;
        while let Some(e) = watches.next().await {
            if let Err(e) = e {
                warn!("watch: {e}");
            }
        }
    });
    for ready in [
        nodes.wait_until_ready().await,
        leases.wait_until_ready().await,
        pods.wait_until_ready().await,
    ] {
        ready.map_err(|e| anyhow::anyhow!("the watches stopped before listing: {e}"))?;
    }
    info!(
        nodes = nodes.state().len(),
        grace = ?config.grace_period,
        "node lifecycle: watching heartbeats"
    );
    let ctx = Ctx {
        client,
        nodes,
        leases,
        pods,
        config,
    };
    let mut probes: HashMap<String, Probe> = HashMap::new();
    let mut tick = tokio::time::interval(ctx.config.monitor_period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !watch.is_finished() {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        let nodes = ctx.nodes.state();
        probes.retain(|name, _| nodes.iter().any(|n| n.name_any() == *name));
        for node in nodes {
            let ok = ctx.monitor(&node, &mut probes).await;
            if let Err(e) = &ok {
                warn!(node = %node.name_any(), "{e:#}");
            }
            metrics::synced("nodelifecycle", ok.is_ok());
        }
    }
    anyhow::bail!("the watches ended")
}

struct Ctx {
    client: Client,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    config: Config,
}

fn condition<'a>(node: &'a Node, type_: &str) -> Option<&'a NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// When a Pod must leave a Node with these NoExecute taints: `Some(None)` at once, `Some(t)` at
/// `t`, `None` never.
fn eviction_time(pod: &Pod, taints: &[&Taint]) -> Option<Option<Timestamp>> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let mut at: Option<Timestamp> = None;
    for taint in taints {
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        if matching.is_empty() {
            return Some(None);
        }
        // The shortest limit of the tolerations that match (none: tolerated for good).
        let limit = matching.iter().filter_map(|t| t.toleration_seconds).min();
        if let Some(seconds) = limit {
            let added = taint
                .time_added
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now);
            let deadline = added
                .checked_add(jiff_seconds(seconds.max(0)))
                .unwrap_or(added);
            at = Some(at.map_or(deadline, |a: Timestamp| a.min(deadline)));
        }
    }
    at.map(Some)
}

fn jiff_seconds(seconds: i64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(seconds)
}

impl Ctx {
    async fn monitor(
        &self,
        node: &Node,
        probes: &mut HashMap<String, Probe>,
    ) -> anyhow::Result<()> {
        let name = node.name_any();
        let lease = self
            .leases
            .get(&reflector::ObjectRef::new(&name).within(LEASE_NAMESPACE))
            .and_then(|l| {
                l.spec
                    .as_ref()?
                    .renew_time
                    .as_ref()
                    .map(|t| t.0.to_string())
            });
        let heartbeat = condition(node, "Ready")
            .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0.to_string()));
        let probe = probes.entry(name.clone()).or_insert_with(|| Probe {
            lease: lease.clone(),
            heartbeat: heartbeat.clone(),
            changed: Instant::now(),
        });
        if probe.lease != lease || probe.heartbeat != heartbeat {
            probe.lease = lease;
            probe.heartbeat = heartbeat;
            probe.changed = Instant::now();
        }
        let silent = probe.changed.elapsed() > self.config.grace_period;
        let ready = condition(node, "Ready").map(|c| c.status.clone());
        if silent && ready.as_deref() != Some("Unknown") {
            self.mark_unknown(node).await?;
            return Ok(()); // taints follow on the next pass, from the written status
        }
        self.taint(node).await?;
        self.evict(node).await
    }

    /// Ready and the pressure conditions turn Unknown; the Node's Pods turn not ready.
    async fn mark_unknown(&self, node: &Node) -> anyhow::Result<()> {
        let name = node.name_any();
        let existing = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let mut conditions = existing.clone();
        for type_ in CONDITIONS {
            match conditions.iter_mut().find(|c| c.type_ == *type_) {
                Some(c) => {
                    if c.status != "Unknown" {
                        c.status = "Unknown".into();
                        c.reason = Some("NodeStatusUnknown".into());
                        c.message = Some("Kubelet stopped posting node status.".into());
                        c.last_transition_time = Some(now());
                    }
                }
                None => conditions.push(NodeCondition {
                    type_: type_.to_string(),
                    status: "Unknown".into(),
                    reason: Some("NodeStatusNeverUpdated".into()),
                    message: Some("Kubelet never posted node status.".into()),
                    last_transition_time: Some(now()),
                    last_heartbeat_time: node.metadata.creation_timestamp.clone(),
                }),
            }
        }
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "status": {"conditions": conditions},
        });
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        warn!(node = %name, grace = ?self.config.grace_period, "no heartbeat within the grace period: the node's status is Unknown");
        self.event(
            node_ref(node),
            "NodeNotReady",
            &format!("Node {name} status is now: NodeNotReady"),
            "Normal",
        )
        .await;
        for pod in self.pods_on(&name) {
            self.mark_pod_not_ready(&pod).await?;
        }
        Ok(())
    }

    fn pods_on(&self, node: &str) -> Vec<Arc<Pod>> {
        self.pods
            .state_filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
    }

    async fn mark_pod_not_ready(&self, pod: &Pod) -> anyhow::Result<()> {
        let Some(mut conditions) = pod.status.as_ref().and_then(|s| s.conditions.clone()) else {
            return Ok(());
        };
        let Some(ready) = conditions.iter_mut().find(|c| c.type_ == "Ready") else {
            return Ok(());
        };
        if ready.status == "False" {
            return Ok(());
        }
        ready.status = "False".into();
        ready.last_transition_time = Some(now());
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let patch = json!({
            "metadata": {"resourceVersion": pod.metadata.resource_version},
            "status": {"conditions": conditions},
        });
        match api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                info!(pod = %format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()), "marked not ready: its node is unreachable");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The taints the Node's conditions call for, and `unschedulable`'s.
    async fn taint(&self, node: &Node) -> anyhow::Result<()> {
        let ready = condition(node, "Ready").map(|c| c.status.as_str());
        let wanted_key = match ready {
            Some("False") => Some(NOT_READY),
            Some("Unknown") => Some(UNREACHABLE),
            _ => None,
        };
        let unschedulable = node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        let current = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let managed = |t: &Taint| {
            (t.key == NOT_READY || t.key == UNREACHABLE)
                && (t.effect == "NoSchedule" || t.effect == "NoExecute")
                || (t.key == UNSCHEDULABLE && t.effect == "NoSchedule")
        };
        let mut next: Vec<Taint> = current.iter().filter(|t| !managed(t)).cloned().collect();
        let mut keep = |key: &str, effect: &str| {
            let existing = current.iter().find(|t| t.key == key && t.effect == effect);
            next.push(existing.cloned().unwrap_or_else(|| Taint {
                key: key.into(),
                effect: effect.into(),
                value: None,
                time_added: (effect == "NoExecute").then(now),
            }));
        };
        if let Some(key) = wanted_key {
            keep(key, "NoSchedule");
            keep(key, "NoExecute");
        }
        if unschedulable {
            keep(UNSCHEDULABLE, "NoSchedule");
        }
        let same = next.len() == current.len() && next.iter().all(|t| current.contains(t));
        if same {
            return Ok(());
        }
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "spec": {"taints": next},
        });
        api.patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        info!(node = %node.name_any(), taints = ?next.iter().map(|t| format!("{}:{}", t.key, t.effect)).collect::<Vec<_>>(), "taints updated");
        Ok(())
    }

    /// Deletes the Pods that may no longer stay on a Node with NoExecute taints.
    async fn evict(&self, node: &Node) -> anyhow::Result<()> {
        let taints: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.effect == "NoExecute")
            .collect();
        if taints.is_empty() {
            return Ok(());
        }
        let taints: Vec<&Taint> = taints.iter().collect();
        let now = Timestamp::now();
        for pod in self.pods_on(&node.name_any()) {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let due = match eviction_time(&pod, &taints) {
                None => continue,
                Some(None) => true,
                Some(Some(at)) => at <= now,
            };
            if !due {
                continue;
            }
            let namespace = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            info!(pod = %format!("{namespace}/{}", pod.name_any()), node = %node.name_any(), "evicted: the node's NoExecute taint is not tolerated any longer");
            self.event(
                pod_ref(&pod),
                "TaintManagerEviction",
                &format!("Marking for deletion Pod {namespace}/{}", pod.name_any()),
                "Normal",
            )
            .await;
        }
        Ok(())
    }

    /// Records an Event; a failure to is only logged.
    async fn event(&self, object: ObjectReference, reason: &str, message: &str, type_: &str) {
        let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let stamp = now();
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}.", object.name.clone().unwrap_or_default())),
                namespace: Some(namespace),
                ..Default::default()
            },
            involved_object: object,
            reason: Some(reason.into()),
            message: Some(message.into()),
            type_: Some(type_.into()),
            source: Some(EventSource {
                component: Some("node-controller".into()),
                host: None,
            }),
            reporting_component: Some("node-controller".into()),
            first_timestamp: Some(stamp.clone()),
            last_timestamp: Some(stamp),
            count: Some(1),
            ..Default::default()
        };
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            warn!("recording event {reason}: {e}");
        }
    }
}

fn node_ref(node: &Node) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: node.metadata.name.clone(),
        uid: node.metadata.uid.clone(),
        ..Default::default()
    }
}

fn pod_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            value: None,
            time_added: Some(Time(Timestamp::now())),
        }
    }

    fn pod(tolerations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"containers": [], "tolerations": tolerations}}))
        .unwrap()
    }

    #[test]
    fn tolerations_decide_when_a_pod_is_evicted() {
        let t = taint(UNREACHABLE, "NoExecute");
        assert_eq!(eviction_time(&pod(json!([])), &[&t]), Some(None));
        let forever =
            pod(json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}]));
        assert_eq!(eviction_time(&forever, &[&t]), None);
        let limited = pod(
            json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]),
        );
        let at = eviction_time(&limited, &[&t]).unwrap().unwrap();
        assert!(at > Timestamp::now());
        // An empty key with Exists tolerates every taint.
        let all = pod(json!([{"operator": "Exists"}]));
        assert_eq!(eviction_time(&all, &[&t]), None);
        // Equal needs the same value.
        let mut valued = taint("k", "NoExecute");
        valued.value = Some("v".into());
        let equal = pod(json!([{"key": "k", "value": "w", "effect": "NoExecute"}]));
        assert_eq!(eviction_time(&equal, &[&valued]), Some(None));
    }
}
