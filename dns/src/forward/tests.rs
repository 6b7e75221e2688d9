use super::*;
use super::{health::*, metrics::*, transport::*, wire::*};
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::net::UdpSocket;

use crate::corefile::{Forward, Policy};
use hickory_proto::rr::RData;
use std::{
    fs,
    process::{Child, Command, Stdio},
    sync::atomic::AtomicU64,
};

static DIRS: AtomicU64 = AtomicU64::new(0);

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "seine-dns-forward-{what}-{}-{}",
            std::process::id(),
            DIRS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A port free on 127.0.0.1 for both UDP and TCP (at the time of asking).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

fn big_txt_strings() -> Vec<String> {
    (0..4)
        .map(|i| {
            let c = char::from(b'a' + i);
            std::iter::repeat_n(c, 200).collect()
        })
        .collect()
}

/// knotd serving `example.test.` on 127.0.0.1:`port`: `www` A 192.0.2.1, `big` TXT of four
/// 200-byte strings (more than 512 bytes). It closes TCP connections idle for 1 s. Killed (by its PID) and its directory removed on
/// drop.
struct Knot {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl Knot {
    async fn start_on(port: u16) -> Knot {
        let dir = TempDir::new("knot");
        let d = dir.0.display().to_string();
        let txt: Vec<String> = big_txt_strings()
            .into_iter()
            .map(|s| format!("\"{s}\""))
            .collect();
        let zone = format!(
            "$ORIGIN example.test.\n$TTL 300\n\
             @ IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 300\n\
             @ IN NS ns.example.test.\n\
             ns IN A 127.0.0.1\n\
             www IN A 192.0.2.1\n\
             big IN TXT {}\n",
            txt.join(" ")
        );
        fs::write(dir.0.join("example.test.zone"), zone).unwrap();
        let conf = format!(
            "server:\n    listen: 127.0.0.1@{port}\n    rundir: \"{d}\"\n    tcp-idle-timeout: 1\n\
             log:\n  - target: stderr\n    any: warning\n\
             database:\n    storage: \"{d}\"\n\
             zone:\n  - domain: example.test\n    file: \"{d}/example.test.zone\"\n"
        );
        fs::write(dir.0.join("knot.conf"), conf).unwrap();
        let log = fs::File::create(dir.0.join("knotd.log")).unwrap();
        let child = Command::new("/usr/sbin/knotd")
            .arg("-c")
            .arg(dir.0.join("knot.conf"))
            .arg("-s")
            .arg(dir.0.join("knot.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("knotd runs");
        let knot = Knot {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        knot.wait_ready().await;
        knot
    }

    async fn start() -> Knot {
        Self::start_on(free_port()).await
    }

    async fn wait_ready(&self) {
        let probe = query("example.test.", RecordType::SOA, 7, false);
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..100 {
            let _ = socket.send_to(&probe, self.addr).await;
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf)).await
            {
                if Message::from_vec(&buf[..n]).is_ok_and(|m| m.answers.len() == 1) {
                    return;
                }
            }
        }
        let log = fs::read_to_string(self.dir.0.join("knotd.log")).unwrap_or_default();
        panic!("knotd on {} did not answer: {log}", self.addr);
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn query(name: &str, rtype: RecordType, id: u16, edns: bool) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if edns {
        m.set_edns(hickory_proto::op::Edns::new());
    }
    m.to_vec().unwrap()
}

fn config(to: Vec<String>) -> Forward {
    Forward::defaults(".".into(), to)
}

fn counter(f: &Family<ToLabels, Counter>, to: SocketAddr) -> u64 {
    f.get_or_create(&ToLabels { to: to.to_string() }).get()
}

fn conns(f: &Family<ProxyConnLabels, Counter>, to: SocketAddr, proto: &'static str) -> u64 {
    f.get_or_create(&ProxyConnLabels {
        proxy_name: PROXY_NAME,
        to: to.to_string(),
        proto,
    })
    .get()
}

fn a_answer(wire: &[u8], id: u16) -> Message {
    let m = Message::from_vec(wire).unwrap();
    assert_eq!(m.metadata.id, id);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert_eq!(m.answers.len(), 1, "{m:?}");
    match &m.answers[0].data {
        RData::A(a) => assert_eq!(a.0, Ipv4Addr::new(192, 0, 2, 1)),
        other => panic!("not an A: {other:?}"),
    }
    m
}

/// A UDP socket on 127.0.0.1 that receives and never answers.
fn silent_upstream() -> std::net::UdpSocket {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
}

#[tokio::test]
async fn forwards_a_query_and_restores_the_id() {
    let knot = Knot::start().await;
    let metrics = ForwardMetrics::new();
    let f = Forwarder::new(&config(vec![knot.addr.to_string()]), metrics.clone()).unwrap();
    let wire = query("www.example.test.", RecordType::A, 0xbeef, true);
    let answer = f.exchange(&wire, false).await.unwrap();
    a_answer(&answer, 0xbeef);
    assert_eq!(counter(&metrics.requests, knot.addr), 1);
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "udp"), 1);
    let noerror = ToRcodeLabels {
        to: knot.addr.to_string(),
        rcode: "NOERROR".into(),
    };
    assert_eq!(metrics.responses.get_or_create(&noerror).get(), 1);

