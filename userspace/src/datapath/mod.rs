//! The `Datapath` interface: desired services in, only the difference written to the kernel.
//!
//! Every implementation updates one service at a time as a transaction: either the whole new backend
//! set is visible or the old one still is.

pub mod ebpf;
pub mod iptables;

use crate::model::{Frontend, ServiceSpec};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{service}: the {map} map is full (capacity {capacity}); the previous state of this service is kept")]
    MapFull {
        service: Frontend,
        map: &'static str,
        capacity: u32,
    },
    #[error("{0} is managed by another owner ({1}); change it there")]
    NotOwned(Frontend, &'static str),
    #[error("{0}: IPv6 frontends and backends are not supported yet")]
    Ipv6(Frontend),
    #[error("{service}: too many backends ({count}; at most 65535)")]
    TooManyBackends { service: Frontend, count: usize },
    #[error("no free {0} id left")]
    IdsExhausted(&'static str),
    #[error("{context}: {source}")]
    Map {
        context: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(transparent)]
    Bpf(#[from] crate::bpf::BpfError),
    #[error("iptables: {0}")]
    Iptables(String),
}

/// What one `apply` did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    /// Services that could not be written; each kept its previous state.
    pub failed: Vec<DatapathError>,
}

/// What happened to one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
    Unchanged,
}

pub trait Datapath {
    /// The mode's name, as shown in metrics and `seinectl status`.
    fn mode(&self) -> &'static str;

    /// Makes this owner's services exactly `desired`, writing only what differs.
    fn apply(&mut self, desired: &[ServiceSpec]) -> ApplyReport {
        let mut report = ApplyReport::default();
        let wanted: std::collections::HashSet<Frontend> =
            desired.iter().map(|s| s.frontend).collect();
        for frontend in self.frontends() {
            if !wanted.contains(&frontend) {
                match self.delete(&frontend) {
                    Ok(true) => report.deleted += 1,
                    Ok(false) => {}
                    Err(e) => report.failed.push(e),
                }
            }
        }
        for spec in desired {
            match self.upsert(spec) {
                Ok(Change::Created) => report.created += 1,
                Ok(Change::Updated) => report.updated += 1,
                Ok(Change::Unchanged) => report.unchanged += 1,
                Err(e) => report.failed.push(e),
            }
        }
        report
    }

    /// Creates or replaces one service, atomically.
    fn upsert(&mut self, spec: &ServiceSpec) -> Result<Change, DatapathError>;

    /// Removes one service; `Ok(false)` when it was not there.
    fn delete(&mut self, frontend: &Frontend) -> Result<bool, DatapathError>;

    /// The frontends this owner manages.
    fn frontends(&self) -> Vec<Frontend>;
}
