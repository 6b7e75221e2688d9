//! The `forward` plugin: queries inside a zone (and outside its `except` zones) are sent to upstream
//! resolvers, as CoreDNS's *forward* does it.
//!
//! * Transport: UDP to the upstream, retried over TCP against the same upstream when the answer
//!   comes back truncated (TC). `force_tcp` always uses TCP; a client that asked over TCP is
//!   forwarded over TCP unless `prefer_udp`. Each exchange with an upstream uses a fresh random
//!   message ID; answers whose ID, QR bit or question do not match are ignored (the read goes on
//!   until its timeout), and the client's ID is put back into the returned answer.
//! * Timeouts: [`READ_TIMEOUT`] per attempt (CoreDNS's read timeout), [`EXCHANGE_DEADLINE`] for a
//!   whole [`Forwarder::exchange`] (CoreDNS's `defaultTimeout`).
//! * Connections: TCP connections are kept per upstream and reused while used within `expire`; UDP
//!   uses a fresh connected socket per query.
//! * Upstream choice: the `policy` orders the upstreams (random, round robin, sequential); ones
//!   marked down are skipped; on an error the next one is tried. When every upstream is down, one is
//!   picked at random anyway ("all upstreams down, falling back to random").
//! * Health: each failed exchange and each failed health check counts a failure; an upstream whose
//!   consecutive failures reach `max_fails` is down (`max_fails 0`: never down, never checked). A
//!   failing upstream is checked every `health_check` with `. IN NS` (RD set) until any answer comes
//!   back, which, like a successful exchange, resets its failures. The checks run in the task
//!   [`Forwarder::spawn_health_checks`] starts.
//! * Metrics: CoreDNS's (see [`ForwardMetrics`]).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Header, Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
    serialize::binary::{BinDecodable, BinDecoder},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use rand::seq::SliceRandom;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
    sync::Notify,
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::corefile::{fqdn, in_zone, Forward, Policy};

/// How long one attempt waits for an upstream's answer (CoreDNS's static read timeout).
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to an upstream over TCP may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most one [`Forwarder::exchange`] takes, over every upstream and retry (CoreDNS's
/// `defaultTimeout`).
pub const EXCHANGE_DEADLINE: Duration = Duration::from_secs(5);
/// How long a health check waits for an answer (CoreDNS's health checker read timeout).
pub const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// CoreDNS refuses more upstreams than this.
pub const MAX_UPSTREAMS: usize = 15;
/// Idle TCP connections kept per upstream.
const MAX_IDLE_TCP: usize = 64;
/// The `proxy_name` label of the `coredns_proxy_*` metrics.
const PROXY_NAME: &str = "forward";
/// The largest DNS message.
const MAX_MESSAGE: usize = 65535;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("forward: no usable upstream")]
    NoUpstreams,
    #[error("forward: more than {MAX_UPSTREAMS} upstreams ({0})")]
    TooManyUpstreams(usize),
    #[error("forward: reading {}: {source}", path.display())]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("forward: {0:?} is not an upstream (IP, IP:PORT, [IPv6]:PORT, dns://..., or a resolv.conf path)")]
    BadAddress(String),
    /// The client's query could not be forwarded (not a query with one question, or not a DNS
    /// message at all). The caller answers FORMERR.
    #[error("forward: malformed query: {0}")]
    BadQuery(String),
    /// More exchanges than `max_concurrent` are in flight. The caller answers REFUSED.
    #[error("forward: too many concurrent queries")]
    MaxConcurrent,
    /// The last upstream tried did not answer in time.
    #[error("forward: upstream {upstream} timed out")]
    Timeout { upstream: SocketAddr },
    /// The last upstream tried failed with a network error.
    #[error("forward: upstream {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------------
