//! A kind's rules, as kube-apiserver's registry strategies hold them: what a create defaults and
//! validates, what an update may change, how a delete proceeds, which fields select, and how
//! `kubectl get` prints it. Each kind's strategy lives in its own file of `registry/`, and each
//! served resource names its strategy in `resources::RESOURCES` (this module knows neither); the
//! rules every kind shares (server-owned metadata, the status subresource) are here.

use serde_json::{json, Value};

use crate::api::{http::table::Printer, status::ApiError};

/// Causes of a 422: (field path, message), worded as Kubernetes words them.
pub type Causes = Vec<(String, String)>;

pub fn required(causes: &mut Causes, field: &str) {
    causes.push((field.to_string(), "Required value".to_string()));
}

/// A 422 for `object` of `kind` when there are causes.
pub fn invalid(kind: &str, object: &Value, causes: Causes) -> Result<(), ApiError> {
    if causes.is_empty() {
        Ok(())
    } else {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        Err(ApiError::invalid(kind, name, causes))
    }
}

/// A 422 saying `field` may not change.
pub fn immutable(kind: &str, object: &Value, field: &str) -> Result<(), ApiError> {
    invalid(
        kind,
        object,
        vec![(
            field.to_string(),
            "Invalid value: field is immutable".into(),
        )],
    )
}

pub fn set_default(object: &mut Value, field: &str, value: Value) {
    if object.get(field).is_none_or(Value::is_null) {
        object[field] = value;
    }
}

/// Whether `name` is a DNS-1123 label (container and port names).
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// One kind's rules. Every method has the default of a kind without rules of its own.
pub trait Strategy: Sync {
    /// Defaults and validation of a new object (its metadata already settled).
    fn prepare_create(&self, _object: &mut Value) -> Result<(), ApiError> {
        Ok(())
    }

    /// The kind's rules for an update of `current` to `new`, after the shared ones: defaults,
    /// validation, immutable fields.
    fn prepare_update(&self, _current: &Value, _new: &mut Value) -> Result<(), ApiError> {
        Ok(())
    }

    /// Whether the status is written only through the status subresource, so that a write of
    /// the object keeps the stored status.
    fn status_subresource(&self) -> bool {
        false
    }

    /// Graceful deletion: the grace period in seconds that a delete of `current` starts
    /// (0: gone as soon as nothing holds it), from the one the client asked for; or a refusal.
    fn deletion_grace(&self, _current: &Value, _requested: Option<i64>) -> Result<i64, ApiError> {
        Ok(0)
    }

    /// What else changes when a deletion begins (a namespace turns Terminating).
    fn begin_deletion(&self, _object: &mut Value) {}

    /// The fields a field selector may name besides `metadata.name` and `metadata.namespace`.
    fn selectable_fields(&self) -> &'static [&'static str] {
        &[]
    }

    /// The columns of `kubectl get`.
    fn printer(&self) -> Printer {
        Printer::NAME_AGE
    }
}

/// The strategy of kinds without rules of their own.
pub struct Plain;

impl Strategy for Plain {}

/// The object an update writes, from what is stored and what the client sent: metadata the server
/// owns is kept, a status-subresource write changes only the status (and a main write never
/// does), and the kind's rules hold.
pub fn prepare_update(
    strategy: &dyn Strategy,
    subresource: Option<&str>,
    current: &Value,
    mut new: Value,
) -> Result<Value, ApiError> {
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    for field in [
        "name",
        "namespace",
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generateName",
        "managedFields",
    ] {
        match current["metadata"].get(field) {
            Some(v) => new["metadata"][field] = v.clone(),
            None => {
                if let Some(meta) = new["metadata"].as_object_mut() {
                    meta.remove(field);
                }
            }
        }
    }
    new["kind"] = current["kind"].clone();
    new["apiVersion"] = current["apiVersion"].clone();
    if subresource == Some("status") {
        let mut object = current.clone();
        object["status"] = new["status"].clone();
        if let Some(rv) = new["metadata"].get("resourceVersion") {
            object["metadata"]["resourceVersion"] = rv.clone();
        }
        return Ok(object);
    }
    if strategy.status_subresource() {
        match current.get("status") {
            Some(status) => new["status"] = status.clone(),
            None => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
    }
    strategy.prepare_update(current, &mut new)?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry::resources::find;

    #[test]
    fn status_writes_change_only_the_status() {
        let pods = find("", "v1", "pods").unwrap().strategy;
        let current = json!({"kind": "Pod", "apiVersion": "v1",
                             "metadata": {"name": "p", "uid": "u", "labels": {"a": "1"}},
                             "spec": {"containers": [{"name": "c", "image": "x"}]},
                             "status": {"phase": "Pending"}});
        let mut sent = current.clone();
        sent["status"]["phase"] = "Running".into();
        sent["metadata"]["labels"]["a"] = "2".into();
        let out = prepare_update(pods, Some("status"), &current, sent.clone()).unwrap();
        assert_eq!(out["status"]["phase"], "Running");
        assert_eq!(out["metadata"]["labels"]["a"], "1");
        let out = prepare_update(pods, None, &current, sent).unwrap();
        assert_eq!(out["status"]["phase"], "Pending");
        assert_eq!(out["metadata"]["labels"]["a"], "2");
    }
}
