//! seine-dns as a user runs it: `seine-dns -conf Corefile -dns.port N` against a real etcd and
//! seine-apiserver, asked with `dig` over UDP and TCP, forwarding to knotd on loopback. Objects are
//! made through the API; answers are read as dig prints them.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use seine_tests::{
    apiserver::ApiServer,
    dns::{dig, http_get, kubeadm_corefile, Dig, DnsPorts, Knot, SeineDns},
    etcd::Etcd,
};
use serde_json::{json, Value};

/// A zone for knotd: an A record and a TXT record too big for 512 bytes.
fn upstream_zone() -> String {
    let mut z = String::from(
        "$ORIGIN example.test.\n$TTL 300\n\
         @ SOA ns hostmaster 1 3600 600 86400 60\n@ NS ns\nns A 127.0.0.1\n\
         www A 192.0.2.10\nwww A 192.0.2.11\n",
    );
    for i in 0..12 {
        z.push_str(&format!("big TXT \"{i:02}-{}\"\n", "x".repeat(60)));
    }
    z
}

fn knot() -> Knot {
    Knot::start(&[("example.test.", upstream_zone())], None).unwrap()
}

/// Asks until `check` holds (up to 15 s); returns the last answer.
fn until(port: u16, args: &[&str], check: impl Fn(&Dig) -> bool) -> Dig {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let d = dig(port, args);
        if let Ok(d) = &d {
            if check(d) || Instant::now() > deadline {
                return d.clone();
            }
        } else if Instant::now() > deadline {
            panic!("dig {args:?}: {d:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn post(api: &ApiServer, path: &str, body: Value) -> Value {
    let (code, out) = api.post(path, &body).unwrap();
    assert_eq!(code, 201, "{out}");
    out
}

fn reverse(ip: &str) -> String {
    let ip: Ipv4Addr = ip.parse().unwrap();
    let [a, b, c, d] = ip.octets();
    format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
}

/// A Corefile without the cache, so answers follow the API at once.
fn live_corefile(ports: DnsPorts, kubeconfig: &str, extra: &str) -> String {
    format!(
        ".:{dns} {{
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    prometheus 127.0.0.1:{metrics}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods verified
        ttl 5
        {extra}
    }}
}}
",
        dns = ports.dns,
        health = ports.health,
        ready = ports.ready,
        metrics = ports.metrics,
    )
}

