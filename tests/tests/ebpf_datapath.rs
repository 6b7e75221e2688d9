//! What is particular to the eBPF datapath: seinectl against the pinned maps, map capacities and
//! layouts, transactional updates at the library level, conntrack tuple reuse, malformed packets,
//! cleanup. The service behaviour both datapaths share is in `service_semantics.rs`.
//!
//! Needs root. Run serially (`--test-threads=1`, as `cargo xtask test` does).

use std::{
    collections::HashSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use seine_tests::{spread, topology, vip, wait_until, Node};

const PORT: u16 = 8080;

fn backend_args(node: &Node, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .flat_map(|n| {
            let ip = node.pod(n.split(',').next().unwrap()).ip;
            let state = n
                .split(',')
                .nth(1)
                .map(|s| format!(",{s}"))
                .unwrap_or_default();
            ["--backend".to_string(), format!("{ip}:{PORT}{state}")]
        })
        .collect()
}

fn upsert(node: &Node, frontend: &str, backends: &[&str], extra: &[&str]) {
    let mut args = vec!["service", "upsert", "--frontend", frontend];
    let b = backend_args(node, backends);
    args.extend(b.iter().map(String::as_str));
    args.extend_from_slice(extra);
    node.seinectl_ok(&args).unwrap();
}

fn ready_node(tag: &str, backends: usize) -> Node {
    let mut node = topology(tag, backends, PORT).unwrap();
    node.start_agent(&[]).unwrap();
    node
}

#[test]
fn seinectl_shows_what_was_programmed() {
    let node = ready_node("ct", 2);
    upsert(
        &node,
        "10.96.1.1:80/tcp",
        &["backend-1", "backend-2,terminating"],
        &["--affinity-timeout", "300"],
    );
    let b1 = format!("{}:{PORT}", node.pod("backend-1").ip);
    let b2 = format!("{}:{PORT}", node.pod("backend-2").ip);

    let lb = node.seinectl_json(&["bpf", "lb", "list"]).unwrap();
    let entry = &lb[0];
    assert_eq!(entry["frontend"], "10.96.1.1:80/TCP");
    assert_eq!(entry["owner"], "seinectl");
    assert_eq!(entry["affinity_timeout_secs"], 300);
    let backends: Vec<(String, String)> = entry["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().into(),
                b["state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        backends,
        [
            (b1.clone(), "active".into()),
            (b2.clone(), "terminating".into())
        ]
    );

    let table = node.seinectl_ok(&["bpf", "lb", "list"]).unwrap();
    assert!(
        table.contains("10.96.1.1:80/TCP") && table.contains(&b1) && table.contains(&b2),
        "{table}"
    );

    let list = node.seinectl_json(&["bpf", "backend", "list"]).unwrap();
    let addrs: HashSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, HashSet::from([b1.as_str(), b2.as_str()]));

    assert_eq!(
        node.pod("client").http_get(vip("10.96.1.1:80")).unwrap(),
        "backend-1"
    );
    let ct = node.seinectl_json(&["bpf", "ct", "list"]).unwrap();
    let out = ct
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["direction"] == "out" && e["destination"] == "10.96.1.1:80")
        .expect("conntrack entry of the request");
    assert_eq!(out["backend"], b1);
    assert_eq!(
        out["source"].as_str().unwrap().split(':').next(),
        Some("10.244.0.2")
    );
    assert_eq!(out["expired"], false);
    let left = out["expires_in_secs"].as_f64().unwrap();
    assert!(left > 0.0, "a fresh entry has lifetime left: {out}");
    let table = node.seinectl_ok(&["bpf", "ct", "list"]).unwrap();
    assert!(
        table
            .split_whitespace()
            .all(|t| !t.starts_with('-') || t == "-"),
        "no negative lifetimes: {table}"
    );

    assert!(node.counter("translated").unwrap() > 0);

    node.seinectl_ok(&["service", "delete", "--frontend", "10.96.1.1:80/tcp"])
        .unwrap();
    let lb = node.seinectl_json(&["bpf", "lb", "list"]).unwrap();
    assert!(lb.as_array().unwrap().is_empty());
    let list = node.seinectl_json(&["bpf", "backend", "list"]).unwrap();
    assert!(
        list.as_array().unwrap().is_empty(),
        "backends left after delete: {list}"
    );
}

