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
        batch::v1::{Job, JobCondition, JobStatus, UncountedTerminatedPods},
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
    completion_index, controller_ref, create_pods, delete_pods, first_pending_indexes,
    has_tracking_finalizer, is_failed, is_finished, is_ready, is_terminal, only_replace_failed,
    phase, pod_from_template, remove_tracking_finalizer, Context, IndexIntervals, JobError,
    MAX_POD_CHANGES_PER_SYNC, MESSAGE_BACKOFF_LIMIT, MESSAGE_COMPLETIONS_REACHED, MESSAGE_DEADLINE,
    MESSAGE_INDEXED_WITHOUT_COMPLETIONS, REASON_BACKOFF_LIMIT, REASON_COMPLETIONS_REACHED,
    REASON_DEADLINE, REASON_INVALID_SPEC,
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

/// One sync of a Job read live (kube's syncJob).
pub(super) async fn sync(ctx: &Context, jobs: &Api<Job>, mut job: Job) -> Result<Action, JobError> {
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
