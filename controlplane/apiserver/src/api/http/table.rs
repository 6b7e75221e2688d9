//! Server-side printing: a `meta.k8s.io/v1` Table for clients that ask for one (kubectl get), with
//! the columns each kind's strategy names (`registry::*`'s `printer`) as kube-apiserver prints
//! them.

use serde_json::{json, Value};

/// A kind's columns as (name, type), and how to fill them from an object.
pub type Columns = &'static [(&'static str, &'static str)];
pub type Cells = fn(&Value) -> Vec<Value>;

/// How `kubectl get` shows a kind: Name, its columns, Age, then the ones only `-o wide` shows
/// (priority 1). A kind may go without Name and Age (Events).
#[derive(Clone, Copy)]
pub struct Printer {
    pub name_and_age: bool,
    pub columns: Columns,
    pub cells: Cells,
    pub wide: Columns,
    pub wide_cells: Cells,
}

impl Printer {
    /// Name and Age only: kinds without columns of their own.
    pub const NAME_AGE: Printer = Printer {
        name_and_age: true,
        columns: &[],
        cells: |_| Vec::new(),
        wide: &[],
        wide_cells: |_| Vec::new(),
    };
}

/// Up to three items and "+ N more...", as kubectl abbreviates endpoint lists.
pub fn abbreviate(items: Vec<String>) -> String {
    match items.len() {
        0 => "<none>".into(),
        n if n <= 3 => items.join(","),
        n => format!("{} + {} more...", items[..3].join(","), n - 3),
    }
}

/// Whether the Accept header asks for a Table.
pub fn wanted(accept: &str) -> bool {
    accept
        .split(',')
        .any(|part| part.contains("as=Table") && part.contains("g=meta.k8s.io"))
}

fn object_cell(o: &Value, include_object: &str) -> Value {
    match include_object {
        "None" => Value::Null,
        "Object" => o.clone(),
        _ => json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                    "metadata": o["metadata"]}),
    }
}

/// The Table of `items` as `printer` shows them; `include_object` is the request's
/// `includeObject`.
pub fn render(
    printer: &Printer,
    items: &[Value],
    resource_version: &str,
    include_object: &str,
) -> Value {
    let mut definitions = Vec::new();
    if printer.name_and_age {
        definitions.push(column("Name", "string", "name"));
    }
    definitions.extend(
        printer
            .columns
            .iter()
            .map(|(name, ty)| column(name, ty, "")),
    );
    if printer.name_and_age {
        definitions.push(column("Age", "string", ""));
    }
    definitions.extend(printer.wide.iter().map(|(name, ty)| {
        let mut c = column(name, ty, "");
        c["priority"] = 1.into();
        c
    }));
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut row = Vec::new();
            if printer.name_and_age {
                row.push(json!(o["metadata"]["name"].as_str().unwrap_or("")));
            }
            row.extend((printer.cells)(o));
            if printer.name_and_age {
                row.push(json!(age(o["metadata"]["creationTimestamp"].as_str())));
            }
            row.extend((printer.wide_cells)(o));
            json!({"cells": row, "object": object_cell(o, include_object)})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
           "metadata": {"resourceVersion": resource_version},
           "columnDefinitions": definitions, "rows": rows})
}

fn column(name: &str, ty: &str, format: &str) -> Value {
    json!({"name": name, "type": ty, "format": format, "description": "", "priority": 0})
}

/// A string field, or `<none>`.
pub fn text(v: &Value) -> Value {
    json!(v.as_str().filter(|s| !s.is_empty()).unwrap_or("<none>"))
}

/// The entries of a map field.
pub fn count(v: &Value) -> usize {
    v.as_object().map_or(0, |m| m.len())
}

/// How long ago an RFC 3339 time was, as kubectl shows ages; `<unknown>` without one.
pub fn age(time: Option<&str>) -> String {
    time.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| human_duration((chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds()))
        .unwrap_or_else(|| "<unknown>".into())
}

/// Ages as kubectl shows them: 45s, 3m20s, 47m, 5h10m, 2d3h, 40d, 3y.
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86_400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if d < 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 730 {
        format!("{d}d")
    } else {
        format!("{}y", d / 365)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::registry::resources::find;

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(47 * 60), "47m");
        assert_eq!(human_duration(5 * 3600 + 600), "5h10m");
        assert_eq!(human_duration(51 * 3600), "2d3h");
    }

    #[test]
    fn config_maps_show_their_data_count() {
        let cm = json!({"metadata": {"name": "a", "creationTimestamp": "2020-01-01T00:00:00Z"},
                        "data": {"x": "1", "y": "2"}});
        let table = render(
            &find("", "v1", "configmaps").unwrap().strategy.printer(),
            &[cm],
            "5",
            "",
        );
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Name", "Data", "Age"]);
        assert_eq!(table["rows"][0]["cells"][1], 2);
        assert_eq!(table["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert!(wanted(
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
        ));
        assert!(!wanted("application/json"));
    }

    #[test]
    fn events_show_type_reason_object_and_message() {
        let event = json!({"metadata": {"name": "web.1", "creationTimestamp": "2020-01-01T00:00:00Z"},
                           "type": "Warning", "reason": "FailedScheduling",
                           "involvedObject": {"kind": "Pod", "name": "web"},
                           "message": "0/1 nodes are available"});
        let table = render(
            &find("", "v1", "events").unwrap().strategy.printer(),
            &[event],
            "5",
            "",
        );
        let names: Vec<&str> = table["columnDefinitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Last Seen", "Type", "Reason", "Object", "Message"]);
        let cells = &table["rows"][0]["cells"];
        assert_eq!(cells[1], "Warning");
        assert_eq!(cells[3], "pod/web");
        assert_eq!(cells[4], "0/1 nodes are available");
    }
}
