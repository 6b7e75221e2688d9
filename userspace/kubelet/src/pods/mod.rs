//! The pods of this node: a watch on the pods bound to it (`spec.nodeName`), a [`worker`] per
//! pod fed the pod's newest version, and a sweep that removes sandboxes of pods the API no
//! longer has (deleted while the kubelet was down, or bound elsewhere). Sandboxes without the
//! kubelet's labels were not made by Kubernetes and are left alone.

pub mod config;
pub mod env;
mod hosts;
pub mod probe;
pub mod status;
mod terminate;
pub mod volumes;
pub mod worker;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use seine_component_base::events::Recorder;
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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
    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                match event {
                    Ok(watcher::Event::Init) => listed = Some(HashSet::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(seen), Some(uid)) = (listed.as_mut(), pod.metadata.uid.clone()) {
                            seen.insert(uid);
                        }
                        dispatch(&ctx, &mut workers, pod, &shutdown);
                    }
                    Ok(watcher::Event::Apply(pod)) => dispatch(&ctx, &mut workers, pod, &shutdown),
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(handle) = pod.metadata.uid.as_ref().and_then(|u| workers.get(u)) {
                            let _ = handle.pod.send(None);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods deleted while the watch was down.
                        let seen = listed.take().unwrap_or_default();
                        for (uid, handle) in &workers {
                            if !seen.contains(uid) {
                                let _ = handle.pod.send(None);
                            }
                        }
                        if !synced {
                            info!(pods = seen.len(), "pods of this node listed");
                            synced = true;
                            sweep_orphans(&ctx, &workers).await;
                        }
                    }
                    Err(e) => warn!("watching this node's pods: {e}"),
                }
                workers.retain(|_, h| !h.task.is_finished());
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

fn dispatch(
    ctx: &Arc<Context>,
    workers: &mut HashMap<String, Handle>,
    pod: Pod,
    shutdown: &CancellationToken,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let pod = Arc::new(pod);
    if let Some(handle) = workers.get(&uid) {
        if !handle.task.is_finished() {
            let _ = handle.pod.send(Some(pod));
            return;
        }
    }
    let (tx, rx) = watch::channel(Some(pod.clone()));
    let worker = worker::Worker::new(ctx.clone(), pod);
    let task = tokio::spawn(worker.run(rx, shutdown.clone()));
    workers.insert(uid, Handle { pod: tx, task });
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
