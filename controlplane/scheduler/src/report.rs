//! What the scheduler tells users, as kube-scheduler does: a `Scheduled` event when a pod is
//! bound, a `FailedScheduling` warning with the reasons when it cannot be, and the pod's
//! PodScheduled condition set to False through pods/status. A repeated warning bumps the
//! count of the event already written instead of writing another.
//!
//! All of it is written in the background, off the decision path. Condition updates go out at
//! once (and carry the pod's resourceVersion, so a stale one never lands on a pod bound
//! since); events wait while pods are waiting to be decided or bound (at most
//! `MAX_EVENT_DELAY`), so that a burst of pods is bound at the API server's full bind rate.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api, Client,
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{debug, warn};

use super::pod::PodInfo;

/// How long an event may wait for the scheduler to be idle.
pub const MAX_EVENT_DELAY: Duration = Duration::from_secs(10);
/// Writes in flight at once.
const CONCURRENCY: usize = 4;
/// Reports waiting beyond this are dropped (as client-go's event broadcaster drops).
const MAX_QUEUED: usize = 10_000;
/// The longest event message the API takes.
const MAX_MESSAGE: usize = 1024;

#[derive(Debug, Clone)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

impl From<&PodInfo> for PodRef {
    fn from(p: &PodInfo) -> Self {
        PodRef {
            namespace: p.key.namespace.clone(),
            name: p.key.name.clone(),
            uid: p.uid.clone(),
            resource_version: p.resource_version.clone(),
        }
    }
}

#[derive(Debug)]
enum Job {
    Condition {
        pod: PodRef,
        reason: &'static str,
        message: String,
        transition: bool,
    },
    Event {
        pod: PodRef,
        type_: &'static str,
        reason: &'static str,
        action: &'static str,
        message: String,
        queued: Instant,
    },
}

/// The handle the scheduler reports through; dropping it aborts the writer task, and with it
/// whatever is still queued.
pub struct Reporter {
    tx: mpsc::Sender<Job>,
    busy: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Cuts a message to what an event may carry, as kube-scheduler does.
fn truncate(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE - " ...".len();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} ...", &message[..end])
}

impl Reporter {
    /// Starts the writer. `component` is the scheduler's name (events' source), `instance`
    /// this replica's.
    pub fn spawn(client: Client, component: String, instance: String) -> Self {
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let (busy, busy_rx) = watch::channel(false);
        let writer = Writer {
            client,
            component,
            instance,
            series: HashMap::new(),
        };
        let task = tokio::spawn(writer.run(rx, busy_rx));
        Reporter { tx, busy, task }
    }

    fn send(&self, job: Job) {
        if self.tx.try_send(job).is_err() {
            warn!("too many events and pod conditions waiting to be written: one dropped");
        }
    }

    /// Whether pods are waiting to be decided or bound (events hold back meanwhile).
    pub fn set_busy(&self, busy: bool) {
        self.busy.send_if_modified(|b| {
            let changed = *b != busy;
            *b = busy;
            changed
        });
    }

    pub fn scheduled(&self, pod: &PodInfo, node: &str) {
        self.send(Job::Event {
            pod: pod.into(),
            type_: "Normal",
            reason: "Scheduled",
            action: "Binding",
            message: format!(
                "Successfully assigned {}/{} to {node}",
                pod.key.namespace, pod.key.name
            ),
            queued: Instant::now(),
        });
    }

    /// A failed attempt: the warning, and the condition unless the pod already says so.
    pub fn failed(&self, pod: &PodInfo, reason: &'static str, message: &str) {
        self.send(Job::Event {
            pod: pod.into(),
            type_: "Warning",
            reason: "FailedScheduling",
            action: "Scheduling",
            message: truncate(message),
            queued: Instant::now(),
        });
        let current = pod.condition.as_ref();
        let same = current
            .is_some_and(|c| c.status == "False" && c.reason == reason && c.message == message);
        if !same {
            self.send(Job::Condition {
                pod: pod.into(),
                reason,
                message: message.to_string(),
                transition: current.is_none_or(|c| c.status != "False"),
            });
        }
    }
}

struct Writer {
    client: Client,
    component: String,
    instance: String,
    /// Events already written, by (pod uid, reason, message): their name and count.
    series: HashMap<(String, &'static str, String), (String, i32)>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>, mut busy: watch::Receiver<bool>) {
        let mut conditions: VecDeque<Job> = VecDeque::new();
        let mut events: VecDeque<Job> = VecDeque::new();
        let mut writes: JoinSet<()> = JoinSet::new();
        // Dropping the Reporter aborts this task: reports still queued then are not written.
        loop {
            let oldest = events.front().and_then(|j| match j {
                Job::Event { queued, .. } => Some(*queued + MAX_EVENT_DELAY),
                Job::Condition { .. } => None,
            });
            tokio::select! {
                Some(_) = writes.join_next(), if !writes.is_empty() => {}
                job = rx.recv() => match job {
                    Some(job @ Job::Condition { .. }) => conditions.push_back(job),
                    Some(job @ Job::Event { .. }) => events.push_back(job),
                    None => return,
                },
                changed = busy.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(oldest.unwrap_or_else(Instant::now).into()), if oldest.is_some() => {}
            }
            while writes.len() < CONCURRENCY {
                let job = if let Some(job) = conditions.pop_front() {
                    job
                } else {
                    let overdue = oldest.is_some_and(|at| at <= Instant::now());
                    if events.is_empty() || (*busy.borrow() && !overdue) {
                        break;
                    }
                    match events.pop_front() {
                        Some(job) => job,
                        None => break,
                    }
                };
                let write = self.write(job);
                writes.spawn(write);
            }
        }
    }

