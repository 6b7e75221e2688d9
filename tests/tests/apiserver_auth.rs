//! Who may do what on seine-apiserver: service account tokens from `kubectl create token`, client
//! certificates signed by the cluster CA, RBAC with the built-in roles and user-made bindings,
//! `kubectl auth can-i` (also with --as), and kubectl's typed commands, which send protobuf.

use std::{path::Path, process::Command, time::Duration};

use seine_tests::{apiserver::ApiServer, etcd::Etcd, wait_until};
use serde_json::json;

fn kubectl_as_token(server: &ApiServer, token: &str, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&server.kubeconfig)
        .args(["--token", token])
        .args(args)
        .output()
        .unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn service_account_tokens_and_rbac_decide_who_may_do_what() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();

    // kubectl's typed commands (protobuf bodies) work.
    server
        .kubectl_ok(&["create", "serviceaccount", "bot"])
        .unwrap();
    server
        .kubectl_ok(&[
            "create",
            "configmap",
            "settings",
            "--from-literal=mode=fast",
        ])
        .unwrap();
    let data = server
        .kubectl_ok(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "jsonpath={.data.mode}",
        ])
        .unwrap();
    assert_eq!(data, "fast");
    server
        .kubectl_ok(&[
            "create",
            "secret",
            "generic",
            "creds",
            "--from-literal=password=s3cret",
        ])
        .unwrap();
    let secret = server
        .kubectl_ok(&["get", "secret", "creds", "-o", "jsonpath={.data.password}"])
        .unwrap();
    assert_eq!(secret, "czNjcmV0", "base64 of s3cret");
    assert_eq!(
        server
            .kubectl_ok(&["auth", "can-i", "delete", "nodes"])
            .unwrap()
            .trim(),
        "yes"
    );

    // A token for the service account authenticates as it, and RBAC denies it by default.
    let token = server.kubectl_ok(&["create", "token", "bot"]).unwrap();
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token}");
    let whoami = kubectl_as_token(&server, token, &["auth", "whoami", "-o", "json"]);
    assert!(whoami.status.success(), "{}", stderr(&whoami));
    let review: serde_json::Value = serde_json::from_slice(&whoami.stdout).unwrap();
    assert_eq!(
        review["status"]["userInfo"]["username"],
        "system:serviceaccount:default:bot"
    );
    let denied = kubectl_as_token(&server, token, &["get", "configmaps"]);
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains(
            "configmaps is forbidden: User \"system:serviceaccount:default:bot\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"default\""
        ),
        "{}",
        stderr(&denied)
    );
    assert_eq!(
        server
            .kubectl(&[
                "auth",
                "can-i",
                "list",
                "configmaps",
                "--as=system:serviceaccount:default:bot"
            ])
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap(),
        "no"
    );

    // A RoleBinding to the built-in view role lets it read in this namespace only.
    server
        .kubectl_ok(&[
            "create",
            "rolebinding",
            "bot-view",
            "--clusterrole=view",
            "--serviceaccount=default:bot",
        ])
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        kubectl_as_token(&server, token, &["get", "configmaps"])
            .status
            .success()
    })
    .expect("the binding takes effect");
    let listed = kubectl_as_token(&server, token, &["get", "configmaps", "-o", "name"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("configmap/settings"));
    let secrets = kubectl_as_token(&server, token, &["get", "secrets"]);
    assert!(!secrets.status.success(), "view does not read secrets");
    let other = kubectl_as_token(&server, token, &["get", "configmaps", "-n", "kube-system"]);
    assert!(!other.status.success());
    let delete = kubectl_as_token(&server, token, &["delete", "configmap", "settings"]);
    assert!(!delete.status.success());
    let can = |args: &[&str]| {
        let out = server.kubectl(args).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        can(&[
            "auth",
            "can-i",
            "list",
            "pods",
            "--as=system:serviceaccount:default:bot"
        ]),
        "yes"
    );
    assert_eq!(
        can(&[
            "auth",
            "can-i",
            "create",
            "pods",
            "--as=system:serviceaccount:default:bot"
        ]),
        "no"
    );

    // The built-in roles of the control-plane components and the nodes.
    assert_eq!(
        can(&[
            "auth",
            "can-i",
            "create",
            "pods",
            "--subresource=binding",
            "--as=system:kube-scheduler"
        ]),
        "yes"
    );
    assert_eq!(
        can(&[
            "auth",
            "can-i",
            "create",
            "secrets",
            "--as=system:kube-scheduler"
        ]),
        "no"
    );
    assert_eq!(
        can(&[
            "auth",
            "can-i",
            "patch",
            "nodes",
            "--subresource=status",
            "--as=system:node:n1",
            "--as-group=system:nodes"
        ]),
        "yes"
    );
    assert_eq!(
        can(&[
            "auth",
            "can-i",
            "delete",
            "namespaces",
            "--as=system:kube-controller-manager"
        ]),
        "yes"
    );
    assert_eq!(
        can(&[
            "auth",
            "can-i",
            "list",
            "endpointslices.discovery.k8s.io",
            "--as=system:seine-dns"
        ]),
        "yes"
    );

    // Deleting the service account invalidates its tokens; forged ones never worked.
    let mut forged: Vec<String> = token.split('.').map(str::to_string).collect();
    forged[2] = "AAAA".into();
    let (status, _, _) = server
        .request(
            "GET",
            "/api/v1/namespaces/default/configmaps",
            Some(&forged.join(".")),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 401);
    server
        .kubectl_ok(&["delete", "serviceaccount", "bot"])
        .unwrap();
    let (status, _, _) = server
        .request(
            "GET",
            "/api/v1/namespaces/default/configmaps",
            Some(token),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 401);
}

