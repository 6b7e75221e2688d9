//! A property of the query path: over random clusters (ClusterIP, headless and ExternalName
//! services, endpoints with and without hostnames, both families, many ports), every answer to
//! every question a client may ask, over UDP with and without EDNS0 and over TCP, is one
//! well-formed message: it parses to its last byte, its section counts are the records it holds,
//! and it fits the client's limit. A UDP answer that was cut is the TCP answer's records up to a
//! record boundary, in order, with TC set; one that was not cut is the whole answer without TC.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use hickory_proto::{
    op::Message,
    rr::Record,
    serialize::binary::{BinDecodable as _, BinDecoder},
};
use hickory_server::net::xfer::Protocol;
use rand::{rngs::StdRng, Rng as _, SeedableRng as _};
use seine_dns::{
    cluster::{ClusterView, Endpoint, Port, Service, ServiceKind},
    corefile,
    handle::ViewHandle,
    metrics::Metrics,
    server::{answer, Block, Handler, Pipeline},
};

const COREFILE: &str = ".:53 {
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        ttl 30
    }
}
";

const NAMESPACES: [&str; 3] = ["default", "shop", "kube-system"];

fn random_ip(rng: &mut StdRng, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x10,
            0,
            0,
            0,
            0,
            rng.random(),
            rng.random(),
        ))
    } else {
        IpAddr::V4(Ipv4Addr::new(10, 244, rng.random(), rng.random()))
    }
}

fn random_ports(rng: &mut StdRng) -> Vec<Port> {
    (0..rng.random_range(0..5))
        .map(|i| Port {
            name: if i == 0 && rng.random_bool(0.3) {
                String::new()
            } else {
                format!("port-{i}")
            },
            protocol: if rng.random_bool(0.5) { "TCP" } else { "UDP" }.into(),
            port: rng.random_range(1..=65535),
        })
        .collect()
}

/// A cluster of up to eight services; headless ones with up to 80 endpoints.
fn random_view(rng: &mut StdRng) -> ClusterView {
    let mut v = ClusterView::default();
    v.namespaces.extend(NAMESPACES.map(String::from));
    for i in 0..rng.random_range(1..8) {
        let namespace = NAMESPACES[rng.random_range(0..NAMESPACES.len())].to_string();
        let name = format!("svc-{i}");
        let kind = match rng.random_range(0..4) {
            0 => ServiceKind::ClusterIp(
                (0..rng.random_range(1..=2))
                    .map(|f| random_ip(rng, f == 1))
                    .collect(),
            ),
            1 => ServiceKind::ExternalName(format!("host-{i}.example.org")),
            _ => ServiceKind::Headless,
        };
        let ports = random_ports(rng);
        if matches!(kind, ServiceKind::Headless) {
            let endpoints = (0..rng.random_range(0..80))
                .map(|e| Endpoint {
                    addresses: {
                        let v6 = rng.random_bool(0.3);
                        vec![random_ip(rng, v6)]
                    },
                    hostname: rng
                        .random_bool(0.5)
                        .then(|| format!("a-rather-long-hostname-for-pod-{e}")),
                    pod_name: Some(format!("pod-{e}")),
                    ready: rng.random_bool(0.9),
                    ports: ports.clone(),
                })
                .collect();
            v.endpoints
                .insert((namespace.clone(), name.clone()), endpoints);
        }
        v.services.insert(
            (namespace.clone(), name.clone()),
            Service {
                namespace,
                name,
                kind,
                ports,
            },
        );
    }
    let ips: BTreeSet<IpAddr> = v
        .endpoints
        .values()
        .flatten()
        .flat_map(|e| e.addresses.clone())
        .collect();
    v.pod_ips.insert("shop".into(), ips);
    v.index_addresses();
    v
}

/// The names a client asks about in `view`, with the types it asks for.
fn questions(view: &ClusterView) -> Vec<(String, u16)> {
    let mut names = Vec::new();
    for service in view.services.values() {
        let base = format!("{}.{}.svc.cluster.local", service.name, service.namespace);
        for port in &service.ports {
            let proto = port.protocol.to_ascii_lowercase();
            names.push((format!("_{}._{proto}.{base}", port.name), 33));
        }
        for qtype in [1, 28, 33, 255, 16] {
            names.push((base.clone(), qtype));
        }
    }
    for ((namespace, service), endpoints) in &view.endpoints {
        for e in endpoints.iter().take(3) {
            if let Some(host) = &e.hostname {
                names.push((format!("{host}.{service}.{namespace}.svc.cluster.local"), 1));
            }
            for ip in &e.addresses {
                names.push((reverse(*ip), 12));
            }
        }
    }
    names.push(("svc.cluster.local".into(), 33));
    names.push(("cluster.local".into(), 6));
    names.push(("nothing.shop.svc.cluster.local".into(), 1));
    names
}

