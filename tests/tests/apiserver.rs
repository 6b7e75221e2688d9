//! seine-apiserver against a real etcd, driven by kubectl and curl: discovery, the system
//! namespaces, create/get/list/delete with label selectors and paging, authentication, optimistic
//! concurrency, Kubernetes-style errors for bad input, and an etcd outage.

use seine_tests::{apiserver::ApiServer, etcd::Etcd};
use serde_json::{json, Value};

const CONFIG_MAP: &str = r#"{"apiVersion": "v1", "kind": "ConfigMap",
  "metadata": {"name": "web", "labels": {"app": "web"}}, "data": {"color": "blue"}}"#;

fn write_manifest(server: &ApiServer, name: &str, text: &str) -> String {
    let path = server.cert_dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn kubectl_sees_the_system_namespaces_and_manages_objects() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();

    let namespaces = server
        .kubectl_ok(&["get", "namespaces", "-o", "name"])
        .unwrap();
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(
            namespaces.contains(&format!("namespace/{ns}")),
            "{namespaces}"
        );
    }
    assert!(server
        .kubectl_ok(&["api-resources"])
        .unwrap()
        .contains("endpointslices"));

    let manifest = write_manifest(&server, "cm.json", CONFIG_MAP);
    let created = server.kubectl_ok(&["create", "-f", &manifest]).unwrap();
    assert!(created.contains("configmap/web created"), "{created}");
    let object = json_of(
        &server
            .kubectl_ok(&["get", "configmap", "web", "-o", "json"])
            .unwrap(),
    );
    assert_eq!(object["data"]["color"], "blue");
    assert_eq!(object["metadata"]["namespace"], "default");
    assert!(object["metadata"]["uid"].as_str().unwrap().len() == 36);
    let rv: i64 = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv > 0);

    let selected = server
        .kubectl_ok(&["get", "configmaps", "-l", "app=web", "-o", "name"])
        .unwrap();
    assert_eq!(selected.trim(), "configmap/web");
    let none = server
        .kubectl_ok(&["get", "configmaps", "-l", "app=db", "-o", "name"])
        .unwrap();
    assert!(none.trim().is_empty(), "{none}");
    // Set-based selectors, as kubectl sends them.
    for (selector, found) in [
        ("app in (db,web)", true),
        ("app notin (web)", false),
        ("app,!legacy", true),
        ("app in (db)", false),
    ] {
        let selected = server
            .kubectl_ok(&["get", "configmaps", "-l", selector, "-o", "name"])
            .unwrap();
        assert_eq!(
            selected.trim() == "configmap/web",
            found,
            "{selector}: {selected}"
        );
    }
    let refused = server
        .kubectl(&["get", "configmaps", "-l", "app in ()"])
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("unable to parse requirement"), "{stderr}");

    let deleted = server.kubectl_ok(&["delete", "configmap", "web"]).unwrap();
    assert!(deleted.contains("deleted"), "{deleted}");
    let gone = server.kubectl(&["get", "configmap", "web"]).unwrap();
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));
}

#[test]
fn anonymous_requests_are_unauthorized_except_health_and_version() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let (status, _, body) = server
        .request("GET", "/api/v1/namespaces", None, "application/json", None)
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(json_of(&body)["reason"], "Unauthorized");
    let (status, _, _) = server
        .request(
            "GET",
            "/api/v1/namespaces",
            Some("wrong-token"),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 401);
    for path in ["/healthz", "/livez", "/readyz", "/version"] {
        let (status, _, _) = server
            .request("GET", path, None, "application/json", None)
            .unwrap();
        assert_eq!(status, 200, "{path}");
    }
    // Metrics need credentials, and count requests by verb, resource and code.
    assert_eq!(
        server
            .request("GET", "/metrics", None, "application/json", None)
            .unwrap()
            .0,
        401
    );
    let token = server.admin_token().unwrap();
    server.kubectl_ok(&["get", "namespaces"]).unwrap();
    let (status, _, metrics) = server
        .request("GET", "/metrics", Some(&token), "application/json", None)
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics
            .contains(r#"apiserver_request_total{verb="LIST",resource="namespaces",code="200"}"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"apiserver_request_total{verb="LIST",resource="namespaces",code="401"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("apiserver_request_duration_seconds_bucket"),
        "{metrics}"
    );
}

