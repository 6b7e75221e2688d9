//! seine-agent as kube-proxy: Services and EndpointSlices written through a real seine-apiserver
//! (on etcd) become the datapath's frontends and backends, and edits through the API change it;
//! kube-proxy's rules (what it skips, traffic policies, topology, terminating endpoints, slices
//! moving between Services) hold; the datapath outlives the API server's absence and the
//! agent's restart with no failed request. Each scenario runs in both datapath modes.
//!
//! Needs root. Run serially (`--test-threads=1`, as `cargo xtask test` does).

use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use seine_tests::{proxy::ProxyLab, wait_until, RequestLoop};
use serde_json::{json, Value};

const PORT: u16 = 8080;

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $( #[test] fn $name() { super::$name("ebpf") } )*
        }
        mod iptables {
            $( #[test] fn $name() { super::$name("iptables") } )*
        }
    };
}

in_both_modes!(
    services_from_the_api_are_programmed_and_follow_edits,
    what_kube_proxy_leaves_alone_is_not_programmed,
    local_policy_and_topology_hints_choose_this_nodes_endpoints,
    terminating_endpoints_serve_only_when_no_ready_one_is_left,
    a_slice_that_moves_between_services_serves_the_new_one,
    client_ip_affinity_from_the_service_holds_until_its_timeout,
    a_connection_tried_before_its_service_is_programmed_leaves_no_trap,
    the_datapath_outlives_the_api_server_and_catches_up_when_it_returns,
    an_agent_restart_on_the_api_fails_no_request,
);

fn lab(tag: &str, backends: usize, mode: &str) -> ProxyLab {
    ProxyLab::start(tag, backends, PORT, mode, &[]).unwrap()
}

fn http_port() -> Value {
    json!([{"name": "http", "port": PORT, "protocol": "TCP"}])
}

/// A Service on port 80 (named `http`, target port by name) with a cluster IP from the API.
fn web_service(lab: &ProxyLab, name: &str, extra: Value) -> SocketAddr {
    let mut spec = json!({"ports": [{"name": "http", "port": 80, "targetPort": "web"}]});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    let service = lab.service(name, spec).unwrap();
    let ip = service["spec"]["clusterIP"].as_str().unwrap().to_string();
    format!("{ip}:80").parse().unwrap()
}

/// Which backends answer `n` new connections to `addr`, once that set is `want`.
fn wait_answers(lab: &ProxyLab, addr: SocketAddr, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let mut seen = BTreeSet::new();
    let reached = wait_until(Duration::from_secs(30), || {
        seen = lab
            .node
            .pod("client")
            .run(move || {
                (0..30)
                    .filter_map(|_| seine_tests::http_get(addr).ok())
                    .collect::<BTreeSet<String>>()
            })
            .unwrap_or_default();
        seen == want
    });
    assert!(
        reached.is_ok(),
        "{addr} answered from {seen:?}, not {want:?}:\n{}",
        lab.node.agent.as_ref().unwrap().log_text()
    );
}

/// How a TCP connection to `addr` from the client pod ends: connected, refused, timed out.
fn connect(lab: &ProxyLab, addr: SocketAddr) -> Result<(), ErrorKind> {
    lab.node
        .pod("client")
        .run(move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .map(|_| ())
                .map_err(|e| e.kind())
        })
        .unwrap()
}

