//! The service-cidr controller in the real seine-controller-manager, against a real etcd and
//! seine-apiserver: ServiceCIDRs get their finalizer and Ready condition, and a deleted one stays
//! Terminating (taking no new addresses) while a Service's cluster IP lies in it and in no other
//! range, then goes once the Service does or a wider range covers it.

use seine_tests::controllers::Cluster;
use serde_json::{json, Value};

const CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";
const SVCS: &str = "/api/v1/namespaces/default/services";
const FINALIZER: &str = "networking.k8s.io/service-cidr-finalizer";

fn service_cidr(name: &str, cidr: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
           "metadata": {"name": name}, "spec": {"cidrs": [cidr]}})
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({"metadata": {"name": name},
           "spec": {"clusterIP": cluster_ip, "ports": [{"port": 80}]}})
}

/// The ServiceCIDR's Ready condition as (status, reason), if it is there.
fn ready(cluster: &Cluster, name: &str) -> Option<(String, String)> {
    let (code, cidr) = cluster.api.get(&format!("{CIDRS}/{name}")).ok()?;
    if code != 200 {
        return None;
    }
    let ready = cidr["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?;
    Some((
        ready["status"].as_str()?.to_string(),
        ready["reason"].as_str().unwrap_or_default().to_string(),
    ))
}

fn protected_and_ready(cluster: &Cluster, name: &str) {
    cluster.wait(&format!("{name} has its finalizer and Ready=True"), || {
        let (_, cidr) = cluster.api.get(&format!("{CIDRS}/{name}")).unwrap();
        cidr["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| f.contains(&json!(FINALIZER)))
            && ready(cluster, name).is_some_and(|(s, _)| s == "True")
    });
}

fn terminating(cluster: &Cluster, name: &str) {
    cluster.wait(&format!("{name} is Ready=False, Terminating"), || {
        ready(cluster, name) == Some(("False".into(), "Terminating".into()))
    });
    let (code, cidr) = cluster.api.get(&format!("{CIDRS}/{name}")).unwrap();
    assert_eq!(code, 200, "{cidr}");
    assert!(cidr["metadata"]["deletionTimestamp"].is_string(), "{cidr}");
}

fn gone(cluster: &Cluster, name: &str) {
    cluster.wait(&format!("{name} is deleted"), || {
        cluster.api.get(&format!("{CIDRS}/{name}")).unwrap().0 == 404
    });
}

#[test]
fn a_service_cidr_in_use_is_deleted_only_once_its_addresses_are_elsewhere_or_gone() {
    let cluster = Cluster::controller_manager("service-cidr-controller").unwrap();
    let api = &cluster.api;
    protected_and_ready(&cluster, "kubernetes");

    // A Service holds an address of a range added at run time; deleting the range waits.
    let (code, out) = api
        .post(CIDRS, &service_cidr("extra", "10.200.0.0/24"))
        .unwrap();
    assert_eq!(code, 201, "{out}");
    protected_and_ready(&cluster, "extra");
    let (code, out) = api.post(SVCS, &service("held", "10.200.0.10")).unwrap();
    assert_eq!(code, 201, "{out}");
    let out = api
        .kubectl_ok(&["delete", "servicecidr", "extra", "--wait=false"])
        .unwrap();
    assert!(out.contains("deleted"), "{out}");
    terminating(&cluster, "extra");
    // A range being deleted gives no new addresses, asked for or not.
    let (code, out) = api.post(SVCS, &service("late", "10.200.0.11")).unwrap();
    assert_eq!(code, 422, "{out}");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("is not in the valid range"),
        "{out}"
    );
    // Once the Service is gone, so is the range.
    let (code, out) = api.delete(&format!("{SVCS}/held"), None).unwrap();
    assert_eq!(code, 200, "{out}");
    gone(&cluster, "extra");

    // A wider range that covers the held address lets the narrow one go while the Service
    // keeps its address.
    let (code, out) = api
        .post(CIDRS, &service_cidr("narrow", "10.201.0.0/24"))
        .unwrap();
    assert_eq!(code, 201, "{out}");
    protected_and_ready(&cluster, "narrow");
    let (code, out) = api.post(SVCS, &service("kept", "10.201.0.5")).unwrap();
    assert_eq!(code, 201, "{out}");
    let (code, out) = api.delete(&format!("{CIDRS}/narrow"), None).unwrap();
    assert_eq!(code, 200, "{out}");
    terminating(&cluster, "narrow");
    let (code, out) = api
        .post(CIDRS, &service_cidr("wide", "10.201.0.0/16"))
        .unwrap();
    assert_eq!(code, 201, "{out}");
    gone(&cluster, "narrow");
    let (code, kept) = api.get(&format!("{SVCS}/kept")).unwrap();
    assert_eq!(code, 200, "{kept}");
    assert_eq!(kept["spec"]["clusterIP"], "10.201.0.5");

    // The default range holds the kubernetes Service's address: deleting it waits.
    let (code, out) = api.delete(&format!("{CIDRS}/kubernetes"), None).unwrap();
    assert_eq!(code, 200, "{out}");
    terminating(&cluster, "kubernetes");
}
