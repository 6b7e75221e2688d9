//! The query path: a request handler for hickory-server that picks the server block for the
//! question's zone and runs CoreDNS's plugin chain in CoreDNS's order (log, loadbalance, cache,
//! kubernetes, loop, forward), then cuts the reply to the client's size at a record boundary with
//! TC set (`fit`: 512 bytes over UDP, or the client's EDNS0 buffer) and encodes it.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, RwLock,
    },
    time::Instant,
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode},
    rr::{
        rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT},
        Name, RData, Record, RecordType,
    },
    serialize::binary::BinDecoder,
};
use hickory_server::{
    net::{runtime::Time, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponseBuilder, Queries},
};
use rand::seq::SliceRandom as _;
use tracing::{debug, error, info, warn};

use crate::{
    cache::{Cache, CacheKey, Hit},
    cluster::{self, ClusterView, Data, Qtype, Rcode},
    corefile::{self, in_zone},
    fit,
    forward::{ForwardError, Forwarder},
    handle::ViewHandle,
    metrics::{
        intern, DurationLabels, Metrics, PluginLabels, RequestLabels, ResponseLabels, SizeLabels,
    },
    reply::Reply,
};

/// One question as the plugins see it.
#[derive(Debug, Clone)]
pub struct Question {
    /// Lowercase, fully qualified.
    pub name: String,
    /// As asked (case kept), for the records answered.
    pub owner: Name,
    pub qtype: RecordType,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
    pub tcp: bool,
    /// The query as received (what `forward` sends on).
    pub raw: Arc<[u8]>,
}

impl Question {
    pub fn cache_key(&self) -> CacheKey {
        CacheKey {
            name: self.name.clone(),
            qtype: u16::from(self.qtype),
            dnssec_ok: self.dnssec_ok,
            checking_disabled: self.checking_disabled,
        }
    }
}

/// The kubernetes plugin of one server block.
pub struct Kubernetes {
    pub options: cluster::Options,
    pub view: ViewHandle,
    /// The configuration it was started from (a reload keeps the watches when it is unchanged).
    pub config: corefile::Kubernetes,
}

/// The namespace a cluster name is in (`x.NS.svc.zone`, `x.y.NS.svc.zone`, `ip.NS.pod.zone`).
fn namespace_of<'a>(name: &'a str, zone: &str) -> Option<&'a str> {
    let relative = name.strip_suffix(zone)?.strip_suffix('.')?;
    let mut labels = relative.rsplit('.');
    match labels.next()? {
        "svc" | "pod" => labels.next(),
        _ => None,
    }
}

impl Kubernetes {
    /// `namespaces NS...`: names in other namespaces do not exist (reverse answers pointing
    /// there are left out).
    fn only_exposed(&self, answer: &mut cluster::Answer, name: &str, zone: &str) {
        let exposed = |n: &str| {
            let Some(cluster_zone) = ClusterView::zone_of(n, &self.options) else {
                return true;
            };
            namespace_of(n, cluster_zone)
                .is_none_or(|ns| self.config.namespaces.iter().any(|e| e == ns))
        };
        if !exposed(name) {
            *answer = cluster::Answer {
                rcode: Rcode::NxDomain,
                answers: Vec::new(),
                additionals: Vec::new(),
                soa_zone: Some(zone.to_string()),
            };
            return;
        }
        let before = answer.answers.len();
        answer.answers.retain(|r| match &r.data {
            Data::Ptr(target) => exposed(target),
            _ => true,
        });
        if before > 0 && answer.answers.is_empty() {
            answer.rcode = Rcode::NxDomain;
            answer.additionals.clear();
            answer.soa_zone = Some(zone.to_string());
        }
    }

    fn falls_through(&self, name: &str) -> bool {
        match &self.config.fallthrough {
            None => false,
            Some(zones) if zones.is_empty() => true,
            Some(zones) => zones.iter().any(|z| in_zone(name, z)),
        }
    }
}