fn services_from_the_api_are_programmed_and_follow_edits(mode: &str) {
    let lab = lab("pa", 3, mode);
    // The default/kubernetes Service is there from the start.
    lab.wait_frontends(1).unwrap();
    let web = web_service(
        &lab,
        "web",
        json!({"ports": [{"name": "http", "port": 80, "targetPort": "web"},
                         {"name": "dns", "port": 53, "protocol": "UDP"}]}),
    );
    // No endpoints yet: refused, as kube-proxy rejects.
    lab.wait_frontends(3).unwrap();
    assert_eq!(connect(&lab, web), Err(ErrorKind::ConnectionRefused));
    let ports = json!([{"name": "http", "port": PORT, "protocol": "TCP"},
                       {"name": "dns", "port": PORT, "protocol": "UDP"}]);
    lab.slice(
        "web-1",
        "web",
        ports.clone(),
        json!([lab.endpoint("backend-1"), lab.endpoint("backend-2")]),
    )
    .unwrap();
    wait_answers(&lab, web, &["backend-1", "backend-2"]);
    // UDP on the same Service.
    let dns: SocketAddr = format!("{}:53", web.ip()).parse().unwrap();
    let reply = lab
        .node
        .pod("client")
        .run(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            sock.connect(dns).unwrap();
            sock.send(b"ping").unwrap();
            let mut buf = [0u8; 64];
            sock.recv(&mut buf)
                .map(|n| String::from_utf8_lossy(&buf[..n]).trim().to_string())
        })
        .unwrap()
        .unwrap();
    assert!(reply.starts_with("backend-"), "{reply}");
    // A second slice of the same Service is merged with the first.
    lab.slice(
        "web-2",
        "web",
        ports.clone(),
        json!([lab.endpoint("backend-3")]),
    )
    .unwrap();
    wait_answers(&lab, web, &["backend-1", "backend-2", "backend-3"]);
    // seinectl names each frontend's Service, with the backends the datapath holds.
    let mut rows = Value::Null;
    let listed = wait_until(Duration::from_secs(10), || {
        rows = lab
            .node
            .seinectl_json(&["service", "list"])
            .unwrap_or_default();
        let tcp = format!("{web}/TCP");
        rows.as_array().into_iter().flatten().any(|r| {
            r["service"] == "default/web"
                && r["frontend"] == tcp.as_str()
                && r["backends"].as_array().map_or(0, Vec::len) == 3
        })
    });
    assert!(listed.is_ok(), "{rows:#}");
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["service"] == "default/kubernetes"),
        "{rows:#}"
    );
    let status = lab.node.seinectl_json(&["status"]).unwrap();
    assert_eq!(status["source"], "api", "{status:#}");
    assert_eq!(status["api_connected"], true, "{status:#}");
    assert!(status["last_sync"].is_string(), "{status:#}");
    // An endpoint edited away, then the Service deleted: its frontends go.
    lab.slice("web-1", "web", ports, json!([lab.endpoint("backend-2")]))
        .unwrap();
    wait_answers(&lab, web, &["backend-2", "backend-3"]);
    lab.delete("/api/v1/namespaces/default/services/web")
        .unwrap();
    lab.wait_frontends(1).unwrap();
    // kube-proxy's metrics, under their names.
    let metrics = lab.node.metrics().unwrap();
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    if mode == "ebpf" {
        // The maps' fill: the kubernetes Service's one frontend, and the share of the map it takes.
        let services = "{map_name=\"seine_services\"}";
        let entries = lab.metric(&format!("seine_bpf_map_entries{services}"));
        assert_eq!(entries, Some(1.0), "{metrics}");
        let pressure = lab
            .metric(&format!("seine_bpf_map_pressure{services}"))
            .unwrap_or_default();
        assert!(pressure > 0.0 && pressure < 0.01, "{pressure}\n{metrics}");
    }
}

fn what_kube_proxy_leaves_alone_is_not_programmed(mode: &str) {
    let lab = lab("sk", 1, mode);
    lab.wait_frontends(1).unwrap();
    let endpoints = json!([lab.endpoint("backend-1")]);
    lab.service(
        "headless",
        json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
    )
    .unwrap();
    lab.slice("headless-1", "headless", http_port(), endpoints.clone())
        .unwrap();
    lab.service(
        "external",
        json!({"type": "ExternalName", "externalName": "example.com"}),
    )
    .unwrap();
    lab.apply(
        "/api/v1/namespaces/default/services",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "other", "namespace": "default",
                            "labels": {"service.kubernetes.io/service-proxy-name": "another-proxy"}},
               "spec": {"ports": [{"name": "http", "port": 80}]}}),
    )
    .unwrap();
    lab.slice("other-1", "other", http_port(), endpoints.clone())
        .unwrap();
    lab.service(
        "sctp",
        json!({"ports": [{"name": "a", "port": 80, "protocol": "SCTP"},
                         {"name": "b", "port": 81, "protocol": "TCP"}]}),
    )
    .unwrap();
    // Only the SCTP Service's TCP port is added, after all of the others were written.
    lab.wait_frontends(2).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    lab.wait_frontends(2).unwrap();
    let log = lab.node.agent.as_ref().unwrap().log_text();
    assert!(log.contains("not supported by the datapath"), "{log}");
}

