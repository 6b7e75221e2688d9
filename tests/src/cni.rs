//! The CNI side of the harness: an underlay joining node namespaces, a relay that lets agents in
//! node namespaces reach the API server on the host's loopback, and running the `seine-cni`
//! binary (and the reference plugins) inside a node namespace, as a runtime on that node would.

use std::{
    io::Write as _,
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{apiserver::ApiServer, bin, etcd::Etcd, Netns, Node, Pod};

/// Where Debian's containernetworking-plugins live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A shared L2 segment (a bridge in a namespace of its own) that node uplinks plug into.
pub struct Underlay {
    pub ns: Netns,
    ports: u32,
}

impl Underlay {
    pub fn create(prefix: &str) -> Result<Self> {
        let ns = Netns::create(&format!("{prefix}-ul"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Underlay { ns, ports: 0 })
    }

    /// Gives `node` an uplink `uplink` with `ip`/24 on this segment, MTU `mtu`.
    pub fn connect(&mut self, node: &Netns, ip: Ipv4Addr, mtu: u32) -> Result<()> {
        self.ports += 1;
        let port = format!("p{}", self.ports);
        let mtu = mtu.to_string();
        crate::sh(
            "ip",
            &[
                "link",
                "add",
                "uplink",
                "netns",
                &node.name,
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                &port,
                "netns",
                &self.ns.name,
                "mtu",
                &mtu,
            ],
        )?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        node.ip(&["addr", "add", &format!("{ip}/24"), "dev", "uplink"])?;
        node.ip(&["link", "set", "uplink", "up"])?;
        Ok(())
    }
}

/// Forwards TCP connections made to 127.0.0.1:`port` inside a namespace to 127.0.0.1:`port` of
/// the test's own namespace (the API server): agents in node namespaces use the admin
/// kubeconfig unchanged.
pub struct Relay {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(ns: &Netns, port: u16) -> Result<Self> {
        // The listening socket is made inside the namespace; connections out are made here.
        let listener = ns.run(move || TcpListener::bind(("127.0.0.1", port)))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let accept = std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((inbound, _)) => {
                        let _ = inbound.set_nonblocking(false);
                        if let Ok(outbound) = TcpStream::connect(("127.0.0.1", port)) {
                            pipe(inbound, outbound);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Relay {
            stop,
            accept: Some(accept),
        })
    }
}

/// Copies both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    for (mut from, mut to) in [(a, b2), (b, a2)] {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// What a plugin printed, whether it exited 0, and how long the call took.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub success: bool,
    pub json: Value,
    pub raw: String,
    /// From spawning the plugin to its exit.
    pub seconds: f64,
}

impl PluginOutput {
    pub fn ok(self) -> Result<Value> {
        if !self.success {
            bail!("the plugin failed: {}", self.raw);
        }
        Ok(self.json)
    }

    /// The error code of a failed call.
    pub fn code(&self) -> Option<u64> {
        self.json.get("code").and_then(Value::as_u64)
    }
}

/// One CNI call as a runtime on that node makes it: `plugin` forked from a thread inside `node`
/// (no `nsenter` in between), with `env` (CNI_PATH added) and `config` on stdin.
pub fn invoke(
    node: &Netns,
    plugin: &Path,
    env: &[(&str, &str)],
    config: &Value,
) -> Result<PluginOutput> {
    let plugin = plugin.to_path_buf();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let input = serde_json::to_vec(config)?;
    node.run(move || -> Result<PluginOutput> {
        let start = std::time::Instant::now();
        let mut child = Command::new(&plugin)
            .env("CNI_PATH", REFERENCE_PLUGINS)
            .envs(env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", plugin.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&input)?;
        }
        let out = child.wait_with_output()?;
        let seconds = start.elapsed().as_secs_f64();
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = if raw.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&raw)
                .with_context(|| format!("{} printed no JSON: {raw:?}", plugin.display()))?
        };
        Ok(PluginOutput {
            success: out.status.success(),
            json,
            raw: format!("{raw}{}", String::from_utf8_lossy(&out.stderr)),
            seconds,
        })
    })?
}

