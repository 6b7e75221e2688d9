//! The Job controller in the real seine-controller-manager against a real etcd and
//! seine-apiserver. There is no kubelet: the test plays it, moving pods to Succeeded or Failed
//! through pods/status. Jobs run no more pods than their parallelism until their completions
//! succeed, fail once their backoffLimit or activeDeadlineSeconds is passed (taking their
//! running pods down), wait while suspended, and, deleted in the foreground, take their pods
//! along first.

use seine_tests::controllers;
use serde_json::{json, Value};

const JOBS: &str = "/apis/batch/v1/namespaces/default/jobs";
const PODS: &str = "/api/v1/namespaces/default/pods";

/// The shared cluster (etcd, API server, controller manager) with this file's helpers.
struct Cluster(controllers::Cluster);

impl std::ops::Deref for Cluster {
    type Target = controllers::Cluster;

    fn deref(&self) -> &controllers::Cluster {
        &self.0
    }
}

impl Cluster {
    fn start(controllers: &str) -> Self {
        Cluster(controllers::Cluster::controller_manager(controllers).unwrap())
    }

    fn create_job(&self, name: &str, spec: Value) -> Value {
        let mut spec = spec;
        spec["template"] = json!({"spec": {"restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": ["true"]}]}});
        let (code, job) = self
            .api
            .post(JOBS, &json!({"metadata": {"name": name}, "spec": spec}))
            .unwrap();
        assert_eq!(code, 201, "{job}");
        job
    }

    fn job(&self, name: &str) -> Value {
        let (code, job) = self.api.get(&format!("{JOBS}/{name}")).unwrap();
        assert_eq!(code, 200, "{job}");
        job
    }

    /// The Job's pods (by the job-name label kube-apiserver puts on its template).
    fn pods(&self, job: &str) -> Vec<Value> {
        let (code, list) = self
            .api
            .get(&format!("{PODS}?labelSelector=job-name%3D{job}"))
            .unwrap();
        assert_eq!(code, 200, "{list}");
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// Pods still running: not finished, not being deleted.
    fn active(&self, job: &str) -> Vec<Value> {
        self.pods(job)
            .into_iter()
            .filter(|p| {
                p["metadata"]["deletionTimestamp"].is_null()
                    && !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
            })
            .collect()
    }

    /// Plays the kubelet: the pod ends in `phase`.
    fn finish(&self, pod: &Value, phase: &str) {
        let name = pod["metadata"]["name"].as_str().unwrap();
        let (code, out) = self
            .api
            .merge_patch(
                &format!("{PODS}/{name}/status"),
                &json!({"status": {"phase": phase}}),
            )
            .unwrap();
        assert_eq!(code, 200, "{out}");
    }
}

