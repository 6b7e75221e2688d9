//! The Job controller (batch/v1, kube-controller-manager's "job"): runs a Job's pods to
//! completion within `parallelism`, `completions`, `backoffLimit` and `activeDeadlineSeconds`,
//! and keeps the Job's status and conditions as kube 1.33 does. Pods carry the
//! `batch.kubernetes.io/job-tracking` finalizer until their outcome is counted: a finished pod is
//! first listed in `status.uncountedTerminatedPods`, then loses the finalizer, then moves into
//! `succeeded`/`failed`, so no pod is counted twice or lost, whatever deletes it.
//!
//! Every sync reads the Job and its pods live (the API server's lists are consistent reads), so
//! pods just created or deleted are always seen and no expectations are needed. Both completion
//! modes are handled: an Indexed Job's pods each carry an index and its succeeded indexes are
//! kept in `status.completedIndexes`. podFailurePolicy, successPolicy, backoffLimitPerIndex and
//! pod adoption are not.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    api::{Patch, PatchParams},
    runtime::{
        controller::{Action, Config},
        reflector::{ObjectRef, Store},
        watcher, Controller,
    },
    Api, Client, ResourceExt as _,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;

mod backoff;
mod indexes;
mod pods;
mod sync;
#[cfg(test)]
mod tests;

use backoff::BackoffRecord;
use indexes::{completion_index, first_pending_indexes, IndexIntervals};
use pods::{
    create_pods, delete_pods, is_failed, is_ready, is_terminal, only_replace_failed, phase,
    pod_from_template,
};
use sync::sync;

/// Held on every pod the controller creates until its outcome is in the Job's status.
pub const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";

/// The selector label kube-apiserver gives a Job's pod template.
pub const CONTROLLER_UID_LABEL: &str = "batch.kubernetes.io/controller-uid";

/// An Indexed Job's pod's completion index: an annotation (what the controller reads) and a label.
pub const COMPLETION_INDEX_KEY: &str = "batch.kubernetes.io/job-completion-index";

/// The environment variable every container of an Indexed Job's pod reads its index from.
const COMPLETION_INDEX_ENV: &str = "JOB_COMPLETION_INDEX";

/// The longest generateName the API server can append its random suffix to.
const MAX_GENERATE_NAME_LENGTH: usize = 58;

/// Pods created or deleted in one sync at most (kube's MaxPodCreateDeletePerSync).
const MAX_POD_CHANGES_PER_SYNC: usize = 500;

/// The delay before a failed pod is replaced, doubling per failure since the last success.
const POD_FAILURE_BACKOFF: Duration = Duration::from_secs(10);

const MAX_POD_FAILURE_BACKOFF: Duration = Duration::from_secs(360);

/// Jobs synced at once (kube's `--concurrent-job-syncs`).
const WORKERS: u16 = 5;

const REASON_COMPLETIONS_REACHED: &str = "CompletionsReached";

const MESSAGE_COMPLETIONS_REACHED: &str = "Reached expected number of succeeded pods";

const REASON_BACKOFF_LIMIT: &str = "BackoffLimitExceeded";

const MESSAGE_BACKOFF_LIMIT: &str = "Job has reached the specified backoff limit";

const REASON_DEADLINE: &str = "DeadlineExceeded";

const MESSAGE_DEADLINE: &str = "Job was active longer than specified deadline";

const REASON_INVALID_SPEC: &str = "InvalidSpec";

const MESSAGE_INDEXED_WITHOUT_COMPLETIONS: &str =
    "spec.completions: Required value: when completion mode is Indexed";

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("{failed} of {tried} pod {action} failed; first: {first}")]
    Pods {
        action: &'static str,
        tried: usize,
        failed: usize,
        first: kube::Error,
    },
}

/// What the syncs share: the client, each Job's pod-failure backoff and its failed syncs.
pub struct Context {
    client: Client,
    /// Per Job uid, as kube's podBackoffStore (kept in memory, like kube's).
    backoff: Mutex<HashMap<String, BackoffRecord>>,
    failures: Mutex<HashMap<String, u32>>,
}

/// Runs the controller until its watches end.
pub async fn run(client: Client, shutdown: CancellationToken) {
    let jobs: Api<Job> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    let controller = Controller::new(jobs, watcher::Config::default())
        .with_config(Config::default().concurrency(WORKERS))
        .graceful_shutdown_on(shutdown.cancelled_owned());
    let store = controller.store();
    // Pods whose Job is gone or finished still holding the finalizer go to `release_orphans`.
    let (orphans_tx, orphans_rx) = mpsc::unbounded_channel::<Pod>();
    let mapper_store = store.clone();
    let controller = controller.watches(pods, watcher::Config::default(), move |pod: Pod| {
        let owner = job_of(&pod);
        if has_tracking_finalizer(&pod) && !held_by_running_job(&mapper_store, &pod) {
            let _ = orphans_tx.send(pod.clone());
        }
        owner
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        backoff: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });
    let syncing = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!("job controller: {e}");
            }
        });
    tokio::join!(syncing, release_orphans(client, store, orphans_rx));
}

