//! The verbs on one resource: get, list, create, update, patch, delete and deletecollection, and
//! the subresources (status, pods/binding, namespaces/finalize), with Kubernetes' rules for
//! graceful pod deletion, finalizers and terminating namespaces.

use axum::{body::Bytes, http::StatusCode};
use serde_json::{json, Value};

use crate::api::{
    codec::apply,
    codec::patch,
    codec::typed::{self, FieldValidation},
    http::query::{decode_continue, encode_continue, parse_query, Selector},
    registry::alloc,
    registry::meta::{now, random_suffix, timestamp_in, uid},
    registry::resources::Resource,
    registry::strategy,
    status::ApiError,
    ApiState,
};
use crate::storage::{list_prefix, resource_version, ObjectKey, StorageError};

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
    strategy::prepare_create(target.resource, &mut object)?;
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
        let mut new = strategy::prepare_update(target.resource, sub, &current, object)?;
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

pub async fn patch_one(state: &ApiState, target: &Target, media: &str, body: &Bytes) -> ApiResult {
    let name = target.name();
    let sub = target.subresource.as_deref();
    if !matches!(sub, None | Some("status")) {
        return Err(ApiError::method_not_allowed());
    }
    if media == APPLY {
        return server_side_apply(state, target, body).await;
    }
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
    let key = target.key(name);
    // Without a resourceVersion in the patch, a concurrent write is retried on, as Kubernetes does.
    let required = precondition(&patch)?;
    for _ in 0..5 {
        let current = state.storage.get(&key).await?;
        let mut object = current.clone();
        match media {
            "application/merge-patch+json" => patch::merge_patch(&mut object, &patch),
            "application/json-patch+json" => {
                patch::json_patch(&mut object, &patch).map_err(|e| match e {
                    patch::JsonPatchError::Malformed(m) => ApiError::bad_request(m),
                    patch::JsonPatchError::Failed(m) => {
                        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", m)
                    }
                })?
            }
            "application/strategic-merge-patch+json" => {
                patch::strategic_merge_patch(&mut object, &patch, target.resource.kind)
                    .map_err(ApiError::bad_request)?
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {other})"),
                ))
            }
        }
        if !object.is_object() {
            return Err(ApiError::bad_request(
                "the patched object is not a JSON object",
            ));
        }
        target.check_fields(&object, Some(&current))?;
        let mut new = strategy::prepare_update(target.resource, sub, &current, object)?;
        if sub.is_none() {
            target.record_update(&current, &mut new);
        }
        target.confirm_rbac_change(state, &current, &new).await?;
        let expected = required.unwrap_or_else(|| resource_version(&current));
        match write_update(state, target.resource, &key, &current, new, expected).await {
            Ok(updated) => return Ok((StatusCode::OK, updated)),
            Err(e) if e.reason == "Conflict" && required.is_none() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::Conflict {
        resource: target.resource.plural.to_string(),
        name: name.to_string(),
    }
    .into())
}

/// The media type of server-side apply.
pub const APPLY: &str = "application/apply-patch+yaml";

