//! `pods/binding`: the scheduler's placement of a pod on a node.

use super::*;

/// pods/binding: assigns a pod to a node, once (the scheduler's write).
pub(super) async fn bind(state: &ApiState, target: &Target, body: &Bytes) -> ApiResult {
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
