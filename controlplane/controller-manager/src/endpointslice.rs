//! The EndpointSlice and Endpoints controllers: for every Service with a selector, the Pods it
//! selects become `discovery.k8s.io/v1` EndpointSlices (ready, serving and terminating
//! conditions, named targetPorts resolved per Pod, at most `max_endpoints_per_slice` endpoints a
//! slice, one slice set per port mapping and address family) and the legacy `v1` Endpoints.
//!
//! One Pod changing rewrites only the slice that holds it: endpoints stay in the slice they are
//! in, new ones go into slices that are being written anyway, then into slices with room, and
//! only then into a new slice. After a write, a Service is not worked on again until the watch
//! has shown that write (client-go's expectations), so no decision is made on a stale cache.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{stream, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{
            EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, ObjectReference,
            Pod, Service,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::OwnerReference, util::intstr::IntOrString},
};
use kube::{
    api::{DeleteParams, ObjectMeta, PostParams},
    runtime::{
        reflector::{self, Store},
        watcher, WatchStreamExt as _,
    },
    Api, Client, ResourceExt as _,
};
use prometheus_client::metrics::{counter::Counter, family::Family};
use seine_apimachinery::labels::Selector;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    metrics::{self, SyncLabels},
    queue::Queue,
};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The annotation that says when the change behind a slice's write happened.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The legacy Endpoints object holds at most this many addresses (as in Kubernetes).
const MAX_ENDPOINTS_ADDRESSES: usize = 1000;

#[derive(Debug, Clone)]
pub struct Config {
    /// `--max-endpoints-per-slice` (Kubernetes' default 100).
    pub max_endpoints_per_slice: usize,
    /// `--concurrent-service-endpoint-syncs`.
    pub workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_endpoints_per_slice: 100,
            workers: 5,
        }
    }
}

/// namespace/name of a Service.
type Key = (String, String);

/// A write this controller made that the watch has not shown yet.
#[derive(Debug, Clone)]
enum Expect {
    Slice { name: String, version: u64 },
    SliceGone { name: String },
    Endpoints { version: u64 },
}

struct Ctx {
    client: Client,
    config: Config,
    services: Store<Service>,
    pods: Store<Pod>,
    slices: Store<EndpointSlice>,
    endpoints: Store<Endpoints>,
    queue: Arc<Queue<Key>>,
    /// The Services each Pod last matched, so a Pod whose labels change leaves the old ones.
    pod_services: Mutex<HashMap<Key, HashSet<Key>>>,
    expect: Mutex<HashMap<Key, Vec<Expect>>>,
    writes: Family<SyncLabels, Counter>,
}

