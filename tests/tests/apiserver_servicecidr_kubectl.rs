//! `kubectl get servicecidrs,ipaddresses` against a dual-stack seine-apiserver on a real etcd:
//! discovery finds both networking.k8s.io/v1 resources, the default "kubernetes" ServiceCIDR
//! holds the flag's two ranges, and each cluster IP of a service is an IPAddress object.

use seine_tests::{apiserver::ApiServer, etcd::Etcd};
use serde_json::Value;

#[test]
fn kubectl_lists_service_cidrs_and_ip_addresses() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start_with(
        &etcd,
        &[
            "--service-cluster-ip-range",
            "10.96.0.0/12,fd00:10:96::/112",
        ],
    )
    .unwrap();
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
    assert_eq!(
        web["spec"]["ipFamilies"],
        serde_json::json!(["IPv4", "IPv6"])
    );

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
        serde_json::json!(["10.96.0.0/12", "fd00:10:96::/112"])
    );
    let address: Value = serde_json::from_str(
        &server
            .kubectl_ok(&["get", "ipaddress", &ips[1], "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(address["spec"]["parentRef"]["resource"], "services");
    assert_eq!(address["spec"]["parentRef"]["name"], "web");

    // Deleting the service gives both addresses back.
    server.kubectl_ok(&["delete", "service", "web"]).unwrap();
    let left = server
        .kubectl_ok(&["get", "ipaddresses", "-o", "name"])
        .unwrap();
    for ip in &ips {
        assert!(!left.contains(ip.as_str()), "{ip} still held:\n{left}");
    }
}
