//! seine-kubelet on a real containerd and runc, with seine-cni as the runtime's CNI plugin,
//! against etcd and seine-apiserver, as a user of Kubernetes checks a node: `kubectl get nodes`
//! Ready with a version, the node Lease renewed, pods running with their network, environment,
//! resolv.conf and volumes, probes turning Ready on and off, crash loops backing off, deletion
//! with the preStop hook and the grace period, a missing image and an unknown volume reported in
//! the pod's status, static pods from files with their mirror pods, and a restarted kubelet
//! adopting what runs.

use std::{net::Ipv4Addr, time::Duration};

use seine_tests::{
    apiserver::ApiServer,
    cni::allocated,
    containerd::BUSYBOX_IMAGE,
    etcd::Etcd,
    kubelet::{KubeletNode, CLUSTER_DNS},
};
use serde_json::{json, Value};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 1);
const POD_CIDR: &str = "10.244.40.0/24";

fn cluster() -> (Etcd, ApiServer) {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    (etcd, api)
}

fn node(api: &ApiServer) -> KubeletNode {
    KubeletNode::start(api, "node-1", NODE_IP, POD_CIDR, &[]).unwrap()
}

fn pod_path(name: &str) -> String {
    format!("/api/v1/namespaces/default/pods/{name}")
}

fn get_pod(api: &ApiServer, name: &str) -> Option<Value> {
    match api.get(&pod_path(name)).unwrap() {
        (200, pod) => Some(pod),
        _ => None,
    }
}

/// Creates a pod bound to the node (as the scheduler would have bound it).
fn create_pod(api: &ApiServer, mut pod: Value) {
    pod["spec"]["nodeName"] = "node-1".into();
    let (code, out) = api.post("/api/v1/namespaces/default/pods", &pod).unwrap();
    assert_eq!(code, 201, "{out}");
}

fn container_status(pod: &Value, index: usize) -> &Value {
    &pod["status"]["containerStatuses"][index]
}

