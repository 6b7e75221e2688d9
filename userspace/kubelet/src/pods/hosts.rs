//! The /etc/hosts the kubelet gives each pod: localhost, the pod's own addresses with its
//! hostname (and its FQDN under a subdomain), then `hostAliases`.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Pod;

use super::{config::identity, volumes};
use crate::Config;

/// Writes the pod's /etc/hosts; its path (none for host-network pods, which see the node's).
pub fn write(pod: &Pod, ips: &[String], config: &Config) -> Result<Option<PathBuf>, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.host_network.unwrap_or(false) {
        return Ok(None);
    }
    let (name, _, _) = identity(pod);
    let hostname = spec.hostname.clone().unwrap_or(name);
    let mut text = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    for ip in ips {
        let fqdn = spec.subdomain.as_ref().map(|sub| {
            let (_, namespace, _) = identity(pod);
            format!(
                "{hostname}.{sub}.{namespace}.svc.{}\t",
                config.cluster_domain
            )
        });
        text.push_str(&format!("{ip}\t{}{hostname}\n", fqdn.unwrap_or_default()));
    }
    for alias in spec.host_aliases.iter().flatten() {
        text.push_str(&format!(
            "{}\t{}\n",
            alias.ip,
            alias.hostnames.clone().unwrap_or_default().join("\t")
        ));
    }
    let path = volumes::pod_dir(&config.root_dir, pod).join("etc-hosts");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(Some(path))
}