fn local_policy_and_topology_hints_choose_this_nodes_endpoints(mode: &str) {
    let lab = lab("lp", 2, mode);
    let mut here = lab.endpoint("backend-1");
    here["hints"] = json!({"forZones": [{"name": "zone-a"}]});
    let mut there = lab.endpoint("backend-2");
    there["nodeName"] = json!("node-2");
    there["hints"] = json!({"forZones": [{"name": "zone-b"}]});
    let endpoints = json!([here, there]);

    let local = web_service(&lab, "local", json!({"internalTrafficPolicy": "Local"}));
    lab.slice("local-1", "local", http_port(), endpoints.clone())
        .unwrap();
    let close = web_service(&lab, "close", json!({"trafficDistribution": "PreferClose"}));
    lab.slice("close-1", "close", http_port(), endpoints.clone())
        .unwrap();
    let any = web_service(&lab, "any", json!({}));
    lab.slice("any-1", "any", http_port(), endpoints).unwrap();
    wait_answers(&lab, local, &["backend-1"]);
    wait_answers(&lab, close, &["backend-1"]);
    wait_answers(&lab, any, &["backend-1", "backend-2"]);
    // With no endpoint on this node, a Local Service has none to use.
    let mut moved = lab.endpoint("backend-1");
    moved["nodeName"] = json!("node-3");
    lab.slice("local-1", "local", http_port(), json!([moved]))
        .unwrap();
    wait_until(Duration::from_secs(30), || {
        connect(&lab, local) == Err(ErrorKind::ConnectionRefused)
    })
    .unwrap();
}

fn terminating_endpoints_serve_only_when_no_ready_one_is_left(mode: &str) {
    let lab = lab("te", 2, mode);
    let web = web_service(&lab, "web", json!({}));
    let mut terminating = lab.endpoint("backend-2");
    terminating["conditions"] = json!({"ready": false, "serving": true, "terminating": true});
    lab.slice(
        "web-1",
        "web",
        http_port(),
        json!([lab.endpoint("backend-1"), terminating.clone()]),
    )
    .unwrap();
    wait_answers(&lab, web, &["backend-1"]);
    lab.slice("web-1", "web", http_port(), json!([terminating]))
        .unwrap();
    wait_answers(&lab, web, &["backend-2"]);
}

