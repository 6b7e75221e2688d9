//! `?watch=true`: a stream of `{"type": ..., "object": ...}` lines from the resource's watch cache,
//! filtered by namespace and selectors, with bookmarks and Kubernetes' resourceVersion rules.
//!
//! - no resourceVersion (or "0"): the current objects as ADDED events, then every change after;
//! - resourceVersion N: every change after N, or an ERROR event with a 410 `Expired` Status when N
//!   is older than the cache's window (the client lists again);
//! - `allowWatchBookmarks=true`: BOOKMARK events carrying the newest revision, so a quiet watcher
//!   can resume without a relist; `sendInitialEvents=true` ends the initial events with a bookmark
//!   annotated `k8s.io/initial-events-end`;
//! - `timeoutSeconds`: the stream ends after it (default 30-60 minutes, as kube-apiserver).
//!
//! An object that stops matching a watcher's selector is a DELETED event to that watcher; one that
//! starts matching is ADDED.

use std::{sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use rand::Rng as _;
use serde_json::{json, Value};
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::StreamExt as _;

use crate::api::{
    http::query::Selector, http::table, registry::resources::Resource, status::ApiError, ApiState,
};
use crate::{
    storage::list_prefix,
    watch_cache::{Event, EventKind, ResourceCache, Signal},
};

/// How often a watcher that asked for bookmarks gets one (when there is news).
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);

/// What a watch request asked for.
pub struct WatchRequest {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub selector: Selector,
    pub params: Vec<(String, String)>,
    pub as_table: bool,
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn flag(params: &[(String, String)], key: &str) -> bool {
    matches!(param(params, key), Some("true" | "1"))
}

pub async fn serve(state: Arc<ApiState>, request: WatchRequest) -> Result<Response, ApiError> {
    let params = &request.params;
    let resource = request.resource;
    let cache = state
        .watches
        .get(resource.storage_name())
        .filter(|c| c.started())
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the watch cache is not ready: etcd is unavailable",
            )
        })?;
    let timeout = match param(params, "timeoutSeconds") {
        Some(v) => Duration::from_secs(
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid timeoutSeconds {v:?}")))?,
        ),
        None => Duration::from_secs(rand::rng().random_range(1800..3600)),
    };
    let bookmarks = flag(params, "allowWatchBookmarks");
    let send_initial = param(params, "sendInitialEvents");
    let prefix = list_prefix(resource.storage_name(), request.namespace.as_deref());
    let mut writer = Writer {
        resource,
        selector: request.selector,
        prefix: prefix.clone(),
        as_table: request.as_table,
        include_object: param(params, "includeObject").unwrap_or("").to_string(),
        first: true,
    };

    // Where the stream starts, and the objects it starts with.
    let mut initial = Vec::new();
    let mut initial_end = false;
    let from = match param(params, "resourceVersion") {
        Some(v) if !v.is_empty() && v != "0" && send_initial != Some("true") => v
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
        _ if send_initial == Some("false") => state.storage.current_revision().await?,
        _ => {
            // The current objects, from the cache at etcd's current revision.
            let current = state.storage.current_revision().await?;
            initial_end = send_initial == Some("true");
            match cache.list(&prefix, current, Duration::from_secs(3)).await {
                Some(snapshot) => {
                    for item in snapshot.items {
                        if writer.selector.matches(&item.object) {
                            initial.push(writer.frame("ADDED", &item.object, Some(&item.json)));
                        }
                    }
                    snapshot.revision
                }
                None => {
                    let page = state.storage.list(&prefix, 0, None, None).await?;
                    for object in page.items {
                        if writer.selector.matches(&object) {
                            initial.push(writer.frame("ADDED", &object, None));
                        }
                    }
                    page.revision
                }
            }
        }
    };

    let (tx, rx) = mpsc::channel::<Bytes>(256);
    match cache.subscribe(from) {
        Ok(subscription) => {
            tokio::spawn(async move {
                let mut stream = Stream {
                    tx,
                    cache,
                    writer,
                    from,
                    last: from,
                    latest: subscription.latest.max(from),
                    bookmarked: from,
                    bookmarks,
                };
                for line in initial {
                    if stream.tx.send(line).await.is_err() {
                        return;
                    }
                }
                if initial_end {
                    let line = stream.writer.bookmark(from, true);
                    if stream.tx.send(line).await.is_err() {
                        return;
                    }
                }
                let _ = tokio::time::timeout(timeout, stream.run(subscription)).await;
            });
        }
        Err(too_old) => {
            let status = ApiError::new(
                StatusCode::GONE,
                "Expired",
                format!(
                    "too old resource version: {} ({})",
                    too_old.requested, too_old.oldest
                ),
            )
            .status();
            let line = Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": status})));
            let _ = tx.try_send(line);
        }
    }
    let body = Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>),
    );
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-cache, private"),
        ],
        body,
    )
        .into_response())
}