#[test]
fn bad_input_gets_kubernetes_status_errors_and_changes_nothing() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let token = server.admin_token().unwrap();
    let post = |path: &str, content_type: &str, body: &[u8]| {
        server
            .request("POST", path, Some(&token), content_type, Some(body))
            .unwrap()
    };
    let cms = "/api/v1/namespaces/default/configmaps";

    let (status, _, body) = post(cms, "application/json", b"{not json");
    assert_eq!(
        (status, json_of(&body)["reason"].clone()),
        (400, json!("BadRequest"))
    );

    let bad_name = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"Not_Valid"}}"#;
    let (status, _, body) = post(cms, "application/json", bad_name.as_bytes());
    let status_body = json_of(&body);
    assert_eq!(status, 422);
    assert_eq!(status_body["reason"], "Invalid");
    assert_eq!(
        status_body["details"]["causes"][0]["field"],
        "metadata.name"
    );

    let wrong_kind = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"a"}}"#;
    assert_eq!(post(cms, "application/json", wrong_kind.as_bytes()).0, 400);
    let other_ns = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a","namespace":"kube-system"}}"#;
    assert_eq!(post(cms, "application/json", other_ns.as_bytes()).0, 400);
    let missing_ns = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"}}"#;
    assert_eq!(
        post(
            "/api/v1/namespaces/nope/configmaps",
            "application/json",
            missing_ns.as_bytes()
        )
        .0,
        404
    );

    let huge = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"x":"{}"}}}}"#,
        "a".repeat(4 * 1024 * 1024)
    );
    assert_eq!(post(cms, "application/json", huge.as_bytes()).0, 413);
    assert_eq!(
        post(cms, "application/vnd.kubernetes.protobuf", b"k8s\0").0,
        415
    );
    let (status, _, _) = server
        .request(
            "GET",
            "/api/v1/widgets",
            Some(&token),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 404);

    let list = server
        .kubectl_ok(&["get", "configmaps", "-o", "name"])
        .unwrap();
    assert!(list.trim().is_empty(), "bad requests left objects: {list}");
}

#[test]
fn updates_from_a_stale_resource_version_conflict_and_lists_page() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let token = server.admin_token().unwrap();
    let cms = "/api/v1/namespaces/default/configmaps";
    for i in 0..5 {
        let body =
            format!(r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"cm-{i}"}}}}"#);
        let (status, _, _) = server
            .request(
                "POST",
                cms,
                Some(&token),
                "application/json",
                Some(body.as_bytes()),
            )
            .unwrap();
        assert_eq!(status, 201);
    }
    let (_, _, body) = server
        .request(
            "GET",
            &format!("{cms}/cm-0"),
            Some(&token),
            "application/json",
            None,
        )
        .unwrap();
    let mut object = json_of(&body);
    object["data"] = json!({"v": "1"});
    let path = format!("{cms}/cm-0");
    let (status, _, _) = server
        .request(
            "PUT",
            &path,
            Some(&token),
            "application/json",
            Some(object.to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(status, 200);
    // The same resourceVersion again is stale now.
    object["data"] = json!({"v": "2"});
    let (status, _, body) = server
        .request(
            "PUT",
            &path,
            Some(&token),
            "application/json",
            Some(object.to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(status, 409);
    assert_eq!(json_of(&body)["reason"], "Conflict");
    let (_, _, body) = server
        .request("GET", &path, Some(&token), "application/json", None)
        .unwrap();
    assert_eq!(json_of(&body)["data"]["v"], "1");

    let mut names = Vec::new();
    let mut next = String::new();
    loop {
        let query = if next.is_empty() {
            "?limit=2".to_string()
        } else {
            format!("?limit=2&continue={next}")
        };
        let (status, _, body) = server
            .request(
                "GET",
                &format!("{cms}{query}"),
                Some(&token),
                "application/json",
                None,
            )
            .unwrap();
        assert_eq!(status, 200);
        let page = json_of(&body);
        assert_eq!(page["kind"], "ConfigMapList");
        names.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_string()),
        );
        match page["metadata"]["continue"].as_str() {
            Some(token) => next = token.to_string(),
            None => break,
        }
    }
    assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);
}

