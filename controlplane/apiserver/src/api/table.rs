//! Server-side printing: a `meta.k8s.io/v1` Table for clients that ask for one (kubectl get), with
//! the columns kube-apiserver prints for each kind.

use serde_json::{json, Value};

/// A kind's columns after Name (name, type) and how to fill them from an object.
type Columns = (
    &'static [(&'static str, &'static str)],
    fn(&Value) -> Vec<Value>,
);

/// Columns kubectl shows only with `-o wide` (priority 1), after Age.
fn wide_columns(kind: &str) -> Columns {
    match kind {
        "Pod" => (
            &[
                ("IP", "string"),
                ("Node", "string"),
                ("Nominated Node", "string"),
                ("Readiness Gates", "string"),
            ],
            |o| {
                vec![
                    text(&o["status"]["podIP"]),
                    text(&o["spec"]["nodeName"]),
                    text(&o["status"]["nominatedNodeName"]),
                    json!("<none>"),
                ]
            },
        ),
        "Service" => (&[("Selector", "string")], |o| {
            let selector: Vec<String> = o["spec"]["selector"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            vec![json!(if selector.is_empty() {
                "<none>".to_string()
            } else {
                selector.join(",")
            })]
        }),
        "Node" => (&[("Internal-IP", "string")], |o| {
            let ip = o["status"]["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["type"] == "InternalIP")
                .map(|a| a["address"].clone())
                .unwrap_or(Value::Null);
            vec![text(&ip)]
        }),
        _ => (&[], |_| Vec::new()),
    }
}

/// Up to three items and "+ N more...", as kubectl abbreviates endpoint lists.
fn abbreviate(items: Vec<String>) -> String {
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

/// Events as kubectl shows them: last seen, type, reason, object, message (no name column).
fn render_events(items: &[Value], resource_version: &str, include_object: &str) -> Value {
    let now = chrono::Utc::now();
    let definitions = vec![
        column("Last Seen", "string", ""),
        column("Type", "string", ""),
        column("Reason", "string", ""),
        column("Object", "string", ""),
        column("Message", "string", ""),
    ];
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let seen = ["lastTimestamp", "eventTime", "firstTimestamp"]
                .iter()
                .find_map(|f| o[*f].as_str())
                .or(o["metadata"]["creationTimestamp"].as_str())
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| human_duration((now - t.with_timezone(&chrono::Utc)).num_seconds()))
                .unwrap_or_else(|| "<unknown>".into());
            let involved = &o["involvedObject"];
            let object = format!(
                "{}/{}",
                involved["kind"].as_str().unwrap_or_default().to_lowercase(),
                involved["name"].as_str().unwrap_or_default()
            );
            let row = vec![
                json!(seen),
                text(&o["type"]),
                text(&o["reason"]),
                json!(object),
                json!(o["message"].as_str().unwrap_or_default()),
            ];
            json!({"cells": row, "object": object_cell(o, include_object)})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
           "metadata": {"resourceVersion": resource_version},
           "columnDefinitions": definitions, "rows": rows})
}

