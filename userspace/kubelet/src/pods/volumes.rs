//! A pod's volumes on the node, under `<root>/pods/<uid>/volumes/<plugin>/<name>` as the kubelet
//! lays them out: `emptyDir`, `hostPath`, and the projected kinds written as files (`configMap`,
//! `secret`, `downwardAPI`, `projected` with service account tokens), then the containers'
//! mounts. A volume kind this kubelet does not know fails the pod's setup with a message.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use k8s_cri::v1 as cri;
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret, Volume},
    },
    ByteString,
};
use kube::{api::PostParams, Api, Client};

use super::{config::identity, env::field_value};

/// The directory of a pod's state on the node.
pub fn pod_dir(root: &Path, pod: &Pod) -> PathBuf {
    root.join("pods").join(identity(pod).2)
}

/// Files of a projected volume: relative path -> (content, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn select(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<Vec<KeyToPath>>,
    mode: u32,
    what: &str,
) -> Result<Files, String> {
    let mut files = Files::new();
    match items {
        None => {
            for (k, v) in data {
                files.insert(k, (v, mode));
            }
        }
        Some(items) => {
            for item in items {
                let value = data
                    .get(&item.key)
                    .ok_or_else(|| format!("{what}: key {:?} not found", item.key))?;
                let item_mode = item.mode.map(|m| m as u32).unwrap_or(mode);
                files.insert(item.path, (value.clone(), item_mode));
            }
        }
    }
    Ok(files)
}

/// Writes `files` into `dir` atomically enough for a reader: each file replaced by rename.
fn write_files(dir: &Path, files: &Files) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for (path, (content, mode)) in files {
        if path.split('/').any(|p| p == ".." || p.is_empty()) || path.starts_with('/') {
            return Err(format!("invalid volume file path {path:?}"));
        }
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let tmp = target.with_extension("seine-tmp");
        std::fs::write(&tmp, content).map_err(|e| format!("writing {}: {e}", target.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &target).map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn config_map_files(
    client: &Client,
    namespace: &str,
    name: &str,
    items: Option<Vec<KeyToPath>>,
    optional: bool,
    mode: u32,
) -> Result<Files, String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(c)) => {
            let mut data: BTreeMap<String, Vec<u8>> = c
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                c.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, ByteString(v))| (k, v)),
            );
            select(data, items, mode, &format!("configmap {name:?}"))
        }
        Ok(None) if optional => Ok(Files::new()),
        Ok(None) => Err(format!("configmap {name:?} not found")),
        Err(e) => Err(format!("reading configmap {name:?}: {e}")),
    }
}

async fn secret_files(
    client: &Client,
    namespace: &str,
    name: &str,
    items: Option<Vec<KeyToPath>>,
    optional: bool,
    mode: u32,
) -> Result<Files, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match api.get_opt(name).await {
        Ok(Some(s)) => {
            let data = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, ByteString(v))| (k, v))
                .collect();
            select(data, items, mode, &format!("secret {name:?}"))
        }
        Ok(None) if optional => Ok(Files::new()),
        Ok(None) => Err(format!("secret {name:?} not found")),
        Err(e) => Err(format!("reading secret {name:?}: {e}")),
    }
}

/// A service account token for the pod, bound to it, through the TokenRequest API.
async fn token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<Vec<u8>, String> {
    let (name, namespace, uid) = identity(pod);
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), &namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().collect(),
            expiration_seconds: Some(expiration.unwrap_or(3607)),
            bound_object_ref: Some(k8s_openapi::api::authentication::v1::BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name),
                uid: Some(uid),
            }),
        },
        ..Default::default()
    };
    let issued: TokenRequest = api
        .create_subresource(
            "token",
            &account,
            &PostParams::default(),
            &serde_json::to_vec(&request).map_err(|e| e.to_string())?,
        )
        .await
        .map_err(|e| {
            format!("requesting a token for service account {namespace}/{account}: {e}")
        })?;
    Ok(issued
        .status
        .map(|s| s.token)
        .unwrap_or_default()
        .into_bytes())
}

