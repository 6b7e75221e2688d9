//! Static pods: pods the kubelet runs from the files in `--pod-manifest-path`, read again every
//! `--file-check-frequency`, each with a mirror pod in the API so that kubectl sees it. As the
//! kubelet names them: `<name>-<node>`, a UID that is the hash of the file's pod and the node,
//! annotations `kubernetes.io/config.source: file` and `kubernetes.io/config.hash`; the mirror
//! pod carries `kubernetes.io/config.mirror` and is owned by the Node. Deleting a mirror pod
//! does not stop the static pod: the kubelet makes it again. Removing the file stops it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    api::{DeleteParams, PostParams},
    Api, Client,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const ANNOTATION_SOURCE: &str = "kubernetes.io/config.source";
pub const ANNOTATION_HASH: &str = "kubernetes.io/config.hash";
pub const ANNOTATION_MIRROR: &str = "kubernetes.io/config.mirror";

/// Whether the API pod is the mirror of a static pod.
pub fn is_mirror(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_MIRROR))
}

/// Whether the pod came from a file rather than from the API.
pub fn is_static(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_SOURCE))
        .is_some_and(|s| s == "file")
}

/// What a read of the manifest directory found: the pods by UID, and the files that are not
/// pods, with why.
#[derive(Default)]
pub struct Manifests {
    pub pods: BTreeMap<String, Pod>,
    pub invalid: Vec<(PathBuf, String)>,
}

/// Reads every manifest in `dir` (hidden files skipped, as the kubelet does). A directory that
/// does not exist holds no pods.
pub fn read_dir(dir: &Path, node: &str) -> Manifests {
    let mut found = Manifests::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| static_pod(&bytes, node))
        {
            Ok(pod) => {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                found.pods.insert(uid, pod);
            }
            Err(e) => found.invalid.push((path, e)),
        }
    }
    found
}

/// The static pod a manifest (YAML or JSON) describes, named, identified and defaulted for
/// this node.
pub fn static_pod(bytes: &[u8], node: &str) -> Result<Pod, String> {
    let value: Value = serde_saphyr::from_slice(bytes).map_err(|e| format!("invalid YAML: {e}"))?;
    if value.get("kind").and_then(Value::as_str) != Some("Pod") {
        return Err("not a Pod: a static pod manifest needs kind: Pod".into());
    }
    if value.get("apiVersion").and_then(Value::as_str) != Some("v1") {
        return Err("a static pod manifest needs apiVersion: v1".into());
    }
    let mut pod: Pod = serde_json::from_value(value).map_err(|e| format!("invalid Pod: {e}"))?;
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("metadata.name: Required value")?;
    let spec = pod.spec.as_mut().ok_or("spec: Required value")?;
    if spec.containers.is_empty() {
        return Err("spec.containers: Required value".into());
    }
    for (i, c) in spec.containers.iter().enumerate() {
        if c.name.is_empty() {
            return Err(format!("spec.containers[{i}].name: Required value"));
        }
        if c.image.as_deref().unwrap_or("").is_empty() {
            return Err(format!("spec.containers[{i}].image: Required value"));
        }
    }
    spec.node_name = Some(node.to_string());
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
    spec.termination_grace_period_seconds.get_or_insert(30);
    let mut hasher = Sha256::new();
    hasher.update(bytes);
    hasher.update(node.as_bytes());
    let hash: String = hasher
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    let meta = &mut pod.metadata;
    meta.name = Some(format!("{name}-{node}"));
    meta.namespace.get_or_insert_with(|| "default".into());
    meta.uid = Some(hash.clone());
    meta.resource_version = None;
    let annotations = meta.annotations.get_or_insert_with(Default::default);
    annotations.insert(ANNOTATION_SOURCE.into(), "file".into());
    annotations.insert(ANNOTATION_HASH.into(), hash);
    Ok(pod)
}

/// The mirror pod of a static pod as the API should hold it, owned by the node.
pub fn mirror_of(pod: &Pod, node: &Node) -> Pod {
    let mut mirror = pod.clone();
    let meta = &mut mirror.metadata;
    let hash = meta.uid.take().unwrap_or_default();
    meta.annotations
        .get_or_insert_with(Default::default)
        .insert(ANNOTATION_MIRROR.into(), hash);
    meta.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.metadata.name.clone().unwrap_or_default(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    }]);
    mirror.status = None;
    mirror
}

