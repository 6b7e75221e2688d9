//! PATCH bodies: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

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
}