    // NXDOMAIN comes back as it is, and is counted under its rcode.
    let wire = query("nope.example.test.", RecordType::A, 4, false);
    let answer = Message::from_vec(&f.exchange(&wire, false).await.unwrap()).unwrap();
    assert_eq!(answer.metadata.id, 4);
    assert_eq!(
        answer.metadata.response_code,
        hickory_proto::op::ResponseCode::NXDomain
    );
    let nxdomain = ToRcodeLabels {
        to: knot.addr.to_string(),
        rcode: "NXDOMAIN".into(),
    };
    assert_eq!(metrics.responses.get_or_create(&nxdomain).get(), 1);

    // Exported under CoreDNS's names.
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let to = knot.addr.to_string();
    for line in [
        format!("coredns_forward_requests_total{{to=\"{to}\"}} 2"),
        format!("coredns_forward_responses_total{{to=\"{to}\",rcode=\"NOERROR\"}} 1"),
        format!("coredns_forward_request_duration_seconds_count{{to=\"{to}\",rcode=\"NXDOMAIN\"}} 1"),
        format!("coredns_proxy_request_duration_seconds_count{{proxy_name=\"forward\",to=\"{to}\",rcode=\"NOERROR\"}} 1"),
        format!("coredns_proxy_conn_cache_misses_total{{proxy_name=\"forward\",to=\"{to}\",proto=\"udp\"}} 2"),
        "coredns_forward_healthcheck_broken_total 0".to_string(),
        "coredns_forward_max_concurrent_rejects_total 0".to_string(),
    ] {
        assert!(text.contains(&line), "{line} not in:\n{text}");
    }
    // prometheus-client adds the final period itself.
    assert!(
        text.contains("# HELP coredns_forward_requests Counter of requests made per upstream.\n")
    );
}

#[tokio::test]
async fn truncated_udp_answer_is_asked_again_over_tcp() {
    let knot = Knot::start().await;
    let metrics = ForwardMetrics::new();
    let f = Forwarder::new(&config(vec![knot.addr.to_string()]), metrics.clone()).unwrap();

    // Without EDNS knot truncates the 800-byte TXT over UDP.
    let wire = query("big.example.test.", RecordType::TXT, 0x1234, false);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&wire, knot.addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = socket.recv_from(&mut buf).await.unwrap();
    assert!(truncated(&buf[..n]), "knot truncates over UDP");

    let answer = f.exchange(&wire, false).await.unwrap();
    assert!(answer.len() > 512);
    let m = Message::from_vec(&answer).unwrap();
    assert_eq!(m.metadata.id, 0x1234);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 1);
    match &m.answers[0].data {
        RData::TXT(txt) => {
            let got: Vec<String> = txt
                .txt_data
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            assert_eq!(got, big_txt_strings());
        }
        other => panic!("not a TXT: {other:?}"),
    }
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "udp"), 1);
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "tcp"), 1);
    assert_eq!(counter(&metrics.requests, knot.addr), 2);
}

