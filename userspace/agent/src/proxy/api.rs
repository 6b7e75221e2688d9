//! The API as the source of the services, as kube-proxy's informers are: Services,
//! EndpointSlices and this node's Node, each listed and then watched with kube-runtime (relist
//! on 410 Gone, backoff on errors), into stores the proxy reads.
//!
//! Each event marks the Services it concerns (a slice: the Service it names, and the one it
//! named before if it moved). The proxy takes the marked ones in batches, so that a burst of
//! changes is one write. A relist (the watch restarted, the API server back) marks every
//! Service; only what differs is written. Nothing is taken before Services and EndpointSlices
//! have both been listed once: an agent restarted with its maps pinned removes nothing early.
//! While the API server is away the stores, and so the datapath, stay as they are.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Instant,
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, ObjectRef, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, ResourceExt as _,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{
    translate::{self, NodeInfo, ZONE_LABEL},
    ServiceKey,
};
use crate::model::ServiceSpec;

/// A slice by namespace and name.
type SliceKey = (String, String);

/// Which slices belong to which Service.
#[derive(Debug, Default)]
struct SliceIndex {
    owner: HashMap<SliceKey, ServiceKey>,
    slices: HashMap<ServiceKey, BTreeSet<SliceKey>>,
}

impl SliceIndex {
    /// Files the slice under its Service; returns the Service it was under before.
    fn insert(&mut self, slice: SliceKey, service: Option<ServiceKey>) -> Option<ServiceKey> {
        let before = self.remove(&slice);
        if let Some(service) = service {
            self.slices
                .entry(service.clone())
                .or_default()
                .insert(slice.clone());
            self.owner.insert(slice, service);
        }
        before
    }

    fn remove(&mut self, slice: &SliceKey) -> Option<ServiceKey> {
        let service = self.owner.remove(slice)?;
        if let Some(set) = self.slices.get_mut(&service) {
            set.remove(slice);
            if set.is_empty() {
                self.slices.remove(&service);
            }
        }
        Some(service)
    }
}

/// What the proxy has not written yet.
#[derive(Debug, Default)]
struct Pending {
    /// The Services that changed, each with when its first change not yet written came.
    services: HashMap<ServiceKey, Instant>,
    /// Every Service (after a relist, or the node's zone changed), since when.
    all: Option<Instant>,
    /// The earliest change behind each pending Service's slices, as the EndpointSlice
    /// controller stamps it (`endpoints.kubernetes.io/last-change-trigger-time`): where
    /// network programming latency starts. Health goes by `services`, when the agent heard.
    triggers: HashMap<ServiceKey, Instant>,
}

/// The annotation the EndpointSlice controller stamps on the slices it writes.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// When `slice`'s trigger happened, on this clock; none without one, or one in the future.
fn trigger_instant(slice: &EndpointSlice) -> Option<Instant> {
    let stamp = slice.metadata.annotations.as_ref()?.get(TRIGGER_TIME)?;
    let stamp: k8s_openapi::jiff::Timestamp = stamp.parse().ok()?;
    let age = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::from(stamp))
        .ok()?;
    Instant::now().checked_sub(age)
}

/// What the proxy takes: the Services to write again, with when each change came.
#[derive(Debug)]
pub enum Batch {
    Services(Vec<(ServiceKey, Instant)>),
    All(Instant),
}

pub struct ApiSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    index: Mutex<SliceIndex>,
    node: Mutex<NodeInfo>,
    pending: Mutex<Pending>,
    /// Wakes the proxy when something is pending.
    pub changed: Notify,
    services_listed: AtomicBool,
    slices_listed: AtomicBool,
    /// Whether every watch is up (not retrying after an error).
    connected: Mutex<[bool; 3]>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn service_key(service: &Service) -> ServiceKey {
    (service.namespace().unwrap_or_default(), service.name_any())
}

fn slice_key(slice: &EndpointSlice) -> SliceKey {
    (slice.namespace().unwrap_or_default(), slice.name_any())
}

