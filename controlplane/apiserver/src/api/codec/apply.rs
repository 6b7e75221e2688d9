//! Server-side apply (`PATCH` with `application/apply-patch+yaml`, `kubectl apply --server-side`):
//! each field manager owns the fields it applied, recorded in `metadata.managedFields`
//! (FieldsV1). An apply sets the fields of its configuration, removes the fields the same manager
//! applied before and no longer does (unless another manager owns them too), and refuses with a
//! 409 to change a field another manager owns to a different value, unless forced.
//!
//! Lists merge as in strategic merge patches (containers by name, ports by port, ...); other
//! lists are atomic. Writes other than applies to an object that has managed fields give the
//! fields they change to their manager (operation Update); the fields of an object first applied
//! after it was created otherwise belong to `before-first-apply`.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::api::codec::patch::{list_merge, strategic_merge_patch, ListMerge};

/// One field: path elements in FieldsV1 notation (`f:spec`, `k:{"name":"web"}`, `v:"x"`).
type Path = Vec<String>;
type FieldSet = BTreeSet<Path>;

/// Fields no manager owns.
fn ignored(path: &[String]) -> bool {
    match path {
        [first] => matches!(first.as_str(), "f:apiVersion" | "f:kind" | "f:status"),
        [meta, field, ..] if meta == "f:metadata" => !matches!(
            field.as_str(),
            "f:labels" | "f:annotations" | "f:finalizers" | "f:ownerReferences"
        ),
        _ => false,
    }
}

/// The leaf fields of `value` (associative list elements count too, with ".").
fn field_set(kind: &str, value: &Value) -> FieldSet {
    let mut set = FieldSet::new();
    let mut names = Vec::new();
    collect(kind, value, &mut Vec::new(), &mut names, &mut set);
    set.retain(|p| !ignored(p));
    set
}

fn collect(
    kind: &str,
    value: &Value,
    path: &mut Path,
    names: &mut Vec<String>,
    out: &mut FieldSet,
) {
    match value {
        Value::Object(map) if !map.is_empty() || path.is_empty() => {
            for (key, child) in map {
                path.push(format!("f:{key}"));
                names.push(key.clone());
                collect(kind, child, path, names, out);
                names.pop();
                path.pop();
            }
        }
        Value::Array(items) => match list_merge(kind, names) {
            ListMerge::Key(key) => {
                for item in items {
                    let Some(id) = item.get(key) else {
                        out.insert(path.clone());
                        continue;
                    };
                    path.push(format!("k:{}", json!({key: id})));
                    let mut element = path.clone();
                    element.push(".".into());
                    out.insert(element);
                    collect(kind, item, path, names, out);
                    path.pop();
                }
            }
            ListMerge::Set => {
                for item in items {
                    path.push(format!("v:{item}"));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListMerge::Replace => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// FieldsV1: the set as nested objects.
fn to_fields_v1(set: &FieldSet) -> Value {
    fn insert(node: &mut Map<String, Value>, path: &[String]) {
        if let [first, rest @ ..] = path {
            let child = node
                .entry(first.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(child) = child.as_object_mut() {
                insert(child, rest);
            }
        }
    }
    let mut root = Map::new();
    for path in set {
        insert(&mut root, path);
    }
    Value::Object(root)
}

fn from_fields_v1(value: &Value) -> FieldSet {
    fn walk(value: &Value, path: &mut Path, out: &mut FieldSet) {
        match value.as_object() {
            Some(map) if !map.is_empty() => {
                for (k, v) in map {
                    path.push(k.clone());
                    walk(v, path, out);
                    path.pop();
                }
            }
            _ => {
                if !path.is_empty() {
                    out.insert(path.clone());
                }
            }
        }
    }
    let mut out = FieldSet::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

/// The value at a field path (`None` when absent).
fn value_at<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = value;
    for element in path {
        if element == "." {
            return Some(node);
        }
        node = if let Some(field) = element.strip_prefix("f:") {
            node.get(field)?
        } else if let Some(key) = element.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(key).ok()?;
            node.as_array()?
                .iter()
                .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))?
        } else if let Some(item) = element.strip_prefix("v:") {
            let item: Value = serde_json::from_str(item).ok()?;
            node.as_array()?.iter().find(|i| **i == item)?
        } else {
            return None;
        };
    }
    Some(node)
}

/// Removes the field at `path` (a list element when the path ends at one).
fn remove_at(value: &mut Value, path: &[String]) {
    let (last, parent) = match path {
        [parent @ .., last] if last == "." => match parent {
            [grand @ .., element] => (element.clone(), grand.to_vec()),
            [] => return,
        },
        [parent @ .., last] => (last.clone(), parent.to_vec()),
        [] => return,
    };
    let mut node = value;
    for element in &parent {
        let next = if let Some(field) = element.strip_prefix("f:") {
            node.get_mut(field)
        } else if let Some(key) = element.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
                return;
            };
            node.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(map) = node.as_object_mut() {
            map.remove(field);
        }
    } else if let Some(key) = last.strip_prefix("k:") {
        if let (Ok(key), Some(items)) = (
            serde_json::from_str::<Map<String, Value>>(key),
            node.as_array_mut(),
        ) {
            items.retain(|item| !key.iter().all(|(k, v)| item.get(k) == Some(v)));
        }
    } else if let Some(item) = last.strip_prefix("v:") {
        if let (Ok(item), Some(items)) = (serde_json::from_str::<Value>(item), node.as_array_mut())
        {
            items.retain(|i| *i != item);
        }
    }
}

/// Whether two objects agree on the field at `path` (for a list element's "." entry: that it
/// exists in both).
fn same_at(a: &Value, b: &Value, path: &[String]) -> bool {
    match (value_at(a, path), value_at(b, path)) {
        (Some(x), Some(y)) => path.last().is_some_and(|l| l == ".") || x == y,
        (None, None) => true,
        _ => false,
    }
}

/// A readable form of a field path (`.spec.containers[name="web"].image`).
fn describe(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(field) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = element.strip_prefix("k:") {
            if let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) {
                let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push_str(&format!("[{}]", parts.join(",")));
            }
        } else if let Some(item) = element.strip_prefix("v:") {
            out.push_str(&format!("[{item}]"));
        }
    }
    out
}