#[tokio::test]
async fn force_tcp_reuses_the_connection_and_client_protocol_is_followed() {
    let knot = Knot::start().await;
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![format!("dns://{}", knot.addr)]);
    cfg.force_tcp = true;
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    for id in [1, 2, 3] {
        let wire = query("www.example.test.", RecordType::A, id, false);
        a_answer(&f.exchange(&wire, false).await.unwrap(), id);
    }
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "tcp"), 1);
    assert_eq!(conns(&metrics.proxy_conn_cache_hits, knot.addr, "tcp"), 2);
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "udp"), 0);

    // A client over TCP is forwarded over TCP...
    let metrics = ForwardMetrics::new();
    let f = Forwarder::new(&config(vec![knot.addr.to_string()]), metrics.clone()).unwrap();
    a_answer(
        &f.exchange(&query("www.example.test.", RecordType::A, 9, false), true)
            .await
            .unwrap(),
        9,
    );
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "tcp"), 1);
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "udp"), 0);

    // ...unless prefer_udp.
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![knot.addr.to_string()]);
    cfg.prefer_udp = true;
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    a_answer(
        &f.exchange(&query("www.example.test.", RecordType::A, 10, false), true)
            .await
            .unwrap(),
        10,
    );
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "tcp"), 0);
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "udp"), 1);
}

#[tokio::test]
async fn expired_tcp_connections_are_not_reused() {
    let knot = Knot::start().await;
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![knot.addr.to_string()]);
    cfg.force_tcp = true;
    cfg.expire = Duration::from_millis(100);
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    let wire = query("www.example.test.", RecordType::A, 5, false);
    a_answer(&f.exchange(&wire, false).await.unwrap(), 5);
    tokio::time::sleep(Duration::from_millis(250)).await;
    a_answer(&f.exchange(&wire, false).await.unwrap(), 5);
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "tcp"), 2);
    assert_eq!(conns(&metrics.proxy_conn_cache_hits, knot.addr, "tcp"), 0);
}

#[tokio::test]
async fn a_cached_connection_the_upstream_closed_is_replaced() {
    let knot = Knot::start().await;
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![knot.addr.to_string()]);
    cfg.force_tcp = true;
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    let wire = query("www.example.test.", RecordType::A, 6, false);
    a_answer(&f.exchange(&wire, false).await.unwrap(), 6);
    // knot closes it after 1 s idle; it is still within `expire` (10 s) here.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    a_answer(&f.exchange(&wire, false).await.unwrap(), 6);
    assert_eq!(conns(&metrics.proxy_conn_cache_hits, knot.addr, "tcp"), 1);
    assert_eq!(conns(&metrics.proxy_conn_cache_misses, knot.addr, "tcp"), 2);
    assert_eq!(
        f.fails_of(knot.addr),
        Some(0),
        "not a failure of the upstream"
    );
}