fn condition(pod: &Value, type_: &str) -> String {
    pod["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Waits for the pod to satisfy `f`, failing with its status and the kubelet's log.
fn wait_pod(
    api: &ApiServer,
    node: &KubeletNode,
    name: &str,
    within: u64,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let mut last = Value::Null;
    let outcome = node.wait(Duration::from_secs(within), what, || {
        last = get_pod(api, name).unwrap_or(Value::Null);
        f(&last)
    });
    if let Err(e) = outcome {
        panic!(
            "{e:#}\npod: {}",
            serde_json::to_string_pretty(&last["status"]).unwrap()
        );
    }
    last
}

fn events_of(api: &ApiServer, name: &str) -> Vec<(String, String)> {
    let (_, list) = api
        .get(&format!(
            "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name={name}"
        ))
        .unwrap();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or("").to_string(),
                e["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// An HTTP GET from inside the node namespace (pods are reachable from their node).
fn fetch(node: &KubeletNode, url: &str) -> Option<String> {
    node.node
        .ns
        .exec("wget", &["-q", "-T", "2", "-O", "-", url])
        .ok()
}

/// The share of the filesystem under `path` that is available, as `df` gives it.
fn free_percent(path: &std::path::Path) -> f64 {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `stat` a writable statvfs.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut stat) }, 0);
    stat.f_bavail as f64 * 100.0 / stat.f_blocks as f64
}

#[test]
fn the_kubelet_registers_a_ready_node_and_renews_its_lease() {
    let (_etcd, api) = cluster();
    let mut node = node(&api);
    node.wait(Duration::from_secs(30), "the node turns Ready", || {
        api.kubectl_ok(&["get", "node", "node-1", "--no-headers"])
            .is_ok_and(|o| o.split_whitespace().nth(1) == Some("Ready"))
    })
    .unwrap();
    let table = api.kubectl_ok(&["get", "nodes", "--no-headers"]).unwrap();
    assert!(
        table.contains("v1.32.0-seine"),
        "kubectl get nodes shows the kubelet's version: {table}"
    );

    let (_, n) = api.get("/api/v1/nodes/node-1").unwrap();
    let labels = &n["metadata"]["labels"];
    assert_eq!(labels["kubernetes.io/hostname"], "node-1");
    assert_eq!(labels["kubernetes.io/os"], "linux");
    assert_eq!(labels["kubernetes.io/arch"], "amd64");
    let info = &n["status"]["nodeInfo"];
    assert!(
        info["containerRuntimeVersion"]
            .as_str()
            .unwrap()
            .starts_with("containerd://1."),
        "{info}"
    );
    assert_eq!(info["kubeletVersion"], "v1.32.0-seine");
    assert!(!info["bootID"].as_str().unwrap().is_empty());
    assert!(n["status"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["type"] == "InternalIP" && a["address"] == NODE_IP.to_string()));
    assert_eq!(n["status"]["capacity"]["pods"], "110");
    assert!(n["status"]["allocatable"]["memory"]
        .as_str()
        .unwrap()
        .ends_with("Ki"));
    // DiskPressure is the truth about this machine's disk: under 10% free (the default
    // --eviction-hard) it is True.
    let disk_pressure = if free_percent(&node.root_dir) < 10.0 {
        "True"
    } else {
        "False"
    };
    for (type_, status) in [
        ("Ready", "True"),
        ("MemoryPressure", "False"),
        ("DiskPressure", disk_pressure),
        ("PIDPressure", "False"),
    ] {
        let c = n["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap();
        assert_eq!(c["status"], status, "{c}");
    }

    let lease = || {
        api.get("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-1")
            .unwrap()
            .1
    };
    let first = lease();
    assert_eq!(first["spec"]["holderIdentity"], "node-1");
    assert_eq!(first["metadata"]["ownerReferences"][0]["kind"], "Node");
    let renewed = first["spec"]["renewTime"].clone();
    node.wait(Duration::from_secs(15), "the lease is renewed", || {
        lease()["spec"]["renewTime"] != renewed
    })
    .unwrap();

    assert!(
        node.stop_kubelet().unwrap().success(),
        "SIGTERM stops the kubelet with status 0"
    );
}

#[test]
fn a_pod_runs_with_its_network_environment_dns_and_volumes_then_stops_gracefully() {
    let (_etcd, api) = cluster();
    let node = node(&api);
    let (code, out) = api
        .post(
            "/api/v1/namespaces/default/configmaps",
            &json!({"metadata": {"name": "site"}, "data": {"greeting": "hello from a configmap"}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
    let marker = node.root_dir.join("prestop");
    std::fs::create_dir_all(&marker).unwrap();
    create_pod(
        &api,
        json!({
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "terminationGracePeriodSeconds": 20,
                "initContainers": [
                    {"name": "first", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                     "command": ["sh", "-c", "echo first > /www/order"],
                     "volumeMounts": [{"name": "www", "mountPath": "/www"}]},
                    {"name": "second", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                     "command": ["sh", "-c", "echo second >> /www/order"],
                     "volumeMounts": [{"name": "www", "mountPath": "/www"}]},
                ],
                "containers": [{
                    "name": "httpd", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c"],
                    "args": ["cat /etc/resolv.conf > /www/resolv; echo \"$POD_NAME $(GREETING) $MESSAGE\" > /www/env; \
                              cp /site/greeting /www/greeting; httpd -p 8080 -h /www; \
                              trap 'echo stopped > /marker/sigterm; exit 0' TERM; while true; do sleep 1; done"],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "site", "key": "greeting"}}},
                        {"name": "MESSAGE", "value": "says $(POD_NAME)"},
                    ],
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/env", "port": 8080}, "periodSeconds": 1},
                    "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", "echo ran > /marker/prestop"]}}},
                    "volumeMounts": [
                        {"name": "www", "mountPath": "/www"},
                        {"name": "site", "mountPath": "/site", "readOnly": true},
                        {"name": "marker", "mountPath": "/marker"},
                    ],
                }],
                "volumes": [
                    {"name": "www", "emptyDir": {}},
                    {"name": "site", "configMap": {"name": "site"}},
                    {"name": "marker", "hostPath": {"path": marker.display().to_string()}},
                ],
            }
        }),
    );
    let pod = wait_pod(&api, &node, "web", 90, "the pod turns Ready", |p| {
        condition(p, "Ready") == "True"
    });
    assert_eq!(pod["status"]["phase"], "Running");
    let ip = pod["status"]["podIP"].as_str().unwrap().to_string();
    assert!(
        ip.starts_with("10.244.40."),
        "the pod's IP is from the node's pod CIDR: {ip}"
    );
    assert_eq!(pod["status"]["hostIP"], NODE_IP.to_string());
    let httpd = container_status(&pod, 0);
    assert_eq!(httpd["ready"], true);
    assert!(httpd["containerID"]
        .as_str()
        .unwrap()
        .starts_with("containerd://"));
    assert!(
        httpd["imageID"].as_str().unwrap().starts_with("sha256:"),
        "{httpd}"
    );
    assert!(httpd["state"]["running"]["startedAt"].is_string());
    let init = &pod["status"]["initContainerStatuses"];
    assert_eq!(init[0]["state"]["terminated"]["reason"], "Completed");
    assert_eq!(init[1]["state"]["terminated"]["exitCode"], 0);
    for c in ["Initialized", "ContainersReady", "PodScheduled"] {
        assert_eq!(condition(&pod, c), "True", "{c}");
    }
    let listed = api
        .kubectl_ok(&["get", "pod", "web", "--no-headers", "-o", "wide"])
        .unwrap();
    assert!(
        listed.contains("1/1") && listed.contains("Running") && listed.contains(&ip),
        "{listed}"
    );

    let url = |file: &str| format!("http://{ip}:8080/{file}");
    assert_eq!(
        fetch(&node, &url("order")).unwrap(),
        "first\nsecond\n",
        "init containers ran in order"
    );
    assert_eq!(
        fetch(&node, &url("env")).unwrap().trim(),
        "web hello from a configmap says web"
    );
    assert_eq!(
        fetch(&node, &url("greeting")).unwrap(),
        "hello from a configmap"
    );
    let resolv = fetch(&node, &url("resolv")).unwrap();
    assert!(
        resolv.contains(&format!("nameserver {CLUSTER_DNS}")),
        "{resolv}"
    );
    assert!(
        resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "{resolv}"
    );
    assert!(resolv.contains("options ndots:5"), "{resolv}");
    let events: Vec<String> = events_of(&api, "web").into_iter().map(|e| e.0).collect();
    for reason in ["Pulled", "Created", "Started"] {
        assert!(
            events.iter().any(|e| e == reason),
            "a {reason} event: {events:?}"
        );
    }

    // Deletion: the preStop hook, then SIGTERM, which the container honours well within its
    // grace period; the kubelet then lets the API object go and the address is released.
    api.kubectl_ok(&["delete", "pod", "web", "--wait=false"])
        .unwrap();
    node.wait(
        Duration::from_secs(30),
        "the deleted pod leaves the API",
        || get_pod(&api, "web").is_none(),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(marker.join("prestop")).unwrap(),
        "ran\n"
    );
    assert_eq!(
        std::fs::read_to_string(marker.join("sigterm")).unwrap(),
        "stopped\n"
    );
    node.wait(
        Duration::from_secs(10),
        "the pod's address is released",
        || allocated(&node.dirs.data()).is_empty(),
    )
    .unwrap();
    assert!(
        fetch(&node, &url("env")).is_none(),
        "nothing answers at the pod's address"
    );
}

