//! The verbs on one resource: get, list, create, update, patch, delete and deletecollection, and
//! the subresources (status, pods/binding, namespaces/finalize), with Kubernetes' rules for
//! graceful pod deletion, finalizers and terminating namespaces.

use axum::{body::Bytes, http::StatusCode};
use serde_json::{json, Value};

use crate::api::{
    codec::{
        apply,
        typed::{self, FieldValidation},
    },
    http::query::{decode_continue, encode_continue, parse_query, Selector},
    registry::{
        alloc,
        meta::{now, random_suffix, timestamp_in, uid},
        resources::Resource,
        strategy,
    },
    status::ApiError,
    ApiState,
};
use crate::storage::{list_prefix, resource_version, ObjectKey, StorageError};

mod binding;
mod delete;
mod patch;

use binding::bind;
pub use delete::{delete, delete_collection, DeleteOptions};
pub use patch::{patch_one, APPLY};

/// What a resource path names.
pub struct Target {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    pub field_validation: FieldValidation,
    /// Who is writing (`fieldManager`, or from the User-Agent), for managed fields.
    pub field_manager: String,
    /// `force=true` on an apply.
    pub force: bool,
    /// Warnings for the client (`Warning: 299` headers).
    pub warnings: std::sync::Mutex<Vec<String>>,
    /// Who asks.
    pub user: crate::api::security::auth::User,
}

impl Target {
    fn key(&self, name: &str) -> ObjectKey {
        ObjectKey::new(
            self.resource.storage_name(),
            self.namespace.as_deref(),
            name,
        )
    }

    fn name(&self) -> &str {
        self.name.as_deref().unwrap_or_default()
    }

    /// RBAC's escalation check for a Role, ClusterRole or binding being written: its author must
    /// hold what it grants (or may `escalate` / `bind`).
    async fn confirm_rbac(&self, state: &ApiState, object: &Value) -> Result<(), ApiError> {
        if !state.authorize {
            return Ok(());
        }
        let kind = self.resource.kind;
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = self.namespace.as_deref();
        let result = match kind {
            "Role" | "ClusterRole" => {
                let escalate = crate::api::http::request_info::RequestInfo {
                    resource_request: true,
                    verb: "escalate".into(),
                    api_group: "rbac.authorization.k8s.io".into(),
                    namespace: namespace.map(str::to_string),
                    resource: self.resource.plural.into(),
                    name: Some(name.to_string()),
                    ..Default::default()
                };
                if state
                    .authorizer
                    .authorize(&self.user, &escalate)
                    .await
                    .allowed
                {
                    return Ok(());
                }
                let rules = object["rules"].as_array().cloned().unwrap_or_default();
                state
                    .authorizer
                    .confirm_no_escalation(&self.user, namespace, &rules)
                    .await
            }
            "RoleBinding" | "ClusterRoleBinding" => {
                state
                    .authorizer
                    .confirm_may_bind(
                        &self.user,
                        namespace,
                        object["roleRef"]["kind"].as_str().unwrap_or_default(),
                        object["roleRef"]["name"].as_str().unwrap_or_default(),
                    )
                    .await
            }
            _ => Ok(()),
        };
        result.map_err(|rule| {
            ApiError::forbidden(format!(
                "{} {name:?} is forbidden: user {:?} (groups={:?}) is attempting to grant RBAC permissions not currently held:\n{rule}",
                self.resource.plural, self.user.name, self.user.groups
            ))
        })
    }

    /// The escalation check for an update that changes what a role grants or whom a binding
    /// grants it to.
    async fn confirm_rbac_change(
        &self,
        state: &ApiState,
        current: &Value,
        new: &Value,
    ) -> Result<(), ApiError> {
        let changed = new["rules"] != current["rules"] || new["subjects"] != current["subjects"];
        if changed {
            self.confirm_rbac(state, new).await?;
        }
        Ok(())
    }

    /// Gives the fields a write changes to the writer (managed fields, operation Update).
    fn record_update(&self, current: &Value, new: &mut Value) {
        apply::record_update(
            self.resource.kind,
            current,
            new,
            &self.field_manager,
            &now(),
        );
    }