impl ApiSource {
    /// Starts the watches on the current runtime; they end with `shutdown`.
    pub fn start(
        client: Client,
        node_name: Option<String>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (services, services_writer) = reflector::store::<Service>();
        let (slices, slices_writer) = reflector::store::<EndpointSlice>();
        let source = Arc::new(ApiSource {
            services,
            slices,
            index: Mutex::default(),
            node: Mutex::new(NodeInfo {
                name: node_name.clone(),
                zone: None,
            }),
            pending: Mutex::default(),
            changed: Notify::new(),
            services_listed: AtomicBool::new(false),
            slices_listed: AtomicBool::new(false),
            connected: Mutex::new([false, false, node_name.is_none()]),
        });

        let api: Api<Service> = Api::all(client.clone());
        let stream = reflector::reflector(
            services_writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        );
        let me = source.clone();
        tokio::spawn(until(shutdown.clone(), stream, move |event| {
            me.on_service(event)
        }));

        let api: Api<EndpointSlice> = Api::all(client.clone());
        let stream = reflector::reflector(
            slices_writer,
            watcher(api, watcher::Config::default()).default_backoff(),
        );
        let me = source.clone();
        tokio::spawn(until(shutdown.clone(), stream, move |event| {
            me.on_slice(event)
        }));

        if let Some(name) = node_name {
            let api: Api<Node> = Api::all(client);
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let stream = watcher(api, config).default_backoff();
            let me = source.clone();
            tokio::spawn(until(shutdown, stream, move |event| me.on_node(event)));
        }
        source
    }

    fn connected_as(&self, watch: usize, up: bool) {
        let mut connected = lock(&self.connected);
        if connected[watch] != up {
            connected[watch] = up;
            if up {
                info!(
                    watch = ["services", "endpointslices", "node"][watch],
                    "watching the API"
                );
            }
        }
    }

    fn mark(&self, services: impl IntoIterator<Item = ServiceKey>) {
        self.mark_triggered(services, None);
    }

    /// Marks `services` pending, their change triggered at `trigger` when the slice says.
    fn mark_triggered(
        &self,
        services: impl IntoIterator<Item = ServiceKey>,
        trigger: Option<Instant>,
    ) {
        let now = Instant::now();
        let mut pending = lock(&self.pending);
        let mut marked = false;
        for key in services {
            if let Some(at) = trigger {
                let earliest = pending.triggers.entry(key.clone()).or_insert(at);
                *earliest = (*earliest).min(at);
            }
            pending.services.entry(key).or_insert(now);
            marked = true;
        }
        drop(pending);
        if marked {
            self.changed.notify_one();
        }
    }

    fn mark_all(&self) {
        lock(&self.pending).all.get_or_insert_with(Instant::now);
        self.changed.notify_one();
    }

    fn on_service(&self, event: Result<watcher::Event<Service>, watcher::Error>) {
        match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::Delete(s)) => {
                self.mark([service_key(&s)])
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                self.services_listed.store(true, Ordering::SeqCst);
                self.connected_as(0, true);
                self.mark_all();
            }
            Err(e) => {
                self.connected_as(0, false);
                warn!(error = %e, "watching Services; retrying, the datapath stays as it is");
            }
        }
    }

    fn on_slice(&self, event: Result<watcher::Event<EndpointSlice>, watcher::Error>) {
        match event {
            Ok(watcher::Event::Apply(slice)) => {
                let owner = translate::slice_service(&slice);
                let before = lock(&self.index).insert(slice_key(&slice), owner.clone());
                self.mark_triggered(owner.into_iter().chain(before), trigger_instant(&slice));
            }
            Ok(watcher::Event::Delete(slice)) => {
                let before = lock(&self.index).remove(&slice_key(&slice));
                self.mark(before);
            }
            Ok(watcher::Event::Init) => {}
            Ok(watcher::Event::InitApply(_)) => {}
            Ok(watcher::Event::InitDone) => {
                // The store holds the new list now: index it afresh.
                let mut index = SliceIndex::default();
                for slice in self.slices.state() {
                    index.insert(slice_key(&slice), translate::slice_service(&slice));
                }
                *lock(&self.index) = index;
                self.slices_listed.store(true, Ordering::SeqCst);
                self.connected_as(1, true);
                self.mark_all();
            }
            Err(e) => {
                self.connected_as(1, false);
                warn!(error = %e, "watching EndpointSlices; retrying, the datapath stays as it is");
            }
        }
    }

    fn on_node(&self, event: Result<watcher::Event<Node>, watcher::Error>) {
        let node = match event {
            Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => node,
            Ok(watcher::Event::InitDone) => {
                self.connected_as(2, true);
                return;
            }
            Ok(_) => return,
            Err(e) => {
                self.connected_as(2, false);
                warn!(error = %e, "watching this node's Node; retrying");
                return;
            }
        };
        let zone = node.labels().get(ZONE_LABEL).cloned();
        let mut info = lock(&self.node);
        if info.zone != zone {
            info!(zone = ?zone, "this node's zone");
            info.zone = zone;
            drop(info);
            // Topology-aware Services choose by zone.
            self.mark_all();
        }
    }

    /// Whether the first lists are in, so that the datapath may be written.
    pub fn listed(&self) -> bool {
        self.services_listed.load(Ordering::SeqCst) && self.slices_listed.load(Ordering::SeqCst)
    }

    /// Whether every watch is up.
    pub fn connected(&self) -> bool {
        lock(&self.connected).iter().all(|up| *up)
    }

    /// When the oldest change not yet written came (for the health check).
    pub fn pending_since(&self) -> Option<Instant> {
        let pending = lock(&self.pending);
        pending.services.values().copied().chain(pending.all).min()
    }

    /// The Services to write again, once the first lists are in.
    pub fn take(&self) -> Option<Batch> {
        if !self.listed() {
            return None;
        }
        let mut pending = lock(&self.pending);
        let triggers = std::mem::take(&mut pending.triggers);
        if let Some(since) = pending.all.take() {
            let oldest = pending
                .services
                .drain()
                .map(|(_, t)| t)
                .chain([since])
                .min();
            return Some(Batch::All(oldest.unwrap_or(since)));
        }
        if pending.services.is_empty() {
            return None;
        }
        let batch = pending
            .services
            .drain()
            .map(|(key, heard)| {
                let at = triggers.get(&key).map_or(heard, |t| (*t).min(heard));
                (key, at)
            })
            .collect();
        Some(Batch::Services(batch))
    }

    /// Every Service the stores hold, and every one a slice names.
    pub fn all_services(&self) -> Vec<ServiceKey> {
        let mut keys: BTreeSet<ServiceKey> = self
            .services
            .state()
            .iter()
            .map(|s| service_key(s))
            .collect();
        keys.extend(lock(&self.index).slices.keys().cloned());
        keys.into_iter().collect()
    }

    /// One Service's frontends and backends as the stores have them now (none: it is gone).
    pub fn specs(&self, key: &ServiceKey) -> Vec<ServiceSpec> {
        let reference = ObjectRef::<Service>::new(&key.1).within(&key.0);
        let Some(service) = self.services.get(&reference) else {
            return Vec::new();
        };
        let slices: Vec<Arc<EndpointSlice>> = lock(&self.index)
            .slices
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|(ns, name)| {
                self.slices
                    .get(&ObjectRef::<EndpointSlice>::new(name).within(ns))
            })
            .collect();
        let refs: Vec<&EndpointSlice> = slices.iter().map(|s| s.as_ref()).collect();
        let node = lock(&self.node).clone();
        translate::service_specs(&service, &refs, &node)
    }
}