#[test]
fn probes_and_crash_loops_show_in_the_pod_status() {
    let (_etcd, api) = cluster();
    let node = node(&api);
    // Ready while /tmp/ready exists (4 s), then not: the readiness probe turns Ready off.
    create_pod(
        &api,
        json!({
            "metadata": {"name": "flips"},
            "spec": {"containers": [{
                "name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "touch /tmp/ready; sleep 4; rm /tmp/ready; exec sleep 3600"],
                "readinessProbe": {"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1},
                "livenessProbe": {"tcpSocket": {"port": 9}, "initialDelaySeconds": 600},
            }]}
        }),
    );
    // Never alive: the liveness probe kills it and it restarts.
    create_pod(
        &api,
        json!({
            "metadata": {"name": "unhealthy"},
            "spec": {"containers": [{
                "name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["sleep", "3600"],
                "livenessProbe": {"exec": {"command": ["test", "-f", "/tmp/alive"]}, "periodSeconds": 1, "failureThreshold": 2},
            }], "terminationGracePeriodSeconds": 1}
        }),
    );
    // Exits at once: a crash loop with back-off.
    create_pod(
        &api,
        json!({
            "metadata": {"name": "crashes"},
            "spec": {"containers": [{
                "name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "exit 3"],
            }]}
        }),
    );
    wait_pod(
        &api,
        &node,
        "flips",
        60,
        "the readiness probe turns the pod Ready",
        |p| condition(p, "Ready") == "True",
    );
    let not_ready = wait_pod(
        &api,
        &node,
        "flips",
        30,
        "the readiness probe turns Ready off",
        |p| condition(p, "Ready") == "False",
    );
    assert_eq!(not_ready["status"]["phase"], "Running");
    assert_eq!(container_status(&not_ready, 0)["ready"], false);
    assert_eq!(
        container_status(&not_ready, 0)["restartCount"],
        0,
        "readiness failures do not restart"
    );

    let restarted = wait_pod(
        &api,
        &node,
        "unhealthy",
        60,
        "the liveness probe restarts the container",
        |p| container_status(p, 0)["restartCount"].as_i64() >= Some(1),
    );
    assert!(
        container_status(&restarted, 0)["lastState"]["terminated"].is_object(),
        "{restarted}"
    );
    let events = events_of(&api, "unhealthy");
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Unhealthy" && m.starts_with("Liveness probe failed")),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Killing" && m.contains("failed liveness probe")),
        "{events:?}"
    );

    let looping = wait_pod(
        &api,
        &node,
        "crashes",
        60,
        "the crashing container backs off",
        |p| container_status(p, 0)["state"]["waiting"]["reason"] == "CrashLoopBackOff",
    );
    let c = container_status(&looping, 0);
    assert_eq!(c["lastState"]["terminated"]["exitCode"], 3);
    assert_eq!(c["lastState"]["terminated"]["reason"], "Error");
    assert!(c["restartCount"].as_i64().unwrap() >= 1);
    assert!(
        c["state"]["waiting"]["message"]
            .as_str()
            .unwrap()
            .starts_with("back-off 10s restarting failed container=c pod=crashes_default"),
        "{c}"
    );
    let listed = api
        .kubectl_ok(&["get", "pod", "crashes", "--no-headers"])
        .unwrap();
    assert!(
        listed.contains("CrashLoopBackOff"),
        "kubectl shows the back-off: {listed}"
    );

    // restartPolicy Never: a failing container fails the pod, and its sandbox goes.
    create_pod(
        &api,
        json!({
            "metadata": {"name": "once"},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["sh", "-c", "exit 1"],
            }]}
        }),
    );
    let failed = wait_pod(&api, &node, "once", 60, "the pod fails", |p| {
        p["status"]["phase"] == "Failed"
    });
    assert_eq!(
        container_status(&failed, 0)["state"]["terminated"]["exitCode"],
        1
    );
    assert_eq!(container_status(&failed, 0)["restartCount"], 0);
}

