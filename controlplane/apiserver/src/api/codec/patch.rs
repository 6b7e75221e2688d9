//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902) and Kubernetes' strategic
//! merge patch for the served kinds (lists merged by their merge keys, `$patch`, `$retainKeys`,
//! `$deleteFromPrimitiveList` and `$setElementOrder` directives).

use serde_json::Value;

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Why a JSON patch was not applied; `target` is unchanged either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonPatchError {
    /// Not a list of RFC 6902 operations (400, as kube-apiserver answers an undecodable patch).
    Malformed(String),
    /// An operation failed: a missing path, a failed `test`, a bad index (422).
    Failed(String),
}

/// RFC 6902, with the maintained `json-patch` crate: operations apply in order, and any failure
/// leaves `target` as it was.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| JsonPatchError::Malformed(format!("the JSON patch is malformed: {e}")))?;
    json_patch::patch(target, &ops).map_err(|e| {
        JsonPatchError::Failed(format!(
            "the JSON patch could not be applied: operation {} ({} {}): {}",
            e.operation,
            op_name(&ops[e.operation]),
            e.path,
            e.kind
        ))
    })
}

fn op_name(op: &json_patch::PatchOperation) -> &'static str {
    use json_patch::PatchOperation::*;
    match op {
        Add(_) => "add",
        Remove(_) => "remove",
        Replace(_) => "replace",
        Move(_) => "move",
        Copy(_) => "copy",
        Test(_) => "test",
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
    fn merge_patch_gives_the_results_of_rfc_7386_appendix_a() {
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (
                json!({"a": "b"}),
                json!({"b": "c"}),
                json!({"a": "b", "b": "c"}),
            ),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (
                json!({"a": "b", "b": "c"}),
                json!({"a": null}),
                json!({"b": "c"}),
            ),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (
                json!({"a": {"b": "c"}}),
                json!({"a": {"b": "d", "c": null}}),
                json!({"a": {"b": "d"}}),
            ),
            (
                json!({"a": [{"b": "c"}]}),
                json!({"a": [1]}),
                json!({"a": [1]}),
            ),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
            (json!({"a": "foo"}), json!("bar"), json!("bar")),
            (
                json!({"e": null}),
                json!({"a": 1}),
                json!({"e": null, "a": 1}),
            ),
            (
                json!([1, 2]),
                json!({"a": "b", "c": null}),
                json!({"a": "b"}),
            ),
            (
                json!({}),
                json!({"a": {"bb": {"ccc": null}}}),
                json!({"a": {"bb": {}}}),
            ),
        ];
        for (original, patch, result) in cases {
            let mut doc = original.clone();
            merge_patch(&mut doc, &patch);
            assert_eq!(doc, result, "{original} + {patch}");
        }
    }

    #[test]
    fn json_patch_gives_the_results_of_rfc_6902_appendix_a() {
        let ok = [
            // A.1 to A.8, A.10, A.11, A.14, A.16.
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux"}]),
                json!({"baz": "qux", "foo": "bar"}),
            ),
            (
                json!({"foo": ["bar", "baz"]}),
                json!([{"op": "add", "path": "/foo/1", "value": "qux"}]),
                json!({"foo": ["bar", "qux", "baz"]}),
            ),
            (
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "remove", "path": "/baz"}]),
                json!({"foo": "bar"}),
            ),
            (
                json!({"foo": ["bar", "qux", "baz"]}),
                json!([{"op": "remove", "path": "/foo/1"}]),
                json!({"foo": ["bar", "baz"]}),
            ),
            (
                json!({"baz": "qux", "foo": "bar"}),
                json!([{"op": "replace", "path": "/baz", "value": "boo"}]),
                json!({"baz": "boo", "foo": "bar"}),
            ),
            (
                json!({"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}}),
                json!([{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}]),
                json!({"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}}),
            ),
            (
                json!({"foo": ["all", "grass", "cows", "eat"]}),
                json!([{"op": "move", "from": "/foo/1", "path": "/foo/3"}]),
                json!({"foo": ["all", "cows", "eat", "grass"]}),
            ),
            (
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
                json!([{"op": "test", "path": "/baz", "value": "qux"},
                    {"op": "test", "path": "/foo/1", "value": 2}]),
                json!({"baz": "qux", "foo": ["a", 2, "c"]}),
            ),
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/child", "value": {"grandchild": {}}}]),
                json!({"foo": "bar", "child": {"grandchild": {}}}),
            ),
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz", "value": "qux", "xyz": 123}]),
                json!({"foo": "bar", "baz": "qux"}),
            ),
            (
                json!({"/": 9, "~1": 10}),
                json!([{"op": "test", "path": "/~01", "value": 10}]),
                json!({"/": 9, "~1": 10}),
            ),
            (
                json!({"foo": ["bar"]}),
                json!([{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}]),
                json!({"foo": ["bar", ["abc", "def"]]}),
            ),
            // The root path, which the hand-written patch could not replace.
            (
                json!({"a": 1}),
                json!([{"op": "replace", "path": "", "value": {"b": 2}}]),
                json!({"b": 2}),
            ),
            (
                json!([1]),
                json!([{"op": "add", "path": "/1", "value": 2}]),
                json!([1, 2]),
            ),
        ];
        for (original, patch, result) in ok {
            let mut doc = original.clone();
            json_patch(&mut doc, &patch).unwrap_or_else(|e| panic!("{patch}: {e:?}"));
            assert_eq!(doc, result, "{original} + {patch}");
        }
        let failing = [
            // A.9, A.12, A.15.
            (
                json!({"baz": "qux"}),
                json!([{"op": "test", "path": "/baz", "value": "bar"}]),
            ),
            (
                json!({"foo": "bar"}),
                json!([{"op": "add", "path": "/baz/bat", "value": "qux"}]),
            ),
            (
                json!({"/": 9, "~1": 10}),
                json!([{"op": "test", "path": "/~01", "value": "10"}]),
            ),
            // Indexes as RFC 6901 writes them: no leading zeros, no negatives, `-` only to add.
            (
                json!({"l": [1, 2]}),
                json!([{"op": "remove", "path": "/l/01"}]),
            ),
            (
                json!({"l": [1, 2]}),
                json!([{"op": "add", "path": "/l/01", "value": 0}]),
            ),
            (
                json!({"l": [1, 2]}),
                json!([{"op": "remove", "path": "/l/-1"}]),
            ),
            (
                json!({"l": [1, 2]}),
                json!([{"op": "remove", "path": "/l/-"}]),
            ),
            (
                json!({"l": [1, 2]}),
                json!([{"op": "replace", "path": "/l/-", "value": 0}]),
            ),
            (
                json!({"l": [1, 2]}),
                json!([{"op": "add", "path": "/l/3", "value": 0}]),
            ),
        ];
        for (original, patch) in failing {
            let mut doc = original.clone();
            let e = json_patch(&mut doc, &patch);
            assert!(
                matches!(e, Err(JsonPatchError::Failed(_))),
                "{patch}: {e:?}"
            );
            assert_eq!(doc, original, "{patch} changed the document");
        }
        for malformed in [
            json!({"op": "add"}),
            json!([{"op": "frobnicate", "path": "/a"}]),
            json!([{"op": "add", "path": "/a"}]),
            json!([{"path": "/a", "value": 1}]),
            json!([{"op": "move", "path": "/a"}]),
            json!([{"op": "remove", "path": "a"}]),
        ] {
            let mut doc = json!({"a": 1});
            let e = json_patch(&mut doc, &malformed);
            assert!(
                matches!(e, Err(JsonPatchError::Malformed(_))),
                "{malformed}: {e:?}"
            );
            assert_eq!(doc, json!({"a": 1}));
        }
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
        assert!(matches!(err, Err(JsonPatchError::Failed(_))), "{err:?}");
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