#[test]
fn the_kubeadm_corefile_serves_the_cluster_and_forwards_the_rest() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let upstream = knot();
    let ports = DnsPorts::pick().unwrap();
    let corefile = kubeadm_corefile(
        ports,
        &api.kubeconfig,
        &format!("127.0.0.1:{}", upstream.port),
    );
    let dns = SeineDns::start(ports, &corefile).unwrap();
    dns.wait_serving().unwrap();
    let p = ports.dns;

    // The API server's own service, authoritative, with the TTL from the Corefile.
    let a = dig(p, &["kubernetes.default.svc.cluster.local", "A"]).unwrap();
    assert_eq!(a.status, "NOERROR", "{}", a.text);
    assert_eq!(a.data("A"), ["10.96.0.1"]);
    assert!(a.flags.contains(&"aa".to_string()), "{:?}", a.flags);
    assert_eq!(a.answer[0].1, 30);
    // Case does not matter, and the answer (here from the cache, which the lowercase question
    // filled) keeps the question's case.
    let mixed = dig(p, &["KuBeRnEtEs.Default.SVC.cluster.LOCAL", "A"]).unwrap();
    assert_eq!(mixed.data("A"), ["10.96.0.1"]);
    assert_eq!(mixed.answer[0].0, "KuBeRnEtEs.Default.SVC.cluster.LOCAL.");
    // The schema version.
    let v = dig(p, &["dns-version.cluster.local", "TXT"]).unwrap();
    assert_eq!(v.data("TXT"), ["\"1.1.0\""]);
    // SRV for the named port of the kubernetes service.
    let srv = dig(
        p,
        &["_https._tcp.kubernetes.default.svc.cluster.local", "SRV"],
    )
    .unwrap();
    assert_eq!(
        srv.data("SRV"),
        ["0 100 443 kubernetes.default.svc.cluster.local."]
    );
    assert_eq!(srv.additional.iter().filter(|r| r.2 == "A").count(), 1);
    // PTR of the service address.
    let ptr = dig(p, &[&reverse("10.96.0.1"), "PTR"]).unwrap();
    assert_eq!(ptr.data("PTR"), ["kubernetes.default.svc.cluster.local."]);
    // pods insecure: any dashed address answers.
    let pod = dig(p, &["10-244-7-8.default.pod.cluster.local", "A"]).unwrap();
    assert_eq!(pod.data("A"), ["10.244.7.8"]);
    // A missing service: NXDOMAIN with the zone's SOA in the authority section.
    let nx = dig(p, &["nothing.default.svc.cluster.local", "A"]).unwrap();
    assert_eq!(nx.status, "NXDOMAIN");
    assert_eq!(nx.authority.len(), 1, "{}", nx.text);
    assert_eq!(nx.authority[0].0, "cluster.local.");
    assert_eq!(nx.authority[0].2, "SOA");
    assert!(
        nx.authority[0]
            .3
            .starts_with("ns.dns.cluster.local. hostmaster.cluster.local."),
        "{}",
        nx.text
    );
    // NODATA: the name exists, the type does not.
    let nodata = dig(p, &["kubernetes.default.svc.cluster.local", "AAAA"]).unwrap();
    assert_eq!(nodata.status, "NOERROR");
    assert!(nodata.answer.is_empty());
    assert_eq!(nodata.authority[0].2, "SOA");
    // The apex: SOA and NS.
    let soa = dig(p, &["cluster.local", "SOA"]).unwrap();
    assert_eq!(soa.answer.len(), 1);
    assert_eq!(soa.answer[0].2, "SOA");
    let ns = dig(p, &["cluster.local", "NS"]).unwrap();
    assert_eq!(ns.data("NS"), ["ns.dns.cluster.local."]);

    // Everything else goes to the upstream (knotd), and comes back with its records.
    let www = dig(p, &["www.example.test", "A"]).unwrap();
    assert_eq!(www.status, "NOERROR", "{}", www.text);
    assert_eq!(www.data("A"), ["192.0.2.10", "192.0.2.11"]);
    // A reverse name the cluster does not know falls through to forward (knotd refuses it:
    // it is not authoritative there).
    let unknown = dig(p, &[&reverse("192.0.2.200"), "PTR"]).unwrap();
    assert_eq!(unknown.status, "REFUSED", "{}", unknown.text);
    // A big upstream answer: truncated over UDP without EDNS, whole over TCP (dig retries).
    let big = dig(p, &["big.example.test", "TXT", "+noedns"]).unwrap();
    assert!(big.retried_tcp, "{}", big.text);
    assert!(big.tcp);
    assert_eq!(big.data("TXT").len(), 12);
    let big_edns = dig(p, &["big.example.test", "TXT", "+bufsize=4096"]).unwrap();
    assert!(!big_edns.retried_tcp && big_edns.edns, "{}", big_edns.text);
    assert_eq!(big_edns.data("TXT").len(), 12);
    // The cache answers the second time, with the TTL counting down from the cap of 30 s.
    std::thread::sleep(Duration::from_millis(1100));
    let again = dig(p, &["www.example.test", "A"]).unwrap();
    assert!(again.answer[0].1 < 30, "{}", again.text);

    // Health, readiness and CoreDNS's metrics.
    let (code, body) = http_get(&format!("http://127.0.0.1:{}/health", ports.health)).unwrap();
    assert_eq!((code, body.as_str()), (200, "OK"));
    let (code, _) = http_get(&format!("http://127.0.0.1:{}/ready", ports.ready)).unwrap();
    assert_eq!(code, 200);
    let metrics = dns.metrics().unwrap();
    for name in [
        "coredns_dns_requests_total{",
        "coredns_dns_responses_total{",
        "coredns_dns_request_duration_seconds_bucket{",
        "coredns_cache_hits_total{",
        "coredns_cache_misses_total{",
        "coredns_forward_requests_total{",
        "coredns_build_info{",
        "coredns_plugin_enabled{",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let server = format!("server=\"dns://:{p}\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("coredns_dns_responses_total{")
                && l.contains(&server)
                && l.contains("rcode=\"NXDOMAIN\"")),
        "{metrics}"
    );
    let hits: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("coredns_cache_hits_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(hits >= 1.0, "{metrics}");
}

#[test]
fn every_record_type_follows_the_objects_in_the_api() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let ports = DnsPorts::pick().unwrap();
    let kubeconfig = api.kubeconfig.display().to_string();
    let dns = SeineDns::start(ports, &live_corefile(ports, &kubeconfig, "")).unwrap();
    dns.wait_serving().unwrap();
    let p = ports.dns;

    post(
        &api,
        "/api/v1/namespaces",
        json!({"metadata": {"name": "shop"}}),
    );
    // The namespace: NODATA once it exists (NXDOMAIN for one that does not).
    let ns = until(p, &["shop.svc.cluster.local", "A"], |d| {
        d.status == "NOERROR"
    });
    assert_eq!(ns.status, "NOERROR");
    assert_eq!(
        dig(p, &["nowhere.svc.cluster.local", "A"]).unwrap().status,
        "NXDOMAIN"
    );

    // A ClusterIP service with two named ports.
    let svc = post(
        &api,
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "cart"},
               "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080},
                                  {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
    );
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let name = "cart.shop.svc.cluster.local.";
    let a = until(p, &[name, "A"], |d| !d.answer.is_empty());
    assert_eq!(a.data("A"), [ip.as_str()]);
    assert_eq!(a.answer[0].1, 5, "ttl 5 from the Corefile");
    let srv = dig(p, &["_http._tcp.cart.shop.svc.cluster.local", "SRV"]).unwrap();
    assert_eq!(srv.data("SRV"), [format!("0 100 80 {name}")]);
    let udp = dig(p, &["_dns._udp.cart.shop.svc.cluster.local", "SRV"]).unwrap();
    assert_eq!(udp.data("SRV"), [format!("0 100 53 {name}")]);
    let wrong = dig(p, &["_dns._tcp.cart.shop.svc.cluster.local", "SRV"]).unwrap();
    assert_eq!(wrong.status, "NXDOMAIN", "{}", wrong.text);
    let all = dig(p, &["cart.shop.svc.cluster.local", "SRV"]).unwrap();
    assert_eq!(all.data("SRV").len(), 2, "{}", all.text);
    assert_eq!(dig(p, &[&reverse(&ip), "PTR"]).unwrap().data("PTR"), [name]);

    // A headless service: NXDOMAIN until an endpoint is ready; then one A per ready endpoint,
    // hostname records, N x M SRV and PTR for the endpoint address.
    post(
        &api,
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "db"},
               "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
    );
    let headless = "db.shop.svc.cluster.local.";
    let none = until(p, &[headless, "A"], |d| d.status == "NXDOMAIN");
    assert_eq!(none.status, "NXDOMAIN");
    post(
        &api,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        json!({"metadata": {"name": "db-1", "labels": {"kubernetes.io/service-name": "db"}},
               "addressType": "IPv4",
               "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}],
               "endpoints": [
                   {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": true}},
                   {"addresses": ["10.244.1.6"], "conditions": {"ready": true}},
                   {"addresses": ["10.244.2.7"], "conditions": {"ready": false}}]}),
    );
    let ready = until(p, &[headless, "A"], |d| d.answer.len() == 2);
    assert_eq!(
        ready.data("A"),
        ["10.244.1.5", "10.244.1.6"],
        "not-ready left out"
    );
    let host = dig(p, &["db-0.db.shop.svc.cluster.local", "A"]).unwrap();
    assert_eq!(host.data("A"), ["10.244.1.5"]);
    let dashed = dig(p, &["10-244-1-6.db.shop.svc.cluster.local", "A"]).unwrap();
    assert_eq!(dashed.data("A"), ["10.244.1.6"]);
    let srv = dig(p, &["_pg._tcp.db.shop.svc.cluster.local", "SRV"]).unwrap();
    assert_eq!(
        srv.data("SRV"),
        [
            "0 50 5432 10-244-1-6.db.shop.svc.cluster.local.",
            "0 50 5432 db-0.db.shop.svc.cluster.local."
        ]
    );
    assert_eq!(srv.additional.iter().filter(|r| r.2 == "A").count(), 2);
    assert_eq!(
        dig(p, &[&reverse("10.244.1.5"), "PTR"])
            .unwrap()
            .data("PTR"),
        ["db-0.db.shop.svc.cluster.local."]
    );

    // Many ready endpoints: the A answer no longer fits 512 bytes, so UDP without EDNS is
    // truncated and dig retries over TCP; with EDNS0 and a big buffer it comes whole over UDP.
    let endpoints: Vec<Value> = (1..=60)
        .map(|i| json!({"addresses": [format!("10.244.9.{i}")], "conditions": {"ready": true}}))
        .collect();
    post(
        &api,
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "wide"},
               "spec": {"clusterIP": "None", "ports": [{"name": "x", "port": 1}]}}),
    );
    post(
        &api,
        "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
        json!({"metadata": {"name": "wide-1", "labels": {"kubernetes.io/service-name": "wide"}},
               "addressType": "IPv4", "endpoints": endpoints}),
    );
    let wide = until(p, &["wide.shop.svc.cluster.local", "A", "+noedns"], |d| {
        d.answer.len() == 60
    });
    assert!(wide.retried_tcp && wide.tcp, "{}", wide.text);
    assert_eq!(wide.answer.len(), 60);
    let wide_edns = dig(p, &["wide.shop.svc.cluster.local", "A", "+bufsize=4096"]).unwrap();
    assert!(
        !wide_edns.retried_tcp && wide_edns.edns,
        "{}",
        wide_edns.text
    );
    assert_eq!(wide_edns.answer.len(), 60);
    let wide_tcp = dig(p, &["wide.shop.svc.cluster.local", "A", "+tcp"]).unwrap();
    assert!(wide_tcp.tcp);
    assert_eq!(wide_tcp.answer.len(), 60);

    // ExternalName: a CNAME.
    post(
        &api,
        "/api/v1/namespaces/shop/services",
        json!({"metadata": {"name": "ext"},
               "spec": {"type": "ExternalName", "externalName": "www.example.test"}}),
    );
    let cname = until(p, &["ext.shop.svc.cluster.local", "A"], |d| {
        !d.answer.is_empty()
    });
    assert_eq!(cname.data("CNAME"), ["www.example.test."]);

    // pods verified: an address only when a pod in that namespace has it.
    post(
        &api,
        "/api/v1/namespaces/shop/pods",
        json!({"metadata": {"name": "web"},
               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}),
    );
    api.set_pod_ip("shop", "web", "10.244.3.9").unwrap();
    let pod = until(p, &["10-244-3-9.shop.pod.cluster.local", "A"], |d| {
        !d.answer.is_empty()
    });
    assert_eq!(pod.data("A"), ["10.244.3.9"]);
    assert_eq!(
        dig(p, &["10-244-3-8.shop.pod.cluster.local", "A"])
            .unwrap()
            .status,
        "NXDOMAIN"
    );

    // Changes: a service deleted goes away; an endpoint turning not-ready leaves the answer.
    let (code, _) = api
        .delete("/api/v1/namespaces/shop/services/cart", None)
        .unwrap();
    assert_eq!(code, 200);
    let gone = until(p, &[name, "A"], |d| d.status == "NXDOMAIN");
    assert_eq!(gone.status, "NXDOMAIN");
    let (code, out) = api
        .merge_patch(
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices/db-1",
            &json!({"endpoints": [
                {"addresses": ["10.244.1.5"], "hostname": "db-0", "conditions": {"ready": false}},
                {"addresses": ["10.244.1.6"], "conditions": {"ready": true}}]}),
        )
        .unwrap();
    assert_eq!(code, 200, "{out}");
    let one = until(p, &[headless, "A"], |d| d.answer.len() == 1);
    assert_eq!(one.data("A"), ["10.244.1.6"]);

    // Outside the cluster zones with no forward: refused.
    assert_eq!(
        dig(p, &["www.example.test", "A"]).unwrap().status,
        "SERVFAIL"
    );
    assert!(dns.log_text().contains("kubernetes: synced"));
}

