//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and Kubernetes' strategic
//! merge patch for the served kinds (lists merged by their merge keys, `$patch`, `$retainKeys`,
//! `$deleteFromPrimitiveList` and `$setElementOrder` directives).

use serde_json::Value;

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    if let Value::Object(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                merge_patch(target_map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// RFC 6902. Operations apply in order; any failure leaves `target` as it was.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    let mut doc = target.clone();
    for (i, op) in ops.iter().enumerate() {
        let name = op["op"]
            .as_str()
            .ok_or(format!("operation {i}: missing \"op\""))?;
        let path = op["path"]
            .as_str()
            .ok_or(format!("operation {i}: missing \"path\""))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or(format!("operation {i}: missing \"value\""))
        };
        match name {
            "add" => add(&mut doc, path, value()?)?,
            "remove" => {
                remove(&mut doc, path)?;
            }
            "replace" => {
                remove(&mut doc, path)?;
                add(&mut doc, path, value()?)?;
            }
            "move" | "copy" => {
                let from = op["from"]
                    .as_str()
                    .ok_or(format!("operation {i}: missing \"from\""))?;
                let moved = if name == "move" {
                    remove(&mut doc, from)?
                } else {
                    doc.pointer(from)
                        .cloned()
                        .ok_or(format!("operation {i}: {from} does not exist"))?
                };
                add(&mut doc, path, moved)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(format!("operation {i}: test of {path} failed"));
                }
            }
            other => return Err(format!("operation {i}: unknown op {other:?}")),
        }
    }
    *target = doc;
    Ok(())
}

