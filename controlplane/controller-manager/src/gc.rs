//! The garbage collector (kube-controller-manager's "garbagecollector"): it watches every
//! resource type discovery lists as listable, watchable and deletable, keeps a graph of owner uid
//! -> dependents from their `ownerReferences`, and deletes objects whose owners are all gone
//! (background deletion), deletes the dependents of an owner that carries the
//! `foregroundDeletion` finalizer before removing that finalizer (foreground deletion), and takes
//! the ownerReference off the dependents of an owner that carries `orphan` before removing it.
//!
//! The graph is kept by one task from the watch events; decisions are made on live reads (the
//! item and its owners are read again before anything is deleted), several at a time, as
//! client-go's work queue would: a uid is worked on by one worker at a time, and a failed one
//! comes back after a growing delay.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{future::BoxFuture, stream::FuturesUnordered, StreamExt as _};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    api::{
        ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions,
        PropagationPolicy,
    },
    discovery::{Discovery, Scope},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, ResourceExt as _,
};
use serde_json::json;
use tokio::{sync::mpsc, task::JoinSet, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics;

/// The finalizer of an owner deleted with propagationPolicy=Foreground.
pub const FOREGROUND_FINALIZER: &str = "foregroundDeletion";
/// The finalizer of an owner deleted with propagationPolicy=Orphan.
pub const ORPHAN_FINALIZER: &str = "orphan";

/// Items worked on at once (kube's `--concurrent-gc-syncs` is 20; two cores here).
const WORKERS: usize = 8;
/// How often discovery is read again for new resource types (kube: 30 s).
const REDISCOVERY: Duration = Duration::from_secs(30);
/// How long the first lists may take before work starts without the slow ones.
const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Uids of owners known to be gone, remembered so their many dependents need one read, not one
/// each; the set is emptied when it grows past this (kube keeps an LRU of the same size).
const ABSENT_CACHE: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("owner kind {kind} of {api_version} is not served (not in discovery)")]
    UnknownKind { api_version: String, kind: String },
}

impl GcError {
    fn is_conflict(&self) -> bool {
        matches!(self, GcError::Api(kube::Error::Api(s)) if s.is_conflict())
    }
}

type Uid = Arc<str>;

/// One resource type the collector watches.
#[derive(Clone)]
struct Resource {
    ar: ApiResource,
    namespaced: bool,
}

/// What the graph keeps of an object.
#[derive(Clone)]
struct Node {
    resource: usize,
    namespace: Option<String>,
    name: String,
    owners: Vec<OwnerReference>,
    deleting: bool,
    foreground: bool,
    orphan: bool,
}

impl Node {
    fn from_object(resource: usize, object: &DynamicObject) -> Option<(Uid, Node)> {
        let uid: Uid = object.metadata.uid.as_deref()?.into();
        let finalizers = object.finalizers();
        Some((
            uid,
            Node {
                resource,
                namespace: object.metadata.namespace.clone(),
                name: object.name_any(),
                owners: object.owner_references().to_vec(),
                deleting: object.metadata.deletion_timestamp.is_some(),
                foreground: finalizers.iter().any(|f| f == FOREGROUND_FINALIZER),
                orphan: finalizers.iter().any(|f| f == ORPHAN_FINALIZER),
            },
        ))
    }

    /// Being deleted and waiting for its blocking dependents to go first.
    fn deleting_dependents(&self) -> bool {
        self.deleting && self.foreground
    }
}

/// What the watch tasks and the discovery task tell the graph.
enum Message {
    Resources(Vec<Resource>),
    Watch(Change),
    /// Some type's first list has not finished in time: work starts without it.
    SyncTimeout,
}

/// One type's watch event, reduced to what the graph keeps.
enum Change {
    /// The type is listed again (after a start or an expired watch).
    Relist(usize),
    Apply(Uid, Node),
    Delete(Uid),
    /// The list is done: what it did not have is gone.
    Listed(usize),
}

/// A worker's result: the work done and what it made necessary.
type Outcome = (Work, Result<Vec<Work>, GcError>);