fn version(meta: &ObjectMeta) -> u64 {
    meta.resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn key_of(meta: &ObjectMeta) -> Key {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    service.namespace() == pod.namespace() && Selector::from_map(selector).matches(pod.labels())
}

/// Runs the controllers until a watch ends for good (an error) or `shutdown`, after which the
/// syncs in progress finish.
pub async fn run(
    client: Client,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (services, services_w) = reflector::store::<Service>();
    let (pods, pods_w) = reflector::store::<Pod>();
    let (slices, slices_w) = reflector::store::<EndpointSlice>();
    let (endpoints, endpoints_w) = reflector::store::<Endpoints>();
    let writes = Family::<SyncLabels, Counter>::default();
    metrics::register(
        "seine_endpointslice_writes",
        "EndpointSlice and Endpoints writes, by object and operation",
        writes.clone(),
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        config: config.clone(),
        services,
        pods,
        slices,
        endpoints,
        queue: Queue::new(),
        pod_services: Mutex::new(HashMap::new()),
        expect: Mutex::new(HashMap::new()),
        writes,
    });

    enum Change {
        Service(Box<watcher::Event<Service>>),
        Pod(Box<watcher::Event<Pod>>),
        Slice(watcher::Event<EndpointSlice>),
        Endpoints(watcher::Event<Endpoints>),
    }
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let changes = stream::select_all([
        reflector::reflector(
            services_w,
            watcher(Api::<Service>::all(client.clone()), Default::default()).default_backoff(),
        )
        .map(|e| e.map(|e| Change::Service(Box::new(e))))
        .boxed(),
        reflector::reflector(
            pods_w,
            watcher(Api::<Pod>::all(client.clone()), Default::default()).default_backoff(),
        )
        .map(|e| e.map(|e| Change::Pod(Box::new(e))))
        .boxed(),
        reflector::reflector(
            slices_w,
            watcher(Api::<EndpointSlice>::all(client.clone()), managed).default_backoff(),
        )
        .map(|e| e.map(Change::Slice))
        .boxed(),
        reflector::reflector(
            endpoints_w,
            watcher(Api::<Endpoints>::all(client.clone()), Default::default()).default_backoff(),
        )
        .map(|e| e.map(Change::Endpoints))
        .boxed(),
    ]);

    // One task waits for the caches: a store's readiness wakes only its last waiter (a oneshot
    // underneath), so workers waiting on it themselves would mostly never start.
    let synced = CancellationToken::new();
    let mut workers = JoinSet::new();
    workers.spawn({
        let (ctx, synced, shutdown) = (ctx.clone(), synced.clone(), shutdown.clone());
        async move {
            let ready = async {
                ctx.services.wait_until_ready().await?;
                ctx.pods.wait_until_ready().await?;
                ctx.slices.wait_until_ready().await?;
                ctx.endpoints.wait_until_ready().await
            };
            tokio::select! {
                result = ready => if result.is_ok() { synced.cancel() },
                _ = shutdown.cancelled() => {}
            }
        }
    });
    for _ in 0..config.workers.max(1) {
        let ctx = ctx.clone();
        let (shutdown, synced) = (shutdown.clone(), synced.clone());
        workers.spawn(async move {
            tokio::select! {
                _ = synced.cancelled() => {}
                _ = shutdown.cancelled() => return,
            }
            loop {
                // A sync in progress finishes; no new one starts after `shutdown`.
                let key = tokio::select! {
                    key = ctx.queue.next() => key,
                    _ = shutdown.cancelled() => return,
                };
                let outcome = sync(&ctx, &key).await;
                match outcome {
                    Ok(Synced::Done) => {
                        metrics::synced("endpointslice", true);
                        ctx.queue.done(key, true);
                    }
                    Ok(Synced::Stale) => {
                        // Comes back when the watch shows our last write (or after a while).
                        ctx.queue.done(key.clone(), true);
                        ctx.queue.add_after(key, Duration::from_millis(50));
                    }
                    Err(e) => {
                        metrics::synced("endpointslice", false);
                        debug!(service = %format!("{}/{}", key.0, key.1), "sync failed: {e:#}");
                        ctx.queue.done(key, false);
                    }
                }
            }
        });
    }

    let mut changes = changes.take_until(Box::pin(shutdown.clone().cancelled_owned()));
    while let Some(change) = changes.next().await {
        let change = match change {
            Ok(c) => c,
            Err(e) => {
                warn!("watch: {e}");
                continue;
            }
        };
        match change {
            Change::Service(event) => match *event {
                watcher::Event::Apply(s)
                | watcher::Event::InitApply(s)
                | watcher::Event::Delete(s) => ctx.queue.add(key_of(&s.metadata)),
                watcher::Event::InitDone => {
                    info!(services = ctx.services.state().len(), "services listed");
                }
                watcher::Event::Init => {}
            },
            Change::Pod(event) => match *event {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    pod_changed(&ctx, &p, false)
                }
                watcher::Event::Delete(p) => pod_changed(&ctx, &p, true),
                watcher::Event::InitDone => {
                    // After a relist, deletions the watch missed are only seen by syncing all.
                    for s in ctx.services.state() {
                        ctx.queue.add(key_of(&s.metadata));
                    }
                }
                watcher::Event::Init => {}
            },
            Change::Slice(event) => match event {
                watcher::Event::Apply(s)
                | watcher::Event::InitApply(s)
                | watcher::Event::Delete(s) => {
                    if let Some(service) = s.labels().get(SERVICE_NAME_LABEL) {
                        ctx.queue
                            .add((s.namespace().unwrap_or_default(), service.clone()));
                    }
                }
                _ => {}
            },
            Change::Endpoints(event) => match event {
                watcher::Event::Apply(e) | watcher::Event::Delete(e) => {
                    let key = key_of(&e.metadata);
                    if ctx.expect.lock().is_ok_and(|x| x.contains_key(&key)) {
                        ctx.queue.add(key);
                    }
                }
                _ => {}
            },
        }
    }
    if !shutdown.is_cancelled() {
        anyhow::bail!("the watches ended");
    }
    while workers.join_next().await.is_some() {}
    Ok(())
}