#[test]
fn malformed_input_is_rejected_with_exit_code_2_and_changes_nothing() {
    let node = ready_node("bd", 1);
    upsert(&node, "10.96.2.1:80/tcp", &["backend-1"], &[]);
    let before = node
        .seinectl_ok(&["bpf", "lb", "list", "-o", "json"])
        .unwrap();
    for args in [
        vec!["service", "upsert", "--frontend", "10.96.2.1:80"],
        vec!["service", "upsert", "--frontend", "10.96.2.1:99999/tcp"],
        vec![
            "service",
            "upsert",
            "--frontend",
            "10.96.2.1:80/tcp",
            "--backend",
            "10.244.0.11",
        ],
        vec![
            "service",
            "upsert",
            "--frontend",
            "10.96.2.1:80/tcp",
            "--backend",
            "10.244.0.300:80",
        ],
        vec![
            "service",
            "upsert",
            "--frontend",
            "10.96.2.1:80/sctp",
            "--backend",
            "10.244.0.11:80",
        ],
        vec!["service", "delete", "--frontend", "nonsense"],
    ] {
        let out = node.seinectl(&args).unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid"), "{args:?}: {err}");
    }
    assert_eq!(
        node.seinectl_ok(&["bpf", "lb", "list", "-o", "json"])
            .unwrap(),
        before
    );
    assert_eq!(
        node.pod("client").http_get(vip("10.96.2.1:80")).unwrap(),
        "backend-1"
    );
}

