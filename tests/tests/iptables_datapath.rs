//! What is particular to the rule datapaths (iptables, nftables) and to mode selection: the
//! fallback when eBPF cannot be used, partial syncs and the repairing full resync, both iptables
//! backends, and switching modes without leaving rules, tables, filters or pins behind.

use std::{path::Path, time::Duration};

use seine_agent::{
    datapath::{iptables::IptablesBackend, nftables::NftablesDatapath},
    model::ServiceSpec,
};
use seine_tests::{topology, vip, wait_until, Node};

const PORT: u16 = 8080;

fn service(node: &Node, frontend: &str, pods: &[&str]) -> ServiceSpec {
    ServiceSpec {
        frontend: frontend.parse().unwrap(),
        backends: pods
            .iter()
            .map(|p| format!("{}:{PORT}", node.pod(p).ip).parse().unwrap())
            .collect(),
        affinity_timeout_secs: None,
    }
}

fn save(node: &Node, backend: &str) -> String {
    node.ns
        .exec(&format!("iptables-{backend}-save"), &[])
        .unwrap()
}

/// The chain that the services chain sends `frontend` to (its comment names the frontend).
fn service_chain(node: &Node, frontend: &str) -> String {
    let rules = save(node, "nft");
    let line = rules
        .lines()
        .find(|l| l.starts_with("-A SEINE-SERVICES") && l.contains(frontend))
        .unwrap_or_else(|| panic!("no rule for {frontend} in\n{rules}"));
    line.rsplit("-j ").next().unwrap().trim().to_string()
}

fn status(node: &Node) -> serde_json::Value {
    node.seinectl_json(&["status"]).unwrap()
}

/// Without eBPF, `auto` falls back as kube-proxy users expect: to the nftables mode where nft is
/// the system's iptables backend and `nft` is installed (Debian 12), else to iptables.
#[test]
fn auto_mode_falls_back_without_cap_bpf_and_services_still_work() {
    let mut node = topology("fb", 2, PORT).unwrap();
    // Root, but without the capabilities the bpf() syscall needs.
    node.agent_wrapper = ["setpriv", "--bounding-set=-bpf,-sys_admin,-perfmon", "--"]
        .map(String::from)
        .to_vec();
    node.start_agent(&["--datapath", "auto"]).unwrap();
    let nft_system = node.ns.run(IptablesBackend::detect).unwrap().unwrap() == IptablesBackend::Nft;
    let expected = if nft_system && NftablesDatapath::available() {
        "nftables"
    } else {
        "iptables"
    };

    let status = status(&node);
    assert_eq!(status["mode"], expected, "{status}");
    assert_eq!(status["running"], true);
    let reason = status["fallback_reason"].as_str().unwrap();
    assert!(
        reason.contains("Operation not permitted") || reason.contains("permission"),
        "{reason}"
    );
    assert!(node
        .metrics()
        .unwrap()
        .contains(&format!("seine_datapath_mode{{mode=\"{expected}\"}} 1")));
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(log.contains("falling back"), "{log}");

    node.set_service(service(
        &node,
        "10.96.8.1:80/tcp",
        &["backend-1", "backend-2"],
    ))
    .unwrap();
    let answer = node.pod("client").http_get(vip("10.96.8.1:80")).unwrap();
    assert!(answer.starts_with("backend-"), "{answer}");
    if expected == "nftables" {
        let table = node
            .ns
            .exec("nft", &["list", "table", "ip", "seine"])
            .unwrap();
        assert!(table.contains("10.96.8.1 . tcp . 80"), "{table}");
        assert!(
            !save(&node, "nft").contains("SEINE-SERVICES"),
            "no iptables rules beside it"
        );
    } else {
        assert!(save(&node, "nft").contains("-A SEINE-SERVICES"));
    }
}

#[test]
fn a_change_rewrites_only_its_own_chains() {
    let mut node = topology("pt", 2, PORT).unwrap();
    node.start_agent(&[
        "--datapath",
        "iptables",
        "--iptables-resync-seconds",
        "3600",
    ])
    .unwrap();
    node.set_service(service(&node, "10.96.9.1:80/tcp", &["backend-1"]))
        .unwrap();
    node.set_service(service(&node, "10.96.9.2:80/tcp", &["backend-1"]))
        .unwrap();

    // A rule added by hand to the second service's chain survives a change of the first service,
    // which a rewrite of every chain would have removed.
    let other = service_chain(&node, "10.96.9.2:80/TCP");
    node.ns
        .exec(
            "iptables-nft",
            &[
                "-t",
                "nat",
                "-A",
                &other,
                "-m",
                "comment",
                "--comment",
                "marker",
                "-j",
                "RETURN",
            ],
        )
        .unwrap();
    node.set_service(service(&node, "10.96.9.1:80/tcp", &["backend-2"]))
        .unwrap();

    let rules = save(&node, "nft");
    assert!(
        rules.contains(&format!("-A {other} -m comment --comment marker -j RETURN")),
        "{rules}"
    );
    assert_eq!(
        node.pod("client").http_get(vip("10.96.9.1:80")).unwrap(),
        "backend-2"
    );
    assert_eq!(
        node.pod("client").http_get(vip("10.96.9.2:80")).unwrap(),
        "backend-1"
    );

    // A new Service, and one gone: their lines come and go alone, and the services chain keeps
    // what else it holds (a rule with no target, which every packet passes).
    node.ns
        .exec(
            "iptables-nft",
            &[
                "-t",
                "nat",
                "-A",
                "SEINE-SERVICES",
                "-m",
                "comment",
                "--comment",
                "marker",
            ],
        )
        .unwrap();
    node.set_service(service(&node, "10.96.9.3:80/tcp", &["backend-1"]))
        .unwrap();
    assert_eq!(
        node.pod("client").http_get(vip("10.96.9.3:80")).unwrap(),
        "backend-1"
    );
    node.remove_service(&"10.96.9.1:80/tcp".parse().unwrap())
        .unwrap();
    let rules = save(&node, "nft");
    assert!(
        rules.contains("-A SEINE-SERVICES -m comment --comment marker\n"),
        "{rules}"
    );
    assert!(!rules.contains("10.96.9.1/32"), "{rules}");
}