/// CoreDNS's `loop` plugin: a random name this server asks itself; seeing it more than twice means
/// queries come back around.
pub struct LoopProbe {
    pub name: String,
    pub seen: AtomicU32,
}

/// One server block: its zones and plugins.
pub struct Block {
    pub zones: Vec<String>,
    pub server_label: &'static str,
    pub zone_labels: Vec<&'static str>,
    pub log: bool,
    pub errors: bool,
    pub kubernetes: Option<Kubernetes>,
    pub cache: Option<Cache>,
    pub forward: Option<Arc<Forwarder>>,
    pub loadbalance: bool,
    pub loop_probe: Option<LoopProbe>,
}

/// A cached reply with the question's name written as this question wrote it (the cache is keyed
/// case-insensitively; clients that randomise case check it).
fn in_case_of(mut reply: Reply, q: &Question) -> Reply {
    for r in reply
        .answers
        .iter_mut()
        .chain(reply.authorities.iter_mut())
        .chain(reply.additionals.iter_mut())
    {
        if r.name == q.owner {
            r.name = q.owner.clone();
        }
    }
    reply
}

fn qtype_of(t: RecordType) -> Qtype {
    match t {
        RecordType::A => Qtype::A,
        RecordType::AAAA => Qtype::Aaaa,
        RecordType::SRV => Qtype::Srv,
        RecordType::PTR => Qtype::Ptr,
        RecordType::CNAME => Qtype::Cname,
        RecordType::TXT => Qtype::Txt,
        RecordType::SOA => Qtype::Soa,
        RecordType::NS => Qtype::Ns,
        RecordType::ANY => Qtype::Any,
        other => Qtype::Other(u16::from(other)),
    }
}

fn name(text: &str) -> Option<Name> {
    Name::from_ascii(text).ok()
}

/// The records of a cluster answer in hickory's form; names that do not parse are left out (they
/// cannot occur: every name is built from DNS labels the API server validated).
fn records(records: &[cluster::Record], owner: &Name, qname: &str) -> Vec<Record> {
    records
        .iter()
        .filter_map(|r| {
            let rname = if r.name == qname {
                owner.clone()
            } else {
                name(&r.name)?
            };
            let data = match &r.data {
                Data::A(ip) => RData::A(A(*ip)),
                Data::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
                Data::Srv {
                    priority,
                    weight,
                    port,
                    target,
                } => RData::SRV(SRV::new(*priority, *weight, *port, name(target)?)),
                Data::Ptr(target) => RData::PTR(PTR(name(target)?)),
                Data::Cname(target) => RData::CNAME(CNAME(name(target)?)),
                Data::Txt(text) => RData::TXT(TXT::new(vec![text.clone()])),
            };
            Some(Record::from_rdata(rname, r.ttl, data))
        })
        .collect()
}

impl Kubernetes {
    /// The zone's SOA as CoreDNS writes it (serial: the time of the last change in the view).
    fn soa(&self, zone: &str, serial: u32) -> Option<Record> {
        let ttl = self.options.ttl;
        let soa = SOA::new(
            name(&format!("ns.dns.{zone}"))?,
            name(&format!("hostmaster.{zone}"))?,
            serial,
            7200,
            1800,
            86400,
            ttl,
        );
        Some(Record::from_rdata(name(zone)?, ttl, RData::SOA(soa)))
    }

    /// The addresses of the cluster DNS service (`kube-system/kube-dns`), for `ns.dns.<zone>`.
    fn dns_service_ips(view: &ClusterView) -> Vec<IpAddr> {
        view.services
            .get(&("kube-system".to_string(), "kube-dns".to_string()))
            .map(|s| match &s.kind {
                cluster::ServiceKind::ClusterIp(ips) => ips.clone(),
                _ => Vec::new(),
            })
            .unwrap_or_default()
    }