/// The condition of `kind` if it is True.
fn condition(job: &Value, kind: &str) -> Option<Value> {
    job["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind && c["status"] == "True")
        .cloned()
}

#[test]
fn a_job_runs_at_most_parallelism_pods_until_its_completions_succeed() {
    let c = Cluster::start("job,garbagecollector");
    let job = c.create_job("three", json!({"completions": 3, "parallelism": 2}));
    let uid = job["metadata"]["uid"].as_str().unwrap().to_string();

    // Its pods: from the template, owned by the Job, held by the tracking finalizer.
    c.wait("the first pods", || c.active("three").len() == 2);

    // `kubectl create job` (a protobuf body) works as well.
    c.api
        .kubectl_ok(&[
            "create",
            "job",
            "typed",
            "--image=busybox",
            "--",
            "echo",
            "hi",
        ])
        .unwrap();
    c.wait("the kubectl job's pod", || c.pods("typed").len() == 1);
    let typed = &c.pods("typed")[0];
    assert_eq!(
        typed["spec"]["containers"][0]["command"],
        json!(["echo", "hi"])
    );
    assert_eq!(typed["spec"]["restartPolicy"], "Never");
    let pod = &c.pods("three")[0];
    assert_eq!(pod["metadata"]["generateName"], "three-");
    assert_eq!(
        pod["metadata"]["ownerReferences"],
        json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "three", "uid": uid,
                "controller": true, "blockOwnerDeletion": true}])
    );
    for (k, v) in [
        ("batch.kubernetes.io/controller-uid", uid.as_str()),
        ("controller-uid", uid.as_str()),
        ("batch.kubernetes.io/job-name", "three"),
        ("job-name", "three"),
    ] {
        assert_eq!(pod["metadata"]["labels"][k], v, "label {k}: {pod}");
    }
    assert_eq!(
        pod["metadata"]["finalizers"],
        json!(["batch.kubernetes.io/job-tracking"])
    );

    // One pod succeeds at a time; never more than two run, never more than three are made.
    for done in 1..=3 {
        let mut next = None;
        c.wait("a pod to finish", || {
            let active = c.active("three");
            assert!(active.len() <= 2, "over parallelism: {active:?}");
            assert!(c.pods("three").len() <= 3, "more pods than completions");
            next = active.into_iter().next();
            next.is_some()
        });
        c.finish(&next.unwrap(), "Succeeded");
        c.wait("the success counted", || {
            c.job("three")["status"]["succeeded"].as_i64() == Some(done)
        });
    }
    c.wait("the Job complete", || {
        condition(&c.job("three"), "Complete").is_some()
    });
    let job = c.job("three");
    let status = &job["status"];
    assert_eq!(status["succeeded"], 3);
    assert!(status["failed"].is_null(), "{status}");
    assert!(status["active"].is_null(), "{status}");
    assert!(status["startTime"].is_string(), "{status}");
    assert!(status["completionTime"].is_string(), "{status}");
    for kind in ["SuccessCriteriaMet", "Complete"] {
        let cond = condition(&job, kind).unwrap_or_else(|| panic!("{kind}: {status}"));
        assert_eq!(cond["reason"], "CompletionsReached");
        assert_eq!(cond["message"], "Reached expected number of succeeded pods");
    }
    assert_eq!(c.pods("three").len(), 3);
    for pod in c.pods("three") {
        let finalizers = pod["metadata"]["finalizers"].as_array().cloned();
        assert!(
            finalizers.unwrap_or_default().is_empty(),
            "counted pods are released: {pod}"
        );
    }
    let shown = c
        .api
        .kubectl_ok(&[
            "get",
            "job",
            "three",
            "-o",
            "jsonpath={.status.succeeded} {.status.conditions[?(@.type==\"Complete\")].status}",
        ])
        .unwrap();
    assert_eq!(shown.trim(), "3 True");

    // A suspended Job makes no pods until it is resumed.
    c.create_job(
        "later",
        json!({"parallelism": 2, "completions": 2, "suspend": true}),
    );
    c.wait("Suspended", || {
        condition(&c.job("later"), "Suspended").is_some()
    });
    let job = c.job("later");
    assert!(job["status"]["startTime"].is_null(), "{job}");
    assert!(c.pods("later").is_empty());
    let (code, out) = c
        .api
        .merge_patch(
            &format!("{JOBS}/later"),
            &json!({"spec": {"suspend": false}}),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
    c.wait("pods once resumed", || c.active("later").len() == 2);
    c.wait("the resume in the conditions", || {
        let job = c.job("later");
        job["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| {
                c["type"] == "Suspended" && c["status"] == "False" && c["reason"] == "JobResumed"
            })
            && job["status"]["startTime"].is_string()
    });

    // Deleted in the foreground, the Job takes its running pods along before it goes.
    c.api
        .kubectl_ok(&[
            "delete",
            "job",
            "later",
            "--cascade=foreground",
            "--wait=false",
        ])
        .unwrap();
    c.wait("the pods and then the Job gone", || {
        c.pods("later").is_empty() && c.api.get(&format!("{JOBS}/later")).unwrap().0 == 404
    });
}

#[test]
fn jobs_fail_past_their_backoff_limit_or_deadline_and_their_pods_go() {
    let c = Cluster::start("job");
    c.create_job(
        "flaky",
        json!({"completions": 3, "parallelism": 3, "backoffLimit": 1}),
    );
    c.create_job(
        "slow",
        json!({"completions": 2, "parallelism": 2, "activeDeadlineSeconds": 2}),
    );
    c.wait("flaky's pods", || c.active("flaky").len() == 3);

    // Two failures with backoffLimit 1: the Job fails and its last running pod is deleted.
    let pods = c.active("flaky");
    c.finish(&pods[0], "Failed");
    c.wait("the first failure counted", || {
        c.job("flaky")["status"]["failed"].as_i64() == Some(1)
    });
    assert!(condition(&c.job("flaky"), "Failed").is_none());
    c.finish(&pods[1], "Failed");
    c.wait("flaky failed", || {
        condition(&c.job("flaky"), "Failed").is_some()
    });
    let job = c.job("flaky");
    for kind in ["FailureTarget", "Failed"] {
        let cond = condition(&job, kind).unwrap_or_else(|| panic!("{kind}: {job}"));
        assert_eq!(cond["reason"], "BackoffLimitExceeded");
        assert_eq!(
            cond["message"],
            "Job has reached the specified backoff limit"
        );
    }
    assert!(job["status"]["failed"].as_i64() >= Some(2), "{job}");
    assert!(job["status"]["active"].is_null(), "{job}");
    assert!(job["status"]["completionTime"].is_null(), "{job}");
    c.wait("only the failed pods left", || {
        let pods = c.pods("flaky");
        pods.len() == 2 && pods.iter().all(|p| p["status"]["phase"] == "Failed")
    });

    // Past activeDeadlineSeconds: failed with DeadlineExceeded, its pods deleted.
    c.wait("slow failed", || {
        condition(&c.job("slow"), "Failed").is_some()
    });
    let job = c.job("slow");
    let failed = condition(&job, "Failed").unwrap();
    assert_eq!(failed["reason"], "DeadlineExceeded");
    assert_eq!(
        failed["message"],
        "Job was active longer than specified deadline"
    );
    c.wait("slow's pods gone", || c.pods("slow").is_empty());
    let shown = c
        .api
        .kubectl_ok(&[
            "get",
            "job",
            "slow",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Failed\")].reason}",
        ])
        .unwrap();
    assert_eq!(shown.trim(), "DeadlineExceeded");
}