fn reverse(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let hex: String = v6.octets().iter().map(|b| format!("{b:02x}")).collect();
            let nibbles: Vec<String> = hex.chars().rev().map(String::from).collect();
            format!("{}.ip6.arpa", nibbles.join("."))
        }
    }
}

fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend(id.to_be_bytes());
    q.extend([1, 0]);
    q.extend(1u16.to_be_bytes());
    q.extend([0, 0, 0, 0]);
    q.extend(u16::from(edns.is_some()).to_be_bytes());
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    q.extend(qtype.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    if let Some(size) = edns {
        q.push(0);
        q.extend(41u16.to_be_bytes());
        q.extend(size.to_be_bytes());
        q.extend([0, 0, 0, 0, 0, 0]);
    }
    q
}

/// Parses `bytes` as exactly one message whose header counts are its records.
fn parse_whole(bytes: &[u8], what: &str) -> Message {
    let mut decoder = BinDecoder::new(bytes);
    let message = Message::read(&mut decoder).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        decoder.is_empty(),
        "{what}: {} bytes after the end of the message",
        decoder.len()
    );
    let count = |i: usize| usize::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
    assert_eq!(count(6), message.answers.len(), "{what}: answer count");
    assert_eq!(
        count(8),
        message.authorities.len(),
        "{what}: authority count"
    );
    assert_eq!(
        count(10),
        message.additionals.len() + usize::from(message.edns.is_some()),
        "{what}: additional count"
    );
    message
}

fn records(m: &Message) -> Vec<&Record> {
    m.answers
        .iter()
        .chain(&m.authorities)
        .chain(&m.additionals)
        .collect()
}

#[test]
fn every_answer_parses_back_and_fits_the_client() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let servers = corefile::parse(COREFILE, 53, &|_| None).unwrap();
    let src: SocketAddr = ([127, 0, 0, 1], 40000).into();
    let mut truncated = 0;
    let mut checked = 0;
    for seed in 0..60u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let view = random_view(&mut rng);
        let metrics = Arc::new(Metrics::new());
        let handle = ViewHandle::fixed(view.clone());
        let blocks = servers
            .iter()
            .map(|s| Arc::new(Block::new(s, Some(handle.clone()), None, &metrics)))
            .collect();
        let handler = Handler::new(Pipeline { blocks }, metrics);
        for (i, (name, qtype)) in questions(&view).into_iter().enumerate() {
            let id = i as u16;
            let ask = |edns: Option<u16>, protocol: Protocol| {
                runtime
                    .block_on(answer(
                        handler.clone(),
                        query(id, &name, qtype, edns),
                        src,
                        protocol,
                    ))
                    .unwrap_or_else(|| panic!("seed {seed}: no answer to {name} {qtype}"))
            };
            let tcp_bytes = ask(None, Protocol::Tcp);
            let what = format!("seed {seed}: {name} type {qtype} over TCP");
            let whole = parse_whole(&tcp_bytes, &what);
            assert!(!whole.metadata.truncation, "{what}: TC set");
            for edns in [
                None,
                Some(512),
                Some(1232),
                Some(rng.random_range(512..=4096)),
            ] {
                let bytes = ask(edns, Protocol::Udp);
                let what = format!("seed {seed}: {name} type {qtype} over UDP, EDNS0 {edns:?}");
                let limit = usize::from(edns.unwrap_or(512));
                assert!(
                    bytes.len() <= limit,
                    "{what}: {} > {limit} bytes",
                    bytes.len()
                );
                let m = parse_whole(&bytes, &what);
                assert_eq!(m.metadata.id, id, "{what}");
                assert_eq!(
                    m.metadata.response_code, whole.metadata.response_code,
                    "{what}"
                );
                assert_eq!(m.edns.is_some(), edns.is_some(), "{what}: OPT record");
                let (got, all) = (records(&m), records(&whole));
                assert!(
                    got.len() <= all.len() && got[..] == all[..got.len()],
                    "{what}: not the whole answer's records in order"
                );
                assert_eq!(
                    m.metadata.truncation,
                    got.len() < all.len(),
                    "{what}: TC must say whether records were cut"
                );
                truncated += usize::from(m.metadata.truncation);
                checked += 1;
            }
        }
    }
    assert!(
        truncated > 10,
        "the clusters make answers that need cutting ({truncated})"
    );
    assert!(checked > 1000, "{checked} answers checked");
}