/// A unit of work, by the uid of the object it is about.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum Work {
    /// kube's attemptToDelete: delete the object if its owners are gone, or, when it is being
    /// deleted in the foreground, remove the finalizer once its blocking dependents are gone.
    Delete(Uid),
    /// kube's attemptToOrphan: take the owner's reference off its dependents, then `orphan` off it.
    Orphan(Uid),
}

/// An object to read and write: where it is served and who it is.
#[derive(Clone)]
struct Target {
    ar: ApiResource,
    namespace: Option<String>,
    name: String,
    uid: Uid,
}

impl Target {
    fn api(&self, client: &Client) -> Api<DynamicObject> {
        match &self.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &self.ar),
            None => Api::all_with(client.clone(), &self.ar),
        }
    }

    fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.ar.kind, self.name),
            None => format!("{} {}", self.ar.kind, self.name),
        }
    }

    /// The live object, if it is still the one of this uid.
    async fn get(&self, client: &Client) -> Result<Option<DynamicObject>, kube::Error> {
        let live = self.api(client).get_opt(&self.name).await?;
        Ok(live.filter(|o| o.metadata.uid.as_deref() == Some(&*self.uid)))
    }
}

/// What the workers share: the client, the served types and the owners known to be gone.
struct Shared {
    client: Client,
    resources: Mutex<Vec<Resource>>,
    absent: Mutex<HashSet<Uid>>,
}

impl Shared {
    /// The served type of an ownerReference's apiVersion and kind (any version of the group).
    fn resolve(&self, owner: &OwnerReference) -> Option<Resource> {
        let group = owner
            .api_version
            .split_once('/')
            .map_or("", |(group, _)| group);
        let resources = self.resources.lock().ok()?;
        resources
            .iter()
            .find(|r| r.ar.group == group && r.ar.kind == owner.kind)
            .cloned()
    }

    fn is_absent(&self, uid: &str) -> bool {
        self.absent.lock().is_ok_and(|a| a.contains(uid))
    }

    fn mark_absent(&self, uid: &str) {
        if let Ok(mut absent) = self.absent.lock() {
            if absent.len() >= ABSENT_CACHE {
                absent.clear();
            }
            absent.insert(uid.into());
        }
    }
}

/// How an owner reference stands, read live.
#[derive(Debug, PartialEq, Eq)]
enum OwnerState {
    /// The owner exists.
    Solid,
    /// The owner is gone (or a different object of that name now exists).
    Dangling,
    /// The owner is being deleted in the foreground: it waits for its dependents.
    Waiting,
}

/// The owner -> dependents graph and the work queue over it.
#[derive(Default)]
struct Graph {
    nodes: HashMap<Uid, Node>,
    dependents: HashMap<Uid, HashSet<Uid>>,
    /// Per resource type, the uids seen since its watch (re)listed.
    relisting: HashMap<usize, HashSet<Uid>>,
    /// Resource types whose first list is done, and how many are watched.
    listed: HashSet<usize>,
    watched: usize,
    synced: bool,
    queue: VecDeque<Work>,
    queued: HashSet<Work>,
    active: HashSet<Work>,
    again: HashSet<Work>,
    failures: HashMap<Work, u32>,
    retries: BTreeMap<(Instant, u64), Work>,
    retry_seq: u64,
}

impl Graph {
    fn enqueue(&mut self, work: Work) {
        if !self.synced {
            return;
        }
        if self.active.contains(&work) {
            self.again.insert(work);
        } else if self.queued.insert(work.clone()) {
            self.queue.push_back(work);
        }
    }

    fn link(&mut self, uid: &Uid, owners: &[OwnerReference]) {
        for owner in owners {
            self.dependents
                .entry(owner.uid.as_str().into())
                .or_default()
                .insert(uid.clone());
        }
    }

    fn unlink(&mut self, uid: &Uid, owners: &[OwnerReference]) {
        for owner in owners {
            let key: &str = owner.uid.as_str();
            if let Some(set) = self.dependents.get_mut(key) {
                set.remove(uid);
                if set.is_empty() {
                    self.dependents.remove(key);
                }
            }
        }
    }