#[test]
fn servfail_until_the_first_sync_then_answers_through_an_api_outage() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let pid = api.pid().unwrap().to_string();
    // The API server is frozen: connections open, nothing answers.
    seine_tests::sh("kill", &["-STOP", &pid]).unwrap();
    let ports = DnsPorts::pick().unwrap();
    let kubeconfig = api.kubeconfig.display().to_string();
    let started = SeineDns::start(
        ports,
        &live_corefile(ports, &kubeconfig, "startup_timeout 1s"),
    );
    let thaw = || {
        let _ = seine_tests::sh("kill", &["-CONT", &pid]);
    };
    let dns = match started {
        Ok(d) => d,
        Err(e) => {
            thaw();
            panic!("{e}");
        }
    };
    let p = ports.dns;
    let before = until(p, &["kubernetes.default.svc.cluster.local", "A"], |d| {
        d.status == "SERVFAIL"
    });
    let (ready_before, _) = http_get(&format!("http://127.0.0.1:{}/ready", ports.ready)).unwrap();
    thaw();
    assert_eq!(before.status, "SERVFAIL", "{}", before.text);
    assert_eq!(ready_before, 503);

    let after = until(p, &["kubernetes.default.svc.cluster.local", "A"], |d| {
        d.status == "NOERROR"
    });
    assert_eq!(after.data("A"), ["10.96.0.1"]);
    let (ready_after, _) = http_get(&format!("http://127.0.0.1:{}/ready", ports.ready)).unwrap();
    assert_eq!(ready_after, 200);

    // The API server goes away again: answers keep coming from what seine-dns has.
    seine_tests::sh("kill", &["-STOP", &pid]).unwrap();
    let during: Vec<String> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(400));
            dig(p, &["kubernetes.default.svc.cluster.local", "A"])
                .map(|d| d.status)
                .unwrap_or_else(|e| e.to_string())
        })
        .collect();
    thaw();
    assert!(during.iter().all(|s| s == "NOERROR"), "{during:?}");
    // And once it is back, new objects show up.
    post(
        &api,
        "/api/v1/namespaces",
        json!({"metadata": {"name": "later"}}),
    );
    let later = until(p, &["later.svc.cluster.local", "A"], |d| {
        d.status == "NOERROR"
    });
    assert_eq!(later.status, "NOERROR", "{}", dns.log_text());
}

