//! What seine-apiserver does with objects, against a real etcd: ClusterIP and NodePort allocation
//! (also by two API servers on one etcd; dual-stack; ServiceCIDRs and IPAddresses), the
//! default/kubernetes service, pods' defaults, binding,
//! status subresource and graceful deletion, finalizers, terminating namespaces, strategic merge
//! patches from `kubectl apply` and `kubectl patch`, and validation errors with field causes.

use std::{collections::HashSet, net::Ipv4Addr, sync::Arc, thread};

use seine_tests::{apiserver::ApiServer, etcd::Etcd};
use serde_json::{json, Value};

const SVCS: &str = "/api/v1/namespaces/default/services";
const PODS: &str = "/api/v1/namespaces/default/pods";

fn service(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})
}

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
           "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}})
}

fn write_manifest(server: &ApiServer, name: &str, text: &str) -> String {
    let path = server.cert_dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn in_range(ip: &str, network: Ipv4Addr, prefix: u32) -> bool {
    let ip: Ipv4Addr = ip.parse().unwrap();
    let mask = u32::MAX << (32 - prefix);
    u32::from(ip) & mask == u32::from(network)
}

#[test]
fn services_get_cluster_ips_and_node_ports_from_their_ranges() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();

    // The first address is the kubernetes service's, which points at this API server.
    let (_, kubernetes) = server.get(&format!("{SVCS}/kubernetes")).unwrap();
    assert_eq!(kubernetes["spec"]["clusterIP"], "10.96.0.1");
    assert_eq!(kubernetes["spec"]["ports"][0]["port"], 443);
    let (_, endpoints) = server
        .get("/api/v1/namespaces/default/endpoints/kubernetes")
        .unwrap();
    assert_eq!(endpoints["subsets"][0]["addresses"][0]["ip"], "127.0.0.1");
    assert_eq!(
        endpoints["subsets"][0]["ports"][0]["port"],
        server.addr.port()
    );

    let (code, web) = server
        .post(
            SVCS,
            &service(
                "web",
                json!({"selector": {"app": "web"}, "ports": [{"port": 80}]}),
            ),
        )
        .unwrap();
    assert_eq!(code, 201, "{web}");
    let ip = web["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(in_range(&ip, Ipv4Addr::new(10, 96, 0, 0), 12), "{ip}");
    assert_ne!(ip, "10.96.0.1");
    assert_eq!(web["spec"]["clusterIPs"], json!([ip]));
    assert_eq!(web["spec"]["ports"][0]["targetPort"], 80);
    assert_eq!(web["spec"]["ports"][0]["protocol"], "TCP");

    // Asking for a taken address or port is the client's error, named by field.
    let (code, status) = server
        .post(
            SVCS,
            &service("copy", json!({"clusterIP": ip, "ports": [{"port": 80}]})),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("provided IP is already allocated"),
        "{status}"
    );
    let (code, np) = server
        .post(
            SVCS,
            &service(
                "np",
                json!({"type": "NodePort", "ports": [{"name": "a", "port": 80, "nodePort": 30080},
                                                     {"name": "b", "port": 81}]}),
            ),
        )
        .unwrap();
    assert_eq!(code, 201, "{np}");
    assert_eq!(np["spec"]["ports"][0]["nodePort"], 30080);
    let auto = np["spec"]["ports"][1]["nodePort"].as_i64().unwrap();
    assert!((30000..=32767).contains(&auto) && auto != 30080);
    let (code, status) = server
        .post(
            SVCS,
            &service(
                "np2",
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.ports[0].nodePort"
    );
    let (code, _) = server
        .post(
            SVCS,
            &service(
                "far",
                json!({"clusterIP": "192.168.0.1", "ports": [{"port": 80}]}),
            ),
        )
        .unwrap();
    assert_eq!(code, 422);

    // The address is fixed for the service's life.
    let (code, status) = server
        .merge_patch(
            &format!("{SVCS}/web"),
            &json!({"spec": {"clusterIP": "10.96.0.99"}}),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");
    // Turning NodePort into ClusterIP gives its ports back; deleting gives the address back.
    let (code, changed) = server
        .merge_patch(
            &format!("{SVCS}/np"),
            &json!({"spec": {"type": "ClusterIP", "ports": [{"name": "a", "port": 80}]}}),
        )
        .unwrap();
    assert_eq!(code, 200, "{changed}");
    assert!(changed["spec"]["ports"][0].get("nodePort").is_none());
    let (code, reused) = server
        .post(
            SVCS,
            &service(
                "np3",
                json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}),
            ),
        )
        .unwrap();
    assert_eq!(code, 201, "{reused}");
    server.delete(&format!("{SVCS}/web"), None).unwrap();
    let (code, again) = server
        .post(
            SVCS,
            &service("web2", json!({"clusterIP": ip, "ports": [{"port": 80}]})),
        )
        .unwrap();
    assert_eq!(code, 201, "{again}");

    let table = server
        .kubectl_ok(&["get", "services", "np3", "--no-headers"])
        .unwrap();
    assert!(table.contains("80:30080/TCP"), "{table}");
}

/// A seine-apiserver with an IPv4 and an IPv6 service range.
fn dual_stack_server(etcd: &Etcd) -> ApiServer {
    ApiServer::start_with(
        etcd,
        &[
            "--service-cluster-ip-range",
            "10.96.0.0/12,fd00:10:96::/112",
        ],
    )
    .unwrap()
}

/// Dual-stack Services as Kubernetes has them: one range per family, `ipFamilyPolicy` and
/// `ipFamilies` defaulted and checked, a cluster IP per family allocated and given back.
#[test]
fn dual_stack_services_get_an_address_per_family() {
    let etcd = Etcd::start().unwrap();
    let server = dual_stack_server(&etcd);
    let (_, kubernetes) = server.get(&format!("{SVCS}/kubernetes")).unwrap();
    assert_eq!(kubernetes["spec"]["ipFamilies"], json!(["IPv4"]));

    let ports = json!([{"port": 80}]);
    let (code, single) = server
        .post(SVCS, &service("single", json!({"ports": ports})))
        .unwrap();
    assert_eq!(code, 201, "{single}");
    assert_eq!(single["spec"]["ipFamilyPolicy"], "SingleStack");
    assert_eq!(single["spec"]["ipFamilies"], json!(["IPv4"]));

    let (code, dual) = server
        .post(
            SVCS,
            &service(
                "dual",
                json!({"ipFamilyPolicy": "PreferDualStack", "ports": ports}),
            ),
        )
        .unwrap();
    assert_eq!(code, 201, "{dual}");
    assert_eq!(dual["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
    let ips = dual["spec"]["clusterIPs"].as_array().unwrap();
    assert_eq!(ips.len(), 2, "{dual}");
    let v6: std::net::Ipv6Addr = ips[1].as_str().unwrap().parse().unwrap();
    assert_eq!(v6.segments()[..3], [0xfd00, 0x10, 0x96], "{v6}");
    assert_eq!(dual["spec"]["clusterIP"], ips[0]);

    // An IPv6 address asked for by value, IPv6 first.
    let (code, six) = server
        .post(
            SVCS,
            &service(
                "six",
                json!({"clusterIPs": ["fd00:10:96::10"], "ports": ports}),
            ),
        )
        .unwrap();
    assert_eq!(code, 201, "{six}");
    assert_eq!(six["spec"]["ipFamilies"], json!(["IPv6"]));
    assert_eq!(six["spec"]["clusterIP"], "fd00:10:96::10");
    let kubectl = server
        .kubectl_ok(&["get", "service", "six", "--no-headers"])
        .unwrap();
    assert!(kubectl.contains("fd00:10:96::10"), "{kubectl}");

    // Downgrading to SingleStack gives the IPv6 address back: another service can take it.
    let secondary = ips[1].as_str().unwrap().to_string();
    let (code, down) = server
        .merge_patch(
            &format!("{SVCS}/dual"),
            &json!({"spec": {"ipFamilyPolicy": "SingleStack"}}),
        )
        .unwrap();
    assert_eq!(code, 200, "{down}");
    assert_eq!(down["spec"]["clusterIPs"], json!([ips[0]]));
    let (code, taken) = server
        .post(
            SVCS,
            &service("taker", json!({"clusterIPs": [secondary], "ports": ports})),
        )
        .unwrap();
    assert_eq!(code, 201, "{taken}");

    // Refused as kube-apiserver refuses them.
    for (spec, field) in [
        (
            json!({"ipFamilies": ["IPv4", "IPv4"], "ports": ports}),
            "spec.ipFamilies[1]",
        ),
        (
            json!({"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4", "IPv6"], "ports": ports}),
            "spec.ipFamilyPolicy",
        ),
        (
            json!({"clusterIP": "fd00:99::1", "ports": ports}),
            "spec.clusterIPs",
        ),
    ] {
        let (code, status) = server.post(SVCS, &service("bad", spec.clone())).unwrap();
        assert_eq!(code, 422, "{spec}: {status}");
        assert_eq!(status["details"]["causes"][0]["field"], field, "{status}");
    }

    // On a single-stack cluster, a valid IPv6 address is an unconfigured family, not a bad one.
    let v4_only = ApiServer::start(&etcd).unwrap();
    let (code, status) = v4_only
        .post(
            SVCS,
            &service("v6", json!({"clusterIP": "1234:abcd::1", "ports": ports})),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("not configured on this cluster"),
        "{message}"
    );
    assert!(!message.contains("must be a valid IP address"), "{message}");
    let (code, status) = v4_only
        .post(
            SVCS,
            &service(
                "req",
                json!({"ipFamilyPolicy": "RequireDualStack", "ports": ports}),
            ),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");
}

/// The ServiceCIDR API (networking.k8s.io/v1): the default range from the flag, ranges added at
/// run time when it is full, and an IPAddress object recording every cluster IP (one made by hand
/// reserves its address).
#[test]
fn service_cidrs_add_ranges_at_run_time_and_ip_addresses_record_cluster_ips() {
    let etcd = Etcd::start().unwrap();
    // A /30 has one address besides the kubernetes service's.
    let server =
        ApiServer::start_with(&etcd, &["--service-cluster-ip-range", "10.96.0.0/30"]).unwrap();
    const CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";
    const ADDRESSES: &str = "/apis/networking.k8s.io/v1/ipaddresses";
    let (code, default) = server.get(&format!("{CIDRS}/kubernetes")).unwrap();
    assert_eq!(code, 200, "{default}");
    assert_eq!(default["spec"]["cidrs"], json!(["10.96.0.0/30"]));
    assert_eq!(default["status"]["conditions"][0]["type"], "Ready");
    let (_, kubernetes_ip) = server.get(&format!("{ADDRESSES}/10.96.0.1")).unwrap();
    assert_eq!(
        kubernetes_ip["spec"]["parentRef"],
        json!({"group": "", "resource": "services", "namespace": "default", "name": "kubernetes"})
    );

    let ports = json!([{"port": 80}]);
    let (code, a) = server
        .post(SVCS, &service("a", json!({"ports": ports})))
        .unwrap();
    assert_eq!(code, 201, "{a}");
    assert_eq!(a["spec"]["clusterIP"], "10.96.0.2");
    let (code, full) = server
        .post(SVCS, &service("b", json!({"ports": ports})))
        .unwrap();
    assert_ne!(code, 201, "{full}");
    assert!(
        full["message"].as_str().unwrap().contains("range is full"),
        "{full}"
    );

    // A range added at run time takes the next services.
    let (code, extra) = server
        .post(
            CIDRS,
            &json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                    "metadata": {"name": "extra"}, "spec": {"cidrs": ["10.100.0.0/24"]}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{extra}");
    let (code, b) = server
        .post(SVCS, &service("b", json!({"ports": ports})))
        .unwrap();
    assert_eq!(code, 201, "{b}");
    let ip = b["spec"]["clusterIP"].as_str().unwrap().to_string();
    assert!(in_range(&ip, Ipv4Addr::new(10, 100, 0, 0), 24), "{ip}");
    let listed = server
        .kubectl_ok(&["get", "ipaddresses", "-o", "name"])
        .unwrap();
    for want in ["10.96.0.1", "10.96.0.2", ip.as_str()] {
        assert!(
            listed.contains(&format!("ipaddress.networking.k8s.io/{want}")),
            "{listed}"
        );
    }

    // An IPAddress made by hand reserves its address; deleting a service frees its own.
    let (code, held) = server
        .post(
            ADDRESSES,
            &json!({"apiVersion": "networking.k8s.io/v1", "kind": "IPAddress",
                    "metadata": {"name": "10.100.0.50"},
                    "spec": {"parentRef": {"resource": "services", "namespace": "default", "name": "elsewhere"}}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{held}");
    let (code, status) = server
        .post(
            SVCS,
            &service("c", json!({"clusterIP": "10.100.0.50", "ports": ports})),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");
    server.delete(&format!("{SVCS}/a"), None).unwrap();
    let (code, _) = server.get(&format!("{ADDRESSES}/10.96.0.2")).unwrap();
    assert_eq!(code, 404, "the deleted service's IPAddress is gone");

    // Refused: two ranges of one family, a changed range, a name that is not an address.
    for (body, field) in [
        (
            json!({"metadata": {"name": "two"}, "spec": {"cidrs": ["10.1.0.0/24", "10.2.0.0/24"]}}),
            "spec.cidrs",
        ),
        (
            json!({"metadata": {"name": "bad"}, "spec": {"cidrs": ["10.1.0.0"]}}),
            "spec.cidrs[0]",
        ),
    ] {
        let (code, status) = server.post(CIDRS, &body).unwrap();
        assert_eq!(code, 422, "{status}");
        assert_eq!(status["details"]["causes"][0]["field"], field, "{status}");
    }
    let (code, status) = server
        .merge_patch(
            &format!("{CIDRS}/extra"),
            &json!({"spec": {"cidrs": ["10.101.0.0/24"]}}),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");
    let (code, status) = server
        .post(
            ADDRESSES,
            &json!({"metadata": {"name": "not-an-ip"}, "spec": {"parentRef": {"resource": "services", "name": "x"}}}),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");

    // A cluster IP recorded the way earlier versions did (no IPAddress, a key of Seine's own)
    // gets its IPAddress when an API server starts, and the old record goes.
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .args(["--endpoints", &etcd.client_url])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    etcdctl(&["del", &format!("/registry/ipaddresses/{ip}")]);
    etcdctl(&[
        "put",
        &format!("/registry/seine/serviceips/{ip}"),
        "default/b",
    ]);
    drop(server);
    let server =
        ApiServer::start_with(&etcd, &["--service-cluster-ip-range", "10.96.0.0/30"]).unwrap();
    let (code, recorded) = server.get(&format!("{ADDRESSES}/{ip}")).unwrap();
    assert_eq!(code, 200, "{recorded}");
    assert_eq!(recorded["spec"]["parentRef"]["name"], "b", "{recorded}");
    let old = etcdctl(&[
        "get",
        "--prefix",
        "--keys-only",
        "/registry/seine/serviceips/",
    ]);
    assert_eq!(old.trim(), "", "the old records are gone");
    let (code, status) = server
        .post(
            SVCS,
            &service("d", json!({"clusterIP": ip, "ports": ports})),
        )
        .unwrap();
    assert_eq!(code, 422, "the address is still b's: {status}");
}

/// Creates services concurrently on both servers; returns the created ones and the failures.
fn create_concurrently(
    servers: &[Arc<ApiServer>],
    prefix: &str,
    per_server: usize,
    spec: Value,
) -> (Vec<Value>, Vec<Value>) {
    let handles: Vec<_> = servers
        .iter()
        .enumerate()
        .flat_map(|(s, server)| {
            (0..per_server).map({
                let spec = spec.clone();
                move |i| {
                    let server = server.clone();
                    let body = service(&format!("{prefix}-{s}-{i}"), spec.clone());
                    thread::spawn(move || server.post(SVCS, &body).unwrap())
                }
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut failed = Vec::new();
    for h in handles {
        match h.join().unwrap() {
            (201, object) => created.push(object),
            (_, status) => failed.push(status),
        }
    }
    (created, failed)
}

#[test]
fn two_api_servers_on_one_etcd_never_hand_out_the_same_address_or_port() {
    let etcd = Etcd::start().unwrap();
    // 10.200.0.0/26: .1 is the kubernetes service's, .2-.62 (61 addresses) are for services.
    let flags = [
        "--service-cluster-ip-range",
        "10.200.0.0/26",
        "--service-node-port-range",
        "30000-30019",
    ];
    let servers = [
        Arc::new(ApiServer::start_with(&etcd, &flags).unwrap()),
        Arc::new(ApiServer::start_with(&etcd, &flags).unwrap()),
    ];

    // 30 NodePort services for 20 ports.
    let (created, failed) = create_concurrently(
        &servers,
        "np",
        15,
        json!({"type": "NodePort", "ports": [{"port": 80}]}),
    );
    assert_eq!(created.len(), 20, "failures: {failed:?}");
    let ports: HashSet<i64> = created
        .iter()
        .map(|s| s["spec"]["ports"][0]["nodePort"].as_i64().unwrap())
        .collect();
    assert_eq!(ports.len(), 20);
    assert!(failed.iter().all(|s| s["message"]
        .as_str()
        .unwrap_or_default()
        .contains("range is full")));

    // 60 more services for the 41 addresses left.
    let (more, failed) = create_concurrently(&servers, "ip", 30, json!({"ports": [{"port": 80}]}));
    assert_eq!(more.len(), 41, "failures: {failed:?}");
    let ips: HashSet<String> = created
        .iter()
        .chain(&more)
        .map(|s| s["spec"]["clusterIP"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 61, "every address once");
    assert!(ips
        .iter()
        .all(|ip| in_range(ip, Ipv4Addr::new(10, 200, 0, 0), 26) && ip != "10.200.0.1"));
    // Both servers serve the same state.
    for server in &servers {
        let (_, list) = server.get(SVCS).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 62);
    }
}

#[test]
fn pods_are_defaulted_bound_once_and_deleted_gracefully() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let (code, created) = server.post(PODS, &pod("web")).unwrap();
    assert_eq!(code, 201, "{created}");
    assert_eq!(created["status"]["phase"], "Pending");
    assert_eq!(created["status"]["qosClass"], "BestEffort");
    assert_eq!(created["spec"]["restartPolicy"], "Always");
    assert_eq!(created["spec"]["terminationGracePeriodSeconds"], 30);
    assert_eq!(created["spec"]["serviceAccountName"], "default");

    let binding = |node: &str| {
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "web"},
               "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
    };
    let (code, status) = server
        .post(&format!("{PODS}/web/binding"), &binding("n1"))
        .unwrap();
    assert_eq!(code, 201, "{status}");
    let (code, status) = server
        .post(&format!("{PODS}/web/binding"), &binding("n2"))
        .unwrap();
    assert_eq!(code, 409, "{status}");
    assert!(status["message"]
        .as_str()
        .unwrap()
        .contains("already assigned to node \"n1\""));
    let on_n1 = server
        .kubectl_ok(&[
            "get",
            "pods",
            "--field-selector",
            "spec.nodeName=n1",
            "-o",
            "name",
        ])
        .unwrap();
    assert_eq!(on_n1.trim(), "pod/web");

    // Status goes through /status only; the main resource keeps it.
    let (_, mut current) = server.get(&format!("{PODS}/web")).unwrap();
    assert_eq!(current["status"]["conditions"][0]["type"], "PodScheduled");
    current["status"]["phase"] = "Running".into();
    current["status"]["podIP"] = "10.244.1.5".into();
    let (code, updated) = server.put(&format!("{PODS}/web/status"), &current).unwrap();
    assert_eq!(code, 200, "{updated}");
    assert_eq!(updated["status"]["phase"], "Running");
    let mut main = updated.clone();
    main["status"]["phase"] = "Failed".into();
    main["metadata"]["labels"]["tier"] = "front".into();
    let (code, updated) = server.put(&format!("{PODS}/web"), &main).unwrap();
    assert_eq!(code, 200, "{updated}");
    assert_eq!(updated["status"]["phase"], "Running");
    assert_eq!(updated["metadata"]["labels"]["tier"], "front");
    // A pod's spec is fixed but for a few fields.
    let (code, status) = server
        .merge_patch(
            &format!("{PODS}/web"),
            &json!({"spec": {"restartPolicy": "Never"}}),
        )
        .unwrap();
    assert_eq!(code, 422, "{status}");

    // A pod on a node is deleted gracefully: marked, and gone when the kubelet (here: a
    // delete with grace 0) confirms.
    let (code, marked) = server.delete(&format!("{PODS}/web"), None).unwrap();
    assert_eq!(code, 200);
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 30);
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    let (code, still) = server.get(&format!("{PODS}/web")).unwrap();
    assert_eq!(code, 200);
    assert!(still["metadata"]["deletionTimestamp"].is_string());
    let (code, status) = server
        .post(&format!("{PODS}/web/binding"), &binding("n3"))
        .unwrap();
    assert_eq!(code, 409, "{status}");
    let (code, _) = server
        .delete(
            &format!("{PODS}/web"),
            Some(&json!({"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})),
        )
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(server.get(&format!("{PODS}/web")).unwrap().0, 404);

    // A pod that never reached a node goes at once.
    server.post(PODS, &pod("pending")).unwrap();
    server.delete(&format!("{PODS}/pending"), None).unwrap();
    assert_eq!(server.get(&format!("{PODS}/pending")).unwrap().0, 404);

    // Preconditions.
    server.post(PODS, &pod("pre")).unwrap();
    let (code, _) = server
        .delete(
            &format!("{PODS}/pre"),
            Some(&json!({"preconditions": {"uid": "not-the-uid"}})),
        )
        .unwrap();
    assert_eq!(code, 409);
    assert_eq!(server.get(&format!("{PODS}/pre")).unwrap().0, 200);
}

#[test]
fn finalizers_hold_objects_and_namespaces_terminate() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let (code, _) = server
        .post(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}}),
        )
        .unwrap();
    assert_eq!(code, 201);
    let cms = "/api/v1/namespaces/team/configmaps";
    let (code, _) = server
        .post(
            cms,
            &json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "held", "finalizers": ["example.com/cleanup"]}}),
        )
        .unwrap();
    assert_eq!(code, 201);
    let (code, marked) = server.delete(&format!("{cms}/held"), None).unwrap();
    assert_eq!(code, 200);
    assert!(marked["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(server.get(&format!("{cms}/held")).unwrap().0, 200);
    // The finalizer's owner finishes: the object goes.
    let out = server
        .kubectl_ok(&[
            "patch",
            "configmap",
            "held",
            "-n",
            "team",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ])
        .unwrap();
    assert!(out.contains("patched"), "{out}");
    assert_eq!(server.get(&format!("{cms}/held")).unwrap().0, 404);

    // A namespace being deleted turns Terminating and takes no new objects until its
    // finalizers are done (the namespace controller's job), then goes.
    server
        .post(
            cms,
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "left"}}),
        )
        .unwrap();
    let out = server
        .kubectl_ok(&["delete", "namespace", "team", "--wait=false"])
        .unwrap();
    assert!(out.contains("deleted"), "{out}");
    let (_, ns) = server.get("/api/v1/namespaces/team").unwrap();
    assert_eq!(ns["status"]["phase"], "Terminating");
    let (code, status) = server
        .post(
            cms,
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late"}}),
        )
        .unwrap();
    assert_eq!(code, 403, "{status}");
    assert!(status["message"]
        .as_str()
        .unwrap()
        .contains("because it is being terminated"));
    let mut finalized = ns.clone();
    finalized["spec"]["finalizers"] = json!([]);
    let (code, _) = server
        .put("/api/v1/namespaces/team/finalize", &finalized)
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(server.get("/api/v1/namespaces/team").unwrap().0, 404);

    let denied = server.kubectl(&["delete", "namespace", "default"]).unwrap();
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("may not be deleted"));
}

#[test]
fn kubectl_apply_and_patch_use_strategic_merge_patches() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let manifest = |image: &str, env: &str, tier: &str| {
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: app
  labels: {{app: app, tier: {tier}}}
spec:
  containers:
  - name: web
    image: {image}
    env: [{{name: MODE, value: {env}}}]
  - name: sidecar
    image: busybox:1.36
"#
        )
    };
    let path = write_manifest(&server, "app.yaml", &manifest("nginx:1.27", "a", "one"));
    let out = server.kubectl_ok(&["apply", "-f", &path]).unwrap();
    assert!(out.contains("pod/app created"), "{out}");
    let path = write_manifest(&server, "app.yaml", &manifest("nginx:1.28", "a", "two"));
    let out = server.kubectl_ok(&["apply", "-f", &path]).unwrap();
    assert!(out.contains("pod/app configured"), "{out}");
    let (_, app) = server.get(&format!("{PODS}/app")).unwrap();
    assert_eq!(app["spec"]["containers"][0]["image"], "nginx:1.28");
    assert_eq!(
        app["spec"]["containers"][0]["env"],
        json!([{"name": "MODE", "value": "a"}])
    );
    assert_eq!(app["spec"]["containers"][1]["image"], "busybox:1.36");
    assert_eq!(app["metadata"]["labels"]["tier"], "two");
    // As in Kubernetes, a pod's environment cannot change in place.
    let path = write_manifest(&server, "app.yaml", &manifest("nginx:1.28", "b", "two"));
    let refused = server.kubectl(&["apply", "-f", &path]).unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("pod updates may not change fields"));

    // kubectl patch's default type is strategic: the list element is merged by name.
    server
        .kubectl_ok(&[
            "patch",
            "pod",
            "app",
            "-p",
            r#"{"spec":{"containers":[{"name":"sidecar","image":"busybox:1.37"}]}}"#,
        ])
        .unwrap();
    let (_, app) = server.get(&format!("{PODS}/app")).unwrap();
    let containers = app["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 2);
    assert_eq!(containers[0]["image"], "nginx:1.28");
    assert_eq!(containers[1]["image"], "busybox:1.37");
}

#[test]
fn invalid_objects_are_refused_with_field_causes() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let cases = [
        (
            PODS,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                   "spec": {"containers": [{"name": "c"}]}}),
            "spec.containers[0].image",
        ),
        (
            PODS,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}),
            "spec.containers",
        ),
        (
            SVCS,
            service("s", json!({"ports": [{"port": 70000}]})),
            "spec.ports[0].port",
        ),
        (
            SVCS,
            service("s", json!({"ports": [{"port": 80}, {"port": 81}]})),
            "spec.ports[0].name",
        ),
        (
            "/apis/batch/v1/namespaces/default/jobs",
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                   "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}}),
            "spec.template.spec.restartPolicy",
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "e"}, "endpoints": []}),
            "addressType",
        ),
        (
            "/apis/rbac.authorization.k8s.io/v1/namespaces/default/rolebindings",
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "rb"}, "roleRef": {"kind": "Deployment", "name": "x"},
                   "subjects": [{"kind": "User", "name": "alice"}]}),
            "roleRef.kind",
        ),
    ];
    for (path, body, field) in cases {
        let (code, status) = server.post(path, &body).unwrap();
        assert_eq!(code, 422, "{status}");
        assert_eq!(status["reason"], "Invalid");
        let fields: Vec<&str> = status["details"]["causes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["field"].as_str().unwrap())
            .collect();
        assert!(fields.contains(&field), "{field} not in {fields:?}");
    }
    // Nothing was stored.
    let (_, pods) = server.get(PODS).unwrap();
    assert!(pods["items"].as_array().unwrap().is_empty());

    // A Job gets its selector and pod labels from its uid.
    let (code, job) = server
        .post(
            "/apis/batch/v1/namespaces/default/jobs",
            &json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                    "spec": {"template": {"spec": {"restartPolicy": "Never",
                             "containers": [{"name": "c", "image": "busybox"}]}}}}),
        )
        .unwrap();
    assert_eq!(code, 201, "{job}");
    let uid = job["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        job["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"],
        uid
    );
    assert_eq!(
        job["spec"]["template"]["metadata"]["labels"]["job-name"],
        "j"
    );
    assert_eq!(job["spec"]["backoffLimit"], 6);
}

