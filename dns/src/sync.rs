//! Keeping the cluster view current: watches on Namespaces, Services, EndpointSlices and Pods (kube-rs
//! watchers, which relist and rewatch on their own), a new view built when something changed, and
//! "synced" once every watch has listed once. While the API server is away the last view stays in
//! place, so answers keep coming; the watchers resync when it is back.

use std::{
    collections::BTreeMap,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
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

/// What the objects of one kind contribute to the view, as the watch reports them: each object is
/// converted as it arrives (a Pod becomes its namespace and addresses), so the watches keep only
/// what answers need.
struct Mirror<T> {
    known: BTreeMap<(String, String), T>,
    relisting: BTreeMap<(String, String), T>,
    listed: bool,
}

impl<T> Mirror<T> {
    fn new() -> Self {
        Mirror {
            known: BTreeMap::new(),
            relisting: BTreeMap::new(),
            listed: false,
        }
    }

    fn apply<K: Resource>(&mut self, event: watcher::Event<K>, convert: fn(&K) -> Option<T>) {
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match event {
            watcher::Event::Apply(o) => match convert(&o) {
                Some(t) => {
                    self.known.insert(key(&o), t);
                }
                None => {
                    self.known.remove(&key(&o));
                }
            },
            watcher::Event::Delete(o) => {
                self.known.remove(&key(&o));
            }
            watcher::Event::Init => self.relisting.clear(),
            watcher::Event::InitApply(o) => {
                if let Some(t) = convert(&o) {
                    self.relisting.insert(key(&o), t);
                }
            }
            watcher::Event::InitDone => {
                self.known = std::mem::take(&mut self.relisting);
                self.listed = true;
            }
        }
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
/// gathered before a new view is built. Pods are watched only with `watch_pods` (`pods verified`
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
        let mut next_build = Instant::now();
        loop {
            tokio::select! {
                change = changes.next() => match change {
                    Some(Ok(change)) => {
                        match change {
                            Change::Namespace(e) => namespaces.apply(*e, view::namespace),
                            Change::Service(e) => services.apply(*e, view::service),
                            Change::Slice(e) => slices.apply(*e, view::slice),
                            Change::Pod(e) => pods.apply(*e, view::pod),
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
                    if dirty && listed && Instant::now() >= next_build {
                        dirty = false;
                        let started = Instant::now();
                        // Off the runtime's worker, so queries keep being answered meanwhile.
                        let assemble = || {
                            view::assemble(
                                namespaces.known.values(),
                                services.known.values(),
                                slices.known.values(),
                                pods.known.values(),
                            )
                        };
                        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
                            == tokio::runtime::RuntimeFlavor::MultiThread;
                        let view = if multi_thread {
                            tokio::task::block_in_place(assemble)
                        } else {
                            assemble()
                        };
                        out.set(view);
                        out.synced.store(true, Ordering::SeqCst);
                        // A big cluster under churn: build at most a fifth of the time.
                        next_build = Instant::now() + started.elapsed() * 4;
                    }
                }
            }
        }
    });
    handle
}
