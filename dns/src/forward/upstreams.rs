//! Where the upstreams come from: addresses in the Corefile, or the nameservers of a
//! resolv.conf.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

use tracing::warn;

use super::{ForwardError, MAX_UPSTREAMS};

/// Reads the `nameserver` lines of a resolv.conf (port 53). Comments, other options and lines
/// that do not hold an IP address are skipped.
pub(super) fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, ForwardError> {
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
pub(super) fn parse_address(text: &str) -> Option<SocketAddr> {
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
pub(super) fn resolve_upstreams(to: &[String]) -> Result<Vec<SocketAddr>, ForwardError> {
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
