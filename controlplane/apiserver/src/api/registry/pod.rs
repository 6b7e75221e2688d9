//! Pods: defaulting (restart policy, DNS policy, the default tolerations, image pull policy),
//! validation, the QoS class, what an update may change, graceful deletion, and the columns.

use serde_json::{json, Value};

use super::strategy::{invalid, is_dns_label, required, set_default, Causes, Strategy};
use crate::api::{
    http::table::{text, Printer},
    status::ApiError,
};

pub struct Pods;

impl Strategy for Pods {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        object["status"] = json!({"phase": "Pending"});
        default_pod_spec(&mut object["spec"]);
        let causes = validate_pod_spec(&object["spec"], "spec");
        object["status"]["qosClass"] = qos_class(&object["spec"]).into();
        invalid("Pod", object, causes)
    }

    fn prepare_update(&self, current: &Value, new: &mut Value) -> Result<(), ApiError> {
        default_pod_spec(&mut new["spec"]);
        let mut stored = current["spec"].clone();
        default_pod_spec(&mut stored);
        let causes = pod_update_causes(&stored, &new["spec"]);
        invalid("Pod", new, causes)
    }

    fn status_subresource(&self) -> bool {
        true
    }

    /// A pod on a node that has not finished gets the grace period asked for, else its own
    /// `terminationGracePeriodSeconds`, for its kubelet to stop it; any other goes at once.
    fn deletion_grace(&self, current: &Value, requested: Option<i64>) -> Result<i64, ApiError> {
        let on_node = current["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty());
        let finished = matches!(
            current["status"]["phase"].as_str(),
            Some("Succeeded" | "Failed")
        );
        Ok(if on_node && !finished {
            requested
                .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_i64())
                .unwrap_or(30)
        } else {
            0
        })
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ]
    }

    fn printer(&self) -> Printer {
        Printer {
            columns: &[
                ("Ready", "string"),
                ("Status", "string"),
                ("Restarts", "string"),
            ],
            cells: |o| {
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let statuses = o["status"]["containerStatuses"].as_array();
                let ready = statuses
                    .into_iter()
                    .flatten()
                    .filter(|s| s["ready"] == true)
                    .count();
                let restarts: i64 = statuses
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["restartCount"].as_i64())
                    .sum();
                vec![
                    json!(format!("{ready}/{total}")),
                    json!(pod_status_reason(o)),
                    json!(restarts.to_string()),
                ]
            },
            wide: &[
                ("IP", "string"),
                ("Node", "string"),
                ("Nominated Node", "string"),
                ("Readiness Gates", "string"),
            ],
            wide_cells: |o| {
                vec![
                    text(&o["status"]["podIP"]),
                    text(&o["spec"]["nodeName"]),
                    text(&o["status"]["nominatedNodeName"]),
                    json!("<none>"),
                ]
            },
            ..Printer::NAME_AGE
        }
    }
}