#[test]
fn fields_are_validated_by_the_server_and_kubectl_explains_kinds() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    // kubectl sees fieldValidation in the OpenAPI document and lets the server check (Strict).
    let typo = write_manifest(
        &server,
        "typo.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: typo}\nspec:\n  containers: [{name: c, image: busybox:1.36, imagee: x}]\n",
    );
    let refused = server.kubectl(&["create", "-f", &typo]).unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("strict decoding error: unknown field \"spec.containers[0].imagee\""),
        "{message}"
    );
    assert_eq!(server.get(&format!("{PODS}/typo")).unwrap().0, 404);
    let fixed = write_manifest(
        &server,
        "fixed.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: typo}\nspec:\n  containers: [{name: c, image: busybox:1.36}]\n",
    );
    server.kubectl_ok(&["apply", "-f", &fixed]).unwrap();

    // Without fieldValidation the server warns and stores; a wrong type is always refused.
    let body = json!({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": "warned"}, "data": {"a": "1"}, "extra": 1});
    let token = server.admin_token().unwrap();
    let (code, head, _) = server
        .request(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            Some(&token),
            "application/json",
            Some(body.to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(code, 201);
    assert!(
        head.to_ascii_lowercase()
            .contains("warning: 299 - \"unknown field \\\"extra\\\"\""),
        "{head}"
    );
    let (code, status) = server
        .post(
            PODS,
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bad"},
                    "spec": {"containers": [{"name": "c", "image": "x",
                                             "ports": [{"containerPort": "80"}]}]}}),
        )
        .unwrap();
    assert_eq!(code, 400, "{status}");
    assert!(status["message"]
        .as_str()
        .unwrap()
        .contains("Pod in version \"v1\" cannot be handled as a Pod"));

    let explained = server
        .kubectl_ok(&["explain", "pods.spec.containers.image"])
        .unwrap();
    assert!(explained.contains("Container image name"), "{explained}");
    let job = server
        .kubectl_ok(&["explain", "jobs.spec.backoffLimit"])
        .unwrap();
    assert!(job.contains("GROUP:      batch"), "{job}");
}

#[test]
fn server_side_apply_tracks_field_managers_and_their_conflicts() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let config = |labels: &str, data: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\n  labels: {{{labels}}}\ndata: {{{data}}}\n"
        )
    };
    let path = write_manifest(
        &server,
        "ssa.yaml",
        &config("app: web, tier: front", "mode: fast, size: large"),
    );
    let out = server
        .kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=team-a",
            "-f",
            &path,
        ])
        .unwrap();
    assert!(out.contains("serverside-applied"), "{out}");
    let (_, cm) = server
        .get("/api/v1/namespaces/default/configmaps/shared")
        .unwrap();
    let managers = &cm["metadata"]["managedFields"];
    assert_eq!(managers[0]["manager"], "team-a");
    assert_eq!(managers[0]["operation"], "Apply");
    assert!(managers[0]["fieldsV1"]["f:data"]["f:mode"].is_object());

    // Another manager changing team-a's field is a conflict, named by field and manager.
    let other = write_manifest(&server, "other.yaml", &config("app: web", "mode: slow"));
    let refused = server
        .kubectl(&[
            "apply",
            "--server-side",
            "--field-manager=team-b",
            "-f",
            &other,
        ])
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("conflict with \"team-a\": .data.mode"),
        "{message}"
    );
    // Forced, team-b takes the field; the label both set to the same value is shared.
    server
        .kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=team-b",
            "--force-conflicts",
            "-f",
            &other,
        ])
        .unwrap();
    let (_, cm) = server
        .get("/api/v1/namespaces/default/configmaps/shared")
        .unwrap();
    assert_eq!(cm["data"]["mode"], "slow");
    assert_eq!(cm["data"]["size"], "large");

    // team-a stops applying `size` and the `tier` label: they go (nobody else has them).
    let trimmed = write_manifest(&server, "trimmed.yaml", &config("app: web", "mode: slow"));
    server
        .kubectl_ok(&[
            "apply",
            "--server-side",
            "--field-manager=team-a",
            "-f",
            &trimmed,
        ])
        .unwrap();
    let (_, cm) = server
        .get("/api/v1/namespaces/default/configmaps/shared")
        .unwrap();
    assert!(cm["data"].get("size").is_none(), "{cm}");
    assert!(cm["metadata"]["labels"].get("tier").is_none(), "{cm}");
    assert_eq!(cm["metadata"]["labels"]["app"], "web");

    // An ordinary patch takes the field it changes (operation Update).
    server
        .kubectl_ok(&[
            "patch",
            "configmap",
            "shared",
            "--type=merge",
            "-p",
            r#"{"data":{"mode":"edited"}}"#,
        ])
        .unwrap();
    let (_, cm) = server
        .get("/api/v1/namespaces/default/configmaps/shared")
        .unwrap();
    let updaters: Vec<&Value> = cm["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["operation"] == "Update")
        .collect();
    assert_eq!(updaters.len(), 1, "{cm}");
    assert!(updaters[0]["fieldsV1"]["f:data"]["f:mode"].is_object());
    // Apply without a field manager is refused.
    let token = server.admin_token().unwrap();
    let (code, _, _) = server
        .request(
            "PATCH",
            "/api/v1/namespaces/default/configmaps/shared",
            Some(&token),
            "application/apply-patch+yaml",
            Some(config("app: web", "mode: x").as_bytes()),
        )
        .unwrap();
    assert_eq!(code, 400);
}

