//! kube-rs against seine-apiserver: typed create/get/list/replace/patch/delete, a watcher and a
//! reflector, as a controller written in Rust would use them.

use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::{
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{reflector, watcher, WatchStreamExt as _},
    Api,
};
use seine_tests::{apiserver::ApiServer, etcd::Etcd};
use serde_json::json;

fn config_map(name: &str, value: &str) -> ConfigMap {
    serde_json::from_value(
        json!({"metadata": {"name": name, "labels": {"app": "kube-rs"}},
                                  "data": {"v": value}}),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_client_creates_reads_updates_and_deletes() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let client = server.kube_client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let created = cms
        .create(&PostParams::default(), &config_map("typed", "1"))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    let fetched = cms.get("typed").await.unwrap();
    assert_eq!(fetched.data.unwrap()["v"], "1");
    let listed = cms
        .list(&ListParams::default().labels("app=kube-rs"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);

    // replace with a stale resourceVersion is a 409 kube-rs reports as such.
    let mut stale = created.clone();
    let mut fresh = created.clone();
    fresh.data = Some([("v".to_string(), "2".to_string())].into());
    cms.replace("typed", &PostParams::default(), &fresh)
        .await
        .unwrap();
    stale.data = Some([("v".to_string(), "3".to_string())].into());
    match cms.replace("typed", &PostParams::default(), &stale).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let patched = cms
        .patch(
            "typed",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"w": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.unwrap()["w"], "x");
    let strategic = cms
        .patch(
            "typed",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"tier": "a"}}})),
        )
        .await
        .unwrap();
    assert_eq!(strategic.metadata.labels.unwrap()["tier"], "a");

    // Server-side apply, as controllers written with kube-rs use it.
    let applied = cms
        .patch(
            "applied",
            &PatchParams::apply("seine-test").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "applied"}, "data": {"k": "v"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["k"], "v");
    let managed = applied.metadata.managed_fields.unwrap();
    assert_eq!(managed[0].manager.as_deref(), Some("seine-test"));

    cms.delete("typed", &DeleteParams::default()).await.unwrap();
    match cms.get("typed").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // Services and pods come back typed, with what the server filled in.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let kubernetes = services.get("kubernetes").await.unwrap();
    assert_eq!(
        kubernetes.spec.unwrap().cluster_ip.as_deref(),
        Some("10.96.0.1")
    );
    let pods: Api<Pod> = Api::namespaced(client, "default");
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Pending"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_and_a_reflector_follow_changes() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let client = server.kube_client().await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    cms.create(&PostParams::default(), &config_map("before", "1"))
        .await
        .unwrap();

    // A reflector's store fills from the initial list and follows later writes.
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(
        writer,
        watcher(
            cms.clone(),
            watcher::Config::default().labels("app=kube-rs"),
        ),
    )
    .applied_objects()
    .boxed();
    let mut stream = stream;
    let consumer = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(cm)) = stream.try_next().await {
            seen.push(cm.metadata.name.unwrap_or_default());
            if seen.iter().any(|n| n == "after") {
                break;
            }
        }
        seen
    });
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("the reflector synced")
        .unwrap();
    cms.create(&PostParams::default(), &config_map("after", "1"))
        .await
        .unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(10), consumer)
        .await
        .expect("the watcher saw the new object")
        .unwrap();
    assert!(seen.contains(&"before".to_string()), "{seen:?}");
    assert!(seen.contains(&"after".to_string()), "{seen:?}");
    let names: Vec<String> = reader
        .state()
        .iter()
        .map(|cm| cm.metadata.name.clone().unwrap_or_default())
        .collect();
    assert!(names.contains(&"before".to_string()));

    // A raw watch from a resourceVersion gets typed events.
    let list = cms.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let mut events = cms
        .watch(&kube::api::WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    cms.delete("after", &DeleteParams::default()).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event")
        .expect("the stream is open")
        .unwrap();
    match event {
        kube::api::WatchEvent::Deleted(cm) => {
            assert_eq!(cm.metadata.name.as_deref(), Some("after"))
        }
        other => panic!("expected Deleted, got {other:?}"),
    }
}
