//! The watch cache: one etcd watch per resource, fanned out to every API watcher of that resource.
//!
//! Each resource's cache keeps the most recent events (a bounded window) so that a watcher can
//! start from any resourceVersion inside the window and receive exactly the events after it; a
//! resourceVersion older than the window is answered with 410 Gone ("too old resource version"),
//! as kube-apiserver's watch cache does. New events reach watchers through a broadcast channel; a
//! watcher that falls behind the channel catches up from the window instead of losing events.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::body::Bytes;
use etcd_client::EventType;
use serde_json::Value;
use tokio::sync::broadcast;
use tracing::{debug, info, warn};

use crate::storage::{decode, Storage};

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One change to one object, decoded once and shared by every watcher.
#[derive(Debug)]
pub struct Event {
    pub revision: i64,
    pub kind: EventKind,
    /// The etcd key, for namespace filtering.
    pub key: String,
    /// The object after the change (for a deletion: as it was, at the deletion's revision).
    pub object: Value,
    /// `object` serialized, so that a hundred watchers do not serialize it a hundred times.
    pub object_json: Bytes,
    /// The object before the change, when there was one (for selectors: an object that stops
    /// matching is a deletion to that watcher).
    pub previous: Option<Value>,
}

/// What the broadcast channel carries.
#[derive(Debug, Clone)]
pub enum Signal {
    Event(Arc<Event>),
    /// Every event up to this revision has been delivered (etcd progress).
    Progress(i64),
    /// The window was reset (etcd compacted past it); watchers must end and start over.
    Reset,
}

/// A watcher's start: the events it has missed, and the channel of what comes next.
pub struct Subscription {
    pub backlog: Vec<Arc<Event>>,
    pub receiver: broadcast::Receiver<Signal>,
    /// The newest revision the cache knows of.
    pub latest: i64,
}

/// The requested resourceVersion is older than the cache's window.
#[derive(Debug)]
pub struct TooOld {
    pub requested: i64,
    pub oldest: i64,
}

struct Window {
    events: VecDeque<Arc<Event>>,
    /// Every event with a revision above this is in `events`.
    complete_after: i64,
    /// The newest revision delivered (by an event or an etcd progress notification).
    latest: i64,
}

pub struct ResourceCache {
    prefix: String,
    capacity: usize,
    window: Mutex<Window>,
    sender: broadcast::Sender<Signal>,
}