fn pod_changed(ctx: &Ctx, pod: &Pod, deleted: bool) {
    let pod_key = key_of(&pod.metadata);
    let now: HashSet<Key> = if deleted {
        HashSet::new()
    } else {
        ctx.services
            .state()
            .iter()
            .filter(|s| selects(s, pod))
            .map(|s| key_of(&s.metadata))
            .collect()
    };
    let before = {
        let Ok(mut map) = ctx.pod_services.lock() else {
            return;
        };
        if deleted {
            map.remove(&pod_key)
        } else {
            map.insert(pod_key, now.clone())
        }
    };
    for key in now.into_iter().chain(before.into_iter().flatten()) {
        ctx.queue.add(key);
    }
}

enum Synced {
    Done,
    /// The cache has not caught up with this controller's last write.
    Stale,
}

fn slices_of(ctx: &Ctx, key: &Key) -> Vec<Arc<EndpointSlice>> {
    ctx.slices.state_filter(|s| {
        s.metadata.namespace.as_deref() == Some(&key.0)
            && s.labels().get(SERVICE_NAME_LABEL) == Some(&key.1)
            && s.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
    })
}

/// Whether the cache shows every write made for `key`; forgets those it shows.
fn caught_up(ctx: &Ctx, key: &Key, slices: &[Arc<EndpointSlice>]) -> bool {
    let Ok(mut expect) = ctx.expect.lock() else {
        return true;
    };
    let Some(pending) = expect.get_mut(key) else {
        return true;
    };
    let endpoints_version = ctx
        .endpoints
        .get(&reflector::ObjectRef::new(&key.1).within(&key.0))
        .map(|e| version(&e.metadata))
        .unwrap_or(0);
    pending.retain(|e| match e {
        Expect::Slice { name, version: v } => !slices
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(name) && version(&s.metadata) >= *v),
        Expect::SliceGone { name } => slices
            .iter()
            .any(|s| s.metadata.name.as_deref() == Some(name)),
        Expect::Endpoints { version: v } => endpoints_version < *v,
    });
    if pending.is_empty() {
        expect.remove(key);
        true
    } else {
        false
    }
}

fn expect(ctx: &Ctx, key: &Key, e: Expect) {
    if let Ok(mut map) = ctx.expect.lock() {
        map.entry(key.clone()).or_default().push(e);
    }
}

fn count(ctx: &Ctx, object: &str, operation: &str) {
    ctx.writes
        .get_or_create(&SyncLabels {
            controller: object.to_string(),
            result: operation.to_string(),
        })
        .inc();
}