#[test]
fn patches_are_field_validated_too() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    server.post(PODS, &pod("p")).unwrap();
    let refused = server
        .kubectl(&[
            "patch",
            "pod",
            "p",
            "--type=merge",
            "-p",
            r#"{"spec":{"nodeSelectr":{"a":"b"}}}"#,
        ])
        .unwrap();
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("unknown field \"spec.nodeSelectr\""),
        "{message}"
    );
}

#[test]
fn the_kubernetes_service_lists_the_api_servers_that_are_up() {
    let etcd = Etcd::start().unwrap();
    let first = ApiServer::start(&etcd).unwrap();
    let second = ApiServer::start(&etcd).unwrap();
    let ports = |server: &ApiServer| -> Vec<u64> {
        let (_, endpoints) = server
            .get("/api/v1/namespaces/default/endpoints/kubernetes")
            .unwrap();
        let mut ports: Vec<u64> = endpoints["subsets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["port"].as_u64())
            .collect();
        ports.sort();
        ports
    };
    let mut both = vec![u64::from(first.addr.port()), u64::from(second.addr.port())];
    both.sort();
    assert_eq!(ports(&first), both);
    // A server that shuts down leaves the endpoints.
    let gone = u64::from(second.addr.port());
    drop(second);
    seine_tests::wait_until(std::time::Duration::from_secs(5), || {
        !ports(&first).contains(&gone)
    })
    .expect("the stopped server left the endpoints");
    assert_eq!(ports(&first), [u64::from(first.addr.port())]);
    let (_, slice) = first
        .get("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes")
        .unwrap();
    assert_eq!(slice["endpoints"][0]["addresses"][0], "127.0.0.1");
    assert_eq!(slice["ports"][0]["port"], u64::from(first.addr.port()));
}

/// `kubectl get servicecidrs,ipaddresses` on a dual-stack server: discovery finds both
/// networking.k8s.io/v1 resources, with kube-apiserver's columns and the short name `ip`, the
/// default ServiceCIDR holds both ranges, and each cluster IP of a service is an IPAddress.
#[test]
fn kubectl_lists_service_cidrs_and_ip_addresses() {
    let etcd = Etcd::start().unwrap();
    let server = dual_stack_server(&etcd);
    server
        .kubectl_ok(&["create", "service", "clusterip", "web", "--tcp=80:8080"])
        .unwrap();
    server
        .kubectl_ok(&[
            "patch",
            "service",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"ipFamilyPolicy":"PreferDualStack"}}"#,
        ])
        .unwrap();
    let web: Value = serde_json::from_str(
        &server
            .kubectl_ok(&["get", "service", "web", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let ips: Vec<String> = web["spec"]["clusterIPs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 2, "{web}");
    assert_eq!(web["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));

    let table = server
        .kubectl_ok(&["get", "servicecidrs,ipaddresses", "--no-headers"])
        .unwrap();
    assert!(
        table.contains("servicecidr.networking.k8s.io/kubernetes"),
        "{table}"
    );
    for ip in &ips {
        assert!(
            table.contains(&format!("ipaddress.networking.k8s.io/{ip}")),
            "{ip} missing from\n{table}"
        );
    }
    // The printer columns kube-apiserver serves, and the short name `ip`.
    let wide = server
        .kubectl_ok(&["get", "servicecidrs", "--no-headers"])
        .unwrap();
    assert!(wide.contains("10.96.0.0/12,fd00:10:96::/112"), "{wide}");
    let by_short = server.kubectl_ok(&["get", "ip", "--no-headers"]).unwrap();
    assert!(by_short.contains("services/default/web"), "{by_short}");
    let cidr: Value = serde_json::from_str(
        &server
            .kubectl_ok(&["get", "servicecidr", "kubernetes", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        cidr["spec"]["cidrs"],
        json!(["10.96.0.0/12", "fd00:10:96::/112"])
    );
    let address: Value = serde_json::from_str(
        &server
            .kubectl_ok(&["get", "ipaddress", &ips[1], "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(address["spec"]["parentRef"]["resource"], "services");
    assert_eq!(address["spec"]["parentRef"]["name"], "web");
    // Both kinds have their Kubernetes schemas: explain reads them, and a field neither has
    // is refused under strict validation.
    let explained = server
        .kubectl_ok(&["explain", "servicecidrs.spec.cidrs"])
        .unwrap();
    assert!(
        explained.contains("CIDRs defines the IP blocks"),
        "{explained}"
    );
    let explained = server
        .kubectl_ok(&["explain", "ipaddresses.spec.parentRef"])
        .unwrap();
    assert!(explained.contains("ParentReference"), "{explained}");
    let manifest = write_manifest(
        &server,
        "typo.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: typo}\nspec: {cidr: [10.120.0.0/24]}\n",
    );
    let refused = server
        .kubectl(&["create", "--validate=strict", "-f", &manifest])
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("spec.cidr"), "{stderr}");

    // Deleting the service gives both addresses back.
    server.kubectl_ok(&["delete", "service", "web"]).unwrap();
    let left = server
        .kubectl_ok(&["get", "ipaddresses", "-o", "name"])
        .unwrap();
    for ip in &ips {
        assert!(!left.contains(ip.as_str()), "{ip} still held:\n{left}");
    }
}
