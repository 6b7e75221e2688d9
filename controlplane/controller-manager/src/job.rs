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
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{future::join_all, StreamExt as _};
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition, JobStatus, UncountedTerminatedPods},
        core::v1::{Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::{Action, Config},
        reflector::{ObjectRef, Store},
        watcher, Controller,
    },
    Api, Client, Resource as _, ResourceExt as _,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics;
use seine_apimachinery::labels::Selector;

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

/// Failures since the last success and when the last one was.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct BackoffRecord {
    failures_after_last_success: u32,
    last_failure: Option<Timestamp>,
}

impl BackoffRecord {
    /// The record after pods newly seen finished (kube's newBackoffRecord).
    fn next(self, succeeded: &[&Pod], failed: &[&Pod], now: Timestamp) -> BackoffRecord {
        let mut succeeded: Vec<Timestamp> =
            succeeded.iter().map(|p| finished_time(p, now)).collect();
        let mut failed: Vec<Timestamp> = failed.iter().map(|p| finished_time(p, now)).collect();
        succeeded.sort();
        failed.sort();
        let Some(last_success) = succeeded.last() else {
            return match failed.last() {
                None => self,
                Some(last) => BackoffRecord {
                    failures_after_last_success: self.failures_after_last_success
                        + failed.len() as u32,
                    last_failure: Some(*last),
                },
            };
        };
        let after: Vec<&Timestamp> = failed.iter().filter(|t| *t > last_success).collect();
        BackoffRecord {
            failures_after_last_success: after.len() as u32,
            last_failure: after.last().copied().copied(),
        }
    }

    /// How long until a failed pod may be replaced.
    fn remaining(&self, now: Timestamp) -> Duration {
        let Some(last) = self.last_failure else {
            return Duration::ZERO;
        };
        if self.failures_after_last_success == 0 {
            return Duration::ZERO;
        }
        let mut backoff = POD_FAILURE_BACKOFF;
        for _ in 1..self.failures_after_last_success {
            backoff = (backoff * 2).min(MAX_POD_FAILURE_BACKOFF);
        }
        let elapsed = Duration::try_from(now.duration_since(last)).unwrap_or(Duration::ZERO);
        backoff.saturating_sub(elapsed)
    }
}

/// When a pod finished: its last container's end, else when it stopped being ready, else its
/// deletion, else now (as kube's getFinishedTime).
fn finished_time(pod: &Pod, now: Timestamp) -> Timestamp {
    let status = pod.status.as_ref();
    let from_containers = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0)
        .max();
    let from_ready = || {
        status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "Ready" && c.status == "False")
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0)
    };
    from_containers
        .or_else(from_ready)
        .or_else(|| pod.metadata.deletion_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now)
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

fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a pod counts as failed: its phase says so, or, unless the Job replaces only failed
/// pods, it is being deleted before succeeding (kube's isPodFailed).
fn is_failed(pod: &Pod, only_replace_failed: bool) -> bool {
    if phase(pod) == "Failed" {
        return true;
    }
    !only_replace_failed && pod.metadata.deletion_timestamp.is_some() && phase(pod) != "Succeeded"
}

fn only_replace_failed(job: &Job) -> bool {
    job.spec.as_ref().is_some_and(|s| {
        s.pod_replacement_policy.as_deref() == Some("Failed") || s.pod_failure_policy.is_some()
    })
}

fn new_condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> JobCondition {
    JobCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_probe_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// Sets a condition as kube's ensureJobConditionStatus: a changed one is replaced, a missing
/// one is added unless it would be False. Returns whether anything changed.
fn ensure_condition(
    conditions: &mut Vec<JobCondition>,
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    now: Timestamp,
) -> bool {
    if let Some(c) = conditions.iter_mut().find(|c| c.type_ == kind) {
        if c.status != status
            || c.reason.as_deref() != Some(reason)
            || c.message.as_deref() != Some(message)
        {
            *c = new_condition(kind, status, reason, message, now);
            return true;
        }
        return false;
    }
    if status != "False" {
        conditions.push(new_condition(kind, status, reason, message, now));
        return true;
    }
    false
}

/// The order in which active pods are deleted, first first (kube's ActivePods ordering):
/// unscheduled before scheduled, pending before running, not ready before ready, more restarts
/// before fewer, newer before older.
fn removal_order(a: &Pod, b: &Pod) -> std::cmp::Ordering {
    let scheduled = |p: &Pod| {
        p.spec
            .as_ref()
            .and_then(|s| s.node_name.as_deref())
            .is_some_and(|n| !n.is_empty())
    };
    let phase_rank = |p: &Pod| match phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        "Running" => 2,
        _ => 3,
    };
    let restarts = |p: &Pod| -> i32 {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .map(|c| c.restart_count)
            .max()
            .unwrap_or(0)
    };
    let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    scheduled(a)
        .cmp(&scheduled(b))
        .then(phase_rank(a).cmp(&phase_rank(b)))
        .then(is_ready(a).cmp(&is_ready(b)))
        .then(restarts(b).cmp(&restarts(a)))
        .then(created(b).cmp(&created(a)))
}