async fn sync(ctx: &Ctx, key: &Key) -> anyhow::Result<Synced> {
    let slices = slices_of(ctx, key);
    if !caught_up(ctx, key, &slices) {
        return Ok(Synced::Stale);
    }
    let service = ctx
        .services
        .get(&reflector::ObjectRef::new(&key.1).within(&key.0));
    let slice_api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &key.0);
    let endpoints_api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &key.0);
    let Some(service) = service else {
        // The Service is gone: so are its slices and Endpoints.
        for s in &slices {
            let name = s.name_any();
            delete(&slice_api, &name).await?;
            count(ctx, "EndpointSlice", "delete");
            expect(ctx, key, Expect::SliceGone { name });
        }
        let current = ctx
            .endpoints
            .get(&reflector::ObjectRef::new(&key.1).within(&key.0));
        if current.is_some() {
            delete(&endpoints_api, &key.1).await?;
            count(ctx, "Endpoints", "delete");
        }
        return Ok(Synced::Done);
    };
    let spec = service.spec.clone().unwrap_or_default();
    if spec.selector.as_ref().is_none_or(|s| s.is_empty())
        || spec.type_.as_deref() == Some("ExternalName")
    {
        // Slices and Endpoints of a Service without a selector are its owner's to write.
        return Ok(Synced::Done);
    }
    let pods: Vec<Arc<Pod>> = ctx.pods.state_filter(|p| selects(&service, p));
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let desired = desired_endpoints(&service, &pods);

    // EndpointSlices.
    let plan = plan_slices(
        &service,
        &desired,
        &slices,
        ctx.config.max_endpoints_per_slice.max(1),
    );
    for name in plan.delete {
        delete(&slice_api, &name).await?;
        count(ctx, "EndpointSlice", "delete");
        expect(ctx, key, Expect::SliceGone { name });
    }
    let wrote = |written: EndpointSlice, operation: &str| {
        count(ctx, "EndpointSlice", operation);
        let (name, version) = (written.name_any(), version(&written.metadata));
        expect(ctx, key, Expect::Slice { name, version });
    };
    let trigger = trigger_time(&service, &pods);
    let stamp = |mut slice: EndpointSlice| {
        if let Some(at) = &trigger {
            slice
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(TRIGGER_TIME.into(), at.clone());
        }
        slice
    };
    for slice in plan.update.into_iter().map(stamp) {
        let name = slice.name_any();
        wrote(
            slice_api
                .replace(&name, &PostParams::default(), &slice)
                .await?,
            "update",
        );
    }
    for slice in plan.create.into_iter().map(stamp) {
        wrote(
            slice_api.create(&PostParams::default(), &slice).await?,
            "create",
        );
    }

    // The legacy Endpoints.
    let current = ctx
        .endpoints
        .get(&reflector::ObjectRef::new(&key.1).within(&key.0));
    let wanted = legacy_endpoints(&service, &desired, publish_not_ready);
    match current {
        Some(current)
            if current.subsets == wanted.subsets
                && current.metadata.labels == wanted.metadata.labels
                && current.metadata.annotations == wanted.metadata.annotations => {}
        Some(current) => {
            let mut next = wanted;
            next.metadata.resource_version = current.metadata.resource_version.clone();
            let written = endpoints_api
                .replace(&key.1, &PostParams::default(), &next)
                .await?;
            wrote_endpoints(ctx, key, &written, "update");
        }
        None => {
            let written = endpoints_api
                .create(&PostParams::default(), &wanted)
                .await?;
            wrote_endpoints(ctx, key, &written, "create");
        }
    }
    Ok(Synced::Done)
}

fn wrote_endpoints(ctx: &Ctx, key: &Key, written: &Endpoints, operation: &str) {
    count(ctx, "Endpoints", operation);
    let version = version(&written.metadata);
    expect(ctx, key, Expect::Endpoints { version });
}

async fn delete<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// One Pod's endpoint, with the ports its containers resolve the Service's targetPorts to.
#[derive(Debug, Clone)]
struct Desired {
    ip: IpAddr,
    endpoint: Endpoint,
    ports: Vec<EndpointPort>,
    terminating: bool,
    ready: bool,
}

/// When the change a write of `service`'s slices answers happened: the latest of the Service's
/// creation and its pods' readiness flips (or creation, for a pod not yet flipped), in RFC 3339
/// with nanoseconds. The agents measure network programming latency from it. Kubernetes keeps
/// the earliest change not yet written instead; the latest is that one whenever one change
/// triggers the write, and without state to keep.
fn trigger_time(service: &Service, pods: &[Arc<Pod>]) -> Option<String> {
    let ready_since = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .and_then(|c| c.last_transition_time.clone())
            .or_else(|| pod.metadata.creation_timestamp.clone())
    };
    pods.iter()
        .filter_map(|p| ready_since(p))
        .chain(service.metadata.creation_timestamp.clone())
        .map(|t| t.0)
        .max()
        .map(|t| t.to_string())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The port a Service port's targetPort means on this Pod; None when a named port is not
/// declared by its containers.
fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: &Pod) -> Option<i32> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports.as_ref()?.iter().find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then_some(p.container_port)
                })
            })
        }
    }
}

