//! seine-scheduler against a real etcd and seine-apiserver, as a user sees it: where `kubectl get
//! pod` says each pod runs, the FailedScheduling warnings in kube-scheduler's words, the
//! PodScheduled condition, pods placed once the cluster changes to fit them, a Service's pods
//! spread over the nodes, topology spread constraints over zones, and a standby replica taking
//! over from a stopped leader.
//!
//! Nodes only ever change to admit more pods while pods are pending, so that no placement
//! depends on how soon the scheduler sees a change.

use std::{collections::BTreeMap, time::Duration};

use seine_tests::{
    apiserver::ApiServer,
    controllers::{Cluster, Daemon},
    etcd::Etcd,
    wait_until,
};
use serde_json::{json, Value};

/// Etcd and the API server, `setup` (the Nodes, Services, ... there before the scheduler
/// starts, so that its first decisions already see them), then the scheduler.
fn cluster(setup: impl FnOnce(&ApiServer)) -> Cluster {
    Cluster::start("seine-scheduler", &["--leader-elect=false"], setup).unwrap()
}

/// A Node with its kubelet's report: capacity and allocatable, and the Ready condition.
struct NodeSpec {
    cpu: &'static str,
    memory: &'static str,
    pods: &'static str,
    ready: &'static str,
    labels: Value,
    spec: Value,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            cpu: "4",
            memory: "8Gi",
            pods: "110",
            ready: "True",
            labels: json!({}),
            spec: json!({}),
        }
    }
}

fn add_node(api: &ApiServer, name: &str, node: NodeSpec) {
    let mut labels = node.labels;
    labels["kubernetes.io/hostname"] = name.into();
    let (code, out) = api
        .post(
            "/api/v1/nodes",
            &json!({"metadata": {"name": name, "labels": labels}, "spec": node.spec}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
    set_node_status(api, name, node.cpu, node.memory, node.pods, node.ready);
}

fn set_node_status(api: &ApiServer, name: &str, cpu: &str, memory: &str, pods: &str, ready: &str) {
    let resources = json!({"cpu": cpu, "memory": memory, "pods": pods});
    let status = json!({"status": {"capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": ready, "reason": "KubeletReady",
                        "message": "kubelet is posting ready status"}]}});
    let (code, out) = api
        .merge_patch(&format!("/api/v1/nodes/{name}/status"), &status)
        .unwrap();
    assert_eq!(code, 200, "{out}");
}