#[test]
fn the_full_resync_repairs_rules_removed_by_someone_else() {
    let mut node = topology("rp", 1, PORT).unwrap();
    node.start_agent(&["--datapath", "iptables", "--iptables-resync-seconds", "1"])
        .unwrap();
    node.set_service(service(&node, "10.96.10.1:80/tcp", &["backend-1"]))
        .unwrap();
    let addr = vip("10.96.10.1:80");
    assert_eq!(node.pod("client").http_get(addr).unwrap(), "backend-1");

    // Someone flushes Seine's services chain and removes the jump into it.
    node.ns
        .exec("iptables-nft", &["-t", "nat", "-F", "SEINE-SERVICES"])
        .unwrap();
    node.ns
        .exec(
            "iptables-nft",
            &[
                "-t",
                "nat",
                "-D",
                "PREROUTING",
                "-m",
                "comment",
                "--comment",
                "seine service portals",
                "-j",
                "SEINE-SERVICES",
            ],
        )
        .unwrap();
    wait_until(Duration::from_secs(15), || {
        node.pod("client")
            .http_get(addr)
            .is_ok_and(|a| a == "backend-1")
    })
    .unwrap();
    let rules = save(&node, "nft");
    assert_eq!(
        rules.matches("-j SEINE-SERVICES").count(),
        5,
        "jumps after repair:\n{rules}"
    );
}

#[test]
fn the_legacy_backend_works_as_well_as_nft() {
    let mut node = topology("lg", 2, PORT).unwrap();
    node.start_agent(&["--datapath", "iptables", "--iptables-backend", "legacy"])
        .unwrap();
    assert_eq!(status(&node)["iptables_backend"], "legacy");
    node.set_service(service(
        &node,
        "10.96.11.1:80/tcp",
        &["backend-1", "backend-2"],
    ))
    .unwrap();
    node.set_service(service(&node, "10.96.11.2:80/tcp", &[]))
        .unwrap();
    assert!(node
        .pod("client")
        .http_get(vip("10.96.11.1:80"))
        .unwrap()
        .starts_with("backend-"));
    let refused = node
        .pod("client")
        .run(|| {
            std::net::TcpStream::connect_timeout(&vip("10.96.11.2:80"), Duration::from_secs(5))
                .map(|_| ())
                .map_err(|e| e.kind())
        })
        .unwrap();
    assert_eq!(refused, Err(std::io::ErrorKind::ConnectionRefused));
    assert!(save(&node, "legacy").contains("-A SEINE-SERVICES"));
    assert!(
        !save(&node, "nft").contains("SEINE-"),
        "rules leaked into the nft backend"
    );
}

#[test]
fn switching_modes_and_cleanup_leave_nothing_behind() {
    let mut node = topology("sw", 1, PORT).unwrap();
    let spec = service(&node, "10.96.12.1:80/tcp", &["backend-1"]);
    let addr = vip("10.96.12.1:80");
    let host_if = node.pod("client").host_if.clone();
    let filters = |node: &Node| {
        ["ingress", "egress"]
            .map(|dir| {
                node.ns
                    .exec("tc", &["filter", "show", "dev", &host_if, dir])
                    .unwrap()
            })
            .concat()
    };

    node.start_agent(&["--datapath", "ebpf"]).unwrap();
    node.set_service(spec.clone()).unwrap();
    assert_eq!(node.pod("client").http_get(addr).unwrap(), "backend-1");
    assert!(filters(&node).contains("seine_from_pod"));
    node.stop_agent().unwrap();

    node.start_agent(&["--datapath", "iptables"]).unwrap();
    assert!(
        !filters(&node).contains("seine_"),
        "eBPF filters left in iptables mode"
    );
    assert!(!node.bpffs_dir.exists(), "pins left in iptables mode");
    assert_eq!(node.pod("client").http_get(addr).unwrap(), "backend-1");
    node.stop_agent().unwrap();

    let seine_table = |node: &Node| {
        node.ns
            .exec("nft", &["list", "tables"])
            .unwrap()
            .contains("table ip seine")
    };
    node.start_agent(&["--datapath", "nftables"]).unwrap();
    assert!(
        !save(&node, "nft").contains("SEINE-"),
        "iptables rules left in nftables mode"
    );
    assert!(seine_table(&node));
    assert_eq!(node.pod("client").http_get(addr).unwrap(), "backend-1");
    node.stop_agent().unwrap();

    node.start_agent(&["--datapath", "ebpf"]).unwrap();
    assert!(!seine_table(&node), "the nftables table left in eBPF mode");
    assert_eq!(node.pod("client").http_get(addr).unwrap(), "backend-1");
    node.stop_agent().unwrap();

    node.start_agent(&["--datapath", "nftables"]).unwrap();
    node.stop_agent().unwrap();
    node.cleanup_agent().unwrap();
    assert!(!seine_table(&node), "cleanup leaves no nftables table");
    assert!(!filters(&node).contains("seine_"));
    assert!(!Path::new(&node.bpffs_dir).exists());
    for backend in ["nft", "legacy"] {
        assert!(!save(&node, backend).contains("SEINE-"), "{backend}");
    }
}
