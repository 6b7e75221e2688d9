//! Secrets: `stringData` folded into `data`, `data` checked as base64, the type defaulted and
//! selectable, and the columns.

use serde_json::{json, Value};

use super::strategy::{invalid, set_default, Causes, Strategy};
use crate::api::{
    http::table::{count, text, Printer},
    status::ApiError,
};

pub struct Secrets;

impl Strategy for Secrets {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        prepare_secret(object)
    }

    fn prepare_update(&self, _current: &Value, new: &mut Value) -> Result<(), ApiError> {
        prepare_secret(new)
    }

    fn selectable_fields(&self) -> &'static [&'static str] {
        &["type"]
    }

    fn printer(&self) -> Printer {
        Printer {
            columns: &[("Type", "string"), ("Data", "integer")],
            cells: |o| vec![text(&o["type"]), json!(count(&o["data"]))],
            ..Printer::NAME_AGE
        }
    }
}

/// `stringData` is folded into `data` (base64), and `data` must be base64.
fn prepare_secret(secret: &mut Value) -> Result<(), ApiError> {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    set_default(secret, "type", "Opaque".into());
    if let Some(strings) = secret.as_object_mut().and_then(|o| o.remove("stringData")) {
        if !secret["data"].is_object() {
            secret["data"] = json!({});
        }
        for (k, v) in strings.as_object().into_iter().flatten() {
            secret["data"][k] = engine.encode(v.as_str().unwrap_or_default()).into();
        }
    }
    let mut causes = Causes::new();
    for (k, v) in secret["data"].as_object().into_iter().flatten() {
        if v.as_str().is_none_or(|s| engine.decode(s).is_err()) {
            causes.push((
                format!("data[{k}]"),
                "Invalid value: \"<secret contents redacted>\": illegal base64 data".into(),
            ));
        }
    }
    invalid("Secret", secret, causes)
}