/// How many pods should run: never more than parallelism nor the completions still missing.
fn wanted_active(completions: Option<i32>, parallelism: i32, succeeded: i32, active: i32) -> i32 {
    match completions {
        // Without completions, once one pod succeeded the rest are left to finish.
        None if succeeded > 0 => active,
        None => parallelism,
        Some(c) => (c - succeeded).clamp(0, parallelism),
    }
}

/// With restartPolicy OnFailure, container restarts of active pods count against the limit.
fn past_backoff_limit_on_failure(job: &Job, pods: &[&Pod], limit: i32) -> bool {
    let on_failure = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.restart_policy.as_deref())
        == Some("OnFailure");
    if !on_failure {
        return false;
    }
    let restarts: i32 = pods
        .iter()
        .filter(|p| matches!(phase(p), "Running" | "Pending"))
        .filter_map(|p| p.status.as_ref())
        .flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        })
        .map(|c| c.restart_count)
        .sum();
    if limit == 0 {
        restarts > 0
    } else {
        restarts >= limit
    }
}

/// A pod's completion index, from its annotation (kube's getCompletionIndex).
fn completion_index(pod: &Pod) -> Option<i32> {
    pod.annotations()
        .get(COMPLETION_INDEX_KEY)?
        .parse::<i32>()
        .ok()
        .filter(|i| *i >= 0)
}

/// Completion indexes as `status.completedIndexes` writes them (`"0-2,4,6-7"`): sorted,
/// disjoint, non-adjacent inclusive intervals, so a million indexes stay one short string.
#[derive(Debug, Clone, Default, PartialEq)]
struct IndexIntervals(Vec<(i32, i32)>);

impl IndexIntervals {
    /// Reads the status field, keeping only indexes below `completions`; malformed parts are
    /// dropped (kube's parseIndexesFromString).
    fn parse(text: &str, completions: i32) -> Self {
        let mut intervals = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bounds = match part.split_once('-') {
                Some((first, last)) => first.parse::<i32>().ok().zip(last.parse::<i32>().ok()),
                None => part.parse::<i32>().ok().map(|i| (i, i)),
            };
            let Some((first, last)) = bounds else {
                warn!(
                    part,
                    "job controller: ignoring a malformed part of completedIndexes"
                );
                continue;
            };
            if first < 0 || last < first || first >= completions {
                continue;
            }
            intervals.push((first, last.min(completions - 1)));
        }
        IndexIntervals(intervals).merged()
    }

    /// These intervals with `indexes` added.
    fn with(&self, indexes: impl IntoIterator<Item = i32>) -> Self {
        let mut intervals = self.0.clone();
        intervals.extend(indexes.into_iter().map(|i| (i, i)));
        IndexIntervals(intervals).merged()
    }

    fn merged(mut self) -> Self {
        self.0.sort_unstable();
        let mut out: Vec<(i32, i32)> = Vec::with_capacity(self.0.len());
        for (first, last) in self.0 {
            match out.last_mut() {
                Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
                _ => out.push((first, last)),
            }
        }
        IndexIntervals(out)
    }

    fn contains(&self, index: i32) -> bool {
        let at = self.0.partition_point(|(_, last)| *last < index);
        self.0.get(at).is_some_and(|(first, _)| *first <= index)
    }

    fn total(&self) -> i32 {
        self.0.iter().map(|(first, last)| last - first + 1).sum()
    }
}

impl std::fmt::Display for IndexIntervals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, (first, last)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        Ok(())
    }
}

/// The lowest `count` indexes below `completions` neither succeeded nor `taken` by a pod
/// (kube's firstPendingIndexes).
fn first_pending_indexes(
    succeeded: &IndexIntervals,
    taken: &HashSet<i32>,
    count: usize,
    completions: i32,
) -> Vec<i32> {
    (0..completions)
        .filter(|i| !succeeded.contains(*i) && !taken.contains(i))
        .take(count)
        .collect()
}

/// The active pods to delete, first first: for an Indexed Job (`completions` given) every pod
/// without a valid index and all but the best pod of each index, then, to reach `at_least`,
/// the others in `removal_order` (kube's activePodsForRemoval).
fn pods_to_remove<'a>(
    active: &[&'a Pod],
    at_least: usize,
    indexed_completions: Option<i32>,
) -> Vec<&'a Pod> {
    let mut remove: Vec<&Pod> = Vec::new();
    let mut left: Vec<&Pod> = Vec::new();
    match indexed_completions {
        None => left.extend(active.iter().copied()),
        Some(completions) => {
            let mut by_index: BTreeMap<i32, Vec<&Pod>> = BTreeMap::new();
            for pod in active.iter().copied() {
                match completion_index(pod).filter(|i| *i < completions) {
                    Some(i) => by_index.entry(i).or_default().push(pod),
                    None => remove.push(pod),
                }
            }
            for mut same in by_index.into_values() {
                same.sort_by(|a, b| removal_order(a, b));
                if let Some(keep) = same.pop() {
                    left.push(keep);
                }
                remove.extend(same);
            }
        }
    }
    if remove.len() < at_least {
        left.sort_by(|a, b| removal_order(a, b));
        let more = (at_least - remove.len()).min(left.len());
        remove.extend(left.into_iter().take(more));
    }
    remove
}