    fn address_records(owner: &Name, ips: &[IpAddr], ttl: u32, qtype: Qtype) -> Vec<Record> {
        ips.iter()
            .filter_map(|ip| match (ip, qtype) {
                (IpAddr::V4(v4), Qtype::A | Qtype::Any | Qtype::Ns) => {
                    Some(Record::from_rdata(owner.clone(), ttl, RData::A(A(*v4))))
                }
                (IpAddr::V6(v6), Qtype::Aaaa | Qtype::Any | Qtype::Ns) => Some(Record::from_rdata(
                    owner.clone(),
                    ttl,
                    RData::AAAA(AAAA(*v6)),
                )),
                _ => None,
            })
            .collect()
    }

    /// The plugin's reply, or None to go on to the next plugin.
    fn answer(&self, q: &Question) -> Option<Reply> {
        let zone = ClusterView::zone_of(&q.name, &self.options)?.to_string();
        if !self.view.synced() {
            return Some(Reply::error(ResponseCode::ServFail, "kubernetes"));
        }
        let view = self.view.current();
        let qtype = qtype_of(q.qtype);
        let ttl = self.options.ttl;
        let serial = self.view.serial();
        let mut reply = Reply::error(ResponseCode::NoError, "kubernetes");
        reply.authoritative = true;
        let ns_name = format!("ns.dns.{zone}");
        if q.name == zone && matches!(qtype, Qtype::Soa | Qtype::Ns | Qtype::Any) {
            if matches!(qtype, Qtype::Soa | Qtype::Any) {
                reply.answers.extend(self.soa(&zone, serial));
            }
            if matches!(qtype, Qtype::Ns | Qtype::Any) {
                let target = name(&ns_name)?;
                reply.answers.push(Record::from_rdata(
                    q.owner.clone(),
                    ttl,
                    RData::NS(NS(target.clone())),
                ));
                reply.additionals =
                    Self::address_records(&target, &Self::dns_service_ips(&view), ttl, Qtype::Ns);
            }
            return Some(reply);
        }
        if q.name == ns_name {
            let ips = Self::dns_service_ips(&view);
            if !ips.is_empty() {
                reply.answers = Self::address_records(&q.owner, &ips, ttl, qtype);
                if reply.answers.is_empty() {
                    reply.authorities.extend(self.soa(&zone, serial));
                }
                return Some(reply);
            }
        }
        let mut answer = view.lookup(&q.name, qtype, &self.options)?;
        if !self.config.namespaces.is_empty() {
            self.only_exposed(&mut answer, &q.name, &zone);
        }
        if answer.rcode == Rcode::NxDomain && self.falls_through(&q.name) {
            return None;
        }
        reply.rcode = match answer.rcode {
            Rcode::NoError => ResponseCode::NoError,
            Rcode::NxDomain => ResponseCode::NXDomain,
        };
        reply.answers = records(&answer.answers, &q.owner, &q.name);
        reply.additionals = records(&answer.additionals, &q.owner, &q.name);
        if let Some(soa_zone) = &answer.soa_zone {
            reply.authorities.extend(self.soa(soa_zone, serial));
        }
        Some(reply)
    }
}

/// The label CoreDNS gives a server: `dns://:53`.
pub fn server_label(port: u16) -> &'static str {
    intern(&format!("dns://:{port}"))
}

