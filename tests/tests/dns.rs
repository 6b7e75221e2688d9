//! seine-dns against a real etcd and seine-apiserver: Services, EndpointSlices, Pods and Namespaces
//! created through the API show up in the answers of the cluster zone, and change as they change.

use std::time::{Duration, Instant};

use seine_dns::{
    cluster::{Data, Options, Qtype, Rcode},
    corefile::PodsMode,
    sync::{self, ViewHandle},
};
use seine_tests::{apiserver::ApiServer, etcd::Etcd};
use serde_json::json;

fn options() -> Options {
    Options {
        zones: vec![
            "cluster.local.".into(),
            "in-addr.arpa.".into(),
            "ip6.arpa.".into(),
        ],
        ttl: 5,
        pods: PodsMode::Verified,
        endpoint_pod_names: false,
        ignore_empty_service: false,
        noendpoints: false,
    }
}

/// Waits (up to 10 s) until `name`/`qtype` is answered as `check` wants; returns the last answer.
async fn until(
    view: &ViewHandle,
    name: &str,
    qtype: Qtype,
    check: impl Fn(&seine_dns::cluster::Answer) -> bool,
) -> seine_dns::cluster::Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = view.current().lookup(name, qtype, &options()).unwrap();
        if check(&answer) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_made_through_the_api_are_answered_and_follow_changes() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let view = sync::spawn(api.kube_client().await, Duration::from_millis(20), true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !view.synced() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(view.synced(), "the first sync completes");

    // The API server's own service answers at once.
    let kubernetes = until(
        &view,
        "kubernetes.default.svc.cluster.local.",
        Qtype::A,
        |a| !a.answers.is_empty(),
    )
    .await;
    assert_eq!(
        kubernetes.answers[0].data,
        Data::A("10.96.0.1".parse().unwrap())
    );

    let post = |path: &str, body: serde_json::Value| {
        let (code, out) = api.post(path, &body).unwrap();
        assert_eq!(code, 201, "{out}");
        out
    };
    post("/api/v1/namespaces", json!({"metadata": {"name": "shop"}}));
    let svc = post(
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "cart"},
               "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
    );
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let name = "cart.shop.svc.cluster.local.";
    let a = until(&view, name, Qtype::A, |a| !a.answers.is_empty()).await;
    assert_eq!(a.answers[0].data, Data::A(cluster_ip.parse().unwrap()));
    let srv = until(
        &view,
        "_http._tcp.cart.shop.svc.cluster.local.",
        Qtype::Srv,
        |a| !a.answers.is_empty(),
    )
    .await;
    assert!(matches!(&srv.answers[0].data, Data::Srv { port: 80, target, .. } if target == name));
    let ip: std::net::Ipv4Addr = cluster_ip.parse().unwrap();
    let [o1, o2, o3, o4] = ip.octets();
    let ptr = view
        .current()
        .lookup(
            &format!("{o4}.{o3}.{o2}.{o1}.in-addr.arpa."),
            Qtype::Ptr,
            &options(),
        )
        .unwrap();
    assert_eq!(ptr.answers[0].data, Data::Ptr(name.into()));
    assert_eq!(
        view.current()
            .lookup("shop.svc.cluster.local.", Qtype::A, &options())
            .unwrap()
            .rcode,
        Rcode::NoError,
        "the namespace exists"
    );

    // A headless service answers with its ready endpoints, from its EndpointSlice.
    post(
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "db"},
               "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
    );
    let headless = "db.shop.svc.cluster.local.";
    let none = until(&view, headless, Qtype::A, |a| a.rcode == Rcode::NxDomain).await;
    assert_eq!(none.rcode, Rcode::NxDomain, "no ready endpoint yet");
    post(
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        json!({"metadata": {"name": "db-1", "labels": {"kubernetes.io/service-name": "db"}},
               "addressType": "IPv4",
               "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
               "endpoints": [
                   {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                   {"addresses": ["10.244.2.6"], "conditions": {"ready": false}}]}),
    );
    let ready = until(&view, headless, Qtype::A, |a| !a.answers.is_empty()).await;
    assert_eq!(ready.answers.len(), 1, "{ready:?}");
    assert_eq!(
        ready.answers[0].data,
        Data::A("10.244.1.5".parse().unwrap())
    );
    let host = view
        .current()
        .lookup("db-0.db.shop.svc.cluster.local.", Qtype::A, &options())
        .unwrap();
    assert_eq!(host.answers.len(), 1);

    // pods verified: only an address a pod in that namespace has.
    let pod = post(
        "/api/v1/namespaces/shop/pods",
        json!({"metadata": {"name": "web"},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
    );
    assert_eq!(pod["metadata"]["name"], "web");
    api.set_pod_ip("shop", "web", "10.244.3.9").unwrap();
    let verified = until(&view, "10-244-3-9.shop.pod.cluster.local.", Qtype::A, |a| {
        !a.answers.is_empty()
    })
    .await;
    assert_eq!(verified.answers.len(), 1);
    assert_eq!(
        view.current()
            .lookup("10-244-3-8.shop.pod.cluster.local.", Qtype::A, &options())
            .unwrap()
            .rcode,
        Rcode::NxDomain
    );

    // Deleting the service takes its name away.
    let (code, _) = api
        .delete("/api/v1/namespaces/shop/services/cart", None)
        .unwrap();
    assert_eq!(code, 200);
    let gone = until(&view, name, Qtype::A, |a| a.rcode == Rcode::NxDomain).await;
    assert_eq!(gone.rcode, Rcode::NxDomain);
}