fn desired_endpoints(service: &Service, pods: &[Arc<Pod>]) -> Vec<Desired> {
    let spec = service.spec.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut out = Vec::new();
    for pod in pods {
        let status = pod.status.clone().unwrap_or_default();
        if matches!(status.phase.as_deref(), Some("Succeeded") | Some("Failed")) {
            continue;
        }
        let Some(ip) = status
            .pod_ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let serving = publish_not_ready || pod_ready(pod);
        let ready = publish_not_ready || (serving && !terminating);
        let pod_spec = pod.spec.clone().unwrap_or_default();
        let hostname = match (&pod_spec.hostname, &pod_spec.subdomain) {
            (Some(h), Some(sub)) if !h.is_empty() && *sub == service.name_any() => Some(h.clone()),
            _ => None,
        };
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(EndpointPort {
                    name: Some(p.name.clone().unwrap_or_default()),
                    port: Some(target_port(p, pod)?),
                    protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                    app_protocol: p.app_protocol.clone(),
                })
            })
            .collect();
        out.push(Desired {
            ip,
            endpoint: Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(serving),
                    terminating: Some(terminating),
                }),
                hostname,
                node_name: pod_spec.node_name.clone(),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    namespace: pod.metadata.namespace.clone(),
                    name: pod.metadata.name.clone(),
                    uid: pod.metadata.uid.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ports,
            terminating,
            ready,
        });
    }
    out
}

fn address_type(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// The group a slice belongs to: its address type and its ports.
fn group_of(address_type: &str, ports: &[EndpointPort]) -> String {
    format!(
        "{address_type}|{}",
        serde_json::to_string(ports).unwrap_or_default()
    )
}

#[derive(Debug, Default)]
struct Plan {
    create: Vec<EndpointSlice>,
    update: Vec<EndpointSlice>,
    delete: Vec<String>,
}

fn slice_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels = service.labels().clone();
    labels.insert(SERVICE_NAME_LABEL.into(), service.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    if service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    } else {
        labels.remove(HEADLESS_LABEL);
    }
    labels
}

fn owner(service: &Service) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: service.name_any(),
        uid: service.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn new_slice(
    service: &Service,
    address_type: &str,
    ports: Option<Vec<EndpointPort>>,
) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", service.name_any())),
            namespace: service.metadata.namespace.clone(),
            labels: Some(slice_labels(service)),
            owner_references: Some(vec![owner(service)]),
            ..Default::default()
        },
        address_type: address_type.into(),
        endpoints: Vec::new(),
        ports,
    }
}

/// A slice group's address type, ports and endpoints by address.
type Group = (String, Vec<EndpointPort>, BTreeMap<String, Endpoint>);

