//! seine-cni as a runtime calls it: the real binary run inside node namespaces on pod namespaces,
//! its results, errors and the state it leaves (veths, routes, allocations), concurrency and
//! plugins killed mid-ADD, chaining with the reference portmap plugin.

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use seine_tests::{
    bin,
    cni::{
        allocated, invoke, plugin_config, reference_plugin, seine_veths, standalone_conflist,
        standalone_node, CniDirs, PluginOutput, Underlay,
    },
    unique_prefix, wait_until, Netns, Node,
};
use serde_json::{json, Value};

const CIDR: &str = "10.244.7.0/24";

/// A node without an agent: an uplink of MTU 9000 with the default route, and the plugin's
/// standalone conflist.
struct Standalone {
    node: Node,
    dirs: CniDirs,
    conflist: Value,
    underlay: Underlay,
}

impl Standalone {
    fn new(tag: &str) -> Self {
        let (node, underlay) = standalone_node(tag, Ipv4Addr::new(192, 168, 50, 1), 9000).unwrap();
        let dirs = CniDirs::create(&node.prefix).unwrap();
        let conflist = standalone_conflist(CIDR, &dirs.data(), &node.bpffs_dir);
        Standalone {
            node,
            dirs,
            conflist,
            underlay,
        }
    }

    fn config(&self) -> Value {
        plugin_config(&self.conflist, 0, None)
    }

    /// The addresses allocated in the store.
    fn allocated(&self) -> Vec<Ipv4Addr> {
        allocated(&self.dirs.data())
    }

    /// The node's Seine veths.
    fn veths(&self) -> Vec<String> {
        seine_veths(&self.node.ns).unwrap()
    }
}

/// ADD of `pod` (its namespace name is the container ID) by the plugin at `plugin` in `node`.
fn add(node: &Netns, plugin: &std::path::Path, pod: &Netns, config: &Value) -> PluginOutput {
    let path = pod.path();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", pod.name.as_str()),
        ("CNI_NETNS", path.as_str()),
        ("CNI_IFNAME", "eth0"),
    ];
    invoke(node, plugin, &env, config).unwrap()
}

fn address_of(result: &Value) -> Ipv4Addr {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {result}"))
}

