//! PATCH: merge, JSON and strategic merge patches, and server-side apply with its conflicts.

use super::*;
use crate::api::codec::patch;

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
        let mut new = strategy::prepare_update(target.resource.strategy, sub, &current, object)?;
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
                let mut new =
                    strategy::prepare_update(target.resource.strategy, None, current, merged)?;
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