/// Server-side apply: creates the object from the configuration, or merges it into the live one
/// for the field manager (409 on fields another manager owns, unless forced).
async fn server_side_apply(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
    let name = target.name();
    if target.subresource.is_some() {
        return Err(ApiError::method_not_allowed());
    }
    if target.field_manager.is_empty() {
        return Err(ApiError::bad_request(
            "PATCH requests with the apply content type must have a fieldManager",
        ));
    }
    let config: Value = serde_saphyr::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!("the applied configuration is not valid YAML: {e}"))
    })?;
    let mut config = if config.is_object() {
        config
    } else {
        return Err(ApiError::bad_request(
            "the applied configuration must be an object",
        ));
    };
    let kind = target.resource.kind;
    if config["kind"].as_str() != Some(kind)
        || config["apiVersion"].as_str() != Some(target.resource.api_version().as_str())
    {
        return Err(ApiError::bad_request(format!(
            "the applied configuration must be a {kind} of {} (got {} {})",
            target.resource.api_version(),
            config["apiVersion"],
            config["kind"]
        )));
    }
    match config["metadata"]["name"].as_str() {
        Some(n) if n == name => {}
        _ => {
            return Err(ApiError::bad_request(format!(
                "the name in the applied configuration must be {name:?}"
            )))
        }
    }
    if let (Some(ns), Some(meta)) = (&target.namespace, config["metadata"].as_object_mut()) {
        meta.insert("namespace".into(), ns.clone().into());
    }
    target.check_fields(&config, None)?;
    let key = target.key(name);
    for _ in 0..5 {
        let live = match state.storage.get(&key).await {
            Ok(live) => Some(live),
            Err(StorageError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let merged = apply::apply(
            kind,
            live.as_ref(),
            &config,
            &target.field_manager,
            target.force,
            &now(),
        )
        .map_err(|conflicts| conflict_error(kind, name, &conflicts))?;
        let result = match &live {
            None => create_object(state, target, merged).await,
            Some(current) => {
                // prepare_update keeps the stored managed fields; the apply computed new ones.
                let fields = merged["metadata"]["managedFields"].clone();
                let mut new = strategy::prepare_update(target.resource, None, current, merged)?;
                target.confirm_rbac_change(state, current, &new).await?;
                match (fields, new["metadata"].as_object_mut()) {
                    (Value::Null, Some(meta)) => {
                        meta.remove("managedFields");
                    }
                    (fields, Some(meta)) => {
                        meta.insert("managedFields".into(), fields);
                    }
                    (_, None) => {}
                }
                write_update(
                    state,
                    target.resource,
                    &key,
                    current,
                    new,
                    resource_version(current),
                )
                .await
                .map(|v| (StatusCode::OK, v))
            }
        };
        match result {
            Err(e) if e.reason == "Conflict" || e.reason == "AlreadyExists" => continue,
            other => return other,
        }
    }
    Err(ApiError::conflict(format!(
        "Operation cannot be fulfilled on {} {name:?}: too many concurrent writes",
        target.resource.plural
    )))
}

fn conflict_error(kind: &str, name: &str, conflicts: &[apply::Conflict]) -> ApiError {
    let lines: Vec<String> = conflicts
        .iter()
        .map(|c| format!("conflict with {:?}: {}", c.managers.join("\", \""), c.field))
        .collect();
    let causes: Vec<Value> = conflicts
        .iter()
        .map(|c| {
            json!({"reason": "FieldManagerConflict",
                        "message": format!("conflict with {:?}", c.managers.join("\", \"")),
                        "field": c.field})
        })
        .collect();
    let mut error = ApiError::conflict(format!(
        "Apply failed with {} conflict{}: {}",
        conflicts.len(),
        if conflicts.len() == 1 { "" } else { "s" },
        lines.join("; ")
    ));
    error.details = Some(json!({"name": name, "kind": kind, "causes": causes}));
    error
}

/// What a delete request asks for (DeleteOptions in the body, or query parameters).
#[derive(Default)]
pub struct DeleteOptions {
    grace_period: Option<i64>,
    uid: Option<String>,
    resource_version: Option<i64>,
    /// `propagationPolicy` (or the older `orphanDependents`): what becomes of the dependents.
    propagation: Option<Propagation>,
}

/// A delete's propagation policy: what the garbage collector does with the object's dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Propagation {
    /// Dependents lose their ownerReference to the object (the `orphan` finalizer).
    Orphan,
    /// The object goes at once; the garbage collector deletes dependents afterwards.
    Background,
    /// The object stays until its blocking dependents are gone (the `foregroundDeletion` finalizer).
    Foreground,
}

impl Propagation {
    fn parse(value: &str) -> Result<Self, ApiError> {
        match value {
            "Orphan" => Ok(Propagation::Orphan),
            "Background" => Ok(Propagation::Background),
            "Foreground" => Ok(Propagation::Foreground),
            other => Err(ApiError::invalid(
                "DeleteOptions",
                "",
                vec![(
                    "propagationPolicy".into(),
                    format!(
                        "Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\", \"nil\""
                    ),
                )],
            )),
        }
    }

    /// `orphanDependents`, the field propagationPolicy replaced.
    fn from_orphan_dependents(orphan: bool) -> Self {
        if orphan {
            Propagation::Orphan
        } else {
            Propagation::Background
        }
    }
}

const ORPHAN_FINALIZER: &str = "orphan";
const FOREGROUND_FINALIZER: &str = "foregroundDeletion";