    /// An object added or changed: the graph follows, and what it now needs is queued.
    fn apply(&mut self, uid: Uid, node: Node) {
        let previous = self.nodes.insert(uid.clone(), node.clone());
        let owners_changed = previous.as_ref().is_none_or(|p| p.owners != node.owners);
        if let Some(p) = &previous {
            if owners_changed {
                self.unlink(&uid, &p.owners);
            }
        }
        if owners_changed {
            self.link(&uid, &node.owners);
            // An owner dropped from the list, or no longer blocked, may be waiting for this
            // dependent to go.
            for before in previous.iter().flat_map(|p| &p.owners) {
                if !node.owners.contains(before) {
                    self.wake_waiting_owner(&before.uid);
                }
            }
        }
        if !self.synced {
            return;
        }
        if owners_changed && self.needs_check(&node) {
            self.enqueue(Work::Delete(uid.clone()));
        }
        let was = |f: fn(&Node) -> bool| previous.as_ref().is_some_and(f);
        if node.deleting && node.orphan && !was(|p| p.deleting && p.orphan) {
            self.enqueue(Work::Orphan(uid.clone()));
        }
        if node.deleting_dependents() {
            self.enqueue(Work::Delete(uid.clone()));
            if !was(Node::deleting_dependents) {
                for dependent in self.dependents_of(&uid) {
                    self.enqueue(Work::Delete(dependent));
                }
            }
        }
    }

    /// An object deleted: its dependents may now be orphans, and a foreground-deleting owner
    /// may have one blocking dependent fewer.
    fn delete(&mut self, uid: &Uid) {
        let Some(node) = self.nodes.remove(uid) else {
            return;
        };
        self.unlink(uid, &node.owners);
        for dependent in self.dependents_of(uid) {
            self.enqueue(Work::Delete(dependent));
        }
        for owner in &node.owners {
            self.wake_waiting_owner(&owner.uid);
        }
    }

    fn wake_waiting_owner(&mut self, owner: &str) {
        let waiting = self
            .nodes
            .get_key_value(owner)
            .filter(|(_, n)| n.deleting_dependents())
            .map(|(k, _)| k.clone());
        if let Some(key) = waiting {
            self.enqueue(Work::Delete(key));
        }
    }