/// Creates a pod in `default` with one container; `extra` is merged into its spec.
fn add_pod(api: &ApiServer, name: &str, labels: Value, extra: Value) {
    let mut spec = json!({"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
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

/// A container asking for `requests`.
fn requesting(requests: Value) -> Value {
    json!({"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10",
                           "resources": {"requests": requests}}]})
}

fn kubectl(api: &ApiServer, args: &[&str]) -> String {
    api.kubectl_ok(args).unwrap().trim().to_string()
}

fn pod_field(api: &ApiServer, pod: &str, jsonpath: &str) -> String {
    kubectl(
        api,
        &[
            "get",
            "pod",
            pod,
            "-n",
            "default",
            "-o",
            &format!("jsonpath={jsonpath}"),
        ],
    )
}

/// The node `kubectl get pod` shows the pod on, once it has one.
fn node_of(c: &Cluster, pod: &str) -> String {
    bound_node(&c.api, &c.daemon, pod)
}

/// The same against `scheduler`'s API server; its log if the pod is never bound.
fn bound_node(api: &ApiServer, scheduler: &Daemon, pod: &str) -> String {
    let mut node = String::new();
    let bound = wait_until(Duration::from_secs(20), || {
        node = pod_field(api, pod, "{.spec.nodeName}");
        !node.is_empty()
    });
    assert!(
        bound.is_ok(),
        "pod {pod} was not bound; FailedScheduling: {:?}\nscheduler log:\n{}",
        messages(api, pod, "FailedScheduling"),
        scheduler.log_text()
    );
    node
}

/// The messages of the pod's events with `reason`, oldest first.
fn messages(api: &ApiServer, pod: &str, reason: &str) -> Vec<String> {
    let selector = format!("involvedObject.name={pod},reason={reason}");
    kubectl(
        api,
        &[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            &selector,
            "--sort-by=.firstTimestamp",
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ],
    )
    .lines()
    .map(str::to_string)
    .collect()
}

/// Waits for a FailedScheduling event of the pod saying `expected` (an earlier attempt may
/// have seen a node before its kubelet report).
fn expect_failed_scheduling(c: &Cluster, pod: &str, expected: &str) {
    let mut seen = Vec::new();
    let found = wait_until(Duration::from_secs(20), || {
        seen = messages(&c.api, pod, "FailedScheduling");
        seen.iter().any(|m| m == expected)
    });
    if found.is_err() {
        assert_eq!(
            seen.last()
                .map(String::as_str)
                .unwrap_or("<no FailedScheduling event>"),
            expected,
            "pod {pod}; scheduler log:\n{}",
            c.daemon.log_text()
        );
    }
    assert_eq!(
        pod_field(&c.api, pod, "{.spec.nodeName}"),
        "",
        "{pod} is not bound"
    );
}

fn force_delete(api: &ApiServer, pod: &str) {
    kubectl(
        api,
        &[
            "delete",
            "pod",
            pod,
            "-n",
            "default",
            "--grace-period=0",
            "--force",
            "--wait=false",
        ],
    );
}

#[test]
fn readiness_cordons_and_taints_keep_pods_off_unless_tolerated() {
    let c = cluster(|api| {
        add_node(
            api,
            "down",
            NodeSpec {
                cpu: "8",
                ready: "False",
                ..Default::default()
            },
        );
        add_node(
            api,
            "gone",
            NodeSpec {
                cpu: "8",
                ready: "Unknown",
                ..Default::default()
            },
        );
        let cordon = json!({"unschedulable": true});
        add_node(
            api,
            "cordoned",
            NodeSpec {
                cpu: "8",
                spec: cordon,
                ..Default::default()
            },
        );
        let taint =
            json!({"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]});
        add_node(
            api,
            "dedicated",
            NodeSpec {
                cpu: "8",
                spec: taint,
                ..Default::default()
            },
        );
        add_node(
            api,
            "plain",
            NodeSpec {
                cpu: "2",
                ..Default::default()
            },
        );
    });

    for i in 0..4 {
        add_pod(
            &c.api,
            &format!("web-{i}"),
            json!({"app": "web"}),
            json!({}),
        );
    }
    for i in 0..4 {
        assert_eq!(node_of(&c, &format!("web-{i}")), "plain");
    }

    // Three CPUs fit only the nodes that are not ready, cordoned or tainted.
    let big = requesting(json!({"cpu": "3"}));
    add_pod(&c.api, "big", json!({}), big.clone());
    expect_failed_scheduling(
        &c,
        "big",
        "0/5 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: gpu}, \
         1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, \
         1 node(s) had untolerated taint {node.kubernetes.io/unreachable: }, \
         1 node(s) were unschedulable. preemption: 0/5 nodes are available: \
         5 Preemption is not helpful for scheduling.",
    );

    // Tolerating the taint opens the dedicated node.
    let mut tolerant = big.clone();
    tolerant["tolerations"] =
        json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]);
    add_pod(&c.api, "big-tolerant", json!({}), tolerant);
    assert_eq!(node_of(&c, "big-tolerant"), "dedicated");

    // The node that was not ready reports Ready: the waiting pod goes there.
    set_node_status(&c.api, "down", "8", "8Gi", "110", "True");
    assert_eq!(node_of(&c, "big"), "down");
}

#[test]
fn requests_count_against_allocatable_and_freed_resources_are_used() {
    let c = cluster(|api| {
        add_node(
            api,
            "a",
            NodeSpec {
                cpu: "2",
                memory: "4Gi",
                pods: "2",
                ..Default::default()
            },
        );
        add_node(
            api,
            "b",
            NodeSpec {
                cpu: "1",
                memory: "2Gi",
                ..Default::default()
            },
        );
    });

    add_pod(
        &c.api,
        "cpu-a",
        json!({}),
        requesting(json!({"cpu": "1500m"})),
    );
    assert_eq!(node_of(&c, "cpu-a"), "a");
    add_pod(&c.api, "cpu-b", json!({}), requesting(json!({"cpu": "1"})));
    assert_eq!(node_of(&c, "cpu-b"), "b");

    add_pod(
        &c.api,
        "too-much",
        json!({}),
        requesting(json!({"cpu": "600m"})),
    );
    expect_failed_scheduling(
        &c,
        "too-much",
        "0/2 nodes are available: 2 Insufficient cpu. preemption: 0/2 nodes are available: \
         2 No preemption victims found for incoming pod.",
    );
    // More memory than either node has at all: evicting pods would not help.
    add_pod(
        &c.api,
        "huge",
        json!({}),
        requesting(json!({"memory": "5Gi"})),
    );
    expect_failed_scheduling(
        &c,
        "huge",
        "0/2 nodes are available: 2 Insufficient memory. preemption: 0/2 nodes are available: \
         2 Preemption is not helpful for scheduling.",
    );

    add_pod(
        &c.api,
        "small",
        json!({}),
        requesting(json!({"cpu": "100m"})),
    );
    assert_eq!(node_of(&c, "small"), "a");
    add_pod(
        &c.api,
        "small-2",
        json!({}),
        requesting(json!({"cpu": "100m"})),
    );
    expect_failed_scheduling(
        &c,
        "small-2",
        "0/2 nodes are available: 1 Insufficient cpu, 1 Too many pods. preemption: \
         0/2 nodes are available: 2 No preemption victims found for incoming pod.",
    );

    // Deleting a pod frees its CPU: both pods waiting for some go to that node.
    force_delete(&c.api, "cpu-b");
    assert_eq!(node_of(&c, "small-2"), "b");
    assert_eq!(node_of(&c, "too-much"), "b");
    assert_eq!(pod_field(&c.api, "huge", "{.spec.nodeName}"), "");
}

#[test]
fn node_selector_and_required_node_affinity_pick_nodes_by_label() {
    let c = cluster(|api| {
        for (name, disk, zone) in [
            ("ssd-a", "ssd", "a"),
            ("ssd-b", "ssd", "b"),
            ("hdd", "hdd", "a"),
        ] {
            let labels = json!({"disk": disk, "zone": zone});
            add_node(
                api,
                name,
                NodeSpec {
                    labels,
                    ..Default::default()
                },
            );
        }
    });

    for i in 0..3 {
        add_pod(
            &c.api,
            &format!("sel-{i}"),
            json!({}),
            json!({"nodeSelector": {"disk": "hdd"}}),
        );
    }
    let affinity = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "disk", "operator": "In", "values": ["ssd"]},
            {"key": "zone", "operator": "NotIn", "values": ["a"]}]}]}}}});
    for i in 0..3 {
        add_pod(&c.api, &format!("aff-{i}"), json!({}), affinity.clone());
    }
    for i in 0..3 {
        assert_eq!(node_of(&c, &format!("sel-{i}")), "hdd");
        assert_eq!(node_of(&c, &format!("aff-{i}")), "ssd-b");
    }

    add_pod(
        &c.api,
        "nvme",
        json!({}),
        json!({"nodeSelector": {"disk": "nvme"}}),
    );
    expect_failed_scheduling(
        &c,
        "nvme",
        "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. \
         preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling.",
    );
    // A node relabelled to match: the waiting pod goes there.
    kubectl(
        &c.api,
        &["label", "node", "hdd", "disk=nvme", "--overwrite"],
    );
    assert_eq!(node_of(&c, "nvme"), "hdd");
}

