//! Keeping the cluster view current: watches on Namespaces, Services, EndpointSlices and Pods (kube-rs
//! watchers, which relist and rewatch on their own), a new view built when something changed, and
//! "synced" once every watch has listed once. While the API server is away the last view stays in
//! place, so answers keep coming; the watchers resync when it is back.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use futures::{stream::BoxStream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource, ResourceExt as _,
};

pub use crate::handle::ViewHandle;
use crate::view;

/// The objects of one kind as the watch reports them.
struct Mirror<K> {
    known: BTreeMap<(String, String), K>,
    relisting: BTreeMap<(String, String), K>,
    listed: bool,
}

impl<K: Resource + Clone> Mirror<K> {
    fn new() -> Self {
        Mirror {
            known: BTreeMap::new(),
            relisting: BTreeMap::new(),
            listed: false,
        }
    }

    fn key(object: &K) -> (String, String) {
        (object.namespace().unwrap_or_default(), object.name_any())
    }

    fn apply(&mut self, event: watcher::Event<K>) {
        match event {
            watcher::Event::Apply(o) => {
                self.known.insert(Self::key(&o), o);
            }
            watcher::Event::Delete(o) => {
                self.known.remove(&Self::key(&o));
            }
            watcher::Event::Init => self.relisting.clear(),
            watcher::Event::InitApply(o) => {
                self.relisting.insert(Self::key(&o), o);
            }
            watcher::Event::InitDone => {
                self.known = std::mem::take(&mut self.relisting);
                self.listed = true;
            }
        }
    }

    fn objects(&self) -> Vec<K> {
        self.known.values().cloned().collect()
    }
}

/// One watch event, boxed: the kinds differ a lot in size.
enum Change {
    Namespace(Box<watcher::Event<Namespace>>),
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Pod(Box<watcher::Event<Pod>>),
}

fn watch<K>(
    client: &Client,
    wrap: fn(Box<watcher::Event<K>>) -> Change,
) -> BoxStream<'static, Result<Change, watcher::Error>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .map(move |e| e.map(|e| wrap(Box::new(e))))
        .boxed()
}

/// Starts keeping a view current on the running tokio runtime; `settle` is how long changes are
/// gathered before a new view is built. Pods are watched only when `pods` is set (`pods verified`
/// needs them; CoreDNS does not watch them otherwise). The watches stop once every clone of the
/// returned handle is gone.
pub fn spawn(client: Client, settle: Duration, watch_pods: bool) -> ViewHandle {
    let handle = ViewHandle::default();
    let out = handle.clone();
    tokio::spawn(async move {
        let mut streams = vec![
            watch::<Namespace>(&client, Change::Namespace),
            watch::<Service>(&client, Change::Service),
            watch::<EndpointSlice>(&client, Change::Slice),
        ];
        let (mut namespaces, mut services, mut slices, mut pods) =
            (Mirror::new(), Mirror::new(), Mirror::new(), Mirror::new());
        if watch_pods {
            streams.push(watch::<Pod>(&client, Change::Pod));
        } else {
            pods.listed = true;
        }
        let mut changes = futures::stream::select_all(streams);
        let mut tick = tokio::time::interval(settle);
        let mut dirty = false;
        loop {
            tokio::select! {
                change = changes.next() => match change {
                    Some(Ok(change)) => {
                        match change {
                            Change::Namespace(e) => namespaces.apply(*e),
                            Change::Service(e) => services.apply(*e),
                            Change::Slice(e) => slices.apply(*e),
                            Change::Pod(e) => pods.apply(*e),
                        }
                        dirty = true;
                    }
                    Some(Err(e)) => tracing::warn!("watching the cluster: {e}; answering from the last view"),
                    None => return,
                },
                _ = tick.tick() => {
                    if Arc::strong_count(&out.view) == 1 {
                        return;
                    }
                    let listed = namespaces.listed && services.listed && slices.listed && pods.listed;
                    if dirty && listed {
                        dirty = false;
                        out.set(view::build(
                            &namespaces.objects(),
                            &services.objects(),
                            &slices.objects(),
                            &pods.objects(),
                        ));
                        out.synced.store(true, Ordering::SeqCst);
                    }
                }
            }
        }
    });
    handle
}