    fn dependents_of(&self, uid: &str) -> Vec<Uid> {
        self.dependents
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether an object's owners need a look: one of them is not in the graph (it may be
    /// gone) or waits for its dependents to be deleted.
    fn needs_check(&self, node: &Node) -> bool {
        node.owners.iter().any(|o| {
            self.nodes
                .get(o.uid.as_str())
                .is_none_or(Node::deleting_dependents)
        })
    }

    /// Every type listed once: the whole graph is looked at, then changes one by one.
    fn sync(&mut self) {
        self.synced = true;
        let mut work = Vec::new();
        for (uid, node) in &self.nodes {
            if (!node.owners.is_empty() && self.needs_check(node)) || node.deleting_dependents() {
                work.push(Work::Delete(uid.clone()));
            }
            if node.deleting && node.orphan {
                work.push(Work::Orphan(uid.clone()));
            }
        }
        info!(
            objects = self.nodes.len(),
            queued = work.len(),
            "garbage collector: graph synced"
        );
        for w in work {
            self.enqueue(w);
        }
    }

    fn fail(&mut self, work: Work) {
        let failures = self.failures.entry(work.clone()).or_insert(0);
        *failures += 1;
        // 50 ms doubling up to 5 minutes.
        let delay = Duration::from_millis(50)
            .saturating_mul(1 << (*failures - 1).min(13))
            .min(Duration::from_secs(300));
        self.retry_seq += 1;
        self.retries
            .insert((Instant::now() + delay, self.retry_seq), work);
    }
}

/// Runs the collector until `shutdown`, which lets the deletes in flight finish.
pub async fn run(client: Client, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    let mut tasks = JoinSet::new();
    tasks.spawn(discover(client.clone(), tx.clone()));
    tasks.spawn({
        let tx = tx.clone();
        async move {
            tokio::time::sleep(SYNC_TIMEOUT).await;
            let _ = tx.send(Message::SyncTimeout).await;
        }
    });
    let shared = Arc::new(Shared {
        client,
        resources: Mutex::new(Vec::new()),
        absent: Mutex::new(HashSet::new()),
    });
    let mut graph = Graph::default();
    let mut in_flight: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
    loop {
        while in_flight.len() < WORKERS {
            let Some(work) = graph.queue.pop_front() else {
                break;
            };
            graph.queued.remove(&work);
            match start(&graph, &shared, work.clone()) {
                Some(job) => {
                    graph.active.insert(work);
                    in_flight.push(job);
                }
                // Gone from the graph: nothing left to do or retry.
                None => {
                    graph.failures.remove(&work);
                }
            }
        }
        let next_retry = graph.retries.keys().next().map(|(at, _)| *at);
        tokio::select! {
            // The deletes in flight finish; nothing new starts.
            _ = shutdown.cancelled() => {
                while in_flight.next().await.is_some() {}
                return;
            }
            message = rx.recv() => match message {
                Some(Message::Resources(found)) => add_resources(&shared, &mut graph, &mut tasks, &tx, found),
                Some(Message::Watch(change)) => observe(&mut graph, change),
                Some(Message::SyncTimeout) => {
                    if !graph.synced {
                        warn!(listed = graph.listed.len(), watched = graph.watched, "garbage collector: not every type listed in time; starting anyway");
                        graph.sync();
                    }
                }
                None => return,
            },
            Some((work, result)) = in_flight.next(), if !in_flight.is_empty() => {
                graph.active.remove(&work);
                metrics::synced("garbagecollector", result.is_ok());
                match result {
                    Ok(follow_ups) => {
                        graph.failures.remove(&work);
                        for w in follow_ups {
                            graph.enqueue(w);
                        }
                    }
                    Err(e) => {
                        // A write at a stale version is routine: the item is looked at again.
                        if e.is_conflict() {
                            debug!(?work, "garbage collector: {e}");
                        } else {
                            warn!(?work, "garbage collector: {e}");
                        }
                        // Retried only after the delay, not also at once.
                        graph.again.remove(&work);
                        graph.fail(work.clone());
                    }
                }
                if graph.again.remove(&work) {
                    graph.enqueue(work);
                }
            }
            _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                let now = Instant::now();
                while let Some(entry) = graph.retries.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let work = entry.remove();
                    graph.enqueue(work);
                }
            }
        }
    }
}

/// Reads discovery now and every `REDISCOVERY`, sending the types to watch.
async fn discover(client: Client, tx: mpsc::Sender<Message>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match watchable_resources(&client).await {
            Ok(found) => {
                if tx.send(Message::Resources(found)).await.is_err() {
                    return;
                }
                delay = Duration::from_secs(1);
                tokio::time::sleep(REDISCOVERY).await;
            }
            Err(e) => {
                warn!("garbage collector: discovery: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(REDISCOVERY);
            }
        }
    }
}

/// The types the collector can watch and delete; events are left out, as kube does.
async fn watchable_resources(client: &Client) -> Result<Vec<Resource>, kube::Error> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut out = Vec::new();
    for group in discovery.groups() {
        for (ar, caps) in group.recommended_resources() {
            let can = |verb: &str| caps.supports_operation(verb);
            if !(can("list") && can("watch") && can("delete") && can("patch")) {
                continue;
            }
            if ar.plural == "events" {
                continue;
            }
            out.push(Resource {
                namespaced: caps.scope == Scope::Namespaced,
                ar,
            });
        }
    }
    Ok(out)
}

fn add_resources(
    shared: &Shared,
    graph: &mut Graph,
    tasks: &mut JoinSet<()>,
    tx: &mpsc::Sender<Message>,
    found: Vec<Resource>,
) {
    let Ok(mut resources) = shared.resources.lock() else {
        return;
    };
    for resource in found {
        let known = resources
            .iter()
            .any(|r| r.ar.group == resource.ar.group && r.ar.plural == resource.ar.plural);
        if known {
            continue;
        }
        let index = resources.len();
        debug!(resource = %resource.ar.plural, group = %resource.ar.group, "garbage collector: watching");
        tasks.spawn(watch(
            shared.client.clone(),
            resource.ar.clone(),
            index,
            tx.clone(),
        ));
        resources.push(resource);
    }
    graph.watched = resources.len();
}