fn downward_files(
    pod: &Pod,
    items: Vec<k8s_openapi::api::core::v1::DownwardAPIVolumeFile>,
    mode: u32,
) -> Result<Files, String> {
    let mut files = Files::new();
    for item in items {
        let value = match (&item.field_ref, &item.resource_field_ref) {
            (Some(f), _) => match f.field_path.as_str() {
                // The maps are written as `key="value"` lines.
                "metadata.labels" | "metadata.annotations" => {
                    let map = if f.field_path == "metadata.labels" {
                        pod.metadata.labels.clone()
                    } else {
                        pod.metadata.annotations.clone()
                    };
                    map.unwrap_or_default()
                        .iter()
                        .map(|(k, v)| format!("{k}={v:?}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                }
                path => field_value(pod, path)?,
            },
            (None, Some(r)) => {
                return Err(format!(
                    "downwardAPI resourceFieldRef {:?} is not supported here",
                    r.resource
                ))
            }
            (None, None) => return Err(format!("downwardAPI item {:?} names no field", item.path)),
        };
        files.insert(
            item.path,
            (
                value.into_bytes(),
                item.mode.map(|m| m as u32).unwrap_or(mode),
            ),
        );
    }
    Ok(files)
}

/// Sets up the pod's volumes; returns each volume's host path by name.
pub async fn set_up(
    client: &Client,
    root: &Path,
    pod: &Pod,
) -> Result<BTreeMap<String, PathBuf>, String> {
    let (_, namespace, _) = identity(pod);
    let base = pod_dir(root, pod).join("volumes");
    let mut paths = BTreeMap::new();
    let volumes: Vec<Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for volume in volumes {
        let name = volume.name.clone();
        let dir = |plugin: &str| base.join(plugin).join(&name);
        let path = if volume.empty_dir.is_some() {
            let d = dir("kubernetes.io~empty-dir");
            std::fs::create_dir_all(&d).map_err(|e| format!("emptyDir {name}: {e}"))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| e.to_string())?;
            d
        } else if let Some(host) = &volume.host_path {
            let p = PathBuf::from(&host.path);
            match host.type_.as_deref().unwrap_or("") {
                "DirectoryOrCreate" => std::fs::create_dir_all(&p)
                    .map_err(|e| format!("hostPath {}: {e}", host.path))?,
                "FileOrCreate" if !p.exists() => {
                    std::fs::write(&p, b"").map_err(|e| format!("hostPath {}: {e}", host.path))?
                }
                "Directory" if !p.is_dir() => {
                    return Err(format!(
                        "hostPath type check failed: {} is not a directory",
                        host.path
                    ))
                }
                "File" if !p.is_file() => {
                    return Err(format!(
                        "hostPath type check failed: {} is not a file",
                        host.path
                    ))
                }
                _ => {}
            }
            p
        } else if let Some(c) = &volume.config_map {
            let mode = c.default_mode.map(|m| m as u32).unwrap_or(0o644);
            let files = config_map_files(
                client,
                &namespace,
                &c.name,
                c.items.clone(),
                c.optional.unwrap_or(false),
                mode,
            )
            .await?;
            let d = dir("kubernetes.io~configmap");
            write_files(&d, &files)?;
            d
        } else if let Some(s) = &volume.secret {
            let mode = s.default_mode.map(|m| m as u32).unwrap_or(0o644);
            let secret = s.secret_name.clone().unwrap_or_default();
            let files = secret_files(
                client,
                &namespace,
                &secret,
                s.items.clone(),
                s.optional.unwrap_or(false),
                mode,
            )
            .await?;
            let d = dir("kubernetes.io~secret");
            write_files(&d, &files)?;
            d
        } else if let Some(d) = &volume.downward_api {
            let mode = d.default_mode.map(|m| m as u32).unwrap_or(0o644);
            let files = downward_files(pod, d.items.clone().unwrap_or_default(), mode)?;
            let target = dir("kubernetes.io~downward-api");
            write_files(&target, &files)?;
            target
        } else if let Some(p) = &volume.projected {
            let mode = p.default_mode.map(|m| m as u32).unwrap_or(0o644);
            let mut files = Files::new();
            for source in p.sources.clone().unwrap_or_default() {
                if let Some(c) = source.config_map {
                    files.extend(
                        config_map_files(
                            client,
                            &namespace,
                            &c.name,
                            c.items,
                            c.optional.unwrap_or(false),
                            mode,
                        )
                        .await?,
                    );
                } else if let Some(s) = source.secret {
                    files.extend(
                        secret_files(
                            client,
                            &namespace,
                            &s.name,
                            s.items,
                            s.optional.unwrap_or(false),
                            mode,
                        )
                        .await?,
                    );
                } else if let Some(d) = source.downward_api {
                    files.extend(downward_files(pod, d.items.unwrap_or_default(), mode)?);
                } else if let Some(t) = source.service_account_token {
                    let token = token(client, pod, t.audience, t.expiration_seconds).await?;
                    files.insert(t.path, (token, mode));
                } else {
                    return Err(format!(
                        "volume {name}: a projected source this kubelet does not support"
                    ));
                }
            }
            let d = dir("kubernetes.io~projected");
            write_files(&d, &files)?;
            d
        } else {
            return Err(format!(
                "volume {name}: unsupported volume type (this kubelet mounts emptyDir, hostPath, configMap, secret, downwardAPI and projected)"
            ));
        };
        paths.insert(name, path);
    }
    Ok(paths)
}

/// The container's mounts of the pod's volumes.
pub fn mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Vec<cri::Mount>, String> {
    let mut mounts = Vec::new();
    for m in container.volume_mounts.clone().unwrap_or_default() {
        let host = volumes.get(&m.name).ok_or_else(|| {
            format!(
                "container {}: volumeMount {:?} names no volume",
                container.name, m.name
            )
        })?;
        let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if sub.split('/').any(|p| p == "..") || sub.starts_with('/') => {
                return Err(format!("invalid subPath {sub:?}"))
            }
            Some(sub) => host.join(sub),
            None => host.clone(),
        };
        mounts.push(cri::Mount {
            container_path: m.mount_path.clone(),
            host_path: host.display().to_string(),
            readonly: m.read_only.unwrap_or(false),
            ..Default::default()
        });
    }
    Ok(mounts)
}

/// Removes what the pod's volumes left on the node (not hostPath targets).
pub fn tear_down(root: &Path, pod_uid: &str) {
    let dir = root.join("pods").join(pod_uid);
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), "removing a pod's volumes: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_and_paths_checked() {
        let dir = std::env::temp_dir().join(format!("seine-kubelet-vol-{}", std::process::id()));
        let mut files = Files::new();
        files.insert("a/b.txt".into(), (b"hi".to_vec(), 0o600));
        write_files(&dir, &files).unwrap();
        assert_eq!(std::fs::read(dir.join("a/b.txt")).unwrap(), b"hi");
        let mut bad = Files::new();
        bad.insert("../x".into(), (vec![], 0o644));
        assert!(write_files(&dir, &bad).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keys_are_selected_by_items() {
        let data = BTreeMap::from([("k".to_string(), b"v".to_vec())]);
        let items = Some(vec![KeyToPath {
            key: "k".into(),
            path: "p".into(),
            mode: None,
        }]);
        assert!(select(data.clone(), items, 0o644, "cm")
            .unwrap()
            .contains_key("p"));
        let missing = Some(vec![KeyToPath {
            key: "x".into(),
            path: "p".into(),
            mode: None,
        }]);
        assert!(select(data, missing, 0o644, "cm").is_err());
    }
}