#[test]
fn fallthrough_noendpoints_ignore_empty_service_and_endpoint_pod_names() {
    let etcd = Etcd::start().unwrap();
    let api = ApiServer::start(&etcd).unwrap();
    let upstream = knot();
    let ports = DnsPorts::pick().unwrap();
    let kubeconfig = api.kubeconfig.display().to_string();
    // `fallthrough` for all zones hands NXDOMAIN to forward; endpoint_pod_names names headless
    // records after their pods.
    let corefile = format!(
        ".:{dns} {{
    health 127.0.0.1:{health}
    kubernetes cluster.local example.test {{
        kubeconfig {kubeconfig}
        endpoint_pod_names
        ignore empty_service
        fallthrough
    }}
    forward . 127.0.0.1:{up}
}}
",
        dns = ports.dns,
        health = ports.health,
        up = upstream.port
    );
    let dns = SeineDns::start(ports, &corefile).unwrap();
    dns.wait_serving().unwrap();
    let p = ports.dns;
    // example.test is a cluster zone here, but its names fall through to knotd.
    let www = dig(p, &["www.example.test", "A"]).unwrap();
    assert_eq!(www.data("A"), ["192.0.2.10", "192.0.2.11"], "{}", www.text);

    post(
        &api,
        "/api/v1/namespaces/default/services",
        json!({"metadata": {"name": "empty"}, "spec": {"ports": [{"port": 80}]}}),
    );
    post(
        &api,
        "/api/v1/namespaces/default/services",
        json!({"metadata": {"name": "ss"},
               "spec": {"clusterIP": "None", "ports": [{"name": "p", "port": 1}]}}),
    );
    post(
        &api,
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        json!({"metadata": {"name": "ss-1", "labels": {"kubernetes.io/service-name": "ss"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.4.4"], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": "ss-0", "namespace": "default"}}]}),
    );
    let named = until(p, &["ss-0.ss.default.svc.cluster.local", "A"], |d| {
        !d.answer.is_empty()
    });
    assert_eq!(named.data("A"), ["10.244.4.4"]);
    // ignore empty_service: a service without ready endpoints is NXDOMAIN (which falls through
    // to knotd, which is not authoritative for cluster.local: REFUSED).
    let empty = dig(p, &["empty.default.svc.cluster.local", "A"]).unwrap();
    assert_eq!(empty.status, "REFUSED", "{}", empty.text);
    drop(dns);

    // noendpoints: no endpoint records at all.
    let ports = DnsPorts::pick().unwrap();
    let dns = SeineDns::start(ports, &live_corefile(ports, &kubeconfig, "noendpoints")).unwrap();
    dns.wait_serving().unwrap();
    let ss = dig(ports.dns, &["ss.default.svc.cluster.local", "A"]).unwrap();
    assert!(ss.answer.is_empty(), "{}", ss.text);
    drop(dns);

    // namespaces: only the listed ones exist, forwards and backwards.
    let ports = DnsPorts::pick().unwrap();
    let dns = SeineDns::start(
        ports,
        &live_corefile(ports, &kubeconfig, "namespaces kube-system"),
    )
    .unwrap();
    dns.wait_serving().unwrap();
    let p = ports.dns;
    let hidden = dig(p, &["kubernetes.default.svc.cluster.local", "A"]).unwrap();
    assert_eq!(hidden.status, "NXDOMAIN", "{}", hidden.text);
    assert_eq!(hidden.authority[0].2, "SOA");
    assert_eq!(
        dig(p, &[&reverse("10.96.0.1"), "PTR"]).unwrap().status,
        "NXDOMAIN"
    );
    assert_eq!(
        dig(p, &["kube-system.svc.cluster.local", "A"])
            .unwrap()
            .status,
        "NOERROR"
    );
}

