//! The answers of the Kubernetes DNS-based service discovery specification (schema 1.1.0) and of
//! CoreDNS's kubernetes plugin, from a view of the cluster's Services, endpoints, Pods and
//! Namespaces. Independent of the wire format: a lookup yields a response code and records, which
//! the server encodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::corefile::{fqdn, in_zone, PodsMode};

pub const SCHEMA_VERSION: &str = "1.1.0";

/// Record types the cluster zone answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Qtype {
    A,
    Aaaa,
    Srv,
    Ptr,
    Cname,
    Txt,
    Soa,
    Ns,
    Any,
    Other(u16),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    Ptr(String),
    Cname(String),
    Txt(String),
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    pub name: String,
    pub ttl: u32,
    pub data: Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    NoError,
    NxDomain,
}

/// The answer to one question in a cluster zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rcode: Rcode,
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The zone whose SOA goes into the authority section (NXDOMAIN and NODATA).
    pub soa_zone: Option<String>,
}

impl Answer {
    fn records(zone: &str, answers: Vec<Record>, additionals: Vec<Record>) -> Self {
        let soa_zone = answers.is_empty().then(|| zone.to_string());
        Answer {
            rcode: Rcode::NoError,
            answers,
            additionals,
            soa_zone,
        }
    }
    fn nxdomain(zone: &str) -> Self {
        Answer {
            rcode: Rcode::NxDomain,
            answers: Vec::new(),
            additionals: Vec::new(),
            soa_zone: Some(zone.to_string()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    /// Lower case: `tcp`, `udp`, `sctp`.
    pub protocol: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceKind {
    /// ClusterIP, NodePort or LoadBalancer with cluster IPs.
    ClusterIp(Vec<IpAddr>),
    Headless,
    ExternalName(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub kind: ServiceKind,
    pub ports: Vec<Port>,
}

/// One endpoint of a Service, from its EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub hostname: Option<String>,
    /// The pod behind it (`targetRef`), for `endpoint_pod_names`.
    pub pod_name: Option<String>,
    pub ready: bool,
    pub ports: Vec<Port>,
}

/// What the cluster zone is answered from.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub namespaces: BTreeSet<String>,
    /// By (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// By (namespace, service name).
    pub endpoints: BTreeMap<(String, String), Vec<Endpoint>>,
    /// Pod addresses by namespace (for `pods verified`).
    pub pod_ips: BTreeMap<String, BTreeSet<IpAddr>>,
    /// The services (namespace, name) with an address as cluster IP or endpoint, so that a PTR
    /// query looks at those only: see `index_addresses`.
    pub by_address: BTreeMap<IpAddr, BTreeSet<(String, String)>>,
}

/// The kubernetes plugin's options that shape answers.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster zones (`cluster.local.`), reverse zones included.
    pub zones: Vec<String>,
    pub ttl: u32,
    pub pods: PodsMode,
    pub endpoint_pod_names: bool,
    pub ignore_empty_service: bool,
    pub noendpoints: bool,
}

/// `1.2.3.4` as `1-2-3-4`; IPv6 with `-` for `:`.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}

fn parse_dashed(text: &str) -> Option<IpAddr> {
    if let Ok(v4) = text.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(v4));
    }
    text.replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa.`, nibbles under `ip6.arpa.`) stands for.
pub fn reverse_to_ip(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".in-addr.arpa.") {
        let octets: Vec<u8> = rest
            .split('.')
            .rev()
            .map(|o| o.parse().ok())
            .collect::<Option<_>>()?;
        let octets: [u8; 4] = octets.try_into().ok()?;
        return Some(IpAddr::V4(Ipv4Addr::from(octets)));
    }
    let rest = name.strip_suffix(".ip6.arpa.")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .rev()
        .map(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 1))
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        bytes[i] = pair[0] << 4 | pair[1];
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// The reverse name of an address.
pub fn ip_to_reverse(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa.")
        }
        IpAddr::V6(v6) => {
            let mut out = String::new();
            for byte in v6.octets().iter().rev() {
                out.push_str(&format!("{:x}.{:x}.", byte & 0xf, byte >> 4));
            }
            out + "ip6.arpa."
        }
    }
}

fn address_record(name: &str, ttl: u32, ip: IpAddr) -> Record {
    Record {
        name: name.to_string(),
        ttl,
        data: match ip {
            IpAddr::V4(v4) => Data::A(v4),
            IpAddr::V6(v6) => Data::Aaaa(v6),
        },
    }
}

fn wants(qtype: Qtype, ip: IpAddr) -> bool {
    matches!(
        (qtype, ip),
        (Qtype::A, IpAddr::V4(_)) | (Qtype::Aaaa, IpAddr::V6(_)) | (Qtype::Any, _)
    )
}

impl ClusterView {
    /// Fills `by_address` from the services and endpoints (after they change).
    pub fn index_addresses(&mut self) {
        let mut index: BTreeMap<IpAddr, BTreeSet<(String, String)>> = BTreeMap::new();
        for (key, service) in &self.services {
            if let ServiceKind::ClusterIp(ips) = &service.kind {
                for ip in ips {
                    index.entry(*ip).or_default().insert(key.clone());
                }
            }
        }
        for (key, endpoints) in &self.endpoints {
            for ip in endpoints.iter().flat_map(|e| &e.addresses) {
                index.entry(*ip).or_default().insert(key.clone());
            }
        }
        self.by_address = index;
    }

    /// The zone of `name` among `options.zones` (the longest match), if any.
    pub fn zone_of<'a>(name: &str, options: &'a Options) -> Option<&'a str> {
        options
            .zones
            .iter()
            .filter(|z| in_zone(name, z))
            .max_by_key(|z| z.len())
            .map(String::as_str)
    }

    fn ready_endpoints(&self, namespace: &str, service: &str) -> Vec<&Endpoint> {
        self.endpoints
            .get(&(namespace.to_string(), service.to_string()))
            .map(|eps| eps.iter().filter(|e| e.ready).collect())
            .unwrap_or_default()
    }

    /// The hostname an endpoint answers under: its hostname, else (with `endpoint_pod_names`) its
    /// pod's name, else its address dashed.
    fn endpoint_host(e: &Endpoint, ip: IpAddr, options: &Options) -> String {
        if let Some(h) = &e.hostname {
            return h.clone();
        }
        if options.endpoint_pod_names {
            if let Some(p) = &e.pod_name {
                return p.clone();
            }
        }
        dashed(ip)
    }

    /// Answers `name` (fully qualified, any case) for `qtype`, or None when `name` is outside the
    /// cluster zones (the next plugin's).
    pub fn lookup(&self, name: &str, qtype: Qtype, options: &Options) -> Option<Answer> {
        let name = fqdn(name);
        let zone = Self::zone_of(&name, options)?.to_string();
        let ttl = options.ttl;
        if name.ends_with(".in-addr.arpa.") || name.ends_with(".ip6.arpa.") {
            return Some(self.reverse(&name, &zone, qtype, options));
        }
        if name == zone {
            // The zone apex: SOA (and NS) are the server's; everything else has no data.
            return Some(Answer::records(&zone, Vec::new(), Vec::new()));
        }
        let relative = if zone == "." {
            name.strip_suffix('.').unwrap_or_default()
        } else {
            name.get(..name.len() - zone.len() - 1).unwrap_or_default()
        };
        let labels: Vec<&str> = relative.split('.').collect();
        if labels == ["dns-version"] {
            let answers = match qtype {
                Qtype::Txt | Qtype::Any => vec![Record {
                    name: name.clone(),
                    ttl,
                    data: Data::Txt(SCHEMA_VERSION.into()),
                }],
                _ => Vec::new(),
            };
            return Some(Answer::records(&zone, answers, Vec::new()));
        }
        Some(match labels.as_slice() {
            ["svc"] | ["pod"] => Answer::records(&zone, Vec::new(), Vec::new()),
            [ns, "svc"] | [ns, "pod"] => {
                if self.namespaces.contains(*ns) {
                    Answer::records(&zone, Vec::new(), Vec::new())
                } else {
                    Answer::nxdomain(&zone)
                }
            }
            [svc, ns, "svc"] => self.service(&name, &zone, ns, svc, qtype, options),
            [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
                self.srv(
                    &name,
                    &zone,
                    ns,
                    svc,
                    Some((&port[1..], &proto[1..])),
                    qtype,
                    options,
                )
            }
            [host, svc, ns, "svc"] => {
                self.endpoint_name(&name, &zone, ns, svc, host, qtype, options)
            }
            [ip, ns, "pod"] => self.pod(&name, &zone, ns, ip, qtype, options),
            _ => Answer::nxdomain(&zone),
        })
    }

    fn service(
        &self,
        name: &str,
        zone: &str,
        ns: &str,
        svc: &str,
        qtype: Qtype,
        options: &Options,
    ) -> Answer {
        let ttl = options.ttl;
        let Some(service) = self.services.get(&(ns.to_string(), svc.to_string())) else {
            return Answer::nxdomain(zone);
        };
        if qtype == Qtype::Srv {
            return self.srv(name, zone, ns, svc, None, qtype, options);
        }
        match &service.kind {
            ServiceKind::ExternalName(target) => {
                let answers = match qtype {
                    Qtype::A | Qtype::Aaaa | Qtype::Cname | Qtype::Any => vec![Record {
                        name: name.to_string(),
                        ttl,
                        data: Data::Cname(fqdn(target)),
                    }],
                    _ => Vec::new(),
                };
                Answer::records(zone, answers, Vec::new())
            }
            ServiceKind::ClusterIp(ips) => {
                if options.ignore_empty_service && self.ready_endpoints(ns, svc).is_empty() {
                    return Answer::nxdomain(zone);
                }
                let answers = ips
                    .iter()
                    .filter(|ip| wants(qtype, **ip))
                    .map(|ip| address_record(name, ttl, *ip))
                    .collect();
                Answer::records(zone, answers, Vec::new())
            }
            ServiceKind::Headless => {
                if options.noendpoints {
                    return Answer::records(zone, Vec::new(), Vec::new());
                }
                let ready = self.ready_endpoints(ns, svc);
                if ready.is_empty() {
                    return Answer::nxdomain(zone);
                }
                let mut answers: Vec<Record> = ready
                    .iter()
                    .flat_map(|e| e.addresses.iter())
                    .filter(|ip| wants(qtype, **ip))
                    .map(|ip| address_record(name, ttl, *ip))
                    .collect();
                answers.sort();
                answers.dedup();
                Answer::records(zone, answers, Vec::new())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn srv(
        &self,
        name: &str,
        zone: &str,
        ns: &str,
        svc: &str,
        port: Option<(&str, &str)>,
        qtype: Qtype,
        options: &Options,
    ) -> Answer {
        let ttl = options.ttl;
        let Some(service) = self.services.get(&(ns.to_string(), svc.to_string())) else {
            return Answer::nxdomain(zone);
        };
        let service_name = format!("{svc}.{ns}.svc.{zone}");
        let matches = |p: &Port| match port {
            None => !p.name.is_empty(),
            Some((pname, proto)) => p.name == pname && p.protocol == proto,
        };
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        match &service.kind {
            ServiceKind::ExternalName(_) => {}
            ServiceKind::ClusterIp(ips) => {
                for p in service.ports.iter().filter(|p| matches(p)) {
                    answers.push(Record {
                        name: name.to_string(),
                        ttl,
                        data: Data::Srv {
                            priority: 0,
                            weight: 100,
                            port: p.port,
                            target: service_name.clone(),
                        },
                    });
                }
                if !answers.is_empty() {
                    additionals
                        .extend(ips.iter().map(|ip| address_record(&service_name, ttl, *ip)));
                }
            }
            ServiceKind::Headless => {
                let ready = self.ready_endpoints(ns, svc);
                let count = ready
                    .iter()
                    .map(|e| e.addresses.len())
                    .sum::<usize>()
                    .max(1);
                let weight = (100 / count).max(1) as u16;
                for e in ready {
                    for p in e.ports.iter().filter(|p| matches(p)) {
                        for ip in &e.addresses {
                            let target =
                                format!("{}.{service_name}", Self::endpoint_host(e, *ip, options));
                            answers.push(Record {
                                name: name.to_string(),
                                ttl,
                                data: Data::Srv {
                                    priority: 0,
                                    weight,
                                    port: p.port,
                                    target: target.clone(),
                                },
                            });
                            additionals.push(address_record(&target, ttl, *ip));
                        }
                    }
                }
            }
        }
        answers.sort();
        answers.dedup();
        additionals.sort();
        additionals.dedup();
        if answers.is_empty() && port.is_some() && qtype == Qtype::Srv {
            // A port name the service does not have: the name does not exist.
            return Answer::nxdomain(zone);
        }
        if qtype != Qtype::Srv && qtype != Qtype::Any {
            return Answer::records(zone, Vec::new(), Vec::new());
        }
        Answer::records(zone, answers, additionals)
    }

    #[allow(clippy::too_many_arguments)]
    fn endpoint_name(
        &self,
        name: &str,
        zone: &str,
        ns: &str,
        svc: &str,
        host: &str,
        qtype: Qtype,
        options: &Options,
    ) -> Answer {
        let ttl = options.ttl;
        let Some(service) = self.services.get(&(ns.to_string(), svc.to_string())) else {
            return Answer::nxdomain(zone);
        };
        if service.kind != ServiceKind::Headless {
            return Answer::nxdomain(zone);
        }
        let ips: Vec<IpAddr> = self
            .ready_endpoints(ns, svc)
            .iter()
            .flat_map(|e| {
                e.addresses
                    .iter()
                    .filter(|ip| Self::endpoint_host(e, **ip, options) == host)
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        if ips.is_empty() {
            return Answer::nxdomain(zone);
        }
        let answers = ips
            .into_iter()
            .filter(|ip| wants(qtype, *ip))
            .map(|ip| address_record(name, ttl, ip))
            .collect();
        Answer::records(zone, answers, Vec::new())
    }

    fn pod(
        &self,
        name: &str,
        zone: &str,
        ns: &str,
        ip: &str,
        qtype: Qtype,
        options: &Options,
    ) -> Answer {
        let Some(addr) = parse_dashed(ip) else {
            return Answer::nxdomain(zone);
        };
        let known = match options.pods {
            PodsMode::Disabled => false,
            PodsMode::Insecure => true,
            PodsMode::Verified => self.pod_ips.get(ns).is_some_and(|ips| ips.contains(&addr)),
        };
        if !known {
            return Answer::nxdomain(zone);
        }
        let answers = if wants(qtype, addr) {
            vec![address_record(name, options.ttl, addr)]
        } else {
            Vec::new()
        };
        Answer::records(zone, answers, Vec::new())
    }

    fn reverse(&self, name: &str, zone: &str, qtype: Qtype, options: &Options) -> Answer {
        let Some(ip) = reverse_to_ip(name) else {
            return Answer::nxdomain(zone);
        };
        let cluster = options
            .zones
            .iter()
            .find(|z| !z.ends_with(".arpa.") && *z != ".")
            .cloned()
            .unwrap_or_else(|| "cluster.local.".to_string());
        // As CoreDNS's kubernetes plugin: a cluster IP names its service (the first, if several
        // share it); else every service with a ready endpoint at the address names that endpoint,
        // once per service, whatever the service's type.
        let keys: Vec<&(String, String)> = self.by_address.get(&ip).into_iter().flatten().collect();
        let service_name =
            |(namespace, name): &(String, String)| format!("{name}.{namespace}.svc.{cluster}");
        let by_cluster_ip = keys.iter().find(|key| {
            self.services.get(**key).is_some_and(
                |s| matches!(&s.kind, ServiceKind::ClusterIp(ips) if ips.contains(&ip)),
            )
        });
        let mut targets: Vec<String> = match by_cluster_ip {
            Some(key) => vec![service_name(key)],
            None => keys
                .iter()
                .filter(|key| self.services.contains_key(**key))
                .filter_map(|key| {
                    let endpoint = self
                        .ready_endpoints(&key.0, &key.1)
                        .into_iter()
                        .find(|e| e.addresses.contains(&ip))?;
                    let host = Self::endpoint_host(endpoint, ip, options);
                    Some(format!("{host}.{}", service_name(key)))
                })
                .collect(),
        };
        if targets.is_empty() {
            return Answer::nxdomain(zone);
        }
        targets.sort();
        targets.dedup();
        let answers = if matches!(qtype, Qtype::Ptr | Qtype::Any) {
            targets
                .into_iter()
                .map(|t| Record {
                    name: name.to_string(),
                    ttl: options.ttl,
                    data: Data::Ptr(t),
                })
                .collect()
        } else {
            Vec::new()
        };
        Answer::records(zone, answers, Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            zones: vec![
                "cluster.local.".into(),
                "in-addr.arpa.".into(),
                "ip6.arpa.".into(),
            ],
            ttl: 5,
            pods: PodsMode::Insecure,
            endpoint_pod_names: false,
            ignore_empty_service: false,
            noendpoints: false,
        }
    }

    fn port(name: &str, protocol: &str, port: u16) -> Port {
        Port {
            name: name.into(),
            protocol: protocol.into(),
            port,
        }
    }

    fn view() -> ClusterView {
        let mut v = ClusterView::default();
        v.namespaces
            .extend(["default".to_string(), "web".to_string()]);
        let web = Service {
            namespace: "web".into(),
            name: "front".into(),
            kind: ServiceKind::ClusterIp(vec![
                "10.96.0.10".parse().unwrap(),
                "fd00::a".parse().unwrap(),
            ]),
            ports: vec![port("http", "tcp", 80), port("", "udp", 53)],
        };
        let db = Service {
            namespace: "web".into(),
            name: "db".into(),
            kind: ServiceKind::Headless,
            ports: vec![port("pg", "tcp", 5432)],
        };
        let ext = Service {
            namespace: "default".into(),
            name: "search".into(),
            kind: ServiceKind::ExternalName("www.example.org".into()),
            ports: vec![],
        };
        let empty = Service {
            namespace: "web".into(),
            name: "nobody".into(),
            kind: ServiceKind::Headless,
            ports: vec![],
        };
        for s in [web, db, ext, empty] {
            v.services.insert((s.namespace.clone(), s.name.clone()), s);
        }
        v.endpoints.insert(
            ("web".into(), "db".into()),
            vec![
                Endpoint {
                    addresses: vec!["10.244.1.5".parse().unwrap()],
                    hostname: Some("db-0".into()),
                    pod_name: Some("db-0".into()),
                    ready: true,
                    ports: vec![port("pg", "tcp", 5432)],
                },
                Endpoint {
                    addresses: vec!["10.244.2.6".parse().unwrap()],
                    hostname: None,
                    pod_name: Some("db-x7".into()),
                    ready: true,
                    ports: vec![port("pg", "tcp", 5432)],
                },
                Endpoint {
                    addresses: vec!["10.244.2.7".parse().unwrap()],
                    hostname: Some("db-2".into()),
                    pod_name: None,
                    ready: false,
                    ports: vec![port("pg", "tcp", 5432)],
                },
            ],
        );
        v.index_addresses();
        v
    }

    fn a(name: &str, ip: &str) -> Record {
        address_record(name, 5, ip.parse().unwrap())
    }

    #[test]
    fn cluster_ip_services_answer_a_and_aaaa_and_nodata_otherwise() {
        let (v, o) = (view(), options());
        let name = "front.web.svc.cluster.local.";
        let ans = v
            .lookup("Front.WEB.svc.Cluster.Local", Qtype::A, &o)
            .unwrap();
        assert_eq!(ans.rcode, Rcode::NoError);
        assert_eq!(ans.answers, vec![a(name, "10.96.0.10")]);
        let ans = v.lookup(name, Qtype::Aaaa, &o).unwrap();
        assert_eq!(ans.answers, vec![a(name, "fd00::a")]);
        let nodata = v.lookup(name, Qtype::Txt, &o).unwrap();
        assert_eq!(nodata.rcode, Rcode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.soa_zone.as_deref(), Some("cluster.local."));
        let nx = v
            .lookup("nope.web.svc.cluster.local.", Qtype::A, &o)
            .unwrap();
        assert_eq!(nx.rcode, Rcode::NxDomain);
        assert_eq!(nx.soa_zone.as_deref(), Some("cluster.local."));
        assert!(v.lookup("example.org.", Qtype::A, &o).is_none(), "not ours");
    }

    #[test]
    fn headless_services_answer_their_ready_endpoints_and_hostnames() {
        let (v, o) = (view(), options());
        let name = "db.web.svc.cluster.local.";
        let ans = v.lookup(name, Qtype::A, &o).unwrap();
        assert_eq!(
            ans.answers,
            vec![a(name, "10.244.1.5"), a(name, "10.244.2.6")]
        );
        let host = v
            .lookup("db-0.db.web.svc.cluster.local.", Qtype::A, &o)
            .unwrap();
        assert_eq!(
            host.answers,
            vec![a("db-0.db.web.svc.cluster.local.", "10.244.1.5")]
        );
        let dashed = v
            .lookup("10-244-2-6.db.web.svc.cluster.local.", Qtype::A, &o)
            .unwrap();
        assert_eq!(dashed.answers.len(), 1);
        let not_ready = v
            .lookup("db-2.db.web.svc.cluster.local.", Qtype::A, &o)
            .unwrap();
        assert_eq!(not_ready.rcode, Rcode::NxDomain);
        let none = v
            .lookup("nobody.web.svc.cluster.local.", Qtype::A, &o)
            .unwrap();
        assert_eq!(none.rcode, Rcode::NxDomain, "no ready endpoint");
        let mut pod_names = options();
        pod_names.endpoint_pod_names = true;
        let by_pod = v
            .lookup("db-x7.db.web.svc.cluster.local.", Qtype::A, &pod_names)
            .unwrap();
        assert_eq!(by_pod.answers.len(), 1);
    }

    #[test]
    fn srv_records_for_named_ports() {
        let (v, o) = (view(), options());
        let ans = v
            .lookup("_http._tcp.front.web.svc.cluster.local.", Qtype::Srv, &o)
            .unwrap();
        assert_eq!(
            ans.answers[0].data,
            Data::Srv {
                priority: 0,
                weight: 100,
                port: 80,
                target: "front.web.svc.cluster.local.".into()
            }
        );
        assert_eq!(ans.additionals.len(), 2, "A and AAAA of the target");
        let headless = v
            .lookup("_pg._tcp.db.web.svc.cluster.local.", Qtype::Srv, &o)
            .unwrap();
        let targets: Vec<_> = headless
            .answers
            .iter()
            .map(|r| match &r.data {
                Data::Srv { target, port, .. } => (target.clone(), *port),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            targets,
            vec![
                ("10-244-2-6.db.web.svc.cluster.local.".to_string(), 5432),
                ("db-0.db.web.svc.cluster.local.".to_string(), 5432),
            ]
        );
        assert_eq!(headless.additionals.len(), 2);
        let unknown = v
            .lookup("_smtp._tcp.front.web.svc.cluster.local.", Qtype::Srv, &o)
            .unwrap();
        assert_eq!(unknown.rcode, Rcode::NxDomain);
    }

    #[test]
    fn ptr_external_name_pods_version_and_namespaces() {
        let (v, o) = (view(), options());
        let ptr = v
            .lookup("10.0.96.10.in-addr.arpa.", Qtype::Ptr, &o)
            .unwrap();
        assert_eq!(
            ptr.answers[0].data,
            Data::Ptr("front.web.svc.cluster.local.".into())
        );
        let v6 = ip_to_reverse("fd00::a".parse().unwrap());
        assert_eq!(reverse_to_ip(&v6), Some("fd00::a".parse().unwrap()));
        let ptr6 = v.lookup(&v6, Qtype::Ptr, &o).unwrap();
        assert_eq!(ptr6.answers.len(), 1);
        let ptr_ep = v
            .lookup("5.1.244.10.in-addr.arpa.", Qtype::Ptr, &o)
            .unwrap();
        assert_eq!(
            ptr_ep.answers[0].data,
            Data::Ptr("db-0.db.web.svc.cluster.local.".into())
        );
        assert_eq!(
            v.lookup("9.9.9.9.in-addr.arpa.", Qtype::Ptr, &o)
                .unwrap()
                .rcode,
            Rcode::NxDomain
        );

        let cname = v
            .lookup("search.default.svc.cluster.local.", Qtype::A, &o)
            .unwrap();
        assert_eq!(
            cname.answers[0].data,
            Data::Cname("www.example.org.".into())
        );

        let pod = v
            .lookup("10-244-9-9.web.pod.cluster.local.", Qtype::A, &o)
            .unwrap();
        assert_eq!(
            pod.answers,
            vec![a("10-244-9-9.web.pod.cluster.local.", "10.244.9.9")]
        );
        let mut verified = options();
        verified.pods = PodsMode::Verified;
        assert_eq!(
            v.lookup("10-244-9-9.web.pod.cluster.local.", Qtype::A, &verified)
                .unwrap()
                .rcode,
            Rcode::NxDomain
        );

        let version = v
            .lookup("dns-version.cluster.local.", Qtype::Txt, &o)
            .unwrap();
        assert_eq!(version.answers[0].data, Data::Txt("1.1.0".into()));
        assert_eq!(
            v.lookup("web.svc.cluster.local.", Qtype::A, &o)
                .unwrap()
                .rcode,
            Rcode::NoError
        );
        assert_eq!(
            v.lookup("gone.svc.cluster.local.", Qtype::A, &o)
                .unwrap()
                .rcode,
            Rcode::NxDomain
        );
    }
}