/// Feeds `stream`'s events to `handle` until `shutdown`.
async fn until<S, T>(shutdown: CancellationToken, stream: S, mut handle: impl FnMut(T))
where
    S: futures::Stream<Item = T>,
{
    let mut stream = std::pin::pin!(stream);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => match event {
                Some(event) => handle(event),
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> (String, String) {
        (ns.to_string(), name.to_string())
    }

    fn stamped(stamp: &str) -> EndpointSlice {
        let mut slice = EndpointSlice::default();
        slice.metadata.annotations = Some([(TRIGGER_TIME.to_string(), stamp.to_string())].into());
        slice
    }

    #[test]
    fn programming_latency_starts_at_the_slices_trigger_time() {
        let two_seconds_ago =
            k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(2);
        let at = trigger_instant(&stamped(&two_seconds_ago.to_string())).unwrap();
        let age = at.elapsed().as_secs_f64();
        assert!((2.0..3.0).contains(&age), "{age}");
        // No stamp, a bad one, or one from a clock ahead of ours: the watch event's time.
        assert!(trigger_instant(&EndpointSlice::default()).is_none());
        assert!(trigger_instant(&stamped("yesterday")).is_none());
        let ahead = k8s_openapi::jiff::Timestamp::now() + std::time::Duration::from_secs(60);
        assert!(trigger_instant(&stamped(&ahead.to_string())).is_none());
    }

    #[test]
    fn a_slice_that_moves_between_services_is_filed_under_the_new_one() {
        let mut index = SliceIndex::default();
        assert_eq!(index.insert(key("d", "s-1"), Some(key("d", "a"))), None);
        index.insert(key("d", "s-2"), Some(key("d", "a")));
        assert_eq!(
            index.insert(key("d", "s-1"), Some(key("d", "b"))),
            Some(key("d", "a"))
        );
        assert_eq!(index.slices[&key("d", "a")].len(), 1);
        assert_eq!(index.slices[&key("d", "b")].len(), 1);
        assert_eq!(index.remove(&key("d", "s-2")), Some(key("d", "a")));
        assert!(!index.slices.contains_key(&key("d", "a")));
        // A slice without a service label belongs to none.
        assert_eq!(index.insert(key("d", "s-1"), None), Some(key("d", "b")));
        assert!(index.slices.is_empty());
    }
}
