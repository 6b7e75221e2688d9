//! One sync of a Job, in kube's syncJob order: read the Job's pods, judge whether it is done
//! (success, backoff limit, deadline), manage its pods (delete surplus, create missing, within
//! the pod-failure backoff), count finished pods through `uncountedTerminatedPods` and their
//! finalizers, then write the final condition.

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use futures::future::join_all;
use k8s_openapi::{
    api::{
        batch::v1::{Job, JobCondition, JobSpec, JobStatus, UncountedTerminatedPods},
        core::v1::Pod,
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    api::{ListParams, PostParams},
    runtime::controller::Action,
    Api, ResourceExt as _,
};
use tracing::{info, warn};

use seine_apimachinery::labels::Selector;

use super::{
    backoff::BackoffRecord, completion_index, controller_ref, create_pods, delete_pods,
    first_pending_indexes, has_tracking_finalizer, is_failed, is_finished, is_ready, is_terminal,
    only_replace_failed, phase, pod_from_template, remove_tracking_finalizer, Context,
    IndexIntervals, JobError, MAX_POD_CHANGES_PER_SYNC, MESSAGE_BACKOFF_LIMIT,
    MESSAGE_COMPLETIONS_REACHED, MESSAGE_DEADLINE, MESSAGE_INDEXED_WITHOUT_COMPLETIONS,
    REASON_BACKOFF_LIMIT, REASON_COMPLETIONS_REACHED, REASON_DEADLINE, REASON_INVALID_SPEC,
};

pub(super) fn new_condition(
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
pub(super) fn ensure_condition(
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
pub(super) fn removal_order(a: &Pod, b: &Pod) -> std::cmp::Ordering {
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
pub(super) fn wanted_active(
    completions: Option<i32>,
    parallelism: i32,
    succeeded: i32,
    active: i32,
) -> i32 {
    match completions {
        // Without completions, once one pod succeeded the rest are left to finish.
        None if succeeded > 0 => active,
        None => parallelism,
        Some(c) => (c - succeeded).clamp(0, parallelism),
    }
}

/// With restartPolicy OnFailure, container restarts of active pods count against the limit.
pub(super) fn past_backoff_limit_on_failure(job: &Job, pods: &[&Pod], limit: i32) -> bool {
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

/// The active pods to delete, first first: for an Indexed Job (`completions` given) every pod
/// without a valid index and all but the best pod of each index, then, to reach `at_least`,
/// the others in `removal_order` (kube's activePodsForRemoval).
pub(super) fn pods_to_remove<'a>(
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
pub(super) struct Finish {
    pub(super) interim: JobCondition,
    pub(super) success: bool,
}

impl Finish {
    pub(super) fn success(now: Timestamp) -> Self {
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

    pub(super) fn failure(reason: &str, message: &str, now: Timestamp) -> Self {
        Finish {
            interim: new_condition("FailureTarget", "True", reason, message, now),
            success: false,
        }
    }

    pub(super) fn final_kind(&self) -> &'static str {
        if self.success {
            "Complete"
        } else {
            "Failed"
        }
    }
}

/// What a sync reads of a Job and its pods, and the rules that follow from its spec.
struct View<'a> {
    job: &'a Job,
    spec: &'a JobSpec,
    /// The pods the Job controls (controller reference and selector).
    owned: Vec<&'a Pod>,
    /// Owned pods that run or will: not finished, not being deleted.
    active: Vec<&'a Pod>,
    indexed: bool,
    /// An Indexed Job's completions: indexes are valid below it.
    index_limit: Option<i32>,
    replace_only_failed: bool,
    suspended: bool,
}

impl<'a> View<'a> {
    fn new(job: &'a Job, spec: &'a JobSpec, pods: &'a [Pod]) -> Self {
        let owned: Vec<&Pod> = pods.iter().collect();
        let active = owned
            .iter()
            .copied()
            .filter(|p| !is_terminal(p) && p.metadata.deletion_timestamp.is_none())
            .collect();
        // Indexed pods are told apart by index below completions; kube-apiserver refuses an
        // Indexed Job without completions, and such a Job fails in `judge` without any pod.
        let indexed = spec.completion_mode.as_deref() == Some("Indexed");
        View {
            job,
            spec,
            owned,
            active,
            indexed,
            index_limit: if indexed { spec.completions } else { None },
            replace_only_failed: only_replace_failed(job),
            suspended: spec.suspend == Some(true),
        }
    }

    fn valid_index(&self, pod: &Pod) -> Option<i32> {
        completion_index(pod).filter(|i| self.index_limit.is_some_and(|c| *i < c))
    }

    /// An Indexed Job's pods without a valid index count neither way (kube's
    /// getValidPodsWithFilter).
    fn countable(&self, pod: &Pod) -> bool {
        !self.indexed || self.valid_index(pod).is_some()
    }

    fn being_deleted(&self) -> impl Iterator<Item = &'a Pod> + '_ {
        self.owned
            .iter()
            .copied()
            .filter(|p| !is_terminal(p) && p.metadata.deletion_timestamp.is_some())
    }
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

/// The pod counts a sync keeps as it deletes and creates pods.
#[derive(Default)]
struct Counts {
    active: i32,
    terminating: i32,
    ready: i32,
    /// Pods this sync deleted: they count as failed.
    deleted_now: HashSet<String>,
    /// The first error of a pod deletion or creation; the sync goes on and reports it last.
    manage_error: Option<JobError>,
}

impl Counts {
    fn deleted(&mut self, (deleted, deleted_ready, error): (Vec<String>, i32, Option<JobError>)) {
        self.active -= deleted.len() as i32;
        self.terminating += deleted.len() as i32;
        self.ready -= deleted_ready;
        self.deleted_now.extend(deleted);
        self.manage_error = error;
    }
}

/// Pods finished but not yet in the counts: recorded in `uncountedTerminatedPods` until their
/// tracking finalizer is off.
struct Uncounted {
    succeeded: Vec<String>,
    failed: Vec<String>,
}

/// One sync of a Job read live (kube's syncJob): judge it, manage its pods, count the finished
/// ones, and give it its final condition once they are all counted.
pub(super) async fn sync(ctx: &Context, jobs: &Api<Job>, job: Job) -> Result<Action, JobError> {
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
    let uid = job.metadata.uid.clone().unwrap_or_default();
    let pods_api: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let pods = owned_pods(&pods_api, &spec, &uid).await?;
    let view = View::new(&job, &spec, &pods);

    let mut status = job.status.clone().unwrap_or_default();
    let recorded = status.uncounted_terminated_pods.clone().unwrap_or_default();
    let mut uncounted = Uncounted {
        succeeded: recorded.succeeded.unwrap_or_default(),
        failed: recorded.failed.unwrap_or_default(),
    };
    let tally = Tally::of(&view, &status, &uncounted);
    let (succeeded, failed) = (tally.succeeded, tally.failed);
    let backoff = ctx
        .backoff
        .lock()
        .ok()
        .and_then(|b| b.get(&uid).copied())
        .unwrap_or_default()
        .next(&tally.new_succeeded, &tally.new_failed, now);
    if status.start_time.is_none() && !view.suspended {
        status.start_time = Some(Time(now));
    }

    let (mut finish, mut requeue) = judge(&view, &status, failed, now);
    let mut counts = Counts {
        active: view.active.len() as i32,
        terminating: view.being_deleted().count() as i32,
        ready: view.active.iter().filter(|p| is_ready(p)).count() as i32,
        ..Counts::default()
    };
    let mut conditions = status.conditions.clone().unwrap_or_default();
    let mut suspend_changed = false;
    if finish.is_some() {
        // The Job is done for: its active pods go.
        counts.deleted(delete_pods(&pods_api, &view.active).await);
        if counts.active != 0 {
            finish = None;
        }
    } else {
        let managed = job.metadata.deletion_timestamp.is_none();
        if managed {
            let wait = manage_pods(
                &view,
                &pods_api,
                &mut counts,
                succeeded,
                &tally.completed_indexes,
                &backoff,
                now,
            )
            .await;
            if let Some(wait) = wait {
                requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
            }
        }
        let complete = match spec.completions {
            None => succeeded > 0 && counts.active == 0,
            Some(c) => succeeded >= c && counts.active == 0,
        };
        if complete {
            finish = Some(Finish::success(now));
        } else if managed {
            suspend_changed = ensure_suspended(&mut conditions, view.suspended, now);
            if suspend_changed && !view.suspended {
                // activeDeadlineSeconds counts from the resume.
                status.start_time = Some(Time(now));
            }
        }
    }

    let (release, mut flush) = record_finished(&view, finish.as_ref(), &counts, &mut uncounted);
    if view.indexed {
        let text = tally.completed_indexes.to_string();
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
        || previous.active.unwrap_or(0) != counts.active
        || previous.ready != Some(counts.ready)
        || previous.terminating != Some(counts.terminating)
        || previous.start_time != status.start_time;
    status.active = (counts.active > 0).then_some(counts.active);
    status.ready = Some(counts.ready);
    status.terminating = Some(counts.terminating);
    status.conditions = (!conditions.is_empty()).then_some(conditions);
    status.uncounted_terminated_pods =
        Some(uncounted_status(&uncounted.succeeded, &uncounted.failed));
    let mut written = job.clone();
    if flush || needs_update {
        written = write_status(jobs, written, &status).await?;
        status = written.status.clone().unwrap_or_default();
    }
    // The failures just written into uncountedTerminatedPods count for the pod-failure
    // backoff even if a later write fails.
    if let Ok(mut b) = ctx.backoff.lock() {
        b.insert(uid, backoff);
    }

    let (released, release_error) = release_finalizers(&pods_api, &release).await;
    let mut flush = settle(&view, &released, &mut uncounted, &mut status);
    // The final condition once every pod is counted and none is still terminating.
    if let Some(done) = final_condition {
        if uncounted.succeeded.is_empty() && uncounted.failed.is_empty() && counts.terminating == 0
        {
            finish_job(&mut status, &done, now);
            flush = true;
            info!(job = %format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any()), condition = %done.type_, reason = ?done.reason, "job controller: job finished");
        }
    }
    if flush {
        write_status(jobs, written, &status).await?;
    }
    if let Some(e) = release_error {
        return Err(e.into());
    }
    if let Some(e) = counts.manage_error {
        return Err(e);
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// What the pods say about progress: finished pods not yet counted, and the totals with them.
struct Tally<'a> {
    new_succeeded: Vec<&'a Pod>,
    new_failed: Vec<&'a Pod>,
    completed_indexes: IndexIntervals,
    succeeded: i32,
    failed: i32,
}

impl<'a> Tally<'a> {
    fn of(view: &View<'a>, status: &JobStatus, uncounted: &Uncounted) -> Self {
        let new_succeeded: Vec<&Pod> = view
            .owned
            .iter()
            .copied()
            .filter(|p| has_tracking_finalizer(p) && phase(p) == "Succeeded")
            .filter(|p| !uncounted.succeeded.contains(&uid_of(p)) && view.countable(p))
            .collect();
        let new_failed: Vec<&Pod> = view
            .owned
            .iter()
            .copied()
            .filter(|p| has_tracking_finalizer(p) && is_failed(p, view.replace_only_failed))
            .filter(|p| !uncounted.failed.contains(&uid_of(p)) && view.countable(p))
            .collect();
        // An Indexed Job counts succeeded indexes, not pods: they go straight into
        // completedIndexes, so a second success of an index is never counted.
        let completed_indexes = IndexIntervals::parse(
            status.completed_indexes.as_deref().unwrap_or_default(),
            view.index_limit.unwrap_or(0),
        )
        .with(
            new_succeeded
                .iter()
                .filter(|p| !uncounted.failed.contains(&uid_of(p)))
                .filter_map(|p| view.valid_index(p)),
        );
        let succeeded = if view.indexed {
            completed_indexes.total()
        } else {
            status.succeeded.unwrap_or(0)
                + new_succeeded.len() as i32
                + uncounted.succeeded.len() as i32
        };
        let failed =
            status.failed.unwrap_or(0) + new_failed.len() as i32 + uncounted.failed.len() as i32;
        Tally {
            new_succeeded,
            new_failed,
            completed_indexes,
            succeeded,
            failed,
        }
    }
}

/// The pods the Job controls: listed by its selector, kept if their controller is the Job.
async fn owned_pods(pods_api: &Api<Pod>, spec: &JobSpec, uid: &str) -> Result<Vec<Pod>, JobError> {
    let selector = spec.selector.clone().unwrap_or_default();
    let pod_selector = Selector::from_label_selector(Some(&selector));
    // The server filters by the whole selector, set-based expressions too; one with an unknown
    // operator selects nothing, so there is nothing to ask for.
    if pod_selector.is_nothing() {
        return Ok(Vec::new());
    }
    let listed = pods_api
        .list(&ListParams::default().labels(&pod_selector.to_string()))
        .await?
        .items;
    Ok(listed
        .into_iter()
        .filter(|p| controller_ref(p).is_some_and(|o| o.uid == uid))
        .filter(|p| pod_selector.matches(p.labels()))
        .collect())
}

/// Whether the Job is done for, and with what: a finish decided before (its interim condition),
/// an invalid spec, the backoff limit, or the active deadline; else when the deadline falls.
fn judge(
    view: &View,
    status: &JobStatus,
    failed: i32,
    now: Timestamp,
) -> (Option<Finish>, Option<Duration>) {
    let spec = view.spec;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    let holds = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True")
            .cloned()
    };
    let backoff_limit = spec.backoff_limit.unwrap_or(6);
    if let Some(met) = holds("SuccessCriteriaMet") {
        return (
            Some(Finish {
                interim: met,
                success: true,
            }),
            None,
        );
    }
    if let Some(target) = holds("FailureTarget") {
        return (
            Some(Finish {
                interim: target,
                success: false,
            }),
            None,
        );
    }
    if view.indexed && spec.completions.is_none() {
        warn!(job = %format!("{}/{}", view.job.namespace().unwrap_or_default(), view.job.name_any()), "job controller: an Indexed Job needs completions; failing it");
        let finish = Finish::failure(
            REASON_INVALID_SPEC,
            MESSAGE_INDEXED_WITHOUT_COMPLETIONS,
            now,
        );
        return (Some(finish), None);
    }
    if failed > backoff_limit
        || past_backoff_limit_on_failure(view.job, &view.active, backoff_limit)
    {
        let finish = Finish::failure(REASON_BACKOFF_LIMIT, MESSAGE_BACKOFF_LIMIT, now);
        return (Some(finish), None);
    }
    if let (Some(deadline), Some(start), false) = (
        spec.active_deadline_seconds,
        status.start_time.as_ref(),
        view.suspended,
    ) {
        let elapsed = now.duration_since(start.0);
        let allowed = SignedDuration::from_secs(deadline);
        if elapsed >= allowed {
            return (
                Some(Finish::failure(REASON_DEADLINE, MESSAGE_DEADLINE, now)),
                None,
            );
        }
        return (None, Duration::try_from(allowed - elapsed).ok());
    }
    (None, None)
}

/// Deletes the active pods beyond what should run (all of them when suspended), or creates
/// the missing ones once the pod-failure backoff allows; returns how long that backoff still
/// holds.
async fn manage_pods(
    view: &View<'_>,
    pods_api: &Api<Pod>,
    counts: &mut Counts,
    succeeded: i32,
    completed_indexes: &IndexIntervals,
    backoff: &BackoffRecord,
    now: Timestamp,
) -> Option<Duration> {
    let parallelism = view.spec.parallelism.unwrap_or(1);
    let completions = view.spec.completions;
    let active = counts.active;
    let remove_at_least = if view.suspended {
        active as usize
    } else {
        (active - wanted_active(completions, parallelism, succeeded, active)).max(0) as usize
    };
    let removable = pods_to_remove(&view.active, remove_at_least, view.index_limit);
    if !removable.is_empty() {
        let chosen = &removable[..removable.len().min(MAX_POD_CHANGES_PER_SYNC)];
        counts.deleted(delete_pods(pods_api, chosen).await);
        return None;
    }
    if view.suspended {
        return None;
    }
    let want = wanted_active(completions, parallelism, succeeded, active);
    let counted_terminating = if view.replace_only_failed {
        counts.terminating
    } else {
        0
    };
    let missing = (want - counted_terminating - active).max(0) as usize;
    if missing == 0 {
        return None;
    }
    let wait = backoff.remaining(now);
    if wait > Duration::ZERO {
        return Some(wait);
    }
    let count = missing.min(MAX_POD_CHANGES_PER_SYNC);
    let new_pods: Vec<Pod> = match view.index_limit {
        // One pod per index still missing, lowest first.
        Some(completions) => {
            let mut taken: HashSet<i32> = view
                .active
                .iter()
                .filter_map(|p| completion_index(p))
                .collect();
            if view.replace_only_failed {
                taken.extend(view.being_deleted().filter_map(completion_index));
            }
            first_pending_indexes(completed_indexes, &taken, count, completions)
                .into_iter()
                .map(|i| pod_from_template(view.job, Some(i)))
                .collect()
        }
        None => vec![pod_from_template(view.job, None); count],
    };
    let (created, error) = create_pods(pods_api, view.job, &new_pods).await;
    counts.active += created as i32;
    counts.manage_error = error;
    None
}

/// The Suspended condition as the Job's `suspend` says; whether it changed.
fn ensure_suspended(conditions: &mut Vec<JobCondition>, suspended: bool, now: Timestamp) -> bool {
    if suspended {
        ensure_condition(
            conditions,
            "Suspended",
            "True",
            "JobSuspended",
            "Job suspended",
            now,
        )
    } else {
        ensure_condition(
            conditions,
            "Suspended",
            "False",
            "JobResumed",
            "Job resumed",
            now,
        )
    }
}

/// Finished pods still holding the tracking finalizer go into `uncountedTerminatedPods`
/// (succeeded, or failed: by phase, by the Job failing, or deleted by this sync); returns the
/// pods whose finalizer may come off, and whether the uncounted lists changed.
fn record_finished<'a>(
    view: &View<'a>,
    finish: Option<&Finish>,
    counts: &Counts,
    uncounted: &mut Uncounted,
) -> (Vec<&'a Pod>, bool) {
    let job_deleting = view.job.metadata.deletion_timestamp.is_some();
    let failing = finish.is_some_and(|f| !f.success);
    let mut changed = false;
    let mut release = Vec::new();
    for pod in view
        .owned
        .iter()
        .copied()
        .filter(|p| has_tracking_finalizer(p))
    {
        let pod_uid = uid_of(pod);
        let considered_failed = is_failed(pod, view.replace_only_failed);
        let removable =
            job_deleting || finish.is_some() || phase(pod) == "Succeeded" || considered_failed;
        if !removable {
            continue;
        }
        release.push(pod);
        if phase(pod) == "Succeeded" && !uncounted.failed.contains(&pod_uid) {
            // An Indexed Job's success is in completed_indexes already.
            if !view.indexed && !uncounted.succeeded.contains(&pod_uid) {
                uncounted.succeeded.push(pod_uid);
                changed = true;
            }
        } else if (considered_failed || failing || counts.deleted_now.contains(&pod_uid))
            && !uncounted.failed.contains(&pod_uid)
            && view.countable(pod)
        {
            uncounted.failed.push(pod_uid);
            changed = true;
        }
    }
    (release, changed)
}

/// Takes the tracking finalizer off `pods`; returns the uids released and the first error.
async fn release_finalizers(
    pods_api: &Api<Pod>,
    pods: &[&Pod],
) -> (HashSet<String>, Option<kube::Error>) {
    let outcomes = join_all(pods.iter().map(|p| {
        let api = pods_api.clone();
        let name = p.name_any();
        async move { remove_tracking_finalizer(&api, &name).await }
    }))
    .await;
    let mut released = HashSet::new();
    let mut error = None;
    for (pod, outcome) in pods.iter().zip(outcomes) {
        match outcome {
            Ok(()) => {
                released.insert(uid_of(pod));
            }
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    (released, error)
}

/// Pods without the finalizer (released, or gone) move from uncounted into the counts;
/// returns whether any did.
fn settle(
    view: &View,
    released: &HashSet<String>,
    uncounted: &mut Uncounted,
    status: &mut JobStatus,
) -> bool {
    let still_held: HashSet<String> = view
        .owned
        .iter()
        .filter(|p| has_tracking_finalizer(p))
        .map(|p| uid_of(p))
        .filter(|u| !released.contains(u))
        .collect();
    let before = (uncounted.succeeded.len(), uncounted.failed.len());
    uncounted.succeeded.retain(|u| still_held.contains(u));
    uncounted.failed.retain(|u| still_held.contains(u));
    let moved = (
        before.0 - uncounted.succeeded.len(),
        before.1 - uncounted.failed.len(),
    );
    if moved == (0, 0) {
        return false;
    }
    // An Indexed Job's succeeded is its completed indexes, set before.
    let moved_succeeded = if view.indexed { 0 } else { moved.0 as i32 };
    let s = status.succeeded.unwrap_or(0) + moved_succeeded;
    let f = status.failed.unwrap_or(0) + moved.1 as i32;
    status.succeeded = (s > 0).then_some(s);
    status.failed = (f > 0).then_some(f);
    status.uncounted_terminated_pods =
        Some(uncounted_status(&uncounted.succeeded, &uncounted.failed));
    true
}

/// The final condition (Complete or Failed), and the completion time of a Complete one.
fn finish_job(status: &mut JobStatus, done: &JobCondition, now: Timestamp) {
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
}

pub(super) fn uncounted_status(succeeded: &[String], failed: &[String]) -> UncountedTerminatedPods {
    UncountedTerminatedPods {
        succeeded: (!succeeded.is_empty()).then(|| succeeded.to_vec()),
        failed: (!failed.is_empty()).then(|| failed.to_vec()),
    }
}

/// Writes the Job's status (at the version read, so a concurrent change makes this sync fail
/// and run again); returns the Job as written.
pub(super) async fn write_status(
    jobs: &Api<Job>,
    mut job: Job,
    status: &JobStatus,
) -> Result<Job, JobError> {
    job.status = Some(status.clone());
    let name = job.name_any();
    Ok(jobs
        .replace_status(&name, &PostParams::default(), &job)
        .await?)
}