#[test]
fn resolv_conf_and_addresses() {
    let dir = TempDir::new("resolv");
    let path = dir.0.join("resolv.conf");
    fs::write(
        &path,
        "# generated\n\
         ; another comment\n\
         search default.svc.cluster.local svc.cluster.local\n\
         nameserver 127.0.0.1   # the local one\n\
         nameserver ::1\n\
         nameserver fe80::1%eth0\n\
         nameserver not-an-ip\n\
         nameserver\n\
         options ndots:5 timeout:1\n\
         garbage line here\n\
         nameserver 127.0.0.1\n",
    )
    .unwrap();
    let p = path.display().to_string();
    let f = Forwarder::new(&config(vec![p.clone()]), ForwardMetrics::new()).unwrap();
    assert_eq!(
        f.upstreams(),
        vec![
            "127.0.0.1:53".parse::<SocketAddr>().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );

    // Addresses in every accepted form, after the file's.
    let to = vec![
        p,
        "8.8.8.8".into(),
        "8.8.4.4:5353".into(),
        "dns://1.2.3.4:5300".into(),
        "dns://9.9.9.9".into(),
        "[2001:db8::1]:53".into(),
        "2001:db8::2".into(),
        "[2001:db8::3]".into(),
    ];
    let f = Forwarder::new(&config(to), ForwardMetrics::new()).unwrap();
    let want: Vec<SocketAddr> = [
        "127.0.0.1:53",
        "[::1]:53",
        "8.8.8.8:53",
        "8.8.4.4:5353",
        "1.2.3.4:5300",
        "9.9.9.9:53",
        "[2001:db8::1]:53",
        "[2001:db8::2]:53",
        "[2001:db8::3]:53",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    assert_eq!(f.upstreams(), want);

    for bad in [
        "tls://1.1.1.1",
        "https://dns.example",
        "dns.example.com",
        "1.2.3.4:x",
        "",
    ] {
        match Forwarder::new(&config(vec![bad.into()]), ForwardMetrics::new()) {
            Err(ForwardError::BadAddress(a)) => assert_eq!(a, bad),
            other => panic!("{bad}: {other:?}"),
        }
    }
    let missing = dir.0.join("nope.conf").display().to_string();
    assert!(matches!(
        Forwarder::new(&config(vec![missing]), ForwardMetrics::new()),
        Err(ForwardError::ResolvConf { .. })
    ));
    let empty = dir.0.join("empty.conf");
    fs::write(&empty, "# nothing\nsearch x\n").unwrap();
    assert!(matches!(
        Forwarder::new(
            &config(vec![empty.display().to_string()]),
            ForwardMetrics::new()
        ),
        Err(ForwardError::NoUpstreams)
    ));
    assert!(matches!(
        Forwarder::new(&config(Vec::new()), ForwardMetrics::new()),
        Err(ForwardError::NoUpstreams)
    ));
    let many: Vec<String> = (1..=16).map(|i| format!("10.0.0.{i}")).collect();
    assert!(matches!(
        Forwarder::new(&config(many), ForwardMetrics::new()),
        Err(ForwardError::TooManyUpstreams(16))
    ));
}

#[test]
fn matches_from_and_except() {
    let mut cfg = config(vec!["127.0.0.1".into()]);
    cfg.from = "example.org.".into();
    cfg.except = vec!["a.example.org.".into(), "b.example.org.".into()];
    let f = Forwarder::new(&cfg, ForwardMetrics::new()).unwrap();
    assert!(f.matches("example.org."));
    assert!(f.matches("www.example.org."));
    assert!(f.matches("WWW.Example.ORG"));
    assert!(f.matches("xa.example.org."));
    assert!(!f.matches("a.example.org."));
    assert!(!f.matches("x.a.example.org."));
    assert!(!f.matches("b.example.org."));
    assert!(!f.matches("notexample.org."));
    assert!(!f.matches("org."));
    assert!(!f.matches("."));

    let mut cfg = config(vec!["127.0.0.1".into()]);
    cfg.except = vec!["cluster.local.".into()];
    let f = Forwarder::new(&cfg, ForwardMetrics::new()).unwrap();
    assert!(f.matches("."));
    assert!(f.matches("example.com."));
    assert!(!f.matches("kubernetes.default.svc.cluster.local."));
    assert!(f.matches("local."));

    // As CoreDNS: FROM itself is forwarded even when an except covers it.
    let mut cfg = config(vec!["127.0.0.1".into()]);
    cfg.from = "example.org.".into();
    cfg.except = vec!["example.org.".into()];
    let f = Forwarder::new(&cfg, ForwardMetrics::new()).unwrap();
    assert!(f.matches("example.org."));
    assert!(!f.matches("www.example.org."));
}

#[test]
fn policies_order_the_upstreams() {
    let to: Vec<String> = (1..=4).map(|i| format!("10.0.0.{i}")).collect();
    let mut cfg = config(to);
    cfg.policy = Policy::Sequential;
    let f = Forwarder::new(&cfg, ForwardMetrics::new()).unwrap();
    for _ in 0..3 {
        assert_eq!(f.order(), vec![0, 1, 2, 3]);
    }
    cfg.policy = Policy::RoundRobin;
    let f = Forwarder::new(&cfg, ForwardMetrics::new()).unwrap();
    assert_eq!(f.order(), vec![0, 1, 2, 3]);
    assert_eq!(f.order(), vec![1, 0, 2, 3]);
    assert_eq!(f.order(), vec![2, 0, 1, 3]);
    assert_eq!(f.order(), vec![3, 0, 1, 2]);
    assert_eq!(f.order(), vec![0, 1, 2, 3]);
    cfg.policy = Policy::Random;
    let f = Forwarder::new(&cfg, ForwardMetrics::new()).unwrap();
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..200 {
        let mut o = f.order();
        firsts.insert(o[0]);
        o.sort();
        assert_eq!(o, vec![0, 1, 2, 3]);
    }
    assert_eq!(firsts.len(), 4);
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    for bad in [&[][..], &[1, 2, 3][..], &[0u8; 12][..], &[0xff; 40][..]] {
        assert!(matches!(parse_query(bad), Err(ForwardError::BadQuery(_))));
    }
    let q = query("www.example.test.", RecordType::A, 77, false);
    // A response is not a query.
    let mut resp = q.clone();
    resp[2] |= 0x80;
    assert!(matches!(parse_query(&resp), Err(ForwardError::BadQuery(_))));
    // Cut in the question.
    assert!(matches!(
        parse_query(&q[..q.len() - 3]),
        Err(ForwardError::BadQuery(_))
    ));

    let parsed = parse_query(&q).unwrap();
    let expect = Expect {
        id: 77,
        question: Some(&parsed.question),
    };
    assert_eq!(mismatch(&resp, &expect), None);
    assert!(mismatch(&q, &expect).is_some(), "not a response");
    assert!(mismatch(&with_id(&resp, 78), &expect).is_some());
    assert!(mismatch(&resp[..5], &expect).is_some());
    assert!(mismatch(&resp[..resp.len() - 2], &expect).is_some());
    let other = {
        let mut o = query("www.example.test.", RecordType::AAAA, 77, false);
        o[2] |= 0x80;
        o
    };
    assert!(mismatch(&other, &expect).is_some());
    // The question matches case-insensitively.
    let upper = {
        let mut o = query("WWW.EXAMPLE.test.", RecordType::A, 77, false);
        o[2] |= 0x80;
        o
    };
    assert_eq!(mismatch(&upper, &expect), None);
    // An error answer without a question is taken; a NOERROR one is not.
    let mut bare = vec![0u8; 12];
    bare[..2].copy_from_slice(&77u16.to_be_bytes());
    bare[2] = 0x80;
    assert!(mismatch(&bare, &expect).is_some());
    bare[3] = 1; // FORMERR
    assert_eq!(mismatch(&bare, &expect), None);

    // rcode reading never panics on junk, and reads EDNS's extended bits.
    for junk in [&[][..], &[0xff][..], &[0xff; 30][..], &resp[..13]] {
        let _ = response_rcode(junk);
    }
    let mut badvers = Message::new(1, MessageType::Response, OpCode::Query);
    badvers.add_query(Query::query(Name::root(), RecordType::NS));
    badvers.metadata.response_code = hickory_proto::op::ResponseCode::BADVERS;
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_rcode_high(hickory_proto::op::ResponseCode::BADVERS.high());
    badvers.set_edns(edns);
    let wire = badvers.to_vec().unwrap();
    assert_eq!(response_rcode(&wire), 16);
    assert_eq!(rcode_name(response_rcode(&wire)), "BADSIG");
    assert_eq!(rcode_name(3), "NXDOMAIN");
    assert_eq!(rcode_name(4000), "4000");
}

#[tokio::test]
async fn failover_to_the_next_upstream_and_down_after_max_fails() {
    let knot = Knot::start().await;
    let silent = silent_upstream();
    let dead = silent.local_addr().unwrap();
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![dead.to_string(), knot.addr.to_string()]);
    cfg.policy = Policy::Sequential;
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    let wire = query("www.example.test.", RecordType::A, 21, false);

    // The silent one first: a read timeout, then the next one answers.
    let start = Instant::now();
    a_answer(&f.exchange(&wire, false).await.unwrap(), 21);
    let took = start.elapsed();
    assert!(took >= READ_TIMEOUT && took < EXCHANGE_DEADLINE, "{took:?}");
    assert_eq!(f.fails_of(dead), Some(1));
    assert!(!f.is_down(dead));
    assert_eq!(f.fails_of(knot.addr), Some(0));

    a_answer(&f.exchange(&wire, false).await.unwrap(), 21);
    assert_eq!(f.fails_of(dead), Some(2));
    assert!(f.is_down(dead), "down after max_fails 2");
    assert_eq!(counter(&metrics.requests, dead), 2);

    // Down: skipped, no waiting.
    let start = Instant::now();
    a_answer(&f.exchange(&wire, false).await.unwrap(), 21);
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(counter(&metrics.requests, dead), 2);
    assert_eq!(counter(&metrics.requests, knot.addr), 3);
    drop(silent);
}

#[tokio::test]
async fn all_down_falls_back_to_a_random_upstream() {
    let knot = Knot::start().await;
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![knot.addr.to_string()]);
    cfg.max_fails = 1;
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    f.set_fails(knot.addr, 5);
    assert!(f.is_down(knot.addr));
    let wire = query("www.example.test.", RecordType::A, 31, false);
    a_answer(&f.exchange(&wire, false).await.unwrap(), 31);
    assert_eq!(metrics.healthcheck_broken.get(), 1);
    assert_eq!(
        f.fails_of(knot.addr),
        Some(0),
        "a success resets the failures"
    );
    assert!(!f.is_down(knot.addr));
}

