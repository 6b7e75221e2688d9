//! The namespace controller and the garbage collector in the real seine-controller-manager,
//! against a real etcd and seine-apiserver. A deleted namespace loses everything in it, then goes
//! itself, waiting (and saying so in its conditions) while an object's finalizer holds it. Owners
//! take their dependents along: in the background once the owner is gone, in the foreground
//! before the owner goes, or not at all when orphaned, as kubectl's `--cascade` asks.

use seine_tests::controllers;
use serde_json::{json, Value};

/// The shared cluster (etcd, API server, controller manager) with this file's helpers.
struct Cluster(controllers::Cluster);

impl std::ops::Deref for Cluster {
    type Target = controllers::Cluster;

    fn deref(&self) -> &controllers::Cluster {
        &self.0
    }
}

impl Cluster {
    fn start() -> Self {
        Cluster(controllers::Cluster::controller_manager("namespace,garbagecollector").unwrap())
    }

    fn create(&self, path: &str, body: Value) -> Value {
        let (code, out) = self.api.post(path, &body).unwrap();
        assert_eq!(code, 201, "POST {path}: {out}");
        out
    }

    fn gone(&self, path: &str) -> bool {
        self.api.get(path).unwrap().0 == 404
    }

    fn get(&self, path: &str) -> Value {
        let (code, out) = self.api.get(path).unwrap();
        assert_eq!(code, 200, "GET {path}: {out}");
        out
    }

    /// A ConfigMap in default owned by `owners` (name, uid, blockOwnerDeletion).
    fn config_map(&self, name: &str, owners: &[(&str, &str, bool)], finalizers: &[&str]) -> String {
        let refs: Vec<Value> = owners
            .iter()
            .map(|(owner, uid, block)| {
                json!({"apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": uid,
                       "blockOwnerDeletion": block})
            })
            .collect();
        let cm = self.create(
            CMS,
            json!({"metadata": {"name": name, "ownerReferences": refs, "finalizers": finalizers}}),
        );
        cm["metadata"]["uid"].as_str().unwrap().to_string()
    }
}

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn cm(name: &str) -> String {
    format!("{CMS}/{name}")
}

