//! Containerd for the tests: one of its own per node (root, state and socket in a temporary
//! directory), started inside the node's namespace, either plain (for `ctr run --cni`) or with
//! its CRI plugin on (for seine-kubelet), with images built here imported into it.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{images, Netns};

/// A containerd of its own (root, state and socket in a temporary directory), started inside a
/// node namespace; containers it runs are removed and it is stopped (by PID) on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    process: Option<crate::Process>,
    containers: std::cell::RefCell<Vec<String>>,
    cri: bool,
}

pub const CONTAINERD_NAMESPACE: &str = "seine-test";
/// The namespace the CRI plugin keeps its images and containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The sandbox image the CRI plugin is configured with.
pub const PAUSE_IMAGE: &str = "seine.local/pause:test";
/// The busybox image imported for pods.
pub const BUSYBOX_IMAGE: &str = "seine.local/busybox:test";

impl Containerd {
    /// Containerd without its CRI plugin, for `ctr`.
    pub fn start(node: &Netns, prefix: &str) -> Result<Self> {
        Self::launch(
            node,
            prefix,
            false,
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
    }

    /// Containerd with its CRI plugin, calling the CNI plugins in `cni_bin_dir` from the
    /// configuration in `cni_conf_dir`, with the pause and busybox images imported.
    pub fn start_cri(
        node: &Netns,
        prefix: &str,
        cni_bin_dir: &Path,
        cni_conf_dir: &Path,
    ) -> Result<Self> {
        // restrict_oom_score_adj: sandboxes ask for -998, which needs CAP_SYS_RESOURCE, and a
        // root without it (a container, as CI's) fails every sandbox in runc's nsexec.
        let cri = format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
             \x20 sandbox_image = \"{PAUSE_IMAGE}\"\n\
             \x20 stream_server_address = \"127.0.0.1\"\n\
             \x20 stream_server_port = \"0\"\n\
             \x20 restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             \x20 bin_dir = \"{bin}\"\n\
             \x20 conf_dir = \"{conf}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             \x20 snapshotter = \"overlayfs\"\n\
             \x20 default_runtime_name = \"runc\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
             \x20 runtime_type = \"io.containerd.runc.v2\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n\
             \x20 SystemdCgroup = false\n",
            bin = cni_bin_dir.display(),
            conf = cni_conf_dir.display(),
        );
        let containerd = Self::launch(node, prefix, true, &cri)?;
        containerd.import(CRI_NAMESPACE, &images::pause(PAUSE_IMAGE)?)?;
        containerd.import(CRI_NAMESPACE, &images::busybox(BUSYBOX_IMAGE))?;
        Ok(containerd)
    }

    /// What containerd logged.
    pub fn log_text(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    /// The CRI endpoint, as a kubelet's `--container-runtime-endpoint`.
    pub fn cri_endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn launch(node: &Netns, prefix: &str, cri: bool, plugins: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-containerd"));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n{plugins}\
                 [grpc]\n  address = \"{socket}\"\n",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                socket = socket.display(),
            ),
        )?;
        let log = dir.join("containerd.log");
        let child = node
            .command(Path::new("containerd"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting containerd")?;
        let containerd = Containerd {
            process: Some(crate::Process {
                child,
                name: "containerd".into(),
                log,
            }),
            dir,
            socket,
            containers: Default::default(),
            cri,
        };
        crate::wait_until(Duration::from_secs(20), || {
            containerd
                .ctr(&["version"])
                .is_ok_and(|o| o.status.success())
        })
        .with_context(|| {
            format!(
                "containerd did not come up:\n{}",
                containerd
                    .process
                    .as_ref()
                    .map(|p| p.log_text())
                    .unwrap_or_default()
            )
        })?;
        Ok(containerd)
    }

    /// `ctr` against this containerd, in its namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<std::process::Output> {
        self.ctr_in(CONTAINERD_NAMESPACE, args)
    }

    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<std::process::Output> {
        Ok(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .output()?)
    }