/// What a sync decided to finish the Job with: the interim condition (SuccessCriteriaMet or
/// FailureTarget) and the final one it becomes once every pod is counted and gone.
#[derive(Clone)]
struct Finish {
    interim: JobCondition,
    success: bool,
}

impl Finish {
    fn success(now: Timestamp) -> Self {
        Finish {
            interim: new_condition(
                "SuccessCriteriaMet",
                "True",
                REASON_COMPLETIONS_REACHED,
                MESSAGE_COMPLETIONS_REACHED,
                now,
            ),
            success: true,
        }
    }

    fn failure(reason: &str, message: &str, now: Timestamp) -> Self {
        Finish {
            interim: new_condition("FailureTarget", "True", reason, message, now),
            success: false,
        }
    }

    fn final_kind(&self) -> &'static str {
        if self.success {
            "Complete"
        } else {
            "Failed"
        }
    }
}

/// One sync of a Job read live (kube's syncJob).
async fn sync(ctx: &Context, jobs: &Api<Job>, mut job: Job) -> Result<Action, JobError> {
    let now = Timestamp::now();
    if is_finished(&job) {
        if let Some(uid) = &job.metadata.uid {
            if let Ok(mut b) = ctx.backoff.lock() {
                b.remove(uid);
            }
        }
        return Ok(Action::await_change());
    }
    let spec = job.spec.clone().unwrap_or_default();
    if spec
        .managed_by
        .as_deref()
        .is_some_and(|m| m != "kubernetes.io/job-controller")
    {
        return Ok(Action::await_change());
    }
    let name = job.name_any();
    let namespace = job.namespace().unwrap_or_default();
    let uid = job.metadata.uid.clone().unwrap_or_default();
    // Indexed pods are told apart by index below completions; kube-apiserver refuses an
    // Indexed Job without completions, and such a Job fails here (below) without any pod.
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let index_limit = if indexed { spec.completions } else { None };
    let valid_index = |p: &Pod| completion_index(p).filter(|i| index_limit.is_some_and(|c| *i < c));
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = spec.selector.clone().unwrap_or_default();
    let pod_selector = Selector::from_label_selector(Some(&selector));
    // The server filters by the whole selector, set-based expressions too; one with an unknown
    // operator selects nothing, so there is nothing to ask for.
    let listed = if pod_selector.is_nothing() {
        Vec::new()
    } else {
        pods_api
            .list(&ListParams::default().labels(&pod_selector.to_string()))
            .await?
            .items
    };
    let pods: Vec<Pod> = listed
        .into_iter()
        .filter(|p| controller_ref(p).is_some_and(|o| o.uid == uid))
        .filter(|p| pod_selector.matches(p.labels()))
        .collect();
    let owned: Vec<&Pod> = pods.iter().collect();

    let mut status = job.status.clone().unwrap_or_default();
    let uncounted = status.uncounted_terminated_pods.clone().unwrap_or_default();
    let mut uncounted_succeeded: Vec<String> = uncounted.succeeded.unwrap_or_default();
    let mut uncounted_failed: Vec<String> = uncounted.failed.unwrap_or_default();
    let replace_only_failed = only_replace_failed(&job);
    let suspended = spec.suspend == Some(true);
    let uid_of = |p: &Pod| p.metadata.uid.clone().unwrap_or_default();

    let active_pods: Vec<&Pod> = owned
        .iter()
        .copied()
        .filter(|p| !is_terminal(p) && p.metadata.deletion_timestamp.is_none())
        .collect();
    let mut terminating = owned
        .iter()
        .filter(|p| !is_terminal(p) && p.metadata.deletion_timestamp.is_some())
        .count() as i32;
    let mut ready = active_pods.iter().filter(|p| is_ready(p)).count() as i32;
    // An Indexed Job's pods without a valid index count neither way (kube's getValidPodsWithFilter).
    let countable = |p: &&Pod| !indexed || valid_index(p).is_some();
    let new_succeeded: Vec<&Pod> = owned
        .iter()
        .copied()
        .filter(|p| has_tracking_finalizer(p) && phase(p) == "Succeeded")
        .filter(|p| !uncounted_succeeded.contains(&uid_of(p)))
        .filter(countable)
        .collect();
    let new_failed: Vec<&Pod> = owned
        .iter()
        .copied()
        .filter(|p| has_tracking_finalizer(p) && is_failed(p, replace_only_failed))
        .filter(|p| !uncounted_failed.contains(&uid_of(p)))
        .filter(countable)
        .collect();
    // An Indexed Job counts succeeded indexes, not pods: they go straight into
    // completedIndexes, so a second success of an index is never counted.
    let previous_indexes = IndexIntervals::parse(
        status.completed_indexes.as_deref().unwrap_or_default(),
        index_limit.unwrap_or(0),
    );
    let completed_indexes = previous_indexes.with(
        new_succeeded
            .iter()
            .filter(|p| !uncounted_failed.contains(&uid_of(p)))
            .filter_map(|p| valid_index(p)),
    );
    let succeeded = if indexed {
        completed_indexes.total()
    } else {
        status.succeeded.unwrap_or(0)
            + new_succeeded.len() as i32
            + uncounted_succeeded.len() as i32
    };
    let failed =
        status.failed.unwrap_or(0) + new_failed.len() as i32 + uncounted_failed.len() as i32;
    let backoff = ctx
        .backoff
        .lock()
        .ok()
        .and_then(|b| b.get(&uid).copied())
        .unwrap_or_default()
        .next(&new_succeeded, &new_failed, now);

    if status.start_time.is_none() && !suspended {
        status.start_time = Some(Time(now));
    }
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    let mut requeue: Option<Duration> = None;
    let mut finish: Option<Finish> = None;
    let conditions_now = status.conditions.clone().unwrap_or_default();
    if let Some(met) = conditions_now
        .iter()
        .find(|c| c.type_ == "SuccessCriteriaMet" && c.status == "True")
    {
        finish = Some(Finish {
            interim: met.clone(),
            success: true,
        });
    } else if let Some(target) = conditions_now
        .iter()
        .find(|c| c.type_ == "FailureTarget" && c.status == "True")
    {
        finish = Some(Finish {
            interim: target.clone(),
            success: false,
        });
    } else if indexed && spec.completions.is_none() {
        warn!(job = %format!("{namespace}/{name}"), "job controller: an Indexed Job needs completions; failing it");
        finish = Some(Finish::failure(
            REASON_INVALID_SPEC,
            MESSAGE_INDEXED_WITHOUT_COMPLETIONS,
            now,
        ));
    } else if failed > backoff_limit
        || past_backoff_limit_on_failure(&job, &active_pods, backoff_limit)
    {
        finish = Some(Finish::failure(
            REASON_BACKOFF_LIMIT,
            MESSAGE_BACKOFF_LIMIT,
            now,
        ));
    } else if let (Some(deadline), Some(start), false) = (
        spec.active_deadline_seconds,
        status.start_time.as_ref(),
        suspended,
    ) {
        let elapsed = now.duration_since(start.0);
        let allowed = SignedDuration::from_secs(deadline);
        if elapsed >= allowed {
            finish = Some(Finish::failure(REASON_DEADLINE, MESSAGE_DEADLINE, now));
        } else {
            requeue = Duration::try_from(allowed - elapsed).ok();
        }
    }

    let mut active = active_pods.len() as i32;
    let mut deleted_now: HashSet<String> = HashSet::new();
    let mut manage_error: Option<JobError> = None;
    let mut suspend_changed = false;
    let mut conditions = conditions_now.clone();
    if finish.is_some() {
        // The Job is done for: its active pods go.
        let (deleted, deleted_ready, error) = delete_pods(&pods_api, &active_pods).await;
        if deleted.len() as i32 != active {
            finish = None;
        }
        active -= deleted.len() as i32;
        terminating += deleted.len() as i32;
        ready -= deleted_ready;
        deleted_now.extend(deleted);
        manage_error = error;
    } else {
        let mut managed = false;
        if job.metadata.deletion_timestamp.is_none() {
            managed = true;
            let parallelism = spec.parallelism.unwrap_or(1);
            let remove_at_least = if suspended {
                active as usize
            } else {
                (active - wanted_active(spec.completions, parallelism, succeeded, active)).max(0)
                    as usize
            };
            let removable = pods_to_remove(&active_pods, remove_at_least, index_limit);
            if !removable.is_empty() {
                let chosen = &removable[..removable.len().min(MAX_POD_CHANGES_PER_SYNC)];
                let (deleted, deleted_ready, error) = delete_pods(&pods_api, chosen).await;
                active -= deleted.len() as i32;
                terminating += deleted.len() as i32;
                ready -= deleted_ready;
                deleted_now.extend(deleted);
                manage_error = error;
            } else if !suspended {
                let want = wanted_active(spec.completions, parallelism, succeeded, active);
                let counted_terminating = if replace_only_failed { terminating } else { 0 };
                let missing = (want - counted_terminating - active).max(0) as usize;
                if missing > 0 {
                    let wait = backoff.remaining(now);
                    if wait > Duration::ZERO {
                        requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
                    } else {
                        let count = missing.min(MAX_POD_CHANGES_PER_SYNC);
                        let new_pods: Vec<Pod> = match index_limit {
                            // One pod per index still missing, lowest first.
                            Some(completions) => {
                                let mut taken: HashSet<i32> = active_pods
                                    .iter()
                                    .filter_map(|p| completion_index(p))
                                    .collect();
                                if replace_only_failed {
                                    taken.extend(
                                        owned
                                            .iter()
                                            .filter(|p| {
                                                !is_terminal(p)
                                                    && p.metadata.deletion_timestamp.is_some()
                                            })
                                            .filter_map(|p| completion_index(p)),
                                    );
                                }
                                first_pending_indexes(
                                    &completed_indexes,
                                    &taken,
                                    count,
                                    completions,
                                )
                                .into_iter()
                                .map(|i| pod_from_template(&job, Some(i)))
                                .collect()
                            }
                            None => vec![pod_from_template(&job, None); count],
                        };
                        let (created, error) = create_pods(&pods_api, &job, &new_pods).await;
                        active += created as i32;
                        manage_error = error;
                    }
                }
            }
        }
        let complete = match spec.completions {
            None => succeeded > 0 && active == 0,
            Some(c) => succeeded >= c && active == 0,
        };
        if complete {
            finish = Some(Finish::success(now));
        } else if managed {
            if suspended {
                suspend_changed = ensure_condition(
                    &mut conditions,
                    "Suspended",
                    "True",
                    "JobSuspended",
                    "Job suspended",
                    now,
                );
            } else {
                suspend_changed = ensure_condition(
                    &mut conditions,
                    "Suspended",
                    "False",
                    "JobResumed",
                    "Job resumed",
                    now,
                );
                if suspend_changed {
                    // activeDeadlineSeconds counts from the resume.
                    status.start_time = Some(Time(now));
                }
            }
        }
    }

    // Count finished pods: into uncountedTerminatedPods first, then off come their finalizers.
    let job_deleting = job.metadata.deletion_timestamp.is_some();
    let failing = finish.as_ref().is_some_and(|f| !f.success);
    let mut flush = false;
    let mut release: Vec<&Pod> = Vec::new();
    for pod in owned.iter().copied().filter(|p| has_tracking_finalizer(p)) {
        let pod_uid = uid_of(pod);
        let considered_failed = is_failed(pod, replace_only_failed);
        let removable =
            job_deleting || finish.is_some() || phase(pod) == "Succeeded" || considered_failed;
        if !removable {
            continue;
        }
        release.push(pod);
        if phase(pod) == "Succeeded" && !uncounted_failed.contains(&pod_uid) {
            // An Indexed Job's success is in completed_indexes already.
            if !indexed && !uncounted_succeeded.contains(&pod_uid) {
                uncounted_succeeded.push(pod_uid);
                flush = true;
            }
        } else if (considered_failed || failing || deleted_now.contains(&pod_uid))
            && !uncounted_failed.contains(&pod_uid)
            && (!indexed || valid_index(pod).is_some())
        {
            uncounted_failed.push(pod_uid);
            flush = true;
        }
    }
    if indexed {
        let text = completed_indexes.to_string();
        if status.completed_indexes.as_deref().unwrap_or_default() != text {
            flush = true;
        }
        status.completed_indexes = (!text.is_empty()).then_some(text);
        status.succeeded = (succeeded > 0).then_some(succeeded);
    }
    let mut final_condition: Option<JobCondition> = None;
    if let Some(f) = &finish {
        if !conditions.iter().any(|c| c.type_ == f.interim.type_) {
            conditions.push(f.interim.clone());
            flush = true;
        }
        final_condition = Some(new_condition(
            f.final_kind(),
            "True",
            f.interim.reason.as_deref().unwrap_or_default(),
            f.interim.message.as_deref().unwrap_or_default(),
            now,
        ));
    }
    let previous = job.status.clone().unwrap_or_default();
    let needs_update = suspend_changed
        || previous.active.unwrap_or(0) != active
        || previous.ready != Some(ready)
        || previous.terminating != Some(terminating)
        || previous.start_time != status.start_time;
    status.active = (active > 0).then_some(active);
    status.ready = Some(ready);
    status.terminating = Some(terminating);
    status.conditions = (!conditions.is_empty()).then_some(conditions);
    status.uncounted_terminated_pods =
        Some(uncounted_status(&uncounted_succeeded, &uncounted_failed));
    if flush || needs_update {
        job = write_status(jobs, job, &status).await?;
        status = job.status.clone().unwrap_or_default();
    }
    // The failures just written into uncountedTerminatedPods count for the pod-failure
    // backoff even if a later write fails.
    if let Ok(mut b) = ctx.backoff.lock() {
        b.insert(uid, backoff);
    }

    let mut released: HashSet<String> = HashSet::new();
    let mut release_error = None;
    let outcomes = join_all(release.iter().map(|p| {
        let api = pods_api.clone();
        let name = p.name_any();
        async move { remove_tracking_finalizer(&api, &name).await }
    }))
    .await;
    for (pod, outcome) in release.iter().zip(outcomes) {
        match outcome {
            Ok(()) => {
                released.insert(uid_of(pod));
            }
            Err(e) => {
                release_error.get_or_insert(e);
            }
        }
    }
    // Pods without the finalizer (or gone) move from uncounted into the counts.
    let still_held: HashSet<String> = owned
        .iter()
        .filter(|p| has_tracking_finalizer(p))
        .map(|p| uid_of(p))
        .filter(|u| !released.contains(u))
        .collect();
    let before = (uncounted_succeeded.len(), uncounted_failed.len());
    uncounted_succeeded.retain(|u| still_held.contains(u));
    uncounted_failed.retain(|u| still_held.contains(u));
    let moved = (
        before.0 - uncounted_succeeded.len(),
        before.1 - uncounted_failed.len(),
    );
    let mut flush = moved != (0, 0);
    if flush {
        // An Indexed Job's succeeded is its completed indexes, set above.
        let moved_succeeded = if indexed { 0 } else { moved.0 as i32 };
        let s = status.succeeded.unwrap_or(0) + moved_succeeded;
        let f = status.failed.unwrap_or(0) + moved.1 as i32;
        status.succeeded = (s > 0).then_some(s);
        status.failed = (f > 0).then_some(f);
        status.uncounted_terminated_pods =
            Some(uncounted_status(&uncounted_succeeded, &uncounted_failed));
    }
    // The final condition once every pod is counted and none is still terminating.
    if let Some(done) = final_condition {
        if uncounted_succeeded.is_empty() && uncounted_failed.is_empty() && terminating == 0 {
            let mut conditions = status.conditions.clone().unwrap_or_default();
            ensure_condition(
                &mut conditions,
                &done.type_,
                "True",
                done.reason.as_deref().unwrap_or_default(),
                done.message.as_deref().unwrap_or_default(),
                now,
            );
            status.conditions = Some(conditions);
            if done.type_ == "Complete" {
                status.completion_time = Some(Time(now));
            }
            flush = true;
            info!(job = %format!("{namespace}/{name}"), condition = %done.type_, reason = ?done.reason, "job controller: job finished");
        }
    }
    if flush {
        write_status(jobs, job, &status).await?;
    }
    if let Some(e) = release_error {
        return Err(e.into());
    }
    if let Some(e) = manage_error {
        return Err(e);
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

fn uncounted_status(succeeded: &[String], failed: &[String]) -> UncountedTerminatedPods {
    UncountedTerminatedPods {
        succeeded: (!succeeded.is_empty()).then(|| succeeded.to_vec()),
        failed: (!failed.is_empty()).then(|| failed.to_vec()),
    }
}

/// Writes the Job's status (at the version read, so a concurrent change makes this sync fail
/// and run again); returns the Job as written.
async fn write_status(jobs: &Api<Job>, mut job: Job, status: &JobStatus) -> Result<Job, JobError> {
    job.status = Some(status.clone());
    let name = job.name_any();
    Ok(jobs
        .replace_status(&name, &PostParams::default(), &job)
        .await?)
}

/// Deletes pods; returns the uids deleted, how many of them were ready, and the first error.
async fn delete_pods(pods: &Api<Pod>, targets: &[&Pod]) -> (Vec<String>, i32, Option<JobError>) {
    let outcomes = join_all(targets.iter().map(|p| {
        let name = p.name_any();
        let params = DeleteParams {
            preconditions: p.metadata.uid.clone().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        async move { pods.delete(&name, &params).await }
    }))
    .await;
    let mut deleted = Vec::new();
    let mut deleted_ready = 0;
    let mut errors = Vec::new();
    for (pod, outcome) in targets.iter().zip(outcomes) {
        match outcome {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                errors.push(e);
                continue;
            }
        }
        deleted.push(pod.metadata.uid.clone().unwrap_or_default());
        if is_ready(pod) {
            deleted_ready += 1;
        }
    }
    let failed = errors.len();
    let error = errors.into_iter().next().map(|first| JobError::Pods {
        action: "deletions",
        tried: targets.len(),
        failed,
        first,
    });
    (deleted, deleted_ready, error)
}

/// A pod of the Job's template, owned by it, with the tracking finalizer; with an index, the
/// pod of that completion index (kube's: annotation, label, env var, hostname and name).
fn pod_from_template(job: &Job, index: Option<i32>) -> Pod {
    let template = job
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .unwrap_or_default();
    let mut meta = template.metadata.unwrap_or_default();
    let mut spec = template.spec;
    let mut generate_name = format!("{}-", job.name_any());
    if let Some(index) = index {
        meta.annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(COMPLETION_INDEX_KEY.into(), index.to_string());
        meta.labels
            .get_or_insert_with(BTreeMap::new)
            .insert(COMPLETION_INDEX_KEY.into(), index.to_string());
        if let Some(spec) = spec.as_mut() {
            spec.hostname = Some(format!("{}-{index}", job.name_any()));
            let init = spec.init_containers.iter_mut().flatten();
            for container in spec.containers.iter_mut().chain(init) {
                add_completion_index_env(container);
            }
        }
        generate_name = indexed_generate_name(&job.name_any(), index);
    }
    let mut finalizers = meta.finalizers.unwrap_or_default();
    if !finalizers.iter().any(|f| f == TRACKING_FINALIZER) {
        finalizers.push(TRACKING_FINALIZER.into());
    }
    let owner = OwnerReference {
        api_version: Job::api_version(&()).into_owned(),
        kind: Job::kind(&()).into_owned(),
        name: job.name_any(),
        uid: job.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(generate_name),
            namespace: job.namespace(),
            labels: meta.labels,
            annotations: meta.annotations,
            finalizers: Some(finalizers),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// `<job>-<index>-`, the Job's name cut so the server's random suffix still fits (kube's
/// podGenerateNameWithIndex).
fn indexed_generate_name(job: &str, index: i32) -> String {
    let suffix = format!("-{index}-");
    let mut keep = MAX_GENERATE_NAME_LENGTH
        .saturating_sub(suffix.len())
        .min(job.len());
    while !job.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}{suffix}", &job[..keep])
}

/// `JOB_COMPLETION_INDEX` from the pod's index annotation, unless the container sets it itself
/// (kube's addCompletionIndexEnvVariable).
fn add_completion_index_env(container: &mut Container) {
    let env = container.env.get_or_insert_with(Vec::new);
    if env.iter().any(|e| e.name == COMPLETION_INDEX_ENV) {
        return;
    }
    env.push(EnvVar {
        name: COMPLETION_INDEX_ENV.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: format!("metadata.annotations['{COMPLETION_INDEX_KEY}']"),
            }),
            ..EnvVarSource::default()
        }),
    });
}