impl Block {
    /// The block a Corefile server block describes: `view` for its kubernetes plugin (if it has
    /// one) and `forward` already made (if it has one). Marks its plugins in
    /// `coredns_plugin_enabled`.
    pub fn new(
        s: &corefile::Server,
        view: Option<ViewHandle>,
        forward: Option<Arc<Forwarder>>,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let server = server_label(s.listen.port);
        let zone_labels: Vec<&'static str> = s.listen.zones.iter().map(|z| intern(z)).collect();
        let kubernetes = s.kubernetes.as_ref().zip(view).map(|(k, view)| Kubernetes {
            options: cluster::Options {
                zones: k.zones.clone(),
                ttl: k.ttl,
                pods: k.pods,
                endpoint_pod_names: k.endpoint_pod_names,
                ignore_empty_service: k.ignore_empty_service,
                noendpoints: k.noendpoints,
            },
            view,
            config: k.clone(),
        });
        let cache = s.cache.clone().map(|c| {
            let named = if c.zones.is_empty() {
                &s.listen.zones
            } else {
                &c.zones
            };
            let zones = intern(&named.join(" "));
            Cache::new(c, metrics.clone(), server, zones)
        });
        let loop_probe = (s.loop_detect && forward.is_some()).then(|| LoopProbe {
            name: loop_probe_name(s.listen.zones.first().map(String::as_str).unwrap_or(".")),
            seen: AtomicU32::new(0),
        });
        for zone in &zone_labels {
            for (on, name) in [
                (s.errors, "errors"),
                (s.log, "log"),
                (s.health.is_some(), "health"),
                (s.ready.is_some(), "ready"),
                (s.prometheus.is_some(), "prometheus"),
                (kubernetes.is_some(), "kubernetes"),
                (forward.is_some(), "forward"),
                (cache.is_some(), "cache"),
                (s.loop_detect, "loop"),
                (s.reload.is_some(), "reload"),
                (s.loadbalance, "loadbalance"),
            ] {
                if on {
                    metrics
                        .plugin_enabled
                        .get_or_create(&PluginLabels {
                            server,
                            zone,
                            view: "",
                            name,
                        })
                        .set(1);
                }
            }
        }
        Block {
            zones: s.listen.zones.clone(),
            server_label: server,
            zone_labels,
            log: s.log,
            errors: s.errors,
            kubernetes,
            cache,
            forward,
            loadbalance: s.loadbalance,
            loop_probe,
        }
    }

    /// Whether this block's zones hold `name`, and how specific the match is.
    fn zone_match(&self, name: &str) -> Option<(usize, usize)> {
        self.zones
            .iter()
            .enumerate()
            .filter(|(_, z)| in_zone(name, z))
            .map(|(i, z)| (if z == "." { 0 } else { z.len() }, i))
            .max()
    }

    /// The chain from the cache on.
    pub async fn resolve(self: &Arc<Self>, q: &Question) -> Reply {
        if let Some(cache) = self.cache.as_ref().filter(|c| c.matches(&q.name)) {
            let key = q.cache_key();
            match cache.get(&key, Instant::now()) {
                Hit::Fresh(reply) => return in_case_of(reply, q),
                Hit::Refresh(reply) => {
                    let reply = in_case_of(reply, q);
                    // Prefetch, or an expired entry served stale: answer now, refresh behind.
                    let block = self.clone();
                    let q = q.clone();
                    tokio::spawn(async move {
                        let fresh = block.resolve_uncached(&q).await;
                        if let Some(cache) = &block.cache {
                            cache.put(q.cache_key(), &fresh, Instant::now());
                        }
                    });
                    return reply;
                }
                Hit::Miss => {
                    let reply = self.resolve_uncached(q).await;
                    cache.put(key, &reply, Instant::now());
                    return reply;
                }
            }
        }
        self.resolve_uncached(q).await
    }

    async fn resolve_uncached(&self, q: &Question) -> Reply {
        if let Some(k) = &self.kubernetes {
            if let Some(reply) = k.answer(q) {
                return reply;
            }
        }
        if let Some(probe) = &self.loop_probe {
            if q.name == probe.name && u16::from(q.qtype) == u16::from(RecordType::HINFO) {
                let seen = probe.seen.fetch_add(1, Ordering::SeqCst) + 1;
                if seen > 2 {
                    error!(
                        zone = self.zones.first().map(String::as_str).unwrap_or("."),
                        query = %probe.name,
                        "Loop detected: this server's own query came back {seen} times; the \
                         forward upstream leads back here (see CoreDNS's loop plugin)"
                    );
                    std::process::exit(1);
                }
            }
        }
        if let Some(f) = self.forward.as_ref().filter(|f| f.matches(&q.name)) {
            return match f.exchange(&q.raw, q.tcp).await {
                Ok(bytes) => match Message::from_vec(&bytes) {
                    Ok(message) => Reply::from_message(message, "forward"),
                    Err(e) => {
                        warn!(error = %e, name = %q.name, "forward: upstream answer does not parse");
                        Reply::error(ResponseCode::ServFail, "forward")
                    }
                },
                Err(ForwardError::MaxConcurrent) => Reply::error(ResponseCode::Refused, "forward"),
                Err(ForwardError::BadQuery(_)) => Reply::error(ResponseCode::FormErr, "forward"),
                Err(e) => {
                    if self.errors {
                        error!(name = %q.name, qtype = %q.qtype, error = %e, "forward failed");
                    }
                    Reply::error(ResponseCode::ServFail, "forward")
                }
            };
        }
        Reply::error(ResponseCode::ServFail, "")
    }
}