#[test]
fn an_etcd_outage_gives_503_and_the_server_recovers_without_a_restart() {
    let mut etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let token = server.admin_token().unwrap();
    let manifest = write_manifest(&server, "cm.json", CONFIG_MAP);
    server.kubectl_ok(&["create", "-f", &manifest]).unwrap();

    etcd.pause().unwrap();
    let (status, head, body) = server
        .request(
            "GET",
            "/api/v1/namespaces/default/configmaps/web",
            Some(&token),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert_ne!(
        server
            .request("GET", "/readyz", None, "application/json", None)
            .unwrap()
            .0,
        200
    );

    etcd.resume().unwrap();
    seine_tests::wait_until(std::time::Duration::from_secs(30), || {
        server
            .request("GET", "/readyz", None, "application/json", None)
            .is_ok_and(|r| r.0 == 200)
    })
    .unwrap();
    let object = json_of(
        &server
            .kubectl_ok(&["get", "configmap", "web", "-o", "json"])
            .unwrap(),
    );
    assert_eq!(object["data"]["color"], "blue", "{}", server.log_text());
}

#[test]
fn kubectl_patch_applies_merge_and_json_patches() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let manifest = write_manifest(&server, "cm.json", CONFIG_MAP);
    server.kubectl_ok(&["create", "-f", &manifest]).unwrap();

    server
        .kubectl_ok(&[
            "patch",
            "configmap",
            "web",
            "--type=merge",
            "-p",
            r#"{"data":{"color":"green","size":"L"}}"#,
        ])
        .unwrap();
    server
        .kubectl_ok(&[
            "patch",
            "configmap",
            "web",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/data/size"}]"#,
        ])
        .unwrap();
    let object = json_of(
        &server
            .kubectl_ok(&["get", "configmap", "web", "-o", "json"])
            .unwrap(),
    );
    assert_eq!(object["data"], json!({"color": "green"}));
    assert_eq!(object["metadata"]["name"], "web");

    // A failing JSON patch changes nothing.
    let failed = server
        .kubectl(&[
            "patch",
            "configmap",
            "web",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/data/nope"}]"#,
        ])
        .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("could not be applied"), "{stderr}");
    let after = json_of(
        &server
            .kubectl_ok(&["get", "configmap", "web", "-o", "json"])
            .unwrap(),
    );
    assert_eq!(
        after["metadata"]["resourceVersion"],
        object["metadata"]["resourceVersion"]
    );

    // test, then replace a whole member: all of it or none.
    server
        .kubectl_ok(&[
            "patch",
            "configmap",
            "web",
            "--type=json",
            "-p",
            r#"[{"op":"test","path":"/data/color","value":"green"},{"op":"replace","path":"/data","value":{"shape":"round"}}]"#,
        ])
        .unwrap();
    let replaced = json_of(
        &server
            .kubectl_ok(&["get", "configmap", "web", "-o", "json"])
            .unwrap(),
    );
    assert_eq!(replaced["data"], json!({"shape": "round"}));
}

