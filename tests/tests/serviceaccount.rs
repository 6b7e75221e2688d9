//! The service account controllers of seine-controller-manager against a real etcd and
//! seine-apiserver: every namespace gets a `default` ServiceAccount and the `kube-root-ca.crt`
//! ConfigMap, and both come back when removed or changed; legacy token Secrets get a token that
//! the API server accepts as the service account while the Secret holds it, and Secrets whose
//! service account is gone are deleted.

use std::{path::Path, time::Duration};

use k8s_openapi::api::core::v1::Secret;
use seine_apiserver::api::security::sa_token::TokenSigner;
use seine_controller_manager::serviceaccount::token::TokenGenerator;
use seine_tests::{apiserver::ApiServer, controllers::Daemon, etcd::Etcd, wait_until};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temp path")
}

/// The object at `path` once `ready` holds for it; fails with the log otherwise.
fn wait_for(api: &ApiServer, cm: &Daemon, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = wait_until(WAIT, || {
        let (code, object) = api.get(path).unwrap();
        let ok = code == 200 && ready(&object);
        last = object;
        ok
    });
    assert!(
        found.is_ok(),
        "{path} never became ready; last: {last}\ncontroller manager:\n{}",
        cm.log_text()
    );
    last
}

fn wait_gone(api: &ApiServer, cm: &Daemon, path: &str) {
    let gone = wait_until(WAIT, || api.get(path).unwrap().0 == 404);
    assert!(
        gone.is_ok(),
        "{path} is still there\ncontroller manager:\n{}",
        cm.log_text()
    );
}

fn create(api: &ApiServer, path: &str, body: Value) -> Value {
    let (code, out) = api.post(path, &body).unwrap();
    assert_eq!(code, 201, "POST {path}: {out}");
    out
}

fn delete(api: &ApiServer, path: &str) {
    let (code, out) = api.delete(path, None).unwrap();
    assert_eq!(code, 200, "DELETE {path}: {out}");
}

/// The HTTP status the API server answers `GET /api` with for this bearer token: 200 for any
/// authenticated user (discovery), 401 when the token does not authenticate.
fn status_with_token(api: &ApiServer, token: &str) -> u16 {
    api.request("GET", "/api", Some(token), "application/json", None)
        .unwrap()
        .0
}

/// The token a filled Secret holds (its data decoded from base64).
fn token_of(secret: &Value) -> String {
    let secret: Secret = serde_json::from_value(secret.clone()).unwrap();
    let data = secret.data.unwrap_or_default();
    String::from_utf8(data["token"].0.clone()).unwrap()
}

fn has_token(secret: &Value) -> bool {
    secret["data"]["token"]
        .as_str()
        .is_some_and(|t| !t.is_empty())
}

#[test]
fn every_active_namespace_gets_a_default_service_account_and_the_root_ca() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let ca_file = api.cert_dir.join("ca.crt");
    let ca = std::fs::read_to_string(&ca_file).unwrap();
    let cm = Daemon::controller_manager(
        &api,
        &[
            "--leader-elect=false",
            "--controllers",
            "serviceaccount,root-ca-cert-publisher",
            "--root-ca-file",
            path_str(&ca_file),
        ],
    )
    .unwrap();

    // Namespaces that were there before the controllers started, and a new one.
    wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/kube-system/serviceaccounts/default",
        |_| true,
    );
    create(
        &api,
        "/api/v1/namespaces",
        json!({"metadata": {"name": "team-a"}}),
    );
    let account = wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/team-a/serviceaccounts/default",
        |_| true,
    );
    let root_ca = wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/team-a/configmaps/kube-root-ca.crt",
        |_| true,
    );
    assert_eq!(root_ca["data"], json!({"ca.crt": ca}));
    assert!(
        root_ca["metadata"]["annotations"]["kubernetes.io/description"]
            .as_str()
            .is_some_and(|d| d.starts_with("Contains a CA bundle"))
    );
    let listed = api
        .kubectl_ok(&["get", "serviceaccounts", "-n", "team-a", "-o", "name"])
        .unwrap();
    assert_eq!(listed.trim(), "serviceaccount/default");

    // A deleted default service account comes back (a new object); a changed CA is put back.
    delete(&api, "/api/v1/namespaces/team-a/serviceaccounts/default");
    let old_uid = account["metadata"]["uid"].clone();
    wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/team-a/serviceaccounts/default",
        |a| a["metadata"]["uid"] != old_uid,
    );
    let (code, out) = api
        .merge_patch(
            "/api/v1/namespaces/team-a/configmaps/kube-root-ca.crt",
            &json!({"data": {"ca.crt": "not a CA", "extra": "x"}}),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
    wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/team-a/configmaps/kube-root-ca.crt",
        |m| m["data"] == json!({"ca.crt": ca}),
    );

    // A terminating namespace (nothing finalizes it here) gets nothing back. It is checked
    // after a namespace deleted later has got its account back.
    create(
        &api,
        "/api/v1/namespaces",
        json!({"metadata": {"name": "leaving"}}),
    );
    wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/leaving/serviceaccounts/default",
        |_| true,
    );
    delete(&api, "/api/v1/namespaces/leaving");
    delete(&api, "/api/v1/namespaces/leaving/serviceaccounts/default");
    delete(&api, "/api/v1/namespaces/team-a/serviceaccounts/default");
    wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/team-a/serviceaccounts/default",
        |_| true,
    );
    let (code, ns) = api.get("/api/v1/namespaces/leaving").unwrap();
    assert_eq!((code, &ns["status"]["phase"]), (200, &json!("Terminating")));
    let (code, _) = api
        .get("/api/v1/namespaces/leaving/serviceaccounts/default")
        .unwrap();
    assert_eq!(code, 404, "no account is made in a terminating namespace");
}