    /// Checks an object against its kind's type: decoding errors are 400s; unknown fields (not
    /// already in `current`) are refused, warned about or ignored per `fieldValidation`.
    fn check_fields(&self, object: &Value, current: Option<&Value>) -> Result<(), ApiError> {
        let kind = self.resource.kind;
        let cannot = |why: String| {
            ApiError::bad_request(format!(
                "{kind} in version {:?} cannot be handled as a {kind}: {why}",
                self.resource.version
            ))
        };
        let mut unknown = typed::unknown_fields(kind, object).map_err(cannot)?;
        if unknown.is_empty() || self.field_validation == FieldValidation::Ignore {
            return Ok(());
        }
        if let Some(current) = current {
            let known_before = typed::unknown_fields(kind, current).unwrap_or_default();
            unknown.retain(|f| !known_before.contains(f));
            if unknown.is_empty() {
                return Ok(());
            }
        }
        let described: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .collect();
        match self.field_validation {
            FieldValidation::Ignore => Ok(()),
            FieldValidation::Warn => {
                if let Ok(mut warnings) = self.warnings.lock() {
                    warnings.extend(described);
                }
                Ok(())
            }
            FieldValidation::Strict => Err(cannot(format!(
                "strict decoding error: {}",
                described.join(", ")
            ))),
        }
    }
}

pub type ApiResult = Result<(StatusCode, Value), ApiError>;

/// Namespaces that may not be deleted.
pub async fn get_one(state: &ApiState, target: &Target) -> ApiResult {
    let object = state.storage.get(&target.key(target.name())).await?;
    Ok((StatusCode::OK, object))
}

/// A list answer: built as a value, or (from the watch cache, without selectors) assembled from
/// the objects' cached JSON.
pub enum Listed {
    Value(Value),
    Raw(Bytes),
}

/// How long a consistent list waits for the watch cache before reading etcd itself.
const CACHE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub async fn list(
    state: &ApiState,
    target: &Target,
    query: &str,
    as_values: bool,
) -> Result<Listed, ApiError> {
    let params = parse_query(query);
    let limit: i64 = match params.iter().find(|(k, _)| k == "limit") {
        Some((_, v)) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {v:?}")))?,
        None => 0,
    };
    let after = match params.iter().find(|(k, _)| k == "continue") {
        Some((_, token)) if !token.is_empty() => Some(decode_continue(token)?),
        _ => None,
    };
    let (after, at) = match after {
        Some((key, revision)) => (Some(key), Some(revision)),
        None => (None, None),
    };
    let selector = Selector::from_params(&params, target.resource)?;
    let prefix = list_prefix(target.resource.storage_name(), target.namespace.as_deref());
    let kind = format!("{}List", target.resource.kind);
    let api_version = target.resource.api_version();

    // Whole lists come from the watch cache, at a revision at least the requested one (by
    // default etcd's current revision: a consistent read).
    let requested = params
        .iter()
        .find(|(k, _)| k == "resourceVersion")
        .map(|(_, v)| v.as_str());
    if (limit == 0 || requested == Some("0")) && after.is_none() {
        let minimum = match requested {
            None | Some("") => Some(state.storage.current_revision().await?),
            Some("0") => Some(0),
            Some(v) => Some(
                v.parse::<i64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
            ),
        };
        let cache = state.watches.get(target.resource.storage_name());
        if let (Some(cache), Some(minimum)) = (cache, minimum) {
            if let Some(snapshot) = cache.list(&prefix, minimum, CACHE_WAIT).await {
                let items = snapshot
                    .items
                    .into_iter()
                    .filter(|c| selector.is_empty() || selector.matches(&c.object));
                let metadata = json!({"resourceVersion": snapshot.revision.to_string()});
                if as_values {
                    let items: Vec<Value> = items.map(|c| (*c.object).clone()).collect();
                    return Ok(Listed::Value(
                        json!({"kind": kind, "apiVersion": api_version,
                                                   "metadata": metadata, "items": items}),
                    ));
                }
                let mut body = Vec::with_capacity(4096);
                body.extend_from_slice(
                    format!(
                        r#"{{"kind":{},"apiVersion":{},"metadata":{metadata},"items":["#,
                        Value::String(kind),
                        Value::String(api_version)
                    )
                    .as_bytes(),
                );
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&item.json);
                }
                body.extend_from_slice(b"]}");
                return Ok(Listed::Raw(Bytes::from(body)));
            }
        }
    }

    let page = state
        .storage
        .list(&prefix, limit, after.as_deref(), at)
        .await?;
    let items: Vec<Value> = page
        .items
        .into_iter()
        .filter(|o| selector.matches(o))
        .collect();
    let mut metadata = json!({"resourceVersion": page.revision.to_string()});
    if let Some(key) = page.continue_after {
        metadata["continue"] = encode_continue(&key, page.revision).into();
    }
    Ok(Listed::Value(
        json!({"kind": kind, "apiVersion": api_version, "metadata": metadata, "items": items}),
    ))
}

