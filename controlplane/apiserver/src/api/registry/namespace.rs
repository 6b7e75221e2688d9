//! Namespaces: Active with the `kubernetes` finalizer when created; on delete, Terminating until
//! the namespace controller has emptied them, except the ones a cluster cannot do without.

use serde_json::{json, Value};

use super::strategy::Strategy;
use crate::api::{
    http::table::{text, Printer},
    status::ApiError,
};

/// The namespaces kube-apiserver refuses to delete.
const PROTECTED: [&str; 3] = ["default", "kube-system", "kube-public"];

pub struct Namespaces;

impl Strategy for Namespaces {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        object["status"] = json!({"phase": "Active"});
        object["spec"] = json!({"finalizers": ["kubernetes"]});
        Ok(())
    }

    fn status_subresource(&self) -> bool {
        true
    }

    fn deletion_grace(&self, current: &Value, _requested: Option<i64>) -> Result<i64, ApiError> {
        let name = current["metadata"]["name"].as_str().unwrap_or_default();
        if PROTECTED.contains(&name) {
            return Err(ApiError::forbidden(format!(
                "namespaces {name:?} is forbidden: this namespace may not be deleted"
            )));
        }
        Ok(0)
    }

    fn begin_deletion(&self, object: &mut Value) {
        object["status"]["phase"] = "Terminating".into();
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &["status.phase"]
    }

    fn printer(&self) -> Printer {
        Printer {
            columns: &[("Status", "string")],
            cells: |o| vec![text(&o["status"]["phase"])],
            ..Printer::NAME_AGE
        }
    }
}