// Metrics

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToLabels {
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToRcodeLabels {
    pub to: String,
    pub rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyToLabels {
    pub proxy_name: &'static str,
    pub to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyRcodeLabels {
    pub proxy_name: &'static str,
    pub to: String,
    pub rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyConnLabels {
    pub proxy_name: &'static str,
    pub to: String,
    pub proto: &'static str,
}

fn duration_histogram() -> Histogram {
    // CoreDNS's plugin.TimeBuckets: 0.25 ms doubling 16 times (to about 8 s).
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

/// The forwarder's metrics under CoreDNS's names and labels. `to` is the upstream as `ip:port`
/// (`[v6]:port`), `rcode` CoreDNS's name of the upstream's RCODE (`NOERROR`, `NXDOMAIN`, ...).
///
/// CoreDNS 1.11 moved the per-upstream series to `coredns_proxy_*{proxy_name="forward"}` and kept
/// `coredns_forward_healthcheck_broken_total` and `coredns_forward_max_concurrent_rejects_total`;
/// the older `coredns_forward_{requests,responses}_total`, `coredns_forward_request_duration_seconds`
/// and `coredns_forward_healthcheck_failures_total` are exported as well so dashboards of either
/// generation work. Clones share the same series (one instance per process survives reloads).
#[derive(Clone, Debug)]
pub struct ForwardMetrics {
    /// `coredns_forward_requests_total{to}` (before CoreDNS 1.11).
    pub requests: Family<ToLabels, Counter>,
    /// `coredns_forward_responses_total{to,rcode}` (before CoreDNS 1.11).
    pub responses: Family<ToRcodeLabels, Counter>,
    /// `coredns_forward_request_duration_seconds{to,rcode}` (before CoreDNS 1.11).
    pub request_duration: Family<ToRcodeLabels, Histogram, fn() -> Histogram>,
    /// `coredns_forward_healthcheck_failures_total{to}` (before CoreDNS 1.11).
    pub healthcheck_failures: Family<ToLabels, Counter>,
    /// `coredns_forward_healthcheck_broken_total`: every upstream was down, one was picked at random.
    pub healthcheck_broken: Counter,
    /// `coredns_forward_max_concurrent_rejects_total`.
    pub max_concurrent_rejects: Counter,
    /// `coredns_proxy_request_duration_seconds{proxy_name,to,rcode}`.
    pub proxy_request_duration: Family<ProxyRcodeLabels, Histogram, fn() -> Histogram>,
    /// `coredns_proxy_healthcheck_failures_total{proxy_name,to}`.
    pub proxy_healthcheck_failures: Family<ProxyToLabels, Counter>,
    /// `coredns_proxy_conn_cache_hits_total{proxy_name,to,proto}`.
    pub proxy_conn_cache_hits: Family<ProxyConnLabels, Counter>,
    /// `coredns_proxy_conn_cache_misses_total{proxy_name,to,proto}`.
    pub proxy_conn_cache_misses: Family<ProxyConnLabels, Counter>,
}

impl Default for ForwardMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ForwardMetrics {
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            responses: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            healthcheck_failures: Family::default(),
            healthcheck_broken: Counter::default(),
            max_concurrent_rejects: Counter::default(),
            proxy_request_duration: Family::new_with_constructor(duration_histogram),
            proxy_healthcheck_failures: Family::default(),
            proxy_conn_cache_hits: Family::default(),
            proxy_conn_cache_misses: Family::default(),
        }
    }

    /// Registers every series under its full name (counters get `_total` from the encoder).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "coredns_forward_requests",
            "Counter of requests made per upstream",
            self.requests.clone(),
        );
        registry.register(
            "coredns_forward_responses",
            "Counter of responses received per upstream",
            self.responses.clone(),
        );
        registry.register(
            "coredns_forward_request_duration_seconds",
            "Histogram of the time each request took",
            self.request_duration.clone(),
        );
        registry.register(
            "coredns_forward_healthcheck_failures",
            "Counter of the number of failed healthchecks",
            self.healthcheck_failures.clone(),
        );
        registry.register(
            "coredns_forward_healthcheck_broken",
            "Counter of the number of complete failures of the healthchecks",
            self.healthcheck_broken.clone(),
        );
        registry.register(
            "coredns_forward_max_concurrent_rejects",
            "Counter of the number of queries rejected because the concurrent queries were at maximum",
            self.max_concurrent_rejects.clone(),
        );
        registry.register(
            "coredns_proxy_request_duration_seconds",
            "Histogram of the time each request took",
            self.proxy_request_duration.clone(),
        );
        registry.register(
            "coredns_proxy_healthcheck_failures",
            "Counter of the number of failed healthchecks",
            self.proxy_healthcheck_failures.clone(),
        );
        registry.register(
            "coredns_proxy_conn_cache_hits",
            "Counter of connection cache hits per upstream and protocol",
            self.proxy_conn_cache_hits.clone(),
        );
        registry.register(
            "coredns_proxy_conn_cache_misses",
            "Counter of connection cache misses per upstream and protocol",
            self.proxy_conn_cache_misses.clone(),
        );
    }

    fn conn(&self, to: &str, proto: &'static str, hit: bool) {
        let labels = ProxyConnLabels {
            proxy_name: PROXY_NAME,
            to: to.to_string(),
            proto,
        };
        if hit {
            self.proxy_conn_cache_hits.get_or_create(&labels).inc();
        } else {
            self.proxy_conn_cache_misses.get_or_create(&labels).inc();
        }
    }

    fn request(&self, to: &str) {
        self.requests
            .get_or_create(&ToLabels { to: to.to_string() })
            .inc();
    }

    fn response(&self, to: &str, rcode: String, took: Duration) {
        let labels = ToRcodeLabels {
            to: to.to_string(),
            rcode,
        };
        self.responses.get_or_create(&labels).inc();
        self.request_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.proxy_request_duration
            .get_or_create(&ProxyRcodeLabels {
                proxy_name: PROXY_NAME,
                to: labels.to,
                rcode: labels.rcode,
            })
            .observe(took.as_secs_f64());
    }

    fn healthcheck_failure(&self, to: &str) {
        self.healthcheck_failures
            .get_or_create(&ToLabels { to: to.to_string() })
            .inc();
        self.proxy_healthcheck_failures
            .get_or_create(&ProxyToLabels {
                proxy_name: PROXY_NAME,
                to: to.to_string(),
            })
            .inc();
    }
}

/// CoreDNS's (miekg/dns's) name of an RCODE, the number for the unnamed ones.
fn rcode_name(rcode: u16) -> String {
    let name = match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        11 => "DSOTYPENI",
        16 => "BADSIG",
        17 => "BADKEY",
        18 => "BADTIME",
        19 => "BADMODE",
        20 => "BADNAME",
        21 => "BADALG",
        22 => "BADTRUNC",
        23 => "BADCOOKIE",
        other => return other.to_string(),
    };
    name.to_string()
}

