//! A real runtime: containerd (Debian's, with runc) in a node namespace runs a container with
//! `ctr run --cni` and Seine's conflist; the container gets its address from seine-cni, reaches a
//! pod, and `--rm` gives everything back through DEL.

use std::net::Ipv4Addr;

use seine_tests::{
    bin,
    cni::{allocated, plugin_config, seine_veths, standalone_conflist, standalone_node, CniDirs},
    containerd::Containerd,
};

#[test]
fn containerd_runs_a_container_on_the_seine_network() {
    let (mut node, _underlay) =
        standalone_node("ctd", Ipv4Addr::new(192, 168, 70, 1), 1500).unwrap();
    let dirs = CniDirs::create(&node.prefix).unwrap();
    let conflist = standalone_conflist("10.244.9.0/24", &dirs.data(), &node.bpffs_dir);
    // A pod made by calling the plugin directly, sharing the node's address store.
    node.add_cni_pod("web", &plugin_config(&conflist, 0, None))
        .unwrap();
    node.pod_mut("web").serve(8080).unwrap();
    let web = node.pod("web").ip;

    let containerd = Containerd::start(&node.ns, &node.prefix).unwrap();
    let image = containerd.import_busybox().unwrap();
    let plugin = bin("seine-cni").unwrap();
    let portmap = std::path::Path::new("/usr/lib/cni/portmap");
    let out = containerd
        .run_with_cni(
            &node.ns,
            &conflist,
            &[&plugin, portmap],
            &image,
            "c1",
            &format!("ip -4 -o addr show dev eth0; ip route; wget -q -O - http://{web}:8080/"),
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ctr run failed:\n{stdout}\n{stderr}");
    // The container's eth0 holds an address of the node's pod CIDR, not the web pod's.
    let inet = stdout
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no address in:\n{stdout}"));
    let ip: Ipv4Addr = inet.split('/').next().unwrap().parse().unwrap();
    assert_eq!(ip.octets()[..3], [10, 244, 9], "{stdout}");
    assert_ne!(ip, web);
    assert!(
        stdout.contains("default via 10.244.9.1 dev eth0"),
        "{stdout}"
    );
    // It reached the pod through the node.
    assert!(
        stdout.lines().any(|l| l.trim() == "web"),
        "{stdout}\n{stderr}"
    );
    // --rm ran DEL: the address is free again and the container's veth is gone.
    assert_eq!(allocated(&dirs.data()), vec![web]);
    assert_eq!(
        seine_veths(&node.ns).unwrap(),
        vec![node.pod("web").host_if.clone()],
        "only the web pod's veth is left"
    );
}
