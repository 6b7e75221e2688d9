//! The agent's node networking: waits for its Node's pod CIDR, sets up the VXLAN device,
//! publishes the VTEP on the Node, installs the CNI plugin and its conflist (as an install-cni
//! step would), then keeps the overlay's entries in step with the Nodes as they come, change and go.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{Patch, PatchParams},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use rtnetlink::Handle;
use seine_apimachinery::cidr::Ipv4Cidr;
use seine_cni::{conf::NodeConf, spec};
use seine_netlink::{self as net, NetError};
use serde_json::{json, Value};
use tracing::{error, info, warn};

use crate::overlay::{self, Device};

/// What install-cni writes: the plugin binary and the conflist, by these names.
pub const PLUGIN_FILE: &str = "seine-cni";
pub const CONFLIST_FILE: &str = "10-seine.conflist";
/// The prefix of the host sides of the veths seine-cni makes: pod-facing, never an uplink.
pub const POD_VETH_PREFIX: &str = seine_cni::plugin::HOST_PREFIX;

/// The CNI versions the plugin speaks (its conflist offers them all).
pub use seine_cni::spec::SUPPORTED_VERSIONS as CNI_VERSIONS;

#[derive(Debug, Clone)]
pub struct Options {
    pub node_name: String,
    pub device: String,
    pub vni: u32,
    pub port: u16,
    /// The underlay address; the Node's InternalIP when not given.
    pub vtep_address: Option<Ipv4Addr>,
    /// Where the plugin binary and the conflist go; no install when `None`.
    pub cni_bin_dir: Option<PathBuf>,
    pub cni_conf_dir: Option<PathBuf>,
    pub cni_plugin: PathBuf,
    pub cni_data_dir: PathBuf,
    pub cni_network: String,
    /// Plugins chained after seine-cni, by type (`portmap`, `bandwidth`, ...), found in
    /// `cni_bin_dir`. With `portmap` among them, hostPorts are left to it.
    pub cni_chain: Vec<String>,
    pub bpffs_dir: PathBuf,
    /// How often the device and entries are checked even when no Node changed.
    pub resync: Duration,
}