// ---------------------------------------------------------------------------------------------
// Wire format helpers

/// What an answer must carry to be taken as the answer to what was sent.
struct Expect<'a> {
    id: u16,
    /// The question to match (name case-insensitively, type, class); `None` for health checks,
    /// where any answer with the right ID will do.
    question: Option<&'a Query>,
}

/// The client's query, checked once.
struct ClientQuery<'a> {
    wire: &'a [u8],
    id: u16,
    question: Query,
}

fn parse_query(wire: &[u8]) -> Result<ClientQuery<'_>, ForwardError> {
    if wire.len() > MAX_MESSAGE {
        return Err(ForwardError::BadQuery(format!(
            "{} bytes is more than a DNS message holds",
            wire.len()
        )));
    }
    let mut decoder = BinDecoder::new(wire);
    let header = Header::read(&mut decoder).map_err(|e| ForwardError::BadQuery(e.to_string()))?;
    if header.metadata.message_type != MessageType::Query {
        return Err(ForwardError::BadQuery("a response, not a query".into()));
    }
    if header.counts.queries != 1 {
        return Err(ForwardError::BadQuery(format!(
            "{} questions, not one",
            header.counts.queries
        )));
    }
    let question = Query::read(&mut decoder).map_err(|e| ForwardError::BadQuery(e.to_string()))?;
    Ok(ClientQuery {
        wire,
        id: header.metadata.id,
        question,
    })
}

/// `wire` with its message ID replaced.
fn with_id(wire: &[u8], id: u16) -> Vec<u8> {
    let mut out = wire.to_vec();
    if out.len() >= 2 {
        out[..2].copy_from_slice(&id.to_be_bytes());
    }
    out
}

