//! Kubernetes ClusterIP semantics, one suite run against both datapaths (eBPF and iptables): a node
//! namespace with pod namespaces, the real seine-agent programmed from a Service/EndpointSlice file,
//! traffic from the client pod through service VIPs.
//!
//! Needs root. Run serially (`--test-threads=1`, as `cargo xtask test` does).

use std::{
    collections::HashSet,
    io::{ErrorKind, Read, Write},
    net::{TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use md5::{Digest, Md5};
use seine_agent::model::ServiceSpec;
use seine_tests::{spread, stats, topology, vip, wait_until, KeepAlive, Node, RequestLoop};

const PORT: u16 = 8080;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ebpf,
    Iptables,
    Nftables,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// Runs each listed scenario once per datapath, as `ebpf::NAME`, `iptables::NAME` and
/// `nftables::NAME`.
macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod ebpf {
            $( #[test] fn $name() { super::$name(super::Mode::Ebpf) } )*
        }
        mod iptables {
            $( #[test] fn $name() { super::$name(super::Mode::Iptables) } )*
        }
        mod nftables {
            $( #[test] fn $name() { super::$name(super::Mode::Nftables) } )*
        }
    };
}

in_both_modes!(
    tcp_and_udp_reach_backends_through_the_vip,
    new_connections_spread_evenly_over_ready_backends,
    service_without_backends_is_refused_at_once,
    removed_backend_gets_no_new_connections_while_established_ones_continue,
    terminating_backends_serve_only_when_no_ready_backend_is_left,
    client_ip_affinity_holds_until_its_timeout,
    pod_reaches_itself_through_its_own_service,
    the_nodes_own_processes_reach_services_and_see_the_service_as_peer,
    bulk_transfer_keeps_its_checksum_with_offloads_off,
    ten_thousand_services_are_programmed_and_the_last_is_reachable,
    agent_restart_during_a_request_loop_fails_no_request,
    service_updates_under_load_fail_no_connection,
);

fn ready_node(tag: &str, backends: usize, mode: Mode) -> Node {
    let mut node = topology(tag, backends, PORT).unwrap();
    node.start_agent(&["--datapath", mode.flag()]).unwrap();
    node
}

/// A service spec from pod names, each optionally with `,terminating`.
fn service(node: &Node, frontend: &str, backends: &[&str], affinity: Option<u32>) -> ServiceSpec {
    ServiceSpec {
        frontend: frontend.parse().unwrap(),
        backends: backends
            .iter()
            .map(|b| {
                let (pod, state) = b.split_once(',').unwrap_or((b, "active"));
                format!("{}:{PORT},{state}", node.pod(pod).ip)
                    .parse()
                    .unwrap()
            })
            .collect(),
        affinity_timeout_secs: affinity,
    }
}

fn set(node: &Node, frontend: &str, backends: &[&str], affinity: Option<u32>) {
    node.set_service(service(node, frontend, backends, affinity))
        .unwrap();
}

fn tcp_and_udp_reach_backends_through_the_vip(mode: Mode) {
    let node = ready_node("tu", 3, mode);
    let all = ["backend-1", "backend-2", "backend-3"];
    set(&node, "10.96.0.10:80/tcp", &all, None);
    set(&node, "10.96.0.10:53/udp", &all, None);

    let answers = spread(&node, vip("10.96.0.10:80"), 30);
    assert_eq!(answers.values().sum::<u64>(), 30);
    assert!(
        answers.keys().all(|k| k.starts_with("backend-")),
        "{answers:?}"
    );

    let replies = node
        .pod("client")
        .run(|| {
            let mut names = HashSet::new();
            for _ in 0..30 {
                // A new socket per query: a new flow, a new backend choice.
                let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
                sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                sock.connect("10.96.0.10:53").unwrap();
                sock.send(b"ping").unwrap();
                let mut buf = [0u8; 64];
                let n = sock.recv(&mut buf).unwrap();
                // The reply comes from the VIP, or a connected socket would not receive it.
                names.insert(String::from_utf8_lossy(&buf[..n]).trim().to_string());
            }
            names
        })
        .unwrap();
    assert!(replies.len() >= 2, "UDP answers from {replies:?}");
}

fn new_connections_spread_evenly_over_ready_backends(mode: Mode) {
    let node = ready_node("sp", 3, mode);
    set(
        &node,
        "10.96.0.20:80/tcp",
        &["backend-1", "backend-2", "backend-3"],
        None,
    );
    let counts = spread(&node, vip("10.96.0.20:80"), 300);
    let observed: Vec<u64> = ["backend-1", "backend-2", "backend-3"]
        .iter()
        .map(|b| counts.get(*b).copied().unwrap_or(0))
        .collect();
    let chi2 = stats::chi_square_uniform(&observed);
    assert!(
        chi2 < stats::CHI_SQUARE_P001[1],
        "spread {observed:?} has chi-square {chi2:.2} (limit {})",
        stats::CHI_SQUARE_P001[1]
    );
}

fn service_without_backends_is_refused_at_once(mode: Mode) {
    let node = ready_node("rj", 1, mode);
    set(&node, "10.96.0.30:80/tcp", &[], None);
    set(&node, "10.96.0.30:53/udp", &[], None);
    let (tcp, udp) = node
        .pod("client")
        .run(|| {
            // A generous timeout: only a refusal, not a timeout, counts.
            let tcp = TcpStream::connect_timeout(&vip("10.96.0.30:80"), Duration::from_secs(5))
                .map(|_| ())
                .map_err(|e| e.kind());
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            sock.connect("10.96.0.30:53").unwrap();
            sock.send(b"ping").unwrap();
            let mut buf = [0u8; 16];
            let udp = sock.recv(&mut buf).map(|_| ()).map_err(|e| e.kind());
            (tcp, udp)
        })
        .unwrap();
    assert_eq!(tcp, Err(ErrorKind::ConnectionRefused));
    assert_eq!(udp, Err(ErrorKind::ConnectionRefused));
    if mode == Mode::Ebpf {
        assert!(node.counter("no_backend").unwrap() >= 2);
    }
}

fn removed_backend_gets_no_new_connections_while_established_ones_continue(mode: Mode) {
    let node = ready_node("rm", 3, mode);
    set(
        &node,
        "10.96.0.40:80/tcp",
        &["backend-1", "backend-2", "backend-3"],
        None,
    );
    let addr = vip("10.96.0.40:80");

    // One kept-alive connection to each backend.
    let conns = node
        .pod("client")
        .run(move || {
            let mut conns: Vec<(String, KeepAlive)> = Vec::new();
            for _ in 0..200 {
                let mut c = KeepAlive::connect(addr).unwrap();
                let name = c.get().unwrap();
                if !conns.iter().any(|(n, _)| *n == name) {
                    conns.push((name, c));
                }
                if conns.len() == 3 {
                    break;
                }
            }
            conns
        })
        .unwrap();
    assert_eq!(conns.len(), 3, "could not reach every backend");

    set(
        &node,
        "10.96.0.40:80/tcp",
        &["backend-2", "backend-3"],
        None,
    );
    let new_counts = spread(&node, addr, 60);
    assert!(
        !new_counts.contains_key("backend-1"),
        "removed backend got new connections: {new_counts:?}"
    );
    assert_eq!(new_counts.values().sum::<u64>(), 60);

    let still = node
        .pod("client")
        .run(move || {
            conns
                .into_iter()
                .filter(|(name, _)| name != "backend-1")
                .map(|(name, mut c)| {
                    let ok = c.get().map(|n| n == name).unwrap_or(false);
                    (name, ok)
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert_eq!(still.len(), 2);
    for (name, ok) in still {
        assert!(
            ok,
            "established connection to {name} broke when another backend was removed"
        );
    }
}

fn terminating_backends_serve_only_when_no_ready_backend_is_left(mode: Mode) {
    let node = ready_node("tm", 2, mode);
    let addr = vip("10.96.0.50:80");
    set(
        &node,
        "10.96.0.50:80/tcp",
        &["backend-1", "backend-2,terminating"],
        None,
    );
    let counts = spread(&node, addr, 40);
    assert_eq!(
        counts.get("backend-1"),
        Some(&40),
        "with a ready backend left: {counts:?}"
    );

    set(
        &node,
        "10.96.0.50:80/tcp",
        &["backend-1,terminating", "backend-2,terminating"],
        None,
    );
    let counts = spread(&node, addr, 60);
    assert_eq!(counts.values().sum::<u64>(), 60);
    assert_eq!(
        counts.len(),
        2,
        "terminating backends share the load when none is ready: {counts:?}"
    );
}

fn client_ip_affinity_holds_until_its_timeout(mode: Mode) {
    let node = ready_node("af", 3, mode);
    let addr = vip("10.96.0.60:80");
    set(
        &node,
        "10.96.0.60:80/tcp",
        &["backend-1", "backend-2", "backend-3"],
        Some(1),
    );
    let counts = spread(&node, addr, 30);
    assert_eq!(
        counts.len(),
        1,
        "affinity broke within the timeout: {counts:?}"
    );

    // Past the timeout the choice is made afresh: over several expiries, more than one backend.
    let mut seen = HashSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        seen.extend(spread(&node, addr, 1).into_keys());
    }
    assert!(seen.len() > 1, "affinity never expired: always {seen:?}");
}

fn pod_reaches_itself_through_its_own_service(mode: Mode) {
    let mut node = ready_node("hp", 1, mode);
    node.pod_mut("client").serve(PORT).unwrap();
    set(&node, "10.96.0.70:80/tcp", &["client"], None);
    let answers = spread(&node, vip("10.96.0.70:80"), 10);
    assert_eq!(answers.get("client"), Some(&10), "{answers:?}");
    // With a second endpoint the pod is one of two picks (the first, by its lower address):
    // every connection still succeeds, those to itself too.
    set(&node, "10.96.0.70:80/tcp", &["client", "backend-1"], None);
    let answers = spread(&node, vip("10.96.0.70:80"), 40);
    assert_eq!(answers.values().sum::<u64>(), 40, "{answers:?}");
    assert!(
        answers.get("client").is_some_and(|n| *n > 0) && answers.contains_key("backend-1"),
        "{answers:?}"
    );
}

/// A host-network client: TCP to `vip:80` and UDP to `vip:53`, printing the peer each socket
/// reports and the answer, or `refused`.
const HOST_CLIENT: &str = r#"
import socket, sys
vip = sys.argv[1]
try:
    s = socket.create_connection((vip, 80), timeout=3)
except ConnectionRefusedError:
    print("refused")
    sys.exit(0)
s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
peer = s.getpeername()
print("tcp", "%s:%d" % peer, data.split(b"\r\n\r\n", 1)[-1].decode().strip())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(3)
u.sendto(b"ping", (vip, 53))
msg, src = u.recvfrom(64)
print("udp", "%s:%d" % src, msg.decode().strip())
"#;

/// The node's own processes (kubelet, host-network pods) reach services too: in eBPF mode at
/// the socket, in the rule modes through the OUTPUT hooks; either way the peer they see is the
/// service, and a service without endpoints refuses them at once.
fn the_nodes_own_processes_reach_services_and_see_the_service_as_peer(mode: Mode) {
    let node = ready_node("ho", 2, mode);
    let both = ["backend-1", "backend-2"];
    set(&node, "10.96.0.80:80/tcp", &both, None);
    set(&node, "10.96.0.80:53/udp", &both, None);
    let ask = || {
        node.host_exec("python3", &["-c", HOST_CLIENT, "10.96.0.80"])
            .unwrap_or_else(|e| panic!("{e:#}\n{}", node.agent.as_ref().unwrap().log_text()))
    };
    let mut answered = HashSet::new();
    for _ in 0..12 {
        let out = ask();
        let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0][..2], ["tcp", "10.96.0.80:80"], "{out}");
        assert_eq!(lines[1][..2], ["udp", "10.96.0.80:53"], "{out}");
        answered.insert(lines[0][2].to_string());
        answered.insert(lines[1][2].to_string());
    }
    assert_eq!(answered, HashSet::from(both.map(String::from)));
    if mode == Mode::Ebpf {
        assert!(node.counter("sock_translated").unwrap() >= 24);
    }
    set(&node, "10.96.0.80:80/tcp", &[], None);
    assert_eq!(ask().trim(), "refused");
}

fn bulk_transfer_keeps_its_checksum_with_offloads_off(mode: Mode) {
    let node = ready_node("bk", 1, mode);
    for pod in &node.pods {
        pod.ns
            .exec("ethtool", &["-K", "eth0", "tx", "off", "rx", "off"])
            .unwrap();
        node.ns
            .exec("ethtool", &["-K", &pod.host_if, "tx", "off", "rx", "off"])
            .unwrap();
    }
    let ip = node.pod("backend-1").ip;
    node.set_service(ServiceSpec {
        frontend: "10.96.0.80:9000/tcp".parse().unwrap(),
        backends: vec![format!("{ip}:{}", PORT + 1).parse().unwrap()],
        affinity_timeout_secs: None,
    })
    .unwrap();

    let (sent, received) = node
        .pod("client")
        .run(|| {
            let mut data = vec![0u8; 20 * 1024 * 1024];
            rand::Rng::fill(&mut rand::rng(), &mut data[..]);
            let sent = Md5::digest(&data);
            let mut stream = TcpStream::connect(vip("10.96.0.80:9000")).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut reader = stream.try_clone().unwrap();
            let len = data.len();
            let writer = std::thread::spawn(move || {
                stream.write_all(&data).unwrap();
                stream.shutdown(std::net::Shutdown::Write).unwrap();
            });
            let mut back = Vec::with_capacity(len);
            reader.read_to_end(&mut back).unwrap();
            writer.join().unwrap();
            assert_eq!(back.len(), len, "echoed length");
            (sent, Md5::digest(&back))
        })
        .unwrap();
    assert_eq!(sent, received, "md5 of 20 MB through the VIP");
}

fn ten_thousand_services_are_programmed_and_the_last_is_reachable(mode: Mode) {
    let mut node = topology("tk", 2, PORT).unwrap();
    let backends: Vec<String> = ["backend-1", "backend-2"]
        .iter()
        .map(|b| format!("{}:{PORT}", node.pod(b).ip))
        .collect();
    let specs: Vec<ServiceSpec> = (0..10_000u32)
        .map(|i| ServiceSpec {
            frontend: format!("10.97.{}.{}:80/tcp", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            affinity_timeout_secs: None,
        })
        .collect();
    let items = seine_tests::objects::services_to_objects(&specs);
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    std::fs::write(&node.services_file, serde_json::to_vec(&list).unwrap()).unwrap();
    node.start_agent(&["--datapath", mode.flag()]).unwrap();

    let last = vip("10.97.39.250:80");
    let first = vip("10.97.0.1:80");
    wait_until(Duration::from_secs(120), || {
        node.pod("client").http_get(last).is_ok()
    })
    .unwrap();
    assert!(node
        .pod("client")
        .http_get(first)
        .unwrap()
        .starts_with("backend-"));
    let metrics = node.metrics().unwrap();
    assert!(metrics.contains("seine_services 10000"), "{metrics}");
    if mode == Mode::Ebpf {
        let lb = node.seinectl_json(&["bpf", "lb", "list"]).unwrap();
        assert_eq!(lb.as_array().unwrap().len(), 10_000);
    }
}

fn agent_restart_during_a_request_loop_fails_no_request(mode: Mode) {
    let mut node = ready_node("rs", 3, mode);
    set(
        &node,
        "10.96.0.90:80/tcp",
        &["backend-1", "backend-2", "backend-3"],
        None,
    );
    let addr = vip("10.96.0.90:80");
    let looper = RequestLoop::start(node.pod("client"), addr);
    std::thread::sleep(Duration::from_millis(500));
    let before = looper.ok();
    node.stop_agent().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    node.spawn_agent().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (total, failures) = looper.stop();
    assert!(
        before > 0 && total > before,
        "the loop made no progress ({before} then {total})"
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let log = node.agent.as_ref().unwrap().log_text();
    assert!(log.matches("datapath loaded").count() >= 2, "{log}");
}

fn service_updates_under_load_fail_no_connection(mode: Mode) {
    let node = ready_node("tx", 3, mode);
    let frontend = "10.96.5.1:80/tcp";
    let sets = [
        [
            "backend-1",
            "backend-2,terminating",
            "backend-3,terminating",
        ],
        ["backend-1,terminating", "backend-2", "backend-3"],
    ];
    set(&node, frontend, &sets[0], None);
    let addr = vip("10.96.5.1:80");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let path = node.pod("client").ns.path();
    let (s, o, f) = (stop.clone(), ok.clone(), failures.clone());
    let looper = std::thread::spawn(move || {
        seine_tests::enter(&path).unwrap();
        while !s.load(Ordering::SeqCst) {
            match seine_tests::http_get(addr) {
                Ok(_) => o.fetch_add(1, Ordering::SeqCst),
                Err(_) => f.fetch_add(1, Ordering::SeqCst),
            };
        }
    });
    // Every backend stays in the set, only states and counts change: no connection may fail.
    for i in 0..40 {
        set(&node, frontend, &sets[i % 2], None);
    }
    stop.store(true, Ordering::SeqCst);
    looper.join().unwrap();
    assert!(ok.load(Ordering::SeqCst) > 0);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "connections failed during updates"
    );
    if mode == Mode::Ebpf {
        assert_eq!(node.counter("drop_backend_missing").unwrap(), 0);
        assert_eq!(node.counter("no_backend").unwrap(), 0);
    }
}
