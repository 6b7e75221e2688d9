//! Flows the rule datapaths must forget when a frontend starts translating. Traffic to a
//! service address before its rules exist (a client faster than the agent) is routed as it is
//! and leaves a conntrack entry whose reply comes from the service address itself. Netfilter
//! translates only a flow's first packet, so every later packet of that entry's tuple (the
//! client's retransmits, or a new connection that reuses the client's port within the entry's
//! two minutes) follows it past the new rules into nowhere. kube-proxy clears stale UDP entries
//! the same way, with the same tool.

use std::{net::IpAddr, process::Command, sync::Once};

use crate::model::{Frontend, Protocol};

/// A write that opens more frontends than this (a cold start of thousands) leaves them be: one
/// `conntrack` run each would hold the write up for seconds, and before the first write no
/// client could have reached a frontend in between.
const MAX_CLEARED: usize = 100;

/// Deletes the untranslated conntrack entries of `opened`, the frontends this write began to
/// translate. Errors are logged: the rules are written either way.
pub(crate) fn clear_untranslated(opened: &[Frontend]) {
    if opened.is_empty() || opened.len() > MAX_CLEARED {
        return;
    }
    for frontend in opened {
        if let Err(e) = clear(frontend) {
            static MISSING: Once = Once::new();
            MISSING.call_once(|| {
                tracing::warn!("clearing stale conntrack entries: {e}");
            });
            return;
        }
    }
}

fn clear(frontend: &Frontend) -> Result<(), String> {
    let ip = frontend.ip.to_string();
    let protocol = match frontend.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    let family = match frontend.ip {
        IpAddr::V4(_) => "ipv4",
        IpAddr::V6(_) => "ipv6",
    };
    let port = frontend.port.to_string();
    let out = Command::new("conntrack")
        .args(["-D", "-f", family, "-p", protocol, "--orig-dst", &ip])
        .args(["--orig-port-dst", &port, "--reply-src", &ip])
        .output()
        .map_err(|e| format!("running conntrack: {e}"))?;
    // It exits 1 when nothing matched, which is the common case.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || stderr.contains("flow entries have been deleted") {
        if !stderr.contains(" 0 flow entries") {
            tracing::info!(%frontend, "{}", stderr.trim());
        }
        return Ok(());
    }
    Err(format!(
        "conntrack failed ({}): {}",
        out.status,
        stderr.trim()
    ))
}