#[test]
fn required_anti_affinity_on_hostname_keeps_replicas_on_separate_nodes() {
    let c = cluster(|api| {
        for n in ["n1", "n2", "n3"] {
            add_node(api, n, NodeSpec::default());
        }
    });
    let anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
    for i in 0..3 {
        add_pod(
            &c.api,
            &format!("db-{i}"),
            json!({"app": "db"}),
            anti.clone(),
        );
    }
    let mut nodes: Vec<String> = (0..3).map(|i| node_of(&c, &format!("db-{i}"))).collect();
    let db0 = nodes[0].clone();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3"], "one replica per node");

    add_pod(&c.api, "db-3", json!({"app": "db"}), anti);
    expect_failed_scheduling(
        &c,
        "db-3",
        "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules. preemption: \
         0/3 nodes are available: 3 No preemption victims found for incoming pod.",
    );
    // A pod the replicas' terms select is kept away from them too.
    add_pod(&c.api, "intruder", json!({"app": "db"}), json!({}));
    expect_failed_scheduling(
        &c,
        "intruder",
        "0/3 nodes are available: 3 node(s) didn't satisfy existing pods anti-affinity rules. \
         preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod.",
    );
    force_delete(&c.api, "intruder");

    // A replica gone: the waiting one takes its node.
    force_delete(&c.api, "db-0");
    assert_eq!(node_of(&c, "db-3"), db0);
}

