//! seine-scheduler's core: watches Nodes, Pods, Services and Namespaces into an in-memory
//! cache, decides for one pending pod at a time against that cache, and binds through the
//! pods/binding subresource with several binds in flight. A pod is assumed on its node as soon
//! as it is decided, so the next decision counts it; a failed bind forgets it and retries the
//! pod after a backoff. Pods that fit nowhere get kube-scheduler's FailedScheduling message and
//! wait for a Node to be added or changed, or a pod to go away.

pub mod cluster;
pub mod filter;
pub mod framework;
pub mod node;
pub mod placement;
pub mod pod;
pub mod queue;
pub mod report;
pub mod score;
pub mod topology_spread;

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock},
    time::{Duration, Instant},
};

use futures::{stream::BoxStream, StreamExt as _};
use k8s_openapi::{
    api::core::v1::{Binding, Namespace, Node, ObjectReference, Pod, Service},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Status},
};
use kube::{
    api::PostParams,
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, ResourceExt as _,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use cluster::{Cluster, PodChange};
use filter::Plugin;
use node::NodeInfo;
use placement::Decision;
use pod::{PodInfo, PodKey};
use queue::SchedulingQueue;
use report::Reporter;
use seine_apimachinery::labels::{Labels, Selector};
use seine_component_base::metrics;

/// Binds in flight at once (decisions stay serial).
pub const DEFAULT_PARALLEL_BINDS: u16 = 16;
/// Decisions in a row before the watches are read again.
const DECISIONS_PER_TURN: usize = 64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Pods whose spec.schedulerName is this (or empty, for `default-scheduler`) are ours.
    pub scheduler_name: String,
    pub parallel_binds: usize,
    /// This replica, as events' reportingInstance.
    pub instance: String,
}

