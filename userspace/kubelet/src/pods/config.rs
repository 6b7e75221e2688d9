//! A Pod's spec as the runtime's sandbox and container configurations: metadata and labels the
//! kubelet finds its own sandboxes and containers by, DNS by `dnsPolicy`, namespaces, ports,
//! and a container's command, environment, mounts and Linux resources.

use std::{collections::HashMap, path::Path};

use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, ObjectReference, Pod, PodSpec};
use seine_apimachinery::quantity::milli_value;

use crate::Config;

pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// The restart count of a container instance, kept on it so that a restarted kubelet counts on.
pub const ANNOTATION_RESTART_COUNT: &str = "io.kubernetes.container.restartCount";

/// The pod (or one of its containers) as the object of an Event.
pub fn pod_ref(pod: &Pod, container: Option<&str>) -> ObjectReference {
    let (name, namespace, uid) = identity(pod);
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name),
        namespace: Some(namespace),
        uid: Some(uid),
        resource_version: pod.metadata.resource_version.clone(),
        field_path: container.map(|c| format!("spec.containers{{{c}}}")),
    }
}

/// The pod's name, namespace and UID (the API server sets all three).
pub fn identity(pod: &Pod) -> (String, String, String) {
    let m = &pod.metadata;
    (
        m.name.clone().unwrap_or_default(),
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.uid.clone().unwrap_or_default(),
    )
}

fn spec(pod: &Pod) -> PodSpec {
    pod.spec.clone().unwrap_or_default()
}

