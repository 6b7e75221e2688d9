//! Every daemon stops cleanly on SIGTERM: it exits 0 within the harness's 5 s (after which it
//! would be killed and the status say so) and leaves behind what it should. seine-dns (lameduck)
//! and seine-controller-manager (the Lease given up) have theirs beside their other tests.

use std::time::Duration;

use seine_tests::{
    apiserver::ApiServer, controllers::Daemon, etcd::Etcd, topology, vip, wait_until,
};

#[test]
fn the_api_server_exits_0_on_sigterm_with_a_watch_open_and_ends_the_watch() {
    let etcd = Etcd::start().unwrap();
    let mut api = ApiServer::start(&etcd).unwrap();
    let watch = api
        .watch("/api/v1/namespaces/default/configmaps?watch=true")
        .unwrap();
    let status = api.stop().unwrap();
    assert!(status.success(), "{status}:\n{}", api.log_text());
    assert!(api.log_text().contains("stopping"), "{}", api.log_text());
    assert!(watch.ended(Duration::from_secs(5)), "the watch stayed open");
}

#[test]
fn the_scheduler_exits_0_on_sigterm_and_gives_its_lease_up() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let mut scheduler = Daemon::scheduler(&api, &[]).unwrap();
    wait_until(Duration::from_secs(20), || scheduler.leads())
        .unwrap_or_else(|_| panic!("never led:\n{}", scheduler.log_text()));
    let status = scheduler.process.stop().unwrap();
    assert!(status.success(), "{status}:\n{}", scheduler.log_text());
    let holder = api
        .kubectl_ok(&[
            "get",
            "lease",
            "-n",
            "kube-system",
            "kube-scheduler",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap();
    assert!(holder.trim().is_empty(), "still held by {holder}");
}

#[test]
fn the_agent_exits_0_on_sigterm_and_leaves_the_datapath_serving() {
    let mut node = topology("st", 1, 8080).unwrap();
    node.start_agent(&["--datapath", "ebpf"]).unwrap();
    let spec = "10.96.0.90:80/tcp".parse().unwrap();
    node.set_service(seine_agent::model::ServiceSpec {
        frontend: spec,
        backends: vec![format!("{}:8080", node.pod("backend-1").ip)
            .parse()
            .unwrap()],
        affinity_timeout_secs: None,
    })
    .unwrap();
    let agent = node.agent.as_mut().unwrap();
    let status = agent.stop().unwrap();
    assert!(status.success(), "{status}:\n{}", agent.log_text());
    node.agent = None;
    let answer = node.pod("client").http_get(vip("10.96.0.90:80")).unwrap();
    assert_eq!(
        answer, "backend-1",
        "the pinned datapath serves without its agent"
    );
}