/// Every server block listening on one port.
pub struct Pipeline {
    pub blocks: Vec<Arc<Block>>,
}

impl Pipeline {
    fn block_for(&self, name: &str) -> Option<(&Arc<Block>, usize)> {
        self.blocks
            .iter()
            .filter_map(|b| b.zone_match(name).map(|m| (m, b)))
            .max_by_key(|(m, _)| m.0)
            .map(|((_, i), b)| (b, i))
    }
}

/// The hickory-server handler; the pipeline is swapped whole on reload.
#[derive(Clone)]
pub struct Handler {
    pub pipeline: Arc<RwLock<Arc<Pipeline>>>,
    pub metrics: Arc<Metrics>,
}

impl Handler {
    pub fn new(pipeline: Pipeline, metrics: Arc<Metrics>) -> Self {
        Handler {
            pipeline: Arc::new(RwLock::new(Arc::new(pipeline))),
            metrics,
        }
    }

    pub fn current(&self) -> Arc<Pipeline> {
        match self.pipeline.read() {
            Ok(p) => p.clone(),
            Err(e) => e.into_inner().clone(),
        }
    }

    pub fn swap(&self, pipeline: Pipeline) {
        let pipeline = Arc::new(pipeline);
        match self.pipeline.write() {
            Ok(mut p) => *p = pipeline,
            Err(e) => *e.into_inner() = pipeline,
        }
    }
}

fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::YXDomain => "YXDOMAIN",
        ResponseCode::YXRRSet => "YXRRSET",
        ResponseCode::NXRRSet => "NXRRSET",
        ResponseCode::NotAuth => "NOTAUTH",
        ResponseCode::NotZone => "NOTZONE",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}

fn type_label(t: RecordType) -> &'static str {
    // CoreDNS counts the common types by name and everything else as "other".
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::CNAME => "CNAME",
        RecordType::MX => "MX",
        RecordType::NS => "NS",
        RecordType::PTR => "PTR",
        RecordType::SOA => "SOA",
        RecordType::SRV => "SRV",
        RecordType::TXT => "TXT",
        RecordType::HTTPS => "HTTPS",
        RecordType::ANY => "ANY",
        RecordType::IXFR => "IXFR",
        RecordType::AXFR => "AXFR",
        _ => "other",
    }
}

/// Whether the question section's names are written out in full (no compression pointers).
fn questions_uncompressed(mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        loop {
            let Some((&len, rest)) = bytes.split_first() else {
                return false;
            };
            if len & 0xc0 != 0 {
                return false;
            }
            let Some(rest) = rest.get(usize::from(len)..) else {
                return false;
            };
            bytes = rest;
            if len == 0 {
                break;
            }
        }
        // Type and class.
        let Some(rest) = bytes.get(4..) else {
            return false;
        };
        bytes = rest;
    }
    true
}