/// The addresses allocated in a plugin's store under `data_dir` (network `seine`), from its files.
pub fn allocated(data_dir: &Path) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = std::fs::read_dir(data_dir.join("seine"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The host-side veths seine-cni made in `node` (`lxc` and 11 hex digits).
pub fn seine_veths(node: &Netns) -> Result<Vec<String>> {
    Ok(node
        .ip(&["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("lxc") && n.len() == 14)
        .collect())
}

/// The CNI versions this harness speaks as a runtime: up to 1.1.0, as libcni 1.2 and later.
const RUNTIME_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];

/// The version a CNI 1.1 runtime uses for every plugin of a conflist: the highest of its
/// `cniVersions` that the runtime speaks, else its `cniVersion`.
pub fn runtime_version(conflist: &Value) -> Value {
    conflist["cniVersions"]
        .as_array()
        .and_then(|offered| {
            RUNTIME_VERSIONS
                .iter()
                .rev()
                .find(|v| offered.iter().any(|o| o == *v))
        })
        .map_or_else(|| conflist["cniVersion"].clone(), |v| Value::from(*v))
}

/// The configuration a runtime hands plugin `index` of a conflist: the plugin's object with the
/// list's name, the version the runtime picked, and the previous plugin's result.
pub fn plugin_config(conflist: &Value, index: usize, prev_result: Option<&Value>) -> Value {
    let mut config = conflist["plugins"][index].clone();
    config["name"] = conflist["name"].clone();
    config["cniVersion"] = runtime_version(conflist);
    if let Some(prev) = prev_result {
        config["prevResult"] = prev.clone();
    }
    config
}

/// A standalone conflist (no agent): Seine's plugin with a pod CIDR, keeping its allocations in
/// `data_dir`, then portmap.
pub fn standalone_conflist(pod_cidr: &str, data_dir: &Path, bpffs_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "seine",
        "plugins": [
            {"type": "seine-cni", "podCIDR": pod_cidr, "dataDir": data_dir, "bpffsDir": bpffs_dir},
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    })
}

/// A node without an agent on an underlay of its own: an uplink of MTU `mtu` at `ip`/24 with the
/// default route (through a next hop that need not answer), as a node's uplink would have.
pub fn standalone_node(tag: &str, ip: Ipv4Addr, mtu: u32) -> Result<(Node, Underlay)> {
    let node = Node::create(tag)?;
    let mut underlay = Underlay::create(&node.prefix)?;
    underlay.connect(&node.ns, ip, mtu)?;
    let [a, b, c, _] = ip.octets();
    let gateway = Ipv4Addr::new(a, b, c, 254).to_string();
    node.ns
        .ip(&["route", "add", "default", "via", &gateway, "dev", "uplink"])?;
    Ok((node, underlay))
}

/// A node's CNI files in a directory of their own (removed on drop).
pub struct CniDirs {
    pub root: PathBuf,
}

impl CniDirs {
    pub fn create(prefix: &str) -> Result<Self> {
        let root = std::env::temp_dir().join(format!("{prefix}-cni"));
        for sub in ["bin", "conf", "data"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        Ok(CniDirs { root })
    }
    pub fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }
    pub fn conf(&self) -> PathBuf {
        self.root.join("conf")
    }
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    /// The conflist the agent installed.
    pub fn conflist(&self) -> Result<Value> {
        let path = self.conf().join("10-seine.conflist");
        Ok(serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?)
    }
}

impl Drop for CniDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

impl Node {
    /// Runs `seine-cni` in this node for (container, ifname) with the pod namespace `netns`.
    pub fn cni(
        &self,
        command: &str,
        container: &str,
        netns: Option<&str>,
        ifname: &str,
        config: &Value,
    ) -> Result<PluginOutput> {
        let mut env = vec![
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_IFNAME", ifname),
        ];
        if let Some(netns) = netns {
            env.push(("CNI_NETNS", netns));
        }
        invoke(&self.ns, &bin("seine-cni")?, &env, config)
    }

    /// Creates a pod namespace and adds it to the network with `config` (as a runtime does for a
    /// sandbox); the pod joins `self.pods`, named `name`, with the address the plugin gave it.
    pub fn add_cni_pod(&mut self, name: &str, config: &Value) -> Result<Value> {
        self.add_cni_pod_using(&bin("seine-cni")?, name, config)
    }

    /// `add_cni_pod` with the plugin binary at `plugin` (the one the agent installed).
    pub fn add_cni_pod_using(
        &mut self,
        plugin: &Path,
        name: &str,
        config: &Value,
    ) -> Result<Value> {
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let env = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", ns.name.as_str()),
            ("CNI_IFNAME", "eth0"),
        ];
        let netns = ns.path();
        let mut env = env.to_vec();
        env.push(("CNI_NETNS", netns.as_str()));
        let result = invoke(&self.ns, plugin, &env, config)?.ok()?;
        let ip: Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("no address in {result}"))?;
        let host_if = result["interfaces"][0]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.pods.push(Pod {
            name: name.to_string(),
            ip,
            host_if,
            ns,
            workloads: Vec::new(),
        });
        Ok(result)
    }
}

