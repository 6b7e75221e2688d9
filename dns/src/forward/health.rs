//! The health checks: every `health_check`, each failing upstream gets `. IN NS` until it
//! answers, which resets its failures.

use std::{
    net::SocketAddr,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RecordType},
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::{
    tcp_connect, tcp_roundtrip, udp_roundtrip, Expect, Failure, Forwarder, Upstream,
    HEALTH_CHECK_TIMEOUT,
};

pub(super) async fn health_loop(weak: Weak<Forwarder>, wake: Arc<Notify>) {
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
pub(super) async fn health_check(addr: SocketAddr, tcp: bool) -> Result<(), Failure> {
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