/// CoreDNS's `loadbalance` (round_robin): the A and AAAA records of an answer in random order.
fn shuffle_addresses(answers: &mut [Record]) {
    let positions: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.record_type(), RecordType::A | RecordType::AAAA))
        .map(|(i, _)| i)
        .collect();
    if positions.len() < 2 {
        return;
    }
    let mut picked: Vec<Record> = positions.iter().map(|&i| answers[i].clone()).collect();
    picked.shuffle(&mut rand::rng());
    for (slot, record) in positions.into_iter().zip(picked) {
        answers[slot] = record;
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let tcp = matches!(request.protocol(), Protocol::Tcp);
        let mut response_edns = Edns::new();
        response_edns.set_max_payload(request.max_payload().clamp(512, 4096));
        let edns = request.edns.as_ref().map(|_| &response_edns);
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = edns {
            builder.edns(e);
        }

        let fail = |code: ResponseCode| {
            let mut m = Metadata::response_from_request(&request.metadata);
            m.response_code = code;
            m
        };
        if !questions_uncompressed(request.queries.as_bytes()) {
            // The question is echoed as it came; a compression pointer in it can only point at
            // the header (nothing precedes it), which no client sends and no answer can carry.
            let Ok(none) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
                return send(
                    &mut response_handle,
                    builder.build_no_records(fail(ResponseCode::FormErr)),
                )
                .await;
            };
            let mut b = MessageResponseBuilder::new(&none, None);
            if let Some(e) = edns {
                b.edns(e);
            }
            return send(
                &mut response_handle,
                b.build_no_records(fail(ResponseCode::FormErr)),
            )
            .await;
        }
        if request.metadata.message_type != MessageType::Query {
            return send(
                &mut response_handle,
                builder.build_no_records(fail(ResponseCode::FormErr)),
            )
            .await;
        }
        if request.metadata.op_code != OpCode::Query {
            return send(
                &mut response_handle,
                builder.build_no_records(fail(ResponseCode::NotImp)),
            )
            .await;
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            // RFC 6891: an unknown EDNS version is BADVERS, with our OPT (version 0).
            let mut m = fail(ResponseCode::NoError);
            m.response_code = ResponseCode::BADVERS;
            return send(&mut response_handle, builder.build_no_records(m)).await;
        }
        let Ok(info) = request.request_info() else {
            return send(
                &mut response_handle,
                builder.build_no_records(fail(ResponseCode::FormErr)),
            )
            .await;
        };
        let query = info.query;
        let owner: Name = query.original().name().clone();
        let qname = owner.to_lowercase().to_ascii();
        let qname = if qname.ends_with('.') {
            qname
        } else {
            format!("{qname}.")
        };
        let qtype = query.query_type();
        let pipeline = self.current();
        let Some((block, zone_index)) = pipeline.block_for(&qname) else {
            return send(
                &mut response_handle,
                builder.build_no_records(fail(ResponseCode::Refused)),
            )
            .await;
        };
        let block = block.clone();
        let zone = block.zone_labels.get(zone_index).copied().unwrap_or(".");
        let server = block.server_label;
        let family = if request.src().is_ipv6() { "2" } else { "1" };
        let proto = if tcp { "tcp" } else { "udp" };
        let type_ = type_label(qtype);
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                server,
                zone,
                view: "",
                proto,
                family,
                r#type: type_,
            })
            .inc();
        self.metrics
            .request_size
            .get_or_create(&SizeLabels {
                server,
                zone,
                view: "",
                proto,
            })
            .observe(request.as_slice().len() as f64);

        let question = Question {
            name: qname,
            owner,
            qtype,
            dnssec_ok: request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            checking_disabled: request.metadata.checking_disabled,
            tcp,
            raw: Arc::from(request.as_slice()),
        };
        let mut reply = block.resolve(&question).await;
        if block.loadbalance {
            shuffle_addresses(&mut reply.answers);
        }

        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.rcode;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = reply.recursion_available;
        fit::fit(
            &mut reply,
            &request.queries,
            metadata,
            edns,
            fit::limit(tcp, edns),
        );
        metadata.truncation = reply.truncated;
        let response = builder.build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        let info = send(&mut response_handle, response).await;

        self.metrics
            .responses
            .get_or_create(&ResponseLabels {
                server,
                zone,
                view: "",
                rcode: rcode_label(info.response_code),
                plugin: reply.plugin,
            })
            .inc();
        self.metrics
            .duration
            .get_or_create(&DurationLabels {
                server,
                zone,
                view: "",
                r#type: type_,
            })
            .observe(started.elapsed().as_secs_f64());
        if block.log {
            info!(
                remote = %request.src(),
                id = request.metadata.id,
                qtype = %question.qtype,
                name = %question.name,
                proto,
                rcode = rcode_label(info.response_code),
                answers = info.counts().answers,
                truncated = info.truncation,
                duration_ms = started.elapsed().as_secs_f64() * 1e3,
                "query"
            );
        }
        info
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let mut fallback = *response.metadata();
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "sending a response failed");
            fallback.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_proto::op::Header {
                metadata: fallback,
                counts: Default::default(),
            })
        }
    }
}