#[test]
fn bad_input_gets_the_spec_error_codes_and_leaves_nothing() {
    let s = Standalone::new("cnbad");
    let pod = Netns::create(&format!("{}-p", s.node.prefix)).unwrap();
    let plugin = bin("seine-cni").unwrap();
    let netns = pod.path();
    let full = |command: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.to_string()),
            ("CNI_CONTAINERID", "c1".to_string()),
            ("CNI_NETNS", netns.clone()),
            ("CNI_IFNAME", "eth0".to_string()),
        ]
    };
    let call = |env: Vec<(&str, String)>, config: &Value| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        invoke(&s.node.ns, &plugin, &env, config).unwrap()
    };

    // VERSION answers in the caller's version and lists every version.
    let version = call(
        vec![("CNI_COMMAND", "VERSION".into())],
        &json!({"cniVersion": "1.0.0"}),
    )
    .ok()
    .unwrap();
    assert_eq!(version["cniVersion"], "1.0.0");
    assert_eq!(
        version["supportedVersions"],
        json!(["0.4.0", "1.0.0", "1.1.0"])
    );

    // Missing environment: code 4, naming what is missing.
    for missing in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
        let env: Vec<_> = full("ADD")
            .into_iter()
            .filter(|(k, _)| *k != missing)
            .collect();
        let out = call(env, &s.config());
        assert!(!out.success);
        assert_eq!(out.code(), Some(4), "{missing}: {}", out.raw);
        assert!(out.json["msg"].as_str().unwrap().len() > 5);
        assert!(out.raw.contains(missing), "{}", out.raw);
    }
    // A container ID or interface name the spec does not allow: 4.
    let mut bad_if = full("ADD");
    bad_if[3].1 = "eth0/../x".into();
    assert_eq!(call(bad_if, &s.config()).code(), Some(4));

    // Not JSON: 6. JSON but not a configuration: 7. An unknown version: 1.
    let out = {
        let mut child = s
            .node
            .ns
            .command(&plugin)
            .envs(full("ADD").iter().map(|(k, v)| (*k, v.as_str())))
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"{\"cniVersion\": ")
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(!out.status.success());
    let error: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(error["code"], 6, "{error}");
    assert_eq!(call(full("ADD"), &json!([1, 2])).code(), Some(7));
    assert_eq!(
        call(
            full("ADD"),
            &json!({"cniVersion": "1.0.0", "type": "seine-cni"})
        )
        .code(),
        Some(7),
        "no name"
    );
    let mut bad_cidr = s.config();
    bad_cidr["podCIDR"] = json!("10.244.0.0/33");
    let out = call(full("ADD"), &bad_cidr);
    assert_eq!(out.code(), Some(7));
    assert!(out.raw.contains("podCIDR"), "{}", out.raw);
    let mut old = s.config();
    old["cniVersion"] = json!("0.2.0");
    let out = call(full("ADD"), &old);
    assert_eq!(out.code(), Some(1));
    assert!(out.raw.contains("0.2.0"), "{}", out.raw);
    // A namespace that is not there: 3.
    let mut gone = full("ADD");
    gone[2].1 = "/var/run/netns/does-not-exist-seine".into();
    assert_eq!(call(gone, &s.config()).code(), Some(3));

    // An ADD that fails halfway (the pod already has an eth0) gives its address back.
    pod.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
    ])
    .unwrap();
    let out = call(full("ADD"), &s.config());
    assert!(!out.success);
    assert!(out.raw.contains("exists"), "{}", out.raw);
    pod.ip(&["link", "del", "eth0"]).unwrap();

    // None of it left a veth, an allocation or an address in the pod.
    assert!(s.veths().is_empty(), "{:?}", s.veths());
    assert!(s.allocated().is_empty(), "{:?}", s.allocated());
    let inside = pod.ip(&["-o", "addr", "show"]).unwrap();
    assert!(!inside.contains("10.244."), "{inside}");
}