#[tokio::test]
async fn health_checks_mark_down_and_recover() {
    let knot = Knot::start().await;
    // Nothing listens here yet: refused at once.
    let port = free_port();
    let dead = SocketAddr::from(([127, 0, 0, 1], port));
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![dead.to_string(), knot.addr.to_string()]);
    cfg.policy = Policy::Sequential;
    cfg.health_check = Duration::from_millis(100);
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    let checks = f.spawn_health_checks();
    let wire = query("www.example.test.", RecordType::A, 41, false);

    // One failed exchange, then the health checks fail too: down.
    a_answer(&f.exchange(&wire, false).await.unwrap(), 41);
    let start = Instant::now();
    while !f.is_down(dead) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never marked down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(counter(&metrics.healthcheck_failures, dead) >= 1);
    let hc = metrics
        .proxy_healthcheck_failures
        .get_or_create(&ProxyToLabels {
            proxy_name: PROXY_NAME,
            to: dead.to_string(),
        })
        .get();
    assert!(hc >= 1);
    assert_eq!(
        f.fails_of(knot.addr),
        Some(0),
        "only failing upstreams are checked"
    );
    let asked = counter(&metrics.requests, dead);
    a_answer(&f.exchange(&wire, false).await.unwrap(), 41);
    assert_eq!(counter(&metrics.requests, dead), asked, "down: skipped");

    // It comes up: the health check (REFUSED for `. NS` is fine) brings it back.
    let revived = Knot::start_on(port).await;
    let start = Instant::now();
    while f.is_down(dead) || f.fails_of(dead) != Some(0) {
        assert!(start.elapsed() < Duration::from_secs(5), "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a_answer(&f.exchange(&wire, false).await.unwrap(), 41);
    assert_eq!(counter(&metrics.requests, dead), asked + 1, "first again");

    // The task ends with the forwarder.
    drop(f);
    tokio::time::timeout(Duration::from_secs(3), checks)
        .await
        .expect("health checks stop when the forwarder is dropped")
        .unwrap();
    drop(revived);
}

#[tokio::test]
async fn health_check_over_udp_and_tcp() {
    let knot = Knot::start().await;
    // knot REFUSEs `. NS` (not its zone): still an answer, so healthy.
    health_check(knot.addr, false).await.unwrap();
    health_check(knot.addr, true).await.unwrap();
    let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
    assert!(matches!(
        health_check(closed, false).await,
        Err(Failure::Io(_))
    ));
    assert!(matches!(
        health_check(closed, true).await,
        Err(Failure::Io(_))
    ));
    let silent = silent_upstream();
    let start = Instant::now();
    assert!(matches!(
        health_check(silent.local_addr().unwrap(), false).await,
        Err(Failure::Timeout)
    ));
    assert!(start.elapsed() < HEALTH_CHECK_TIMEOUT + Duration::from_millis(500));
}

#[tokio::test]
async fn max_concurrent_rejects() {
    let silent = silent_upstream();
    let addr = silent.local_addr().unwrap();
    let metrics = ForwardMetrics::new();
    let mut cfg = config(vec![addr.to_string()]);
    cfg.max_concurrent = Some(1);
    let f = Forwarder::new(&cfg, metrics.clone()).unwrap();
    let wire = query("www.example.test.", RecordType::A, 51, false);
    let first = {
        let f = f.clone();
        let wire = wire.clone();
        tokio::spawn(async move { f.exchange(&wire, false).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    assert!(matches!(
        f.exchange(&wire, false).await,
        Err(ForwardError::MaxConcurrent)
    ));
    assert!(start.elapsed() < Duration::from_millis(100));
    assert_eq!(metrics.max_concurrent_rejects.get(), 1);
    first.abort();
    let _ = first.await;
    // The aborted one no longer counts: the next is let through (and times out).
    let start = Instant::now();
    let err = f.exchange(&wire, false).await.unwrap_err();
    assert!(
        matches!(err, ForwardError::Timeout { upstream } if upstream == addr),
        "{err:?}"
    );
    assert!(start.elapsed() <= EXCHANGE_DEADLINE + Duration::from_millis(500));
    assert_eq!(metrics.max_concurrent_rejects.get(), 1);
    drop(silent);
}