/// Why a message read from an upstream is not the answer (logged, then the read goes on).
fn mismatch(buf: &[u8], expect: &Expect<'_>) -> Option<&'static str> {
    let mut decoder = BinDecoder::new(buf);
    let Ok(header) = Header::read(&mut decoder) else {
        return Some("shorter than a DNS header");
    };
    if header.metadata.id != expect.id {
        return Some("another message ID");
    }
    if header.metadata.message_type != MessageType::Response {
        return Some("not a response");
    }
    let question = expect.question?;
    if header.counts.queries == 0 {
        // Error answers need not repeat the question (RFC 1035 4.1.2 leaves it open; FORMERR and
        // NOTIMP answers often do not).
        return if header.metadata.response_code.low() != 0 {
            None
        } else {
            Some("no question")
        };
    }
    match Query::read(&mut decoder) {
        Ok(q)
            if q.name() == question.name()
                && q.query_type() == question.query_type()
                && q.query_class() == question.query_class() =>
        {
            None
        }
        Ok(_) => Some("another question"),
        Err(_) => Some("malformed question"),
    }
}

fn truncated(buf: &[u8]) -> bool {
    buf.len() > 2 && buf[2] & 0x02 != 0
}

/// The answer's full RCODE: the header's four bits, with the EDNS OPT record's upper eight bits
/// when there is one. Whatever cannot be read leaves the header's.
fn response_rcode(buf: &[u8]) -> u16 {
    let low = u16::from(buf.get(3).copied().unwrap_or(0) & 0x0f);
    let mut decoder = BinDecoder::new(buf);
    let Ok(header) = Header::read(&mut decoder) else {
        return low;
    };
    for _ in 0..header.counts.queries {
        if Query::read(&mut decoder).is_err() {
            return low;
        }
    }
    let records = u32::from(header.counts.answers)
        + u32::from(header.counts.authorities)
        + u32::from(header.counts.additionals);
    let additional_from = records - u32::from(header.counts.additionals);
    for i in 0..records {
        if Name::read(&mut decoder).is_err() {
            return low;
        }
        let fields = (|| {
            let rtype = decoder.read_u16().ok()?.unverified();
            let _class = decoder.read_u16().ok()?.unverified();
            let ttl = decoder.read_u32().ok()?.unverified();
            let len = decoder.read_u16().ok()?.unverified();
            decoder.read_slice(usize::from(len)).ok()?;
            Some((rtype, ttl))
        })();
        let Some((rtype, ttl)) = fields else {
            return low;
        };
        if i >= additional_from && rtype == u16::from(RecordType::OPT) {
            return (((ttl >> 24) as u16) << 4) | low;
        }
    }
    low
}

fn is_timeout(e: &Failure) -> bool {
    matches!(e, Failure::Timeout)
}

/// How one attempt against one upstream failed.
#[derive(Debug)]
enum Failure {
    Timeout,
    Io(std::io::Error),
}

impl Failure {
    fn into_error(self, upstream: SocketAddr) -> ForwardError {
        match self {
            Failure::Timeout => ForwardError::Timeout { upstream },
            Failure::Io(source) => ForwardError::Io { upstream, source },
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::TimedOut {
            Failure::Timeout
        } else {
            Failure::Io(e)
        }
    }
}

/// Sends `wire` from a fresh connected UDP socket and waits up to `limit` for the answer.
async fn udp_roundtrip(
    addr: SocketAddr,
    wire: &[u8],
    expect: &Expect<'_>,
    limit: Duration,
) -> Result<Vec<u8>, Failure> {
    let work = async {
        let local: SocketAddr = match addr {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(addr).await?;
        socket.send(wire).await?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let n = socket.recv(&mut buf).await?;
            let got = &buf[..n];
            match mismatch(got, expect) {
                None => return Ok(got.to_vec()),
                Some(why) => debug!(upstream = %addr, why, "forward: ignoring a datagram"),
            }
        }
    };
    match tokio::time::timeout(limit, work).await {
        Ok(result) => result,
        Err(_) => Err(Failure::Timeout),
    }
}

/// A TCP exchange's failure, and whether it came before any byte of an answer (a cached
/// connection the upstream closed fails that way, and is worth one more try on a new one).
struct TcpFailure {
    failure: Failure,
    before_reply: bool,
}

/// Writes `wire` (length-prefixed) on `stream` and reads messages until the answer, for up to
/// `limit`.
async fn tcp_roundtrip(
    stream: &mut TcpStream,
    addr: SocketAddr,
    wire: &[u8],
    expect: &Expect<'_>,
    limit: Duration,
) -> Result<Vec<u8>, TcpFailure> {
    let mut before_reply = true;
    let work = async {
        let len = u16::try_from(wire.len())
            .map_err(|_| std::io::Error::other("message longer than 65535 bytes"))?;
        let mut framed = Vec::with_capacity(wire.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(wire);
        stream.write_all(&framed).await?;
        loop {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            before_reply = false;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf).await?;
            match mismatch(&buf, expect) {
                None => return Ok(buf),
                Some(why) => debug!(upstream = %addr, why, "forward: ignoring a TCP message"),
            }
        }
    };
    let result: Result<Result<Vec<u8>, std::io::Error>, _> =
        tokio::time::timeout(limit, work).await;
    match result {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(TcpFailure {
            failure: e.into(),
            before_reply,
        }),
        Err(_) => Err(TcpFailure {
            failure: Failure::Timeout,
            before_reply: false,
        }),
    }
}

async fn tcp_connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, Failure> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            // Only latency: a failure here changes nothing about the exchange.
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Failure::Timeout),
    }
}

// ---------------------------------------------------------------------------------------------
// Upstreams

#[derive(Debug)]
struct IdleConn {
    stream: TcpStream,
    used: Instant,
}

