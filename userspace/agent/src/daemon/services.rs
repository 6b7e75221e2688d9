//! What the datapath is programmed with: the services (from the watched file) and the pods'
//! host ports, merged and applied.

use std::{
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use crate::{
    bpf::{self},
    datapath::Datapath,
    hostport,
    metrics::AgentMetrics,
    model::ServiceSpec,
};
use tracing::{error, info, warn};

use super::{
    active::{is_pod_side, Active},
    Args,
};

/// The services, then the host ports whose frontends no service holds.
pub(super) fn desired(services: &[ServiceSpec], ports: &[ServiceSpec]) -> Vec<ServiceSpec> {
    let mut all = services.to_vec();
    for p in ports {
        if services.iter().any(|s| s.frontend == p.frontend) {
            warn!(frontend = %p.frontend, "a service holds this host port's address and port; the service wins");
        } else {
            all.push(p.clone());
        }
    }
    all
}

/// The frontends of the pods' host ports on this node's addresses (not loopback, pod veths or
/// the overlay device); in eBPF mode the uplinks holding those addresses get the programs, so
/// that traffic from outside the node is translated too.
pub(super) fn host_port_specs(
    args: &Args,
    records: &[(String, hostport::Record)],
    active: &mut Active,
) -> Vec<ServiceSpec> {
    let addresses = match hostport::node_addresses(|name| is_pod_side(args, name)) {
        Ok(a) => a,
        Err(e) => {
            error!("listing the node's addresses for host ports: {e}");
            return Vec::new();
        }
    };
    let node_ips: Vec<std::net::Ipv4Addr> = addresses.iter().map(|(_, ip)| *ip).collect();
    let (specs, problems) = hostport::service_specs(records, &node_ips);
    for p in problems {
        warn!("{p}");
    }
    let mut uplinks: Vec<String> = addresses
        .into_iter()
        .filter(|(_, ip)| {
            specs
                .iter()
                .any(|s| s.frontend.ip == std::net::IpAddr::V4(*ip))
        })
        .map(|(name, _)| name)
        .collect();
    uplinks.sort();
    uplinks.dedup();
    active.set_uplinks(uplinks);
    info!(
        host_ports = specs.len(),
        pods = records.len(),
        "host ports read"
    );
    specs
}

pub(super) fn apply(
    datapath: &mut dyn Datapath,
    specs: &[crate::model::ServiceSpec],
    dir: &Path,
    metrics: &AgentMetrics,
) {
    let _lock = match bpf::lock(dir) {
        Ok(lock) => lock,
        Err(e) => {
            error!("{e}");
            return;
        }
    };
    let start = Instant::now();
    let report = datapath.apply(specs);
    let elapsed = start.elapsed();
    metrics.sync_seconds.observe(elapsed.as_secs_f64());
    metrics.services.set(datapath.frontends().len() as i64);
    for failure in &report.failed {
        error!("{failure}");
    }
    let result = if report.failed.is_empty() {
        "ok"
    } else {
        "error"
    };
    metrics.synced(result);
    // Parsing a large services file leaves freed memory behind; hand it back to the system.
    // SAFETY: malloc_trim only releases free heap pages.
    unsafe { libc::malloc_trim(0) };
    info!(
        created = report.created,
        updated = report.updated,
        deleted = report.deleted,
        unchanged = report.unchanged,
        failed = report.failed.len(),
        elapsed_ms = elapsed.as_secs_f64() * 1e3,
        "services applied"
    );
}

/// Notices changes of a file by modification time and size.
pub(super) struct FileWatch {
    pub(super) path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl FileWatch {
    pub(super) fn new(path: PathBuf) -> Self {
        FileWatch { path, seen: None }
    }

    pub(super) fn changed(&mut self) -> bool {
        let now = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        if now.is_some() && now != self.seen {
            self.seen = now;
            return true;
        }
        false
    }
}