/// The finalizers an object keeps when deleted with `policy`, as kube-apiserver's
/// deletionFinalizersForGarbageCollection decides: `orphan` or `foregroundDeletion` for the
/// garbage collector, and without a policy in the request the one the object already carries.
/// `None` when they stay as they are.
fn gc_finalizers(meta: &Value, policy: Option<Propagation>) -> Option<Vec<Value>> {
    let current: Vec<Value> = meta["finalizers"].as_array().cloned().unwrap_or_default();
    let has = |f: &str| current.iter().any(|v| v == f);
    let policy = policy.or(if has(ORPHAN_FINALIZER) {
        Some(Propagation::Orphan)
    } else if has(FOREGROUND_FINALIZER) {
        Some(Propagation::Foreground)
    } else {
        None
    });
    let mut wanted: Vec<Value> = current
        .iter()
        .filter(|f| *f != ORPHAN_FINALIZER && *f != FOREGROUND_FINALIZER)
        .cloned()
        .collect();
    match policy {
        Some(Propagation::Orphan) => wanted.push(ORPHAN_FINALIZER.into()),
        Some(Propagation::Foreground) => wanted.push(FOREGROUND_FINALIZER.into()),
        Some(Propagation::Background) | None => {}
    }
    let same = wanted.len() == current.len() && wanted.iter().all(|f| current.contains(f));
    (!same).then_some(wanted)
}

impl DeleteOptions {
    pub fn parse(body: &Bytes, query: &str) -> Result<Self, ApiError> {
        let mut options = DeleteOptions::default();
        // From the body, then the query (which overrides it); checked together below.
        let mut orphan: Option<bool> = None;
        let mut policy: Option<String> = None;
        if !body.iter().all(u8::is_ascii_whitespace) {
            let value: Value = serde_json::from_slice(body).map_err(|e| {
                ApiError::bad_request(format!("the DeleteOptions body is not valid JSON: {e}"))
            })?;
            options.grace_period = value["gracePeriodSeconds"].as_i64();
            options.uid = value["preconditions"]["uid"].as_str().map(str::to_string);
            options.resource_version = precondition(&json!({"metadata": {
                "resourceVersion": value["preconditions"]["resourceVersion"]}}))?;
            orphan = value["orphanDependents"].as_bool();
            policy = value["propagationPolicy"].as_str().map(str::to_string);
        }
        for (k, v) in parse_query(query) {
            match k.as_str() {
                "gracePeriodSeconds" => {
                    options.grace_period = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid gracePeriodSeconds {v:?}"))
                    })?);
                }
                "propagationPolicy" => policy = Some(v),
                "orphanDependents" => {
                    orphan = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!("invalid orphanDependents {v:?}"))
                    })?);
                }
                _ => {}
            }
        }
        if orphan.is_some() && policy.is_some() {
            return Err(both_policies());
        }
        options.propagation = match (orphan, policy) {
            (Some(orphan), _) => Some(Propagation::from_orphan_dependents(orphan)),
            (None, Some(policy)) => Some(Propagation::parse(&policy)?),
            (None, None) => None,
        };
        if options.grace_period.is_some_and(|g| g < 0) {
            return Err(ApiError::invalid(
                "DeleteOptions",
                "",
                vec![(
                    "gracePeriodSeconds".into(),
                    "Invalid value: must be greater than or equal to 0".into(),
                )],
            ));
        }
        Ok(options)
    }
}

fn both_policies() -> ApiError {
    ApiError::invalid(
        "DeleteOptions",
        "",
        vec![(
            "propagationPolicy".into(),
            "Invalid value: \"\": orphanDependents and deletionPropagation cannot be both set"
                .into(),
        )],
    )
}

pub async fn delete(state: &ApiState, target: &Target, options: &DeleteOptions) -> ApiResult {
    if target.subresource.is_some() {
        return Err(ApiError::method_not_allowed());
    }
    delete_object(state, target.resource, &target.key(target.name()), options).await
}