/// Runs a reference plugin (`portmap`, `bandwidth`, ...) from `/usr/lib/cni` in `node`.
pub fn reference_plugin(
    node: &Netns,
    plugin: &str,
    command: &str,
    container: &str,
    netns: &str,
    config: &Value,
) -> Result<PluginOutput> {
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", netns),
    ];
    invoke(
        node,
        &Path::new(REFERENCE_PLUGINS).join(plugin),
        &env,
        config,
    )
}

/// `ping` with the DF bit set and `size` bytes of payload from inside `ns`: Ok when answered,
/// else what ping said.
pub fn ping_df(ns: &Netns, to: Ipv4Addr, size: usize) -> std::result::Result<(), String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .args([
            "ping",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size.to_string(),
        ])
        .arg(to.to_string())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One UDP datagram to `to` from inside `ns`; the answer as text.
pub fn udp_ask(ns: &Netns, to: std::net::SocketAddr) -> Result<String> {
    ns.run(move || -> Result<String> {
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        sock.connect(to)?;
        sock.send(b"ping")?;
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    })?
}

/// Sends `bytes` through a byte-stream echo at `to` from inside `ns` and returns what came back.
pub fn echo_bytes(ns: &Netns, to: std::net::SocketAddr, bytes: Vec<u8>) -> Result<Vec<u8>> {
    ns.run(move || -> Result<Vec<u8>> {
        use std::io::Read as _;
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut writer = stream.try_clone()?;
        let len = bytes.len();
        let sender = std::thread::spawn(move || -> std::io::Result<()> {
            writer.write_all(&bytes)?;
            writer.shutdown(std::net::Shutdown::Write)
        });
        let mut back = Vec::with_capacity(len);
        (&stream).take(len as u64).read_to_end(&mut back)?;
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(back)
    })?
}

/// A containerd of its own (root, state and socket in a temporary directory), started inside a
/// node namespace; containers it runs are removed and it is stopped (by PID) on drop.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    process: Option<crate::Process>,
    containers: std::cell::RefCell<Vec<String>>,
}

pub const CONTAINERD_NAMESPACE: &str = "seine-test";

impl Containerd {
    pub fn start(node: &Netns, prefix: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("{prefix}-containerd"));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
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
        Ok(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", CONTAINERD_NAMESPACE])
            .args(args)
            .output()?)
    }

    /// Imports a busybox image built here from the machine's static busybox (no registry is
    /// reachable); returns its reference.
    pub fn import_busybox(&self) -> Result<String> {
        let reference = "docker.io/library/busybox:seine-test".to_string();
        let archive = build_busybox_image(&self.dir.join("image"), &reference)?;
        let out = self.ctr(&["images", "import", &archive.display().to_string()])?;
        if !out.status.success() {
            bail!(
                "ctr images import: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
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

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.containers.borrow().iter() {
            let _ = self.ctr(&["tasks", "kill", "--signal", "SIGKILL", id]);
            let _ = self.ctr(&["tasks", "delete", "--force", id]);
            let _ = self.ctr(&["containers", "delete", id]);
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

/// An OCI image archive of one layer holding the machine's static busybox and a few applets.
fn build_busybox_image(dir: &Path, reference: &str) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let blobs = dir.join("oci/blobs/sha256");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::create_dir_all(&blobs)?;
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("copying /bin/busybox (package busybox-static)")?;
    for applet in ["sh", "ip", "wget", "cat", "sleep", "nc", "ping"] {
        let link = rootfs.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    let layer = dir.join("layer.tar");
    crate::sh(
        "tar",
        &[
            "-C",
            &rootfs.display().to_string(),
            "--owner=0",
            "--group=0",
            "-cf",
            &layer.display().to_string(),
            ".",
        ],
    )?;
    let blob = |path: &Path| -> Result<(String, u64)> {
        let digest = crate::sh("sha256sum", &[&path.display().to_string()])?;
        let digest = digest
            .split_whitespace()
            .next()
            .context("sha256sum")?
            .to_string();
        std::fs::copy(path, blobs.join(&digest))?;
        Ok((format!("sha256:{digest}"), std::fs::metadata(path)?.len()))
    };
    let (layer_digest, layer_size) = blob(&layer)?;
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }))?,
    )?;
    let (config_digest, config_size) = blob(&config)?;
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config_size},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest, "size": layer_size}],
        }))?,
    )?;
    let (manifest_digest, manifest_size) = blob(&manifest)?;
    std::fs::write(
        dir.join("oci/oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    std::fs::write(
        dir.join("oci/index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": manifest_digest, "size": manifest_size,
                           "annotations": {"io.containerd.image.name": reference,
                                           "org.opencontainers.image.ref.name": "seine-test"}}],
        }))?,
    )?;
    let archive = dir.join("busybox.tar");
    crate::sh(
        "tar",
        &[
            "-C",
            &dir.join("oci").display().to_string(),
            "-cf",
            &archive.display().to_string(),
            ".",
        ],
    )?;
    Ok(archive)
}

