//! seine-kubelet: Kubernetes' kubelet role over a CRI runtime (containerd).
//!
//! - [`node`]: registers the Node, keeps its status and conditions true, renews its Lease.
//! - [`pods`]: runs the pods bound to the node, one worker each, through [`cri`].
//! - [`machine`]: capacity, identity and what is available, from /proc.
//! - [`eviction`]: the thresholds that make a pressure condition true.
//! - [`daemon`]: the flags, the health server, and the loops tied together.

pub mod cri;
pub mod daemon;
pub mod eviction;
pub mod machine;
pub mod node;
pub mod pods;

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

/// What the kubelet is told by its flags.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub node_ip: Option<IpAddr>,
    pub node_labels: BTreeMap<String, String>,
    /// Pod volumes and state live under it (`--root-dir`, /var/lib/kubelet).
    pub root_dir: PathBuf,
    /// Where containers' logs go (the kubelet's /var/log/pods).
    pub pod_logs_dir: PathBuf,
    pub max_pods: u32,
    /// The kubelet API's port, as the Node's `daemonEndpoints` advertise it.
    pub port: u16,
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    /// The resolver configuration of pods with `dnsPolicy: Default`.
    pub resolv_conf: PathBuf,
    /// The directory of static pod manifests (`--pod-manifest-path`).
    pub pod_manifest_path: Option<PathBuf>,
    /// How often it is read again.
    pub file_check_frequency: std::time::Duration,
    /// What the pressure conditions mean (`--eviction-hard`).
    pub eviction_hard: eviction::Thresholds,
}