/// Deletes one object, or starts its deletion: a pod on a node gets its grace period, an object
/// with finalizers waits for them, a namespace turns Terminating. Retries on concurrent writes.
async fn delete_object(
    state: &ApiState,
    resource: &Resource,
    key: &ObjectKey,
    options: &DeleteOptions,
) -> ApiResult {
    for _ in 0..5 {
        let current = state.storage.get(key).await?;
        let meta = &current["metadata"];
        if let Some(uid) = &options.uid {
            if meta["uid"].as_str() != Some(uid) {
                return Err(ApiError::conflict(format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta["uid"].as_str().unwrap_or_default()
                )));
            }
        }
        let revision = resource_version(&current);
        if let Some(rv) = options.resource_version {
            if rv != revision {
                return Err(ApiError::conflict(format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {revision}"
                )));
            }
        }
        let mut pending = current.clone();
        let terminating = meta.get("deletionTimestamp").is_some();
        // The garbage collector's finalizers for the propagation policy; an object already
        // being deleted still takes a changed policy.
        let finalizers = gc_finalizers(meta, options.propagation);
        let refinalized = finalizers.is_some();
        if let Some(finalizers) = finalizers {
            if finalizers.is_empty() {
                if let Some(m) = pending["metadata"].as_object_mut() {
                    m.remove("finalizers");
                }
            } else {
                pending["metadata"]["finalizers"] = Value::Array(finalizers);
            }
        }
        let grace = resource
            .strategy
            .deletion_grace(&current, options.grace_period)?;
        let previous = meta["deletionGracePeriodSeconds"].as_i64();
        // Already going at least as fast: only the finalizers may change.
        let as_fast = terminating && previous.is_some_and(|p| p <= grace);
        if as_fast && !refinalized {
            return Ok((StatusCode::OK, current));
        }
        if !as_fast {
            pending["metadata"]["deletionTimestamp"] =
                timestamp_in(grace.clamp(0, 365 * 86_400)).into();
            pending["metadata"]["deletionGracePeriodSeconds"] = grace.into();
            resource.strategy.begin_deletion(&mut pending);
        }
        let result = write_update(state, resource, key, &current, pending, revision).await;
        match result {
            Ok(object) => return Ok((StatusCode::OK, object)),
            Err(e) if e.reason == "Conflict" && options.resource_version.is_none() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StorageError::Conflict {
        resource: resource.plural.to_string(),
        name: key.name.clone(),
    }
    .into())
}

