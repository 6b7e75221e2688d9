//! PTR answers as CoreDNS's kubernetes plugin gives them, with the reverse zones written as the
//! cluster's CIDRs (`kubernetes cluster.local 10.96.0.0/12 10.244.0.0/16`): a cluster IP names its
//! service; an endpoint address names itself under every service it serves, once per service;
//! an address nothing has is NXDOMAIN with the reverse zone's SOA.

use std::{net::SocketAddr, sync::Arc};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, RecordType},
};
use hickory_server::net::xfer::Protocol;
use seine_dns::{
    cluster::{ip_to_reverse, ClusterView, Endpoint, Port, Service, ServiceKind},
    corefile,
    handle::ViewHandle,
    metrics::Metrics,
    server::{answer, Block, Handler, Pipeline},
};

const COREFILE: &str = ".:53 {
    kubernetes cluster.local 10.96.0.0/12 10.244.0.0/16 fd00:10:96::/112 {
        ttl 30
    }
}
";

fn service(namespace: &str, name: &str, kind: ServiceKind) -> Service {
    Service {
        namespace: namespace.into(),
        name: name.into(),
        kind,
        ports: vec![Port {
            name: "http".into(),
            protocol: "tcp".into(),
            port: 80,
        }],
    }
}

fn endpoint(ip: &str, hostname: Option<&str>) -> Endpoint {
    Endpoint {
        addresses: vec![ip.parse().unwrap()],
        hostname: hostname.map(String::from),
        pod_name: None,
        ready: true,
        ports: vec![Port {
            name: "http".into(),
            protocol: "tcp".into(),
            port: 8080,
        }],
    }
}

/// `web` (ClusterIP 10.96.0.20, fd00:10:96::20) and the headless `web-pods` both select the pod
/// at 10.244.1.5 (hostname `web-0` in the headless one); `other` shares nothing.
fn view() -> ClusterView {
    let mut v = ClusterView::default();
    v.namespaces.insert("shop".into());
    let web = ServiceKind::ClusterIp(vec![
        "10.96.0.20".parse().unwrap(),
        "fd00:10:96::20".parse().unwrap(),
    ]);
    for s in [
        service("shop", "web", web),
        service("shop", "web-pods", ServiceKind::Headless),
        service(
            "shop",
            "other",
            ServiceKind::ClusterIp(vec!["10.96.0.30".parse().unwrap()]),
        ),
    ] {
        v.services.insert((s.namespace.clone(), s.name.clone()), s);
    }
    v.endpoints.insert(
        ("shop".into(), "web".into()),
        vec![endpoint("10.244.1.5", None)],
    );
    v.endpoints.insert(
        ("shop".into(), "web-pods".into()),
        vec![endpoint("10.244.1.5", Some("web-0"))],
    );
    v.index_addresses();
    v
}

fn ask(handler: &Handler, name: &str) -> Message {
    let mut q = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 12, 0, 1]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let src: SocketAddr = ([127, 0, 0, 1], 40000).into();
    let bytes = runtime
        .block_on(answer(handler.clone(), q, src, Protocol::Tcp))
        .unwrap_or_else(|| panic!("no answer to {name}"));
    Message::from_vec(&bytes).unwrap()
}

fn ptr_targets(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::PTR(p) => p.0.to_string(),
            other => panic!("not a PTR: {other:?}"),
        })
        .collect()
}

fn handler() -> Handler {
    let servers = corefile::parse(COREFILE, 53, &|_| None).unwrap();
    let metrics = Arc::new(Metrics::new());
    let handle = ViewHandle::fixed(view());
    let blocks = servers
        .iter()
        .map(|s| Arc::new(Block::new(s, Some(handle.clone()), None, &metrics)))
        .collect();
    Handler::new(Pipeline { blocks }, metrics)
}

#[test]
fn cluster_ips_name_their_service() {
    let h = handler();
    let m = ask(&h, "20.0.96.10.in-addr.arpa.");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(ptr_targets(&m), ["web.shop.svc.cluster.local."]);
    let v6 = ip_to_reverse("fd00:10:96::20".parse().unwrap());
    assert_eq!(ptr_targets(&ask(&h, &v6)), ["web.shop.svc.cluster.local."]);
}

#[test]
fn an_endpoint_of_several_services_has_one_name_per_service() {
    let m = ask(&handler(), "5.1.244.10.in-addr.arpa.");
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let mut targets = ptr_targets(&m);
    targets.sort();
    assert_eq!(
        targets,
        [
            "10-244-1-5.web.shop.svc.cluster.local.",
            "web-0.web-pods.shop.svc.cluster.local.",
        ]
    );
}

#[test]
fn an_address_nothing_has_is_nxdomain_with_the_reverse_zones_soa() {
    let h = handler();
    for (name, zone) in [
        ("9.9.244.10.in-addr.arpa.", "244.10.in-addr.arpa."),
        ("99.0.96.10.in-addr.arpa.", "96.10.in-addr.arpa."),
        ("1.2.100.10.in-addr.arpa.", "100.10.in-addr.arpa."),
    ] {
        let m = ask(&h, name);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty(), "{name}");
        let soa: Vec<_> = m
            .authorities
            .iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .map(|r| r.name.to_string())
            .collect();
        assert_eq!(soa, [zone], "{name}: SOA in the authority section");
    }
}
