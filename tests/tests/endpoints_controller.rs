//! The EndpointSlice and Endpoints controller of seine-controller-manager against a real etcd and
//! seine-apiserver: what `kubectl get endpointslices` and `kubectl get endpoints` show as Pods
//! come, turn ready, terminate and go.

use std::time::Duration;

use seine_tests::{apiserver::ApiServer, controllers::Daemon, etcd::Etcd, wait_until};
use serde_json::{json, Value};

fn pod(api: &ApiServer, name: &str, labels: Value, extra_spec: Value) {
    let mut spec = json!({"containers": [{"name": "web", "image": "nginx",
        "ports": [{"name": "http", "containerPort": 8080}]}], "nodeName": "node-a"});
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        for (k, v) in extra {
            s.insert(k.clone(), v.clone());
        }
    }
    let (code, out) = api
        .post(
            "/api/v1/namespaces/default/pods",
            &json!({"metadata": {"name": name, "labels": labels}, "spec": spec}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
}

/// Reports the Pod running at `ip`, ready or not, as a kubelet does.
fn status(api: &ApiServer, name: &str, ip: &str, ready: bool) {
    let ready = if ready { "True" } else { "False" };
    let (code, out) = api
        .call(
            "PATCH",
            &format!("/api/v1/namespaces/default/pods/{name}/status"),
            "application/merge-patch+json",
            Some(
                &json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": ready}]}}),
            ),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
}

fn slices(api: &ApiServer, service: &str) -> Vec<Value> {
    let (_, list) = api
        .get(&format!(
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io/service-name={service}"
        ))
        .unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

/// Every endpoint of the Service's slices: address -> (ready, serving, terminating).
fn endpoints(api: &ApiServer, service: &str) -> Vec<(String, bool, bool, bool)> {
    let mut out: Vec<_> = slices(api, service)
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            let c = &e["conditions"];
            (
                e["addresses"][0].as_str().unwrap_or_default().to_string(),
                c["ready"] == true,
                c["serving"] == true,
                c["terminating"] == true,
            )
        })
        .collect();
    out.sort();
    out
}

fn until(what: &str, api: &ApiServer, cm: &Daemon, mut check: impl FnMut() -> bool) {
    if wait_until(Duration::from_secs(15), &mut check).is_err() {
        panic!(
            "{what}: not reached.\nslices: {:#}\ncontroller log:\n{}",
            json!(slices(api, "web")),
            cm.log_text()
        );
    }
}

#[test]
fn slices_and_endpoints_follow_pods() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let cm = Daemon::controller_manager(
        &api,
        &[
            "--leader-elect=false",
            "--controllers",
            "endpointslice",
            "--max-endpoints-per-slice",
            "3",
        ],
    )
    .unwrap();

    // A Service whose targetPort is a named container port.
    let (code, out) = api
        .post(
            "/api/v1/namespaces/default/services",
            &json!({"metadata": {"name": "web", "labels": {"team": "a"}},
                    "spec": {"selector": {"app": "web"},
                             "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
    // No pods yet: one placeholder slice without ports.
    until("a placeholder slice", &api, &cm, || {
        let s = slices(&api, "web");
        s.len() == 1
            && s[0]["ports"].is_null()
            && s[0]["endpoints"].as_array().is_none_or(|e| e.is_empty())
    });

    for i in 1..=4 {
        pod(&api, &format!("web-{i}"), json!({"app": "web"}), json!({}));
    }
    pod(&api, "other", json!({"app": "other"}), json!({}));
    // web-4 is addressed as a subdomain member.
    for i in 1..=3 {
        status(&api, &format!("web-{i}"), &format!("10.244.1.{i}"), true);
    }
    status(&api, "web-4", "10.244.1.4", false);
    status(&api, "other", "10.244.1.99", true);
    until("four endpoints, three ready", &api, &cm, || {
        endpoints(&api, "web")
            == vec![
                ("10.244.1.1".into(), true, true, false),
                ("10.244.1.2".into(), true, true, false),
                ("10.244.1.3".into(), true, true, false),
                ("10.244.1.4".into(), false, false, false),
            ]
    });
    let s = slices(&api, "web");
    assert_eq!(s.len(), 2, "at most 3 endpoints a slice: {s:#?}");
    let (_, service) = api.get("/api/v1/namespaces/default/services/web").unwrap();
    let time = |v: &Value| -> k8s_openapi::jiff::Timestamp {
        v.as_str().unwrap_or_default().parse().unwrap()
    };
    let created = time(&service["metadata"]["creationTimestamp"]);
    for slice in &s {
        // When the change behind the write happened, for the proxies' programming latency: no
        // earlier than the Service, and no later than now.
        let trigger = time(
            &slice["metadata"]["annotations"]["endpoints.kubernetes.io/last-change-trigger-time"],
        );
        assert!(
            trigger >= created && trigger <= k8s_openapi::jiff::Timestamp::now(),
            "{slice:#}"
        );
        assert_eq!(slice["addressType"], "IPv4");
        assert_eq!(
            slice["ports"],
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}])
        );
        let labels = &slice["metadata"]["labels"];
        assert_eq!(labels["kubernetes.io/service-name"], "web");
        assert_eq!(
            labels["endpointslice.kubernetes.io/managed-by"],
            "endpointslice-controller.k8s.io"
        );
        assert_eq!(labels["team"], "a", "the Service's labels are copied");
        assert_eq!(slice["metadata"]["ownerReferences"][0]["kind"], "Service");
        for e in slice["endpoints"].as_array().unwrap() {
            assert_eq!(e["nodeName"], "node-a");
            assert_eq!(e["targetRef"]["kind"], "Pod");
        }
    }
    // The legacy Endpoints: ready and not-ready addresses, resolved port.
    let (_, ep) = api.get("/api/v1/namespaces/default/endpoints/web").unwrap();
    let subset = &ep["subsets"][0];
    let ips: Vec<&str> = subset["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["10.244.1.1", "10.244.1.2", "10.244.1.3"]);
    assert_eq!(subset["notReadyAddresses"][0]["ip"], "10.244.1.4");
    assert_eq!(subset["ports"][0]["port"], 8080);
    let kubectl = api.kubectl_ok(&["get", "endpoints", "web"]).unwrap();
    assert!(kubectl.contains("10.244.1.1:8080"), "{kubectl}");

    // One Pod turning ready rewrites only the slice that holds it.
    let versions = || -> Vec<(String, String)> {
        slices(&api, "web")
            .iter()
            .map(|s| {
                let meta = &s["metadata"];
                let text = |v: &Value| v.as_str().unwrap().to_string();
                (text(&meta["name"]), text(&meta["resourceVersion"]))
            })
            .collect()
    };
    let before = versions();
    status(&api, "web-4", "10.244.1.4", true);
    until("web-4 ready", &api, &cm, || {
        endpoints(&api, "web").iter().all(|e| e.1)
    });
    let after = versions();
    let names = |v: &[(String, String)]| {
        let mut n: Vec<String> = v.iter().map(|(n, _)| n.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&before), names(&after), "the same slices, updated");
    let rewritten = after.iter().filter(|a| !before.contains(a)).count();
    assert_eq!(rewritten, 1, "only the slice holding web-4 was written");

    // A terminating Pod (in its grace period; no kubelet here ends it) stays, not ready but
    // serving.
    let (code, _) = api
        .delete("/api/v1/namespaces/default/pods/web-1", None)
        .unwrap();
    assert!(code == 200 || code == 202);
    until("web-1 terminating", &api, &cm, || {
        endpoints(&api, "web").contains(&("10.244.1.1".into(), false, true, true))
    });
    let (_, ep) = api.get("/api/v1/namespaces/default/endpoints/web").unwrap();
    assert!(
        !ep.to_string().contains("10.244.1.1\""),
        "a terminating Pod leaves the legacy Endpoints: {ep}"
    );
    api.delete(
        "/api/v1/namespaces/default/pods/web-1",
        Some(&json!({"gracePeriodSeconds": 0})),
    )
    .unwrap();
    until("web-1 gone", &api, &cm, || {
        !endpoints(&api, "web").iter().any(|e| e.0 == "10.244.1.1")
    });

    // A Pod whose labels change leaves the Service.
    api.merge_patch(
        "/api/v1/namespaces/default/pods/web-2",
        &json!({"metadata": {"labels": {"app": "moved"}}}),
    )
    .unwrap();
    until("web-2 left", &api, &cm, || {
        endpoints(&api, "web")
            == vec![
                ("10.244.1.3".into(), true, true, false),
                ("10.244.1.4".into(), true, true, false),
            ]
    });

    // publishNotReadyAddresses: a not-ready Pod counts as ready.
    status(&api, "web-3", "10.244.1.3", false);
    api.merge_patch(
        "/api/v1/namespaces/default/services/web",
        &json!({"spec": {"publishNotReadyAddresses": true}}),
    )
    .unwrap();
    until("published not ready", &api, &cm, || {
        endpoints(&api, "web").contains(&("10.244.1.3".into(), true, true, false))
    });

    // The Service's deletion takes its slices and Endpoints along.
    api.delete("/api/v1/namespaces/default/services/web", None)
        .unwrap();
    until("slices gone", &api, &cm, || slices(&api, "web").is_empty());
    until("endpoints gone", &api, &cm, || {
        api.get("/api/v1/namespaces/default/endpoints/web")
            .is_ok_and(|(code, _)| code == 404)
    });
    // The apiserver's own `kubernetes` Endpoints were left alone.
    let (code, _) = api
        .get("/api/v1/namespaces/default/endpoints/kubernetes")
        .unwrap();
    assert_eq!(code, 200);
    let (code, metrics) = cm.http("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains(
            "seine_controller_syncs_total{controller=\"endpointslice\",result=\"success\"}"
        ),
        "{metrics}"
    );
}

#[test]
fn a_second_controller_manager_takes_over_when_the_leader_stops() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let flags = [
        "--controllers",
        "endpointslice",
        "--leader-elect-lease-duration",
        "4s",
        "--leader-elect-renew-deadline",
        "3s",
        "--leader-elect-retry-period",
        "500ms",
    ];
    let mut first = Daemon::controller_manager(&api, &flags).unwrap();
    wait_until(Duration::from_secs(10), || first.leads()).expect("the first replica leads");
    let second = Daemon::controller_manager(&api, &flags).unwrap();
    let (code, out) = api
        .post(
            "/api/v1/namespaces/default/services",
            &json!({"metadata": {"name": "web"},
                    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
    pod(&api, "web-1", json!({"app": "web"}), json!({}));
    status(&api, "web-1", "10.244.1.1", true);
    until("the leader's slice", &api, &first, || {
        endpoints(&api, "web").len() == 1
    });
    assert!(!second.leads(), "one leader at a time");
    let holder = |api: &ApiServer| {
        api.get(
            "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/kube-controller-manager",
        )
        .unwrap()
        .1["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let before = holder(&api);
    assert!(!before.is_empty());

    // SIGTERM: the leader gives the Lease up and exits 0; the other replica takes over.
    let status_code = first.process.stop().unwrap();
    assert!(status_code.success(), "{status_code}: {}", first.log_text());
    assert!(
        !first.log_text().contains("did not finish"),
        "the controllers did not finish their work in time:\n{}",
        first.log_text()
    );
    wait_until(Duration::from_secs(10), || second.leads())
        .unwrap_or_else(|_| panic!("no takeover:\n{}", second.log_text()));
    assert_ne!(holder(&api), before);
    pod(&api, "web-2", json!({"app": "web"}), json!({}));
    status(&api, "web-2", "10.244.1.2", true);
    until("the new leader's work", &api, &second, || {
        endpoints(&api, "web").len() == 2
    });
}