#[test]
fn tokens_bound_to_a_pod_die_with_it() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    server
        .kubectl_ok(&["create", "serviceaccount", "runner"])
        .unwrap();
    let (code, pod) = server
        .post(
            "/api/v1/namespaces/default/pods",
            &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "job"},
                    "spec": {"serviceAccountName": "runner",
                             "containers": [{"name": "c", "image": "busybox:1.36"}]}}),
        )
        .unwrap();
    assert_eq!(code, 201);
    let uid = pod["metadata"]["uid"].as_str().unwrap();
    let token = server
        .kubectl_ok(&[
            "create",
            "token",
            "runner",
            "--bound-object-kind=Pod",
            "--bound-object-name=job",
            &format!("--bound-object-uid={uid}"),
            "--duration=20m",
        ])
        .unwrap();
    let token = token.trim();
    let (status, _, _) = server
        .request(
            "GET",
            "/api/v1/namespaces/default/pods",
            Some(token),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 403, "authenticated (no role yet)");
    server
        .delete("/api/v1/namespaces/default/pods/job", None)
        .unwrap();
    let (status, _, _) = server
        .request(
            "GET",
            "/api/v1/namespaces/default/pods",
            Some(token),
            "application/json",
            None,
        )
        .unwrap();
    assert_eq!(status, 401);
    // Tokens shorter than ten minutes are refused, as Kubernetes refuses them.
    let short = server
        .kubectl(&["create", "token", "runner", "--duration=5m"])
        .unwrap();
    assert!(!short.status.success());
    assert!(stderr(&short).contains("may not specify a duration less than 10 minutes"));
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
}

/// A key and a certificate for CN=`user`, O=`group`, signed by the CA in `ca_dir`.
fn client_certificate(dir: &Path, ca_dir: &Path, name: &str, user: &str, group: &str) {
    // X.509 v3 with the client-auth usage, as TLS client certificates must be.
    std::fs::write(
        dir.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={user}/O={group}"),
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &ca_dir.join("ca.crt").display().to_string(),
            "-CAkey",
            &ca_dir.join("ca.key").display().to_string(),
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            "client.ext",
        ],
        dir,
    );
}

