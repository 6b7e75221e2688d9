//! The watch cache: one etcd watch per resource, fanned out to every API watcher of that resource.
//!
//! Each resource's cache keeps the most recent events (a bounded window) so that a watcher can
//! start from any resourceVersion inside the window and receive exactly the events after it; a
//! resourceVersion older than the window is answered with 410 Gone ("too old resource version"),
//! as kube-apiserver's watch cache does. New events reach watchers through a broadcast channel; a
//! watcher that falls behind the channel catches up from the window instead of losing events.
//!
//! The cache also keeps every object's latest state, so that lists are served from memory with
//! their JSON already encoded: a consistent list asks etcd for its current revision, waits until
//! the cache has caught up with it (asking etcd for a progress notification when the resource is
//! quiet), and answers from the state at that revision, as kube-apiserver does with consistent
//! reads from its cache.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
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
    pub object: Arc<Value>,
    /// `object` serialized, so that a hundred watchers do not serialize it a hundred times.
    pub object_json: Bytes,
    /// The object before the change, when there was one (for selectors: an object that stops
    /// matching is a deletion to that watcher).
    pub previous: Option<Arc<Value>>,
}

/// An object as the cache keeps it: decoded (for selectors) and encoded (for responses).
#[derive(Debug, Clone)]
pub struct Cached {
    pub object: Arc<Value>,
    pub json: Bytes,
}

/// A list served from the cache.
pub struct Snapshot {
    /// The objects under the requested prefix, in key order.
    pub items: Vec<Cached>,
    pub revision: i64,
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
    /// Every object's latest state, by etcd key.
    state: BTreeMap<String, Cached>,
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
    /// Wakes the etcd follower to ask for a progress notification now.
    progress_wanted: tokio::sync::Notify,
}

impl ResourceCache {
    fn new(prefix: String, capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(4096);
        ResourceCache {
            prefix,
            capacity,
            window: Mutex::new(Window {
                events: VecDeque::new(),
                state: BTreeMap::new(),
                complete_after: i64::MAX,
                latest: 0,
            }),
            sender,
            progress_wanted: tokio::sync::Notify::new(),
        }
    }

