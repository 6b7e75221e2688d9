//! The pods of this node: a watch on the pods bound to it (`spec.nodeName`) and the static pods
//! of `--pod-manifest-path` ([`static_pods`]), a [`worker`] per pod fed the pod's newest
//! version, and a sweep that removes sandboxes of pods the node no longer runs (deleted while
//! the kubelet was down, or bound elsewhere). Sandboxes without the kubelet's labels were not
//! made by Kubernetes and are left alone.

pub mod config;
pub mod env;
mod hosts;
pub mod probe;
pub mod static_pods;
pub mod status;
mod terminate;
pub mod volumes;
pub mod worker;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use seine_component_base::events::Recorder;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{cri::Runtime, Config};

/// What every pod worker shares.
pub struct Context {
    pub client: Client,
    pub runtime: Runtime,
    pub config: Arc<Config>,
    pub recorder: Recorder,
}

/// How often sandboxes of pods the API no longer has are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

struct Handle {
    pod: watch::Sender<Option<Arc<Pod>>>,
    task: JoinHandle<()>,
    /// The pod came from a file: the API's view of it is its mirror.
    from_file: bool,
    /// `namespace/name`.
    name: String,
}

/// The static pods as last read, and the mirror pods the API holds.
#[derive(Default)]
struct Statics {
    pods: BTreeMap<String, Arc<Pod>>,
    /// Mirror pods by their API UID.
    mirrors: HashMap<String, Pod>,
    /// Invalid files already reported, with their error, so that each is told once.
    reported: HashMap<PathBuf, String>,
}

/// Runs the pods bound to this node until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let selector = format!("spec.nodeName={}", ctx.config.node_name);
    let mut events = watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, Handle> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    let mut synced = false;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut statics = Statics::default();
    let mut file_check = tokio::time::interval(ctx.config.file_check_frequency);
    file_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let has_manifests = ctx.config.pod_manifest_path.is_some();
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                let mut mirrors_changed = false;
                match event {
                    Ok(watcher::Event::Init) => {
                        listed = Some(HashSet::new());
                        statics.mirrors.clear();
                    }
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(seen), Some(uid)) = (listed.as_mut(), pod.metadata.uid.clone()) {
                            seen.insert(uid);
                        }
                        mirrors_changed |= dispatch(&ctx, &mut workers, &mut statics, pod, &shutdown);
                    }
                    Ok(watcher::Event::Apply(pod)) => {
                        mirrors_changed |= dispatch(&ctx, &mut workers, &mut statics, pod, &shutdown);
                    }
                    Ok(watcher::Event::Delete(pod)) => {
                        let uid = pod.metadata.uid.clone().unwrap_or_default();
                        if statics.mirrors.remove(&uid).is_some() {
                            mirrors_changed = true;
                        } else if let Some(handle) = workers.get(&uid).filter(|h| !h.from_file) {
                            let _ = handle.pod.send(None);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods deleted while the watch was down.
                        let seen = listed.take().unwrap_or_default();
                        for (uid, handle) in &workers {
                            if !seen.contains(uid) && !handle.from_file {
                                let _ = handle.pod.send(None);
                            }
                        }
                        mirrors_changed = true;
                        if !synced {
                            info!(pods = seen.len(), "pods of this node listed");
                            synced = true;
                            sweep_orphans(&ctx, &workers).await;
                        }
                    }
                    Err(e) => warn!("watching this node's pods: {e}"),
                }
                workers.retain(|_, h| !h.task.is_finished());
                // A mirror pod deleted or made terminating by a user is made again at once.
                if mirrors_changed && synced && has_manifests {
                    mirror_static_pods(&ctx, &mut statics).await;
                }
            }
            _ = file_check.tick(), if has_manifests => {
                workers.retain(|_, h| !h.task.is_finished());
                read_static_pods(&ctx, &mut workers, &mut statics, &shutdown).await;
                if synced {
                    mirror_static_pods(&ctx, &mut statics).await;
                }
            }
            _ = sweep.tick(), if synced => sweep_orphans(&ctx, &workers).await,
            _ = shutdown.cancelled() => break,
        }
    }
    // Workers stop on the token; their containers keep running for the next kubelet.
    for (_, handle) in workers {
        let _ = tokio::time::timeout(Duration::from_secs(2), handle.task).await;
    }
    Ok(())
}

/// Hands a pod from the API to its worker; a mirror pod is only noted. True when a mirror pod
/// changed.
fn dispatch(
    ctx: &Arc<Context>,
    workers: &mut HashMap<String, Handle>,
    statics: &mut Statics,
    pod: Pod,
    shutdown: &CancellationToken,
) -> bool {
    let Some(uid) = pod.metadata.uid.clone() else {
        return false;
    };
    if static_pods::is_mirror(&pod) {
        statics.mirrors.insert(uid, pod);
        return true;
    }
    start_or_update(ctx, workers, uid, Arc::new(pod), false, shutdown);
    false
}

fn start_or_update(
    ctx: &Arc<Context>,
    workers: &mut HashMap<String, Handle>,
    uid: String,
    pod: Arc<Pod>,
    from_file: bool,
    shutdown: &CancellationToken,
) {
    if let Some(handle) = workers.get(&uid) {
        if !handle.task.is_finished() {
            let _ = handle.pod.send(Some(pod));
            return;
        }
    }
    let name = full_name(&pod);
    let (tx, rx) = watch::channel(Some(pod.clone()));
    let worker = worker::Worker::new(ctx.clone(), pod);
    let task = tokio::spawn(worker.run(rx, shutdown.clone()));
    workers.insert(
        uid,
        Handle {
            pod: tx,
            task,
            from_file,
            name,
        },
    );
}