#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    /// `addr` as the `to` label.
    label: String,
    /// Consecutive failures (exchanges and health checks).
    fails: AtomicU32,
    idle_tcp: Mutex<Vec<IdleConn>>,
}

impl Upstream {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            label: addr.to_string(),
            fails: AtomicU32::new(0),
            idle_tcp: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleConn>> {
        // The list stays consistent whatever a panicking holder did: recover it.
        match self.idle_tcp.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The most recently used connection still within `expire`.
    fn take_conn(&self, expire: Duration) -> Option<TcpStream> {
        let mut idle = self.idle();
        while let Some(conn) = idle.pop() {
            if conn.used.elapsed() <= expire {
                return Some(conn.stream);
            }
        }
        None
    }

    fn put_conn(&self, stream: TcpStream) {
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE_TCP {
            idle.push(IdleConn {
                stream,
                used: Instant::now(),
            });
        }
    }

    /// Closes the connections idle for longer than `expire`.
    fn prune(&self, expire: Duration) {
        self.idle().retain(|c| c.used.elapsed() <= expire);
    }

    fn fails(&self) -> u32 {
        self.fails.load(Ordering::Relaxed)
    }

    fn down(&self, max_fails: u32) -> bool {
        max_fails != 0 && self.fails() >= max_fails
    }

    /// Counts a failure; true when it is the one that marks the upstream down.
    fn fail(&self, max_fails: u32) -> bool {
        if max_fails == 0 {
            return false;
        }
        let before = self
            .fails
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_add(1))
            })
            .unwrap_or_else(|f| f);
        before.saturating_add(1) == max_fails
    }

    /// Resets the failures; true when the upstream was down.
    fn succeed(&self, max_fails: u32) -> bool {
        let before = self.fails.swap(0, Ordering::Relaxed);
        max_fails != 0 && before >= max_fails
    }
}

/// Reads the `nameserver` lines of a resolv.conf (port 53). Comments, other options and lines
/// that do not hold an IP address are skipped.
fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, ForwardError> {
    let text = std::fs::read_to_string(path).map_err(|source| ForwardError::ResolvConf {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        match words.next().map(str::parse::<IpAddr>) {
            Some(Ok(ip)) => out.push(SocketAddr::new(ip, 53)),
            Some(Err(_)) => warn!(
                path = %path.display(),
                line,
                "forward: skipping a nameserver that is not an IP address (or has a zone)"
            ),
            None => {}
        }
    }
    if out.is_empty() {
        warn!(path = %path.display(), "forward: no nameserver in resolv.conf");
    }
    Ok(out)
}

/// `8.8.8.8`, `8.8.8.8:53`, `::1`, `[::1]`, `[::1]:53`, with an optional `dns://`.
fn parse_address(text: &str) -> Option<SocketAddr> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    bare.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, 53))
}