fn client_ip_affinity_from_the_service_holds_until_its_timeout(mode: &str) {
    let lab = lab("af", 3, mode);
    let web = web_service(
        &lab,
        "web",
        json!({"sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}),
    );
    let all = ["backend-1", "backend-2", "backend-3"];
    lab.slice(
        "web-1",
        "web",
        http_port(),
        json!(all.iter().map(|p| lab.endpoint(p)).collect::<Vec<_>>()),
    )
    .unwrap();
    wait_until(Duration::from_secs(30), || {
        lab.node
            .pod("client")
            .run(move || seine_tests::http_get(web).is_ok())
            .unwrap_or(false)
    })
    .unwrap();
    let counts = seine_tests::spread(&lab.node, web, 30);
    assert_eq!(
        counts.len(),
        1,
        "affinity broke within the timeout: {counts:?}"
    );
    // Past the timeout the choice is made afresh: over several expiries, more than one backend.
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        seen.extend(seine_tests::spread(&lab.node, web, 1).into_keys());
    }
    assert!(seen.len() > 1, "affinity never expired: always {seen:?}");
}

fn a_slice_that_moves_between_services_serves_the_new_one(mode: &str) {
    let lab = lab("mv", 1, mode);
    let a = web_service(&lab, "a", json!({}));
    let b = web_service(&lab, "b", json!({}));
    let endpoints = json!([lab.endpoint("backend-1")]);
    lab.slice("shared", "a", http_port(), endpoints.clone())
        .unwrap();
    wait_answers(&lab, a, &["backend-1"]);
    assert_eq!(connect(&lab, b), Err(ErrorKind::ConnectionRefused));
    lab.slice("shared", "b", http_port(), endpoints).unwrap();
    wait_answers(&lab, b, &["backend-1"]);
    wait_until(Duration::from_secs(30), || {
        connect(&lab, a) == Err(ErrorKind::ConnectionRefused)
    })
    .unwrap();
}

/// Stops `looper`; asserts it made progress after `before` and failed no request.
/// A client that reaches a cluster IP before its Service is programmed (faster than the agent)
/// leaves a flow in conntrack that nothing translated; a later connection from the same client
/// port must still reach the Service once it is (iptables translates only a flow's first packet,
/// so the agent clears such flows).
fn a_connection_tried_before_its_service_is_programmed_leaves_no_trap(mode: &str) {
    let lab = lab("cs", 1, mode);
    lab.wait_frontends(1).unwrap();
    let vip: SocketAddr = "10.96.50.50:80".parse().unwrap();
    let from: SocketAddr = "10.244.0.2:40000".parse().unwrap();
    let connect_from = move |timeout: Duration| {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&from.into())?;
        socket.connect_timeout(&vip.into(), timeout)?;
        let mut stream: TcpStream = socket.into();
        use std::io::{Read as _, Write as _};
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        std::io::Result::Ok(response)
    };
    // Nothing answers there yet: the SYN goes the way of the node's route and is lost.
    let early = lab
        .node
        .pod("client")
        .run(move || connect_from(Duration::from_millis(500)))
        .unwrap();
    assert!(early.is_err(), "{early:?}");
    web_service(&lab, "web", json!({"clusterIP": vip.ip().to_string()}));
    lab.slice(
        "web-1",
        "web",
        http_port(),
        json!([lab.endpoint("backend-1")]),
    )
    .unwrap();
    wait_answers(&lab, vip, &["backend-1"]);
    let later = lab
        .node
        .pod("client")
        .run(move || connect_from(Duration::from_secs(3)))
        .unwrap();
    assert!(
        later.as_ref().is_ok_and(|r| r.contains("backend-1")),
        "the same client port again: {later:?}\n{}",
        lab.node.agent.as_ref().unwrap().log_text()
    );
}

fn finish(looper: RequestLoop, lab: &ProxyLab, before: u64) {
    let (total, failures) = looper.stop();
    assert!(
        before > 0 && total > before,
        "the loop made no progress ({before} then {total})"
    );
    assert!(
        failures.is_empty(),
        "failed requests: {failures:?}\nagent:\n{}",
        lab.node.agent.as_ref().unwrap().log_text()
    );
}

fn the_datapath_outlives_the_api_server_and_catches_up_when_it_returns(mode: &str) {
    let mut lab = lab("aw", 3, mode);
    let web = web_service(&lab, "web", json!({}));
    lab.slice(
        "web-1",
        "web",
        http_port(),
        json!([lab.endpoint("backend-1"), lab.endpoint("backend-2")]),
    )
    .unwrap();
    wait_answers(&lab, web, &["backend-1", "backend-2"]);
    let looper = RequestLoop::start(lab.node.pod("client"), web);
    std::thread::sleep(Duration::from_millis(500));
    let before = looper.ok();
    lab.api.stop().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        looper.ok() > before,
        "no request went through while the API server was away"
    );
    let away = wait_until(Duration::from_secs(10), || {
        lab.node
            .seinectl_json(&["status"])
            .is_ok_and(|s| s["api_connected"] == false)
    });
    assert!(
        away.is_ok(),
        "seinectl status does not say the API server is away"
    );
    lab.api.restart().unwrap();
    // A change made once it is back reaches the datapath: the agent watches again.
    lab.slice(
        "web-1",
        "web",
        http_port(),
        json!([
            lab.endpoint("backend-1"),
            lab.endpoint("backend-2"),
            lab.endpoint("backend-3")
        ]),
    )
    .unwrap();
    finish(looper, &lab, before);
    wait_answers(&lab, web, &["backend-1", "backend-2", "backend-3"]);
}

