//! The one netns harness of Seine's end-to-end tests, lab and benchmark: nodes and pods as network
//! namespaces joined by veth pairs, real agents and workloads as child processes, and client sockets
//! opened inside a pod's namespace from this process.
//!
//! Everything is named with a prefix unique to the run and removed on drop (processes by PID,
//! namespaces, bpffs pins), also when a test fails.

pub mod apiserver;
pub mod apiserver_bench;
pub mod cni;
pub mod cni_bench;
pub mod containerd;
pub mod controllers;
pub mod dns;
pub mod dns_bench;
pub mod echo;
pub mod endpoints_bench;
pub mod etcd;
pub mod images;
pub mod kubelet;
pub mod nft_monitor;
pub mod objects;
pub mod programming_bench;
pub mod proxy;
pub mod scheduler_bench;
pub mod stats;

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use std::{cell::RefCell, collections::BTreeMap};

use anyhow::{bail, Context, Result};
use seine_agent::model::{Frontend, ServiceSpec};

/// The address every pod uses as its gateway: each host-side veth carries it, as in Calico.
pub const GATEWAY: &str = "169.254.1.1";
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// Service VIPs of the tests come from this range.
pub const SERVICE_RANGE: &str = "10.96.0.0/12";

/// A name prefix unique to this process and call.
pub fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    // Interface names are limited to 15 bytes, so keep prefixes short.
    format!("{tag}{}{n}", std::process::id() % 100_000)
}

/// A port free on loopback for both UDP and TCP (best effort: another process may take it before
/// the server binds; servers here report that as a start failure).
pub fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP")
}