/// The upstreams `to` names, in order, without repeats.
fn resolve_upstreams(to: &[String]) -> Result<Vec<SocketAddr>, ForwardError> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for entry in to {
        let entry = entry.trim();
        let found = if entry.starts_with('/') {
            read_resolv_conf(Path::new(entry))?
        } else {
            let addr = entry.strip_prefix("dns://").unwrap_or(entry);
            match parse_address(addr) {
                Some(a) => vec![a],
                None if !entry.contains("://")
                    && !entry.is_empty()
                    && Path::new(entry).is_file() =>
                {
                    read_resolv_conf(Path::new(entry))?
                }
                None => return Err(ForwardError::BadAddress(entry.to_string())),
            }
        };
        for addr in found {
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    if out.is_empty() {
        return Err(ForwardError::NoUpstreams);
    }
    if out.len() > MAX_UPSTREAMS {
        return Err(ForwardError::TooManyUpstreams(out.len()));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The forwarder

/// Decrements the in-flight count when an exchange ends, however it ends.
struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One `forward` directive: its upstreams, their health and connections.
#[derive(Debug)]
pub struct Forwarder {
    from: String,
    except: Vec<String>,
    upstreams: Vec<Arc<Upstream>>,
    policy: Policy,
    max_fails: u32,
    health_check: Duration,
    expire: Duration,
    force_tcp: bool,
    prefer_udp: bool,
    /// `None` (or 0, as CoreDNS): no limit.
    max_concurrent: Option<u32>,
    in_flight: AtomicU32,
    round_robin: AtomicUsize,
    metrics: ForwardMetrics,
    /// Wakes the health-check task: an upstream failed, or the forwarder is gone.
    wake: Arc<Notify>,
    health_started: AtomicBool,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // The health-check task holds only a Weak: wake it so it sees that and ends now.
        self.wake.notify_one();
    }
}

impl Forwarder {
    /// Resolves `to`: a path (starts with '/' or exists as a file) is read as resolv.conf
    /// ("nameserver" lines, IPv4/IPv6, port 53); addresses get port 53 by default; "dns://" prefix
    /// accepted. Error if nothing usable, or for anything that is neither an address nor a file
    /// (hostnames, `tls://`, `https://`), or for more than [`MAX_UPSTREAMS`].
    pub fn new(cfg: &Forward, metrics: ForwardMetrics) -> Result<Arc<Self>, ForwardError> {
        let upstreams = resolve_upstreams(&cfg.to)?;
        Ok(Arc::new(Self {
            from: fqdn(&cfg.from),
            except: cfg.except.iter().map(|z| fqdn(z)).collect(),
            upstreams: upstreams
                .into_iter()
                .map(|a| Arc::new(Upstream::new(a)))
                .collect(),
            policy: cfg.policy,
            max_fails: cfg.max_fails,
            health_check: cfg.health_check,
            expire: cfg.expire,
            force_tcp: cfg.force_tcp,
            prefer_udp: cfg.prefer_udp,
            max_concurrent: cfg.max_concurrent.filter(|&m| m > 0),
            in_flight: AtomicU32::new(0),
            round_robin: AtomicUsize::new(0),
            metrics,
            wake: Arc::new(Notify::new()),
            health_started: AtomicBool::new(false),
        }))
    }

    /// Whether this forwarder handles qname (lowercase fqdn): inside `from` and not inside any
    /// `except` zone. As in CoreDNS, `from` itself is always handled, even if an `except` covers it.
    pub fn matches(&self, qname: &str) -> bool {
        let name = fqdn(qname);
        if !in_zone(&name, &self.from) {
            return false;
        }
        if name == self.from {
            return true;
        }
        !self.except.iter().any(|z| in_zone(&name, z))
    }

    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.iter().map(|u| u.addr).collect()
    }

    /// The order the policy tries the upstreams in this time (indexes into `upstreams`).
    fn order(&self) -> Vec<usize> {
        let n = self.upstreams.len();
        let mut order: Vec<usize> = (0..n).collect();
        match self.policy {
            Policy::Sequential => {}
            Policy::Random => order.shuffle(&mut rand::rng()),
            Policy::RoundRobin => {
                // As CoreDNS: the next one in turn first, then the others in their order.
                if n > 0 {
                    let first = self.round_robin.fetch_add(1, Ordering::Relaxed) % n;
                    order.remove(first);
                    order.insert(0, first);
                }
            }
        }
        order
    }

    /// Sends one DNS query (wire format, as the client sent it) to an upstream and returns the
    /// upstream's response in wire format with the client's original message ID. `client_tcp` =
    /// the client asked over TCP.
    ///
    /// The answer is the upstream's, byte for byte (apart from the ID): over UDP a truncated
    /// answer is asked again over TCP, so the result may be larger than the client's UDP size and
    /// the caller truncates it for a UDP client.
    ///
    /// Errors: [`ForwardError::BadQuery`] (not a query with exactly one question: answer FORMERR),
    /// [`ForwardError::MaxConcurrent`] (answer REFUSED), else the last upstream's failure,
    /// [`ForwardError::Timeout`] or [`ForwardError::Io`] (answer SERVFAIL).
    pub async fn exchange(&self, query: &[u8], client_tcp: bool) -> Result<Vec<u8>, ForwardError> {
        let _in_flight = match self.max_concurrent {
            Some(max) => {
                let count = self
                    .in_flight
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                let guard = InFlight(&self.in_flight);
                if count > max {
                    self.metrics.max_concurrent_rejects.inc();
                    return Err(ForwardError::MaxConcurrent);
                }
                Some(guard)
            }
            None => None,
        };
        let query = parse_query(query)?;
        let tcp = self.force_tcp || (client_tcp && !self.prefer_udp);
        let deadline = Instant::now() + EXCHANGE_DEADLINE;
        let mut last: Option<ForwardError> = None;
        // Passes over the upstreams until one answers or the deadline. Another pass only follows
        // one in which something timed out (a lost datagram is worth asking again; a refused
        // connection within the same five seconds is not).
        'passes: loop {
            let order = self.order();
            let mut candidates: Vec<usize> = order
                .into_iter()
                .filter(|&i| !self.upstreams[i].down(self.max_fails))
                .collect();
            if candidates.is_empty() {
                // Per query, so not above debug: the metric counts these.
                debug!(from = %self.from, "forward: all upstreams down, falling back to random");
                self.metrics.healthcheck_broken.inc();
                candidates.push(rand::random_range(0..self.upstreams.len()));
            }
            let mut timed_out = false;
            for i in candidates {
                if Instant::now() >= deadline {
                    break 'passes;
                }
                let upstream = &self.upstreams[i];
                match self.attempt(upstream, tcp, &query, deadline).await {
                    Ok(mut answer) => {
                        if upstream.succeed(self.max_fails) {
                            info!(upstream = %upstream.addr, "forward: upstream healthy again");
                        }
                        answer[..2].copy_from_slice(&query.id.to_be_bytes());
                        return Ok(answer);
                    }
                    Err(failure) => {
                        debug!(upstream = %upstream.addr, ?failure, "forward: upstream failed");
                        timed_out |= is_timeout(&failure);
                        self.failed(upstream);
                        last = Some(failure.into_error(upstream.addr));
                    }
                }
            }
            if !timed_out || Instant::now() >= deadline {
                break;
            }
        }
        Err(last.unwrap_or(ForwardError::NoUpstreams))
    }

    /// Counts a failure of `upstream` and gets it health checked.
    fn failed(&self, upstream: &Upstream) {
        if self.max_fails == 0 {
            return;
        }
        if upstream.fail(self.max_fails) {
            warn!(
                upstream = %upstream.addr,
                max_fails = self.max_fails,
                "forward: upstream marked down"
            );
        }
        self.wake.notify_one();
    }

    /// One upstream, over UDP (and TCP when the answer is truncated) or TCP.
    async fn attempt(
        &self,
        upstream: &Upstream,
        tcp: bool,
        query: &ClientQuery<'_>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Failure> {
        if tcp {
            return self.over_tcp(upstream, query, deadline).await;
        }
        let answer = self.over_udp(upstream, query, deadline).await?;
        if !truncated(&answer) {
            return Ok(answer);
        }
        debug!(upstream = %upstream.addr, "forward: truncated over UDP, asking over TCP");
        match self.over_tcp(upstream, query, deadline).await {
            Ok(full) => Ok(full),
            Err(failure) => {
                // The upstream did answer: pass its truncated answer on, the client will ask
                // again over TCP itself.
                debug!(upstream = %upstream.addr, ?failure, "forward: TCP retry failed");
                Ok(answer)
            }
        }
    }

    async fn over_udp(
        &self,
        upstream: &Upstream,
        query: &ClientQuery<'_>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Failure> {
        let limit = READ_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
        let id = rand::random::<u16>();
        let wire = with_id(query.wire, id);
        let expect = Expect {
            id,
            question: Some(&query.question),
        };
        self.metrics.conn(&upstream.label, "udp", false);
        self.metrics.request(&upstream.label);
        let start = Instant::now();
        let answer = udp_roundtrip(upstream.addr, &wire, &expect, limit).await?;
        self.metrics.response(
            &upstream.label,
            rcode_name(response_rcode(&answer)),
            start.elapsed(),
        );
        Ok(answer)
    }

    async fn over_tcp(
        &self,
        upstream: &Upstream,
        query: &ClientQuery<'_>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Failure> {
        let id = rand::random::<u16>();
        let wire = with_id(query.wire, id);
        let expect = Expect {
            id,
            question: Some(&query.question),
        };
        self.metrics.request(&upstream.label);
        let start = Instant::now();
        // A cached connection the upstream has closed is replaced once by a new one.
        let mut cached_tries = 1;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Failure::Timeout);
            }
            let cached = if cached_tries > 0 {
                upstream.take_conn(self.expire)
            } else {
                None
            };
            let was_cached = cached.is_some();
            self.metrics.conn(&upstream.label, "tcp", was_cached);
            let mut stream = match cached {
                Some(s) => s,
                None => tcp_connect(upstream.addr, CONNECT_TIMEOUT.min(remaining)).await?,
            };
            let limit = READ_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            match tcp_roundtrip(&mut stream, upstream.addr, &wire, &expect, limit).await {
                Ok(answer) => {
                    upstream.put_conn(stream);
                    self.metrics.response(
                        &upstream.label,
                        rcode_name(response_rcode(&answer)),
                        start.elapsed(),
                    );
                    return Ok(answer);
                }
                Err(f) if was_cached && f.before_reply => {
                    debug!(upstream = %upstream.addr, failure = ?f.failure, "forward: cached connection closed, redialing");
                    cached_tries -= 1;
                }
                Err(f) => return Err(f.failure),
            }
        }
    }

    /// Starts background health checking (a tokio task; call within a Tokio runtime).
    ///
    /// The task holds only a `Weak` to the forwarder: it ends on its own once the forwarder is
    /// dropped (the drop wakes it, so it ends right away, or after a health check already under way,
    /// at most [`HEALTH_CHECK_TIMEOUT`]). Aborting the returned handle stops it earlier; dropping the
    /// handle detaches it and does not. Calling this again while a task runs returns a handle to a
    /// task that ends at once. The task also closes TCP connections idle for longer than `expire`.
    pub fn spawn_health_checks(self: &Arc<Self>) -> JoinHandle<()> {
        if self.health_started.swap(true, Ordering::AcqRel) {
            debug!(from = %self.from, "forward: health checks already running");
            return tokio::spawn(async {});
        }
        let weak = Arc::downgrade(self);
        let wake = self.wake.clone();
        tokio::spawn(health_loop(weak, wake))
    }
}