/// What to write so that the slices hold `desired`, moving as few endpoints as possible.
fn plan_slices(
    service: &Service,
    desired: &[Desired],
    existing: &[Arc<EndpointSlice>],
    max: usize,
) -> Plan {
    let mut plan = Plan::default();
    let labels = slice_labels(service);
    let owners = vec![owner(service)];
    // Desired endpoints by group, then by address.
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for d in desired {
        let kind = address_type(&d.ip);
        groups
            .entry(group_of(kind, &d.ports))
            .or_insert_with(|| (kind.to_string(), d.ports.clone(), BTreeMap::new()))
            .2
            .insert(d.ip.to_string(), d.endpoint.clone());
    }
    let placeholder = groups.is_empty();
    let mut by_group: BTreeMap<String, Vec<EndpointSlice>> = BTreeMap::new();
    for s in existing {
        let ports = s.ports.clone().unwrap_or_default();
        let g = if s.ports.is_none() && s.endpoints.is_empty() {
            "placeholder".to_string()
        } else {
            group_of(&s.address_type, &ports)
        };
        by_group.entry(g).or_default().push((**s).clone());
    }
    if placeholder {
        // A Service with no endpoints keeps one empty slice with no ports (as Kubernetes).
        let mut kept = false;
        for (g, slices) in by_group {
            for mut s in slices {
                if g == "placeholder" && !kept {
                    kept = true;
                    if s.metadata.labels.as_ref() != Some(&labels)
                        || s.metadata.owner_references.as_ref() != Some(&owners)
                    {
                        s.metadata.labels = Some(labels.clone());
                        s.metadata.owner_references = Some(owners.clone());
                        plan.update.push(s);
                    }
                } else {
                    plan.delete.push(s.name_any());
                }
            }
        }
        if !kept {
            plan.create.push(new_slice(service, "IPv4", None));
        }
        return plan;
    }
    for (g, slices) in &by_group {
        if !groups.contains_key(g) {
            plan.delete.extend(slices.iter().map(|s| s.name_any()));
        }
    }
    for (g, (kind, ports, mut wanted)) in groups {
        let mut slices = by_group.remove(&g).unwrap_or_default();
        let mut changed = vec![false; slices.len()];
        // Endpoints stay where they are; gone ones leave, changed ones are rewritten.
        for (i, s) in slices.iter_mut().enumerate() {
            let before = std::mem::take(&mut s.endpoints);
            for e in before {
                let address = e.addresses.first().cloned().unwrap_or_default();
                match wanted.remove(&address) {
                    Some(w) => {
                        if w != e {
                            changed[i] = true;
                        }
                        s.endpoints.push(w);
                    }
                    None => changed[i] = true,
                }
            }
            if s.metadata.labels.as_ref() != Some(&labels)
                || s.metadata.owner_references.as_ref() != Some(&owners)
            {
                s.metadata.labels = Some(labels.clone());
                s.metadata.owner_references = Some(owners.clone());
                changed[i] = true;
            }
        }
        // New endpoints: into slices being written anyway, then slices with room, then new.
        let mut rest: Vec<Endpoint> = wanted.into_values().collect();
        for pass in [true, false] {
            for (i, s) in slices.iter_mut().enumerate() {
                if rest.is_empty() {
                    break;
                }
                if changed[i] != pass {
                    continue;
                }
                while s.endpoints.len() < max {
                    let Some(e) = rest.pop() else { break };
                    s.endpoints.push(e);
                    changed[i] = true;
                }
            }
        }
        while !rest.is_empty() {
            let mut s = new_slice(service, &kind, Some(ports.clone()));
            let take = rest.len().min(max);
            s.endpoints = rest.split_off(rest.len() - take);
            plan.create.push(s);
        }
        for (s, changed) in slices.into_iter().zip(changed) {
            if s.endpoints.is_empty() {
                plan.delete.push(s.name_any());
            } else if changed {
                plan.update.push(s);
            }
        }
    }
    plan
}

/// A legacy subset's ports, ready and not-ready addresses (by address, for sorting).
type Subset = (
    Vec<CorePort>,
    Vec<(IpAddr, EndpointAddress)>,
    Vec<(IpAddr, EndpointAddress)>,
);