/// What the agent's /readyz and /metrics show of the overlay.
#[derive(Clone, Default)]
pub struct Status {
    pub ready: Arc<AtomicBool>,
    pub peers: Gauge,
    pub reconciles: Family<Vec<(String, String)>, Counter>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeNetError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Net(#[from] NetError),
    /// The chained plugins cannot be installed with seine-cni.
    #[error("CNI chain: {0}")]
    Chain(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeNetError {
    let context = context.into();
    move |source| NodeNetError::Io { context, source }
}

fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
}

/// The MTU of the link holding `address`, the uplink the overlay runs over.
async fn uplink_mtu(handle: &Handle, address: Ipv4Addr) -> Result<Option<u32>, NetError> {
    for link in net::links(handle).await? {
        let index = link.header.index;
        if net::addresses(handle, index)
            .await?
            .iter()
            .any(|(ip, _)| *ip == address)
        {
            return Ok(net::link_mtu(&link));
        }
    }
    Ok(None)
}

/// The conflist for this node (seine-cni's own type, which it reads back).
pub fn conflist(opts: &Options, pod_cidr: Ipv4Cidr, mtu: u32, versions: &[String]) -> Value {
    NodeConf {
        network: &opts.cni_network,
        pod_cidr,
        mtu,
        vxlan_device: &opts.device,
        data_dir: &opts.cni_data_dir,
        bpffs_dir: &opts.bpffs_dir,
        chain: &opts.cni_chain,
        versions,
    }
    .conflist()
}

/// The CNI versions that seine-cni and every chained plugin speak, lowest first, as each
/// plugin's `VERSION` command reports them: a runtime then never picks one that some plugin of
/// the chain cannot speak.
pub fn chain_versions(bin_dir: &Path, chain: &[String]) -> Result<Vec<String>, NodeNetError> {
    let mut common: Vec<String> = CNI_VERSIONS.iter().map(|v| v.to_string()).collect();
    for plugin in chain {
        let supported = plugin_versions(&bin_dir.join(plugin))?;
        common.retain(|v| supported.contains(v));
    }
    if common.is_empty() {
        return Err(NodeNetError::Chain(format!(
            "no CNI version is spoken by seine-cni ({}) and every chained plugin ({})",
            CNI_VERSIONS.join(", "),
            chain.join(", ")
        )));
    }
    common.sort_by_key(|v| spec::version_key(v));
    Ok(common)
}

/// The `supportedVersions` a plugin binary reports for `CNI_COMMAND=VERSION`.
fn plugin_versions(binary: &Path) -> Result<Vec<String>, NodeNetError> {
    use std::io::Write as _;
    let failed = |why: String| NodeNetError::Chain(format!("{}: {why}", binary.display()));
    let mut child = std::process::Command::new(binary)
        .env("CNI_COMMAND", "VERSION")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| failed(format!("cannot run it for VERSION: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(br#"{"cniVersion":"0.4.0"}"#);
    }
    // A plugin that hangs must not hold the install up forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed("VERSION did not answer within 5s".into()));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(format!("reading its VERSION answer: {e}")))?;
    let answer: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| failed(format!("its VERSION answer is not JSON: {e}")))?;
    answer
        .get("supportedVersions")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .ok_or_else(|| {
            failed(format!(
                "its VERSION answer has no supportedVersions: {answer}"
            ))
        })
}

/// Writes `bytes` to `path` whole: a reader sees the old file or the new one, never half of it.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeNetError> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("seine-tmp");
    std::fs::write(&tmp, bytes).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("setting the mode of {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("installing {}", path.display())))
}

/// Installs the plugin binary and the conflist (binary first: a runtime that sees the conflist
/// finds the plugin).
pub fn install_cni(opts: &Options, pod_cidr: Ipv4Cidr, mtu: u32) -> Result<(), NodeNetError> {
    let (Some(bin_dir), Some(conf_dir)) = (&opts.cni_bin_dir, &opts.cni_conf_dir) else {
        return Ok(());
    };
    for dir in [bin_dir, conf_dir] {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let binary = std::fs::read(&opts.cni_plugin).map_err(io(format!(
        "reading the plugin {}",
        opts.cni_plugin.display()
    )))?;
    let versions = chain_versions(bin_dir, &opts.cni_chain)?;
    write_atomically(&bin_dir.join(PLUGIN_FILE), &binary, 0o755)?;
    let text =
        serde_json::to_vec_pretty(&conflist(opts, pod_cidr, mtu, &versions)).unwrap_or_default();
    write_atomically(&conf_dir.join(CONFLIST_FILE), &text, 0o644)?;
    info!(bin = %bin_dir.display(), conf = %conf_dir.display(), "CNI plugin and conflist installed");
    Ok(())
}

/// Undoes `install_cni` (the conflist first: runtimes stop using the network before the plugin
/// goes); files already gone are fine.
pub fn uninstall_cni(bin_dir: &Path, conf_dir: &Path) -> Result<(), NodeNetError> {
    for path in [conf_dir.join(CONFLIST_FILE), bin_dir.join(PLUGIN_FILE)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", path.display()))(e)),
        }
    }
    Ok(())
}

fn vtep_patch(vtep: Ipv4Addr, mac: [u8; 6]) -> Value {
    json!({"metadata": {"annotations": {
        overlay::ANNOTATION_VTEP_IP: vtep.to_string(),
        overlay::ANNOTATION_VTEP_MAC: net::format_mac(mac),
    }}})
}

/// Runs the node's networking until the process stops. Returns only on an error it cannot wait
/// out (the caller logs it and keeps serving the datapath).
pub async fn run(client: Client, opts: Options, status: Status) -> Result<(), NodeNetError> {
    let nodes: Api<Node> = Api::all(client);
    // The Node must exist with a pod CIDR (set by node IPAM, or by hand) and an address.
    let mut waited = 0u32;
    let (pod_cidr, vtep) = loop {
        // Say what is awaited every 10 s, not every second.
        let say = waited.is_multiple_of(10);
        waited += 1;
        let node = match nodes.get_opt(&opts.node_name).await {
            Ok(Some(node)) => node,
            Ok(None) => {
                if say {
                    info!(node = %opts.node_name, "waiting for the Node object");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => {
                if say {
                    warn!("reading the Node: {e}; retrying");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let cidr = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(Ipv4Cidr::parse);
        match (cidr, opts.vtep_address.or_else(|| internal_ip(&node))) {
            (Some(cidr), Some(vtep)) => break (cidr, vtep),
            (None, _) if say => {
                info!(node = %opts.node_name, "waiting for the Node's spec.podCIDR")
            }
            (_, None) if say => info!(
                node = %opts.node_name,
                "waiting for the Node's InternalIP (or pass --vtep-address)"
            ),
            _ => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(io("opening a netlink socket"))?;
    tokio::spawn(connection);
    let uplink = uplink_mtu(&handle, vtep).await?.unwrap_or(1500);
    let device = Device {
        name: opts.device.clone(),
        vni: opts.vni,
        port: opts.port,
        local: vtep,
        mtu: uplink.saturating_sub(seine_netlink::VXLAN_OVERHEAD),
    };
    let mac = overlay::ensure_device(&handle, &device, pod_cidr).await?;
    let mac_text = net::format_mac(mac);
    info!(device = %device.name, vni = device.vni, port = device.port, vtep = %vtep,
          mac = %mac_text, mtu = device.mtu, pod_cidr = %pod_cidr, "VXLAN device ready");
    let patch = vtep_patch(vtep, mac);
    let mut published = mac;
    loop {
        match nodes
            .patch(
                &opts.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => break,
            Err(e) => {
                warn!("publishing the VTEP on the Node: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    install_cni(&opts, pod_cidr, device.mtu)?;

    // The Nodes as the watch reports them; `listed` once the first full list is in.
    let mut known: BTreeMap<String, Node> = BTreeMap::new();
    let mut relisting: BTreeMap<String, Node> = BTreeMap::new();
    let mut listed = false;
    let stream = watcher(nodes.clone(), watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut tick = tokio::time::interval(opts.resync);
    let mut settle = tokio::time::interval(Duration::from_millis(100));
    let mut dirty = true;
    let mut synced = false;
    loop {
        tokio::select! {
            event = stream.next() => match event {
                Some(Ok(event)) => {
                    let name = |n: &Node| n.metadata.name.clone().unwrap_or_default();
                    match event {
                        watcher::Event::Apply(node) => {
                            known.insert(name(&node), node);
                        }
                        watcher::Event::Delete(node) => {
                            known.remove(&name(&node));
                        }
                        watcher::Event::Init => relisting.clear(),
                        watcher::Event::InitApply(node) => {
                            relisting.insert(name(&node), node);
                        }
                        watcher::Event::InitDone => {
                            known = std::mem::take(&mut relisting);
                            listed = true;
                        }
                    }
                    dirty = true;
                }
                Some(Err(e)) => warn!("watching Nodes: {e}"),
                None => return Ok(()),
            },
            _ = tick.tick() => {
                // Someone may have removed the device or an entry: put them back, and publish
                // the MAC again if it changed (a device made by someone else).
                match overlay::ensure_device(&handle, &device, pod_cidr).await {
                    Ok(now) if now != published => {
                        let patch = vtep_patch(vtep, now);
                        match nodes.patch(&opts.node_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                            Ok(_) => published = now,
                            Err(e) => warn!("publishing the VTEP on the Node: {e}"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => error!("checking the VXLAN device: {e}"),
                }
                dirty = true;
            }
            _ = settle.tick() => {
                if !dirty || !listed {
                    continue;
                }
                dirty = false;
                let all: Vec<Node> = known.values().cloned().collect();
                let peers = overlay::peers(&all, &opts.node_name);
                match overlay::reconcile(&handle, &device.name, &peers).await {
                    Ok(changes) => {
                        status.peers.set(peers.len() as i64);
                        status.reconciles.get_or_create(&vec![("result".into(), "ok".into())]).inc();
                        if changes.added + changes.removed > 0 {
                            info!(peers = peers.len(), added = changes.added,
                                  removed = changes.removed, "overlay reconciled");
                        }
                        if !synced {
                            synced = true;
                            status.ready.store(true, Ordering::SeqCst);
                            info!(peers = peers.len(), "overlay ready");
                        }
                    }
                    Err(e) => {
                        status.reconciles.get_or_create(&vec![("result".into(), "error".into())]).inc();
                        error!("reconciling the overlay: {e}");
                        dirty = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(chain: &[&str]) -> Options {
        Options {
            node_name: "n1".into(),
            device: "seine.vxlan".into(),
            vni: 1,
            port: 8472,
            vtep_address: None,
            cni_bin_dir: None,
            cni_conf_dir: None,
            cni_plugin: PathBuf::new(),
            cni_data_dir: "/var/lib/cni/seine".into(),
            cni_network: "seine".into(),
            cni_chain: chain.iter().map(|t| t.to_string()).collect(),
            bpffs_dir: "/sys/fs/bpf/seine".into(),
            resync: Duration::from_secs(10),
        }
    }

    fn versions(list: &[&str]) -> Vec<String> {
        list.iter().map(|v| v.to_string()).collect()
    }

    #[test]
    fn the_conflist_carries_the_agents_flags() {
        let cidr = Ipv4Cidr::parse("10.244.1.0/24").unwrap();
        let list = conflist(
            &options(&["bandwidth"]),
            cidr,
            1450,
            &versions(&CNI_VERSIONS),
        );
        assert_eq!(list["name"], "seine");
        let seine = &list["plugins"][0];
        assert_eq!(seine["podCIDR"], "10.244.1.0/24");
        assert_eq!(seine["vxlanDevice"], "seine.vxlan");
        assert_eq!(seine["dataDir"], "/var/lib/cni/seine");
        assert_eq!(seine["bpffsDir"], "/sys/fs/bpf/seine");
        assert_eq!(list["plugins"][1]["type"], "bandwidth");
    }

    /// A plugin binary that answers VERSION with `answer` (or sleeps when it is empty).
    fn plugin(dir: &Path, name: &str, answer: &str) {
        use std::os::unix::fs::PermissionsExt as _;
        let body = if answer.is_empty() {
            "#!/bin/sh\nsleep 30\n".to_string()
        } else {
            format!("#!/bin/sh\ncat >/dev/null\necho '{answer}'\n")
        };
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn chained_plugins_narrow_the_versions_or_refuse_the_chain() {
        let dir = std::env::temp_dir().join(format!("seine-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        plugin(
            &dir,
            "old",
            r#"{"cniVersion":"0.4.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}"#,
        );
        plugin(&dir, "future", r#"{"supportedVersions":["2.0.0"]}"#);
        plugin(&dir, "garbled", "not json");
        plugin(&dir, "hangs", "");
        let chain = |types: &[&str]| {
            chain_versions(
                &dir,
                &types.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(chain(&[]).unwrap(), versions(&CNI_VERSIONS));
        assert_eq!(chain(&["old"]).unwrap(), versions(&["0.4.0", "1.0.0"]));
        for bad in [
            &["future"][..],
            &["old", "garbled"],
            &["missing"],
            &["hangs"],
        ] {
            let e = chain(bad).unwrap_err().to_string();
            assert!(e.starts_with("CNI chain: "), "{bad:?}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
