//! Nodes: a spec always present, status through the subresource (their kubelet's), and the
//! columns `kubectl get nodes` shows.

use serde_json::{json, Value};

use super::strategy::Strategy;
use crate::api::{
    http::table::{text, Printer},
    status::ApiError,
};

pub struct Nodes;

impl Strategy for Nodes {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        if !object["spec"].is_object() {
            object["spec"] = json!({});
        }
        Ok(())
    }

    fn status_subresource(&self) -> bool {
        true
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &["spec.unschedulable"]
    }

    fn printer(&self) -> Printer {
        Printer {
            columns: &[("Status", "string"), ("Version", "string")],
            cells: |o| {
                let ready = o["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == "Ready")
                    .map(|c| {
                        if c["status"] == "True" {
                            "Ready"
                        } else {
                            "NotReady"
                        }
                    })
                    .unwrap_or("Unknown");
                vec![
                    json!(ready),
                    text(&o["status"]["nodeInfo"]["kubeletVersion"]),
                ]
            },
            wide: &[("Internal-IP", "string")],
            wide_cells: |o| {
                let ip = o["status"]["addresses"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|a| a["type"] == "InternalIP")
                    .map(|a| a["address"].clone())
                    .unwrap_or(Value::Null);
                vec![text(&ip)]
            },
            ..Printer::NAME_AGE
        }
    }
}
