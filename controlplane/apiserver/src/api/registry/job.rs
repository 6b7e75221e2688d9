//! Jobs: defaulting (parallelism, completions, backoff limit, the generated selector and pod
//! labels), validation of the pod template, the fields that may not change, and the columns.

use serde_json::{json, Value};

use super::{
    pod::{default_pod_spec, validate_pod_spec},
    strategy::{immutable, invalid, set_default, Strategy},
};
use crate::api::{
    http::table::{human_duration, Printer},
    status::ApiError,
};

pub struct Jobs;

impl Strategy for Jobs {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        object["status"] = json!({});
        prepare_job(object)
    }

    fn prepare_update(&self, current: &Value, new: &mut Value) -> Result<(), ApiError> {
        for field in ["selector", "completions", "completionMode"] {
            if new["spec"].get(field).is_none_or(Value::is_null) {
                new["spec"][field] = current["spec"][field].clone();
            } else if new["spec"][field] != current["spec"][field] {
                immutable("Job", new, &format!("spec.{field}"))?;
            }
        }
        Ok(())
    }

    fn status_subresource(&self) -> bool {
        true
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &["status.successful"]
    }

    fn printer(&self) -> Printer {
        Printer {
            columns: &[
                ("Status", "string"),
                ("Completions", "string"),
                ("Duration", "string"),
            ],
            cells: |o| {
                let conditions = o["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let has = |t: &str| {
                    conditions
                        .iter()
                        .any(|c| c["type"] == t && c["status"] == "True")
                };
                let status = if has("Complete") {
                    "Complete"
                } else if has("Failed") {
                    "Failed"
                } else if o["spec"]["suspend"] == true {
                    "Suspended"
                } else {
                    "Running"
                };
                let duration = match (
                    o["status"]["startTime"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
                    o["status"]["completionTime"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
                ) {
                    (Some(start), Some(end)) => human_duration((end - start).num_seconds()),
                    (Some(start), None) => human_duration(
                        (chrono::Utc::now() - start.with_timezone(&chrono::Utc)).num_seconds(),
                    ),
                    _ => String::new(),
                };
                vec![
                    json!(status),
                    json!(format!(
                        "{}/{}",
                        o["status"]["succeeded"].as_i64().unwrap_or(0),
                        o["spec"]["completions"].as_i64().unwrap_or(1)
                    )),
                    json!(duration),
                ]
            },
            ..Printer::NAME_AGE
        }
    }
}

fn prepare_job(job: &mut Value) -> Result<(), ApiError> {
    let uid = job["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !job["spec"].is_object() {
        job["spec"] = json!({});
    }
    let spec = &mut job["spec"];
    set_default(spec, "parallelism", 1.into());
    set_default(spec, "completions", 1.into());
    set_default(spec, "backoffLimit", 6.into());
    set_default(spec, "completionMode", "NonIndexed".into());
    set_default(spec, "suspend", false.into());
    set_default(spec, "podReplacementPolicy", "TerminatingOrFailed".into());
    // The selector and template labels tie the Job's pods to it, as kube-apiserver generates them.
    if spec["manualSelector"] != true {
        let labels = json!({"batch.kubernetes.io/controller-uid": uid, "controller-uid": uid,
                            "batch.kubernetes.io/job-name": name, "job-name": name});
        spec["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
        if !spec["template"]["metadata"].is_object() {
            spec["template"]["metadata"] = json!({});
        }
        let template_labels = &mut spec["template"]["metadata"]["labels"];
        if !template_labels.is_object() {
            *template_labels = json!({});
        }
        if let (Some(target), Some(extra)) = (template_labels.as_object_mut(), labels.as_object()) {
            for (k, v) in extra {
                target.insert(k.clone(), v.clone());
            }
        }
    }
    default_pod_spec(&mut spec["template"]["spec"]);
    let mut causes = validate_pod_spec(&spec["template"]["spec"], "spec.template.spec");
    if !matches!(
        spec["template"]["spec"]["restartPolicy"].as_str(),
        Some("OnFailure" | "Never")
    ) {
        causes.push((
            "spec.template.spec.restartPolicy".into(),
            "Required value: valid values: \"OnFailure\", \"Never\"".into(),
        ));
    }
    for field in ["parallelism", "completions", "backoffLimit"] {
        if spec[field].as_i64().is_some_and(|v| v < 0) {
            causes.push((
                format!("spec.{field}"),
                format!(
                    "Invalid value: {}: must be greater than or equal to 0",
                    spec[field]
                ),
            ));
        }
    }
    invalid("Job", job, causes)
}