    /// Builds the image and imports it into `namespace`.
    pub fn import(&self, namespace: &str, spec: &images::ImageSpec) -> Result<()> {
        let name: String = spec
            .reference
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let archive = images::build(&self.dir.join("images").join(name), spec)?;
        let out = self.ctr_in(
            namespace,
            &["images", "import", &archive.display().to_string()],
        )?;
        if !out.status.success() {
            bail!(
                "ctr images import {}: {}",
                spec.reference,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Imports a busybox image built here from the machine's static busybox (no registry is
    /// reachable); returns its reference.
    pub fn import_busybox(&self) -> Result<String> {
        let reference = "docker.io/library/busybox:seine-test".to_string();
        self.import(CONTAINERD_NAMESPACE, &images::busybox(&reference))?;
        Ok(reference)
    }

    /// `ctr run --cni --rm` of `command` in a new container, run inside `node` with a private
    /// mount namespace in which `/etc/cni/net.d` holds `conflist` and `/opt/cni/bin` holds
    /// `plugins` (overlays on the machine's /etc and /opt: nothing of theirs changes).
    pub fn run_with_cni(
        &self,
        node: &Netns,
        conflist: &Value,
        plugins: &[&Path],
        image: &str,
        id: &str,
        command: &str,
    ) -> Result<std::process::Output> {
        let overlay = self.dir.join(format!("overlay-{id}"));
        let net_d = overlay.join("etc-up/cni/net.d");
        let bin_d = overlay.join("opt-up/cni/bin");
        for d in [
            &net_d,
            &bin_d,
            &overlay.join("etc-work"),
            &overlay.join("opt-work"),
        ] {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(
            net_d.join("10-seine.conflist"),
            serde_json::to_vec(conflist)?,
        )?;
        for plugin in plugins {
            let name = plugin.file_name().context("plugin without a name")?;
            std::fs::copy(plugin, bin_d.join(name))?;
        }
        self.containers.borrow_mut().push(id.to_string());
        let o = overlay.display();
        let script = format!(
            "mount -t overlay overlay -o lowerdir=/etc,upperdir={o}/etc-up,workdir={o}/etc-work /etc && \
             mount -t overlay overlay -o lowerdir=/opt,upperdir={o}/opt-up,workdir={o}/opt-work /opt && \
             exec nsenter --net={ns} timeout 60 ctr --address {sock} --namespace {space} run --cni --rm {image} {id} sh -c '{command}'",
            ns = node.path(),
            sock = self.socket.display(),
            space = CONTAINERD_NAMESPACE,
        );
        Ok(Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .output()?)
    }
}

impl Containerd {
    /// Stops and removes every pod sandbox through the CRI, so that the runtime calls CNI DEL
    /// and removes the sandboxes' network namespaces (a kubelet that stopped leaves them).
    fn remove_pod_sandboxes(&self) {
        let endpoint = self.cri_endpoint();
        // A runtime of its own on a thread: the drop may run inside a test's runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let Ok(runtime) = seine_kubelet::cri::Runtime::connect(&endpoint) else {
                    return;
                };
                let Ok(sandboxes) = runtime.sandboxes(Default::default()).await else {
                    return;
                };
                for sandbox in sandboxes {
                    if let Ok(containers) = runtime.containers(&sandbox.id).await {
                        for c in containers {
                            let _ = runtime.stop_container(&c.id, Duration::ZERO).await;
                            let _ = runtime.remove_container(&c.id).await;
                        }
                    }
                    let _ = runtime.stop_sandbox(&sandbox.id).await;
                    let _ = runtime.remove_sandbox(&sandbox.id).await;
                }
            })
        });
        let _ = cleanup.join();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.containers.borrow().iter() {
            let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", id]);
            let _ = self.ctr(&["tasks", "delete", "--force", id]);
            let _ = self.ctr(&["containers", "delete", id]);
        }
        if self.cri {
            self.remove_pod_sandboxes();
        }
        self.process.take();
        // Snapshots may still be mounted if a container was left running: unmount what is ours.
        if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
            let root = self.dir.display().to_string();
            for target in mounts.lines().filter_map(|l| l.split(' ').nth(1)) {
                if target.starts_with(&root) {
                    let _ = Command::new("umount").arg("-l").arg(target).status();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
