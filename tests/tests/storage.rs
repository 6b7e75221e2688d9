//! The API server's storage on a real etcd: Kubernetes' key layout, resourceVersion as the etcd
//! revision, create-if-absent, optimistic concurrency, paging, and an etcd outage that loses
//! nothing acknowledged.

use seine_apiserver::storage::{list_prefix, resource_version, ObjectKey, Storage, StorageError};
use seine_tests::etcd::Etcd;
use serde_json::json;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn config_map(name: &str, value: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": name, "namespace": "default"}, "data": {"k": value}})
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("configmaps", Some("default"), name)
}

#[test]
fn created_objects_read_back_with_the_etcd_revision_as_resource_version() {
    let etcd = Etcd::start().unwrap();
    runtime().block_on(async {
        let storage = Storage::connect(&etcd.endpoints()).await.unwrap();
        let created = storage
            .create(&key("a"), config_map("a", "1"))
            .await
            .unwrap();
        let rv = resource_version(&created);
        assert!(rv > 0);
        let read = storage.get(&key("a")).await.unwrap();
        assert_eq!(read, created);
        assert_eq!(read["data"]["k"], "1");

        // The same key again: AlreadyExists, and the stored object is untouched.
        let again = storage.create(&key("a"), config_map("a", "2")).await;
        assert!(
            matches!(again, Err(StorageError::AlreadyExists { .. })),
            "{again:?}"
        );
        assert_eq!(storage.get(&key("a")).await.unwrap()["data"]["k"], "1");
    });
    // The layout other Kubernetes tooling expects.
    let out = std::process::Command::new("etcdctl")
        .args([
            "--endpoints",
            &etcd.client_url,
            "get",
            "--keys-only",
            "--prefix",
            "/registry/",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("/registry/configmaps/default/a"));
}

#[test]
fn an_update_from_a_stale_resource_version_is_a_conflict_and_changes_nothing() {
    let etcd = Etcd::start().unwrap();
    runtime().block_on(async {
        let storage = Storage::connect(&etcd.endpoints()).await.unwrap();
        let v1 = storage
            .create(&key("a"), config_map("a", "1"))
            .await
            .unwrap();
        let rv1 = resource_version(&v1);
        let v2 = storage
            .update(&key("a"), config_map("a", "2"), Some(rv1))
            .await
            .unwrap();
        assert!(resource_version(&v2) > rv1);

        let stale = storage
            .update(&key("a"), config_map("a", "3"), Some(rv1))
            .await;
        assert!(
            matches!(stale, Err(StorageError::Conflict { .. })),
            "{stale:?}"
        );
        assert!(stale
            .unwrap_err()
            .to_string()
            .contains("the object has been modified"));
        assert_eq!(storage.get(&key("a")).await.unwrap()["data"]["k"], "2");

        let missing = storage.update(&key("b"), config_map("b", "1"), None).await;
        assert!(
            matches!(missing, Err(StorageError::NotFound { .. })),
            "{missing:?}"
        );

        let stale_delete = storage.delete(&key("a"), Some(rv1)).await;
        assert!(matches!(stale_delete, Err(StorageError::Conflict { .. })));
        let deleted = storage.delete(&key("a"), None).await.unwrap();
        assert_eq!(deleted["data"]["k"], "2");
        assert!(matches!(
            storage.get(&key("a")).await,
            Err(StorageError::NotFound { .. })
        ));
    });
}

#[test]
fn lists_page_with_limit_and_continue_in_one_namespace_or_all() {
    let etcd = Etcd::start().unwrap();
    runtime().block_on(async {
        let storage = Storage::connect(&etcd.endpoints()).await.unwrap();
        for i in 0..5 {
            let name = format!("cm-{i}");
            storage
                .create(&key(&name), config_map(&name, "x"))
                .await
                .unwrap();
        }
        let other = ObjectKey::new("configmaps", Some("other"), "z");
        storage.create(&other, config_map("z", "x")).await.unwrap();

        let prefix = list_prefix("configmaps", Some("default"));
        let mut names = Vec::new();
        let mut after = None;
        loop {
            let page = storage
                .list(&prefix, 2, after.as_deref(), None)
                .await
                .unwrap();
            assert!(page.items.len() <= 2);
            names.extend(
                page.items
                    .iter()
                    .map(|o| o["metadata"]["name"].as_str().unwrap().to_string()),
            );
            match page.continue_after {
                Some(k) => after = Some(k),
                None => break,
            }
        }
        assert_eq!(names, ["cm-0", "cm-1", "cm-2", "cm-3", "cm-4"]);
        let all = storage
            .list(&list_prefix("configmaps", None), 0, None, None)
            .await
            .unwrap();
        assert_eq!(all.items.len(), 6);
        assert!(all.revision >= resource_version(&all.items[5]));
    });
}

#[test]
fn concurrent_creates_of_one_name_have_exactly_one_winner() {
    let etcd = Etcd::start().unwrap();
    runtime().block_on(async {
        // Two clients, as two API server replicas would have.
        let a = Storage::connect(&etcd.endpoints()).await.unwrap();
        let b = Storage::connect(&etcd.endpoints()).await.unwrap();
        let mut wins = 0;
        for i in 0..50 {
            let name = format!("race-{i}");
            let object_key = key(&name);
            let (ra, rb) = tokio::join!(
                a.create(&object_key, config_map(&name, "a")),
                b.create(&object_key, config_map(&name, "b"))
            );
            wins += ra.is_ok() as u32 + rb.is_ok() as u32;
            assert!(ra.is_ok() != rb.is_ok(), "{name}: {ra:?} / {rb:?}");
        }
        assert_eq!(wins, 50);
    });
}

#[test]
fn an_etcd_outage_is_unavailable_and_loses_nothing_acknowledged() {
    let mut etcd = Etcd::start().unwrap();
    let rt = runtime();
    let storage = rt.block_on(Storage::connect(&etcd.endpoints())).unwrap();
    rt.block_on(storage.create(&key("kept"), config_map("kept", "1")))
        .unwrap();

    etcd.pause().unwrap();
    assert!(!rt.block_on(storage.healthy()));
    let during = rt.block_on(storage.create(&key("lost"), config_map("lost", "1")));
    assert!(
        matches!(during, Err(StorageError::Unavailable(_))),
        "{during:?}"
    );

    etcd.resume().unwrap();
    let kept = rt.block_on(async {
        // The same client reconnects by itself.
        for _ in 0..50 {
            if let Ok(o) = storage.get(&key("kept")).await {
                return Some(o);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        None
    });
    assert_eq!(kept.expect("etcd back")["data"]["k"], "1");
    assert!(rt.block_on(storage.healthy()));
    assert!(matches!(
        rt.block_on(storage.get(&key("lost"))),
        Err(StorageError::NotFound { .. })
    ));
}

#[test]
fn lists_larger_than_a_grpc_message_come_back_whole_and_consistent() {
    let etcd = Etcd::start().unwrap();
    runtime().block_on(async {
        let storage = Storage::connect(&etcd.endpoints()).await.unwrap();
        // 1,100 objects of 5 KiB: 5.5 MiB, past etcd-client's 4 MiB message limit.
        let big = "x".repeat(5 * 1024);
        let writes = (0..1_100).map(|i| {
            let storage = storage.clone();
            let name = format!("big-{i:04}");
            let object = config_map(&name, &big);
            async move { storage.create(&key(&name), object).await }
        });
        for result in futures::future::join_all(writes).await {
            result.unwrap();
        }
        let before = storage
            .list(&list_prefix("configmaps", Some("default")), 0, None, None)
            .await
            .unwrap();
        assert_eq!(before.items.len(), 1_100);
        // Reading at the list's revision ignores what was written since.
        storage
            .create(&key("late"), config_map("late", "1"))
            .await
            .unwrap();
        let again = storage
            .list(
                &list_prefix("configmaps", Some("default")),
                0,
                None,
                Some(before.revision),
            )
            .await
            .unwrap();
        assert_eq!(again.items.len(), 1_100);
        let now = storage
            .list(&list_prefix("configmaps", Some("default")), 0, None, None)
            .await
            .unwrap();
        assert_eq!(now.items.len(), 1_101);
    });
}