/// Runs a command and fails with its output when it fails.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the workspace's binaries are: next to the running test or bench executable.
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the current executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the workspace first (`cargo build --workspace`, as `cargo xtask test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// The frame of the benchmarks on a control plane: a runtime, etcd and seine-apiserver (both
/// stopped after `bench`), and `bench` run on them.
pub fn on_api_server(bench: impl AsyncFnOnce(&apiserver::ApiServer) -> Result<()>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let etcd = etcd::Etcd::start()?;
    let api = apiserver::ApiServer::start(&etcd)?;
    runtime.block_on(bench(&api))
}

/// Writes a benchmark's JSON report to `path` whole (through a temporary file and a rename),
/// creating its directory.
pub fn write_report(path: &Path, report: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(report)?)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Runs `op(worker, i)` for every i in 0..total on `workers` tasks (worker w takes w, w +
/// workers, ...); returns each operation's latency in seconds and the time it all took.
pub async fn in_parallel<F, Fut>(
    workers: usize,
    total: usize,
    op: F,
) -> Result<(Vec<f64>, Duration)>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = std::sync::Arc::new(op);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..workers.max(1) {
        let op = op.clone();
        let step = workers.max(1);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = worker;
            while i < total {
                let began = Instant::now();
                op(worker, i).await?;
                latencies.push(began.elapsed().as_secs_f64());
                i += step;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.context("a worker task failed")??);
    }
    Ok((all, start.elapsed()))
}

/// The entries the kernel itself puts into a fresh bpffs (its preload iterators).
const BPFFS_KERNEL_ENTRIES: [&str; 2] = ["maps.debug", "progs.debug"];
const BPFFS_MARKER: &str = "/run/seine/bpffs-mounted-by-seine";

/// Nodes alive in this process, and whether this process mounted bpffs for them.
static BPFFS_USERS: std::sync::Mutex<(usize, bool)> = std::sync::Mutex::new((0, false));

/// A node's hold on bpffs. The setup step mounts it; a test run that starts without it mounts
/// it here (marked as Seine's, like setup's) and unmounts it again with the last hold, once only
/// the kernel's own entries are left: a `cargo test` leaves the machine as it found it. A lab
/// keeps its nodes, and so the mount.
pub struct BpffsHold(());

impl BpffsHold {
    pub fn take() -> Result<Self> {
        let mut users = BPFFS_USERS.lock().unwrap_or_else(|e| e.into_inner());
        let mounts = std::fs::read_to_string("/proc/mounts")?;
        if !mounts.lines().any(|l| l.contains(" /sys/fs/bpf bpf ")) {
            sh("mount", &["-t", "bpf", "bpf", BPFFS_ROOT])?;
            std::fs::create_dir_all("/run/seine")?;
            std::fs::write(BPFFS_MARKER, "")?;
            users.1 = true;
        }
        users.0 += 1;
        Ok(BpffsHold(()))
    }
}

impl Drop for BpffsHold {
    fn drop(&mut self) {
        let mut users = BPFFS_USERS.lock().unwrap_or_else(|e| e.into_inner());
        users.0 = users.0.saturating_sub(1);
        if users.0 > 0 || !users.1 {
            return;
        }
        let ours = std::fs::read_dir(BPFFS_ROOT).map_or(1, |entries| {
            entries
                .flatten()
                .filter(|e| {
                    !BPFFS_KERNEL_ENTRIES.contains(&e.file_name().to_string_lossy().as_ref())
                })
                .count()
        });
        if ours == 0 && sh("umount", &[BPFFS_ROOT]).is_ok() {
            let _ = std::fs::remove_file(BPFFS_MARKER);
            users.1 = false;
            // The agents' status and lock directories, when the nodes left them empty.
            for dir in ["/run/seine/agents", "/run/seine/locks", "/run/seine"] {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        sh("ip", &["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Runs a command inside the namespace (network only: bpffs stays visible).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let net = format!("--net={}", self.path());
        let mut full = vec![net.as_str(), program];
        full.extend_from_slice(args);
        sh("nsenter", &full)
    }

    /// A `Command` that runs `program` inside the namespace, in a process group of its own (a
    /// terminal's Ctrl-C goes to the caller, which stops its children itself).
    pub fn command(&self, program: &Path) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path()))
            .arg(program)
            .process_group(0);
        cmd
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it opens live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        let handle = std::thread::spawn(move || -> Result<T> {
            enter(&path)?;
            Ok(f())
        });
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(|_| ())
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a namespace fd we own, for this thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns {path}"));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child process, stopped (by PID) on drop.
pub struct Process {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait; SIGKILL if it has not exited after 5 s.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return Ok(self.child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
    }
}

pub struct Pod {
    pub name: String,
    pub ip: Ipv4Addr,
    /// The host-side veth in the node namespace.
    pub host_if: String,
    pub ns: Netns,
    pub workloads: Vec<Process>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let logs: Vec<PathBuf> = self.workloads.iter().map(|w| w.log.clone()).collect();
        self.workloads.clear();
        for log in logs {
            let _ = std::fs::remove_file(log);
        }
    }
}

impl Pod {
    /// Starts seine-echo in the pod: HTTP and UDP answering with the pod's name on `port`, and a
    /// byte-stream echo on `port + 1`.
    pub fn serve(&mut self, port: u16) -> Result<()> {
        let log = std::env::temp_dir().join(format!("{}-echo.log", self.ns.name));
        let child = self
            .ns
            .command(&bin("seine-echo")?)
            .args([
                "--name",
                &self.name,
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--stream-echo",
                &format!("0.0.0.0:{}", port + 1),
            ])
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting seine-echo")?;
        self.workloads.push(Process {
            child,
            name: format!("{}-echo", self.name),
            log,
        });
        // Ready when the port answers.
        let ip = self.ip;
        wait_until(Duration::from_secs(5), || {
            let addr = SocketAddr::from((ip, port));
            self.ns
                .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
                .unwrap_or(false)
        })
        .with_context(|| format!("seine-echo in {} did not start", self.name))
    }

    /// One HTTP request on a new connection; returns the answering pod's name.
    pub fn http_get(&self, addr: SocketAddr) -> Result<String> {
        self.ns.run(move || http_get(addr))?
    }

    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        self.ns.run(f)
    }
}

/// Connects, sends one GET, reads the body (the server's name) and closes.
pub fn http_get(addr: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_string())
        .with_context(|| format!("malformed response from {addr}: {response:?}"))?;
    Ok(body)
}

/// A client pod's requests to `addr` in a loop until stopped, each on a new connection and
/// again on one kept-alive connection: what a client sees while the datapath changes under it.
pub struct RequestLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RequestLoop {
    pub fn start(pod: &Pod, addr: SocketAddr) -> Self {
        use std::sync::{atomic::AtomicBool, atomic::AtomicU64, Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let path = pod.ns.path();
        let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            let record = |e: anyhow::Error| {
                f.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{e:#}"))
            };
            if let Err(e) = enter(&path) {
                return record(e);
            }
            let mut kept = match KeepAlive::connect(addr) {
                Ok(kept) => kept,
                Err(e) => return record(e),
            };
            while !s.load(Ordering::SeqCst) {
                match http_get(addr).and_then(|_| kept.get()) {
                    Ok(_) => {
                        o.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => record(e),
                }
            }
        });
        RequestLoop {
            stop,
            ok,
            failures,
            thread: Some(thread),
        }
    }

    /// Requests that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stops the loop: (requests that succeeded, the failures).
    pub fn stop(mut self) -> (u64, Vec<String>) {
        self.halt();
        let failures =
            std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()));
        (self.ok(), failures)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A kept-alive HTTP connection.
pub struct KeepAlive {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.set_nodelay(true)?;
        Ok(KeepAlive {
            stream,
            buf: Vec::with_capacity(256),
        })
    }

    /// Closes with a reset (zero linger) instead of a FIN: no TIME_WAIT is left behind.
    pub fn reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on the socket we own, with a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// One request/response; returns the body.
    pub fn get(&mut self) -> Result<String> {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
        self.buf.clear();
        let mut chunk = [0u8; 512];
        loop {
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..pos]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("no content-length")?;
                if self.buf.len() >= pos + 4 + len {
                    return Ok(String::from_utf8_lossy(&self.buf[pos + 4..pos + 4 + len])
                        .trim()
                        .to_string());
                }
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A node: a namespace that routes between its pods, with its own bpffs directory and agent.
pub struct Node {
    pub prefix: String,
    pub bpffs_dir: PathBuf,
    pub agent: Option<Process>,
    pub pods: Vec<Pod>,
    pub ns: Netns,
    pub agent_args: Vec<String>,
    /// Run before the agent inside the namespace, e.g. `setpriv` to drop capabilities.
    pub agent_wrapper: Vec<String>,
    /// The Service/EndpointSlice file the agent watches, and what it holds.
    pub services_file: PathBuf,
    /// The agent takes its services from the API server instead of the file.
    pub services_from_api: bool,
    services: RefCell<BTreeMap<Frontend, ServiceSpec>>,
    /// The cgroup (v2) that stands for the node's own processes: the agent's socket programs
    /// hang there, so that nothing else on the machine meets them.
    pub cgroup: Option<PathBuf>,
    /// Last, so that it goes after the node's pins.
    _bpffs: BpffsHold,
}

impl Node {
    pub fn create(tag: &str) -> Result<Self> {
        Self::create_named(&unique_prefix(tag))
    }

    /// A node whose namespaces are named after `prefix` exactly (for the lab).
    pub fn create_named(prefix: &str) -> Result<Self> {
        let bpffs = BpffsHold::take()?;
        let prefix = prefix.to_string();
        let ns = Netns::create(&format!("{prefix}-node"))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
        // A route for the service range, as a node's default route would give: iptables rejects
        // service traffic in FORWARD, which only routed packets reach. Both ends stay in the node.
        ns.ip(&[
            "link",
            "add",
            "svcrange",
            "type",
            "veth",
            "peer",
            "name",
            "svcrange-peer",
        ])?;
        ns.ip(&["link", "set", "svcrange", "up"])?;
        ns.ip(&["link", "set", "svcrange-peer", "up"])?;
        ns.ip(&["route", "add", SERVICE_RANGE, "dev", "svcrange"])?;
        let cgroup =
            seine_agent::sock_lb::cgroup2_mount().map(|root| root.join(format!("seine-{prefix}")));
        if let Some(dir) = &cgroup {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let node = Node {
            bpffs_dir: PathBuf::from(BPFFS_ROOT).join(format!("seine-{prefix}")),
            services_file: std::env::temp_dir().join(format!("{prefix}-services.json")),
            services_from_api: false,
            prefix,
            agent: None,
            pods: Vec::new(),
            ns,
            agent_args: Vec::new(),
            agent_wrapper: Vec::new(),
            services: RefCell::new(BTreeMap::new()),
            cgroup,
            _bpffs: bpffs,
        };
        node.write_services()?;
        Ok(node)
    }

    /// Adds a pod with address `ip`/32, its gateway `GATEWAY`, and a /32 route on the node.
    pub fn add_pod(&mut self, name: &str, ip: Ipv4Addr) -> Result<usize> {
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        let index = self.pods.len();
        let host_if = format!("lxc{}{index}", &self.prefix[..self.prefix.len().min(8)]);
        sh(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "netns",
                &self.ns.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ],
        )?;
        let cidr = format!("{ip}/32");
        ns.ip(&["addr", "add", &cidr, "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
        ns.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
        self.ns.ip(&["link", "set", &host_if, "up"])?;
        self.ns
            .ip(&["addr", "add", &format!("{GATEWAY}/32"), "dev", &host_if])?;
        self.ns.ip(&["route", "add", &cidr, "dev", &host_if])?;
        self.pods.push(Pod {
            name: name.to_string(),
            ip,
            host_if,
            ns,
            workloads: Vec::new(),
        });
        Ok(index)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Everything this node consists of, for a caller that keeps it running after exit.
    pub fn inventory(&self) -> (Vec<u32>, Vec<String>) {
        let mut pids: Vec<u32> = self.agent.iter().map(Process::pid).collect();
        let mut namespaces = vec![self.ns.name.clone()];
        for pod in &self.pods {
            pids.extend(pod.workloads.iter().map(Process::pid));
            namespaces.push(pod.ns.name.clone());
        }
        (pids, namespaces)
    }

    /// The files this node's processes write: their logs and the node's services file.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.agent.iter().map(|a| a.log.clone()).collect();
        for pod in &self.pods {
            files.extend(pod.workloads.iter().map(|w| w.log.clone()));
        }
        files.push(self.services_file.clone());
        files
    }

    /// `seine-agent --cleanup` for this node, run in its namespace.
    pub fn cleanup_agent(&self) -> Result<String> {
        let agent = bin("seine-agent")?;
        let dir = self.bpffs_dir.display().to_string();
        self.ns.exec(
            &agent.display().to_string(),
            &[
                "--cleanup",
                "--bpffs-dir",
                &dir,
                "--attach-prefix",
                &self.attach_prefix(),
            ],
        )
    }

    /// One of the eBPF datapath's counters (`seinectl bpf stats`), by name.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let stats = self.seinectl_json(&["bpf", "stats"])?;
        stats
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == name))
            .and_then(|r| r["value"].as_u64())
            .with_context(|| format!("no counter {name} in {stats}"))
    }

    pub fn attach_prefix(&self) -> String {
        format!("lxc{}", &self.prefix[..self.prefix.len().min(8)])
    }

    /// Starts seine-agent in the node namespace and waits until it is ready and attached to every
    /// pod's veth.
    pub fn start_agent(&mut self, extra: &[&str]) -> Result<()> {
        self.agent_args = extra.iter().map(|s| s.to_string()).collect();
        self.spawn_agent()
    }

    pub fn spawn_agent(&mut self) -> Result<()> {
        let log = std::env::temp_dir().join(format!("{}-agent.log", self.prefix));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = match self.agent_wrapper.split_first() {
            None => self.ns.command(&bin("seine-agent")?),
            Some((program, args)) => {
                let mut c = self.ns.command(Path::new(program));
                c.args(args).arg(bin("seine-agent")?);
                c
            }
        };
        if !self.services_from_api && !self.agent_args.iter().any(|a| a == "--services-file") {
            command.arg("--services-file").arg(&self.services_file);
        }
        if let Some(cgroup) = &self.cgroup {
            command.arg("--cgroup-root").arg(cgroup);
        }
        let child = command
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .args(["--attach-prefix", &self.attach_prefix()])
            .args(["--health-addr", "127.0.0.1:9962"])
            .args(&self.agent_args)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting seine-agent")?;
        let mut process = Process {
            child,
            name: "seine-agent".into(),
            log,
        };
        let ns_path = self.ns.path();
        // Generous: an agent programming 10,000 services through iptables takes a while.
        let ready = wait_until(Duration::from_secs(120), || {
            if let Ok(Some(_)) = process.child.try_wait() {
                return true;
            }
            let path = ns_path.clone();
            std::thread::spawn(move || -> bool {
                enter(&path).is_ok() && http_status("127.0.0.1:9962", "/readyz") == Some(200)
            })
            .join()
            .unwrap_or(false)
        });
        if let Ok(Some(status)) = process.child.try_wait() {
            bail!("seine-agent exited with {status}:\n{}", process.log_text());
        }
        ready.with_context(|| format!("seine-agent not ready:\n{}", process.log_text()))?;
        self.agent = Some(process);
        Ok(())
    }

    pub fn stop_agent(&mut self) -> Result<()> {
        if let Some(mut agent) = self.agent.take() {
            agent.stop()?;
        }
        Ok(())
    }

    /// Runs `program args` as one of the node's own processes (host network): in the node's
    /// namespace and its cgroup. Returns stdout; fails with stderr when the program does.
    pub fn host_exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let cgroup = self
            .cgroup
            .as_ref()
            .context("no cgroup v2 hierarchy is mounted")?;
        let script = r#"cg=$1 ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="$ns" "$@""#;
        let out = Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(cgroup)
            .arg(self.ns.path())
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs seinectl against this node's maps; returns the whole output, failing or not.
    pub fn seinectl(&self, args: &[&str]) -> Result<Output> {
        Command::new(bin("seinectl")?)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .args(args)
            .output()
            .context("running seinectl")
    }

    /// Runs seinectl and fails unless it succeeds; returns stdout.
    pub fn seinectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.seinectl(args)?;
        if !out.status.success() {
            bail!(
                "seinectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `seinectl bpf ... -o json`, parsed.
    pub fn seinectl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut full = args.to_vec();
        full.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.seinectl_ok(&full)?)?)
    }

    /// The agent's Prometheus metrics text.
    pub fn metrics(&self) -> Result<String> {
        let path = self.ns.path();
        std::thread::spawn(move || -> Result<String> {
            enter(&path)?;
            http_body("127.0.0.1:9962", "/metrics").context("scraping /metrics")
        })
        .join()
        .map_err(|_| anyhow::anyhow!("metrics thread panicked"))?
    }
}

impl Node {
    /// Sets one service in the agent's services file and waits until the agent applied it.
    pub fn set_service(&self, spec: ServiceSpec) -> Result<()> {
        self.services.borrow_mut().insert(spec.frontend, spec);
        self.sync_services()
    }

    /// Replaces every service in the agent's file at once and waits until the agent applied them.
    pub fn replace_services(&self, specs: Vec<ServiceSpec>) -> Result<()> {
        *self.services.borrow_mut() = specs.into_iter().map(|s| (s.frontend, s)).collect();
        self.sync_services()
    }

    pub fn remove_service(&self, frontend: &Frontend) -> Result<()> {
        self.services.borrow_mut().remove(frontend);
        self.sync_services()
    }

    fn sync_services(&self) -> Result<()> {
        let before = self.syncs()?;
        self.write_services()?;
        wait_until(Duration::from_secs(120), || {
            self.syncs().is_ok_and(|n| n > before)
        })
        .context("the agent did not apply the services file")?;
        let log = self
            .agent
            .as_ref()
            .map(Process::log_text)
            .unwrap_or_default();
        if self.syncs_with("error")? > 0 {
            bail!("the agent failed to apply the services:\n{log}");
        }
        Ok(())
    }

    /// All reconciliations the agent has finished, whatever their result.
    fn syncs(&self) -> Result<u64> {
        Ok(
            self.syncs_with("ok")?
                + self.syncs_with("error")?
                + self.syncs_with("invalid_input")?,
        )
    }

    fn syncs_with(&self, result: &str) -> Result<u64> {
        let metrics = self.metrics()?;
        let prefix = format!("seine_sync_total{{result=\"{result}\"}} ");
        Ok(metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0))
    }

    /// Writes the services as Kubernetes objects, atomically (the agent never reads half a file).
    fn write_services(&self) -> Result<()> {
        let items = objects::services_to_objects(self.services.borrow().values());
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let tmp = self.services_file.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&list)?)?;
        std::fs::rename(&tmp, &self.services_file)?;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agent.take();
        // Failing tests put the logs into their messages; nothing needs the files afterwards.
        // Pods remove their workloads' logs as they go.
        self.pods.clear();
        let _ =
            std::fs::remove_file(std::env::temp_dir().join(format!("{}-agent.log", self.prefix)));
        let _ = std::fs::remove_dir_all(&self.bpffs_dir);
        let _ = std::fs::remove_file(&self.services_file);
        seine_agent::bpf::remove_node_files(&self.bpffs_dir);
        // Empty once the processes run in it have exited.
        if let Some(cgroup) = &self.cgroup {
            let _ = std::fs::remove_dir(cgroup);
        }
    }
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    let response = http_raw(addr, path)?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn http_body(addr: &str, path: &str) -> Option<String> {
    let response = http_raw(addr, path)?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn http_raw(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

pub fn vip(s: &str) -> SocketAddr {
    s.parse().expect("a socket address")
}

/// Opens `n` new connections from the client pod and counts answers per backend.
pub fn spread(node: &Node, addr: SocketAddr, n: usize) -> BTreeMap<String, u64> {
    node.pod("client")
        .run(move || {
            let mut counts = BTreeMap::new();
            for _ in 0..n {
                let name = http_get(addr).expect("a request through the service");
                *counts.entry(name).or_insert(0) += 1;
            }
            counts
        })
        .expect("client thread")
}

/// The usual test topology: one node, a client pod and `backends` pods serving on `port`.
pub fn topology(tag: &str, backends: usize, port: u16) -> Result<Node> {
    let mut node = Node::create(tag)?;
    node.add_pod("client", Ipv4Addr::new(10, 244, 0, 2))?;
    for i in 0..backends {
        let name = format!("backend-{}", i + 1);
        node.add_pod(&name, Ipv4Addr::new(10, 244, 0, 11 + i as u8))?;
        node.pod_mut(&name).serve(port)?;
    }
    Ok(node)
}