#[test]
fn field_selectors_and_deletecollection_pick_their_objects() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let token = server.admin_token().unwrap();
    let cms = "/api/v1/namespaces/default/configmaps";
    for (name, app) in [("a", "web"), ("b", "web"), ("c", "db")] {
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}","labels":{{"app":"{app}"}}}}}}"#
        );
        let created = server
            .request(
                "POST",
                cms,
                Some(&token),
                "application/json",
                Some(body.as_bytes()),
            )
            .unwrap();
        assert_eq!(created.0, 201);
    }
    let by_name = server
        .kubectl_ok(&[
            "get",
            "configmaps",
            "--field-selector",
            "metadata.name=b",
            "-o",
            "name",
        ])
        .unwrap();
    assert_eq!(by_name.trim(), "configmap/b");
    let unsupported = server
        .kubectl(&["get", "configmaps", "--field-selector", "spec.nope=1"])
        .unwrap();
    assert!(!unsupported.status.success());

    let (status, _, body) = server
        .request(
            "DELETE",
            &format!("{cms}?labelSelector=app%3Dweb"),
            Some(&token),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(json_of(&body)["items"].as_array().unwrap().len(), 2);
    let left = server
        .kubectl_ok(&["get", "configmaps", "-o", "name"])
        .unwrap();
    assert_eq!(left.trim(), "configmap/c");
}

#[test]
fn kubectl_get_prints_the_server_side_columns() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let namespaces = server.kubectl_ok(&["get", "namespaces"]).unwrap();
    let header: Vec<&str> = namespaces
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "STATUS", "AGE"], "{namespaces}");
    assert!(
        namespaces
            .lines()
            .any(|l| l.starts_with("default") && l.contains("Active")),
        "{namespaces}"
    );

    let manifest = write_manifest(&server, "cm.json", CONFIG_MAP);
    server.kubectl_ok(&["create", "-f", &manifest]).unwrap();
    let config_maps = server
        .kubectl_ok(&["get", "configmaps", "--show-labels"])
        .unwrap();
    let mut lines = config_maps.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "DATA", "AGE", "LABELS"], "{config_maps}");
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        (row[0], row[1], row[3]),
        ("web", "1", "app=web"),
        "{config_maps}"
    );
}

#[test]
fn a_three_member_etcd_cluster_loses_a_member_during_writes_and_nothing_acknowledged_is_lost() {
    let mut members = Etcd::cluster(3).unwrap();
    let endpoints: Vec<String> = members.iter().flat_map(Etcd::endpoints).collect();
    let server = std::sync::Arc::new(ApiServer::start_on(&endpoints, &[]).unwrap());

    // One writer creates config maps one after another while a member goes away.
    let writer = {
        let server = server.clone();
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut failures = Vec::new();
            for i in 0..150 {
                let name = format!("w-{i}");
                let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": name}, "data": {"i": i.to_string()}});
                match server.post("/api/v1/namespaces/default/configmaps", &body) {
                    Ok((201, _)) => acknowledged.push(name),
                    Ok((code, status)) => failures.push((code, status)),
                    Err(e) => panic!("{e:#}"),
                }
            }
            (acknowledged, failures)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(400));
    members[0].pause().unwrap();
    let (acknowledged, failures) = writer.join().unwrap();

    eprintln!(
        "acknowledged {} of 150, failures: {:?}",
        acknowledged.len(),
        failures.iter().map(|(c, _)| *c).collect::<Vec<_>>()
    );
    // Two of three members are a quorum: writes go on (a few may fail while the client moves
    // off the stopped member, with 503 and nothing written).
    assert!(
        acknowledged.len() >= 140,
        "acknowledged {} of 150: {failures:?}",
        acknowledged.len()
    );
    for (code, status) in &failures {
        assert!(matches!(code, 503 | 504), "{code}: {status}");
    }
    let (_, list) = server.get("/api/v1/namespaces/default/configmaps").unwrap();
    let stored: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["metadata"]["name"].as_str().unwrap())
        .collect();
    for name in &acknowledged {
        assert!(
            stored.contains(&name.as_str()),
            "{name} was acknowledged but is gone"
        );
    }
    // The member comes back and catches up.
    members[0].resume().unwrap();
    let (code, _) = server
        .post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "after"}}),
        )
        .unwrap();
    assert_eq!(code, 201);
}