#[test]
fn add_check_del_gc_and_status_do_what_the_spec_says() {
    let mut s = Standalone::new("cnlife");
    let config = s.config();
    let a = s.node.add_cni_pod("a", &config).unwrap();
    let b = s.node.add_cni_pod("b", &config).unwrap();
    let (ip_a, ip_b) = (address_of(&a), address_of(&b));
    assert_ne!(ip_a, ip_b);
    for ip in [ip_a, ip_b] {
        assert_eq!(ip.octets()[..3], [10, 244, 7], "{ip} from {CIDR}");
        assert!(
            ip.octets()[3] > 1,
            "{ip}: not the network or gateway address"
        );
    }
    // The result, as the spec lays it out.
    assert_eq!(a["cniVersion"], "1.0.0");
    assert_eq!(a["ips"][0]["gateway"], "10.244.7.1");
    assert_eq!(a["ips"][0]["interface"], 1);
    assert_eq!(a["interfaces"][1]["name"], "eth0");
    assert_eq!(a["interfaces"][1]["sandbox"], s.node.pod("a").ns.path());
    assert_eq!(a["routes"][0]["dst"], "0.0.0.0/0");

    // Inside the pod: the address, the default route through the node, the uplink's MTU - 50.
    let pod_a = &s.node.pod("a").ns;
    let addr = pod_a
        .ip(&["-o", "-4", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(addr.contains(&format!("{ip_a}/32")), "{addr}");
    let link = pod_a.ip(&["link", "show", "eth0"]).unwrap();
    assert!(link.contains("mtu 8950"), "{link}");
    let routes = pod_a.ip(&["route", "show"]).unwrap();
    assert!(
        routes.contains("default via 10.244.7.1 dev eth0"),
        "{routes}"
    );
    // On the node: the host side is up with the /32 route.
    let host_if = s.node.pod("a").host_if.clone();
    let node_routes = s.node.ns.ip(&["route", "show"]).unwrap();
    assert!(
        node_routes.contains(&format!("{ip_a} dev {host_if}")),
        "{node_routes}"
    );

    // Pods talk to each other through the node.
    s.node.pod_mut("b").serve(8080).unwrap();
    let answer = s
        .node
        .pod("a")
        .http_get(SocketAddr::from((ip_b, 8080)))
        .unwrap();
    assert_eq!(answer, "b");

    // CHECK passes on what ADD built, and fails (code 100) once something is off.
    let mut check = config.clone();
    check["prevResult"] = a.clone();
    let pod_a_path = s.node.pod("a").ns.path();
    let pod_a_name = s.node.pod("a").ns.name.clone();
    let out = s
        .node
        .cni("CHECK", &pod_a_name, Some(&pod_a_path), "eth0", &check)
        .unwrap();
    assert!(out.success, "{}", out.raw);
    s.node.pod("a").ns.ip(&["route", "del", "default"]).unwrap();
    let out = s
        .node
        .cni("CHECK", &pod_a_name, Some(&pod_a_path), "eth0", &check)
        .unwrap();
    assert_eq!(out.code(), Some(100), "{}", out.raw);
    assert!(out.raw.contains("default route"), "{}", out.raw);

    // STATUS: fine here; 50 without a pod CIDR (the node's network is not configured).
    let status = s.node.cni("STATUS", "", None, "", &config).unwrap();
    assert!(status.success, "{}", status.raw);
    let mut unconfigured = config.clone();
    unconfigured.as_object_mut().unwrap().remove("podCIDR");
    let status = s.node.cni("STATUS", "", None, "", &unconfigured).unwrap();
    assert_eq!(status.code(), Some(50), "{}", status.raw);
    let mut no_overlay = config.clone();
    no_overlay["vxlanDevice"] = json!("seine.vxlan");
    let status = s.node.cni("STATUS", "", None, "", &no_overlay).unwrap();
    assert_eq!(status.code(), Some(50), "{}", status.raw);
    assert!(
        status.raw.contains("seine.vxlan is missing"),
        "{}",
        status.raw
    );

    // DEL removes the veth and the address; again is fine; so is a pod whose netns is gone.
    let out = s
        .node
        .cni("DEL", &pod_a_name, Some(&pod_a_path), "eth0", &config)
        .unwrap();
    assert!(out.success, "{}", out.raw);
    assert!(!s.veths().contains(&host_if));
    assert!(!s.allocated().contains(&ip_a));
    let again = s
        .node
        .cni("DEL", &pod_a_name, Some(&pod_a_path), "eth0", &config)
        .unwrap();
    assert!(again.success, "{}", again.raw);
    let pod_b_name = s.node.pod("b").ns.name.clone();
    let pod_b_path = s.node.pod("b").ns.path();
    let index_b = s.node.pods.iter().position(|p| p.name == "b").unwrap();
    drop(s.node.pods.remove(index_b));
    let out = s
        .node
        .cni("DEL", &pod_b_name, Some(&pod_b_path), "eth0", &config)
        .unwrap();
    assert!(out.success, "{}", out.raw);
    assert!(!s.allocated().contains(&ip_b), "released without the netns");

    // GC keeps the valid attachments and releases everything else.
    let c = s.node.add_cni_pod("c", &config).unwrap();
    let d = s.node.add_cni_pod("d", &config).unwrap();
    let c_id = s.node.pod("c").ns.name.clone();
    let mut gc = config.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": c_id, "ifname": "eth0"}]);
    let out = s.node.cni("GC", "", None, "", &gc).unwrap();
    assert!(out.success, "{}", out.raw);
    assert_eq!(s.allocated(), vec![address_of(&c)]);
    assert_eq!(s.veths(), vec![s.node.pod("c").host_if.clone()]);
    assert!(!s.allocated().contains(&address_of(&d)));
    let gone = s.node.pod("d").ns.ip(&["-o", "link", "show"]).unwrap();
    assert!(!gone.contains("eth0"), "{gone}");
}

/// The store's addresses and the pods' addresses agree and are all distinct.
fn assert_distinct(s: &Standalone, pods: &[(String, Ipv4Addr)]) {
    let ips: HashSet<Ipv4Addr> = pods.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(
        ips.len(),
        pods.len(),
        "an address handed out twice: {pods:?}"
    );
    let stored: HashSet<Ipv4Addr> = s.allocated().into_iter().collect();
    assert!(ips.is_subset(&stored));
}

#[test]
fn a_hundred_concurrent_adds_and_plugins_killed_mid_add_never_share_an_address() {
    let s = Standalone::new("cnconc");
    let config = s.config();
    let plugin = bin("seine-cni").unwrap();
    let prefix = unique_prefix("cc");
    let pods: Vec<Netns> = (0..100)
        .map(|i| Netns::create(&format!("{prefix}-{i}")).unwrap())
        .collect();
    let results: Vec<(String, Ipv4Addr)> = std::thread::scope(|scope| {
        let handles: Vec<_> = pods
            .iter()
            .map(|pod| {
                let (plugin, config, node) = (&plugin, &config, &s.node.ns);
                scope.spawn(move || {
                    let out = add(node, plugin, pod, config).ok().unwrap();
                    (pod.name.clone(), address_of(&out))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.len(), 100);
    assert_distinct(&s, &results);
    assert_eq!(s.veths().len(), 100);

    // Plugins killed (SIGKILL: no cleanup of their own) in the middle of ADD: half of them as
    // soon as their address is written, half as soon as their veth appears.
    let victims: Vec<Netns> = (0..20)
        .map(|i| Netns::create(&format!("{prefix}-k{i}")).unwrap())
        .collect();
    let store = s.dirs.data().join("seine");
    for (i, pod) in victims.iter().enumerate() {
        let veth = seine_cni::plugin::host_veth_name(&pod.name, "eth0");
        let mut child = s
            .node
            .ns
            .command(&plugin)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", &pod.name)
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(&serde_json::to_vec(&config).unwrap())
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let reached = if i % 2 == 0 {
                std::fs::read_dir(&store).is_ok_and(|d| {
                    d.flatten().any(|e| {
                        std::fs::read_to_string(e.path()).is_ok_and(|t| t.starts_with(&pod.name))
                    })
                })
            } else {
                s.node.ns.ip(&["link", "show", &veth]).is_ok()
            };
            if reached
                || std::time::Instant::now() > deadline
                || child.try_wait().unwrap().is_some()
            {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let live: Vec<Ipv4Addr> = results.iter().map(|(_, ip)| *ip).collect();
    let leaked_addresses = s.allocated().len() - live.len();
    let leaked_veths = s.veths().len() - live.len();
    eprintln!("killed ADDs left {leaked_addresses} addresses and {leaked_veths} veths");
    assert!(
        leaked_addresses > 0,
        "no ADD was caught mid-way: the test did not exercise a crash"
    );
    // GC with the 100 live pods valid releases every leftover of the killed ones.
    let mut gc = config.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!(results
        .iter()
        .map(|(id, _)| json!({"containerID": id, "ifname": "eth0"}))
        .collect::<Vec<_>>());
    let out = s.node.cni("GC", "", None, "", &gc).unwrap();
    assert!(out.success, "{}", out.raw);
    let stored: HashSet<Ipv4Addr> = s.allocated().into_iter().collect();
    assert_eq!(
        stored,
        live.iter().copied().collect(),
        "GC reclaimed the leaks"
    );
    assert_eq!(s.veths().len(), 100, "the killed ADDs' veths are gone");

    // The killed pods are added again (a runtime's retry): fresh, distinct addresses.
    let mut all = results.clone();
    for pod in &victims {
        let out = add(&s.node.ns, &plugin, pod, &config).ok().unwrap();
        all.push((pod.name.clone(), address_of(&out)));
    }
    assert_distinct(&s, &all);
    assert_eq!(s.veths().len(), 120);
}

#[test]
fn chains_with_the_reference_portmap_plugin() {
    let mut s = Standalone::new("cnpm");
    let client = Netns::create(&format!("{}-cl", s.node.prefix)).unwrap();
    s.underlay
        .connect(&client, Ipv4Addr::new(192, 168, 50, 9), 1500)
        .unwrap();
    let first = plugin_config(&s.conflist, 0, None);
    let result = s.node.add_cni_pod("web", &first).unwrap();
    s.node.pod_mut("web").serve(8080).unwrap();
    let (id, netns) = (
        s.node.pod("web").ns.name.clone(),
        s.node.pod("web").ns.path(),
    );
    let mut second = plugin_config(&s.conflist, 1, Some(&result));
    second["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]});
    let chained = reference_plugin(&s.node.ns, "portmap", "ADD", &id, &netns, &second)
        .unwrap()
        .ok()
        .unwrap();
    // portmap passes Seine's result on.
    assert_eq!(chained["ips"], result["ips"]);
    // A client on the underlay reaches the pod through the node's host port.
    let answer = client
        .run(|| seine_tests::http_get(SocketAddr::from(([192, 168, 50, 1], 18080))))
        .unwrap()
        .unwrap();
    assert_eq!(answer, "web");
    // CHECK down the chain, then DEL in reverse order.
    let mut check = plugin_config(&s.conflist, 0, Some(&chained));
    check["runtimeConfig"] = json!({});
    let out = s
        .node
        .cni("CHECK", &id, Some(&netns), "eth0", &check)
        .unwrap();
    assert!(out.success, "{}", out.raw);
    let mut del_pm = plugin_config(&s.conflist, 1, Some(&chained));
    del_pm["runtimeConfig"] = second["runtimeConfig"].clone();
    reference_plugin(&s.node.ns, "portmap", "DEL", &id, &netns, &del_pm)
        .unwrap()
        .ok()
        .unwrap();
    let out = s
        .node
        .cni("DEL", &id, Some(&netns), "eth0", &first)
        .unwrap();
    assert!(out.success, "{}", out.raw);
    assert!(s.allocated().is_empty());
    let gone = client.run(|| seine_tests::http_get(SocketAddr::from(([192, 168, 50, 1], 18080))));
    assert!(gone.unwrap().is_err(), "the host port is closed after DEL");
}

/// hostPorts without portmap: seine-cni records the runtime's `portMappings` and the agent
/// programs them in its own datapath, so a client outside the node, a pod on it and the node's
/// own processes reach the pod through the node's address; DEL closes the port again.
fn host_ports_in_seines_own_datapath(tag: &str, datapath: &str) {
    let mut s = Standalone::new(tag);
    let client = Netns::create(&format!("{}-cl", s.node.prefix)).unwrap();
    s.underlay
        .connect(&client, Ipv4Addr::new(192, 168, 50, 9), 1500)
        .unwrap();
    let data = s.dirs.data().display().to_string();
    s.node
        .start_agent(&["--datapath", datapath, "--cni-data-dir", &data])
        .unwrap();
    let mut config = s.config();
    config["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 8080, "protocol": "tcp"}]});
    let result = s.node.add_cni_pod("web", &config).unwrap();
    s.node.pod_mut("web").serve(8080).unwrap();
    s.node.add_cni_pod("peer", &s.config()).unwrap();
    let host_port = SocketAddr::from(([192, 168, 50, 1], 18080));
    let from_outside = || {
        client
            .run(move || seine_tests::http_get(host_port))
            .unwrap()
    };
    wait_until(Duration::from_secs(10), || {
        from_outside().is_ok_and(|a| a == "web")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{datapath}: the host port from outside the node: {e}: {:?}\n{}",
            from_outside(),
            s.node.agent.as_ref().unwrap().log_text()
        )
    });
    assert_eq!(
        s.node.pod("peer").http_get(host_port).unwrap(),
        "web",
        "{datapath}: a pod on the node reaches the host port"
    );
    let from_node = s
        .node
        .host_exec(
            "curl",
            &["-sS", "--max-time", "3", "http://192.168.50.1:18080/"],
        )
        .unwrap();
    assert_eq!(
        from_node.trim(),
        "web",
        "{datapath}: the node's own processes reach the host port"
    );
    if datapath == "ebpf" {
        let lb = s.node.seinectl_json(&["bpf", "lb", "list"]).unwrap();
        assert!(
            lb.as_array()
                .unwrap()
                .iter()
                .any(|e| e["frontend"] == "192.168.50.1:18080/TCP"),
            "{lb}"
        );
    }

    // CHECK holds the runtime to the host ports it recorded.
    let (id, netns) = (
        s.node.pod("web").ns.name.clone(),
        s.node.pod("web").ns.path(),
    );
    let mut check = plugin_config(&s.conflist, 0, Some(&result));
    check["runtimeConfig"] = config["runtimeConfig"].clone();
    let out = s
        .node
        .cni("CHECK", &id, Some(&netns), "eth0", &check)
        .unwrap();
    assert!(out.success, "{}", out.raw);
    check["runtimeConfig"] =
        json!({"portMappings": [{"hostPort": 18081, "containerPort": 8080, "protocol": "tcp"}]});
    let out = s
        .node
        .cni("CHECK", &id, Some(&netns), "eth0", &check)
        .unwrap();
    assert_eq!(out.code(), Some(100), "{}", out.raw);

    // GC keeps the host ports of valid attachments and drops the others'.
    let peer = s.node.pod("peer").ns.name.clone();
    let mut gc = s.config();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": id, "ifname": "eth0"},
                                             {"containerID": peer, "ifname": "eth0"}]);
    let out = s.node.cni("GC", "", None, "", &gc).unwrap();
    assert!(out.success, "{}", out.raw);
    assert_eq!(
        from_outside().unwrap(),
        "web",
        "{datapath}: GC keeps a live pod's host port"
    );
    let records = || seine_agent::hostport::read_all(&seine_agent::hostport::dir(&s.dirs.data())).0;
    assert_eq!(records().len(), 1);
    gc["cni.dev/valid-attachments"] = json!([{"containerID": peer, "ifname": "eth0"}]);
    let out = s.node.cni("GC", "", None, "", &gc).unwrap();
    assert!(out.success, "{}", out.raw);
    wait_until(Duration::from_secs(10), || from_outside().is_err())
        .unwrap_or_else(|e| panic!("{datapath}: the host port stays open after GC: {e}"));
    assert!(
        records().is_empty(),
        "GC removes the stale pod's host ports"
    );

    // DEL after GC still succeeds (nothing left to remove is fine).
    let out = s
        .node
        .cni("DEL", &id, Some(&netns), "eth0", &config)
        .unwrap();
    assert!(out.success, "{}", out.raw);
}

#[test]
fn host_ports_with_the_ebpf_datapath() {
    host_ports_in_seines_own_datapath("cnhpe", "ebpf");
}

#[test]
fn host_ports_with_the_iptables_datapath() {
    host_ports_in_seines_own_datapath("cnhpi", "iptables");
}

/// Chaining stays possible: with Debian's portmap chained, the conflist offers only the CNI
/// versions portmap speaks too.
#[test]
fn a_chained_plugin_narrows_the_offered_versions_to_what_it_speaks() {
    let portmap = std::path::Path::new(seine_tests::cni::REFERENCE_PLUGINS).join("portmap");
    let out = std::process::Command::new(&portmap)
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let supported: Vec<&str> = answer["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let versions = seine_agent::nodenet::chain_versions(
        std::path::Path::new(seine_tests::cni::REFERENCE_PLUGINS),
        &["portmap".to_string()],
    )
    .unwrap();
    assert!(!versions.is_empty());
    for v in &versions {
        assert!(
            supported.contains(&v.as_str()),
            "{v} offered, portmap speaks {supported:?}"
        );
    }
    for v in ["0.4.0", "1.0.0", "1.1.0"] {
        assert_eq!(
            versions.iter().any(|o| o == v),
            supported.contains(&v),
            "{v}: every version both speak is offered"
        );
    }
}
