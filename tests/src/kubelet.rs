//! A node as Kubernetes runs one: a node namespace on an underlay, containerd with its CRI
//! plugin calling seine-cni (a standalone conflist), and seine-kubelet registered with the API
//! server through a relay. Everything goes on drop, the kubelet first.

use std::{net::Ipv4Addr, path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, Result};

use crate::{
    apiserver::ApiServer,
    bin,
    cni::{standalone_conflist, standalone_node, CniDirs, Relay, Underlay, REFERENCE_PLUGINS},
    containerd::Containerd,
    Node, Process,
};

/// The cluster DNS address the kubelets are told of.
pub const CLUSTER_DNS: &str = "10.96.0.10";

pub struct KubeletNode {
    kubelet: Option<Process>,
    pub containerd: Containerd,
    _relay: Relay,
    pub dirs: CniDirs,
    pub node: Node,
    _underlay: Underlay,
    pub name: String,
    pub ip: Ipv4Addr,
    pub root_dir: PathBuf,
    args: Vec<String>,
}

impl KubeletNode {
    /// A node named `name` at `ip` with pods from `pod_cidr`, its kubelet started with `extra`
    /// flags and registered with `api`.
    pub fn start(
        api: &ApiServer,
        name: &str,
        ip: Ipv4Addr,
        pod_cidr: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let (node, underlay) = standalone_node("kl", ip, 1500)?;
        let dirs = CniDirs::create(&node.prefix)?;
        std::fs::write(
            dirs.conf().join("10-seine.conflist"),
            serde_json::to_vec(&standalone_conflist(
                pod_cidr,
                &dirs.data(),
                &node.bpffs_dir,
            ))?,
        )?;
        std::fs::copy(bin("seine-cni")?, dirs.bin().join("seine-cni"))?;
        // containerd's CRI brings up each sandbox's loopback through the reference plugin.
        for plugin in ["portmap", "loopback"] {
            std::fs::copy(
                format!("{REFERENCE_PLUGINS}/{plugin}"),
                dirs.bin().join(plugin),
            )
            .with_context(|| {
                format!(
                    "copying {REFERENCE_PLUGINS}/{plugin} (package containernetworking-plugins)"
                )
            })?;
        }
        let containerd = Containerd::start_cri(&node.ns, &node.prefix, &dirs.bin(), &dirs.conf())?;
        let relay = Relay::start(&node.ns, api.addr.port())?;
        let root_dir = std::env::temp_dir().join(format!("{}-kubelet", node.prefix));
        std::fs::create_dir_all(&root_dir)?;
        let mut args: Vec<String> = [
            "--kubeconfig",
            &api.kubeconfig.display().to_string(),
            "--hostname-override",
            name,
            "--node-ip",
            &ip.to_string(),
            "--container-runtime-endpoint",
            &containerd.cri_endpoint(),
            "--root-dir",
            &root_dir.join("root").display().to_string(),
            "--pod-logs-dir",
            &root_dir.join("logs").display().to_string(),
            "--healthz-port",
            "0",
            "--node-status-update-frequency",
            "1s",
            "--cluster-dns",
            CLUSTER_DNS,
            "--pod-manifest-path",
            &root_dir.join("manifests").display().to_string(),
            "--file-check-frequency",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut kubelet_node = KubeletNode {
            kubelet: None,
            containerd,
            _relay: relay,
            dirs,
            node,
            _underlay: underlay,
            name: name.into(),
            ip,
            root_dir,
            args,
        };
        kubelet_node.start_kubelet()?;
        Ok(kubelet_node)
    }

    pub fn start_kubelet(&mut self) -> Result<()> {
        let log = self.root_dir.join("kubelet.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = self
            .node
            .ns
            .command(&bin("seine-kubelet")?)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting seine-kubelet")?;
        self.kubelet = Some(Process {
            child,
            name: "seine-kubelet".into(),
            log,
        });
        Ok(())
    }

    /// SIGTERM to the kubelet; its exit status.
    pub fn stop_kubelet(&mut self) -> Result<std::process::ExitStatus> {
        let mut process = self.kubelet.take().context("the kubelet is not running")?;
        process.stop()
    }

    /// The static pod manifest directory (`--pod-manifest-path`), made on first use.
    pub fn manifests(&self) -> PathBuf {
        let dir = self.root_dir.join("manifests");
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    pub fn kubelet_log(&self) -> String {
        std::fs::read_to_string(self.root_dir.join("kubelet.log")).unwrap_or_default()
    }

    /// The kubelet's PID, while it runs.
    pub fn kubelet_pid(&self) -> Option<u32> {
        self.kubelet.as_ref().map(Process::pid)
    }

    /// Waits up to `within` for `f` to hold, failing with the kubelet's log.
    pub fn wait(&self, within: Duration, what: &str, f: impl FnMut() -> bool) -> Result<()> {
        crate::wait_until(within, f).with_context(|| {
            format!(
                "{what}; kubelet log:\n{}\ncontainerd log:\n{}",
                tail(&self.kubelet_log(), 60),
                tail(&self.containerd.log_text(), 30)
            )
        })
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        if let Some(mut kubelet) = self.kubelet.take() {
            let _ = kubelet.stop();
        }
        // Containerd (dropped next) removes the sandboxes; then the kubelet's files go.
        let _ = std::fs::remove_dir_all(&self.root_dir);
    }
}