fn condition(ns: &Value, kind: &str) -> Value {
    ns["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_deleted_namespace_loses_its_content_then_goes() {
    let c = Cluster::start();
    c.api
        .kubectl_ok(&["create", "namespace", "doomed"])
        .unwrap();
    let base = "/api/v1/namespaces/doomed";
    c.create(
        &format!("{base}/configmaps"),
        json!({"metadata": {"name": "settings"}, "data": {"a": "1"}}),
    );
    c.create(
        &format!("{base}/configmaps"),
        json!({"metadata": {"name": "held", "finalizers": ["example.com/hold"]}}),
    );
    c.create(
        &format!("{base}/secrets"),
        json!({"metadata": {"name": "token"}, "stringData": {"t": "x"}}),
    );
    c.create(
        &format!("{base}/services"),
        json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
    );
    c.create(
        &format!("{base}/pods"),
        json!({"metadata": {"name": "app"},
               "spec": {"containers": [{"name": "app", "image": "busybox"}]}}),
    );

    c.api
        .kubectl_ok(&["delete", "namespace", "doomed", "--wait=false"])
        .unwrap();
    let objects = [
        "configmaps/settings",
        "secrets/token",
        "services/web",
        "pods/app",
    ];
    c.wait("the namespace's objects deleted", || {
        objects.iter().all(|o| c.gone(&format!("{base}/{o}")))
    });

    // The object whose finalizer is pending holds the namespace, and its conditions say so.
    c.wait("the conditions naming what is left", || {
        let ns = c.get(base);
        condition(&ns, "NamespaceFinalizersRemaining")["status"] == "True"
    });
    let ns = c.get(base);
    assert_eq!(ns["status"]["phase"], "Terminating");
    assert_eq!(ns["spec"]["finalizers"], json!(["kubernetes"]));
    let remaining = condition(&ns, "NamespaceContentRemaining");
    assert_eq!(remaining["status"], "True", "{ns}");
    assert_eq!(remaining["reason"], "SomeResourcesRemain");
    assert_eq!(
        remaining["message"],
        "Some resources are remaining: configmaps has 1 resource instances"
    );
    assert_eq!(
        condition(&ns, "NamespaceFinalizersRemaining")["message"],
        "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"
    );
    assert_eq!(
        condition(&ns, "NamespaceDeletionContentFailure")["status"],
        "False"
    );
    let held = c.get(&format!("{base}/configmaps/held"));
    assert!(held["metadata"]["deletionTimestamp"].is_string(), "{held}");

    // The finalizer done, the namespace goes.
    let (code, out) = c
        .api
        .merge_patch(
            &format!("{base}/configmaps/held"),
            &json!({"metadata": {"finalizers": null}}),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
    c.wait("the namespace gone", || c.gone(base));
    let out = c.api.kubectl(&["get", "namespace", "doomed"]).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn owners_take_their_dependents_along_unless_orphaned() {
    let c = Cluster::start();

    // Background (kubectl's default): once the owner is gone, its dependents follow; one with
    // another owner still there only loses the reference.
    let owner = c.config_map("bg-owner", &[], &[]);
    let keeper = c.config_map("keeper", &[], &[]);
    c.config_map("bg-dep-1", &[("bg-owner", &owner, false)], &[]);
    c.config_map("bg-dep-2", &[("bg-owner", &owner, true)], &[]);
    c.config_map(
        "bg-shared",
        &[("bg-owner", &owner, false), ("keeper", &keeper, false)],
        &[],
    );
    // A dependent whose owner never existed goes too.
    c.config_map(
        "ghost-dep",
        &[("ghost", "6f1c7a52-0000-4000-8000-000000000000", false)],
        &[],
    );
    c.api
        .kubectl_ok(&["delete", "configmap", "bg-owner"])
        .unwrap();
    c.wait("background dependents deleted", || {
        ["bg-dep-1", "bg-dep-2", "ghost-dep"]
            .iter()
            .all(|n| c.gone(&cm(n)))
    });
    c.wait("the gone owner's reference removed", || {
        let refs = &c.get(&cm("bg-shared"))["metadata"]["ownerReferences"];
        refs.as_array()
            .is_some_and(|r| r.len() == 1 && r[0]["name"] == "keeper")
    });

    // Foreground: the owner stays, marked, until its blocking dependent is gone.
    let owner = c.config_map("fg-owner", &[], &[]);
    c.config_map(
        "fg-dep",
        &[("fg-owner", &owner, true)],
        &["example.com/hold"],
    );
    c.api
        .kubectl_ok(&[
            "delete",
            "configmap",
            "fg-owner",
            "--cascade=foreground",
            "--wait=false",
        ])
        .unwrap();
    let marked = c.get(&cm("fg-owner"));
    assert!(
        marked["metadata"]["deletionTimestamp"].is_string(),
        "{marked}"
    );
    assert_eq!(
        marked["metadata"]["finalizers"],
        json!(["foregroundDeletion"])
    );
    c.wait("the dependent being deleted", || {
        c.get(&cm("fg-dep"))["metadata"]["deletionTimestamp"].is_string()
    });
    assert!(
        !c.gone(&cm("fg-owner")),
        "the owner waits for its blocking dependent"
    );
    let (code, out) = c
        .api
        .merge_patch(&cm("fg-dep"), &json!({"metadata": {"finalizers": null}}))
        .unwrap();
    assert_eq!(code, 200, "{out}");
    c.wait("the dependent and then the owner gone", || {
        c.gone(&cm("fg-dep")) && c.gone(&cm("fg-owner"))
    });

    // Orphan: the owner goes, the dependent stays without the reference.
    let owner = c.config_map("or-owner", &[], &[]);
    c.config_map("or-dep", &[("or-owner", &owner, true)], &[]);
    c.api
        .kubectl_ok(&[
            "delete",
            "configmap",
            "or-owner",
            "--cascade=orphan",
            "--wait=false",
        ])
        .unwrap();
    c.wait("the orphaning owner gone", || c.gone(&cm("or-owner")));
    let dep = c.get(&cm("or-dep"));
    assert!(dep["metadata"]["ownerReferences"].is_null(), "{dep}");
    assert!(dep["metadata"]["deletionTimestamp"].is_null(), "{dep}");

    // The shared dependent's last owner goes: so does the dependent.
    c.api
        .kubectl_ok(&["delete", "configmap", "keeper"])
        .unwrap();
    c.wait("the shared dependent gone with its last owner", || {
        c.gone(&cm("bg-shared"))
    });
}