/// Deletes (or starts deleting) every object the selectors match; returns them as a list.
pub async fn delete_collection(
    state: &ApiState,
    target: &Target,
    query: &str,
    options: &DeleteOptions,
) -> ApiResult {
    let selector = Selector::from_params(&parse_query(query), target.resource)?;
    let prefix = list_prefix(target.resource.storage_name(), target.namespace.as_deref());
    let page = state.storage.list(&prefix, 0, None, None).await?;
    let mut deleted = Vec::new();
    for object in page.items.into_iter().filter(|o| selector.matches(o)) {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let namespace = object["metadata"]["namespace"].as_str();
        let key = ObjectKey::new(target.resource.storage_name(), namespace, name);
        match delete_object(state, target.resource, &key, options).await {
            Ok((_, gone)) => deleted.push(gone),
            // Deleted meanwhile: not this request's to delete.
            Err(e) if e.code == StatusCode::NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    Ok((
        StatusCode::OK,
        json!({"kind": format!("{}List", target.resource.kind),
               "apiVersion": target.resource.api_version(),
               "metadata": {}, "items": deleted}),
    ))
}

/// pods/binding: assigns a pod to a node, once (the scheduler's write).
async fn bind(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
    let name = target.name();
    let binding: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if binding["kind"].as_str().is_some_and(|k| k != "Binding") {
        return Err(ApiError::bad_request(format!(
            "expected a Binding, got {}",
            binding["kind"]
        )));
    }
    if binding["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n != name)
    {
        return Err(ApiError::bad_request(format!(
            "the name of the binding ({}) does not match the pod ({name})",
            binding["metadata"]["name"]
        )));
    }
    let node = binding["target"]["name"].as_str().unwrap_or_default();
    if node.is_empty() {
        return Err(ApiError::invalid(
            "Binding",
            name,
            vec![("target.name".into(), "Required value".into())],
        ));
    }
    let key = target.key(name);
    for _ in 0..5 {
        let current = state.storage.get(&key).await?;
        if current["metadata"].get("deletionTimestamp").is_some() {
            return Err(ApiError::conflict(format!(
                "Operation cannot be fulfilled on pods/binding {name:?}: pod {name} is being deleted, cannot be assigned to a host"
            )));
        }
        if let Some(assigned) = current["spec"]["nodeName"]
            .as_str()
            .filter(|n| !n.is_empty())
        {
            return Err(ApiError::conflict(format!(
                "Operation cannot be fulfilled on pods/binding {name:?}: pod {name} is already assigned to node {assigned:?}"
            )));
        }
        let mut pod = current.clone();
        pod["spec"]["nodeName"] = node.into();
        let condition = json!({"type": "PodScheduled", "status": "True",
                               "lastProbeTime": null, "lastTransitionTime": now()});
        let conditions = pod["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut conditions: Vec<Value> = conditions
            .into_iter()
            .filter(|c| c["type"] != "PodScheduled")
            .collect();
        conditions.push(condition);
        pod["status"]["conditions"] = Value::Array(conditions);
        match state
            .storage
            .update(&key, pod, Some(resource_version(&current)))
            .await
        {
            Ok(_) => {
                return Ok((
                    StatusCode::CREATED,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                           "status": "Success", "code": 201}),
                ))
            }
            Err(StorageError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!(
        "Operation cannot be fulfilled on pods/binding {name:?}: too many concurrent writes"
    )))
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
mod tests {
    use super::*;

    #[test]
    fn names_must_be_dns_subdomains() {
        assert!(dns_subdomain_problem("web-1.example").is_none());
        for bad in ["", "Web", "-a", "a-", "a..b", "a_b"] {
            assert!(dns_subdomain_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn delete_options_come_from_the_body_or_the_query() {
        let body = Bytes::from_static(
            br#"{"kind":"DeleteOptions","gracePeriodSeconds":5,"preconditions":{"uid":"u"}}"#,
        );
        let o = DeleteOptions::parse(&body, "").unwrap();
        assert_eq!(o.grace_period, Some(5));
        assert_eq!(o.uid.as_deref(), Some("u"));
        let o = DeleteOptions::parse(&Bytes::new(), "gracePeriodSeconds=0").unwrap();
        assert_eq!(o.grace_period, Some(0));
        assert!(DeleteOptions::parse(&Bytes::from_static(b"{"), "").is_err());
        assert!(DeleteOptions::parse(&Bytes::new(), "gracePeriodSeconds=-1").is_err());
        let o = DeleteOptions::parse(
            &Bytes::from_static(br#"{"propagationPolicy":"Foreground"}"#),
            "",
        )
        .unwrap();
        assert_eq!(o.propagation, Some(Propagation::Foreground));
        let o =
            DeleteOptions::parse(&Bytes::from_static(br#"{"orphanDependents":true}"#), "").unwrap();
        assert_eq!(o.propagation, Some(Propagation::Orphan));
        let o = DeleteOptions::parse(&Bytes::new(), "propagationPolicy=Background").unwrap();
        assert_eq!(o.propagation, Some(Propagation::Background));
        assert!(DeleteOptions::parse(&Bytes::new(), "propagationPolicy=Later").is_err());
        assert!(DeleteOptions::parse(
            &Bytes::from_static(br#"{"orphanDependents":true,"propagationPolicy":"Orphan"}"#),
            ""
        )
        .is_err());
        assert!(DeleteOptions::parse(
            &Bytes::new(),
            "orphanDependents=false&propagationPolicy=Background"
        )
        .is_err());
        assert!(DeleteOptions::parse(
            &Bytes::from_static(br#"{"orphanDependents":true}"#),
            "propagationPolicy=Background"
        )
        .is_err());
        let o = DeleteOptions::parse(
            &Bytes::from_static(br#"{"propagationPolicy":"Foreground"}"#),
            "propagationPolicy=Orphan",
        )
        .unwrap();
        assert_eq!(o.propagation, Some(Propagation::Orphan));
    }

    #[test]
    fn propagation_policies_set_the_garbage_collectors_finalizers() {
        let meta = json!({"finalizers": ["example.com/keep"]});
        assert_eq!(
            gc_finalizers(&meta, Some(Propagation::Foreground)),
            Some(vec![json!("example.com/keep"), json!("foregroundDeletion")])
        );
        assert_eq!(
            gc_finalizers(&meta, Some(Propagation::Orphan)),
            Some(vec![json!("example.com/keep"), json!("orphan")])
        );
        assert_eq!(gc_finalizers(&meta, Some(Propagation::Background)), None);
        assert_eq!(gc_finalizers(&meta, None), None);
        // Without a policy in the request, the object's own finalizer decides; a policy
        // replaces it.
        let orphaning = json!({"finalizers": ["orphan"]});
        assert_eq!(gc_finalizers(&orphaning, None), None);
        assert_eq!(
            gc_finalizers(&orphaning, Some(Propagation::Background)),
            Some(vec![])
        );
        assert_eq!(
            gc_finalizers(&orphaning, Some(Propagation::Foreground)),
            Some(vec![json!("foregroundDeletion")])
        );
    }
}