/// Encodes events for one watcher.
struct Writer {
    resource: &'static Resource,
    selector: Selector,
    prefix: String,
    as_table: bool,
    include_object: String,
    first: bool,
}

impl Writer {
    fn frame(&mut self, kind: &str, object: &Value, json: Option<&Bytes>) -> Bytes {
        if self.as_table {
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default();
            let mut table = table::render(
                &self.resource.strategy.printer(),
                std::slice::from_ref(object),
                rv,
                &self.include_object,
            );
            // Column definitions once, with the first event, as kube-apiserver sends them.
            if !self.first {
                table["columnDefinitions"] = json!([]);
            }
            self.first = false;
            return Bytes::from(format!("{}\n", json!({"type": kind, "object": table})));
        }
        let mut line = Vec::with_capacity(json.map_or(256, |j| j.len() + 32));
        line.extend_from_slice(b"{\"type\":\"");
        line.extend_from_slice(kind.as_bytes());
        line.extend_from_slice(b"\",\"object\":");
        match json {
            Some(json) => line.extend_from_slice(json),
            None => line.extend_from_slice(object.to_string().as_bytes()),
        }
        line.extend_from_slice(b"}\n");
        Bytes::from(line)
    }

    /// The line for an event, if this watcher sees it (namespace and selectors).
    fn event(&mut self, event: &Event) -> Option<Bytes> {
        if !event.key.starts_with(&self.prefix) {
            return None;
        }
        let kind = if self.selector.is_empty() {
            event.kind
        } else {
            let now = self.selector.matches(&event.object);
            let before = event
                .previous
                .as_ref()
                .is_some_and(|p| self.selector.matches(p));
            match (event.kind, before, now) {
                (EventKind::Deleted, _, true) => EventKind::Deleted,
                (EventKind::Deleted, _, false) => return None,
                (_, true, true) => EventKind::Modified,
                (_, false, true) => EventKind::Added,
                (_, true, false) => EventKind::Deleted,
                (_, false, false) => return None,
            }
        };
        Some(self.frame(kind.as_str(), &event.object, Some(&event.object_json)))
    }

    fn bookmark(&mut self, revision: i64, initial_end: bool) -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if initial_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"kind": self.resource.kind, "apiVersion": self.resource.api_version(),
                            "metadata": metadata});
        Bytes::from(format!(
            "{}\n",
            json!({"type": "BOOKMARK", "object": object})
        ))
    }
}

/// One watcher's stream.
struct Stream {
    tx: mpsc::Sender<Bytes>,
    cache: Arc<ResourceCache>,
    writer: Writer,
    /// The revision the watch started after.
    from: i64,
    /// The newest revision processed (sent or filtered out).
    last: i64,
    /// The newest revision known to be complete (events or etcd progress).
    latest: i64,
    /// The revision of the last bookmark (or the start).
    bookmarked: i64,
    bookmarks: bool,
}

impl Stream {
    async fn run(&mut self, subscription: crate::watch_cache::Subscription) {
        let mut receiver = subscription.receiver;
        for event in subscription.backlog {
            if !self.deliver(&event).await {
                return;
            }
        }
        let mut ticker = tokio::time::interval(BOOKMARK_INTERVAL);
        ticker.tick().await;
        loop {
            let signal = tokio::select! {
                signal = receiver.recv() => signal,
                _ = ticker.tick() => {
                    if self.bookmarks && self.latest.max(self.last) > self.bookmarked {
                        let revision = self.latest.max(self.last);
                        let line = self.writer.bookmark(revision, false);
                        if self.tx.send(line).await.is_err() {
                            return;
                        }
                        self.bookmarked = revision;
                    }
                    continue;
                }
                _ = self.tx.closed() => return,
            };
            match signal {
                Ok(Signal::Event(event)) => {
                    if !self.deliver(&event).await {
                        return;
                    }
                }
                Ok(Signal::Progress(revision)) => self.latest = self.latest.max(revision),
                Ok(Signal::Reset) | Err(RecvError::Closed) => return,
                Err(RecvError::Lagged(_)) => {
                    // Fell behind the channel: catch up from the window, or end (the client
                    // resumes from its last revision and is told if that is too old).
                    match self.cache.subscribe(self.last) {
                        Ok(again) => {
                            receiver = again.receiver;
                            for event in again.backlog {
                                if !self.deliver(&event).await {
                                    return;
                                }
                            }
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }

    /// Sends an event if it is new to this watcher and matches; false when the client is gone.
    async fn deliver(&mut self, event: &Event) -> bool {
        // Already in the initial list, or already processed (a catch-up after lagging repeats
        // the newest revision; events of one transaction share a revision).
        if event.revision <= self.from || event.revision < self.last {
            return true;
        }
        self.last = event.revision;
        self.latest = self.latest.max(event.revision);
        match self.writer.event(event) {
            Some(line) => self.tx.send(line).await.is_ok(),
            None => true,
        }
    }
}
