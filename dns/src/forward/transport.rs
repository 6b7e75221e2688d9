//! One exchange with one upstream, over UDP or TCP (with the idle TCP connections kept per
//! upstream), and the upstream's failure count that marks it down.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};
use tracing::debug;

use super::{mismatch, Expect, ForwardError, MAX_IDLE_TCP, MAX_MESSAGE};

pub(super) fn is_timeout(e: &Failure) -> bool {
    matches!(e, Failure::Timeout)
}

/// How one attempt against one upstream failed.
#[derive(Debug)]
pub(super) enum Failure {
    Timeout,
    Io(std::io::Error),
}

impl Failure {
    pub(super) fn into_error(self, upstream: SocketAddr) -> ForwardError {
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
pub(super) async fn udp_roundtrip(
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
pub(super) struct TcpFailure {
    pub(super) failure: Failure,
    pub(super) before_reply: bool,
}

/// Writes `wire` (length-prefixed) on `stream` and reads messages until the answer, for up to
/// `limit`.
pub(super) async fn tcp_roundtrip(
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

pub(super) async fn tcp_connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, Failure> {
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
pub(super) struct IdleConn {
    pub(super) stream: TcpStream,
    pub(super) used: Instant,
}

#[derive(Debug)]
pub(super) struct Upstream {
    pub(super) addr: SocketAddr,
    /// `addr` as the `to` label.
    pub(super) label: String,
    /// Consecutive failures (exchanges and health checks).
    pub(super) fails: AtomicU32,
    pub(super) idle_tcp: Mutex<Vec<IdleConn>>,
}

impl Upstream {
    pub(super) fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            label: addr.to_string(),
            fails: AtomicU32::new(0),
            idle_tcp: Mutex::new(Vec::new()),
        }
    }

    pub(super) fn idle(&self) -> std::sync::MutexGuard<'_, Vec<IdleConn>> {
        // The list stays consistent whatever a panicking holder did: recover it.
        match self.idle_tcp.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The most recently used connection still within `expire`.
    pub(super) fn take_conn(&self, expire: Duration) -> Option<TcpStream> {
        let mut idle = self.idle();
        while let Some(conn) = idle.pop() {
            if conn.used.elapsed() <= expire {
                return Some(conn.stream);
            }
        }
        None
    }

    pub(super) fn put_conn(&self, stream: TcpStream) {
        let mut idle = self.idle();
        if idle.len() < MAX_IDLE_TCP {
            idle.push(IdleConn {
                stream,
                used: Instant::now(),
            });
        }
    }

    /// Closes the connections idle for longer than `expire`.
    pub(super) fn prune(&self, expire: Duration) {
        self.idle().retain(|c| c.used.elapsed() <= expire);
    }

    pub(super) fn fails(&self) -> u32 {
        self.fails.load(Ordering::Relaxed)
    }

    pub(super) fn down(&self, max_fails: u32) -> bool {
        max_fails != 0 && self.fails() >= max_fails
    }

    /// Counts a failure; true when it is the one that marks the upstream down.
    pub(super) fn fail(&self, max_fails: u32) -> bool {
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
    pub(super) fn succeed(&self, max_fails: u32) -> bool {
        let before = self.fails.swap(0, Ordering::Relaxed);
        max_fails != 0 && before >= max_fails
    }
}