impl ResourceCache {
    fn new(prefix: String, capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(4096);
        ResourceCache {
            prefix,
            capacity,
            window: Mutex::new(Window {
                events: VecDeque::new(),
                complete_after: i64::MAX,
                latest: 0,
            }),
            sender,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the cache has started (it cannot serve watchers before its etcd watch is open).
    pub fn started(&self) -> bool {
        self.lock().complete_after != i64::MAX
    }

    /// Events after `revision` and a receiver for what follows, with nothing lost in between.
    pub fn subscribe(&self, revision: i64) -> Result<Subscription, TooOld> {
        let window = self.lock();
        if revision < window.complete_after {
            return Err(TooOld {
                requested: revision,
                oldest: window.complete_after.saturating_add(1),
            });
        }
        let start = window.events.partition_point(|e| e.revision <= revision);
        let backlog = window.events.range(start..).cloned().collect();
        // Subscribed under the lock: the producer publishes under it too.
        let receiver = self.sender.subscribe();
        Ok(Subscription {
            backlog,
            receiver,
            latest: window.latest,
        })
    }

    /// A receiver of what happens from now on (for followers that reload rather than replay).
    pub fn receiver(&self) -> broadcast::Receiver<Signal> {
        self.sender.subscribe()
    }

    /// The newest revision the cache has seen.
    pub fn latest(&self) -> i64 {
        self.lock().latest
    }

    fn reset(&self, revision: i64) {
        let mut window = self.lock();
        window.events.clear();
        window.complete_after = revision;
        window.latest = revision;
        let _ = self.sender.send(Signal::Reset);
    }

    fn publish(&self, event: Event) {
        let event = Arc::new(event);
        let mut window = self.lock();
        window.latest = window.latest.max(event.revision);
        window.events.push_back(event.clone());
        while window.events.len() > self.capacity {
            if let Some(old) = window.events.pop_front() {
                window.complete_after = old.revision;
            }
        }
        let _ = self.sender.send(Signal::Event(event));
    }

    fn progress(&self, revision: i64) {
        let mut window = self.lock();
        if revision > window.latest {
            window.latest = revision;
            let _ = self.sender.send(Signal::Progress(revision));
        }
    }

    /// Follows etcd forever: opens the watch from the revision after the newest one seen,
    /// reopens it when etcd goes away, and resets the window when etcd has compacted past it.
    async fn run(self: Arc<Self>, storage: Storage) {
        let mut delay = Duration::from_millis(100);
        loop {
            if !self.started() {
                match storage.current_revision().await {
                    Ok(revision) => self.reset(revision),
                    Err(e) => {
                        debug!(prefix = %self.prefix, "watch cache waiting for etcd: {e}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let from = self.latest() + 1;
            let mut stream = match storage.watch_prefix(&self.prefix, from).await {
                Ok(stream) => stream,
                Err(e) => {
                    debug!(prefix = %self.prefix, "opening the etcd watch: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            delay = Duration::from_millis(100);
            // etcd answers a progress request with the revision everything is delivered up to;
            // asking regularly keeps bookmarks current when this resource is quiet.
            let mut progress = tokio::time::interval(Duration::from_secs(1));
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    _ = progress.tick() => {
                        if stream.request_progress().await.is_err() {
                            break;
                        }
                        continue;
                    }
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => break,
                    Err(e) => {
                        warn!(prefix = %self.prefix, "etcd watch ended: {e}; reopening");
                        break;
                    }
                };
                if response.compact_revision() > 0 || (response.canceled() && !response.created()) {
                    let revision = match storage.current_revision().await {
                        Ok(r) => r,
                        Err(_) => break,
                    };
                    info!(prefix = %self.prefix, compacted = response.compact_revision(),
                          "etcd compacted past the watch cache; starting over at {revision}");
                    self.reset(revision);
                    break;
                }
                if response.events().is_empty() {
                    if !response.created() {
                        if let Some(header) = response.header() {
                            self.progress(header.revision());
                        }
                    }
                    continue;
                }
                for event in response.events() {
                    match self.decode_event(event) {
                        Some(event) => self.publish(event),
                        None => continue,
                    }
                }
            }
            tokio::time::sleep(delay).await;
        }
    }

    fn decode_event(&self, event: &etcd_client::Event) -> Option<Event> {
        let kv = event.kv()?;
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let revision = kv.mod_revision();
        let previous = event.prev_kv().and_then(|prev| {
            decode(&key, prev.value(), prev.mod_revision())
                .map_err(|e| warn!("{e}"))
                .ok()
        });
        let (kind, object) = match event.event_type() {
            EventType::Put => {
                let object = decode(&key, kv.value(), revision)
                    .map_err(|e| warn!("{e}"))
                    .ok()?;
                let kind = if kv.create_revision() == revision {
                    EventKind::Added
                } else {
                    EventKind::Modified
                };
                (kind, object)
            }
            EventType::Delete => {
                // The object as it was, at the revision that deleted it.
                let mut object = previous.clone()?;
                if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("resourceVersion".into(), revision.to_string().into());
                }
                (EventKind::Deleted, object)
            }
        };
        let object_json = Bytes::from(object.to_string());
        Some(Event {
            revision,
            kind,
            key,
            object,
            object_json,
            previous,
        })
    }
}

/// The caches of all served resources, by storage name.
pub struct WatchCaches {
    caches: HashMap<String, Arc<ResourceCache>>,
}

impl WatchCaches {
    /// Starts one cache (one etcd watch) per resource.
    pub fn start<'a>(
        storage: &Storage,
        resources: impl IntoIterator<Item = &'a str>,
        capacity: usize,
    ) -> Self {
        let mut caches = HashMap::new();
        for name in resources {
            let cache = Arc::new(ResourceCache::new(format!("/registry/{name}/"), capacity));
            tokio::spawn(cache.clone().run(storage.clone()));
            caches.insert(name.to_string(), cache);
        }
        WatchCaches { caches }
    }

    pub fn get(&self, resource: &str) -> Option<&Arc<ResourceCache>> {
        self.caches.get(resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: i64) -> Event {
        Event {
            revision,
            kind: EventKind::Added,
            key: format!("/registry/pods/default/p{revision}"),
            object: Value::Null,
            object_json: Bytes::new(),
            previous: None,
        }
    }

    #[test]
    fn subscribers_get_exactly_the_events_after_their_revision() {
        let cache = ResourceCache::new("/registry/pods/".into(), 3);
        cache.reset(10);
        for rev in 11..=14 {
            cache.publish(event(rev));
        }
        // The window holds 12..=14; 11 fell out, so 10 is too old but 11 is not.
        assert!(cache.subscribe(10).is_err());
        let sub = cache.subscribe(11).unwrap();
        let revs: Vec<i64> = sub.backlog.iter().map(|e| e.revision).collect();
        assert_eq!(revs, [12, 13, 14]);
        assert!(cache.subscribe(14).unwrap().backlog.is_empty());
        let mut sub = cache.subscribe(14).unwrap();
        cache.publish(event(15));
        match sub.receiver.try_recv() {
            Ok(Signal::Event(e)) => assert_eq!(e.revision, 15),
            other => panic!("{other:?}"),
        }
    }
}
