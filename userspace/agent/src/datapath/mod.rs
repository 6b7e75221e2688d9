//! The `Datapath` interface: desired services in, only the difference written to the kernel.
//!
//! Every implementation updates one service at a time as a transaction: either the whole new backend
//! set is visible or the old one still is.

mod conntrack;
pub mod ebpf;
pub mod iptables;
pub mod nftables;

use std::collections::BTreeMap;

use crate::model::{BackendSpec, BackendState, Frontend, ServiceSpec};

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
    #[error("nftables: {0}")]
    Nftables(String),
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

/// Writes that bring the datapath from one state to the next: the services that changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub upserts: Vec<ServiceSpec>,
    pub deletes: Vec<Frontend>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.deletes.is_empty()
    }

    pub fn extend(&mut self, more: Changes) {
        self.upserts.extend(more.upserts);
        self.deletes.extend(more.deletes);
    }
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
        let wanted: std::collections::HashSet<Frontend> =
            desired.iter().map(|s| s.frontend).collect();
        let deletes = self
            .frontends()
            .into_iter()
            .filter(|f| !wanted.contains(f))
            .collect();
        self.apply_changes(&Changes {
            upserts: desired.to_vec(),
            deletes,
        })
    }

    /// Writes only `changes`, each service atomically; the others are not touched.
    fn apply_changes(&mut self, changes: &Changes) -> ApplyReport {
        let mut report = ApplyReport::default();
        for frontend in &changes.deletes {
            match self.delete(frontend) {
                Ok(true) => report.deleted += 1,
                Ok(false) => {}
                Err(e) => report.failed.push(e),
            }
        }
        for spec in &changes.upserts {
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

/// The backends that take new connections: the ready ones, or, when none is ready, the
/// terminating ones that still serve.
pub(crate) fn usable_backends(spec: &ServiceSpec) -> Vec<&BackendSpec> {
    let ready: Vec<&BackendSpec> = spec
        .backends
        .iter()
        .filter(|b| b.state == BackendState::Active)
        .collect();
    if ready.is_empty() {
        spec.backends.iter().collect()
    } else {
        ready
    }
}

/// A datapath of kernel rules rendered from the whole desired state (iptables, nftables): it
/// keeps the services and writes the difference in one transaction. Every such type is a
/// `Datapath` through the one implementation below.
pub trait RuleSet {
    /// The mode's name, as shown in metrics and `seinectl status`.
    fn mode(&self) -> &'static str;
    fn services(&self) -> &BTreeMap<Frontend, ServiceSpec>;
    fn services_mut(&mut self) -> &mut BTreeMap<Frontend, ServiceSpec>;
    /// Writes what differs from the last write, in one transaction; on error the kernel keeps
    /// the previous state.
    fn write(&mut self) -> Result<(), DatapathError>;
}

/// Runs `program args`, feeding it `input` (a ruleset transaction); the error says what failed,
/// with at most the first three lines of its stderr (nft quotes whole offending lines).
pub(crate) fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to {program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for {program}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let reason: Vec<&str> = stderr.lines().take(3).map(str::trim).collect();
        return Err(format!(
            "{program} failed ({}): {}",
            out.status,
            reason.join(" | ")
        ));
    }
    Ok(())
}

/// Whether the rules of `spec` translate its traffic (it has endpoints to send it to): a
/// frontend that starts to leaves untranslated flows behind (see `conntrack`).
fn translates(spec: Option<&ServiceSpec>) -> bool {
    spec.is_some_and(|s| !usable_backends(s).is_empty())
}

fn check_ipv4(spec: &ServiceSpec) -> Result<(), DatapathError> {
    if spec.frontend.ip.is_ipv6() || spec.backends.iter().any(|b| b.ip.is_ipv6()) {
        return Err(DatapathError::Ipv6(spec.frontend));
    }
    Ok(())
}

impl<T: RuleSet> Datapath for T {
    fn mode(&self) -> &'static str {
        RuleSet::mode(self)
    }

    /// The batch in one transaction: the rules of the services that did not change are
    /// written again only if the backend needs the whole table (it writes what differs).
    fn apply_changes(&mut self, changes: &Changes) -> ApplyReport {
        let mut report = ApplyReport::default();
        let previous = self.services().clone();
        for frontend in &changes.deletes {
            if self.services_mut().remove(frontend).is_some() {
                report.deleted += 1;
            }
        }
        for spec in &changes.upserts {
            let spec = spec.normalized();
            if let Err(e) = check_ipv4(&spec) {
                report.failed.push(e);
                continue;
            }
            match self.services_mut().insert(spec.frontend, spec.clone()) {
                None => report.created += 1,
                Some(old) if old == spec => report.unchanged += 1,
                Some(_) => report.updated += 1,
            }
        }
        if report.created + report.updated + report.deleted == 0 {
            return report;
        }
        if let Err(e) = self.write() {
            // The transaction is atomic: the kernel still holds the previous state.
            *self.services_mut() = previous;
            report.failed.push(e);
            report.created = 0;
            report.updated = 0;
            report.deleted = 0;
            return report;
        }
        let opened: Vec<Frontend> = changes
            .upserts
            .iter()
            .map(|s| s.frontend)
            .filter(|f| translates(self.services().get(f)) && !translates(previous.get(f)))
            .collect();
        conntrack::clear_untranslated(&opened);
        report
    }

    fn upsert(&mut self, spec: &ServiceSpec) -> Result<Change, DatapathError> {
        let spec = spec.normalized();
        check_ipv4(&spec)?;
        let change = match self.services().get(&spec.frontend) {
            Some(old) if *old == spec => return Ok(Change::Unchanged),
            Some(_) => Change::Updated,
            None => Change::Created,
        };
        let previous = self.services_mut().insert(spec.frontend, spec.clone());
        if let Err(e) = self.write() {
            match previous {
                Some(old) => self.services_mut().insert(spec.frontend, old),
                None => self.services_mut().remove(&spec.frontend),
            };
            return Err(e);
        }
        if translates(Some(&spec)) && !translates(previous.as_ref()) {
            conntrack::clear_untranslated(&[spec.frontend]);
        }
        Ok(change)
    }

    fn delete(&mut self, frontend: &Frontend) -> Result<bool, DatapathError> {
        let Some(old) = self.services_mut().remove(frontend) else {
            return Ok(false);
        };
        if let Err(e) = self.write() {
            self.services_mut().insert(*frontend, old);
            return Err(e);
        }
        Ok(true)
    }

    fn frontends(&self) -> Vec<Frontend> {
        self.services().keys().copied().collect()
    }
}