async fn health_loop(weak: Weak<Forwarder>, wake: Arc<Notify>) {
    loop {
        // Holds the forwarder only while reading what to do, never across a wait.
        let (targets, force_tcp, metrics, max_fails, interval) = {
            let Some(f) = weak.upgrade() else {
                break;
            };
            for u in &f.upstreams {
                u.prune(f.expire);
            }
            let targets: Vec<Arc<Upstream>> = if f.max_fails == 0 {
                Vec::new()
            } else {
                f.upstreams
                    .iter()
                    .filter(|u| u.fails() > 0)
                    .cloned()
                    .collect()
            };
            (
                targets,
                f.force_tcp,
                f.metrics.clone(),
                f.max_fails,
                f.health_check.max(Duration::from_millis(10)),
            )
        };
        let idle = targets.is_empty();
        futures::future::join_all(targets.into_iter().map(|u| {
            let metrics = metrics.clone();
            async move {
                match health_check(u.addr, force_tcp).await {
                    Ok(()) => {
                        if u.succeed(max_fails) {
                            info!(upstream = %u.addr, "forward: upstream healthy again");
                        } else {
                            debug!(upstream = %u.addr, "forward: health check passed");
                        }
                    }
                    Err(failure) => {
                        debug!(upstream = %u.addr, ?failure, "forward: health check failed");
                        metrics.healthcheck_failure(&u.label);
                        if u.fail(max_fails) {
                            warn!(upstream = %u.addr, max_fails, "forward: upstream marked down");
                        }
                    }
                }
            }
        }))
        .await;
        // Nothing to check: wake for the next failure, or now and then to close idle connections.
        let wait = if idle {
            interval.max(Duration::from_secs(1))
        } else {
            interval
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
    }
    debug!("forward: health checks stopped");
}

/// `. IN NS` with RD set; any answer with the right ID, whatever its RCODE, is a pass.
async fn health_check(addr: SocketAddr, tcp: bool) -> Result<(), Failure> {
    let id = rand::random::<u16>();
    let mut ping = Message::new(id, MessageType::Query, OpCode::Query);
    ping.metadata.recursion_desired = true;
    ping.add_query(Query::query(Name::root(), RecordType::NS));
    let wire = ping
        .to_vec()
        .map_err(|e| Failure::Io(std::io::Error::other(e.to_string())))?;
    let expect = Expect { id, question: None };
    if tcp {
        let start = Instant::now();
        let mut stream = tcp_connect(addr, HEALTH_CHECK_TIMEOUT).await?;
        let limit = HEALTH_CHECK_TIMEOUT.saturating_sub(start.elapsed());
        tcp_roundtrip(&mut stream, addr, &wire, &expect, limit)
            .await
            .map_err(|f| f.failure)?;
    } else {
        udp_roundtrip(addr, &wire, &expect, HEALTH_CHECK_TIMEOUT).await?;
    }
    Ok(())
}

#[cfg(test)]
impl Forwarder {
    fn fails_of(&self, addr: SocketAddr) -> Option<u32> {
        self.upstreams
            .iter()
            .find(|u| u.addr == addr)
            .map(|u| u.fails())
    }

    fn is_down(&self, addr: SocketAddr) -> bool {
        self.upstreams
            .iter()
            .any(|u| u.addr == addr && u.down(self.max_fails))
    }

    fn set_fails(&self, addr: SocketAddr, fails: u32) {
        for u in &self.upstreams {
            if u.addr == addr {
                u.fails.store(fails, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                    tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf))
                        .await
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
        assert!(text
            .contains("# HELP coredns_forward_requests Counter of requests made per upstream.\n"));
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
}