pub async fn create(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
    match target.subresource.as_deref() {
        None => {}
        Some("binding") if target.resource.kind == "Pod" => return bind(state, target, body).await,
        Some(_) => return Err(ApiError::method_not_allowed()),
    }
    let object = parse_object(body, target.resource)?;
    target.check_fields(&object, None)?;
    create_object(state, target, object).await
}

/// Creates a parsed object: metadata, defaults and validation, the namespace check, storage.
async fn create_object(state: &ApiState, target: &Target, mut object: Value) -> ApiResult {
    let meta = object
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| ApiError::bad_request("metadata is required"))?;
    if let Some(ns) = &target.namespace {
        match meta.get("namespace").and_then(Value::as_str) {
            Some(given) if given != ns => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({given}) does not match the namespace sent on the request ({ns})"
                )))
            }
            _ => {
                meta.insert("namespace".into(), ns.clone().into());
            }
        }
    }
    let name = match (
        meta.get("name").and_then(Value::as_str),
        meta.get("generateName").and_then(Value::as_str),
    ) {
        (Some(name), _) if !name.is_empty() => name.to_string(),
        (_, Some(prefix)) => format!("{prefix}{}", random_suffix()),
        _ => {
            return Err(ApiError::invalid(
                target.resource.kind,
                "",
                vec![(
                    "metadata.name".into(),
                    "Required value: name or generateName is required".into(),
                )],
            ))
        }
    };
    if let Some(problem) = dns_subdomain_problem(&name) {
        return Err(ApiError::invalid(
            target.resource.kind,
            &name,
            vec![(
                "metadata.name".into(),
                format!("Invalid value: {name:?}: {problem}"),
            )],
        ));
    }
    meta.insert("name".into(), name.clone().into());
    meta.insert("uid".into(), uid().into());
    meta.insert("creationTimestamp".into(), now().into());
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        meta.remove(field);
    }
    target.resource.strategy.prepare_create(&mut object)?;
    target.confirm_rbac(state, &object).await?;
    if let Some(ns) = &target.namespace {
        // Objects live in namespaces that exist and are not being deleted: an active namespace in
        // the watch cache is taken as it is, anything else is read from etcd.
        let ns_key = ObjectKey::new("namespaces", None, ns);
        let cached = state
            .watches
            .get("namespaces")
            .and_then(|c| c.get(&ns_key.etcd_key()))
            .filter(|c| c.object["metadata"].get("deletionTimestamp").is_none());
        let namespace = match cached {
            Some(cached) => (*cached.object).clone(),
            None => match state.storage.get(&ns_key).await {
                Ok(namespace) => namespace,
                Err(StorageError::NotFound { .. }) => {
                    return Err(ApiError::not_found(format!("namespaces {ns:?} not found")))
                }
                Err(e) => return Err(e.into()),
            },
        };
        if namespace["metadata"].get("deletionTimestamp").is_some() {
            return Err(ApiError::forbidden(format!(
                "{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                target.resource.plural
            )));
        }
    }
    let key = target.key(&name);
    let created = if target.resource.kind == "Service" {
        alloc::write_service(&state.ranges, &state.storage, &key, None, object, None).await?
    } else {
        state.storage.create(&key, object).await?
    };
    Ok((StatusCode::CREATED, created))
}