/// The legacy Endpoints: ready addresses, not-ready ones, per port set, sorted by address.
fn legacy_endpoints(service: &Service, desired: &[Desired], publish_not_ready: bool) -> Endpoints {
    let mut labels = service.labels().clone();
    if service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    } else {
        labels.remove(HEADLESS_LABEL);
    }
    let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
    let mut total = 0;
    for d in desired {
        if d.terminating && !publish_not_ready {
            continue;
        }
        if total >= MAX_ENDPOINTS_ADDRESSES {
            break;
        }
        total += 1;
        let ports: Vec<CorePort> = d
            .ports
            .iter()
            .map(|p| CorePort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: p.port.unwrap_or_default(),
                protocol: p.protocol.clone(),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let group = serde_json::to_string(&ports).unwrap_or_default();
        let entry = subsets
            .entry(group)
            .or_insert_with(|| (ports, Vec::new(), Vec::new()));
        let address = EndpointAddress {
            ip: d.ip.to_string(),
            hostname: d.endpoint.hostname.clone(),
            node_name: d.endpoint.node_name.clone(),
            target_ref: d.endpoint.target_ref.clone(),
        };
        if d.ready {
            entry.1.push((d.ip, address));
        } else {
            entry.2.push((d.ip, address));
        }
    }
    let subsets: Vec<EndpointSubset> = subsets
        .into_values()
        .map(|(ports, mut ready, mut not_ready)| {
            ready.sort_by_key(|(ip, _)| *ip);
            not_ready.sort_by_key(|(ip, _)| *ip);
            let list = |v: Vec<(IpAddr, EndpointAddress)>| {
                (!v.is_empty()).then(|| v.into_iter().map(|(_, a)| a).collect())
            };
            EndpointSubset {
                addresses: list(ready),
                not_ready_addresses: list(not_ready),
                ports: (!ports.is_empty()).then_some(ports),
            }
        })
        .collect();
    let over = desired
        .iter()
        .filter(|d| !d.terminating || publish_not_ready)
        .count()
        > MAX_ENDPOINTS_ADDRESSES;
    Endpoints {
        metadata: ObjectMeta {
            name: Some(service.name_any()),
            namespace: service.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: over.then(|| {
                BTreeMap::from([(
                    "endpoints.kubernetes.io/over-capacity".to_string(),
                    "truncated".to_string(),
                )])
            }),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(ports: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "s1"},
            "spec": {"selector": {"app": "web"}, "ports": ports}
        }))
        .unwrap()
    }

    fn pod(name: &str, ip: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": name, "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
                         "nodeName": "n1"},
                "status": {"podIP": ip, "phase": "Running",
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
            }))
            .unwrap(),
        )
    }

    fn written(plan: Plan) -> Vec<Arc<EndpointSlice>> {
        plan.create
            .into_iter()
            .enumerate()
            .map(|(i, mut s)| {
                s.metadata.name = Some(format!("web-{i}"));
                Arc::new(s)
            })
            .collect()
    }

    #[test]
    fn named_ports_resolve_per_pod_and_slices_hold_at_most_max() {
        let svc = service(json!([{"name": "http", "port": 80, "targetPort": "http"}]));
        let pods: Vec<Arc<Pod>> = (0..5)
            .map(|i| pod(&format!("p{i}"), &format!("10.0.0.{i}"), i != 0))
            .collect();
        let desired = desired_endpoints(&svc, &pods);
        assert_eq!(desired[1].ports[0].port, Some(8080));
        let plan = plan_slices(&svc, &desired, &[], 2);
        assert_eq!(plan.create.len(), 3);
        assert!(plan.create.iter().all(|s| s.endpoints.len() <= 2));
        let not_ready: Vec<_> = plan
            .create
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.conditions.as_ref().unwrap().ready == Some(false))
            .collect();
        assert_eq!(not_ready.len(), 1);
        assert_eq!(not_ready[0].addresses, vec!["10.0.0.0".to_string()]);
    }

    #[test]
    fn one_pod_changing_rewrites_only_its_slice() {
        let svc = service(json!([{"port": 80}]));
        let mut pods: Vec<Arc<Pod>> = (0..4)
            .map(|i| pod(&format!("p{i}"), &format!("10.0.0.{i}"), true))
            .collect();
        let existing = written(plan_slices(&svc, &desired_endpoints(&svc, &pods), &[], 2));
        assert_eq!(existing.len(), 2);
        // Unchanged: nothing to write.
        let plan = plan_slices(&svc, &desired_endpoints(&svc, &pods), &existing, 2);
        assert!(plan.create.is_empty() && plan.update.is_empty() && plan.delete.is_empty());
        pods[3] = pod("p3", "10.0.0.3", false);
        let plan = plan_slices(&svc, &desired_endpoints(&svc, &pods), &existing, 2);
        assert_eq!(plan.update.len(), 1);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        // Pods gone: their slice goes; none left: one placeholder.
        let plan = plan_slices(&svc, &[], &existing, 2);
        assert_eq!(plan.delete.len(), 2);
        assert_eq!(plan.create.len(), 1);
        assert!(plan.create[0].ports.is_none());
    }

    #[test]
    fn legacy_endpoints_split_ready_and_not_ready() {
        let svc = service(json!([{"name": "http", "port": 80, "targetPort": 8080}]));
        let pods = vec![pod("a", "10.0.0.2", true), pod("b", "10.0.0.1", false)];
        let e = legacy_endpoints(&svc, &desired_endpoints(&svc, &pods), false);
        let subsets = e.subsets.unwrap();
        assert_eq!(subsets.len(), 1);
        assert_eq!(subsets[0].addresses.as_ref().unwrap()[0].ip, "10.0.0.2");
        assert_eq!(
            subsets[0].not_ready_addresses.as_ref().unwrap()[0].ip,
            "10.0.0.1"
        );
        assert_eq!(subsets[0].ports.as_ref().unwrap()[0].port, 8080);
    }
}