/// The STATUS column as kubectl's pod printer words it: the phase, or what holds the pod up
/// (`Init:0/2`, `Init:CrashLoopBackOff`, `CrashLoopBackOff`, `ErrImagePull`, `Completed`...),
/// `Terminating` while it is being deleted.
fn pod_status_reason(o: &Value) -> String {
    let status = &o["status"];
    let mut reason = status["reason"]
        .as_str()
        .or(status["phase"].as_str())
        .unwrap_or("Pending")
        .to_string();
    let container_reason = |c: &Value| -> Option<String> {
        let state = &c["state"];
        if let Some(r) = state["waiting"]["reason"]
            .as_str()
            .filter(|r| !r.is_empty())
        {
            return Some(r.to_string());
        }
        let t = &state["terminated"];
        if t.is_object() {
            return Some(match (t["reason"].as_str(), t["signal"].as_i64()) {
                (Some(r), _) if !r.is_empty() => r.to_string(),
                (_, Some(signal)) if signal != 0 => format!("Signal:{signal}"),
                _ => format!("ExitCode:{}", t["exitCode"].as_i64().unwrap_or(0)),
            });
        }
        None
    };
    let init = status["initContainerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let init_total = o["spec"]["initContainers"].as_array().map_or(0, Vec::len);
    let mut initializing = false;
    for (i, c) in init.iter().enumerate() {
        let t = &c["state"]["terminated"];
        if t.is_object() && t["exitCode"] == 0 {
            continue;
        }
        initializing = true;
        reason = match container_reason(c) {
            Some(r) if r != "PodInitializing" && !(t.is_object() && r == "Completed") => {
                format!("Init:{r}")
            }
            _ => format!("Init:{i}/{init_total}"),
        };
        break;
    }
    if !initializing {
        let mut running = false;
        let containers = status["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for c in containers.iter().rev() {
            if c["state"]["running"].is_object() && c["ready"] == true {
                running = true;
            }
            if c["state"]["running"].is_object() {
                continue;
            }
            if let Some(r) = container_reason(c) {
                reason = r;
            }
        }
        // Some containers still run: the pod is Running (NotReady when its Ready says so).
        if reason == "Completed" && running {
            reason = "Running".into();
        }
    }
    if o["metadata"]["deletionTimestamp"].is_string() {
        reason = if status["reason"] == "NodeLost" {
            "Unknown".into()
        } else {
            "Terminating".into()
        };
    }
    reason
}

pub fn default_pod_spec(spec: &mut Value) {
    if !spec.is_object() {
        *spec = json!({});
    }
    set_default(spec, "restartPolicy", "Always".into());
    set_default(spec, "terminationGracePeriodSeconds", 30.into());
    set_default(spec, "dnsPolicy", "ClusterFirst".into());
    set_default(spec, "schedulerName", "default-scheduler".into());
    set_default(spec, "serviceAccountName", "default".into());
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", true.into());
    set_default(spec, "priority", 0.into());
    set_default(spec, "preemptionPolicy", "PreemptLowerPriority".into());
    // DefaultTolerationSeconds: 300 s for each of not-ready and unreachable that the Pod does
    // not tolerate already (by that key or an empty one, with NoExecute or any effect).
    if !spec["tolerations"].is_array() {
        spec["tolerations"] = json!([]);
    }
    if let Some(list) = spec["tolerations"].as_array_mut() {
        for key in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let tolerated = list.iter().any(|t| {
                matches!(t["key"].as_str(), None | Some("")) || t["key"].as_str() == Some(key)
            } && matches!(t["effect"].as_str(), None | Some("") | Some("NoExecute")));
            if !tolerated {
                list.push(
                    json!({"key": key, "operator": "Exists", "effect": "NoExecute",
                    "tolerationSeconds": 300}),
                );
            }
        }
    }
    for list in ["containers", "initContainers"] {
        if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
            for c in containers {
                let image = c["image"].as_str().unwrap_or_default();
                let tag = image.rsplit('/').next().unwrap_or_default();
                let pull =
                    if image.contains('@') || (tag.contains(':') && !tag.ends_with(":latest")) {
                        "IfNotPresent"
                    } else {
                        "Always"
                    };
                set_default(c, "imagePullPolicy", pull.into());
                set_default(c, "terminationMessagePath", "/dev/termination-log".into());
                set_default(c, "terminationMessagePolicy", "File".into());
                set_default(c, "resources", json!({}));
                if let Some(ports) = c.get_mut("ports").and_then(Value::as_array_mut) {
                    for p in ports {
                        set_default(p, "protocol", "TCP".into());
                    }
                }
            }
        }
    }
}