#[test]
fn corefile_errors_stop_the_start_and_name_the_line() {
    let ports = DnsPorts::pick().unwrap();
    for (corefile, expect) in [
        (".:53 {\n    errors\n    hosts /etc/hosts\n}\n", ":3"),
        (
            ".:53 {\n    cache 30 {\n        success many\n    }\n}\n",
            ":3",
        ),
        (
            ".:53 {\n    health {\n        lameduck forever\n    }\n}\n",
            ":3",
        ),
        (
            ".:53 {\n    kubernetes cluster.local {\n        pods sometimes\n    }\n}\n",
            ":3",
        ),
        (".:53 {\n    forward\n}\n", ":2"),
        (".:53 {\n    errors\n", ""),
    ] {
        let err = match SeineDns::start(ports, corefile) {
            Ok(_) => panic!("started with {corefile:?}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("exited"), "{err}");
        assert!(err.contains("Corefile"), "{err}");
        assert!(err.contains(expect), "{corefile:?}: {err}");
    }
    // A Corefile that is not there.
    let out = std::process::Command::new(seine_tests::bin("seine-dns").unwrap())
        .args(["-conf", "/nonexistent/Corefile"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/Corefile"));
}

#[test]
fn reload_swaps_the_corefile_without_dropping_queries_and_keeps_a_good_one() {
    let one = Knot::start(
        &[(
            "example.test.",
            "$ORIGIN example.test.\n$TTL 300\n@ SOA ns hm 1 3600 600 86400 60\n@ NS ns\nns A 127.0.0.1\nwww A 192.0.2.1\n".into(),
        )],
        None,
    )
    .unwrap();
    let two = Knot::start(
        &[(
            "example.test.",
            "$ORIGIN example.test.\n$TTL 300\n@ SOA ns hm 1 3600 600 86400 60\n@ NS ns\nns A 127.0.0.1\nwww A 192.0.2.2\n".into(),
        )],
        None,
    )
    .unwrap();
    let ports = DnsPorts::pick().unwrap();
    let corefile = |up: u16| {
        format!(
            ".:{dns} {{\n    health 127.0.0.1:{health}\n    prometheus 127.0.0.1:{metrics}\n    \
             reload 1s 0s\n    forward . 127.0.0.1:{up}\n}}\n",
            dns = ports.dns,
            health = ports.health,
            metrics = ports.metrics
        )
    };
    let dns = SeineDns::start(ports, &corefile(one.port)).unwrap();
    let p = ports.dns;
    let first = until(p, &["www.example.test", "A"], |d| !d.answer.is_empty());
    assert_eq!(first.data("A"), ["192.0.2.1"]);

    // Ask continuously while the Corefile changes to the second upstream.
    let asking = std::thread::spawn(move || {
        let mut answers = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            answers.push(
                dig(p, &["www.example.test", "A"])
                    .map(|d| d.data("A").join(","))
                    .unwrap_or_else(|e| format!("error: {e}")),
            );
        }
        answers
    });
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&dns.corefile, corefile(two.port)).unwrap();
    let answers = asking.join().unwrap();
    assert!(
        answers.iter().all(|a| a == "192.0.2.1" || a == "192.0.2.2"),
        "every query answered: {answers:?}"
    );
    assert_eq!(
        answers.last().map(String::as_str),
        Some("192.0.2.2"),
        "{answers:?}"
    );

    // A broken Corefile is not taken: the running one stays, and the failure is counted.
    std::fs::write(&dns.corefile, ".:53 {\n    nosuchplugin\n}\n").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        dig(p, &["www.example.test", "A"]).unwrap().data("A"),
        ["192.0.2.2"]
    );
    let metrics = dns.metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("coredns_reload_failed_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(dns.log_text().contains(":2"), "{}", dns.log_text());
}

#[test]
fn a_forwarding_loop_is_detected_and_lameduck_keeps_answering_on_sigterm() {
    // forward to itself: the loop plugin sees its probe come back and stops the server.
    let ports = DnsPorts::pick().unwrap();
    let corefile = format!(
        ".:{dns} {{\n    health 127.0.0.1:{health}\n    loop\n    forward . 127.0.0.1:{dns}\n}}\n",
        dns = ports.dns,
        health = ports.health
    );
    // It may stop before or after its /health answers.
    let log = match SeineDns::start(ports, &corefile) {
        Err(e) => e.to_string(),
        Ok(mut dns) => {
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Ok(Some(s)) = dns.process.child.try_wait() {
                    break Some(s);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let status = status.expect("a looping server exits");
            assert!(!status.success());
            dns.log_text()
        }
    };
    assert!(log.contains("Loop detected"), "{log}");
    assert!(
        log.contains("exited (exit status: 1)") || !log.contains("exited"),
        "{log}"
    );

    // lameduck: after SIGTERM the server keeps answering for the lameduck time, then exits 0.
    let upstream = knot();
    let ports = DnsPorts::pick().unwrap();
    let corefile = format!(
        ".:{dns} {{\n    health 127.0.0.1:{health} {{\n        lameduck 3s\n    }}\n    forward . 127.0.0.1:{up}\n}}\n",
        dns = ports.dns,
        health = ports.health,
        up = upstream.port
    );
    let mut dns = SeineDns::start(ports, &corefile).unwrap();
    let pid = dns.process.pid().to_string();
    seine_tests::sh("kill", &["-TERM", &pid]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let during = dig(ports.dns, &["www.example.test", "A"]).unwrap();
    assert_eq!(during.data("A"), ["192.0.2.10", "192.0.2.11"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(s)) = dns.process.child.try_wait() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after lameduck");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}: {}", dns.log_text());
}

/// A query for `name`/`qtype` in wire format, with an EDNS0 OPT of `edns` (version, size).
fn wire_query(id: u16, opcode: u8, name: &str, qtype: u16, edns: Option<(u8, u16)>) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend(id.to_be_bytes());
    q.extend([(opcode << 3) | 1, 0]);
    q.extend(1u16.to_be_bytes());
    q.extend([0, 0, 0, 0]);
    q.extend(u16::from(edns.is_some()).to_be_bytes());
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.push(0);
    q.extend(qtype.to_be_bytes());
    q.extend(1u16.to_be_bytes());
    if let Some((version, size)) = edns {
        q.push(0);
        q.extend(41u16.to_be_bytes());
        q.extend(size.to_be_bytes());
        q.extend([0, version, 0, 0]);
        q.extend(0u16.to_be_bytes());
    }
    q
}

/// Sends `packet` over UDP; the answer's (id, rcode including EDNS's upper bits, question count),
/// or None when nothing comes back within 500 ms.
fn exchange(port: u16, packet: &[u8]) -> Option<(u16, u16, u16)> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    sock.send_to(packet, ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    assert!(n >= 12, "a whole header");
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let mut rcode = u16::from(buf[3] & 0x0f);
    // The OPT record's extended rcode, when the answer has one (BADVERS = 16).
    if let Some(i) = buf[..n].windows(3).position(|w| w == [0, 0, 41]) {
        if i + 5 < n {
            rcode |= u16::from(buf[i + 5]) << 4;
        }
    }
    Some((id, rcode, u16::from_be_bytes([buf[4], buf[5]])))
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped_and_the_server_carries_on() {
    let ports = DnsPorts::pick().unwrap();
    let corefile = format!(
        ".:{dns} {{\n    health 127.0.0.1:{health}\n    kubernetes cluster.local {{\n        \
         endpoint http://127.0.0.1:1\n        startup_timeout 0s\n    }}\n}}\n",
        dns = ports.dns,
        health = ports.health
    );
    let dns = SeineDns::start(ports, &corefile).unwrap();
    let p = ports.dns;
    let good = wire_query(7, 0, "a.cluster.local", 1, None);
    // No API server here: SERVFAIL, but an answer.
    let deadline = Instant::now() + Duration::from_secs(10);
    while exchange(p, &good).is_none() && Instant::now() < deadline {}
    assert_eq!(exchange(p, &good), Some((7, 2, 1)));

    // Shorter than a header: dropped.
    assert_eq!(exchange(p, &[0x12, 0x34, 1]), None);
    // A header that promises a question that is not there: FORMERR.
    let mut cut = good.clone();
    cut.truncate(20);
    assert_eq!(exchange(p, &cut).map(|a| (a.0, a.1)), Some((7, 1)));
    // A compression pointer in the question: FORMERR, without echoing it.
    let mut pointer = wire_query(8, 0, "a.cluster.local", 1, None);
    pointer.splice(12..14, [0xc0, 0x02]);
    assert_eq!(exchange(p, &pointer), Some((8, 1, 0)));
    // Random bytes after a valid header.
    let mut noise = good.clone();
    noise[0..2].copy_from_slice(&9u16.to_be_bytes());
    noise.extend((0..300).map(|i| (i * 37 % 251) as u8));
    noise[5] = 3;
    assert!(matches!(exchange(p, &noise), Some((9, 1, _))));
    // An opcode it does not do (UPDATE): NOTIMP.
    assert_eq!(
        exchange(p, &wire_query(10, 5, "a.cluster.local", 1, None)).map(|a| (a.0, a.1)),
        Some((10, 4))
    );
    // EDNS version 1: BADVERS.
    assert_eq!(
        exchange(p, &wire_query(11, 0, "a.cluster.local", 1, Some((1, 1232)))).map(|a| (a.0, a.1)),
        Some((11, 16))
    );
    // Still answering, and still alive.
    assert_eq!(exchange(p, &good), Some((7, 2, 1)));
    assert!(
        http_get(&format!("http://127.0.0.1:{}/health", ports.health)).is_ok(),
        "{}",
        dns.log_text()
    );
}