/// Feeds one type's watch events to the graph.
async fn watch(client: Client, ar: ApiResource, index: usize, tx: mpsc::Sender<Message>) {
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Change::Relist(index),
            Ok(watcher::Event::InitApply(o) | watcher::Event::Apply(o)) => {
                match Node::from_object(index, &o) {
                    Some((uid, node)) => Change::Apply(uid, node),
                    None => continue,
                }
            }
            Ok(watcher::Event::Delete(o)) => match o.metadata.uid.as_deref() {
                Some(uid) => Change::Delete(uid.into()),
                None => continue,
            },
            Ok(watcher::Event::InitDone) => Change::Listed(index),
            Err(e) => {
                warn!(resource = %ar.plural, "garbage collector: watch: {e}");
                continue;
            }
        };
        if tx.send(Message::Watch(change)).await.is_err() {
            return;
        }
    }
}

fn observe(graph: &mut Graph, change: Change) {
    match change {
        Change::Relist(resource) => {
            graph.relisting.insert(resource, HashSet::new());
        }
        Change::Apply(uid, node) => {
            if let Some(seen) = graph.relisting.get_mut(&node.resource) {
                seen.insert(uid.clone());
            }
            graph.apply(uid, node);
        }
        Change::Delete(uid) => graph.delete(&uid),
        Change::Listed(resource) => {
            // Objects of this type the new list does not have were deleted meanwhile.
            let seen = graph.relisting.remove(&resource).unwrap_or_default();
            let gone: Vec<Uid> = graph
                .nodes
                .iter()
                .filter(|(uid, n)| n.resource == resource && !seen.contains(*uid))
                .map(|(uid, _)| uid.clone())
                .collect();
            for uid in gone {
                graph.delete(&uid);
            }
            graph.listed.insert(resource);
            if !graph.synced && graph.listed.len() == graph.watched {
                graph.sync();
            }
        }
    }
}

/// A worker's future for `work`, from what the graph knows now; `None` when there is nothing
/// to do (the object is gone from the graph).
fn start(graph: &Graph, shared: &Arc<Shared>, work: Work) -> Option<BoxFuture<'static, Outcome>> {
    let uid = match &work {
        Work::Delete(uid) | Work::Orphan(uid) => uid.clone(),
    };
    let node = graph.nodes.get(&uid)?;
    let target = target_of(shared, &uid, node)?;
    let shared = shared.clone();
    match work {
        Work::Delete(_) => {
            let dependents: Vec<Dependent> = graph
                .dependents_of(&uid)
                .into_iter()
                .filter_map(|d| {
                    let n = graph.nodes.get(&d)?;
                    Some(Dependent {
                        uid: d.clone(),
                        blocks: n
                            .owners
                            .iter()
                            .any(|o| *o.uid == *uid && o.block_owner_deletion == Some(true)),
                        deleting: n.deleting,
                        deleting_dependents: n.deleting_dependents(),
                    })
                })
                .collect();
            Some(Box::pin(async move {
                let result = attempt_to_delete(&shared, &target, &dependents).await;
                (work, result)
            }))
        }
        Work::Orphan(_) => {
            let dependents: Vec<Target> = graph
                .dependents_of(&uid)
                .into_iter()
                .filter_map(|d| target_of(&shared, &d, graph.nodes.get(&d)?))
                .collect();
            Some(Box::pin(async move {
                let result = attempt_to_orphan(&shared, &target, &dependents)
                    .await
                    .map(|()| Vec::new());
                (work, result)
            }))
        }
    }
}

fn target_of(shared: &Shared, uid: &Uid, node: &Node) -> Option<Target> {
    let resources = shared.resources.lock().ok()?;
    let resource = resources.get(node.resource)?;
    Some(Target {
        ar: resource.ar.clone(),
        namespace: node.namespace.clone(),
        name: node.name.clone(),
        uid: uid.clone(),
    })
}