pub fn validate_pod_spec(spec: &Value, path: &str) -> Causes {
    let mut causes = Causes::new();
    match spec["containers"].as_array() {
        Some(containers) if !containers.is_empty() => {
            let mut names = Vec::new();
            for (i, c) in containers.iter().enumerate() {
                let at = format!("{path}.containers[{i}]");
                match c["name"].as_str() {
                    None | Some("") => required(&mut causes, &format!("{at}.name")),
                    Some(name) if !is_dns_label(name) => causes.push((
                        format!("{at}.name"),
                        format!("Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
                    )),
                    Some(name) if names.contains(&name) => causes.push((
                        format!("{at}.name"),
                        format!("Duplicate value: {name:?}"),
                    )),
                    Some(name) => names.push(name),
                }
                if c["image"].as_str().is_none_or(str::is_empty) {
                    required(&mut causes, &format!("{at}.image"));
                }
                for (j, p) in c["ports"].as_array().into_iter().flatten().enumerate() {
                    let port = p["containerPort"].as_i64().unwrap_or(0);
                    if !(1..=65535).contains(&port) {
                        causes.push((
                            format!("{at}.ports[{j}].containerPort"),
                            format!(
                                "Invalid value: {port}: must be between 1 and 65535, inclusive"
                            ),
                        ));
                    }
                }
            }
        }
        _ => required(&mut causes, &format!("{path}.containers")),
    }
    match spec["restartPolicy"].as_str() {
        Some("Always" | "OnFailure" | "Never") | None => {}
        Some(other) => causes.push((
            format!("{path}.restartPolicy"),
            format!("Unsupported value: {other:?}: supported values: \"Always\", \"OnFailure\", \"Never\""),
        )),
    }
    causes
}

/// Guaranteed when every container sets equal CPU and memory requests and limits, BestEffort when
/// none sets any, Burstable otherwise.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let any = containers.iter().any(|c| {
        ["requests", "limits"]
            .iter()
            .any(|k| c["resources"][k].as_object().is_some_and(|m| !m.is_empty()))
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        ["cpu", "memory"].iter().all(|r| {
            let limit = &c["resources"]["limits"][r];
            let request = &c["resources"]["requests"][r];
            !limit.is_null() && (request.is_null() || request == limit)
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// A pod's spec may change only in container images, activeDeadlineSeconds, added tolerations
/// and terminationGracePeriodSeconds (Kubernetes' rule); everything else is refused.
fn pod_update_causes(current: &Value, new: &Value) -> Causes {
    let strip = |spec: &Value| {
        let mut spec = spec.clone();
        for list in ["containers", "initContainers"] {
            if let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) {
                for c in containers {
                    if let Some(c) = c.as_object_mut() {
                        c.remove("image");
                    }
                }
            }
        }
        if let Some(o) = spec.as_object_mut() {
            for field in [
                "activeDeadlineSeconds",
                "tolerations",
                "terminationGracePeriodSeconds",
            ] {
                o.remove(field);
            }
        }
        spec
    };
    if strip(current) == strip(new) {
        Causes::new()
    } else {
        vec![(
            "spec".into(),
            "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, \
             `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` \
             (only additions to existing tolerations) or `spec.terminationGracePeriodSeconds` \
             (allow it to be set to 1 if it was previously negative)"
                .into(),
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry::resources::find;

    #[test]
    fn the_status_column_says_what_holds_the_pod_up() {
        let pod = |status: Value| json!({"metadata": {}, "spec": {"initContainers": [{"name": "a"}, {"name": "b"}]}, "status": status});
        let done = json!({"state": {"terminated": {"exitCode": 0, "reason": "Completed"}}});
        let waiting = |r: &str| json!({"state": {"waiting": {"reason": r}}});
        assert_eq!(
            pod_status_reason(&pod(
                json!({"phase": "Pending", "initContainerStatuses": [done, waiting("PodInitializing")]})
            )),
            "Init:1/2"
        );
        assert_eq!(
            pod_status_reason(&pod(
                json!({"phase": "Pending", "initContainerStatuses": [waiting("CrashLoopBackOff")]})
            )),
            "Init:CrashLoopBackOff"
        );
        let running = json!({"phase": "Running", "initContainerStatuses": [done, done],
                             "containerStatuses": [waiting("CrashLoopBackOff")]});
        assert_eq!(pod_status_reason(&pod(running)), "CrashLoopBackOff");
        let exited = json!({"phase": "Failed", "containerStatuses": [{"state": {"terminated": {"exitCode": 2}}}]});
        assert_eq!(pod_status_reason(&pod(exited)), "ExitCode:2");
        let mut deleting = pod(json!({"phase": "Running"}));
        deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        assert_eq!(pod_status_reason(&deleting), "Terminating");
    }

    #[test]
    fn pods_are_defaulted_and_validated() {
        let pods = find("", "v1", "pods").unwrap();
        let mut pod = json!({"metadata": {"name": "p"},
                             "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}});
        pods.strategy.prepare_create(&mut pod).unwrap();
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(
            pod["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(pod["status"]["phase"], "Pending");
        assert_eq!(pod["status"]["qosClass"], "BestEffort");
        // DefaultTolerationSeconds: 300 s for not-ready and unreachable, unless tolerated
        // already by key or by an empty key (which tolerates every taint).
        let keys = |pod: &Value| -> Vec<(String, Value)> {
            pod["spec"]["tolerations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| {
                    (
                        t["key"].as_str().unwrap_or("").to_string(),
                        t["tolerationSeconds"].clone(),
                    )
                })
                .collect()
        };
        assert_eq!(
            keys(&pod),
            [
                ("node.kubernetes.io/not-ready".to_string(), json!(300)),
                ("node.kubernetes.io/unreachable".to_string(), json!(300)),
            ]
        );
        let mut own = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "nginx:1.27"}],
            "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 5}]}});
        pods.strategy.prepare_create(&mut own).unwrap();
        assert_eq!(
            keys(&own),
            [
                ("node.kubernetes.io/unreachable".to_string(), json!(5)),
                ("node.kubernetes.io/not-ready".to_string(), json!(300)),
            ]
        );
        let mut all = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "nginx:1.27"}],
            "tolerations": [{"operator": "Exists"}]}});
        pods.strategy.prepare_create(&mut all).unwrap();
        assert_eq!(keys(&all), [(String::new(), Value::Null)]);
        let mut no_schedule = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "c", "image": "nginx:1.27"}],
            "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}]}});
        pods.strategy.prepare_create(&mut no_schedule).unwrap();
        assert_eq!(
            keys(&no_schedule).len(),
            3,
            "NoSchedule only: the defaults still added"
        );
        let mut bad = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "C"}]}});
        let err = pods.strategy.prepare_create(&mut bad).unwrap_err();
        assert!(
            err.message
                .contains("spec.containers[0].image: Required value"),
            "{}",
            err.message
        );
        assert!(
            err.message
                .contains("spec.containers[0].name: Invalid value"),
            "{}",
            err.message
        );
    }
}