struct Manager {
    name: String,
    operation: String,
    api_version: String,
    time: String,
    fields: FieldSet,
}

fn managers(object: &Value) -> Vec<Manager> {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| Manager {
            name: entry["manager"].as_str().unwrap_or_default().to_string(),
            operation: entry["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: entry["apiVersion"].as_str().unwrap_or("v1").to_string(),
            time: entry["time"].as_str().unwrap_or_default().to_string(),
            fields: from_fields_v1(&entry["fieldsV1"]),
        })
        .collect()
}

fn write_managers(object: &mut Value, managers: &[Manager]) {
    let entries: Vec<Value> = managers
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            json!({"manager": m.name, "operation": m.operation, "apiVersion": m.api_version,
                   "time": m.time, "fieldsType": "FieldsV1", "fieldsV1": to_fields_v1(&m.fields)})
        })
        .collect();
    if let Some(meta) = object["metadata"].as_object_mut() {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

/// A conflict: the field and the managers that own it.
#[derive(Debug, PartialEq)]
pub struct Conflict {
    pub field: String,
    pub managers: Vec<String>,
}

/// Applies `config` for `manager` to `live` (None: the object does not exist yet). Returns the
/// object to store, or the conflicts.
pub fn apply(
    kind: &str,
    live: Option<&Value>,
    config: &Value,
    manager: &str,
    force: bool,
    now: &str,
) -> Result<Value, Vec<Conflict>> {
    let api_version = config["apiVersion"].as_str().unwrap_or("v1").to_string();
    let applied = field_set(kind, config);
    let Some(live) = live else {
        let mut object = config.clone();
        write_managers(
            &mut object,
            &[Manager {
                name: manager.into(),
                operation: "Apply".into(),
                api_version,
                time: now.into(),
                fields: applied,
            }],
        );
        return Ok(object);
    };
    let mut owners = managers(live);
    if owners.is_empty() {
        owners.push(Manager {
            name: "before-first-apply".into(),
            operation: "Update".into(),
            api_version: api_version.clone(),
            time: now.into(),
            fields: field_set(kind, live),
        });
    }
    let is_me = |m: &Manager| m.name == manager && m.operation == "Apply";
    let mut conflicts = Vec::new();
    for path in &applied {
        if value_at(live, path).is_none() || same_at(live, config, path) {
            continue;
        }
        let others: Vec<String> = owners
            .iter()
            .filter(|m| !is_me(m) && m.fields.contains(path))
            .map(|m| m.name.clone())
            .collect();
        if !others.is_empty() {
            conflicts.push(Conflict {
                field: describe(path),
                managers: others,
            });
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    let mut object = live.clone();
    if strategic_merge_patch(&mut object, config, kind).is_err() {
        return Err(vec![Conflict {
            field: String::new(),
            managers: vec!["the applied configuration is not an object".into()],
        }]);
    }
    // Fields this manager applied before and no longer does go, unless someone else has them.
    let before = owners
        .iter()
        .find(|m| is_me(m))
        .map(|m| m.fields.clone())
        .unwrap_or_default();
    for path in before.difference(&applied) {
        let shared = owners.iter().any(|m| !is_me(m) && m.fields.contains(path));
        if !shared {
            remove_at(&mut object, path);
        }
    }
    if force {
        // A forced apply takes the fields whose values it changed.
        for m in owners.iter_mut().filter(|m| !is_me(m)) {
            m.fields
                .retain(|p| !applied.contains(p) || same_at(live, config, p));
        }
    }
    owners.retain(|m| !is_me(m));
    owners.push(Manager {
        name: manager.into(),
        operation: "Apply".into(),
        api_version,
        time: now.into(),
        fields: applied,
    });
    write_managers(&mut object, &owners);
    Ok(object)
}

/// After a write other than an apply: the fields it changed now belong to `manager` (operation
/// Update). Objects without managed fields are left as they are.
pub fn record_update(kind: &str, before: &Value, after: &mut Value, manager: &str, now: &str) {
    let mut owners = managers(before);
    if owners.is_empty() {
        if let Some(meta) = after["metadata"].as_object_mut() {
            meta.remove("managedFields");
        }
        return;
    }
    let old = field_set(kind, before);
    let changed: FieldSet = field_set(kind, after)
        .into_iter()
        .filter(|p| !old.contains(p) || !same_at(before, after, p))
        .collect();
    let current = field_set(kind, after);
    for m in owners.iter_mut() {
        // Fields that are gone are no one's; changed ones are the writer's.
        m.fields
            .retain(|p| current.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        match owners
            .iter_mut()
            .find(|m| m.name == manager && m.operation == "Update")
        {
            Some(m) => {
                m.fields.extend(changed);
                m.time = now.into();
            }
            None => owners.push(Manager {
                name: manager.into(),
                operation: "Update".into(),
                api_version: after["apiVersion"].as_str().unwrap_or("v1").into(),
                time: now.into(),
                fields: changed,
            }),
        }
    }
    write_managers(after, &owners);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(image: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "web", "labels": labels},
               "spec": {"containers": [{"name": "web", "image": image}]}})
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let set = field_set("Pod", &deployment("nginx", json!({"app": "web"})));
        assert!(set.contains(&vec![
            "f:spec".to_string(),
            "f:containers".into(),
            "k:{\"name\":\"web\"}".into(),
            "f:image".into()
        ]));
        assert!(!set
            .iter()
            .any(|p| p == &vec!["f:metadata".to_string(), "f:name".into()]));
        assert_eq!(from_fields_v1(&to_fields_v1(&set)), set);
    }

    #[test]
    fn applies_own_fields_conflict_with_others_and_drop_what_they_stop_applying() {
        let now = "2026-01-01T00:00:00Z";
        let first = apply(
            "Pod",
            None,
            &deployment("nginx:1", json!({"a": "1", "b": "2"})),
            "alice",
            false,
            now,
        )
        .unwrap();
        // Alice stops applying label b: it goes. Her image change is hers to make.
        let second = apply(
            "Pod",
            Some(&first),
            &deployment("nginx:2", json!({"a": "1"})),
            "alice",
            false,
            now,
        )
        .unwrap();
        assert_eq!(second["metadata"]["labels"], json!({"a": "1"}));
        assert_eq!(second["spec"]["containers"][0]["image"], "nginx:2");
        // Bob applies a different image: a conflict with alice, unless forced.
        let bob = deployment("nginx:3", json!({}));
        let conflicts = apply("Pod", Some(&second), &bob, "bob", false, now).unwrap_err();
        assert_eq!(conflicts[0].field, ".spec.containers[name=\"web\"].image");
        assert_eq!(conflicts[0].managers, ["alice"]);
        let forced = apply("Pod", Some(&second), &bob, "bob", true, now).unwrap();
        assert_eq!(forced["spec"]["containers"][0]["image"], "nginx:3");
        // Agreeing on a value is shared ownership, not a conflict.
        assert!(apply(
            "Pod",
            Some(&second),
            &deployment("nginx:2", json!({"a": "1"})),
            "carol",
            false,
            now
        )
        .is_ok());
    }

    #[test]
    fn updates_take_the_fields_they_change() {
        let now = "2026-01-01T00:00:00Z";
        let applied = apply(
            "Pod",
            None,
            &deployment("nginx:1", json!({"a": "1"})),
            "alice",
            false,
            now,
        )
        .unwrap();
        let mut edited = applied.clone();
        edited["spec"]["containers"][0]["image"] = "nginx:9".into();
        record_update("Pod", &applied, &mut edited, "kubectl-edit", now);
        let owners = managers(&edited);
        let editor = owners.iter().find(|m| m.name == "kubectl-edit").unwrap();
        assert_eq!(editor.fields.len(), 1);
        let conflicts = apply(
            "Pod",
            Some(&edited),
            &deployment("nginx:1", json!({"a": "1"})),
            "alice",
            false,
            now,
        )
        .unwrap_err();
        assert_eq!(conflicts[0].managers, ["kubectl-edit"]);
    }
}
