//! Watches on seine-apiserver, against a real etcd: events in order with their resourceVersions,
//! resuming from a resourceVersion, 410 Gone when it is older than the watch cache, selectors
//! turning changes into ADDED/DELETED, bookmarks, `kubectl get -w`, one etcd watch for many API
//! watchers, and watchers that keep going through an etcd restart.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use seine_tests::{apiserver::ApiServer, etcd::Etcd};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);
const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn config_map(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "labels": labels}, "data": {"v": "1"}})
}

fn rv(object: &Value) -> i64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {object}"))
}

fn create(server: &ApiServer, name: &str, labels: Value) -> Value {
    let (code, object) = server.post(CMS, &config_map(name, labels)).unwrap();
    assert_eq!(code, 201, "{object}");
    object
}

/// (type, name, resourceVersion) of an event.
fn summary(event: &Value) -> (String, String, i64) {
    (
        event["type"].as_str().unwrap_or_default().to_string(),
        event["object"]["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        rv(&event["object"]),
    )
}

#[test]
fn watchers_get_every_change_in_order_and_resume_from_a_resource_version() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start_with(&etcd, &["--watch-cache-size", "5"]).unwrap();
    let a = create(&server, "a", json!({}));

    // Without a resourceVersion: the current objects first, then the changes.
    let watch = server.watch(&format!("{CMS}?watch=true")).unwrap();
    let first = watch.next_change(WAIT).expect("the initial ADDED event");
    assert_eq!(summary(&first), ("ADDED".into(), "a".into(), rv(&a)));
    let (code, modified) = server
        .merge_patch(&format!("{CMS}/a"), &json!({"data": {"v": "2"}}))
        .unwrap();
    assert_eq!(code, 200);
    let (code, _) = server.delete(&format!("{CMS}/a"), None).unwrap();
    assert_eq!(code, 200);
    let event = watch.next_change(WAIT).expect("MODIFIED");
    assert_eq!(
        summary(&event),
        ("MODIFIED".into(), "a".into(), rv(&modified))
    );
    assert_eq!(event["object"]["data"]["v"], "2");
    let deleted = watch.next_change(WAIT).expect("DELETED");
    assert_eq!(deleted["type"], "DELETED");
    assert!(rv(&deleted["object"]) > rv(&modified));

    // From a resourceVersion: exactly what came after it.
    let resumed = server
        .watch(&format!("{CMS}?watch=true&resourceVersion={}", rv(&a)))
        .unwrap();
    assert_eq!(summary(&resumed.next_change(WAIT).unwrap()).0, "MODIFIED");
    assert_eq!(summary(&resumed.next_change(WAIT).unwrap()).0, "DELETED");
    assert!(resumed.next_change(Duration::from_millis(500)).is_none());

    // The cache keeps 5 changes: a resourceVersion before them is too old.
    for i in 0..8 {
        create(&server, &format!("n{i}"), json!({}));
    }
    let old = server
        .watch(&format!("{CMS}?watch=true&resourceVersion={}", rv(&a)))
        .unwrap();
    let error = old.next(WAIT).expect("an ERROR event");
    assert_eq!(error["type"], "ERROR", "{error}");
    assert_eq!(error["object"]["code"], 410);
    assert_eq!(error["object"]["reason"], "Expired");
    assert!(old.ended(WAIT), "the stream ends after the error");
    // The deprecated /watch/ path is the same watch.
    let legacy = server
        .watch("/api/v1/watch/namespaces/default/configmaps")
        .unwrap();
    let names: Vec<String> = (0..8)
        .map(|_| summary(&legacy.next_change(WAIT).unwrap()).1)
        .collect();
    assert_eq!(names.len(), 8);
    assert!(names.contains(&"n7".to_string()));
}

