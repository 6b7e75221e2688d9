//! Query parameters of list, watch and deletecollection requests: label selectors (set-based, from
//! `seine-apimachinery`), field selectors, continue tokens, percent-decoding.

use seine_apimachinery::labels;
use serde_json::Value;

use crate::api::{registry::resources::Resource, status::ApiError};

pub fn parse_query(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// A continue token: where the next page starts and the revision the list is read at.
pub fn encode_continue(key: &str, revision: i64) -> String {
    use base64::Engine as _;
    let token = serde_json::json!({"start": key, "rv": revision});
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
}

pub fn decode_continue(token: &str) -> Result<(String, i64), ApiError> {
    use base64::Engine as _;
    let invalid = || ApiError::bad_request("invalid continue token");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    let key = value["start"]
        .as_str()
        .filter(|k| k.starts_with("/registry/"))
        .ok_or_else(invalid)?;
    let revision = value["rv"]
        .as_i64()
        .filter(|r| *r > 0)
        .ok_or_else(invalid)?;
    Ok((key.to_string(), revision))
}

/// The label and field selectors of a list, watch or deletecollection request.
#[derive(Clone)]
pub struct Selector {
    labels: labels::Selector,
    /// (field path, value, negated).
    fields: Vec<(&'static str, String, bool)>,
}

impl Selector {
    /// The selectors among a request's parameters, for objects of `resource`.
    pub fn from_params(params: &[(String, String)], resource: &Resource) -> Result<Self, ApiError> {
        let mut selector = Selector {
            labels: labels::Selector::everything(),
            fields: Vec::new(),
        };
        for (key, value) in params {
            match key.as_str() {
                "labelSelector" => selector.labels.extend(
                    labels::Selector::parse(value)
                        .map_err(|e| ApiError::bad_request(e.to_string()))?,
                ),
                "fieldSelector" => {
                    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let (field, wanted, negated) = if let Some((f, v)) = part.split_once("!=") {
                            (f, v, true)
                        } else if let Some((f, v)) =
                            part.split_once("==").or_else(|| part.split_once('='))
                        {
                            (f, v, false)
                        } else {
                            return Err(ApiError::bad_request(format!(
                                "invalid field selector {part:?}"
                            )));
                        };
                        let field = field.trim();
                        let field = ["metadata.name", "metadata.namespace"]
                            .iter()
                            .chain(resource.strategy.selectable_fields())
                            .find(|f| **f == field)
                            .ok_or_else(|| {
                                ApiError::bad_request(format!("field label not supported: {field}"))
                            })?;
                        selector
                            .fields
                            .push((field, wanted.trim().to_string(), negated));
                    }
                }
                _ => {}
            }
        }
        Ok(selector)
    }

    /// Also require metadata.name to be `name` (a watch on one object).
    pub fn with_name(mut self, name: &str) -> Self {
        self.fields.push(("metadata.name", name.to_string(), false));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_everything() && self.fields.is_empty()
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.labels
            .matches_by(|k| labels.get(k).and_then(Value::as_str))
            && self.fields.iter().all(|(field, value, negated)| {
                let actual = field.split('.').fold(object, |v, part| &v[part]);
                let actual = match actual {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    // Booleans and numbers select by their text ("true", "1").
                    other => other.to_string(),
                };
                (actual == *value) != *negated
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry::resources::find;
    use serde_json::json;

    fn resource(plural: &str) -> &'static Resource {
        find("", "v1", plural).unwrap()
    }

    fn pods() -> &'static Resource {
        resource("pods")
    }

    #[test]
    fn label_selectors_take_equality_sets_and_existence() {
        let params = |text: &str| vec![("labelSelector".to_string(), text.to_string())];
        let obj = json!({"metadata": {"labels": {"app": "web", "env": "prod"}}});
        let sel = Selector::from_params(&params("app=web,tier!=db,env,!legacy"), pods()).unwrap();
        assert!(sel.matches(&obj));
        let sel =
            Selector::from_params(&params("app in (db,web),env notin (dev)"), pods()).unwrap();
        assert!(sel.matches(&obj));
        let sel = Selector::from_params(&params("app in (db)"), pods()).unwrap();
        assert!(!sel.matches(&obj));
        assert!(Selector::from_params(&params("app in ()"), pods()).is_err());
        assert!(Selector::from_params(&params(""), pods())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn continue_tokens_round_trip_and_reject_garbage() {
        let token = encode_continue("/registry/pods/default/a", 42);
        assert_eq!(
            decode_continue(&token).unwrap(),
            ("/registry/pods/default/a".to_string(), 42)
        );
        assert!(decode_continue("!!!").is_err());
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query("labelSelector=app%3Dweb&limit=5&fieldSelector=a+b");
        assert_eq!(q[0], ("labelSelector".into(), "app=web".into()));
        assert_eq!(q[2], ("fieldSelector".into(), "a b".into()));
    }

    #[test]
    fn field_selectors_follow_paths_and_refuse_unknown_fields() {
        let params = vec![(
            "fieldSelector".to_string(),
            "spec.nodeName=n1,status.phase!=Failed".to_string(),
        )];
        let sel = Selector::from_params(&params, pods()).unwrap();
        assert!(sel.matches(&json!({"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}})));
        assert!(!sel.matches(&json!({"spec": {"nodeName": "n2"}})));
        assert!(Selector::from_params(&params, resource("configmaps")).is_err());
        let unsched = vec![(
            "fieldSelector".to_string(),
            "spec.unschedulable=false".to_string(),
        )];
        let sel = Selector::from_params(&unsched, resource("nodes")).unwrap();
        assert!(sel.matches(&json!({"spec": {"unschedulable": false}})));
    }
}