/// A node of a `Cluster`: its agent runs the overlay and installed the plugin in `dirs`.
pub struct ClusterNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub node: Node,
    pub dirs: CniDirs,
    _relay: Relay,
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        // The agent goes before its relay and its files.
        self.node.agent.take();
    }
}

/// Nodes on one underlay, each with a seine-agent running the pod network from a real API
/// server (on etcd): Node `node-i` has pod CIDR 10.244.i.0/24 and underlay address 192.168.60.i.
pub struct Cluster {
    pub nodes: Vec<ClusterNode>,
    _underlay: Underlay,
    pub api: ApiServer,
    _etcd: Etcd,
}

pub fn cluster(tag: &str, count: u8) -> Result<Cluster> {
    let etcd = Etcd::start()?;
    let api = ApiServer::start(&etcd)?;
    let first = Node::create(tag)?;
    let mut underlay = Underlay::create(&first.prefix)?;
    let mut nodes = Vec::new();
    let mut first = Some(first);
    for i in 1..=count {
        let mut node = match first.take() {
            Some(node) => node,
            None => Node::create(tag)?,
        };
        let name = format!("node-{i}");
        let ip = Ipv4Addr::new(192, 168, 60, i);
        underlay.connect(&node.ns, ip, 1500)?;
        let (code, body) = api.post(
            "/api/v1/nodes",
            &json!({"metadata": {"name": name}, "spec": {"podCIDR": format!("10.244.{i}.0/24")}}),
        )?;
        if code != 201 {
            bail!("creating Node {name}: {code} {body}");
        }
        let relay = Relay::start(&node.ns, api.addr.port())?;
        let dirs = CniDirs::create(&node.prefix)?;
        let kubeconfig = api.kubeconfig.display().to_string();
        let plugin = bin("seine-cni")?.display().to_string();
        let (bin_dir, conf_dir, data_dir) = (
            dirs.bin().display().to_string(),
            dirs.conf().display().to_string(),
            dirs.data().display().to_string(),
        );
        node.start_agent(&[
            "--node-name",
            &name,
            "--kubeconfig",
            &kubeconfig,
            "--vtep-address",
            &ip.to_string(),
            "--cni-bin-dir",
            &bin_dir,
            "--cni-conf-dir",
            &conf_dir,
            "--cni-data-dir",
            &data_dir,
            "--cni-plugin",
            &plugin,
            "--overlay-resync-seconds",
            "2",
        ])?;
        nodes.push(ClusterNode {
            name,
            ip,
            node,
            dirs,
            _relay: relay,
        });
    }
    Ok(Cluster {
        nodes,
        _underlay: underlay,
        api,
        _etcd: etcd,
    })
}

impl Cluster {
    /// Adds pods through each node's installed plugin and conflist; each serves HTTP and UDP on
    /// 8080 and a byte-stream echo on 8081.
    pub fn add_pods(&mut self, per_node: usize) -> Result<()> {
        for n in &mut self.nodes {
            let conflist = n.dirs.conflist()?;
            let config = plugin_config(&conflist, 0, None);
            let plugin = n.dirs.bin().join("seine-cni");
            for p in 0..per_node {
                let pod = format!("{}-p{p}", n.name);
                n.node.add_cni_pod_using(&plugin, &pod, &config)?;
                n.node.pod_mut(&pod).serve(8080)?;
            }
        }
        Ok(())
    }

    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }
}