#[test]
fn client_certificates_from_the_cluster_ca_name_the_user() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    let dir = server.cert_dir.join("clients");
    std::fs::create_dir_all(&dir).unwrap();
    client_certificate(&dir, &server.cert_dir, "alice", "alice", "dev");
    // A certificate from a CA the server does not trust.
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "rogue-ca.key",
            "-out",
            "rogue-ca.crt",
            "-subj",
            "/CN=rogue",
            "-days",
            "1",
        ],
        &dir,
    );
    std::fs::create_dir_all(dir.join("rogue")).unwrap();
    std::fs::copy(dir.join("rogue-ca.crt"), dir.join("rogue/ca.crt")).unwrap();
    std::fs::copy(dir.join("rogue-ca.key"), dir.join("rogue/ca.key")).unwrap();
    client_certificate(
        &dir,
        &dir.join("rogue"),
        "mallory",
        "admin",
        "system:masters",
    );

    let empty = dir.join("empty.kubeconfig");
    std::fs::write(&empty, "apiVersion: v1\nkind: Config\n").unwrap();
    let as_cert = |name: &str, args: &[&str]| {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&empty)
            .args(["--server", &format!("https://{}", server.addr)])
            .arg(format!(
                "--certificate-authority={}",
                server.cert_dir.join("ca.crt").display()
            ))
            .arg(format!(
                "--client-certificate={}",
                dir.join(format!("{name}.crt")).display()
            ))
            .arg(format!(
                "--client-key={}",
                dir.join(format!("{name}.key")).display()
            ))
            .args(args)
            .output()
            .unwrap()
    };
    let whoami = as_cert("alice", &["auth", "whoami", "-o", "json"]);
    assert!(whoami.status.success(), "{}", stderr(&whoami));
    let review: serde_json::Value = serde_json::from_slice(&whoami.stdout).unwrap();
    assert_eq!(review["status"]["userInfo"]["username"], "alice");
    let groups = review["status"]["userInfo"]["groups"].as_array().unwrap();
    assert!(groups.contains(&json!("dev")) && groups.contains(&json!("system:authenticated")));
    let denied = as_cert("alice", &["get", "pods"]);
    assert!(
        stderr(&denied).contains("User \"alice\" cannot list resource \"pods\""),
        "{}",
        stderr(&denied)
    );

    // Bind the group: alice's certificate now edits in default.
    server
        .kubectl_ok(&[
            "create",
            "rolebinding",
            "dev-edit",
            "--clusterrole=edit",
            "--group=dev",
        ])
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        as_cert("alice", &["get", "pods"]).status.success()
    })
    .expect("the group binding takes effect");

    // The rogue certificate claims system:masters but is not signed by the cluster CA.
    let rogue = as_cert("mallory", &["get", "pods"]);
    assert!(!rogue.status.success());
}

#[test]
fn rbac_refuses_to_grant_what_the_author_does_not_hold() {
    let etcd = Etcd::start().unwrap();
    let server = ApiServer::start(&etcd).unwrap();
    server
        .kubectl_ok(&["create", "serviceaccount", "lead"])
        .unwrap();
    server
        .kubectl_ok(&[
            "create",
            "rolebinding",
            "lead-admin",
            "--clusterrole=admin",
            "--serviceaccount=default:lead",
        ])
        .unwrap();
    let token = server.kubectl_ok(&["create", "token", "lead"]).unwrap();
    let token = token.trim();
    wait_until(Duration::from_secs(5), || {
        kubectl_as_token(&server, token, &["get", "roles"])
            .status
            .success()
    })
    .expect("the admin binding takes effect");

    // Within what admin holds: allowed.
    let ok = kubectl_as_token(
        &server,
        token,
        &[
            "create",
            "role",
            "pod-reader",
            "--verb=get",
            "--resource=pods",
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let ok = kubectl_as_token(
        &server,
        token,
        &[
            "create",
            "rolebinding",
            "viewers",
            "--clusterrole=view",
            "--group=dev",
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Beyond it: refused, naming the rule.
    let nodes = kubectl_as_token(
        &server,
        token,
        &[
            "create",
            "role",
            "node-lister",
            "--verb=list",
            "--resource=nodes",
        ],
    );
    assert!(!nodes.status.success());
    assert!(
        stderr(&nodes).contains("is attempting to grant RBAC permissions not currently held"),
        "{}",
        stderr(&nodes)
    );
    let root = kubectl_as_token(
        &server,
        token,
        &[
            "create",
            "rolebinding",
            "root",
            "--clusterrole=cluster-admin",
            "--group=dev",
        ],
    );
    assert!(!root.status.success());
    assert!(
        stderr(&root).contains("not currently held"),
        "{}",
        stderr(&root)
    );
    // Widening an existing role is checked too.
    let widen = kubectl_as_token(
        &server,
        token,
        &[
            "patch",
            "role",
            "pod-reader",
            "--type=json",
            "-p",
            r#"[{"op":"add","path":"/rules/-","value":{"apiGroups":[""],"resources":["nodes"],"verbs":["get"]}}]"#,
        ],
    );
    assert!(!widen.status.success());
    assert!(
        stderr(&widen).contains("not currently held"),
        "{}",
        stderr(&widen)
    );
}