#[test]
fn host_ports_are_taken_once_per_node_and_protocol() {
    let c = cluster(|api| {
        add_node(api, "a", NodeSpec::default());
        add_node(api, "b", NodeSpec::default());
    });
    let port = |protocol: &str| {
        json!({"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10",
            "ports": [{"containerPort": 53, "hostPort": 5353, "protocol": protocol}]}]})
    };
    add_pod(&c.api, "dns-0", json!({}), port("UDP"));
    add_pod(&c.api, "dns-1", json!({}), port("UDP"));
    let first = node_of(&c, "dns-0");
    let second = node_of(&c, "dns-1");
    assert_ne!(first, second, "one per node");

    add_pod(&c.api, "dns-2", json!({}), port("UDP"));
    expect_failed_scheduling(
        &c,
        "dns-2",
        "0/2 nodes are available: 2 node(s) didn't have free ports for the requested pod ports. \
         preemption: 0/2 nodes are available: 2 No preemption victims found for incoming pod.",
    );
    // The same port over TCP is free on both.
    add_pod(&c.api, "tcp", json!({}), port("TCP"));
    assert!(["a", "b"].contains(&node_of(&c, "tcp").as_str()));

    force_delete(&c.api, "dns-0");
    assert_eq!(node_of(&c, "dns-2"), first);
}

#[test]
fn an_unplaceable_pod_gets_kube_schedulers_warning_and_is_bound_once_a_node_fits() {
    let c = cluster(|api| {
        add_node(
            api,
            "a",
            NodeSpec {
                labels: json!({"disk": "hdd"}),
                ..Default::default()
            },
        );
        for n in ["b", "c"] {
            let labels = json!({"disk": "ssd"});
            add_node(
                api,
                n,
                NodeSpec {
                    labels,
                    ready: "Unknown",
                    ..Default::default()
                },
            );
        }
    });
    add_pod(
        &c.api,
        "web",
        json!({"app": "web"}),
        json!({"nodeSelector": {"disk": "ssd"}}),
    );
    let message = "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, \
                   2 node(s) had untolerated taint {node.kubernetes.io/unreachable: }. preemption: \
                   0/3 nodes are available: 3 Preemption is not helpful for scheduling.";
    expect_failed_scheduling(&c, "web", message);
    let event = kubectl(
        &c.api,
        &[
            "get", "events", "-n", "default", "--field-selector",
            "involvedObject.name=web,reason=FailedScheduling", "-o",
            "jsonpath={.items[0].type} {.items[0].source.component} {.items[0].reportingComponent} {.items[0].involvedObject.kind}",
        ],
    );
    assert_eq!(event, "Warning default-scheduler default-scheduler Pod");
    let mut condition = String::new();
    let expected = format!("False Unschedulable {message}");
    let set = wait_until(Duration::from_secs(10), || {
        condition = pod_field(
            &c.api,
            "web",
            "{.status.conditions[?(@.type==\"PodScheduled\")].status} \
             {.status.conditions[?(@.type==\"PodScheduled\")].reason} \
             {.status.conditions[?(@.type==\"PodScheduled\")].message}",
        );
        condition == expected
    });
    assert!(set.is_ok(), "PodScheduled condition: {condition:?}");

    // A Node that fits registers: the pod is bound to it and says so.
    add_node(
        &c.api,
        "d",
        NodeSpec {
            labels: json!({"disk": "ssd"}),
            ..Default::default()
        },
    );
    assert_eq!(node_of(&c, "web"), "d");
    let mut scheduled = Vec::new();
    let announced = wait_until(Duration::from_secs(10), || {
        scheduled = messages(&c.api, "web", "Scheduled");
        !scheduled.is_empty()
    });
    assert!(announced.is_ok(), "no Scheduled event");
    assert_eq!(scheduled, ["Successfully assigned default/web to d"]);
    assert_eq!(
        pod_field(
            &c.api,
            "web",
            "{.status.conditions[?(@.type==\"PodScheduled\")].status}"
        ),
        "True"
    );

    // A pod for another scheduler is left alone.
    add_pod(
        &c.api,
        "other",
        json!({}),
        json!({"schedulerName": "someone-else"}),
    );
    add_pod(&c.api, "after", json!({}), json!({}));
    node_of(&c, "after");
    assert_eq!(pod_field(&c.api, "other", "{.spec.nodeName}"), "");
    assert!(messages(&c.api, "other", "FailedScheduling").is_empty());

    let (_, metrics) = c.daemon.http("/metrics").unwrap();
    assert!(
        metrics.contains("scheduler_schedule_attempts_total{result=\"unschedulable\",profile=\"default-scheduler\"}"),
        "{metrics}"
    );
}

