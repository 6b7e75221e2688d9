//! seine-lab: the demo topology of `cargo xtask lab up|down|status`. One node namespace running
//! seine-agent, a client pod and three backend pods serving HTTP, and one ClusterIP service
//! programmed from Kubernetes Service and EndpointSlice objects in a file the agent watches; and
//! the control plane so far: etcd and seine-apiserver on 127.0.0.1 with an admin kubeconfig.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use seine_tests::{apiserver::ApiServer, etcd::Etcd, sh, Node};
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

fn services_yaml(backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    format!(
        "# The lab's Service and its EndpointSlice: edit and save, and seine-agent applies the change.\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec:\n  clusterIP: {VIP}\n  ports:\n  - {{name: http, port: 80, targetPort: {PORT}, protocol: TCP}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: web-lab\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\n\
         addressType: IPv4\nports:\n- {{name: http, port: {PORT}, protocol: TCP}}\nendpoints:\n{endpoints}"
    )
}

fn up() -> Result<()> {
    if state_file().exists() {
        println!("lab: an earlier lab is up; removing it first");
        down(false)?;
    }
    std::fs::create_dir_all(STATE_DIR)?;
    println!("lab: creating the node namespace {PREFIX}-node");
    let mut node = Node::create_named(PREFIX)?;
    node.add_pod("client", Ipv4Addr::new(10, 244, 0, 2))?;
    let mut backends = Vec::new();
    for i in 1..=3u8 {
        let name = format!("backend-{i}");
        let ip = Ipv4Addr::new(10, 244, 0, 10 + i);
        println!("lab: pod {name} at {ip} serving HTTP on :{PORT}");
        node.add_pod(&name, ip)?;
        node.pod_mut(&name).serve(PORT)?;
        backends.push(ip);
    }
    let services = Path::new(STATE_DIR).join("services.yaml");
    std::fs::write(&services, services_yaml(&backends))?;
    println!(
        "lab: starting seine-agent (maps pinned under {})",
        node.bpffs_dir.display()
    );
    let file_arg = services.display().to_string();
    node.start_agent(&["--services-file", &file_arg])?;

    println!("lab: starting etcd and seine-apiserver on 127.0.0.1");
    let etcd = Etcd::start()?;
    let apiserver = ApiServer::start(&etcd)?;
    let kubeconfig = Path::new(STATE_DIR).join("admin.kubeconfig");
    std::fs::copy(&apiserver.kubeconfig, &kubeconfig)?;

    let (mut pids, namespaces) = node.inventory();
    pids.extend(etcd.pid());
    pids.extend(apiserver.pid());
    let mut files = node.files();
    files.extend(etcd.files());
    files.extend(apiserver.files());
    let state = json!({
        "pids": pids,
        "namespaces": namespaces,
        "files": files,
        "bpffs_dir": node.bpffs_dir,
        "agent_log": node.agent.as_ref().map(|a| a.log.clone()),
    });
    std::fs::write(state_file(), serde_json::to_vec_pretty(&state)?)?;

    let vip: SocketAddr = (VIP.parse::<Ipv4Addr>()?, 80).into();
    seine_tests::wait_until(Duration::from_secs(10), || {
        node.pod("client").http_get(vip).is_ok()
    })
    .context("the service did not answer through the VIP")?;
    let answer = node.pod("client").http_get(vip)?;
    let bpffs = node.bpffs_dir.display().to_string();
    let agent_log = node
        .agent
        .as_ref()
        .map(|a| a.log.display().to_string())
        .unwrap_or_default();
    let apiserver_addr = apiserver.addr;
    // The lab outlives this process: hand the namespaces and processes over to `lab down`.
    std::mem::forget(node);
    std::mem::forget(apiserver);
    std::mem::forget(etcd);
    let kubeconfig = kubeconfig.display();

    let seinectl = seine_tests::bin("seinectl")?.display().to_string();
    println!(
        "\nThe lab is up. Service web {VIP}:80 -> backends 10.244.0.11-13:{PORT}; the client just got an answer from {answer}.\n\
         \nTry:\n\
         \x20 for i in $(seq 6); do ip netns exec {PREFIX}-client curl -s http://{VIP}/; done   # spread over the backends\n\
         \x20 {seinectl} --bpffs-dir {bpffs} bpf lb list      # the service map\n\
         \x20 {seinectl} --bpffs-dir {bpffs} bpf ct list      # conntrack after those requests\n\
         \x20 {seinectl} --bpffs-dir {bpffs} bpf stats\n\
         \x20 {seinectl} --bpffs-dir {bpffs} status             # eBPF, or iptables after a fallback\n\
         \x20 $EDITOR {STATE_DIR}/services.yaml                  # drop an endpoint; the agent applies it\n\
         \x20 ip netns exec {PREFIX}-node curl -s 127.0.0.1:9962/metrics | grep ^seine_\n\
         \x20 tail -f {agent_log}                                # the agent's log\n\
         \nThe API server listens on https://{apiserver_addr}, with etcd behind it:\n\
         \x20 export KUBECONFIG={kubeconfig}\n\
         \x20 kubectl get namespaces; kubectl get service kubernetes -o wide\n\
         \x20 kubectl create configmap demo --from-literal=color=blue; kubectl get configmaps -w\n\
         \x20 kubectl auth can-i list pods --as=system:kube-scheduler\n\
         \nRemove it all with: cargo xtask lab down"
    );
    Ok(())
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
        let ours = ["seine-agent", "seine-echo", "seine-apiserver", "etcd"];
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
    if let Some(dir) = state["bpffs_dir"].as_str() {
        let _ = std::fs::remove_dir_all(dir);
        seine::bpf::remove_node_files(Path::new(dir));
    }
    std::fs::remove_dir_all(STATE_DIR).with_context(|| format!("removing {STATE_DIR}"))?;
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