/// A random label pair under `zone` for the loop probe (`<n>.<n>.<zone>`).
pub fn loop_probe_name(zone: &str) -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    if zone == "." {
        format!("{a}.{b}.")
    } else {
        format!("{a}.{b}.{zone}")
    }
}

/// Keeps the encoded response instead of sending it: the UDP listener sends answers in batches.
#[derive(Clone)]
struct Capture {
    tcp: bool,
    slot: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl Capture {
    fn take(&self) -> Option<Vec<u8>> {
        match self.slot.lock() {
            Ok(mut slot) => slot.take(),
            Err(e) => e.into_inner().take(),
        }
    }
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: hickory_server::zone_handler::MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, hickory_server::net::NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = hickory_proto::serialize::binary::BinEncoder::new(&mut bytes);
        let limit = fit::limit(self.tcp, response.edns());
        encoder.set_max_size(u16::try_from(limit).unwrap_or(u16::MAX));
        let info = response.destructive_emit(&mut encoder)?;
        // A record the encoder rolled back leaves its bytes past the end of the message.
        encoder.trim();
        match self.slot.lock() {
            Ok(mut slot) => *slot = Some(bytes),
            Err(e) => *e.into_inner() = Some(bytes),
        }
        Ok(info)
    }
}

/// The answer to a message whose header reads but whose rest does not: FORMERR with no sections.
fn formerr_for(bytes: &[u8]) -> Option<Vec<u8>> {
    use hickory_proto::{
        op::Header,
        serialize::binary::{BinDecodable as _, BinEncodable as _, BinEncoder},
    };
    let header = Header::read(&mut BinDecoder::new(bytes)).ok()?;
    let mut metadata = Metadata::response_from_request(&header.metadata);
    metadata.response_code = ResponseCode::FormErr;
    let header = Header {
        metadata,
        counts: Default::default(),
    };
    let mut out = Vec::with_capacity(12);
    header.emit(&mut BinEncoder::new(&mut out)).ok()?;
    Some(out)
}

/// The answer to one DNS message from `src` over UDP: None when it is dropped (shorter than a
/// header), FORMERR when the rest does not parse, else the handler's answer, cut to what a UDP
/// client can take. The UDP listener and the fuzz target both answer through it.
pub async fn answer_udp(handler: Handler, bytes: Vec<u8>, src: SocketAddr) -> Option<Vec<u8>> {
    answer(handler, bytes, src, Protocol::Udp).await
}

/// The answer to one DNS message as it would be sent over `protocol` (TCP answers are cut only at
/// 64 KiB).
pub async fn answer(
    handler: Handler,
    bytes: Vec<u8>,
    src: SocketAddr,
    protocol: Protocol,
) -> Option<Vec<u8>> {
    let header: [u8; 12] = bytes.get(..12)?.try_into().ok()?;
    let Ok(request) = Request::from_bytes(bytes, src, protocol) else {
        return formerr_for(&header);
    };
    let capture = Capture {
        tcp: matches!(protocol, Protocol::Tcp),
        slot: Arc::default(),
    };
    let _ = handler
        .handle_request::<_, hickory_server::net::runtime::TokioTime>(&request, capture.clone())
        .await;
    capture.take()
}