impl SchedulerConfig {
    pub fn new(scheduler_name: &str) -> Self {
        let host = seine_component_base::hostname();
        SchedulerConfig {
            scheduler_name: scheduler_name.to_string(),
            parallel_binds: usize::from(DEFAULT_PARALLEL_BINDS),
            instance: format!("{scheduler_name}-{host}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("the {0} watch ended")]
    WatchEnded(&'static str),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    /// `scheduled`, `unschedulable` or `error`.
    result: String,
    profile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    /// `active`, `backoff` or `unschedulable`.
    queue: String,
}

struct SchedulerMetrics {
    attempts: Family<AttemptLabels, Counter>,
    pending: Family<QueueLabels, Gauge>,
}

/// kube-scheduler's metric names, registered once in the daemon's registry.
static METRICS: LazyLock<SchedulerMetrics> = LazyLock::new(|| {
    let attempts = Family::<AttemptLabels, Counter>::default();
    metrics::register(
        "scheduler_schedule_attempts",
        "Attempts to schedule pods, by result: scheduled, unschedulable, error",
        attempts.clone(),
    );
    let pending = Family::<QueueLabels, Gauge>::default();
    metrics::register(
        "scheduler_pending_pods",
        "Pending pods, by queue: active, backoff, unschedulable",
        pending.clone(),
    );
    SchedulerMetrics { attempts, pending }
});

/// What a bind task reports back.
struct BindOutcome {
    pod: Arc<PodInfo>,
    node: String,
    result: Result<(), kube::Error>,
}

/// A watch's relist in progress: objects gathered between Init and InitDone.
struct Relist<T> {
    items: Option<Vec<T>>,
    synced: bool,
}

impl<T> Default for Relist<T> {
    fn default() -> Self {
        Relist {
            items: None,
            synced: false,
        }
    }
}

fn watch<K>(api: Api<K>) -> BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    K::DynamicType: Default,
{
    watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed()
}

struct Scheduler {
    client: Client,
    config: SchedulerConfig,
    cluster: Cluster,
    queue: SchedulingQueue,
    reporter: Reporter,
    binds: JoinSet<BindOutcome>,
    nodes: Relist<NodeInfo>,
    pods: Relist<Arc<PodInfo>>,
    services: Relist<(String, String, Selector)>,
    namespaces: Relist<(String, Labels)>,
}

/// Runs the scheduler until `shutdown` or until a watch ends for good.
pub async fn run(
    client: Client,
    config: SchedulerConfig,
    shutdown: CancellationToken,
) -> Result<(), SchedulerError> {
    LazyLock::force(&METRICS);
    let reporter = Reporter::spawn(
        client.clone(),
        config.scheduler_name.clone(),
        config.instance.clone(),
    );
    let mut scheduler = Scheduler {
        client: client.clone(),
        config,
        cluster: Cluster::default(),
        queue: SchedulingQueue::default(),
        reporter,
        binds: JoinSet::new(),
        nodes: Relist::default(),
        pods: Relist::default(),
        services: Relist::default(),
        namespaces: Relist::default(),
    };
    let mut nodes = watch(Api::<Node>::all(client.clone()));
    let mut pods = watch(Api::<Pod>::all(client.clone()));
    let mut services = watch(Api::<Service>::all(client.clone()));
    let mut namespaces = watch(Api::<Namespace>::all(client));
    let mut housekeeping = tokio::time::interval(Duration::from_secs(30));
    info!(
        scheduler = %scheduler.config.scheduler_name,
        parallel_binds = scheduler.config.parallel_binds,
        "scheduler: watching nodes, pods, services and namespaces"
    );
    loop {
        let wake = scheduler.queue.next_backoff();
        let can_decide = scheduler.synced()
            && scheduler.queue.has_active()
            && scheduler.binds.len() < scheduler.config.parallel_binds;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            Some(done) = scheduler.binds.join_next(), if !scheduler.binds.is_empty() => {
                match done {
                    Ok(outcome) => scheduler.bound(outcome),
                    Err(e) => warn!("a bind task failed: {e}"),
                }
            }
            event = nodes.next() => match event {
                Some(Ok(e)) => scheduler.on_node(e),
                Some(Err(e)) => warn!("watching nodes: {e}"),
                None => return Err(SchedulerError::WatchEnded("node")),
            },
            event = pods.next() => match event {
                Some(Ok(e)) => scheduler.on_pod(e),
                Some(Err(e)) => warn!("watching pods: {e}"),
                None => return Err(SchedulerError::WatchEnded("pod")),
            },
            event = services.next() => match event {
                Some(Ok(e)) => scheduler.on_service(e),
                Some(Err(e)) => warn!("watching services: {e}"),
                None => return Err(SchedulerError::WatchEnded("service")),
            },
            event = namespaces.next() => match event {
                Some(Ok(e)) => scheduler.on_namespace(e),
                Some(Err(e)) => warn!("watching namespaces: {e}"),
                None => return Err(SchedulerError::WatchEnded("namespace")),
            },
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                scheduler.queue.flush_backoff(Instant::now());
            }
            _ = housekeeping.tick() => scheduler.queue.flush(Instant::now()),
            _ = std::future::ready(()), if can_decide => scheduler.decide_some(),
        }
        scheduler.publish();
    }
}

impl Scheduler {
    fn synced(&self) -> bool {
        self.nodes.synced && self.pods.synced && self.services.synced && self.namespaces.synced
    }

    /// Updates the queue gauges and tells the reporter whether pods are waiting.
    fn publish(&self) {
        let counts = self.queue.counts();
        for (queue, n) in [
            ("active", counts.active),
            ("backoff", counts.backoff),
            ("unschedulable", counts.unschedulable),
        ] {
            METRICS
                .pending
                .get_or_create(&QueueLabels {
                    queue: queue.into(),
                })
                .set(n as i64);
        }
        self.reporter
            .set_busy(counts.active > 0 || !self.binds.is_empty());
    }

    fn attempt(&self, result: &str) {
        METRICS
            .attempts
            .get_or_create(&AttemptLabels {
                result: result.into(),
                profile: self.config.scheduler_name.clone(),
            })
            .inc();
    }

    /// Pods parked as unschedulable get another try after a change that may help them.
    fn retry_unschedulable(&mut self, may_help: impl Fn(&HashSet<Plugin>) -> bool) {
        self.queue.move_unschedulable(Instant::now(), may_help);
    }

    fn on_node(&mut self, event: watcher::Event<Node>) {
        match event {
            watcher::Event::Init => self.nodes.items = Some(Vec::new()),
            watcher::Event::InitApply(n) => {
                if let Some(items) = &mut self.nodes.items {
                    items.push(NodeInfo::from_node(&n));
                }
            }
            watcher::Event::InitDone => {
                let nodes = self.nodes.items.take().unwrap_or_default();
                info!(nodes = nodes.len(), "scheduler: nodes listed");
                self.cluster.replace_nodes(nodes);
                self.nodes.synced = true;
                self.retry_unschedulable(|_| true);
            }
            watcher::Event::Apply(n) => {
                let info = NodeInfo::from_node(&n);
                if let Some(problem) = &info.problem {
                    warn!(node = %info.name, "scheduler: node allocatable: {problem}");
                }
                if self.cluster.set_node(info) {
                    self.retry_unschedulable(|_| true);
                }
            }
            watcher::Event::Delete(n) => self.cluster.remove_node(&n.name_any()),
        }
    }

    fn on_pod(&mut self, event: watcher::Event<Pod>) {
        match event {
            watcher::Event::Init => self.pods.items = Some(Vec::new()),
            watcher::Event::InitApply(p) => {
                if let Some(items) = &mut self.pods.items {
                    items.push(Arc::new(PodInfo::from_pod(&p)));
                }
            }
            watcher::Event::InitDone => {
                let pods = self.pods.items.take().unwrap_or_default();
                let (assigned, rest): (Vec<_>, Vec<_>) = pods
                    .into_iter()
                    .filter(|p| !p.terminal)
                    .partition(|p| p.node_name.is_some());
                info!(
                    assigned = assigned.len(),
                    unassigned = rest.len(),
                    "scheduler: pods listed"
                );
                self.cluster.replace_assigned(assigned);
                let name = self.config.scheduler_name.clone();
                let pending: Vec<Arc<PodInfo>> = rest
                    .into_iter()
                    .filter(|p| p.wants_scheduling_by(&name) && !self.cluster.is_assumed(&p.key))
                    .collect();
                let keys: HashSet<PodKey> = pending.iter().map(|p| p.key.clone()).collect();
                self.queue.retain(|k| keys.contains(k));
                let now = Instant::now();
                for p in pending {
                    self.queue.upsert(p, now);
                }
                self.pods.synced = true;
                self.retry_unschedulable(|_| true);
            }
            watcher::Event::Apply(p) => self.pod_changed(Arc::new(PodInfo::from_pod(&p))),
            watcher::Event::Delete(p) => {
                let key = PodKey::of(&p);
                self.queue.remove(&key);
                if self.cluster.delete_pod(&key).is_some() {
                    // What it held is free.
                    self.retry_unschedulable(|_| true);
                }
            }
        }
    }

    fn pod_changed(&mut self, pod: Arc<PodInfo>) {
        let key = pod.key.clone();
        if pod.terminal {
            self.queue.remove(&key);
            if self.cluster.delete_pod(&key).is_some() {
                self.retry_unschedulable(|_| true);
            }
            return;
        }
        if pod.node_name.is_some() {
            if !self.queue.is_in_flight(&key) {
                self.queue.remove(&key);
            }
            match self.cluster.set_assigned(pod) {
                // A new pod may be what another's affinity waits for, or even out the
                // domains another's spread constraints wait on.
                PodChange::Added
                | PodChange::Updated {
                    labels_changed: true,
                } => self.retry_unschedulable(|p| {
                    p.contains(&Plugin::InterPodAffinity) || p.contains(&Plugin::PodTopologySpread)
                }),
                PodChange::Updated { .. } => {}
            }
            return;
        }
        if self.cluster.is_assumed(&key) {
            // Bound by us; the watch has not caught up yet.
            return;
        }
        if pod.wants_scheduling_by(&self.config.scheduler_name) {
            self.queue.upsert(pod, Instant::now());
        } else if !self.queue.is_in_flight(&key) {
            self.queue.remove(&key);
        }
    }

    fn on_service(&mut self, event: watcher::Event<Service>) {
        let entry = |s: &Service| {
            let selector = s
                .spec
                .as_ref()
                .and_then(|spec| spec.selector.as_ref())
                .map(Selector::from_map)
                .unwrap_or_else(Selector::nothing);
            (s.namespace().unwrap_or_default(), s.name_any(), selector)
        };
        match event {
            watcher::Event::Init => self.services.items = Some(Vec::new()),
            watcher::Event::InitApply(s) => {
                if let Some(items) = &mut self.services.items {
                    items.push(entry(&s));
                }
            }
            watcher::Event::InitDone => {
                self.cluster
                    .replace_services(self.services.items.take().unwrap_or_default());
                self.services.synced = true;
            }
            watcher::Event::Apply(s) => {
                let (ns, name, selector) = entry(&s);
                self.cluster.set_service(&ns, &name, selector);
            }
            watcher::Event::Delete(s) => self
                .cluster
                .remove_service(&s.namespace().unwrap_or_default(), &s.name_any()),
        }
    }

    fn on_namespace(&mut self, event: watcher::Event<Namespace>) {
        let entry = |n: &Namespace| (n.name_any(), n.labels().clone());
        match event {
            watcher::Event::Init => self.namespaces.items = Some(Vec::new()),
            watcher::Event::InitApply(n) => {
                if let Some(items) = &mut self.namespaces.items {
                    items.push(entry(&n));
                }
            }
            watcher::Event::InitDone => {
                self.cluster
                    .replace_namespaces(self.namespaces.items.take().unwrap_or_default());
                self.namespaces.synced = true;
            }
            watcher::Event::Apply(n) => {
                let (name, labels) = entry(&n);
                if self.cluster.set_namespace(&name, labels) {
                    self.retry_unschedulable(|p| p.contains(&Plugin::InterPodAffinity));
                }
            }
            watcher::Event::Delete(n) => self.cluster.remove_namespace(&n.name_any()),
        }
    }

    /// Decides for pending pods while bind slots are free.
    fn decide_some(&mut self) {
        for _ in 0..DECISIONS_PER_TURN {
            if self.binds.len() >= self.config.parallel_binds {
                return;
            }
            let Some(pod) = self.queue.pop() else {
                return;
            };
            match placement::place(&pod, &self.cluster) {
                Decision::Bind(node) => {
                    self.cluster.assume(&pod, &node);
                    self.binds.spawn(bind(self.client.clone(), pod, node));
                }
                Decision::Fail(failure) => {
                    self.attempt("unschedulable");
                    info!(pod = %pod.key, reason = failure.reason, "unschedulable: {}", failure.message);
                    self.reporter.failed(&pod, failure.reason, &failure.message);
                    self.queue
                        .unschedulable(&pod.key, failure.plugins, Instant::now());
                }
            }
        }
    }

    fn bound(&mut self, outcome: BindOutcome) {
        let BindOutcome { pod, node, result } = outcome;
        let key = pod.key.clone();
        match result {
            Ok(()) => {
                self.attempt("scheduled");
                debug!(pod = %key, %node, "bound");
                self.queue.done(&key);
                self.reporter.scheduled(&pod, &node);
            }
            Err(e) => {
                self.cluster.forget(&key);
                let gone = matches!(&e, kube::Error::Api(s) if s.code == 404);
                let taken = matches!(&e, kube::Error::Api(s) if s.code == 409
                    && (s.message.contains("already assigned") || s.message.contains("being deleted")));
                if gone || taken {
                    // Deleted, or bound elsewhere: the watch has the rest.
                    debug!(pod = %key, "bind not needed any more: {e}");
                    self.queue.remove(&key);
                    return;
                }
                self.attempt("error");
                warn!(pod = %key, %node, "binding failed, retrying after a backoff: {e}");
                self.reporter.failed(
                    &pod,
                    "SchedulerError",
                    &format!("Binding rejected: running Bind plugin \"DefaultBinder\": {e}"),
                );
                self.queue.retry_later(&key, Instant::now());
            }
        }
    }
}

/// Binds `pod` to `node` through pods/binding, as kube-scheduler's DefaultBinder does.
async fn bind(client: Client, pod: Arc<PodInfo>, node: String) -> BindOutcome {
    let api: Api<Pod> = Api::namespaced(client, &pod.key.namespace);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(pod.key.name.clone()),
            namespace: Some(pod.key.namespace.clone()),
            uid: Some(pod.uid.clone()).filter(|u| !u.is_empty()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.clone()),
            ..Default::default()
        },
    };
    let result = api
        .create_subresource::<_, Status>("binding", &pod.key.name, &PostParams::default(), &binding)
        .await
        .map(|_| ());
    BindOutcome { pod, node, result }
}
