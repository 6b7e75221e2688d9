use super::*;

/// The Corefile kubeadm installs for CoreDNS.
const KUBEADM: &str = r#"
.:53 {
errors
health {
   lameduck 5s
}
ready
kubernetes cluster.local in-addr.arpa ip6.arpa {
   pods insecure
   fallthrough in-addr.arpa ip6.arpa
   ttl 30
}
prometheus :9153
forward . /etc/resolv.conf {
   max_concurrent 1000
}
cache 30
loop
reload
loadbalance
}
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn the_kubeadm_corefile_reads_as_coredns_reads_it() {
    let servers = parse(KUBEADM, 53, &no_env).unwrap();
    assert_eq!(servers.len(), 1);
    let s = &servers[0];
    assert_eq!(
        s.listen,
        Listen {
            zones: vec![".".into()],
            port: 53
        }
    );
    assert!(s.errors && s.loop_detect && s.loadbalance);
    assert_eq!(
        s.health,
        Some(("0.0.0.0:8080".parse().unwrap(), Duration::from_secs(5)))
    );
    assert_eq!(s.ready, Some("0.0.0.0:8181".parse().unwrap()));
    assert_eq!(s.prometheus, Some("0.0.0.0:9153".parse().unwrap()));
    let k = s.kubernetes.as_ref().unwrap();
    assert_eq!(k.zones, ["cluster.local.", "in-addr.arpa.", "ip6.arpa."]);
    assert_eq!(k.pods, PodsMode::Insecure);
    assert_eq!(k.ttl, 30);
    assert_eq!(
        k.fallthrough.as_deref(),
        Some(&["in-addr.arpa.".to_string(), "ip6.arpa.".to_string()][..])
    );
    assert_eq!(k.startup_timeout, Duration::from_secs(5));
    let f = s.forward.as_ref().unwrap();
    assert_eq!(f.from, ".");
    assert_eq!(f.to, ["/etc/resolv.conf"]);
    assert_eq!(f.max_concurrent, Some(1000));
    assert_eq!(f.policy, Policy::Random);
    let c = s.cache.as_ref().unwrap();
    assert_eq!(c.success.max_ttl, 30);
    assert_eq!(c.denial.max_ttl, 30);
    assert_eq!(
        s.reload,
        Some((Duration::from_secs(30), Duration::from_secs(15)))
    );
}

#[test]
fn options_and_several_blocks() {
    let text = r#"
# two servers
cluster.local:1053 example.org:1053 {
kubernetes {
    endpoint https://10.0.0.1:6443
    kubeconfig /etc/kube.conf admin
    pods verified
    endpoint_pod_names
    ignore empty_service
    noendpoints
    startup_timeout 2s
    fallthrough
}
cache 60 example.org {
    success 5000 120 10
    denial 100
    prefetch 3 30s 20%
    serve_stale 1h
}
forward . 10.0.0.53:53 "dns://10.0.0.54" {
    policy sequential
    health_check 1s
    max_fails 5
    except internal.example.org
}
health :18080
reload 10s 2s
}
dns://.:{$PORT} {
forward . 1.1.1.1
}
"#;
    let env = |k: &str| (k == "PORT").then(|| "2053".to_string());
    let servers = parse(text, 53, &env).unwrap();
    assert_eq!(servers.len(), 2);
    let a = &servers[0];
    assert_eq!(a.listen.zones, ["cluster.local.", "example.org."]);
    assert_eq!(a.listen.port, 1053);
    let k = a.kubernetes.as_ref().unwrap();
    assert_eq!(
        k.zones,
        ["cluster.local.", "example.org."],
        "the server's zones"
    );
    assert_eq!(k.endpoint.as_deref(), Some("https://10.0.0.1:6443"));
    assert_eq!(
        k.kubeconfig,
        Some(("/etc/kube.conf".into(), Some("admin".into())))
    );
    assert_eq!(k.pods, PodsMode::Verified);
    assert!(k.endpoint_pod_names && k.ignore_empty_service && k.noendpoints);
    assert_eq!(k.fallthrough, Some(vec![]));
    assert_eq!(k.startup_timeout, Duration::from_secs(2));
    let c = a.cache.as_ref().unwrap();
    assert_eq!(c.zones, ["example.org."]);
    assert_eq!(
        c.success,
        CacheBucket {
            capacity: 5000,
            max_ttl: 120,
            min_ttl: 10
        }
    );
    assert_eq!(c.denial.capacity, 100);
    assert_eq!(c.prefetch, Some((3, Duration::from_secs(30), 20)));
    assert_eq!(c.serve_stale, Some(Duration::from_secs(3600)));
    let f = a.forward.as_ref().unwrap();
    assert_eq!(f.to, ["10.0.0.53:53", "dns://10.0.0.54"]);
    assert_eq!(f.policy, Policy::Sequential);
    assert_eq!(f.max_fails, 5);
    assert_eq!(f.except, ["internal.example.org."]);
    assert_eq!(a.health.unwrap().0, "0.0.0.0:18080".parse().unwrap());
    assert_eq!(
        a.reload,
        Some((Duration::from_secs(10), Duration::from_secs(2)))
    );
    assert_eq!(
        servers[1].listen,
        Listen {
            zones: vec![".".into()],
            port: 2053
        }
    );
}