/// Reads the manifest directory again: new static pods start, those whose file went (or
/// changed: a changed file is a new pod) stop. A changed pod starts once the old one stopped,
/// so that the two never run at once.
async fn read_static_pods(
    ctx: &Arc<Context>,
    workers: &mut HashMap<String, Handle>,
    statics: &mut Statics,
    shutdown: &CancellationToken,
) {
    let Some(dir) = ctx.config.pod_manifest_path.clone() else {
        return;
    };
    let node = ctx.config.node_name.clone();
    let read = dir.clone();
    let found = match tokio::task::spawn_blocking(move || static_pods::read_dir(&read, &node)).await
    {
        Ok(found) => found,
        Err(e) => {
            warn!("reading the static pod manifests: {e}");
            return;
        }
    };
    report_invalid(ctx, statics, &found.invalid).await;
    let mut stopping = HashSet::new();
    for (uid, handle) in workers.iter().filter(|(_, h)| h.from_file) {
        if !found.pods.contains_key(uid) {
            let _ = handle.pod.send(None);
            stopping.insert(handle.name.clone());
        }
    }
    statics.pods.clear();
    for (uid, pod) in found.pods {
        let pod = Arc::new(pod);
        // The UID is the file's hash: a running worker already has this very pod.
        if !workers.contains_key(&uid) {
            if stopping.contains(&full_name(&pod)) {
                // Its earlier version still stops; the next read starts it.
                continue;
            }
            info!(pod = %full_name(&pod), "static pod from {}", dir.display());
            start_or_update(ctx, workers, uid.clone(), pod.clone(), true, shutdown);
        }
        statics.pods.insert(uid, pod);
    }
}

fn full_name(pod: &Pod) -> String {
    let (name, namespace, _) = config::identity(pod);
    format!("{namespace}/{name}")
}

/// Tells of each invalid manifest once, as a Warning Event on the Node.
async fn report_invalid(ctx: &Context, statics: &mut Statics, invalid: &[(PathBuf, String)]) {
    statics
        .reported
        .retain(|path, _| invalid.iter().any(|(p, _)| p == path));
    for (path, error) in invalid {
        if statics.reported.get(path) == Some(error) {
            continue;
        }
        warn!(file = %path.display(), "invalid static pod manifest: {error}");
        // The kubelet's reference to its Node, whose UID is the node's name.
        let node = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(ctx.config.node_name.clone()),
            uid: Some(ctx.config.node_name.clone()),
            ..Default::default()
        };
        let message = format!("{}: {error}", path.display());
        ctx.recorder
            .warning(&node, "FailedToParseStaticPod", &message)
            .await;
        statics.reported.insert(path.clone(), error.clone());
    }
}

/// Brings the API's mirror pods to the static pods: each one mirrored by a current mirror pod,
/// and no mirror left of a static pod that is gone.
async fn mirror_static_pods(ctx: &Context, statics: &mut Statics) {
    let current = |pod: &Pod| {
        statics.mirrors.values().any(|m| {
            full_name(m) == full_name(pod)
                && static_pods::mirror_hash(m) == pod.metadata.uid.as_deref()
                && m.metadata.deletion_timestamp.is_none()
        })
    };
    let missing: Vec<Arc<Pod>> = statics
        .pods
        .values()
        .filter(|p| !current(p))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        match nodes.get(&ctx.config.node_name).await {
            Ok(node) => {
                for pod in missing {
                    match static_pods::sync_mirror(&ctx.client, &pod, &node).await {
                        Ok(()) => debug!(pod = %full_name(&pod), "mirror pod made"),
                        Err(e) => warn!(pod = %full_name(&pod), "making the mirror pod: {e}"),
                    }
                }
            }
            Err(e) => warn!("reading this node for the mirror pods' owner: {e}"),
        }
    }
    let hashes: HashSet<&str> = statics.pods.keys().map(String::as_str).collect();
    for mirror in statics.mirrors.values() {
        if static_pods::mirror_hash(mirror).is_some_and(|h| !hashes.contains(h)) {
            let namespace = mirror.metadata.namespace.clone().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            info!(pod = %full_name(mirror), "removing the mirror of a static pod that is gone");
            if let Err(e) = static_pods::delete_mirror(&api, mirror).await {
                warn!(pod = %full_name(mirror), "removing the mirror pod: {e}");
            }
        }
    }
}

/// Removes the sandboxes of Kubernetes pods that have no worker: the API no longer binds them here.
async fn sweep_orphans(ctx: &Arc<Context>, workers: &HashMap<String, Handle>) {
    let sandboxes = match ctx.runtime.sandboxes(HashMap::new()).await {
        Ok(s) => s,
        Err(e) => {
            warn!("listing sandboxes: {e}");
            return;
        }
    };
    let orphans: HashSet<String> = sandboxes
        .iter()
        .filter_map(|s| s.labels.get(config::LABEL_POD_UID).cloned())
        .filter(|uid| !workers.contains_key(uid))
        .collect();
    for uid in orphans {
        info!(
            uid,
            "removing the sandboxes of a pod this node no longer runs"
        );
        terminate::terminate(ctx, &uid, None, Duration::from_secs(2)).await;
        volumes::tear_down(&ctx.config.root_dir, &uid);
    }
}