/// The resolver configuration of the pod's sandbox, by `dnsPolicy` as the kubelet builds it.
pub fn dns_config(pod: &Pod, config: &Config) -> Result<Option<cri::DnsConfig>, String> {
    let spec = spec(pod);
    let (_, namespace, _) = identity(pod);
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster = || {
        let domain = &config.cluster_domain;
        cri::DnsConfig {
            servers: config.cluster_dns.iter().map(ToString::to_string).collect(),
            searches: vec![
                format!("{namespace}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.clone(),
            ],
            options: vec!["ndots:5".into()],
        }
    };
    let mut dns = match policy {
        // Without --cluster-dns, ClusterFirst falls back to the node's resolver (with a
        // warning in the kubelet); a host-network pod uses the node's unless WithHostNet.
        "ClusterFirst" if !host_network && !config.cluster_dns.is_empty() => cluster(),
        "ClusterFirstWithHostNet" if !config.cluster_dns.is_empty() => cluster(),
        "ClusterFirst" | "ClusterFirstWithHostNet" | "Default" => {
            host_resolver(&config.resolv_conf)
        }
        "None" => cri::DnsConfig::default(),
        other => return Err(format!("unsupported dnsPolicy {other:?}")),
    };
    if let Some(extra) = spec.dns_config {
        dns.servers.extend(extra.nameservers.unwrap_or_default());
        dns.searches.extend(extra.searches.unwrap_or_default());
        for option in extra.options.unwrap_or_default() {
            let Some(name) = option.name else { continue };
            dns.options
                .retain(|o| o.split(':').next() != Some(name.as_str()));
            dns.options.push(match option.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    if policy == "None" && dns.servers.is_empty() {
        return Err("dnsPolicy None needs dnsConfig.nameservers".into());
    }
    // glibc reads at most 3 nameservers and 32 search domains.
    dns.servers.truncate(3);
    dns.searches.truncate(32);
    Ok(Some(dns))
}

/// The node's own resolver, read from `path` (empty when unreadable, as the kubelet's).
fn host_resolver(path: &Path) -> cri::DnsConfig {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut dns = cri::DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.servers.extend(words.next().map(str::to_string)),
            Some("search") | Some("domain") => {
                dns.searches = words.map(str::to_string).collect();
            }
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    dns
}

fn namespace_mode(host: bool) -> i32 {
    if host {
        cri::NamespaceMode::Node as i32
    } else {
        cri::NamespaceMode::Pod as i32
    }
}

/// The sandbox of attempt `attempt` of the pod.
pub fn sandbox_config(
    pod: &Pod,
    config: &Config,
    attempt: u32,
) -> Result<cri::PodSandboxConfig, String> {
    let (name, namespace, uid) = identity(pod);
    let spec = spec(pod);
    let mut labels: HashMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    labels.insert(LABEL_POD_NAME.into(), name.clone());
    labels.insert(LABEL_POD_NAMESPACE.into(), namespace.clone());
    labels.insert(LABEL_POD_UID.into(), uid.clone());
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.clone().unwrap_or_default())
        .filter_map(|p| {
            let host_port = p.host_port.filter(|p| *p > 0)?;
            Some(cri::PortMapping {
                protocol: match p.protocol.as_deref() {
                    Some("UDP") => cri::Protocol::Udp as i32,
                    Some("SCTP") => cri::Protocol::Sctp as i32,
                    _ => cri::Protocol::Tcp as i32,
                },
                container_port: p.container_port,
                host_port,
                host_ip: p.host_ip.unwrap_or_default(),
            })
        })
        .collect();
    let host_network = spec.host_network.unwrap_or(false);
    let hostname = if host_network {
        String::new()
    } else {
        spec.hostname.clone().unwrap_or_else(|| name.clone())
    };
    let security = spec.security_context.clone().unwrap_or_default();
    Ok(cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.clone(),
            uid: uid.clone(),
            namespace: namespace.clone(),
            attempt,
        }),
        hostname,
        log_directory: pod_log_dir(config, pod).display().to_string(),
        dns_config: dns_config(pod, config)?,
        port_mappings,
        labels,
        annotations: pod
            .metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: namespace_mode(host_network),
                    pid: if spec.host_pid.unwrap_or(false) {
                        cri::NamespaceMode::Node as i32
                    } else if spec.share_process_namespace.unwrap_or(false) {
                        cri::NamespaceMode::Pod as i32
                    } else {
                        cri::NamespaceMode::Container as i32
                    },
                    ipc: namespace_mode(spec.host_ipc.unwrap_or(false)),
                    ..Default::default()
                }),
                run_as_user: security.run_as_user.map(|value| cri::Int64Value { value }),
                run_as_group: security.run_as_group.map(|value| cri::Int64Value { value }),
                supplemental_groups: security.supplemental_groups.unwrap_or_default(),
                privileged: spec
                    .containers
                    .iter()
                    .chain(spec.init_containers.iter().flatten())
                    .any(privileged),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The kubelet's log directory of a pod: `<logs>/<namespace>_<name>_<uid>`.
pub fn pod_log_dir(config: &Config, pod: &Pod) -> std::path::PathBuf {
    let (name, namespace, uid) = identity(pod);
    config
        .pod_logs_dir
        .join(format!("{namespace}_{name}_{uid}"))
}

fn privileged(container: &Container) -> bool {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

/// Expands `$(VAR)` references from `env` as Kubernetes does: `$$` escapes, unknown references
/// stay as written.
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// CPU shares from a request in millicores, as the kubelet's cgroup v1 mapping (min 2).
fn cpu_shares(milli: i128) -> i64 {
    ((milli * 1024) / 1000).max(2) as i64
}

/// The container's Linux resources: CPU shares from requests, quota from limits, memory limit.
pub fn linux_resources(container: &Container) -> Result<cri::LinuxContainerResources, String> {
    let resources = container.resources.clone().unwrap_or_default();
    let get = |list: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
               name: &str| {
        list.as_ref()
            .and_then(|l| l.get(name))
            .map(|q| milli_value(&q.0).map_err(|e| format!("resources {name}: {}", e.0)))
            .transpose()
    };
    let cpu_limit = get(&resources.limits, "cpu")?;
    // A limit without a request requests the limit (the API server defaults it so too).
    let cpu_request = get(&resources.requests, "cpu")?.or(cpu_limit);
    let memory_limit = get(&resources.limits, "memory")?;
    const PERIOD: i64 = 100_000;
    Ok(cri::LinuxContainerResources {
        cpu_shares: cpu_request.map(cpu_shares).unwrap_or(2),
        cpu_period: if cpu_limit.is_some() { PERIOD } else { 0 },
        cpu_quota: cpu_limit
            .map(|m| ((m as i64 * PERIOD) / 1000).max(1000))
            .unwrap_or(0),
        memory_limit_in_bytes: memory_limit.map(|m| (m / 1000) as i64).unwrap_or(0),
        ..Default::default()
    })
}

/// The container's security context as the runtime takes it.
pub fn security_context(
    pod: &PodSpec,
    container: &Container,
) -> cri::LinuxContainerSecurityContext {
    let pod_security = pod.security_context.clone().unwrap_or_default();
    let security = container.security_context.clone().unwrap_or_default();
    let capabilities = security.capabilities.clone().unwrap_or_default();
    cri::LinuxContainerSecurityContext {
        capabilities: Some(cri::Capability {
            add_capabilities: capabilities.add.unwrap_or_default(),
            drop_capabilities: capabilities.drop.unwrap_or_default(),
            ..Default::default()
        }),
        privileged: security.privileged.unwrap_or(false),
        namespace_options: Some(cri::NamespaceOption {
            network: namespace_mode(pod.host_network.unwrap_or(false)),
            pid: if pod.host_pid.unwrap_or(false) {
                cri::NamespaceMode::Node as i32
            } else if pod.share_process_namespace.unwrap_or(false) {
                cri::NamespaceMode::Pod as i32
            } else {
                cri::NamespaceMode::Container as i32
            },
            ipc: namespace_mode(pod.host_ipc.unwrap_or(false)),
            ..Default::default()
        }),
        run_as_user: security
            .run_as_user
            .or(pod_security.run_as_user)
            .map(|value| cri::Int64Value { value }),
        run_as_group: security
            .run_as_group
            .or(pod_security.run_as_group)
            .map(|value| cri::Int64Value { value }),
        readonly_rootfs: security.read_only_root_filesystem.unwrap_or(false),
        supplemental_groups: pod_security.supplemental_groups.unwrap_or_default(),
        no_new_privs: security.allow_privilege_escalation == Some(false),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodDNSConfig, PodDNSConfigOption};

    fn config() -> Config {
        Config {
            node_name: "n1".into(),
            node_ip: None,
            node_labels: Default::default(),
            root_dir: "/tmp/k".into(),
            pod_logs_dir: "/tmp/logs".into(),
            max_pods: 110,
            port: 10250,
            cluster_dns: vec!["10.96.0.10".parse().unwrap()],
            cluster_domain: "cluster.local".into(),
            resolv_conf: "/nonexistent".into(),
            pod_manifest_path: None,
            file_check_frequency: std::time::Duration::from_secs(20),
            eviction_hard: Default::default(),
        }
    }

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("shop".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    #[test]
    fn cluster_first_dns_is_the_cluster_resolver_with_the_search_path() {
        let dns = dns_config(&pod(PodSpec::default()), &config())
            .unwrap()
            .unwrap();
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(
            dns.searches,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local"
            ]
        );
        assert_eq!(dns.options, ["ndots:5"]);
    }

    #[test]
    fn dns_policy_none_takes_dns_config_and_options_override() {
        let spec = PodSpec {
            dns_policy: Some("None".into()),
            dns_config: Some(PodDNSConfig {
                nameservers: Some(vec!["1.2.3.4".into()]),
                searches: Some(vec!["example.org".into()]),
                options: Some(vec![PodDNSConfigOption {
                    name: Some("ndots".into()),
                    value: Some("2".into()),
                }]),
            }),
            ..Default::default()
        };
        let dns = dns_config(&pod(spec), &config()).unwrap().unwrap();
        assert_eq!(dns.servers, ["1.2.3.4"]);
        assert_eq!(dns.searches, ["example.org"]);
        assert_eq!(dns.options, ["ndots:2"]);
        let empty = PodSpec {
            dns_policy: Some("None".into()),
            ..Default::default()
        };
        assert!(dns_config(&pod(empty), &config()).is_err());
    }

    #[test]
    fn host_network_pods_use_the_node_resolver_unless_with_host_net() {
        let spec = PodSpec {
            host_network: Some(true),
            ..Default::default()
        };
        let dns = dns_config(&pod(spec.clone()), &config()).unwrap().unwrap();
        assert!(dns.servers.is_empty());
        let with = PodSpec {
            dns_policy: Some("ClusterFirstWithHostNet".into()),
            ..spec
        };
        assert_eq!(
            dns_config(&pod(with), &config()).unwrap().unwrap().servers,
            ["10.96.0.10"]
        );
    }

    #[test]
    fn references_expand_as_kubernetes_does() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two".to_string()),
        ];
        assert_eq!(expand("x$(A)y$(B)", &env), "x1ytwo");
        assert_eq!(expand("$$(A) $(C) $(A", &env), "$(A) $(C) $(A");
        assert_eq!(expand("cost $5", &env), "cost $5");
    }

    #[test]
    fn resources_map_to_shares_quota_and_limit() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "resources": {"requests": {"cpu": "250m"}, "limits": {"cpu": "500m", "memory": "64Mi"}}
        }))
        .unwrap();
        let r = linux_resources(&c).unwrap();
        assert_eq!(r.cpu_shares, 256);
        assert_eq!((r.cpu_period, r.cpu_quota), (100_000, 50_000));
        assert_eq!(r.memory_limit_in_bytes, 64 << 20);
        let none = linux_resources(&Container::default()).unwrap();
        assert_eq!(
            (none.cpu_shares, none.cpu_quota, none.memory_limit_in_bytes),
            (2, 0, 0)
        );
    }
}
