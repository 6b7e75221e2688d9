//! The served kinds as Kubernetes' own types (k8s-openapi): decoding checks (a string where an
//! integer belongs is a 400, as in Kubernetes), field validation (unknown fields are refused,
//! warned about or ignored, per `fieldValidation`), and the schemas of the OpenAPI documents.

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// Calls `$body` with `T` bound to the k8s-openapi type of `$kind`; `None` for other kinds.
macro_rules! for_kind {
    ($kind:expr, $body:ident $(, $arg:expr)*) => {
        match $kind {
            "Namespace" => Some($body::<k8s_openapi::api::core::v1::Namespace>($($arg),*)),
            "Node" => Some($body::<k8s_openapi::api::core::v1::Node>($($arg),*)),
            "Pod" => Some($body::<k8s_openapi::api::core::v1::Pod>($($arg),*)),
            "Service" => Some($body::<k8s_openapi::api::core::v1::Service>($($arg),*)),
            "Endpoints" => Some($body::<k8s_openapi::api::core::v1::Endpoints>($($arg),*)),
            "ConfigMap" => Some($body::<k8s_openapi::api::core::v1::ConfigMap>($($arg),*)),
            "Secret" => Some($body::<k8s_openapi::api::core::v1::Secret>($($arg),*)),
            "ServiceAccount" => Some($body::<k8s_openapi::api::core::v1::ServiceAccount>($($arg),*)),
            "Event" => Some($body::<k8s_openapi::api::core::v1::Event>($($arg),*)),
            "EndpointSlice" => Some($body::<k8s_openapi::api::discovery::v1::EndpointSlice>($($arg),*)),
            "Lease" => Some($body::<k8s_openapi::api::coordination::v1::Lease>($($arg),*)),
            "ServiceCIDR" => Some($body::<k8s_openapi::api::networking::v1::ServiceCIDR>($($arg),*)),
            "IPAddress" => Some($body::<k8s_openapi::api::networking::v1::IPAddress>($($arg),*)),
            "Job" => Some($body::<k8s_openapi::api::batch::v1::Job>($($arg),*)),
            "ClusterRole" => Some($body::<k8s_openapi::api::rbac::v1::ClusterRole>($($arg),*)),
            "ClusterRoleBinding" => Some($body::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>($($arg),*)),
            "Role" => Some($body::<k8s_openapi::api::rbac::v1::Role>($($arg),*)),
            "RoleBinding" => Some($body::<k8s_openapi::api::rbac::v1::RoleBinding>($($arg),*)),
            "SelfSubjectAccessReview" => Some($body::<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview>($($arg),*)),
            "SubjectAccessReview" => Some($body::<k8s_openapi::api::authorization::v1::SubjectAccessReview>($($arg),*)),
            "SelfSubjectReview" => Some($body::<k8s_openapi::api::authentication::v1::SelfSubjectReview>($($arg),*)),
            "TokenReview" => Some($body::<k8s_openapi::api::authentication::v1::TokenReview>($($arg),*)),
            _ => None,
        }
    };
}

pub(crate) use for_kind;

/// What to do about fields the kind does not have (`?fieldValidation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    Ignore,
    /// Kubernetes' default: accept, with a warning per unknown field.
    #[default]
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(format!(
                "fieldValidation must be one of \"Ignore\", \"Warn\" or \"Strict\", got {other:?}"
            )),
        }
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// Checks `object` against its kind's type: Err with the decoding error when it does not fit,
/// else the paths of the fields the type does not have (`spec.containers[0].imagee`).
pub fn unknown_fields(kind: &str, object: &Value) -> Result<Vec<String>, String> {
    let Some(typed) = for_kind!(kind, round_trip, object) else {
        return Ok(Vec::new());
    };
    let typed = typed?;
    let mut out = Vec::new();
    diff(object, &typed, "", &mut out);
    Ok(out)
}

fn diff(given: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (given, typed) {
        (Value::Object(given), Value::Object(typed)) => {
            for (key, value) in given {
                if value.is_null() {
                    continue;
                }
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match typed.get(key) {
                    Some(kept) => diff(value, kept, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(given), Value::Array(typed)) => {
            for (i, (g, t)) in given.iter().zip(typed).enumerate() {
                diff(g, t, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_fields_are_found_by_path() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
                         "spec": {"containers": [{"name": "c", "image": "x", "imagee": "y",
                                                  "resources": {"limits": {"cpu": 1}}}],
                                  "bogus": true}});
        assert_eq!(
            unknown_fields("Pod", &pod).unwrap(),
            ["spec.bogus", "spec.containers[0].imagee"]
        );
        let wrong = json!({"metadata": {"name": "p"},
                           "spec": {"containers": [{"name": "c", "ports": [{"containerPort": "80"}]}]}});
        assert!(unknown_fields("Pod", &wrong).is_err());
        assert!(unknown_fields("Unknown", &wrong).unwrap().is_empty());
        assert_eq!(
            FieldValidation::parse(Some("Strict")),
            Ok(FieldValidation::Strict)
        );
        assert!(FieldValidation::parse(Some("strict")).is_err());
    }
}
