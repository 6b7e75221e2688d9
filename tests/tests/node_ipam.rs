//! The node IPAM controller against a real etcd and seine-apiserver: Nodes get podCIDRs from the
//! cluster CIDR, a range already held is kept, a restarted controller gives no range twice, and a
//! deleted Node's range goes to a Node that was waiting for one.

use std::time::{Duration, Instant};

use seine_controller_manager::ipam::{self, CidrSet};
use seine_tests::{apiserver::ApiServer, etcd::Etcd};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn node(api: &ApiServer, name: &str, cidr: Option<&str>) {
    let spec = match cidr {
        Some(c) => json!({"podCIDR": c, "podCIDRs": [c]}),
        None => json!({}),
    };
    let (code, out) = api
        .post(
            "/api/v1/nodes",
            &json!({"metadata": {"name": name}, "spec": spec}),
        )
        .unwrap();
    assert_eq!(code, 201, "{out}");
}

/// The Node's podCIDR once it has one (up to 10 s).
fn cidr_of(api: &ApiServer, name: &str) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, n) = api.get(&format!("/api/v1/nodes/{name}")).unwrap();
        if let Some(c) = n["spec"]["podCIDR"].as_str() {
            assert_eq!(n["spec"]["podCIDRs"], json!([c]));
            return Some(c.to_string());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_distinct_ranges_across_restarts_and_freed_ranges_are_reused() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    node(&api, "held", Some("10.244.0.0/24"));
    node(&api, "a", None);

    let set = CidrSet::new("10.244.0.0/16", 24).unwrap();
    let stop = CancellationToken::new();
    let controller = tokio::spawn(ipam::run(api.kube_client().await, set, stop.clone()));
    let a = tokio::task::block_in_place(|| cidr_of(&api, "a"));
    assert_eq!(a.as_deref(), Some("10.244.1.0/24"));
    node(&api, "b", None);
    let b = tokio::task::block_in_place(|| cidr_of(&api, "b"));
    assert_eq!(b.as_deref(), Some("10.244.2.0/24"));
    assert_eq!(
        tokio::task::block_in_place(|| cidr_of(&api, "held")).as_deref(),
        Some("10.244.0.0/24"),
        "a range already held is kept"
    );

    // A restart (or another replica taking over) reads what is taken from the Nodes. The first
    // stops when told to.
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), controller)
        .await
        .expect("the controller did not stop on its shutdown token")
        .unwrap();
    let set = CidrSet::new("10.244.0.0/16", 24).unwrap();
    let controller = tokio::spawn(ipam::run(
        api.kube_client().await,
        set,
        CancellationToken::new(),
    ));
    node(&api, "c", None);
    let c = tokio::task::block_in_place(|| cidr_of(&api, "c"));
    assert_eq!(c.as_deref(), Some("10.244.3.0/24"));
    controller.abort();

    // A full set: the third Node waits until a Node is deleted, then gets its range.
    let set = CidrSet::new("10.250.0.0/23", 24).unwrap();
    let etcd2 = Etcd::start().unwrap();
    let small = ApiServer::start(&etcd2).unwrap();
    let controller = tokio::spawn(ipam::run(
        small.kube_client().await,
        set,
        CancellationToken::new(),
    ));
    node(&small, "x", None);
    node(&small, "y", None);
    let x = tokio::task::block_in_place(|| cidr_of(&small, "x")).unwrap();
    let y = tokio::task::block_in_place(|| cidr_of(&small, "y")).unwrap();
    assert_ne!(x, y);
    node(&small, "z", None);
    std::thread::sleep(Duration::from_millis(500));
    let (_, z) = small.get("/api/v1/nodes/z").unwrap();
    assert!(z["spec"]["podCIDR"].is_null(), "no range left: {z}");
    let (code, _) = small.delete("/api/v1/nodes/x", None).unwrap();
    assert_eq!(code, 200);
    let z = tokio::task::block_in_place(|| cidr_of(&small, "z"));
    assert_eq!(z, Some(x), "the freed range");
    controller.abort();
}