/// The Table of `items` of `kind`; `include_object` is the request's `includeObject`.
pub fn render(kind: &str, items: &[Value], resource_version: &str, include_object: &str) -> Value {
    if kind == "Event" {
        return render_events(items, resource_version, include_object);
    }
    let (columns, cells): Columns = match kind {
        "Namespace" => (&[("Status", "string")], |o| {
            vec![text(&o["status"]["phase"])]
        }),
        "ConfigMap" => (&[("Data", "integer")], |o| {
            vec![json!(count(&o["data"]) + count(&o["binaryData"]))]
        }),
        "Secret" => (&[("Type", "string"), ("Data", "integer")], |o| {
            vec![text(&o["type"]), json!(count(&o["data"]))]
        }),
        "Service" => (
            &[
                ("Type", "string"),
                ("Cluster-IP", "string"),
                ("External-IP", "string"),
                ("Port(s)", "string"),
            ],
            |o| {
                let ports: Vec<String> = o["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| match p["nodePort"].as_i64() {
                        Some(node_port) => format!(
                            "{}:{node_port}/{}",
                            p["port"],
                            p["protocol"].as_str().unwrap_or("TCP")
                        ),
                        None => {
                            format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP"))
                        }
                    })
                    .collect();
                vec![
                    json!(o["spec"]["type"].as_str().unwrap_or("ClusterIP")),
                    text(&o["spec"]["clusterIP"]),
                    json!("<none>"),
                    json!(if ports.is_empty() {
                        "<none>".to_string()
                    } else {
                        ports.join(",")
                    }),
                ]
            },
        ),
        "Pod" => (
            &[
                ("Ready", "string"),
                ("Status", "string"),
                ("Restarts", "string"),
            ],
            |o| {
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let statuses = o["status"]["containerStatuses"].as_array();
                let ready = statuses
                    .into_iter()
                    .flatten()
                    .filter(|s| s["ready"] == true)
                    .count();
                let restarts: i64 = statuses
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s["restartCount"].as_i64())
                    .sum();
                vec![
                    json!(format!("{ready}/{total}")),
                    json!(o["status"]["phase"].as_str().unwrap_or("Pending")),
                    json!(restarts.to_string()),
                ]
            },
        ),
        "Node" => (&[("Status", "string"), ("Version", "string")], |o| {
            let ready = o["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .map(|c| {
                    if c["status"] == "True" {
                        "Ready"
                    } else {
                        "NotReady"
                    }
                })
                .unwrap_or("Unknown");
            vec![
                json!(ready),
                text(&o["status"]["nodeInfo"]["kubeletVersion"]),
            ]
        }),
        "Endpoints" => (&[("Endpoints", "string")], |o| {
            let mut out = Vec::new();
            for subset in o["subsets"].as_array().into_iter().flatten() {
                for a in subset["addresses"].as_array().into_iter().flatten() {
                    for p in subset["ports"].as_array().into_iter().flatten() {
                        out.push(format!(
                            "{}:{}",
                            a["ip"].as_str().unwrap_or_default(),
                            p["port"]
                        ));
                    }
                }
            }
            vec![json!(abbreviate(out))]
        }),
        "EndpointSlice" => (
            &[
                ("AddressType", "string"),
                ("Ports", "string"),
                ("Endpoints", "string"),
            ],
            |o| {
                let ports: Vec<String> = o["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p["port"].to_string())
                    .collect();
                let addresses: Vec<String> = o["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect();
                vec![
                    text(&o["addressType"]),
                    json!(abbreviate(ports)),
                    json!(abbreviate(addresses)),
                ]
            },
        ),
        "Job" => (
            &[
                ("Status", "string"),
                ("Completions", "string"),
                ("Duration", "string"),
            ],
            |o| {
                let conditions = o["status"]["conditions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let has = |t: &str| {
                    conditions
                        .iter()
                        .any(|c| c["type"] == t && c["status"] == "True")
                };
                let status = if has("Complete") {
                    "Complete"
                } else if has("Failed") {
                    "Failed"
                } else if o["spec"]["suspend"] == true {
                    "Suspended"
                } else {
                    "Running"
                };
                let duration = match (
                    o["status"]["startTime"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
                    o["status"]["completionTime"]
                        .as_str()
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()),
                ) {
                    (Some(start), Some(end)) => human_duration((end - start).num_seconds()),
                    (Some(start), None) => human_duration(
                        (chrono::Utc::now() - start.with_timezone(&chrono::Utc)).num_seconds(),
                    ),
                    _ => String::new(),
                };
                vec![
                    json!(status),
                    json!(format!(
                        "{}/{}",
                        o["status"]["succeeded"].as_i64().unwrap_or(0),
                        o["spec"]["completions"].as_i64().unwrap_or(1)
                    )),
                    json!(duration),
                ]
            },
        ),
        "Lease" => (&[("Holder", "string")], |o| {
            vec![text(&o["spec"]["holderIdentity"])]
        }),
        // kube-apiserver's columns: NAME CIDRS AGE and NAME PARENTREF.
        "ServiceCIDR" => (&[("CIDRs", "string")], |o| {
            let cidrs: Vec<&str> = o["spec"]["cidrs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            vec![json!(cidrs.join(","))]
        }),
        "IPAddress" => (&[("ParentRef", "string")], |o| {
            let p = &o["spec"]["parentRef"];
            let resource = match p["group"].as_str().unwrap_or_default() {
                "" => p["resource"].as_str().unwrap_or_default().to_string(),
                group => format!("{}.{group}", p["resource"].as_str().unwrap_or_default()),
            };
            vec![json!(format!(
                "{resource}/{}/{}",
                p["namespace"].as_str().unwrap_or_default(),
                p["name"].as_str().unwrap_or_default()
            ))]
        }),
        "ServiceAccount" => (&[("Secrets", "integer")], |o| {
            vec![json!(o["secrets"].as_array().map_or(0, Vec::len))]
        }),
        _ => (&[], |_| Vec::new()),
    };
    let (wide, wide_cells) = wide_columns(kind);
    let mut definitions = vec![column("Name", "string", "name")];
    definitions.extend(columns.iter().map(|(name, ty)| column(name, ty, "")));
    definitions.push(column("Age", "string", ""));
    definitions.extend(wide.iter().map(|(name, ty)| {
        let mut c = column(name, ty, "");
        c["priority"] = 1.into();
        c
    }));
    let now = chrono::Utc::now();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut row = vec![json!(o["metadata"]["name"].as_str().unwrap_or(""))];
            row.extend(cells(o));
            let age = o["metadata"]["creationTimestamp"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| human_duration((now - t.with_timezone(&chrono::Utc)).num_seconds()))
                .unwrap_or_else(|| "<unknown>".into());
            row.push(json!(age));
            row.extend(wide_cells(o));
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

fn text(v: &Value) -> Value {
    json!(v.as_str().filter(|s| !s.is_empty()).unwrap_or("<none>"))
}

fn count(v: &Value) -> usize {
    v.as_object().map_or(0, |m| m.len())
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
        let table = render("ConfigMap", &[cm], "5", "");
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
        let table = render("Event", &[event], "5", "");
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