/// An Indexed Job's pod's completion index, after checking it is everywhere kube puts it:
/// annotation, label, hostname, generateName and each container's environment.
fn completion_index(job: &str, pod: &Value) -> i64 {
    const KEY: &str = "batch.kubernetes.io/job-completion-index";
    let meta = &pod["metadata"];
    let index = meta["annotations"][KEY]
        .as_str()
        .and_then(|i| i.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no completion index annotation: {pod}"));
    assert_eq!(meta["labels"][KEY], index.to_string(), "{pod}");
    assert_eq!(meta["generateName"], format!("{job}-{index}-"), "{pod}");
    assert_eq!(pod["spec"]["hostname"], format!("{job}-{index}"), "{pod}");
    for container in pod["spec"]["containers"].as_array().into_iter().flatten() {
        let env = container["env"].as_array().cloned().unwrap_or_default();
        assert!(
            env.iter().any(|e| e["name"] == "JOB_COMPLETION_INDEX"
                && e["valueFrom"]["fieldRef"]["fieldPath"]
                    == format!("metadata.annotations['{KEY}']")),
            "no JOB_COMPLETION_INDEX: {pod}"
        );
    }
    index
}

#[test]
fn an_indexed_job_runs_one_pod_per_index_and_completes_when_every_index_succeeded() {
    let c = Cluster::start("job");
    c.create_job(
        "indexed",
        json!({"completions": 4, "parallelism": 2, "completionMode": "Indexed"}),
    );
    let indexes = |pods: &[Value]| {
        let mut indexes: Vec<i64> = pods
            .iter()
            .map(|p| completion_index("indexed", p))
            .collect();
        indexes.sort();
        indexes
    };

    // The lowest indexes first, one pod each.
    c.wait("the first pods", || c.active("indexed").len() == 2);
    let first = c.active("indexed");
    assert_eq!(indexes(&first), vec![0, 1]);
    let pod_of = |index: i64| {
        first
            .iter()
            .find(|p| completion_index("indexed", p) == index)
            .cloned()
            .unwrap()
    };

    // Index 1 fails and index 0 succeeds: index 1 gets a new pod, index 2 its first. (The
    // success after the failure resets the pod failure backoff, as in kube, so the new pod is
    // not held back 10 s.)
    let failed = pod_of(1);
    c.finish(&failed, "Failed");
    c.finish(&pod_of(0), "Succeeded");
    c.wait("index 1 again and index 2", || {
        let active = c.active("indexed");
        active.len() == 2 && indexes(&active) == vec![1, 2]
    });
    let retry = c
        .active("indexed")
        .into_iter()
        .find(|p| completion_index("indexed", p) == 1)
        .unwrap();
    assert_ne!(retry["metadata"]["name"], failed["metadata"]["name"]);
    c.wait("the failure and the success counted", || {
        let status = c.job("indexed")["status"].clone();
        status["failed"] == 1 && status["succeeded"] == 1 && status["completedIndexes"] == "0"
    });

    // The rest succeed one at a time; never more than two run, never two for one index.
    for want in 2..=4 {
        let mut next = None;
        c.wait("a pod to finish", || {
            let active = c.active("indexed");
            assert!(active.len() <= 2, "over parallelism: {active:?}");
            let running = indexes(&active);
            let mut distinct = running.clone();
            distinct.dedup();
            assert_eq!(running, distinct, "two pods for one index: {active:?}");
            next = active.into_iter().next();
            next.is_some()
        });
        c.finish(&next.unwrap(), "Succeeded");
        c.wait("the success counted", || {
            c.job("indexed")["status"]["succeeded"].as_i64() == Some(want)
        });
    }
    c.wait("the Job complete", || {
        condition(&c.job("indexed"), "Complete").is_some()
    });
    let job = c.job("indexed");
    let status = &job["status"];
    assert_eq!(status["completedIndexes"], "0-3", "{status}");
    assert_eq!(status["succeeded"], 4, "{status}");
    assert_eq!(status["failed"], 1, "{status}");
    assert!(status["active"].is_null(), "{status}");
    assert_eq!(
        c.pods("indexed").len(),
        5,
        "one pod per index and one retry"
    );
    for pod in c.pods("indexed") {
        let finalizers = pod["metadata"]["finalizers"].as_array().cloned();
        assert!(
            finalizers.unwrap_or_default().is_empty(),
            "counted pods are released: {pod}"
        );
    }
}