#[test]
fn selectors_turn_changes_into_adds_and_deletes() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let watch = server
        .watch(&format!("{CMS}?watch=true&labelSelector=app%3Dweb"))
        .unwrap();
    create(&server, "db", json!({"app": "db"}));
    create(&server, "web", json!({"app": "web"}));
    assert_eq!(
        summary(&watch.next_change(WAIT).unwrap()).0.as_str(),
        "ADDED"
    );
    // db starts matching: ADDED; then stops: DELETED (to this watcher; it still exists).
    server
        .merge_patch(
            &format!("{CMS}/db"),
            &json!({"metadata": {"labels": {"app": "web"}}}),
        )
        .unwrap();
    let event = watch.next_change(WAIT).unwrap();
    assert_eq!(
        (summary(&event).0.as_str(), summary(&event).1.as_str()),
        ("ADDED", "db")
    );
    server
        .merge_patch(
            &format!("{CMS}/db"),
            &json!({"metadata": {"labels": {"app": "cache"}}}),
        )
        .unwrap();
    let event = watch.next_change(WAIT).unwrap();
    assert_eq!(
        (summary(&event).0.as_str(), summary(&event).1.as_str()),
        ("DELETED", "db")
    );
    let (code, _) = server.get(&format!("{CMS}/db")).unwrap();
    assert_eq!(code, 200);

    // Other namespaces are not this watcher's.
    let (code, _) = server
        .post(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}),
        )
        .unwrap();
    assert_eq!(code, 201);
    let (code, _) = server
        .post(
            "/api/v1/namespaces/other/configmaps",
            &config_map("web", json!({"app": "web"})),
        )
        .unwrap();
    assert_eq!(code, 201);
    assert!(watch.next_change(Duration::from_millis(800)).is_none());

    // A field selector on the name watches one object.
    let one = server
        .watch("/api/v1/configmaps?watch=true&fieldSelector=metadata.name%3Dweb")
        .unwrap();
    let namespaces: Vec<String> = (0..2)
        .map(|_| {
            one.next_change(WAIT).unwrap()["object"]["metadata"]["namespace"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        namespaces.contains(&"other".to_string()) && namespaces.contains(&"default".to_string())
    );
}

#[test]
fn bookmarks_carry_the_newest_revision_and_end_the_initial_events() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let watch = server
        .watch("/api/v1/namespaces/default/pods?watch=true&allowWatchBookmarks=true")
        .unwrap();
    // Writes to another resource move the revision on; a quiet pod watcher hears of it.
    let last = (0..3)
        .map(|i| rv(&create(&server, &format!("c{i}"), json!({}))))
        .max()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let bookmark = loop {
        let event = watch.next(WAIT).expect("an event within the wait");
        if event["type"] == "BOOKMARK" && rv(&event["object"]) >= last {
            break event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no bookmark reached {last}"
        );
    };
    assert_eq!(bookmark["object"]["kind"], "Pod");

    // Streaming lists: the current objects, then a bookmark marking their end.
    let stream = server
        .watch(&format!(
            "{CMS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true"
        ))
        .unwrap();
    let mut added = 0;
    loop {
        let event = stream.next(WAIT).expect("initial events and a bookmark");
        if event["type"] == "BOOKMARK" {
            assert_eq!(
                event["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
                "true"
            );
            assert!(rv(&event["object"]) >= last);
            break;
        }
        assert_eq!(event["type"], "ADDED");
        added += 1;
    }
    assert_eq!(added, 3);
}

#[test]
fn kubectl_get_watch_prints_changes() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&server.kubeconfig)
        .args(["get", "configmaps", "--watch", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // kubectl lists before it watches; give it the time to start watching.
    std::thread::sleep(Duration::from_secs(1));
    create(&server, "seen", json!({}));
    server.delete(&format!("{CMS}/seen"), None).unwrap();
    let mut lines = Vec::new();
    while let Ok(line) = rx.recv_timeout(WAIT) {
        lines.push(line);
        if lines.iter().any(|l| l.starts_with("DELETED")) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    // The server's Table columns, one row per event.
    let row = |event: &str| {
        lines.iter().any(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            cells.first() == Some(&event)
                && cells.get(1) == Some(&"seen")
                && cells.get(2) == Some(&"1")
        })
    };
    assert!(
        lines[0]
            .split_whitespace()
            .eq(["EVENT", "NAME", "DATA", "AGE"]),
        "{lines:?}"
    );
    assert!(row("ADDED") && row("DELETED"), "{lines:?}");
}

/// etcd's own count of its watchers, from its metrics.
fn etcd_watchers(etcd: &Etcd) -> i64 {
    let out = Command::new("curl")
        .args(["-sS", &format!("{}/metrics", etcd.client_url)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
        .expect("etcd_debugging_mvcc_watcher_total in etcd's metrics")
}

#[test]
fn many_watchers_share_one_etcd_watch_and_survive_an_etcd_restart() {
    let mut etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let before = etcd_watchers(&etcd);
    let watchers: Vec<_> = (0..30)
        .map(|_| server.watch(&format!("{CMS}?watch=true")).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        etcd_watchers(&etcd),
        before,
        "30 API watchers must not add etcd watchers"
    );
    create(&server, "fanout", json!({}));
    for w in &watchers {
        assert_eq!(summary(&w.next_change(WAIT).unwrap()).1, "fanout");
    }

    // etcd goes away and comes back: the same streams carry on.
    etcd.pause().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    etcd.resume().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let after = loop {
        match server.post(CMS, &config_map("after", json!({}))) {
            Ok((201, object)) => break object,
            _ if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!("the server did not recover: {other:?}"),
        }
    };
    for w in &watchers {
        let event = w
            .next_change(Duration::from_secs(15))
            .expect("the event after the restart");
        assert_eq!(
            summary(&event),
            ("ADDED".into(), "after".into(), rv(&after))
        );
    }
}