#[test]
fn agent_rejects_a_malformed_services_file_and_keeps_the_last_good_state() {
    let mut node = topology("bf", 1, PORT).unwrap();
    let file = std::env::temp_dir().join(format!("{}-svc.yaml", node.prefix));
    std::fs::write(&file, "kind: Service\nspec: {ports: 5}\n").unwrap();
    let file_arg = file.display().to_string();
    let err = node
        .start_agent(&["--services-file", &file_arg])
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("exited with exit status: 2"),
        "{err:#}"
    );

    let ip = node.pod("backend-1").ip;
    let good = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.3.1, ports: [{{port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{port: {PORT}}}]\nendpoints: [{{addresses: [\"{ip}\"]}}]\n"
    );
    std::fs::write(&file, &good).unwrap();
    node.start_agent(&["--services-file", &file_arg]).unwrap();
    assert_eq!(
        node.pod("client").http_get(vip("10.96.3.1:80")).unwrap(),
        "backend-1"
    );

    std::fs::write(&file, "{ this is not json").unwrap();
    wait_until(Duration::from_secs(10), || {
        node.agent
            .as_ref()
            .unwrap()
            .log_text()
            .contains("keeping the previous state")
    })
    .unwrap();
    assert_eq!(
        node.pod("client").http_get(vip("10.96.3.1:80")).unwrap(),
        "backend-1"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_full_map_is_a_clear_error_and_keeps_the_old_state() {
    let mut node = topology("fl", 2, PORT).unwrap();
    node.start_agent(&["--max-services", "2", "--max-backends", "3"])
        .unwrap();
    upsert(&node, "10.96.4.1:80/tcp", &["backend-1"], &[]);
    upsert(&node, "10.96.4.2:80/tcp", &["backend-1", "backend-2"], &[]);
    let before = node
        .seinectl_ok(&["bpf", "lb", "list", "-o", "json"])
        .unwrap();

    // A third service does not fit the services map.
    let out = node
        .seinectl(&[
            "service",
            "upsert",
            "--frontend",
            "10.96.4.3:80/tcp",
            "--backend",
            "10.244.0.11:8080",
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("map is full"),
        "{out:?}"
    );

    // A fourth backend does not fit the backends map: the service keeps its old backend.
    let ip2 = node.pod("backend-2").ip;
    let out = node
        .seinectl(&[
            "service",
            "upsert",
            "--frontend",
            "10.96.4.1:80/tcp",
            "--backend",
            "10.244.0.11:8080",
            "--backend",
            &format!("{ip2}:8080"),
            "--backend",
            "10.244.0.99:8080",
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("backends map is full"),
        "{out:?}"
    );

    assert_eq!(
        node.seinectl_ok(&["bpf", "lb", "list", "-o", "json"])
            .unwrap(),
        before
    );
    assert_eq!(
        node.seinectl_json(&["bpf", "backend", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let counts = spread(&node, vip("10.96.4.1:80"), 10);
    assert_eq!(counts.get("backend-1"), Some(&10));
}

#[test]
fn seinectl_on_a_node_finds_the_agents_pins_by_itself() {
    let node = ready_node("find", 1);
    upsert(&node, "10.96.7.1:80/tcp", &["backend-1"], &[]);
    // As a user on the node would: no --bpffs-dir, and the lab pins under a per-node directory.
    let out = node
        .ns
        .command(&seine_tests::bin("seinectl").unwrap())
        .env_remove("SEINE_BPFFS_DIR")
        .args(["bpf", "lb", "list", "-o", "json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let dir = node.bpffs_dir.display().to_string();
    assert!(
        err.contains(&format!("using {dir}")) && err.contains("seine-agent pid"),
        "says which pins it used: {err}"
    );
    let lb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(lb[0]["frontend"], "10.96.7.1:80/TCP");
}

#[test]
fn seinectl_says_what_is_wrong_when_the_maps_are_missing() {
    // bpffs mounted, the node's pins not there.
    let _bpffs = seine_tests::BpffsHold::take().unwrap();
    let dir = std::env::temp_dir().join("seine-no-such-maps");
    let out = std::process::Command::new(seine_tests::bin("seinectl").unwrap())
        .args([
            "--bpffs-dir",
            "/sys/fs/bpf/seine-no-such-node",
            "bpf",
            "lb",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not pinned under /sys/fs/bpf/seine-no-such-node"),
        "{err}"
    );
    assert!(err.contains("seine-agent"), "{err}");

    let out = std::process::Command::new(seine_tests::bin("seinectl").unwrap())
        .args([
            "--bpffs-dir",
            &dir.display().to_string(),
            "bpf",
            "lb",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bpffs is not mounted"));
}

#[test]
fn service_updates_under_load_never_expose_a_half_written_backend_set() {
    let node = ready_node("tx", 3);
    let frontend = "10.96.5.1:80/tcp";
    upsert(
        &node,
        frontend,
        &["backend-1", "backend-2", "backend-3"],
        &[],
    );
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

    // Flip between backend sets of different sizes and states as fast as the library can, while
    // new connections keep arriving. Every backend stays, so no connection may fail.
    let mut dp = seine_agent::datapath::ebpf::EbpfDatapath::open(
        &node.bpffs_dir,
        seine_agent::datapath::ebpf::Owner::Cli,
    )
    .unwrap();
    let ips: Vec<String> = ["backend-1", "backend-2", "backend-3"]
        .iter()
        .map(|b| node.pod(b).ip.to_string())
        .collect();
    let sets = [
        format!(
            "{}:{PORT} {}:{PORT},terminating {}:{PORT},terminating",
            ips[0], ips[1], ips[2]
        ),
        format!(
            "{}:{PORT},terminating {}:{PORT} {}:{PORT}",
            ips[0], ips[1], ips[2]
        ),
    ];
    let flips = 2_000;
    for i in 0..flips {
        let spec = seine_agent::model::ServiceSpec {
            frontend: frontend.parse().unwrap(),
            backends: sets[i % 2].split(' ').map(|b| b.parse().unwrap()).collect(),
            affinity_timeout_secs: None,
        };
        seine_agent::datapath::Datapath::upsert(&mut dp, &spec).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    looper.join().unwrap();

    assert!(ok.load(Ordering::SeqCst) > 0);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "connections failed during {flips} updates"
    );
    for name in ["drop_backend_missing", "no_backend"] {
        assert_eq!(node.counter(name).unwrap(), 0, "{name}");
    }
    // Both banks were used, and the slots of the idle one were not left growing.
    let lb = node.seinectl_json(&["bpf", "lb", "list"]).unwrap();
    assert_eq!(lb[0]["backends"].as_array().unwrap().len(), 3);
}

#[test]
fn a_direct_connection_from_a_port_used_through_a_service_gets_its_own_replies() {
    let node = ready_node("ru", 1);
    upsert(&node, "10.96.6.1:80/tcp", &["backend-1"], &[]);
    let backend: SocketAddr = (node.pod("backend-1").ip, PORT).into();
    let client = node.pod("client").ip;
    let result = node
        .pod("client")
        .run(move || -> std::io::Result<(String, String)> {
            use socket2::{Domain, Socket, Type};
            let local: SocketAddr = (client, 40_000).into();
            let get = |to: SocketAddr| -> std::io::Result<String> {
                let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
                sock.set_reuse_address(true)?;
                sock.bind(&local.into())?;
                sock.connect_timeout(&to.into(), Duration::from_secs(3))?;
                let mut stream: TcpStream = sock.into();
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut response = String::new();
                stream.read_to_string(&mut response)?;
                // Close with a reset, so the same port is free at once.
                socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
                Ok(response)
            };
            Ok((get(vip("10.96.6.1:80"))?, get(backend)?))
        })
        .unwrap();
    let (through_vip, direct) = result.expect("both connections from port 40000");
    assert!(through_vip.ends_with("backend-1\n"), "{through_vip}");
    assert!(direct.ends_with("backend-1\n"), "{direct}");
    assert_eq!(node.counter("ct_tuple_reused").unwrap(), 1);
}

#[test]
fn agent_cleanup_removes_its_filters_and_pins() {
    let mut node = ready_node("cu", 1);
    let host_if = node.pod("client").host_if.clone();
    let filters = node
        .ns
        .exec("tc", &["filter", "show", "dev", &host_if, "ingress"])
        .unwrap();
    assert!(filters.contains("seine_from_pod"), "{filters}");
    node.stop_agent().unwrap();
    node.cleanup_agent().unwrap();
    for dir in ["ingress", "egress"] {
        let filters = node
            .ns
            .exec("tc", &["filter", "show", "dev", &host_if, dir])
            .unwrap();
        assert!(!filters.contains("seine_"), "{dir}: {filters}");
    }
    assert!(
        !node.bpffs_dir.exists(),
        "pins left under {}",
        node.bpffs_dir.display()
    );
}

/// Sends raw Ethernet frames out of the pod's eth0 (an AF_PACKET socket opened in the pod).
fn send_raw_frames(node: &Node, pod: &str, frames: Vec<Vec<u8>>) {
    node.pod(pod)
        .run(move || {
            // SAFETY: plain socket calls on a descriptor this closure owns and closes.
            unsafe {
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let ifindex = libc::if_nametoindex(c"eth0".as_ptr());
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_ifindex = ifindex as i32;
                addr.sll_halen = 6;
                for frame in &frames {
                    let n = libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    assert_eq!(
                        n,
                        frame.len() as isize,
                        "{}",
                        std::io::Error::last_os_error()
                    );
                }
                libc::close(fd);
            }
        })
        .unwrap();
}

fn mac_of(ns: &seine_tests::Netns, dev: &str) -> [u8; 6] {
    let out = ns.ip(&["-o", "link", "show", dev]).unwrap();
    let text = out.split("link/ether ").nth(1).unwrap();
    let mut mac = [0u8; 6];
    for (i, byte) in text[..17].split(':').enumerate() {
        mac[i] = u8::from_str_radix(byte, 16).unwrap();
    }
    mac
}

#[test]
fn malformed_packets_are_counted_and_leave_the_datapath_working() {
    let node = ready_node("mf", 1);
    upsert(&node, "10.96.7.1:80/tcp", &["backend-1"], &[]);
    let client = node.pod("client");
    let mut eth = mac_of(&node.ns, &client.host_if).to_vec();
    eth.extend_from_slice(&mac_of(&client.ns, "eth0"));
    eth.extend_from_slice(&[0x08, 0x00]);
    let ip = |ver_ihl: u8, total: u16, proto: u8| -> Vec<u8> {
        let mut h = vec![
            ver_ihl,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            proto,
            0,
            0,
        ];
        h.extend_from_slice(&[10, 244, 0, 2, 10, 96, 7, 1]);
        h
    };
    let frame = |body: Vec<u8>| [eth.clone(), body].concat();
    let frames = vec![
        // TCP header cut after the ports.
        frame([ip(0x45, 24, 6), vec![0x9c, 0x40, 0, 80]].concat()),
        // An IPv4 header that claims 60 bytes of options it does not have.
        frame(ip(0x4f, 20, 6)),
        // Not version 4 behind an IPv4 ethertype.
        frame([ip(0x65, 28, 17), vec![0; 8]].concat()),
        // Only part of an IPv4 header.
        frame(vec![0x45, 0, 0]),
    ];
    send_raw_frames(&node, "client", frames);

    assert_eq!(node.counter("malformed").unwrap(), 4);
    assert_eq!(
        node.pod("client").http_get(vip("10.96.7.1:80")).unwrap(),
        "backend-1"
    );
}

#[test]
fn agent_refuses_pinned_maps_of_another_layout_with_a_clear_error() {
    let mut node = topology("ly", 0, PORT).unwrap();
    std::fs::create_dir_all(&node.bpffs_dir).unwrap();
    let pin = node.bpffs_dir.join("seine_services");
    seine_tests::sh(
        "bpftool",
        &[
            "map",
            "create",
            pin.to_str().unwrap(),
            "type",
            "hash",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "8",
            "name",
            "seine_services",
        ],
    )
    .unwrap();
    let err = node.start_agent(&["--datapath", "ebpf"]).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("exited with exit status: 1"), "{text}");
    assert!(
        text.contains("has another layout") && text.contains("--cleanup"),
        "{text}"
    );
}
