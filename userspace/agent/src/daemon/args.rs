//! seine-agent's command line, with kube-proxy's and Cilium's names where they have one.

use std::path::PathBuf;

use crate::bpf::DEFAULT_BPFFS_DIR;
use clap::{Parser, ValueEnum};

#[derive(Parser, Clone)]
#[command(
    name = "seine-agent",
    version,
    about = "Seine's node agent: the eBPF service datapath"
)]
pub struct Args {
    /// Where this node's maps and programs are pinned.
    #[arg(long, env = "SEINE_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    pub bpffs_dir: PathBuf,
    /// Service and EndpointSlice objects (YAML or JSON), re-read when the file changes, instead
    /// of the API's (for tests and offline use). Without it the services come from the API
    /// server when one is configured (--kubeconfig, --node-name, or in a pod).
    #[arg(long)]
    pub services_file: Option<PathBuf>,
    /// Attach the datapath to every interface whose name starts with one of these prefixes
    /// (the host side of pod veths).
    #[arg(long = "attach-prefix", default_values = ["lxc"])]
    pub attach_prefixes: Vec<String>,
    /// Datapath implementation.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub datapath: Mode,
    /// iptables backend, for the iptables datapath and for cleanup.
    #[arg(long, value_enum, default_value_t = IptablesChoice::Auto)]
    pub iptables_backend: IptablesChoice,
    /// Seconds between checks that the rules (iptables, nftables) still stand; a full resync
    /// repairs what someone else removed. One runs hourly regardless.
    #[arg(long, default_value_t = 30)]
    pub iptables_resync_seconds: u64,
    /// Address of /healthz, /livez, /readyz and /metrics (kube-proxy's health port).
    #[arg(long, alias = "healthz-bind-address", default_value = "0.0.0.0:10256")]
    pub health_addr: std::net::SocketAddr,
    /// /healthz fails once a change has waited this long to be written (kube-proxy's healthz).
    #[arg(long, default_value = "60s", value_parser = seine_apimachinery::duration::parse_flag)]
    pub healthz_timeout: std::time::Duration,
    /// At least this long between two writes, so that a burst of changes is one
    /// (kube-proxy's --min-sync-period) [default: 0 for eBPF, 1s for iptables and nftables].
    #[arg(long, value_parser = seine_apimachinery::duration::parse_flag)]
    pub min_sync_period: Option<std::time::Duration>,
    #[arg(long, default_value_t = seine_common::DEFAULT_MAX_SERVICES)]
    pub max_services: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_CT_SIZE)]
    pub ct_size: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_AFFINITY_SIZE)]
    pub affinity_size: u32,
    /// Serve the node's own processes (host network) at the socket, as Cilium's socket LB does:
    /// in eBPF mode their connects and sends to a service or host port go straight to a backend.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub socket_lb: bool,
    /// The cgroup v2 directory whose processes' sockets are served [default: the root of the
    /// unified hierarchy, as mounted].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Remove Seine's filters from matching interfaces, its pinned maps and its iptables chains,
    /// then exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// This node's name (kube-proxy's --hostname-override): for `internalTrafficPolicy: Local`
    /// and the node's zone, and it turns on the pod network (VXLAN overlay and CNI install) for
    /// the Node of this name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Leave the pod network to another CNI: the agent only proxies services.
    #[arg(long)]
    pub no_pod_network: bool,
    /// The API server's kubeconfig; in a pod, the service account is used without it.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = crate::overlay::DEFAULT_DEVICE)]
    pub vxlan_device: String,
    #[arg(long, default_value_t = crate::overlay::DEFAULT_VNI)]
    pub vxlan_vni: u32,
    #[arg(long, default_value_t = crate::overlay::DEFAULT_PORT)]
    pub vxlan_port: u16,
    /// The node's underlay address (the VTEP) [default: the Node's InternalIP].
    #[arg(long)]
    pub vtep_address: Option<std::net::Ipv4Addr>,
    /// Where to install the seine-cni binary.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Where to write the conflist (10-seine.conflist).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where the plugin keeps its address allocations.
    #[arg(long, default_value = "/var/lib/cni/seine")]
    pub cni_data_dir: PathBuf,
    /// The network name in the conflist.
    #[arg(long, default_value = "seine")]
    pub cni_network: String,
    /// The plugin binary to install [default: seine-cni next to this agent].
    #[arg(long)]
    pub cni_plugin: Option<PathBuf>,
    /// Plugins to chain after seine-cni in the conflist, by type (found in --cni-bin-dir), for
    /// example `portmap` (which then handles hostPorts instead of Seine) or `bandwidth`.
    #[arg(long, value_delimiter = ',')]
    pub cni_chain: Vec<String>,
    /// Skip installing the CNI plugin and conflist.
    #[arg(long)]
    pub no_cni_install: bool,
    /// Seconds between overlay checks when no Node changed.
    #[arg(long, default_value_t = 10)]
    pub overlay_resync_seconds: u64,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Mode {
    /// eBPF, falling back when loading or attaching fails: to nftables where nft is the system's
    /// iptables backend (and `nft` is installed), else to iptables.
    Auto,
    Ebpf,
    Iptables,
    /// kube-proxy's nftables mode: one table of Seine's own, verdict maps.
    Nftables,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum IptablesChoice {
    /// The backend that already holds rules, else the one `iptables` points at.
    Auto,
    Nft,
    Legacy,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}
