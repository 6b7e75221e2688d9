//! The Job's pods: what is read of one (phase, readiness, failure), and creating them from the
//! template (with the completion index) and deleting them.

use std::collections::BTreeMap;

use futures::future::join_all;
use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use kube::{
    api::{DeleteParams, PostParams},
    Api, Resource as _, ResourceExt as _,
};
use tracing::info;

use super::{
    JobError, COMPLETION_INDEX_ENV, COMPLETION_INDEX_KEY, MAX_GENERATE_NAME_LENGTH,
    TRACKING_FINALIZER,
};

pub(super) fn is_terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

pub(super) fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub(super) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a pod counts as failed: its phase says so, or, unless the Job replaces only failed
/// pods, it is being deleted before succeeding (kube's isPodFailed).
pub(super) fn is_failed(pod: &Pod, only_replace_failed: bool) -> bool {
    if phase(pod) == "Failed" {
        return true;
    }
    !only_replace_failed && pod.metadata.deletion_timestamp.is_some() && phase(pod) != "Succeeded"
}

pub(super) fn only_replace_failed(job: &Job) -> bool {
    job.spec.as_ref().is_some_and(|s| {
        s.pod_replacement_policy.as_deref() == Some("Failed") || s.pod_failure_policy.is_some()
    })
}

/// Deletes pods; returns the uids deleted, how many of them were ready, and the first error.
pub(super) async fn delete_pods(
    pods: &Api<Pod>,
    targets: &[&Pod],
) -> (Vec<String>, i32, Option<JobError>) {
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
pub(super) fn pod_from_template(job: &Job, index: Option<i32>) -> Pod {
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
pub(super) fn indexed_generate_name(job: &str, index: i32) -> String {
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
pub(super) fn add_completion_index_env(container: &mut Container) {
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
pub(super) async fn create_pods(
    pods: &Api<Pod>,
    job: &Job,
    new_pods: &[Pod],
) -> (usize, Option<JobError>) {
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