/// The Job a pod's controller reference names.
fn job_of(pod: &Pod) -> Option<ObjectRef<Job>> {
    let owner = controller_ref(pod)?;
    Some(ObjectRef::new(&owner.name).within(pod.metadata.namespace.as_deref()?))
}

fn controller_ref(pod: &Pod) -> Option<&OwnerReference> {
    pod.owner_references().iter().find(|o| {
        o.controller == Some(true) && o.kind == "Job" && o.api_version.starts_with("batch/")
    })
}

fn has_tracking_finalizer(pod: &Pod) -> bool {
    pod.finalizers().iter().any(|f| f == TRACKING_FINALIZER)
}

/// Whether the cache has the pod's Job, unfinished.
fn held_by_running_job(store: &Store<Job>, pod: &Pod) -> bool {
    let (Some(owner), Some(key)) = (controller_ref(pod), job_of(pod)) else {
        return false;
    };
    store
        .get(&key)
        .is_some_and(|job| job.metadata.uid.as_deref() == Some(&owner.uid) && !is_finished(&job))
}

/// Takes the tracking finalizer off pods whose Job is gone (or finished): nothing will count
/// them any more (kube's orphan pod handling).
async fn release_orphans(
    client: Client,
    store: Store<Job>,
    mut pods: mpsc::UnboundedReceiver<Pod>,
) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    while let Some(pod) = pods.recv().await {
        if held_by_running_job(&store, &pod) {
            continue;
        }
        let Some(namespace) = pod.metadata.namespace.clone() else {
            continue;
        };
        // The cache may not have a new Job yet: ask the server before letting go.
        if let Some(owner) = controller_ref(&pod) {
            let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
            match jobs.get_opt(&owner.name).await {
                Ok(Some(job))
                    if job.metadata.uid.as_deref() == Some(&owner.uid) && !is_finished(&job) =>
                {
                    continue
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(pod = %pod.name_any(), "job controller: reading the owner of an orphan pod: {e}");
                    continue;
                }
            }
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        match remove_tracking_finalizer(&api, &pod.name_any()).await {
            Ok(()) => {
                info!(pod = %format!("{namespace}/{}", pod.name_any()), "job controller: released an orphan pod")
            }
            Err(e) => warn!(pod = %pod.name_any(), "job controller: releasing an orphan pod: {e}"),
        }
    }
}

async fn remove_tracking_finalizer(pods: &Api<Pod>, name: &str) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": [TRACKING_FINALIZER]}});
    match pods
        .patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

fn error_policy(job: Arc<Job>, error: &JobError, ctx: Arc<Context>) -> Action {
    let key = job.metadata.uid.clone().unwrap_or_default();
    let failures = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key).or_insert(0);
            *n += 1;
            *n
        })
        .unwrap_or(1);
    let key = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
    // A write at a stale version is routine: the Job is synced again.
    if matches!(error, JobError::Api(kube::Error::Api(s)) if s.is_conflict()) {
        tracing::debug!(job = %key, "job controller: {error}");
    } else {
        warn!(job = %key, "job controller: {error}");
    }
    metrics::synced("job", false);
    // 100 ms doubling up to 5 minutes.
    Action::requeue(
        Duration::from_millis(100)
            .saturating_mul(1 << failures.saturating_sub(1).min(12))
            .min(Duration::from_secs(300)),
    )
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, JobError> {
    let namespace = job.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(live) = jobs.get_opt(&job.name_any()).await? else {
        // Gone: drop what is kept per uid so deleted Jobs leave nothing behind.
        if let Some(uid) = &job.metadata.uid {
            if let Ok(mut f) = ctx.failures.lock() {
                f.remove(uid);
            }
            if let Ok(mut b) = ctx.backoff.lock() {
                b.remove(uid);
            }
        }
        return Ok(Action::await_change());
    };
    let action = sync(&ctx, &jobs, live).await?;
    if let Some(uid) = &job.metadata.uid {
        if let Ok(mut f) = ctx.failures.lock() {
            f.remove(uid);
        }
    }
    metrics::synced("job", true);
    Ok(action)
}

fn condition_true(job: &Job, kind: &str) -> Option<JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind && c.status == "True")
        .cloned()
}

/// Complete or Failed.
pub fn is_finished(job: &Job) -> bool {
    condition_true(job, "Complete").is_some() || condition_true(job, "Failed").is_some()
}