#[test]
fn legacy_token_secrets_authenticate_as_their_service_account_while_they_exist() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    // The key the API server signs and verifies service account tokens with (its default,
    // made under --cert-dir), and its CA.
    let key_file = api.cert_dir.join("sa.key");
    let ca_file = api.cert_dir.join("ca.crt");
    let ca = std::fs::read_to_string(&ca_file).unwrap();
    let cm = Daemon::controller_manager(
        &api,
        &[
            "--leader-elect=false",
            "--controllers",
            "serviceaccount,serviceaccount-token",
            "--service-account-private-key-file",
            path_str(&key_file),
            "--root-ca-file",
            path_str(&ca_file),
        ],
    )
    .unwrap();

    api.kubectl_ok(&["create", "serviceaccount", "builder"])
        .unwrap();
    let (_, account) = api
        .get("/api/v1/namespaces/default/serviceaccounts/builder")
        .unwrap();
    create(
        &api,
        "/api/v1/namespaces/default/secrets",
        json!({
            "metadata": {"name": "builder-token",
                         "annotations": {"kubernetes.io/service-account.name": "builder"}},
            "type": "kubernetes.io/service-account-token",
        }),
    );
    let secret = wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/default/secrets/builder-token",
        has_token,
    );
    assert_eq!(
        secret["metadata"]["annotations"]["kubernetes.io/service-account.uid"],
        account["metadata"]["uid"]
    );
    let typed: Secret = serde_json::from_value(secret.clone()).unwrap();
    let data = typed.data.unwrap_or_default();
    assert_eq!(data["namespace"].0, b"default");
    assert_eq!(data["ca.crt"].0, ca.as_bytes());
    let token = token_of(&secret);

    // kubectl with the token is the service account.
    let whoami = api
        .kubectl_ok(&["--token", &token, "auth", "whoami", "-o", "json"])
        .unwrap();
    let review: Value = serde_json::from_str(&whoami).unwrap();
    let user = &review["status"]["userInfo"];
    assert_eq!(user["username"], "system:serviceaccount:default:builder");
    assert_eq!(user["uid"], account["metadata"]["uid"]);
    assert!(user["groups"]
        .as_array()
        .unwrap()
        .contains(&json!("system:serviceaccounts:default")));

    // A token signed with another key is refused, and so is one signed with the right key that
    // its Secret does not hold.
    let other_key = api.cert_dir.join("other-sa.key");
    TokenSigner::load_or_generate(&other_key, "other", Vec::new()).unwrap();
    let uid = account["metadata"]["uid"].as_str().unwrap();
    let foreign = TokenGenerator::from_file(&other_key)
        .unwrap()
        .legacy_token("default", "builder", uid, "builder-token")
        .unwrap();
    assert_eq!(status_with_token(&api, &foreign), 401);
    let unheld = TokenGenerator::from_file(&key_file)
        .unwrap()
        .legacy_token("default", "builder", uid, "builder-token")
        .unwrap();
    assert_ne!(unheld, token, "ECDSA signatures differ each time");
    assert_eq!(status_with_token(&api, &unheld), 401);
    assert_eq!(status_with_token(&api, &token), 200);

    // Once the Secret is deleted, its token no longer authenticates.
    delete(&api, "/api/v1/namespaces/default/secrets/builder-token");
    assert_eq!(status_with_token(&api, &token), 401);
    let refused = api.kubectl(&["--token", &token, "auth", "whoami"]).unwrap();
    assert!(!refused.status.success());

    // A token Secret outlives its service account only until the controller sees it go.
    api.kubectl_ok(&["create", "serviceaccount", "temp"])
        .unwrap();
    create(
        &api,
        "/api/v1/namespaces/default/secrets",
        json!({
            "metadata": {"name": "temp-token",
                         "annotations": {"kubernetes.io/service-account.name": "temp"}},
            "type": "kubernetes.io/service-account-token",
        }),
    );
    let secret = wait_for(
        &api,
        &cm,
        "/api/v1/namespaces/default/secrets/temp-token",
        has_token,
    );
    let temp_token = token_of(&secret);
    assert_eq!(status_with_token(&api, &temp_token), 200);
    delete(&api, "/api/v1/namespaces/default/serviceaccounts/temp");
    assert_eq!(status_with_token(&api, &temp_token), 401);
    wait_gone(&api, &cm, "/api/v1/namespaces/default/secrets/temp-token");
}
