//! DELETE of one object or a collection: delete options, preconditions, graceful deletion by
//! each kind's strategy, and the garbage collector's finalizers for the propagation policy.

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;

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