    /// The objects under `prefix` as of a revision at least `revision`, waiting up to `wait` for
    /// the cache to reach it; `None` when it does not (the caller reads etcd instead).
    pub async fn list(&self, prefix: &str, revision: i64, wait: Duration) -> Option<Snapshot> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                let window = self.lock();
                if window.complete_after != i64::MAX && window.latest >= revision {
                    let items = window
                        .state
                        .range(prefix.to_string()..)
                        .take_while(|(k, _)| k.starts_with(prefix))
                        .map(|(_, c)| c.clone())
                        .collect();
                    return Some(Snapshot {
                        items,
                        revision: window.latest,
                    });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            let mut receiver = self.sender.subscribe();
            self.progress_wanted.notify_one();
            // Re-check after subscribing, then wait for news (or the deadline).
            if self.latest() >= revision && self.started() {
                continue;
            }
            let _ = tokio::time::timeout_at(deadline, async {
                loop {
                    match receiver.recv().await {
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                            if self.latest() >= revision {
                                return;
                            }
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            })
            .await;
        }
    }

    /// One object's cached state.
    pub fn get(&self, key: &str) -> Option<Cached> {
        self.lock().state.get(key).cloned()
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

    fn reset(&self, revision: i64, state: BTreeMap<String, Cached>) {
        let mut window = self.lock();
        window.events.clear();
        window.state = state;
        window.complete_after = revision;
        window.latest = revision;
        let _ = self.sender.send(Signal::Reset);
    }

    /// Reads the resource's current state from etcd.
    async fn load(&self, storage: &Storage) -> Result<(i64, BTreeMap<String, Cached>), String> {
        let page = storage
            .list(&self.prefix, 0, None, None)
            .await
            .map_err(|e| e.to_string())?;
        let state = page
            .keys
            .into_iter()
            .zip(page.items)
            .map(|(key, object)| {
                let json = Bytes::from(object.to_string());
                (
                    key,
                    Cached {
                        object: Arc::new(object),
                        json,
                    },
                )
            })
            .collect();
        Ok((page.revision, state))
    }

    /// Applies one etcd change: to the state, the window and the watchers.
    fn apply(&self, key: String, value: &[u8], revision: i64, created: i64, deleted: bool) {
        let mut window = self.lock();
        let previous = window.state.get(&key).map(|c| c.object.clone());
        let (kind, object, object_json) = if deleted {
            let Some(gone) = window.state.remove(&key) else {
                return;
            };
            // The object as it was, at the revision that deleted it.
            let mut object = (*gone.object).clone();
            if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("resourceVersion".into(), revision.to_string().into());
            }
            let json = Bytes::from(object.to_string());
            (EventKind::Deleted, Arc::new(object), json)
        } else {
            let object = match decode(&key, value, revision) {
                Ok(object) => object,
                Err(e) => {
                    warn!("{e}");
                    return;
                }
            };
            let kind = if created == revision {
                EventKind::Added
            } else {
                EventKind::Modified
            };
            let json = Bytes::from(object.to_string());
            let object = Arc::new(object);
            window.state.insert(
                key.clone(),
                Cached {
                    object: object.clone(),
                    json: json.clone(),
                },
            );
            (kind, object, json)
        };
        let event = Arc::new(Event {
            revision,
            kind,
            key,
            object,
            object_json,
            previous,
        });
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

    /// Follows etcd forever: loads the state, opens the watch from the revision after the newest
    /// one seen, reopens it when etcd goes away, and starts over when etcd has compacted past it.
    async fn run(self: Arc<Self>, storage: Storage) {
        let mut delay = Duration::from_millis(100);
        loop {
            if !self.started() {
                match self.load(&storage).await {
                    Ok((revision, state)) => self.reset(revision, state),
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
            // asking regularly keeps bookmarks current when this resource is quiet, and a list
            // waiting for a revision asks at once.
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
                    _ = self.progress_wanted.notified() => {
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
                    info!(prefix = %self.prefix, compacted = response.compact_revision(),
                          "etcd compacted past the watch cache; loading the state again");
                    match self.load(&storage).await {
                        Ok((revision, state)) => self.reset(revision, state),
                        Err(e) => warn!(prefix = %self.prefix, "reloading: {e}"),
                    }
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
                    if let Some(kv) = event.kv() {
                        self.apply(
                            String::from_utf8_lossy(kv.key()).into_owned(),
                            kv.value(),
                            kv.mod_revision(),
                            kv.create_revision(),
                            event.event_type() == EventType::Delete,
                        );
                    }
                }
            }
            tokio::time::sleep(delay).await;
        }
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

    fn put(cache: &ResourceCache, name: &str, revision: i64, create_revision: i64) {
        let value = format!(r#"{{"metadata":{{"name":"{name}"}}}}"#);
        cache.apply(
            format!("/registry/pods/default/{name}"),
            value.as_bytes(),
            revision,
            create_revision,
            false,
        );
    }

    #[tokio::test]
    async fn subscribers_get_exactly_the_events_after_their_revision() {
        let cache = ResourceCache::new("/registry/pods/".into(), 3);
        cache.reset(10, BTreeMap::new());
        for rev in 11..=14 {
            put(&cache, &format!("p{rev}"), rev, rev);
        }
        // The window holds 12..=14; 11 fell out, so 10 is too old but 11 is not.
        assert!(cache.subscribe(10).is_err());
        let sub = cache.subscribe(11).unwrap();
        let revs: Vec<i64> = sub.backlog.iter().map(|e| e.revision).collect();
        assert_eq!(revs, [12, 13, 14]);
        assert!(cache.subscribe(14).unwrap().backlog.is_empty());
        let mut sub = cache.subscribe(14).unwrap();
        put(&cache, "p11", 15, 11);
        match sub.receiver.try_recv() {
            Ok(Signal::Event(e)) => {
                assert_eq!((e.revision, e.kind), (15, EventKind::Modified));
                assert!(e.previous.is_some());
            }
            other => panic!("{other:?}"),
        }
        // The state has every object once, at its latest revision.
        let list = cache
            .list("/registry/pods/default/", 15, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(list.items.len(), 4);
        assert_eq!(list.revision, 15);
        assert!(cache
            .list("/registry/pods/default/", 16, Duration::ZERO)
            .await
            .is_none());
    }
}