fn split(path: &str) -> Result<(&str, String), String> {
    let (parent, last) = path
        .rsplit_once('/')
        .ok_or(format!("invalid path {path:?}"))?;
    Ok((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, key) = split(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(key, value);
            Ok(())
        }
        Some(Value::Array(list)) => {
            let index = if key == "-" {
                list.len()
            } else {
                key.parse::<usize>()
                    .map_err(|_| format!("invalid index in {path:?}"))?
            };
            if index > list.len() {
                return Err(format!("index out of range in {path:?}"));
            }
            list.insert(index, value);
            Ok(())
        }
        _ => Err(format!("{parent:?} does not exist")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, key) = split(path)?;
    let missing = || format!("{path:?} does not exist");
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&key).ok_or_else(missing),
        Some(Value::Array(list)) => {
            let index: usize = key.parse().map_err(|_| missing())?;
            if index < list.len() {
                Ok(list.remove(index))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// How a list field merges in a strategic merge patch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum ListMerge {
    /// Elements are objects matched by this key.
    Key(&'static str),
    /// A list of scalars, merged as a set.
    Set,
    /// Replaced whole (no patch strategy).
    Replace,
}

/// The merge strategy of the list at `path` (field names from the root) in an object of `kind`,
/// from the Kubernetes types' `patchStrategy` and `patchMergeKey` tags.
pub(super) fn list_merge(kind: &str, path: &[String]) -> ListMerge {
    let field = path.last().map(String::as_str).unwrap_or_default();
    let parent = path.len().checked_sub(2).map(|i| path[i].as_str());
    match field {
        "finalizers" if parent == Some("metadata") => ListMerge::Set,
        "ownerReferences" => ListMerge::Key("uid"),
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => ListMerge::Key("name"),
        "volumeMounts" => ListMerge::Key("mountPath"),
        "volumeDevices" => ListMerge::Key("devicePath"),
        "hostAliases" => ListMerge::Key("ip"),
        "topologySpreadConstraints" => ListMerge::Key("topologyKey"),
        "taints" if kind == "Node" => ListMerge::Key("key"),
        "conditions" => ListMerge::Key("type"),
        "addresses" if kind == "Node" => ListMerge::Key("type"),
        "ports" if kind == "Service" && parent == Some("spec") => ListMerge::Key("port"),
        // Container ports (in pods and pod templates).
        "ports" if kind != "EndpointSlice" && kind != "Endpoints" && kind != "Service" => {
            ListMerge::Key("containerPort")
        }
        _ => ListMerge::Replace,
    }
}

/// Applies a strategic merge patch to `target`, an object of `kind`.
pub fn strategic_merge_patch(target: &mut Value, patch: &Value, kind: &str) -> Result<(), String> {
    if !patch.is_object() {
        return Err("a strategic merge patch must be a JSON object".into());
    }
    let mut path = Vec::new();
    strategic_object(target, patch, kind, &mut path)
}

fn strategic_object(
    target: &mut Value,
    patch: &Value,
    kind: &str,
    path: &mut Vec<String>,
) -> Result<(), String> {
    let Some(patch_map) = patch.as_object() else {
        *target = patch.clone();
        return Ok(());
    };
    match patch_map.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = patch.clone();
            strip_directives(&mut replaced);
            *target = replaced;
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some(other) => return Err(format!("unknown patch directive {other:?}")),
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let retain: Option<Vec<String>> = patch_map.get("$retainKeys").map(|keys| {
        keys.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect()
    });
    for (key, value) in patch_map {
        if key == "$retainKeys" {
            continue;
        }
        if key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = value.as_array().into_iter().flatten().collect();
            if let Some(list) = target[field].as_array_mut() {
                list.retain(|v| !remove.contains(&v));
            }
            continue;
        }
        let Some(target_map) = target.as_object_mut() else {
            break;
        };
        if value.is_null() {
            target_map.remove(key);
            continue;
        }
        path.push(key.clone());
        let slot = target_map.entry(key.clone()).or_insert(Value::Null);
        let result = match value {
            Value::Object(_) => strategic_object(slot, value, kind, path),
            Value::Array(items) => strategic_list(slot, items, list_merge(kind, path), kind, path),
            _ => {
                *slot = value.clone();
                Ok(())
            }
        };
        path.pop();
        result?;
        if target_map.get(key).is_some_and(Value::is_null) {
            target_map.remove(key);
        }
    }
    if let (Some(retain), Some(map)) = (retain, target.as_object_mut()) {
        map.retain(|k, _| retain.contains(k));
    }
    Ok(())
}

fn strategic_list(
    target: &mut Value,
    items: &[Value],
    merge: ListMerge,
    kind: &str,
    path: &mut Vec<String>,
) -> Result<(), String> {
    // A `{"$patch": "replace"}` element replaces the whole list with the other elements.
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    if merge == ListMerge::Replace || replace || !target.is_array() {
        let mut list: Vec<Value> = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        list.iter_mut().for_each(strip_directives);
        *target = Value::Array(list);
        return Ok(());
    }
    let Some(list) = target.as_array_mut() else {
        return Ok(());
    };
    match merge {
        ListMerge::Set => {
            for item in items {
                if !list.contains(item) {
                    list.push(item.clone());
                }
            }
        }
        ListMerge::Key(key) => {
            for item in items {
                let Some(wanted) = item.get(key) else {
                    return Err(format!(
                        "an element of {} has no merge key {key:?}",
                        path.join(".")
                    ));
                };
                let position = list.iter().position(|e| e.get(key) == Some(wanted));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (position, delete) {
                    (Some(i), true) => {
                        list.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => strategic_object(&mut list[i], item, kind, path)?,
                    (None, false) => {
                        let mut added = item.clone();
                        strip_directives(&mut added);
                        list.push(added);
                    }
                }
            }
        }
        ListMerge::Replace => {}
    }
    Ok(())
}

/// Removes `$`-directives from a value that is stored as it is.
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(list) => list.iter_mut().for_each(strip_directives),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn json_patch_applies_all_or_nothing() {
        let mut doc = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/metadata/labels/b", "value": "2"},
                {"op": "remove", "path": "/metadata/labels/a"},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "test", "path": "/list/0", "value": 1}
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"labels": {"b": "2"}}, "list": [1, 2, 3]})
        );
        let before = doc.clone();
        let err = json_patch(
            &mut doc,
            &json!([{"op": "remove", "path": "/list/0"}, {"op": "remove", "path": "/nope"}]),
        );
        assert!(err.is_err());
        assert_eq!(doc, before);
    }

    #[test]
    fn strategic_merge_patch_merges_lists_by_key() {
        let mut pod = json!({"metadata": {"finalizers": ["a"], "labels": {"x": "1"}},
            "spec": {"containers": [
                {"name": "web", "image": "nginx:1", "env": [{"name": "A", "value": "1"}],
                 "ports": [{"containerPort": 80}]},
                {"name": "side", "image": "busybox"}],
                "tolerations": [{"key": "t"}]}});
        strategic_merge_patch(
            &mut pod,
            &json!({"metadata": {"finalizers": ["b"], "labels": {"x": null, "y": "2"}},
                    "spec": {"containers": [
                        {"name": "web", "image": "nginx:2", "env": [{"name": "B", "value": "2"}]},
                        {"name": "side", "$patch": "delete"}],
                        "tolerations": [{"key": "u"}]}}),
            "Pod",
        )
        .unwrap();
        assert_eq!(pod["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(pod["metadata"]["labels"], json!({"y": "2"}));
        let containers = pod["spec"]["containers"].as_array().unwrap();
        assert_eq!(containers.len(), 1);
        assert_eq!(containers[0]["image"], "nginx:2");
        assert_eq!(containers[0]["env"].as_array().unwrap().len(), 2);
        assert_eq!(containers[0]["ports"], json!([{"containerPort": 80}]));
        // No patch strategy: replaced.
        assert_eq!(pod["spec"]["tolerations"], json!([{"key": "u"}]));
    }

    #[test]
    fn strategic_merge_patch_directives() {
        let mut svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}],
                                      "selector": {"a": "1", "b": "2"}}});
        strategic_merge_patch(
            &mut svc,
            &json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}],
                             "selector": {"$patch": "replace", "c": "3"}}}),
            "Service",
        )
        .unwrap();
        assert_eq!(svc["spec"]["ports"][1]["targetPort"], 8443);
        assert_eq!(svc["spec"]["ports"].as_array().unwrap().len(), 2);
        assert_eq!(svc["spec"]["selector"], json!({"c": "3"}));
        let mut meta = json!({"metadata": {"finalizers": ["a", "b"]}});
        strategic_merge_patch(
            &mut meta,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}),
            "ConfigMap",
        )
        .unwrap();
        assert_eq!(meta["metadata"]["finalizers"], json!(["b"]));
        assert!(strategic_merge_patch(&mut meta, &json!([1]), "ConfigMap").is_err());
    }
}