    /// The request for one job, ready to run on its own.
    fn write(&mut self, job: Job) -> impl std::future::Future<Output = ()> + Send + 'static {
        let client = self.client.clone();
        let component = self.component.clone();
        let instance = self.instance.clone();
        let series = match &job {
            Job::Event {
                pod,
                reason,
                message,
                ..
            } => {
                if self.series.len() > MAX_QUEUED {
                    self.series.clear();
                }
                let now = Timestamp::now();
                let entry = self
                    .series
                    .entry((pod.uid.clone(), *reason, message.clone()))
                    .or_insert_with(|| (format!("{}.{:x}", pod.name, now.as_nanosecond()), 0));
                entry.1 += 1;
                Some(entry.clone())
            }
            Job::Condition { .. } => None,
        };
        async move {
            match job {
                Job::Condition {
                    pod,
                    reason,
                    message,
                    transition,
                } => {
                    let api: Api<k8s_openapi::api::core::v1::Pod> =
                        Api::namespaced(client, &pod.namespace);
                    let mut condition = serde_json::json!({
                        "type": "PodScheduled", "status": "False", "reason": reason,
                        "message": message, "lastProbeTime": null,
                    });
                    if transition {
                        condition["lastTransitionTime"] =
                            serde_json::to_value(Time(Timestamp::now())).unwrap_or_default();
                    }
                    let patch = serde_json::json!({
                        "metadata": {"resourceVersion": pod.resource_version},
                        "status": {"conditions": [condition]},
                    });
                    match api
                        .patch_status(
                            &pod.name,
                            &PatchParams::default(),
                            &Patch::Strategic(&patch),
                        )
                        .await
                    {
                        Ok(_) => {}
                        // The pod changed since the attempt (bound, deleted, edited): the
                        // next attempt, if any, says what holds then.
                        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                            debug!(pod = %format!("{}/{}", pod.namespace, pod.name), "PodScheduled condition left as it is: the pod changed");
                        }
                        Err(e) => {
                            warn!(pod = %format!("{}/{}", pod.namespace, pod.name), "setting the PodScheduled condition: {e}")
                        }
                    }
                }
                Job::Event {
                    pod,
                    type_,
                    reason,
                    action,
                    message,
                    ..
                } => {
                    let (name, count) = series.unwrap_or_default();
                    let api: Api<Event> = Api::namespaced(client, &pod.namespace);
                    let now = Timestamp::now();
                    if count > 1 {
                        let patch = serde_json::json!({
                            "count": count,
                            "lastTimestamp": Time(now),
                        });
                        match api
                            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                            .await
                        {
                            Ok(_) => return,
                            Err(kube::Error::Api(s)) if s.code == 404 => {}
                            Err(e) => {
                                warn!(event = %name, "updating an event: {e}");
                                return;
                            }
                        }
                    }
                    let event = Event {
                        metadata: ObjectMeta {
                            name: Some(name.clone()),
                            namespace: Some(pod.namespace.clone()),
                            ..Default::default()
                        },
                        involved_object: ObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some(pod.name.clone()),
                            namespace: Some(pod.namespace.clone()),
                            uid: Some(pod.uid.clone()),
                            resource_version: Some(pod.resource_version.clone()),
                            ..Default::default()
                        },
                        type_: Some(type_.into()),
                        reason: Some(reason.into()),
                        action: Some(action.into()),
                        message: Some(message),
                        source: Some(EventSource {
                            component: Some(component.clone()),
                            host: None,
                        }),
                        reporting_component: Some(component),
                        reporting_instance: Some(instance),
                        first_timestamp: Some(Time(now)),
                        last_timestamp: Some(Time(now)),
                        event_time: Some(MicroTime(now)),
                        count: Some(count.max(1)),
                        ..Default::default()
                    };
                    match api.create(&PostParams::default(), &event).await {
                        Ok(_) => {}
                        // Already written (a retried create): nothing to add.
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(e) => warn!(event = %name, "writing an event: {e}"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_as_kube_scheduler_cuts_them() {
        let long = "x".repeat(2000);
        let cut = truncate(&long);
        assert_eq!(cut.len(), MAX_MESSAGE);
        assert!(cut.ends_with(" ..."));
        assert_eq!(truncate("short"), "short");
    }
}
