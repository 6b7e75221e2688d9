//! seine-lab: the demo topology of `cargo xtask lab up|down|status`. The control plane so far
//! (etcd and seine-apiserver on 127.0.0.1 with an admin kubeconfig); two node namespaces on a
//! shared underlay, each running seine-agent, which sets up the VXLAN overlay from the Nodes in the
//! API server and installs seine-cni; a client pod and three backend pods on both nodes, added
//! through the installed plugin; and one ClusterIP Service with its EndpointSlice in the API
//! server, which the agents program (no kubelet runs the pods yet, so the slice is the lab's).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use seine_tests::{
    apiserver::ApiServer,
    cni::{plugin_config, Underlay},
    controllers::Daemon,
    dns::{DnsPorts, SeineDns},
    etcd::Etcd,
    sh, Node,
};
use serde_json::json;

const PREFIX: &str = "seinelab";
const STATE_DIR: &str = "/run/seine-lab";
const VIP: &str = "10.96.0.10";
const PORT: u16 = 8080;

fn main() -> ExitCode {
    let verb = std::env::args().nth(1).unwrap_or_default();
    let result = match verb.as_str() {
        "up" => up(),
        "down" => down(true),
        "status" => status(),
        _ => {
            eprintln!("usage: seine-lab up|down|status");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seine-lab: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn state_file() -> PathBuf {
    Path::new(STATE_DIR).join("state.json")
}

/// The lab's Service: no selector, since no Pod of the lab is in the API yet.
fn web_service() -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"clusterIP": VIP,
                    "ports": [{"name": "http", "port": 80, "targetPort": PORT, "protocol": "TCP"}]}})
}

/// The Service's EndpointSlice, managed by the lab (the EndpointSlice controller leaves it be).
fn web_slice(backends: &[(Ipv4Addr, &str)]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = backends
        .iter()
        .map(|(ip, node)| {
            json!({"addresses": [ip.to_string()], "nodeName": node,
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "web-lab", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "web",
                                   "endpointslice.kubernetes.io/managed-by": "seine-lab"}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": PORT, "protocol": "TCP"}],
           "endpoints": endpoints})
}

/// A lab node: name, namespace prefix, underlay address, pod CIDR and pods.
type LabNode = (
    &'static str,
    &'static str,
    [u8; 4],
    &'static str,
    &'static [&'static str],
);

const NODES: [LabNode; 2] = [
    (
        "node-1",
        "seinelab1",
        [192, 168, 60, 1],
        "10.244.1.0/24",
        &["client", "backend-1"],
    ),
    (
        "node-2",
        "seinelab2",
        [192, 168, 60, 2],
        "10.244.2.0/24",
        &["backend-2", "backend-3"],
    ),
];