/// The hash a mirror pod was made from.
pub fn mirror_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_MIRROR))
        .map(String::as_str)
}

/// Makes the API's mirror of `pod` current: created when missing; replaced when it is of an
/// older version of the file or being deleted. A pod of the same name that is no mirror is
/// left alone (the kubelet's conflict).
pub async fn sync_mirror(client: &Client, pod: &Pod, node: &Node) -> Result<(), kube::Error> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    if let Some(existing) = api.get_opt(&name).await? {
        let current = mirror_hash(&existing) == pod.metadata.uid.as_deref()
            && existing.metadata.deletion_timestamp.is_none();
        if current || !is_mirror(&existing) {
            return Ok(());
        }
        delete_mirror(&api, &existing).await?;
    }
    match api
        .create(&PostParams::default(), &mirror_of(pod, node))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes a mirror pod at once: there is nothing behind it for the kubelet to stop.
pub async fn delete_mirror(api: &Api<Pod>, mirror: &Pod) -> Result<(), kube::Error> {
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: mirror
            .metadata
            .uid
            .clone()
            .map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
        ..Default::default()
    };
    match api
        .delete(mirror.metadata.name.as_deref().unwrap_or_default(), &params)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: kube-system\nspec:\n  containers:\n  - name: c\n    image: seine.local/busybox:test\n";

    #[test]
    fn a_static_pod_is_named_and_identified_for_its_node() {
        let pod = static_pod(MANIFEST.as_bytes(), "node-1").unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("web-node-1"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("kube-system"));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-1"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Always"));
        let uid = pod.metadata.uid.clone().unwrap();
        assert_eq!(uid.len(), 32);
        assert!(is_static(&pod));
        // The same file on another node, or a changed file, is another pod.
        let other = static_pod(MANIFEST.as_bytes(), "node-2").unwrap();
        assert_ne!(other.metadata.uid, pod.metadata.uid);
        let edited = MANIFEST.replace("busybox:test", "busybox:other");
        let edited = static_pod(edited.as_bytes(), "node-1").unwrap();
        assert_ne!(edited.metadata.uid, pod.metadata.uid);
        assert_eq!(
            static_pod(MANIFEST.as_bytes(), "node-1")
                .unwrap()
                .metadata
                .uid,
            pod.metadata.uid
        );
    }

    #[test]
    fn the_mirror_pod_is_owned_by_the_node_and_names_its_hash() {
        let pod = static_pod(MANIFEST.as_bytes(), "node-1").unwrap();
        let node = Node {
            metadata: kube::api::ObjectMeta {
                name: Some("node-1".into()),
                uid: Some("node-uid".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mirror = mirror_of(&pod, &node);
        assert!(is_mirror(&mirror));
        assert_eq!(mirror_hash(&mirror), pod.metadata.uid.as_deref());
        assert_eq!(mirror.metadata.uid, None);
        let owner = &mirror.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Node", "node-uid")
        );
    }

    #[test]
    fn invalid_manifests_say_what_is_wrong() {
        let cases = [
            ("{not yaml: [", "invalid YAML"),
            ("apiVersion: v1\nkind: Service\nmetadata: {name: x}\n", "not a Pod"),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {}\nspec: {containers: [{name: c, image: i}]}\n",
                "metadata.name",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n",
                "spec.containers",
            ),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nspec: {containers: [{name: c}]}\n",
                "image: Required",
            ),
        ];
        for (manifest, expected) in cases {
            let err = static_pod(manifest.as_bytes(), "n").unwrap_err();
            assert!(err.contains(expected), "{manifest:?}: {err}");
        }
    }

    #[test]
    fn the_directory_read_skips_hidden_files_and_reports_bad_ones() {
        let dir = std::env::temp_dir().join(format!("seine-static-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.yaml"), MANIFEST).unwrap();
        std::fs::write(dir.join(".web.yaml.swp"), "junk").unwrap();
        std::fs::write(dir.join("bad.yaml"), "kind: Pod").unwrap();
        let found = read_dir(&dir, "node-1");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.pods.len(), 1);
        assert_eq!(found.invalid.len(), 1);
        assert!(found.invalid[0].0.ends_with("bad.yaml"));
        assert!(read_dir(Path::new("/nonexistent/seine"), "n")
            .pods
            .is_empty());
    }
}
