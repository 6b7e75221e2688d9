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
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rand::seq::SliceRandom;
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::corefile::{fqdn, in_zone, Forward, Policy};

mod health;
mod metrics;
#[cfg(test)]
mod tests;
mod transport;
mod upstreams;
mod wire;

use health::health_loop;
use metrics::rcode_name;
pub use metrics::{
    ForwardMetrics, ProxyConnLabels, ProxyRcodeLabels, ProxyToLabels, ToLabels, ToRcodeLabels,
};
use transport::{is_timeout, tcp_connect, tcp_roundtrip, udp_roundtrip, Failure, Upstream};
use upstreams::resolve_upstreams;
use wire::{mismatch, parse_query, response_rcode, truncated, with_id, ClientQuery, Expect};

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
