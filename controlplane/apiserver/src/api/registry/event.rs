//! Events: the fields `kubectl get events --field-selector` may name, and kubectl's columns
//! (last seen, type, reason, object, message; no name or age).

use serde_json::json;

use super::strategy::Strategy;
use crate::api::http::table::{age, text, Printer};

pub struct Events;

impl Strategy for Events {
    fn selectable_fields(&self) -> &'static [&'static str] {
        &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ]
    }

    fn printer(&self) -> Printer {
        Printer {
            name_and_age: false,
            columns: &[
                ("Last Seen", "string"),
                ("Type", "string"),
                ("Reason", "string"),
                ("Object", "string"),
                ("Message", "string"),
            ],
            cells: |o| {
                let seen = ["lastTimestamp", "eventTime", "firstTimestamp"]
                    .iter()
                    .find_map(|f| o[*f].as_str())
                    .or(o["metadata"]["creationTimestamp"].as_str());
                let involved = &o["involvedObject"];
                let object = format!(
                    "{}/{}",
                    involved["kind"].as_str().unwrap_or_default().to_lowercase(),
                    involved["name"].as_str().unwrap_or_default()
                );
                vec![
                    json!(age(seen)),
                    text(&o["type"]),
                    text(&o["reason"]),
                    json!(object),
                    json!(o["message"].as_str().unwrap_or_default()),
                ]
            },
            ..Printer::NAME_AGE
        }
    }
}
