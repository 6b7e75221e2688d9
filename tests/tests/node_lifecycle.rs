//! The node lifecycle controller of seine-controller-manager against a real etcd and
//! seine-apiserver: a Node that stops heartbeating turns Unknown and gets the unreachable
//! taints, its Pods turn not ready and leave their Service's ready endpoints, Pods are evicted as
//! their tolerations say, and the taints go when the Node is back. The test plays the kubelets.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use seine_tests::{apiserver::ApiServer, controllers::Daemon, etcd::Etcd, wait_until};
use serde_json::{json, Value};

fn stamp() -> String {
    // RFC 3339 with microseconds, as Lease times are written.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// A kubelet's status report: Ready with a fresh heartbeat.
fn report_ready(api: &ApiServer, node: &str) {
    let t = stamp();
    let (code, out) = api
        .call(
            "PATCH",
            &format!("/api/v1/nodes/{node}/status"),
            "application/merge-patch+json",
            Some(&json!({"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "lastHeartbeatTime": t, "lastTransitionTime": t}]}})),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
}

fn renew(api: &ApiServer, node: &str) {
    let (code, out) = api
        .merge_patch(
            &format!("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"),
            &json!({"spec": {"renewTime": stamp()}}),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
}

fn pod(api: &ApiServer, name: &str, node: &str, ip: &str, tolerations: Value) {
    let (code, out) = api
        .post(
            "/api/v1/namespaces/default/pods",
            &json!({"metadata": {"name": name, "labels": {"app": "web"}},
                    "spec": {"nodeName": node, "tolerations": tolerations,
                             "containers": [{"name": "c", "image": "nginx"}]}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
    let (code, out) = api
        .call(
            "PATCH",
            &format!("/api/v1/namespaces/default/pods/{name}/status"),
            "application/merge-patch+json",
            Some(
                &json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
}

fn node(api: &ApiServer, name: &str) -> Value {
    api.get(&format!("/api/v1/nodes/{name}")).unwrap().1
}

fn ready_status(n: &Value) -> String {
    n["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

fn taints(n: &Value) -> Vec<String> {
    let mut t: Vec<String> = n["spec"]["taints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| {
            format!(
                "{}:{}",
                t["key"].as_str().unwrap(),
                t["effect"].as_str().unwrap()
            )
        })
        .collect();
    t.sort();
    t
}

/// Ready endpoint addresses of the `web` Service's slices.
fn ready_endpoints(api: &ApiServer) -> Vec<String> {
    let (_, list) = api
        .get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io/service-name=web")
        .unwrap();
    let mut out: Vec<String> = list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] == true)
        .map(|e| e["addresses"][0].as_str().unwrap_or_default().to_string())
        .collect();
    out.sort();
    out
}

fn terminating(api: &ApiServer, pod: &str) -> bool {
    let (code, p) = api
        .get(&format!("/api/v1/namespaces/default/pods/{pod}"))
        .unwrap();
    code == 404 || !p["metadata"]["deletionTimestamp"].is_null()
}

#[test]
fn a_silent_node_turns_unknown_its_endpoints_not_ready_and_its_pods_are_evicted() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    for name in ["alive", "silent"] {
        let (code, out) = api
            .post("/api/v1/nodes", &json!({"metadata": {"name": name}}))
            .unwrap();
        assert_eq!(code, 201, "{out}");
        report_ready(&api, name);
        let (code, out) = api
            .post(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                &json!({"metadata": {"name": name},
                        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": stamp()}}),
            )
            .unwrap();
        assert_eq!(code, 201, "{out}");
    }
    let (code, out) = api
        .post(
            "/api/v1/namespaces/default/services",
            &json!({"metadata": {"name": "web"},
                    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
    pod(&api, "alive-web", "alive", "10.244.0.10", json!([]));
    // The API server gives Pods its default 300 s tolerations of not-ready and unreachable.
    pod(&api, "silent-web", "silent", "10.244.1.10", json!([]));
    pod(
        &api,
        "silent-short",
        "silent",
        "10.244.1.11",
        json!([{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                "effect": "NoExecute", "tolerationSeconds": 1}]),
    );
    pod(
        &api,
        "silent-forever",
        "silent",
        "10.244.1.12",
        json!([{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"}]),
    );

    // The kubelet of `alive` keeps renewing its Lease; the one of `silent` has stopped.
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                renew(&api, "alive");
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checks(&api)));
        stop.store(true, Ordering::Relaxed);
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    });
}

fn checks(api: &ApiServer) {
    let cm = Daemon::controller_manager(
        api,
        &[
            "--leader-elect=false",
            "--controllers",
            "endpointslice,nodelifecycle",
            "--node-monitor-grace-period",
            "3s",
            "--node-monitor-period",
            "500ms",
        ],
    )
    .unwrap();
    let all = vec![
        "10.244.0.10".to_string(),
        "10.244.1.10".into(),
        "10.244.1.11".into(),
        "10.244.1.12".into(),
    ];
    wait_until(Duration::from_secs(10), || ready_endpoints(api) == all).unwrap_or_else(|_| {
        panic!(
            "all endpoints ready: {:?}\n{}",
            ready_endpoints(api),
            cm.log_text()
        )
    });

    let unknown = wait_until(Duration::from_secs(20), || {
        ready_status(&node(api, "silent")) == "Unknown"
    });
    assert!(
        unknown.is_ok(),
        "silent never turned Unknown:\n{}",
        cm.log_text()
    );
    let silent = node(api, "silent");
    let ready = silent["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["reason"], "NodeStatusUnknown");
    assert_eq!(ready["message"], "Kubelet stopped posting node status.");
    wait_until(Duration::from_secs(10), || {
        taints(&node(api, "silent"))
            == [
                "node.kubernetes.io/unreachable:NoExecute",
                "node.kubernetes.io/unreachable:NoSchedule",
            ]
    })
    .unwrap_or_else(|_| panic!("taints: {:?}", taints(&node(api, "silent"))));
    // The heartbeating Node is left alone.
    let alive = node(api, "alive");
    assert_eq!(ready_status(&alive), "True");
    assert!(taints(&alive).is_empty());

    // Its Pods turn not ready and so leave the Service's ready endpoints.
    wait_until(Duration::from_secs(10), || {
        ready_endpoints(api) == ["10.244.0.10".to_string()]
    })
    .unwrap_or_else(|_| panic!("ready endpoints: {:?}", ready_endpoints(api)));
    let (_, p) = api
        .get("/api/v1/namespaces/default/pods/silent-web")
        .unwrap();
    assert!(
        p.to_string().contains(r#""status":"False","type":"Ready""#) || {
            let c = p["status"]["conditions"].as_array().unwrap();
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "False")
        }
    );

    // Evictions: a 1 s toleration runs out; 300 s and no limit do not (within this test).
    wait_until(Duration::from_secs(10), || terminating(api, "silent-short"))
        .unwrap_or_else(|_| panic!("silent-short not evicted:\n{}", cm.log_text()));
    assert!(!terminating(api, "silent-web"));
    assert!(!terminating(api, "silent-forever"));
    assert!(!terminating(api, "alive-web"));
    let events = api
        .kubectl_ok(&[
            "get",
            "events",
            "--field-selector",
            "reason=TaintManagerEviction",
            "-o",
            "name",
        ])
        .unwrap();
    assert!(!events.trim().is_empty(), "an eviction event");
    // As `kubectl get events` shows it.
    let table = api.kubectl_ok(&["get", "events"]).unwrap();
    assert!(
        table.lines().any(|l| l.contains("TaintManagerEviction")
            && l.contains("pod/silent-short")
            && l.contains("Marking for deletion Pod default/silent-short")),
        "{table}"
    );

    // The kubelet is back: the taints go.
    renew(api, "silent");
    report_ready(api, "silent");
    wait_until(Duration::from_secs(10), || {
        taints(&node(api, "silent")).is_empty()
    })
    .unwrap_or_else(|_| panic!("taints left: {:?}", taints(&node(api, "silent"))));
}