/// Creates `new_pods` in batches of 1, 2, 4, ... (kube's slow start: a template the server
/// refuses fails once, not once per pod); returns how many were created and the first error.
async fn create_pods(pods: &Api<Pod>, job: &Job, new_pods: &[Pod]) -> (usize, Option<JobError>) {
    let count = new_pods.len();
    let params = PostParams::default();
    let mut created = 0;
    let mut batch = 1;
    while created < count {
        let size = batch.min(count - created);
        let outcomes = join_all(
            new_pods[created..created + size]
                .iter()
                .map(|pod| pods.create(&params, pod)),
        )
        .await;
        let mut errors = Vec::new();
        for outcome in outcomes {
            match outcome {
                Ok(_) => created += 1,
                Err(e) => errors.push(e),
            }
        }
        if let Some(first) = errors.into_iter().next() {
            return (
                created,
                Some(JobError::Pods {
                    action: "creations",
                    tried: count,
                    failed: count - created,
                    first,
                }),
            );
        }
        batch *= 2;
    }
    if created > 0 {
        let key = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
        info!(job = %key, created, "job controller: pods created");
    }
    (created, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};

    fn pod(phase: &str, node: Option<&str>, ready: bool, created_secs: i64) -> Pod {
        Pod {
            metadata: ObjectMeta {
                creation_timestamp: Some(Time(Timestamp::from_second(created_secs).unwrap())),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_string),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn active_pods_never_exceed_parallelism_or_the_completions_left() {
        assert_eq!(wanted_active(Some(3), 2, 0, 0), 2);
        assert_eq!(wanted_active(Some(3), 2, 2, 1), 1);
        assert_eq!(wanted_active(Some(3), 2, 3, 0), 0);
        assert_eq!(wanted_active(Some(3), 2, 5, 0), 0);
        assert_eq!(wanted_active(None, 4, 0, 1), 4);
        assert_eq!(
            wanted_active(None, 4, 1, 3),
            3,
            "after a success, none more"
        );
    }

    #[test]
    fn pods_are_removed_unscheduled_pending_unready_and_newest_first() {
        let mut pods = [
            pod("Running", Some("n1"), true, 100),
            pod("Pending", None, false, 50),
            pod("Running", Some("n1"), false, 100),
            pod("Pending", None, false, 60),
        ];
        pods.sort_by(removal_order);
        let key = |p: &Pod| {
            (
                phase(p).to_string(),
                is_ready(p),
                p.metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.as_second()),
            )
        };
        let order: Vec<_> = pods.iter().map(key).collect();
        assert_eq!(
            order,
            vec![
                ("Pending".to_string(), false, Some(60)),
                ("Pending".to_string(), false, Some(50)),
                ("Running".to_string(), false, Some(100)),
                ("Running".to_string(), true, Some(100)),
            ]
        );
    }

    #[test]
    fn failures_back_off_doubling_and_a_success_resets() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let failed = pod("Failed", None, false, 0);
        let ok = pod("Succeeded", None, false, 0);
        let one = BackoffRecord::default().next(&[], &[&failed], t0);
        assert_eq!(one.failures_after_last_success, 1);
        assert_eq!(one.remaining(t0), Duration::from_secs(10));
        let two = one.next(&[], &[&failed], t0);
        assert_eq!(two.remaining(t0), Duration::from_secs(20));
        let later = Timestamp::from_second(1_030).unwrap();
        assert_eq!(two.remaining(later), Duration::ZERO);
        let reset = two.next(&[&ok], &[], later);
        assert_eq!(reset, BackoffRecord::default());
    }

    #[test]
    fn conditions_change_only_when_they_differ_and_false_ones_are_not_added() {
        let now = Timestamp::from_second(10).unwrap();
        let mut conditions = Vec::new();
        assert!(!ensure_condition(
            &mut conditions,
            "Suspended",
            "False",
            "JobResumed",
            "Job resumed",
            now
        ));
        assert!(conditions.is_empty());
        assert!(ensure_condition(
            &mut conditions,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            now
        ));
        assert!(!ensure_condition(
            &mut conditions,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            now
        ));
        assert!(ensure_condition(
            &mut conditions,
            "Suspended",
            "False",
            "JobResumed",
            "Job resumed",
            now
        ));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, "False");
    }

    fn indexed(phase_: &str, ready: bool, index: Option<&str>, created_secs: i64) -> Pod {
        let mut p = pod(phase_, Some("n1"), ready, created_secs);
        p.metadata.annotations = index.map(|i| {
            [(COMPLETION_INDEX_KEY.to_string(), i.to_string())]
                .into_iter()
                .collect()
        });
        p
    }

    #[test]
    fn completed_indexes_read_and_write_kubes_interval_form() {
        let parsed = IndexIntervals::parse("0-2,4,6-7", 10);
        assert_eq!(parsed.to_string(), "0-2,4,6-7");
        assert_eq!(parsed.total(), 6);
        assert!(parsed.contains(0) && parsed.contains(2) && parsed.contains(7));
        assert!(!parsed.contains(3) && !parsed.contains(5) && !parsed.contains(8));
        assert_eq!(parsed.with([3, 5, 9]).to_string(), "0-7,9");
        assert_eq!(IndexIntervals::default().to_string(), "");
        assert_eq!(IndexIntervals::default().with([1, 0, 1]).to_string(), "0-1");
        assert_eq!(
            IndexIntervals::parse("x,3-1,-2,5-9,1", 7).to_string(),
            "1,5-6",
            "malformed parts dropped, out-of-range indexes cut"
        );
    }

    #[test]
    fn pending_indexes_are_the_lowest_not_succeeded_nor_running() {
        let succeeded = IndexIntervals::parse("0,3", 6);
        let taken: HashSet<i32> = [1].into_iter().collect();
        assert_eq!(first_pending_indexes(&succeeded, &taken, 2, 6), vec![2, 4]);
        assert_eq!(
            first_pending_indexes(&succeeded, &taken, 9, 6),
            vec![2, 4, 5]
        );
    }

    #[test]
    fn indexed_pods_without_a_valid_index_or_with_a_twin_are_removed_first() {
        let ready_0 = indexed("Running", true, Some("0"), 10);
        let pending_0 = indexed("Pending", false, Some("0"), 20);
        let no_index = indexed("Running", true, None, 10);
        let out_of_range = indexed("Running", true, Some("4"), 10);
        let one = indexed("Running", true, Some("1"), 10);
        let active = [&ready_0, &pending_0, &no_index, &out_of_range, &one];
        let removed = pods_to_remove(&active, 0, Some(4));
        assert_eq!(removed.len(), 3);
        assert!(removed.iter().any(|p| std::ptr::eq(*p, &pending_0)));
        assert!(!removed.iter().any(|p| std::ptr::eq(*p, &ready_0)));
        assert_eq!(pods_to_remove(&active, 4, Some(4)).len(), 4);
        assert_eq!(pods_to_remove(&active, 2, None).len(), 2);
    }

    #[test]
    fn an_indexed_pod_carries_its_index_everywhere_kube_puts_it() {
        use k8s_openapi::api::{batch::v1::JobSpec, core::v1::PodTemplateSpec};
        let job = Job {
            metadata: ObjectMeta {
                name: Some("work".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(JobSpec {
                completion_mode: Some("Indexed".into()),
                completions: Some(3),
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(PodSpec {
                        subdomain: Some("svc".into()),
                        containers: vec![Container {
                            name: "main".into(),
                            ..Container::default()
                        }],
                        init_containers: Some(vec![Container {
                            name: "init".into(),
                            env: Some(vec![EnvVar {
                                name: COMPLETION_INDEX_ENV.into(),
                                value: Some("own".into()),
                                value_from: None,
                            }]),
                            ..Container::default()
                        }]),
                        ..PodSpec::default()
                    }),
                },
                ..JobSpec::default()
            }),
            status: None,
        };
        let p = pod_from_template(&job, Some(2));
        assert_eq!(completion_index(&p), Some(2));
        assert_eq!(
            p.labels().get(COMPLETION_INDEX_KEY).map(String::as_str),
            Some("2")
        );
        assert_eq!(p.metadata.generate_name.as_deref(), Some("work-2-"));
        let spec = p.spec.unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("work-2"));
        assert_eq!(spec.subdomain.as_deref(), Some("svc"));
        let env = spec.containers[0].env.clone().unwrap();
        assert_eq!(env[0].name, COMPLETION_INDEX_ENV);
        assert_eq!(
            env[0]
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str()),
            Some("metadata.annotations['batch.kubernetes.io/job-completion-index']")
        );
        let init_env = spec.init_containers.unwrap()[0].env.clone().unwrap();
        assert_eq!(init_env.len(), 1, "a container's own variable is kept");
        let plain = pod_from_template(&job, None);
        assert_eq!(plain.metadata.generate_name.as_deref(), Some("work-"));
        assert!(completion_index(&plain).is_none());
        assert_eq!(indexed_generate_name(&"a".repeat(70), 12).len(), 58);
    }
}
