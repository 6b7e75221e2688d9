use super::*;
use super::{backoff::*, indexes::*, pods::*, sync::*};
use std::{collections::HashSet, time::Duration};

use k8s_openapi::{
    api::{
        batch::v1::Job,
        core::v1::{Container, EnvVar, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};

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