fn up() -> Result<()> {
    if state_file().exists() {
        println!("lab: an earlier lab is up; removing it first");
        down(false)?;
    }
    std::fs::create_dir_all(STATE_DIR)?;
    let state_dir = Path::new(STATE_DIR);
    let mut pids: Vec<u32> = Vec::new();
    let mut namespaces: Vec<String> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();

    println!("lab: starting etcd and seine-apiserver on 127.0.0.1");
    let etcd = Etcd::start()?;
    let apiserver = ApiServer::start(&etcd)?;
    pids.extend(etcd.pid());
    pids.extend(apiserver.pid());
    files.extend(etcd.files());
    files.extend(apiserver.files());
    let kubeconfig = state_dir.join("admin.kubeconfig");
    std::fs::copy(&apiserver.kubeconfig, &kubeconfig)?;
    let port = apiserver.addr.port();
    // Agents in node namespaces reach the API server on the host's loopback through a Unix
    // socket: one socat here, one in each node listening on the same port of its own loopback.
    let socket = state_dir.join("apiserver.sock");
    let relay = spawn(
        Command::new("socat")
            .arg(format!("UNIX-LISTEN:{},fork,mode=600", socket.display()))
            .arg(format!("TCP:127.0.0.1:{port}")),
        &state_dir.join("relay.log"),
    )?;
    pids.push(relay);
    files.push(state_dir.join("relay.log"));

    // Cluster DNS on the host's loopback, from the API server, with kubeadm's plugins (no forward:
    // the lab sends nothing outside its own addresses).
    let dns_ports = DnsPorts::pick()?;
    let corefile = format!(
        ".:{dns} {{\n    errors\n    health 127.0.0.1:{health}\n    ready 127.0.0.1:{ready}\n    \
         kubernetes cluster.local in-addr.arpa ip6.arpa {{\n        kubeconfig {kubeconfig}\n        \
         pods insecure\n        ttl 30\n    }}\n    prometheus 127.0.0.1:{metrics}\n    \
         cache 30\n    reload\n    loadbalance\n}}\n",
        dns = dns_ports.dns,
        health = dns_ports.health,
        ready = dns_ports.ready,
        metrics = dns_ports.metrics,
        kubeconfig = kubeconfig.display(),
    );
    println!("lab: seine-dns on 127.0.0.1:{}", dns_ports.dns);
    let dns = SeineDns::start(dns_ports, &corefile)?;
    dns.wait_serving()?;
    pids.push(dns.process.pid());
    files.extend(dns.files());
    let dns_corefile = dns.corefile.display().to_string();

    // The controllers and the scheduler, as API clients with leader election. Node lifecycle is
    // left out: the lab's nodes have agents but no kubelets to heartbeat.
    println!("lab: seine-controller-manager and seine-scheduler");
    let key = apiserver.cert_dir.join("sa.key");
    let ca = apiserver.cert_dir.join("ca.crt");
    let manager = Daemon::controller_manager(
        &apiserver,
        &[
            "--controllers",
            "*,-nodelifecycle",
            "--service-account-private-key-file",
            &key.display().to_string(),
            "--root-ca-file",
            &ca.display().to_string(),
        ],
    )?;
    let scheduler = Daemon::scheduler(&apiserver, &[])?;
    for daemon in [&manager, &scheduler] {
        pids.push(daemon.process.pid());
        files.extend(daemon.files());
    }
    let (manager_port, manager_log) = (manager.port, manager.process.log.display().to_string());
    std::mem::forget(manager);
    std::mem::forget(scheduler);

    let underlay = Underlay::create(PREFIX)?;
    namespaces.push(underlay.ns.name.clone());
    let mut underlay = underlay;
    let mut nodes = Vec::new();
    for (name, prefix, ip, cidr, _) in NODES {
        println!(
            "lab: node {name} (namespace {prefix}-node, {}, pods {cidr})",
            Ipv4Addr::from(ip)
        );
        let node = Node::create_named(prefix)?;
        underlay.connect(&node.ns, Ipv4Addr::from(ip), 1500)?;
        let (code, body) = apiserver.post(
            "/api/v1/nodes",
            &json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr},
                    "status": {"addresses": [{"type": "InternalIP", "address": Ipv4Addr::from(ip).to_string()}]}}),
        )?;
        if code != 201 {
            bail!("creating Node {name}: {code} {body}");
        }
        let log = state_dir.join(format!("{name}-relay.log"));
        let mut command = node.ns.command(Path::new("socat"));
        command
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"))
            .arg(format!("UNIX-CONNECT:{}", socket.display()));
        pids.push(spawn(&mut command, &log)?);
        files.push(log);
        nodes.push(node);
    }
    for ((name, _, ip, _, _), node) in NODES.iter().zip(nodes.iter_mut()) {
        let cni = state_dir.join(name);
        let dir = |sub: &str| cni.join(sub).display().to_string();
        println!(
            "lab: seine-agent on {name}: VXLAN overlay, CNI plugin installed in {}",
            dir("bin")
        );
        node.services_from_api = true;
        node.start_agent(&[
            "--node-name",
            name,
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--vtep-address",
            &Ipv4Addr::from(*ip).to_string(),
            "--cni-bin-dir",
            &dir("bin"),
            "--cni-conf-dir",
            &dir("net.d"),
            "--cni-data-dir",
            &dir("data"),
            "--cni-plugin",
            &seine_tests::bin("seine-cni")?.display().to_string(),
        ])?;
    }
    let mut backends = Vec::new();
    for ((name, _, _, _, pods), node) in NODES.iter().zip(nodes.iter_mut()) {
        let cni = state_dir.join(name);
        let conflist: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cni.join("net.d/10-seine.conflist"))?)?;
        let config = plugin_config(&conflist, 0, None);
        for pod in *pods {
            node.add_cni_pod_using(&cni.join("bin/seine-cni"), pod, &config)?;
            let ip = node.pod(pod).ip;
            println!("lab: pod {pod} on {name} at {ip} (from seine-cni)");
            if pod.starts_with("backend") {
                node.pod_mut(pod).serve(PORT)?;
                backends.push((ip, *name));
            }
        }
    }
    for (collection, object) in [
        ("/api/v1/namespaces/default/services", web_service()),
        (
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            web_slice(&backends),
        ),
    ] {
        let (code, body) = apiserver.post(collection, &object)?;
        if code != 201 {
            bail!(
                "creating {collection}/{}: {code} {body}",
                object["metadata"]["name"]
            );
        }
    }

    for node in &nodes {
        let (p, n) = node.inventory();
        pids.extend(p);
        namespaces.extend(n);
        files.extend(node.files());
    }
    files.push(state_dir.to_path_buf());
    let bpffs_dirs: Vec<PathBuf> = nodes.iter().map(|n| n.bpffs_dir.clone()).collect();
    let state = json!({
        "pids": pids,
        "namespaces": namespaces,
        "files": files,
        "bpffs_dir": nodes[0].bpffs_dir,
        "bpffs_dirs": bpffs_dirs,
    });
    std::fs::write(state_file(), serde_json::to_vec_pretty(&state)?)?;

    let vip: SocketAddr = (VIP.parse::<Ipv4Addr>()?, 80).into();
    let client = nodes[0].pod("client");
    seine_tests::wait_until(Duration::from_secs(10), || client.http_get(vip).is_ok())
        .context("the service did not answer through the VIP")?;
    let mut answers = std::collections::BTreeSet::new();
    for _ in 0..12 {
        answers.insert(client.http_get(vip)?);
    }
    let agent_log = nodes[0]
        .agent
        .as_ref()
        .map(|a| a.log.display().to_string())
        .unwrap_or_default();
    let apiserver_addr = apiserver.addr;
    let remote = backends[1].0;
    // The lab outlives this process: hand the namespaces and processes over to `lab down`.
    for node in nodes {
        std::mem::forget(node);
    }
    std::mem::forget(underlay);
    std::mem::forget(apiserver);
    std::mem::forget(etcd);
    std::mem::forget(dns);
    let kubeconfig = kubeconfig.display();
    let answers = answers.into_iter().collect::<Vec<_>>().join(", ");

    let seinectl = seine_tests::bin("seinectl")?.display().to_string();
    let (dns_port, dns_metrics) = (dns_ports.dns, dns_ports.metrics);
    println!(
        "\nThe lab is up: two nodes joined by a VXLAN overlay, pods added by seine-cni, and Service web\n\
         {VIP}:80 with backends on both nodes. The client on node-1 just got answers from {answers}.\n\
         \nTry:\n\
         \x20 for i in $(seq 6); do ip netns exec seinelab1-client curl -s http://{VIP}/; done   # spread over both nodes\n\
         \x20 ip netns exec seinelab1-client ping -c 2 -M do -s 1422 {remote}   # backend-2: full-size, across the overlay\n\
         \x20 ip -n seinelab1-node route; bridge -n seinelab1-node fdb show dev seine.vxlan   # the overlay's routes and VTEPs\n\
         \x20 cat {STATE_DIR}/node-1/net.d/10-seine.conflist        # what the agent installed\n\
         \x20 ip netns exec seinelab1-node {seinectl} bpf lb list   # the service map (node-1's pins, found by itself)\n\
         \x20 ip netns exec seinelab1-node {seinectl} bpf ct list   # conntrack after those requests\n\
         \x20 ip netns exec seinelab1-node {seinectl} service list # Service web as node-1's datapath holds it\n\
         \x20 ip netns exec seinelab1-node curl -s 127.0.0.1:9962/metrics | grep ^seine_\n\
         \x20 tail -f {agent_log}                                # node-1's agent\n\
         \nCluster DNS (seine-dns, from the API server; Corefile {dns_corefile}):\n\
         \x20 dig @127.0.0.1 -p {dns_port} kubernetes.default.svc.cluster.local\n\
         \x20 dig @127.0.0.1 -p {dns_port} _https._tcp.kubernetes.default.svc.cluster.local SRV\n\
         \x20 dig @127.0.0.1 -p {dns_port} -x 10.96.0.1\n\
         \x20 curl -s 127.0.0.1:{dns_metrics}/metrics | grep ^coredns_dns_requests\n\
         \nThe API server listens on https://{apiserver_addr}, with etcd behind it:\n\
         \x20 export KUBECONFIG={kubeconfig}\n\
         \x20 kubectl get nodes -o custom-columns=NAME:.metadata.name,POD-CIDR:.spec.podCIDR,VTEP:.metadata.annotations.seine\\.io/vtep-ip\n\
         \x20 kubectl get endpointslices -l kubernetes.io/service-name=web; kubectl edit endpointslice web-lab   # drop an endpoint: the agents apply it\n\
         \x20 kubectl delete node node-2        # node-1's agent removes its route and VTEP\n\
         \x20 kubectl auth can-i list pods --as=system:kube-scheduler\n\
         \x20 kubectl create namespace team-a; kubectl get serviceaccounts,configmaps -n team-a   # default SA, kube-root-ca.crt\n\
         \x20 kubectl get endpointslices -A; kubectl get leases -n kube-system   # controllers and their leader Leases\n\
         \x20 curl -s 127.0.0.1:{manager_port}/metrics | grep ^seine_controller; tail {manager_log}\n\
         \nRemove it all with: cargo xtask lab down"
    );
    Ok(())
}