/// A dependent of the item being worked on, as the graph has it.
struct Dependent {
    uid: Uid,
    /// Its reference to the item has blockOwnerDeletion.
    blocks: bool,
    deleting: bool,
    deleting_dependents: bool,
}

/// kube's attemptToDeleteItem, given the item's dependents in the graph. Returns the work this
/// makes necessary.
async fn attempt_to_delete(
    shared: &Shared,
    item: &Target,
    dependents: &[Dependent],
) -> Result<Vec<Work>, GcError> {
    let client = &shared.client;
    let Some(live) = item.get(client).await? else {
        return Ok(Vec::new());
    };
    if live.metadata.deletion_timestamp.is_some() {
        if !live.finalizers().iter().any(|f| f == FOREGROUND_FINALIZER) {
            return Ok(Vec::new());
        }
        // Foreground deletion: the finalizer goes once no dependent blocks it; until then the
        // blocking dependents are deleted (their deletion queues this item again).
        if !dependents.iter().any(|d| d.blocks) {
            remove_finalizer(client, item, &live, FOREGROUND_FINALIZER).await?;
            info!(object = %item.describe(), "garbage collector: dependents gone, foreground deletion done");
            return Ok(Vec::new());
        }
        // Those already being deleted need nothing more.
        return Ok(dependents
            .iter()
            .filter(|d| d.blocks && !d.deleting)
            .map(|d| Work::Delete(d.uid.clone()))
            .collect());
    }
    let owners = live.owner_references().to_vec();
    if owners.is_empty() {
        return Ok(Vec::new());
    }
    let mut solid = Vec::new();
    let mut dangling = Vec::new();
    let mut waiting = Vec::new();
    for owner in &owners {
        match owner_state(shared, item, owner).await? {
            OwnerState::Solid => solid.push(owner),
            OwnerState::Dangling => dangling.push(owner),
            OwnerState::Waiting => waiting.push(owner),
        }
    }
    let rv = live.resource_version();
    if !solid.is_empty() {
        if dangling.is_empty() && waiting.is_empty() {
            return Ok(Vec::new());
        }
        // An owner remains: the gone ones come off, the waiting ones are no longer blocked.
        let kept: Vec<OwnerReference> = owners
            .iter()
            .filter(|o| !dangling.iter().any(|d| d.uid == o.uid))
            .map(|o| {
                let mut o = o.clone();
                if waiting.iter().any(|w| w.uid == o.uid) {
                    o.block_owner_deletion = Some(false);
                }
                o
            })
            .collect();
        set_owner_references(client, item, rv, &kept).await?;
        info!(object = %item.describe(), removed = dangling.len(), "garbage collector: owner references of gone or deleting owners updated");
        return Ok(Vec::new());
    }
    let policy = if !waiting.is_empty() && !dependents.is_empty() {
        // Its own dependents go first, as its owner waits for it. A dependent also deleting its
        // dependents may be a cycle: this item stops blocking its owners (kube's rule).
        if dependents.iter().any(|d| d.deleting_dependents) {
            let unblocked: Vec<OwnerReference> = owners
                .iter()
                .map(|o| OwnerReference {
                    block_owner_deletion: Some(false),
                    ..o.clone()
                })
                .collect();
            set_owner_references(client, item, rv.clone(), &unblocked).await?;
            return Ok(vec![Work::Delete(item.uid.clone())]);
        }
        PropagationPolicy::Foreground
    } else if live.finalizers().iter().any(|f| f == ORPHAN_FINALIZER) {
        PropagationPolicy::Orphan
    } else if live.finalizers().iter().any(|f| f == FOREGROUND_FINALIZER) {
        PropagationPolicy::Foreground
    } else {
        PropagationPolicy::Background
    };
    let params = DeleteParams {
        propagation_policy: Some(policy.clone()),
        preconditions: Some(Preconditions {
            uid: Some(item.uid.to_string()),
            resource_version: rv,
        }),
        ..DeleteParams::default()
    };
    match item.api(client).delete(&item.name, &params).await {
        Ok(_) => {
            info!(object = %item.describe(), ?policy, "garbage collector: deleting, its owners are gone or deleting");
            Ok(Vec::new())
        }
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

/// Reads an owner live (kube's isDangling).
async fn owner_state(
    shared: &Shared,
    item: &Target,
    owner: &OwnerReference,
) -> Result<OwnerState, GcError> {
    if shared.is_absent(&owner.uid) {
        return Ok(OwnerState::Dangling);
    }
    let resource = shared.resolve(owner).ok_or_else(|| GcError::UnknownKind {
        api_version: owner.api_version.clone(),
        kind: owner.kind.clone(),
    })?;
    let namespace = match (resource.namespaced, &item.namespace) {
        (false, _) => None,
        (true, Some(ns)) => Some(ns.clone()),
        (true, None) => {
            // A cluster-scoped dependent cannot have a namespaced owner: such a reference is
            // unresolvable and keeps the object (as kube does).
            warn!(object = %item.describe(), owner = %owner.name, "garbage collector: a cluster-scoped object names a namespaced owner; left alone");
            return Ok(OwnerState::Solid);
        }
    };
    let owner_target = Target {
        ar: resource.ar,
        namespace,
        name: owner.name.clone(),
        uid: owner.uid.as_str().into(),
    };
    match owner_target.get(&shared.client).await? {
        None => {
            shared.mark_absent(&owner.uid);
            Ok(OwnerState::Dangling)
        }
        Some(o)
            if o.metadata.deletion_timestamp.is_some()
                && o.finalizers().iter().any(|f| f == FOREGROUND_FINALIZER) =>
        {
            Ok(OwnerState::Waiting)
        }
        Some(_) => Ok(OwnerState::Solid),
    }
}

/// kube's attemptToOrphan: every dependent loses its reference to `owner`, then the `orphan`
/// finalizer comes off the owner.
async fn attempt_to_orphan(
    shared: &Shared,
    owner: &Target,
    dependents: &[Target],
) -> Result<(), GcError> {
    let client = &shared.client;
    for dependent in dependents {
        let Some(live) = dependent.get(client).await? else {
            continue;
        };
        let refs = live.owner_references();
        if !refs.iter().any(|o| *o.uid == *owner.uid) {
            continue;
        }
        let kept: Vec<OwnerReference> = refs
            .iter()
            .filter(|o| *o.uid != *owner.uid)
            .cloned()
            .collect();
        set_owner_references(client, dependent, live.resource_version(), &kept).await?;
    }
    let Some(live) = owner.get(client).await? else {
        return Ok(());
    };
    if live.finalizers().iter().any(|f| f == ORPHAN_FINALIZER) {
        remove_finalizer(client, owner, &live, ORPHAN_FINALIZER).await?;
        info!(object = %owner.describe(), orphaned = dependents.len(), "garbage collector: dependents orphaned");
    }
    Ok(())
}

/// Writes an object's ownerReferences, if it is still at `rv`.
async fn set_owner_references(
    client: &Client,
    target: &Target,
    rv: Option<String>,
    refs: &[OwnerReference],
) -> Result<(), GcError> {
    patch_metadata_list(client, target, rv, "ownerReferences", json!(refs)).await
}

/// Takes `finalizer` off the object, if it is still at the version read.
async fn remove_finalizer(
    client: &Client,
    target: &Target,
    live: &DynamicObject,
    finalizer: &str,
) -> Result<(), GcError> {
    let rest: Vec<&String> = live
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .collect();
    patch_metadata_list(
        client,
        target,
        live.resource_version(),
        "finalizers",
        json!(rest),
    )
    .await
}

/// Sets a list in the object's metadata (removed when empty) with a merge patch that names the
/// version read, so that a concurrent write makes it fail; an object gone already is fine.
async fn patch_metadata_list(
    client: &Client,
    target: &Target,
    rv: Option<String>,
    field: &str,
    list: serde_json::Value,
) -> Result<(), GcError> {
    let list = match list.as_array() {
        Some(items) if items.is_empty() => serde_json::Value::Null,
        _ => list,
    };
    let patch = json!({"metadata": {"resourceVersion": rv, field: list}});
    match target
        .api(client)
        .patch(&target.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
