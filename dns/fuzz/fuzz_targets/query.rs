//! The query path with arbitrary bytes as the query: the handler seine-dns's listeners use, over
//! a cluster view with ClusterIP, headless and ExternalName services, endpoints and pods, behind
//! the cache and loadbalance, as the kubeadm Corefile sets it up. A message shorter than a header
//! is dropped; anything else gets an answer that parses to its last byte, is a response, carries
//! the query's ID and fits a UDP client (512 bytes without EDNS0, 4096 at most). Never a panic.

#![no_main]

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{Arc, OnceLock},
};

use hickory_proto::{
    op::{Message, MessageType},
    serialize::binary::{BinDecodable as _, BinDecoder},
};
use libfuzzer_sys::fuzz_target;
use seine_dns::{
    cluster::{ClusterView, Endpoint, Port, Service, ServiceKind},
    corefile,
    handle::ViewHandle,
    metrics::Metrics,
    server::{answer_udp, Block, Handler, Pipeline},
};

const COREFILE: &str = ".:53 {
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    cache 30 {
        prefetch 2 10s 50%
        serve_stale 1h
    }
    loadbalance
}
";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("a literal address")
}

fn view() -> ClusterView {
    let mut v = ClusterView::default();
    for ns in ["default", "kube-system", "shop"] {
        v.namespaces.insert(ns.to_string());
    }
    let port = |name: &str, proto: &str, number: u16| Port {
        name: name.into(),
        protocol: proto.into(),
        port: number,
    };
    let mut add = |ns: &str, name: &str, kind: ServiceKind, ports: Vec<Port>| {
        v.services.insert(
            (ns.into(), name.into()),
            Service {
                namespace: ns.into(),
                name: name.into(),
                kind,
                ports,
            },
        );
    };
    add(
        "default",
        "kubernetes",
        ServiceKind::ClusterIp(vec![ip("10.96.0.1")]),
        vec![port("https", "TCP", 443)],
    );
    add(
        "kube-system",
        "kube-dns",
        ServiceKind::ClusterIp(vec![ip("10.96.0.10"), ip("fd00::a")]),
        vec![port("dns", "UDP", 53), port("dns-tcp", "TCP", 53)],
    );
    add("shop", "db", ServiceKind::Headless, vec![port("pg", "TCP", 5432)]);
    add(
        "shop",
        "ext",
        ServiceKind::ExternalName("www.example.com".into()),
        Vec::new(),
    );
    let endpoints = (1..=40)
        .map(|i| Endpoint {
            addresses: vec![ip(&format!("10.244.1.{i}"))],
            hostname: (i % 2 == 0).then(|| format!("db-{i}")),
            pod_name: Some(format!("db-{i}")),
            ready: i % 7 != 0,
            ports: vec![port("pg", "TCP", 5432)],
        })
        .collect();
    v.endpoints.insert(("shop".into(), "db".into()), endpoints);
    v.pod_ips.insert(
        "shop".into(),
        BTreeSet::from([ip("10.244.1.1"), ip("fd00::1:1")]),
    );
    v
}

fn state() -> &'static (tokio::runtime::Runtime, Handler) {
    static STATE: OnceLock<(tokio::runtime::Runtime, Handler)> = OnceLock::new();
    STATE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let servers = corefile::parse(COREFILE, 53, &|_| None).expect("the Corefile parses");
        let metrics = Arc::new(Metrics::new());
        let view = ViewHandle::fixed(view());
        let blocks = servers
            .iter()
            .map(|s| Arc::new(Block::new(s, Some(view.clone()), None, &metrics)))
            .collect();
        let handler = Handler::new(Pipeline { blocks }, metrics);
        (runtime, handler)
    })
}

fuzz_target!(|data: &[u8]| {
    let (runtime, handler) = state();
    let src = ([127, 0, 0, 1], 53000).into();
    let Some(answer) = runtime.block_on(answer_udp(handler.clone(), data.to_vec(), src)) else {
        assert!(data.len() < 12, "only a message without a whole header is dropped");
        return;
    };
    let mut decoder = BinDecoder::new(&answer);
    let message = Message::read(&mut decoder).expect("every answer parses");
    assert!(decoder.is_empty(), "nothing after the end of the message");
    assert_eq!(message.metadata.id, u16::from_be_bytes([data[0], data[1]]));
    assert_eq!(message.metadata.message_type, MessageType::Response);
    let limit = match Message::from_vec(data).ok().and_then(|q| q.edns) {
        Some(edns) => edns.max_payload().clamp(512, 4096),
        None => 512,
    };
    assert!(answer.len() <= usize::from(limit), "{} > {limit}", answer.len());
});