/// Starts a helper process (socat) that outlives the lab command, logging to `log`.
fn spawn(command: &mut Command, log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt as _;
    let child = command
        .process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .context("starting socat")?;
    Ok(child.id())
}

fn read_state() -> Result<Option<serde_json::Value>> {
    match std::fs::read(state_file()) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!("reading {}", state_file().display())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", state_file().display())),
    }
}

fn down(verbose: bool) -> Result<()> {
    let Some(state) = read_state()? else {
        if verbose {
            println!("lab: nothing to remove");
        }
        return Ok(());
    };
    for pid in state["pids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_u64())
    {
        let pid = pid as i32;
        // Only our own programs: a PID may have been reused since `lab up`.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        let ours = [
            "seine-agent",
            "seine-echo",
            "seine-apiserver",
            "seine-dns",
            "seine-controller-manager",
            "seine-scheduler",
            "etcd",
            STATE_DIR,
        ];
        if !ours.iter().any(|p| cmdline.contains(p)) {
            continue;
        }
        println!("lab: stopping process {pid}");
        // SAFETY: signalling a process by PID after checking it is one the lab started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..50 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for ns in state["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str())
    {
        println!("lab: deleting namespace {ns}");
        let _ = sh("ip", &["netns", "del", ns]);
    }
    for file in state["files"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str())
    {
        let path = Path::new(file);
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        };
    }
    let dirs = state["bpffs_dirs"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&state["bpffs_dir"]))
        .filter_map(|d| d.as_str());
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
        seine_agent::bpf::remove_node_files(Path::new(dir));
    }
    if Path::new(STATE_DIR).exists() {
        std::fs::remove_dir_all(STATE_DIR).with_context(|| format!("removing {STATE_DIR}"))?;
    }
    if verbose {
        println!("lab: removed");
    }
    Ok(())
}

fn status() -> Result<()> {
    let Some(state) = read_state()? else {
        println!("lab: down");
        return Ok(());
    };
    let pids: Vec<u64> = state["pids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_u64())
        .collect();
    let alive = pids
        .iter()
        .filter(|p| Path::new(&format!("/proc/{p}")).exists())
        .count();
    println!("lab: up, {alive} of {} processes running", pids.len());
    let dir = state["bpffs_dir"].as_str().unwrap_or_default();
    let out = std::process::Command::new(seine_tests::bin("seinectl")?)
        .args(["--bpffs-dir", dir, "bpf", "lb", "list"])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