#[test]
fn what_seine_dns_does_not_do_is_an_error_naming_the_line() {
    let cases = [
        (".:53 {\n    errors\n    hosts /etc/hosts\n}\n", 3, "hosts"),
        (
            ".:53 {\n  kubernetes cluster.local {\n    pods sometimes\n  }\n}\n",
            3,
            "pods",
        ),
        (
            ".:53 {\n  kubernetes {\n    resyncperiod 10s\n  }\n}\n",
            3,
            "resyncperiod",
        ),
        (".:53 {\n  forward .\n}\n", 2, "upstream"),
        (
            ".:53 {\n  cache 30 {\n    prefetch 1 soon\n  }\n}\n",
            3,
            "duration",
        ),
        (".:53 {\n  errors\n", 1, "never closed"),
        (".:53 {\n  ready\n  ready :9000\n}\n", 3, "twice"),
        (".:5x3 {\n}\n", 1, "port"),
        (".:{$NOPE} {\n}\n", 1, "NOPE"),
        ("", 1, "no server block"),
        (".:53 {\n  kubernetes {\n    ttl 9999\n  }\n}\n", 3, "ttl"),
    ];
    for (text, line, words) in cases {
        let e = parse(text, 53, &no_env).unwrap_err();
        assert_eq!(e.line, line, "{text:?}: {e}");
        assert!(e.to_string().contains(words), "{text:?}: {e}");
    }
}

#[test]
fn values_too_large_for_their_option_are_refused_with_the_line() {
    let huge = "99999999999999999999h";
    let cases = [
        format!(".:53 {{\n  forward . 127.0.0.1 {{\n    expire {huge}\n  }}\n}}\n"),
        format!(".:53 {{\n  forward . 127.0.0.1 {{\n    health_check {huge}\n  }}\n}}\n"),
        format!(".:53 {{\n  cache 30 {{\n    prefetch 1 {huge}\n  }}\n}}\n"),
        format!(".:53 {{\n  cache 30 {{\n    serve_stale {huge}\n  }}\n}}\n"),
        format!(".:53 {{\n  health {{\n    lameduck {huge}\n  }}\n}}\n"),
        format!(".:53 {{\n  kubernetes {{\n    startup_timeout {huge}\n  }}\n}}\n"),
        format!(".:53 {{\n  errors\n  reload 30s {huge}\n}}\n"),
        ".:53 {\n  errors\n  cache 99999999999\n}\n".to_string(),
        ".:53 {\n  cache 30 {\n    success 99999999999999999999999\n  }\n}\n".to_string(),
        ".:53 {\n  kubernetes {\n    ttl 99999999999\n  }\n}\n".to_string(),
    ];
    for text in cases {
        let e = parse(&text, 53, &no_env).unwrap_err();
        assert_eq!(e.line, 3, "{text:?}: {e}");
        assert!(e.to_string().contains("too large"), "{text:?}: {e}");
    }
}

#[test]
fn cidr_zones_are_the_reverse_zones_that_cover_them() {
    assert_eq!(zones_of("cluster.local").unwrap(), ["cluster.local."]);
    assert_eq!(zones_of("10.0.0.0/8").unwrap(), ["10.in-addr.arpa."]);
    assert_eq!(zones_of("10.244.0.0/16").unwrap(), ["244.10.in-addr.arpa."]);
    assert_eq!(
        zones_of("192.168.7.0/24").unwrap(),
        ["7.168.192.in-addr.arpa."]
    );
    let twelve = zones_of("10.96.0.0/12").unwrap();
    assert_eq!(twelve.len(), 16);
    assert_eq!(twelve[0], "96.10.in-addr.arpa.");
    assert_eq!(twelve[15], "111.10.in-addr.arpa.");
    // Host bits are ignored, as a network is meant.
    assert_eq!(zones_of("10.97.3.4/12").unwrap()[0], "96.10.in-addr.arpa.");
    assert_eq!(
        zones_of("fd00:10:96::/112").unwrap(),
        ["0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.6.9.0.0.0.1.0.0.0.0.d.f.ip6.arpa."]
    );
    assert_eq!(zones_of("fd00::/6").unwrap().len(), 4);
    assert_eq!(zones_of("0.0.0.0/0").unwrap(), ["in-addr.arpa."]);
    assert!(zones_of("10.0.0.0/33").is_err());
    assert!(zones_of("10.0.0/8").is_err());
    let e = parse(".:53 {\n  kubernetes 10.0.0.0/40\n}\n", 53, &no_env).unwrap_err();
    assert_eq!(e.line, 2, "{e}");
}