/// The resourceVersion a write names, if any.
fn precondition(object: &Value) -> Result<Option<i64>, ApiError> {
    object["metadata"]
        .get("resourceVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))
        })
        .transpose()
}

pub async fn update(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
    let name = target.name();
    let sub = target.subresource.as_deref();
    if !matches!(sub, None | Some("status") | Some("finalize")) {
        return Err(ApiError::method_not_allowed());
    }
    let object = parse_object(body, target.resource)?;
    let given = object["metadata"]["name"].as_str().unwrap_or_default();
    target.check_fields(&object, None)?;
    if given != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let key = target.key(name);
    let current = state.storage.get(&key).await?;
    let expected = precondition(&object)?.unwrap_or_else(|| resource_version(&current));
    let new = if sub == Some("finalize") {
        // Only the namespace's spec.finalizers change.
        let mut new = current.clone();
        new["spec"]["finalizers"] = object["spec"]["finalizers"].clone();
        new
    } else {
        let mut new = strategy::prepare_update(target.resource.strategy, sub, &current, object)?;
        if sub.is_none() {
            target.record_update(&current, &mut new);
        }
        target.confirm_rbac_change(state, &current, &new).await?;
        new
    };
    let updated = write_update(state, target.resource, &key, &current, new, expected).await?;
    Ok((StatusCode::OK, updated))
}

/// Writes an updated object; when it is being deleted and nothing holds it any more (no
/// finalizers, grace period over), it is deleted instead.
async fn write_update(
    state: &ApiState,
    resource: &Resource,
    key: &ObjectKey,
    current: &Value,
    new: Value,
    expected: i64,
) -> Result<Value, ApiError> {
    if new["metadata"].get("deletionTimestamp").is_some() && !held(&new) {
        let grace = new["metadata"]["deletionGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(0);
        if grace == 0 {
            let claims = if resource.kind == "Service" {
                alloc::release_all(current)
            } else {
                Default::default()
            };
            let gone = state
                .storage
                .delete_with(key, Some(expected), &claims)
                .await?;
            let mut gone_new = new;
            gone_new["metadata"]["resourceVersion"] = gone["metadata"]["resourceVersion"].clone();
            return Ok(gone_new);
        }
    }
    if resource.kind == "Service" {
        return alloc::write_service(
            &state.ranges,
            &state.storage,
            key,
            Some(current),
            new,
            Some(expected),
        )
        .await;
    }
    Ok(state.storage.update(key, new, Some(expected)).await?)
}

/// Whether finalizers still hold an object (a namespace's spec.finalizers count too).
fn held(object: &Value) -> bool {
    let non_empty = |v: &Value| v.as_array().is_some_and(|a| !a.is_empty());
    non_empty(&object["metadata"]["finalizers"])
        || (object["kind"] == "Namespace" && non_empty(&object["spec"]["finalizers"]))
}

/// Parses a request body as an object of the resource's kind.
pub fn parse_object(body: &Bytes, resource: &Resource) -> Result<Value, ApiError> {
    let object: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !object.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let kind = object["kind"].as_str().unwrap_or(resource.kind);
    let api_version = object["apiVersion"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| resource.api_version());
    if kind != resource.kind || api_version != resource.api_version() {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) and kind ({kind}) do not match the request ({}, {})",
            resource.api_version(),
            resource.kind
        )));
    }
    let mut object = object;
    object["kind"] = resource.kind.into();
    object["apiVersion"] = resource.api_version().into();
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    Ok(object)
}

/// Why `name` is not a DNS-1123 subdomain, as Kubernetes explains it; `None` when it is one.
pub fn dns_subdomain_problem(name: &str) -> Option<&'static str> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    (!valid).then_some(
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
         and must start and end with an alphanumeric character",
    )
}

#[cfg(test)]
mod tests;
