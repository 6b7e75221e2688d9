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