#[test]
fn a_services_pods_spread_over_nodes_the_least_allocated_would_not_choose() {
    let c = cluster(|api| {
        add_node(
            api,
            "large",
            NodeSpec {
                cpu: "64",
                memory: "256Gi",
                ..Default::default()
            },
        );
        add_node(
            api,
            "small-1",
            NodeSpec {
                cpu: "2",
                memory: "4Gi",
                ..Default::default()
            },
        );
        add_node(
            api,
            "small-2",
            NodeSpec {
                cpu: "2",
                memory: "4Gi",
                ..Default::default()
            },
        );
        let service = json!({"metadata": {"name": "web"},
                             "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}});
        let (code, out) = api
            .post("/api/v1/namespaces/default/services", &service)
            .unwrap();
        assert_eq!(code, 201, "{out}");
    });
    // Pods of no Service all go to the large node, the least allocated.
    for i in 0..3 {
        add_pod(
            &c.api,
            &format!("batch-{i}"),
            json!({"app": "batch"}),
            json!({}),
        );
        assert_eq!(node_of(&c, &format!("batch-{i}")), "large");
    }
    // The Service's pods spread: two per node.
    for i in 0..6 {
        add_pod(
            &c.api,
            &format!("web-{i}"),
            json!({"app": "web"}),
            json!({}),
        );
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..6 {
        *per_node
            .entry(node_of(&c, &format!("web-{i}")))
            .or_default() += 1;
    }
    assert_eq!(
        per_node,
        BTreeMap::from([
            ("large".into(), 2),
            ("small-1".into(), 2),
            ("small-2".into(), 2)
        ])
    );
}

#[test]
fn do_not_schedule_topology_spread_evens_out_zones_and_needs_the_key_on_nodes() {
    let c = cluster(|api| {
        for (name, zone) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
            let labels = json!({"topology.kubernetes.io/zone": zone});
            add_node(
                api,
                name,
                NodeSpec {
                    labels,
                    ..Default::default()
                },
            );
        }
    });
    let spread = |key: &str| {
        json!({"topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": key,
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}]})
    };
    // Created together: each decision counts the pods assumed before it.
    for i in 0..4 {
        add_pod(
            &c.api,
            &format!("web-{i}"),
            json!({"app": "web"}),
            spread("topology.kubernetes.io/zone"),
        );
    }
    let mut per_zone: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..4 {
        let node = node_of(&c, &format!("web-{i}"));
        *per_zone
            .entry(if node == "b1" { "b" } else { "a" })
            .or_default() += 1;
    }
    assert_eq!(per_zone, BTreeMap::from([("a", 2), ("b", 2)]));

    add_pod(
        &c.api,
        "racked",
        json!({"app": "web"}),
        spread("example.com/rack"),
    );
    expect_failed_scheduling(
        &c,
        "racked",
        "0/3 nodes are available: 3 node(s) didn't match pod topology spread constraints \
         (missing required label). preemption: 0/3 nodes are available: \
         3 Preemption is not helpful for scheduling.",
    );
}

#[test]
fn a_standby_replica_takes_over_when_the_leader_stops() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    add_node(&api, "n1", NodeSpec::default());
    let flags = [
        "--leader-elect-lease-duration=3s",
        "--leader-elect-renew-deadline=2s",
        "--leader-elect-retry-period=200ms",
    ];
    let a = Daemon::scheduler(&api, &flags).unwrap();
    let b = Daemon::scheduler(&api, &flags).unwrap();
    wait_until(Duration::from_secs(20), || a.leads() || b.leads()).unwrap();
    let (mut leader, standby) = if a.leads() { (a, b) } else { (b, a) };
    assert!(!standby.leads(), "one leader at a time");
    let holder = |api: &ApiServer| {
        kubectl(
            api,
            &[
                "get",
                "lease",
                "kube-scheduler",
                "-n",
                "kube-system",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
        )
    };
    let first_holder = holder(&api);

    add_pod(&api, "before", json!({}), json!({}));
    assert_eq!(bound_node(&api, &leader, "before"), "n1");

    leader.process.stop().unwrap();
    let took_over = wait_until(Duration::from_secs(20), || standby.leads());
    assert!(
        took_over.is_ok(),
        "the standby did not take over:\n{}",
        standby.log_text()
    );
    assert_ne!(holder(&api), first_holder);
    add_pod(&api, "after", json!({}), json!({}));
    assert_eq!(bound_node(&api, &standby, "after"), "n1");
}