#[test]
fn bad_pods_get_a_clear_status_and_disturb_nothing_else() {
    let (_etcd, api) = cluster();
    let node = node(&api);
    create_pod(
        &api,
        json!({"metadata": {"name": "good"}, "spec": {"containers": [{
            "name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]}}),
    );
    create_pod(
        &api,
        json!({"metadata": {"name": "noimage"}, "spec": {"containers": [{
            "name": "c", "image": "seine.local/missing:1.0", "command": ["true"]}]}}),
    );
    create_pod(
        &api,
        json!({"metadata": {"name": "nfs"}, "spec": {
            "containers": [{"name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["true"]}],
            "volumes": [{"name": "remote", "nfs": {"server": "192.0.2.1", "path": "/export"}}]}}),
    );
    wait_pod(&api, &node, "good", 60, "the good pod runs", |p| {
        condition(p, "Ready") == "True"
    });

    let pulled = wait_pod(
        &api,
        &node,
        "noimage",
        60,
        "the missing image is reported",
        |p| {
            let reason = container_status(p, 0)["state"]["waiting"]["reason"].clone();
            reason == "ErrImagePull" || reason == "ImagePullBackOff"
        },
    );
    let message = container_status(&pulled, 0)["state"]["waiting"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("seine.local/missing:1.0"), "{message}");
    wait_pod(&api, &node, "noimage", 60, "the pull backs off", |p| {
        container_status(p, 0)["state"]["waiting"]["reason"] == "ImagePullBackOff"
    });
    let events = events_of(&api, "noimage");
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Failed" && m.contains("Failed to pull image")),
        "{events:?}"
    );

    let mount = wait_pod(
        &api,
        &node,
        "nfs",
        30,
        "the unknown volume is reported",
        |p| {
            container_status(p, 0)["state"]["waiting"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("unsupported volume type"))
        },
    );
    assert_eq!(mount["status"]["phase"], "Pending");
    let events = events_of(&api, "nfs");
    assert!(events.iter().any(|(r, _)| r == "FailedMount"), "{events:?}");

    let good = get_pod(&api, "good").unwrap();
    assert_eq!(condition(&good, "Ready"), "True");
    assert_eq!(container_status(&good, 0)["restartCount"], 0);
}

#[test]
fn a_restarted_kubelet_adopts_the_running_pods() {
    let (_etcd, api) = cluster();
    let mut node = node(&api);
    create_pod(
        &api,
        json!({"metadata": {"name": "steady"}, "spec": {"containers": [{
            "name": "c", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent", "command": ["sleep", "3600"]}]}}),
    );
    let before = wait_pod(&api, &node, "steady", 60, "the pod runs", |p| {
        condition(p, "Ready") == "True"
    });
    let id = container_status(&before, 0)["containerID"].clone();
    assert!(node.stop_kubelet().unwrap().success());
    node.start_kubelet().unwrap();
    // The new kubelet writes its own view: the same container, not restarted.
    node.wait(Duration::from_secs(20), "the new kubelet reports", || {
        node.kubelet_log()
            .matches("adopted the running pod")
            .count()
            >= 1
    })
    .unwrap();
    let after = wait_pod(&api, &node, "steady", 20, "the pod stays Ready", |p| {
        condition(p, "Ready") == "True"
    });
    assert_eq!(
        container_status(&after, 0)["containerID"],
        id,
        "the same container runs on"
    );
    assert_eq!(container_status(&after, 0)["restartCount"], 0);
    assert_eq!(after["status"]["podIP"], before["status"]["podIP"]);

    // A pod deleted while the kubelet is down is cleaned up when it comes back.
    assert!(node.stop_kubelet().unwrap().success());
    let (code, _) = api
        .delete(&pod_path("steady"), Some(&json!({"gracePeriodSeconds": 0})))
        .unwrap();
    assert_eq!(code, 200);
    node.start_kubelet().unwrap();
    node.wait(
        Duration::from_secs(30),
        "the orphaned sandbox is removed",
        || allocated(&node.dirs.data()).is_empty(),
    )
    .unwrap();
}

#[test]
fn static_pods_run_from_files_and_show_as_mirror_pods() {
    let (_etcd, api) = cluster();
    let node = node(&api);
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: {{app: web}}\nspec:\n  terminationGracePeriodSeconds: 3\n  containers:\n  - name: httpd\n    image: {BUSYBOX_IMAGE}\n    imagePullPolicy: IfNotPresent\n    command: [sh, -c, 'echo static > /tmp/index.html; exec httpd -f -p 8080 -h /tmp']\n    readinessProbe: {{httpGet: {{path: /index.html, port: 8080}}, periodSeconds: 1}}\n"
    );
    std::fs::write(node.manifests().join("web.yaml"), &manifest).unwrap();

    // The mirror pod: named for the node, owned by it, with the static pod's status.
    let mirror = wait_pod(
        &api,
        &node,
        "web-node-1",
        60,
        "the mirror pod turns Ready",
        |p| condition(p, "Ready") == "True",
    );
    let annotations = &mirror["metadata"]["annotations"];
    assert_eq!(annotations["kubernetes.io/config.source"], "file");
    let hash = annotations["kubernetes.io/config.mirror"].as_str().unwrap();
    assert_eq!(annotations["kubernetes.io/config.hash"], hash);
    let owner = &mirror["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["name"].as_str()),
        (Some("Node"), Some("node-1"))
    );
    assert_eq!(mirror["spec"]["nodeName"], "node-1");
    let ip = mirror["status"]["podIP"].as_str().unwrap().to_string();
    assert_eq!(
        fetch(&node, &format!("http://{ip}:8080/index.html")).unwrap(),
        "static\n"
    );
    let listed = api
        .kubectl_ok(&["get", "pod", "web-node-1", "--no-headers"])
        .unwrap();
    assert!(
        listed.contains("1/1") && listed.contains("Running"),
        "{listed}"
    );
    let container = container_status(&mirror, 0)["containerID"].clone();
    // The files are read every second; an unchanged file leaves the pod's status as it was.
    let ready_since = |p: &Value| {
        p["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["lastTransitionTime"].clone())
    };
    std::thread::sleep(Duration::from_secs(3));
    let later = get_pod(&api, "web-node-1").unwrap();
    assert_eq!(
        ready_since(&later),
        ready_since(&mirror),
        "re-reading an unchanged file changes nothing: {} then {}",
        mirror["status"],
        later["status"]
    );

    // Deleting the mirror pod does not stop the static pod: the kubelet makes the mirror again.
    let first_uid = mirror["metadata"]["uid"].clone();
    api.kubectl_ok(&["delete", "pod", "web-node-1", "--wait=false"])
        .unwrap();
    let again = wait_pod(
        &api,
        &node,
        "web-node-1",
        30,
        "the mirror pod is made again",
        |p| p["metadata"]["uid"] != first_uid && condition(p, "Ready") == "True",
    );
    assert_eq!(
        container_status(&again, 0)["containerID"],
        container,
        "the same container runs on"
    );
    assert_eq!(container_status(&again, 0)["restartCount"], 0);

    // An invalid file is told of on the Node and disturbs nothing else.
    std::fs::write(
        node.manifests().join("broken.yaml"),
        "kind: Pod\nmetadata: [",
    )
    .unwrap();
    node.wait(
        Duration::from_secs(20),
        "the invalid manifest is reported",
        || {
            events_of(&api, "node-1").iter().any(|(reason, message)| {
                reason == "FailedToParseStaticPod" && message.contains("broken.yaml")
            })
        },
    )
    .unwrap();
    let still = get_pod(&api, "web-node-1").unwrap();
    assert_eq!(container_status(&still, 0)["containerID"], container);

    // An edited file is a new pod: the old one stops, then the new one runs.
    std::fs::write(
        node.manifests().join("web.yaml"),
        manifest.replace("echo static", "echo edited"),
    )
    .unwrap();
    let edited = wait_pod(
        &api,
        &node,
        "web-node-1",
        60,
        "the edited static pod runs",
        |p| {
            p["metadata"]["annotations"]["kubernetes.io/config.mirror"].as_str() != Some(hash)
                && condition(p, "Ready") == "True"
        },
    );
    let ip = edited["status"]["podIP"].as_str().unwrap().to_string();
    assert_eq!(
        fetch(&node, &format!("http://{ip}:8080/index.html")).unwrap(),
        "edited\n"
    );

    // Removing the file stops the pod and removes its mirror.
    std::fs::remove_file(node.manifests().join("web.yaml")).unwrap();
    node.wait(
        Duration::from_secs(60),
        "the static pod and its mirror go",
        || get_pod(&api, "web-node-1").is_none() && allocated(&node.dirs.data()).is_empty(),
    )
    .unwrap();
}