fn an_agent_restart_on_the_api_fails_no_request(mode: &str) {
    let mut lab = lab("ar", 3, mode);
    let web = web_service(&lab, "web", json!({}));
    lab.slice(
        "web-1",
        "web",
        http_port(),
        json!([
            lab.endpoint("backend-1"),
            lab.endpoint("backend-2"),
            lab.endpoint("backend-3")
        ]),
    )
    .unwrap();
    wait_answers(&lab, web, &["backend-1", "backend-2", "backend-3"]);
    let looper = RequestLoop::start(lab.node.pod("client"), web);
    std::thread::sleep(Duration::from_millis(500));
    let before = looper.ok();
    lab.node.stop_agent().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.node.spawn_agent().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    finish(looper, &lab, before);
    wait_answers(&lab, web, &["backend-1", "backend-2", "backend-3"]);
}

/// The agent runs with the rights of `deploy/seine-agent-rbac.yaml` alone: its ServiceAccount
/// in a namespace of the test's (the built-in policy also binds `kube-system/seine-agent`).
#[test]
fn the_agent_works_with_exactly_the_rights_of_its_manifest() {
    let mut lab = lab("rb", 1, "ebpf");
    let manifest = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/seine-agent-rbac.yaml"),
    )
    .unwrap()
    .replace("namespace: kube-system", "namespace: seine-rbac-test");
    let file = std::env::temp_dir().join(format!("{}-rbac.yaml", lab.node.prefix));
    std::fs::write(&file, manifest).unwrap();
    lab.api
        .kubectl_ok(&["create", "namespace", "seine-rbac-test"])
        .unwrap();
    lab.api
        .kubectl_ok(&["apply", "-f", file.to_str().unwrap()])
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let who = "system:serviceaccount:seine-rbac-test:seine-agent";
    for (verb, resource, allowed) in [
        ("watch", "services", "yes"),
        ("list", "endpointslices.discovery.k8s.io", "yes"),
        ("watch", "nodes", "yes"),
        ("list", "secrets", "no"),
        ("create", "services", "no"),
        ("delete", "endpointslices.discovery.k8s.io", "no"),
    ] {
        let out = lab
            .api
            .kubectl(&["auth", "can-i", verb, resource, "--as", who])
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(answer, allowed, "{verb} {resource}");
    }
    // A kubeconfig with the ServiceAccount's token in place of the admin's credentials.
    let token = lab
        .api
        .kubectl_ok(&["create", "token", "seine-agent", "-n", "seine-rbac-test"])
        .unwrap();
    let mut config: Value = serde_json::from_str(
        &lab.api
            .kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    config["users"][0]["user"] = json!({"token": token.trim()});
    let kubeconfig = std::env::temp_dir().join(format!("{}-agent.kubeconfig", lab.node.prefix));
    std::fs::write(&kubeconfig, config.to_string()).unwrap();
    lab.node.stop_agent().unwrap();
    let at = lab
        .node
        .agent_args
        .iter()
        .position(|a| a == "--kubeconfig")
        .unwrap();
    lab.node.agent_args[at + 1] = kubeconfig.display().to_string();
    lab.node.spawn_agent().unwrap();
    let web = web_service(&lab, "web", json!({}));
    lab.slice(
        "web-1",
        "web",
        http_port(),
        json!([lab.endpoint("backend-1")]),
    )
    .unwrap();
    wait_answers(&lab, web, &["backend-1"]);
    let log = lab.node.agent.as_ref().unwrap().log_text();
    let _ = std::fs::remove_file(&kubeconfig);
    assert!(!log.contains("forbidden"), "{log}");
}
