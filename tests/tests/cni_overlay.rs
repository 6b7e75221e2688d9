//! The pod network across nodes: three node namespaces on a shared underlay, each with a real
//! seine-agent that reads its Node from a real seine-apiserver (on etcd), sets up the VXLAN
//! device, publishes its VTEP and installs the CNI plugin; pods added through the installed
//! plugin and conflist reach pods and services on every node, with full-size packets.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use seine_tests::{
    cni::{cluster, echo_bytes, invoke, ping_df, plugin_config, runtime_version, udp_ask},
    wait_until, Node,
};
use serde_json::json;

fn routes(node: &Node) -> String {
    node.ns.ip(&["route", "show"]).unwrap()
}

#[test]
fn pods_reach_pods_and_services_on_every_node_over_the_overlay() {
    let mut c = cluster("ov", 3).unwrap();

    // Every node published its VTEP; its device is the configured VXLAN device.
    for n in &c.nodes {
        let (_, node) = c.api.get(&format!("/api/v1/nodes/{}", n.name)).unwrap();
        let annotations = &node["metadata"]["annotations"];
        assert_eq!(annotations["seine.io/vtep-ip"], n.ip.to_string(), "{node}");
        let link = n
            .node
            .ns
            .ip(&["-d", "link", "show", "seine.vxlan"])
            .unwrap();
        let mac = annotations["seine.io/vtep-mac"].as_str().unwrap();
        assert!(link.contains(mac), "{link}");
        assert!(link.contains("vxlan id 1 "), "{link}");
        assert!(link.contains("dstport 8472"), "{link}");
        assert!(link.contains("mtu 1450"), "{link}");
        // install-cni: the conflist carries the node's pod CIDR and the overlay MTU.
        let conflist = n.dirs.conflist().unwrap();
        let i = &n.name[5..];
        assert_eq!(
            conflist["plugins"][0]["podCIDR"],
            format!("10.244.{i}.0/24")
        );
        assert_eq!(conflist["plugins"][0]["mtu"], 1450);
        // hostPorts are Seine's own (no portmap), so every CNI version offered is one the
        // whole chain speaks.
        assert_eq!(
            conflist["plugins"].as_array().unwrap().len(),
            1,
            "{conflist}"
        );
        assert_eq!(conflist["plugins"][0]["capabilities"]["portMappings"], true);
        assert_eq!(conflist["cniVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert!(n.dirs.bin().join("seine-cni").exists());
        // Routes to the other nodes' pod CIDRs go over the overlay.
        let r = routes(&n.node);
        for other in c.nodes.iter().filter(|o| o.name != n.name) {
            let j = &other.name[5..];
            let want = format!("10.244.{j}.0/24 via 10.244.{j}.0 dev seine.vxlan");
            assert!(r.contains(&want), "{} lacks {want}:\n{r}", n.name);
        }
        let metrics = n.node.metrics().unwrap();
        assert!(metrics.contains("seine_overlay_peers 2"), "{metrics}");
    }

    c.add_pods(2).unwrap();
    // As a CNI 1.1 runtime runs the installed chain: the highest offered version, and every
    // plugin of the chain answers STATUS (and took the ADDs above) in it.
    for n in &c.nodes {
        let conflist = n.dirs.conflist().unwrap();
        assert_eq!(runtime_version(&conflist), "1.1.0");
        for (i, plugin) in conflist["plugins"].as_array().unwrap().iter().enumerate() {
            let binary = n.dirs.bin().join(plugin["type"].as_str().unwrap());
            let config = plugin_config(&conflist, i, None);
            let out = invoke(&n.node.ns, &binary, &[("CNI_COMMAND", "STATUS")], &config).unwrap();
            assert!(
                out.success,
                "{}: STATUS of {}: {}",
                n.name, plugin["type"], out.raw
            );
        }
    }
    let pods: Vec<(String, Ipv4Addr, String)> = c
        .nodes
        .iter()
        .flat_map(|n| {
            n.node
                .pods
                .iter()
                .map(|p| (p.name.clone(), p.ip, n.name.clone()))
        })
        .collect();
    assert_eq!(pods.len(), 6);
    assert_eq!(
        pods.iter().map(|p| p.1).collect::<BTreeSet<_>>().len(),
        6,
        "distinct addresses"
    );
    // TCP and UDP from every pod to every pod on other nodes.
    for n in &c.nodes {
        for from in &n.node.pods {
            for (name, ip, on) in pods.iter().filter(|p| p.2 != n.name) {
                let to = SocketAddr::from((*ip, 8080));
                let answer = from
                    .http_get(to)
                    .unwrap_or_else(|e| panic!("{} -> {name} on {on}: {e:#}", from.name));
                assert_eq!(&answer, name);
                assert_eq!(
                    &udp_ask(&from.ns, to).unwrap(),
                    name,
                    "UDP {} -> {name}",
                    from.name
                );
            }
        }
    }

    // Full-size packets: the pod MTU fits the overlay, with the DF bit set, across nodes.
    let a = c.node("node-1").node.pods[0].ns.name.clone();
    let from = &c.node("node-1").node.pods[0];
    let remote = c.node("node-2").node.pods[0].ip;
    let pod_mtu = from.ns.ip(&["link", "show", "eth0"]).unwrap();
    assert!(pod_mtu.contains("mtu 1450"), "{pod_mtu}");
    if let Err(e) = ping_df(&from.ns, remote, 1450 - 28) {
        let small = ping_df(&from.ns, remote, 56);
        panic!("a full-size DF ping from {a} to {remote}: {e}\n(56 bytes: {small:?})");
    }
    let over = ping_df(&from.ns, remote, 1450 - 27).expect_err("one byte over the MTU");
    assert!(
        over.contains("message too long") || over.contains("mtu"),
        "refused at the pod: {over}"
    );
    let payload: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let back = echo_bytes(&from.ns, SocketAddr::from((remote, 8081)), payload.clone()).unwrap();
    assert!(back == payload, "2 MB echoed across nodes came back intact");

    // The plugin attached the agent's service programs to the new pods' host veths.
    for pod in &c.node("node-1").node.pods {
        for (direction, program) in [("ingress", "seine_from_pod"), ("egress", "seine_to_pod")] {
            let filters = c
                .node("node-1")
                .node
                .ns
                .exec("tc", &["filter", "show", "dev", &pod.host_if, direction])
                .unwrap();
            assert!(
                filters.contains(program),
                "{} {direction}: {filters}",
                pod.host_if
            );
        }
    }
    // A service on node-1 whose backends are on the other nodes.
    let n1 = &c.node("node-1").node;
    let b2 = c.node("node-2").node.pods[1].ip;
    let b3 = c.node("node-3").node.pods[1].ip;
    for proto in ["tcp", "udp"] {
        n1.seinectl_ok(&[
            "service",
            "upsert",
            "--frontend",
            &format!("10.96.0.10:80/{proto}"),
            "--backend",
            &format!("{b2}:8080"),
            "--backend",
            &format!("{b3}:8080"),
        ])
        .unwrap();
    }
    n1.seinectl_ok(&[
        "service",
        "upsert",
        "--frontend",
        "10.96.0.11:81/tcp",
        "--backend",
        &format!("{b2}:8081"),
    ])
    .unwrap();
    let vip = SocketAddr::from(([10, 96, 0, 10], 80));
    let mut tcp_answers = BTreeSet::new();
    let mut udp_answers = BTreeSet::new();
    for _ in 0..20 {
        tcp_answers.insert(from.http_get(vip).unwrap());
        udp_answers.insert(udp_ask(&from.ns, vip).unwrap());
    }
    let expected: BTreeSet<String> = ["node-2-p1".to_string(), "node-3-p1".to_string()].into();
    assert_eq!(tcp_answers, expected);
    assert_eq!(udp_answers, expected);
    let back = echo_bytes(
        &from.ns,
        SocketAddr::from(([10, 96, 0, 11], 81)),
        payload.clone(),
    )
    .unwrap();
    assert!(
        back == payload,
        "2 MB through a service to another node came back intact"
    );

    // A Node that changes its VTEP, then goes: the others follow.
    let (_, node3) = c.api.get("/api/v1/nodes/node-3").unwrap();
    let old_mac = node3["metadata"]["annotations"]["seine.io/vtep-mac"]
        .as_str()
        .unwrap()
        .to_string();
    let (code, _) = c
        .api
        .merge_patch(
            "/api/v1/nodes/node-3",
            &json!({"metadata": {"annotations": {"seine.io/vtep-mac": "02:00:5e:00:00:33"}}}),
        )
        .unwrap();
    assert_eq!(code, 200);
    let n1 = &c.node("node-1").node;
    let fdb = || {
        n1.ns
            .exec("bridge", &["fdb", "show", "dev", "seine.vxlan"])
            .unwrap()
    };
    let followed = wait_until(Duration::from_secs(10), || {
        let neigh = n1
            .ns
            .ip(&["neigh", "show", "dev", "seine.vxlan"])
            .unwrap_or_default();
        let fdb = fdb();
        neigh.contains("10.244.3.0 lladdr 02:00:5e:00:00:33")
            && fdb.contains("02:00:5e:00:00:33 dst 192.168.60.3")
            && !fdb.contains(&old_mac)
    });
    if followed.is_err() {
        panic!(
            "node-1 did not follow node-3's new VTEP MAC:\n{}\n{}",
            fdb(),
            n1.agent.as_ref().map(|a| a.log_text()).unwrap_or_default()
        );
    }
    let (code, _) = c.api.delete("/api/v1/nodes/node-3", None).unwrap();
    assert_eq!(code, 200);
    for n in ["node-1", "node-2"] {
        let node = &c.node(n).node;
        wait_until(Duration::from_secs(10), || {
            !routes(node).contains("10.244.3.0/24")
        })
        .unwrap_or_else(|_| panic!("{n} kept the route of a deleted Node:\n{}", routes(node)));
        let fdb = node
            .ns
            .exec("bridge", &["fdb", "show", "dev", "seine.vxlan"])
            .unwrap();
        assert!(!fdb.contains("192.168.60.3"), "{fdb}");
        assert!(routes(node).contains("via 10.244."), "the other peer stays");
    }
    // Someone deletes the device: the agent puts it and the entries back.
    n1.ns.ip(&["link", "del", "seine.vxlan"]).unwrap();
    wait_until(Duration::from_secs(15), || {
        routes(n1).contains("10.244.2.0/24 via 10.244.2.0")
    })
    .unwrap();
    let back = from.http_get(SocketAddr::from((remote, 8080))).unwrap();
    assert_eq!(back, "node-2-p0");

    // `seine-agent --cleanup` on node-1 takes the pod network down with the datapath.
    let n1 = &mut c.nodes[0];
    n1.node.stop_agent().unwrap();
    let (bin_dir, conf_dir) = (n1.dirs.bin(), n1.dirs.conf());
    let out = n1.node.ns.exec(
        &seine_tests::bin("seine-agent")
            .unwrap()
            .display()
            .to_string(),
        &[
            "--cleanup",
            "--bpffs-dir",
            &n1.node.bpffs_dir.display().to_string(),
            "--node-name",
            "node-1",
            "--cni-bin-dir",
            &bin_dir.display().to_string(),
            "--cni-conf-dir",
            &conf_dir.display().to_string(),
        ],
    );
    assert!(out.is_ok(), "{out:?}");
    assert!(n1.node.ns.ip(&["link", "show", "seine.vxlan"]).is_err());
    assert!(!routes(&n1.node).contains("10.244.2.0/24"));
    assert!(!conf_dir.join("10-seine.conflist").exists());
    assert!(!bin_dir.join("seine-cni").exists());
}

#[test]
fn an_agent_with_a_missing_kubeconfig_or_plugin_exits_2_saying_which() {
    let node = Node::create("ovbad").unwrap();
    let agent = seine_tests::bin("seine-agent").unwrap();
    let bpffs = node.bpffs_dir.display().to_string();
    let run = |extra: &[&str]| {
        node.ns
            .command(&agent)
            .args([
                "--bpffs-dir",
                &bpffs,
                "--node-name",
                "node-1",
                "--health-addr",
                "127.0.0.1:9962",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--kubeconfig", "/nonexistent/seine.kubeconfig"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/seine.kubeconfig"), "{stderr}");
    let out = run(&[
        "--kubeconfig",
        "/dev/null",
        "--cni-plugin",
        "/nonexistent/seine-cni",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/seine-cni"), "{stderr}");
    // Nothing was loaded or pinned.
    assert!(!node.bpffs_dir.exists());
}
