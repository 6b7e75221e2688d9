//! What the datapath is programmed with, and the writes: the services from their source (the
//! API, or a watched file) and the pods' host ports, kept in a `ServiceTable`; a change of some
//! Services writes only theirs, a new file or new host ports the whole desired state.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    bpf,
    datapath::{ApplyReport, Changes, Datapath},
    hostport,
    metrics::AgentMetrics,
    model::ServiceSpec,
    proxy::{
        api::{ApiSource, Batch},
        file::Objects,
        translate::NodeInfo,
        ServiceTable,
    },
};
use tracing::{error, info, warn};

use super::{
    active::{is_pod_side, Active},
    Args,
};

/// Where the services come from.
pub(super) enum Source {
    Api(Arc<ApiSource>),
    File(FileWatch),
    /// Only host ports.
    Nothing,
}

/// The services side of the agent's loop.
pub(super) struct Proxy {
    pub(super) source: Source,
    table: ServiceTable,
    host_ports: hostport::Watch,
    node: NodeInfo,
    /// Whether the source's first full state is written (the API's after its first lists).
    written: bool,
    min_sync: Duration,
    last_write: Option<Instant>,
    /// When the last write succeeded.
    last_ok: Option<SystemTime>,
    /// Whether the record for seinectl is behind, and when it was last written.
    record_due: bool,
    recorded: Option<Instant>,
    /// The API connection state the record last gave.
    recorded_connected: Option<bool>,
    /// The thread writing the record: 10,000 services make tens of milliseconds of JSON, which
    /// the next change should not wait for.
    record_writer: Option<std::thread::JoinHandle<()>>,
}

/// How often at most the record for seinectl is written while changes come.
const RECORD_EVERY: Duration = Duration::from_secs(1);

impl Proxy {
    /// With the file's services (read already, so that bad input fails the start) or none yet.
    pub(super) fn new(
        args: &Args,
        source: Source,
        initial: Option<Objects>,
        min_sync: Duration,
    ) -> Self {
        let node = NodeInfo {
            name: args.node_name.clone(),
            zone: None,
        };
        let mut table = ServiceTable::default();
        if let Some(objects) = &initial {
            table.replace_services(objects.by_service(&node));
        }
        Proxy {
            written: !matches!(source, Source::Api(_)) && initial.is_none(),
            source,
            table,
            host_ports: hostport::Watch::new(hostport::dir(&args.cni_data_dir)),
            node,
            min_sync,
            last_write: None,
            last_ok: None,
            record_due: true,
            recorded: None,
            recorded_connected: None,
            record_writer: None,
        }
    }

    /// One pass: the file, the host-port records, the API's changes; writes what they need,
    /// and the record for seinectl when it is behind.
    pub(super) fn step(&mut self, args: &Args, active: &mut Active, metrics: &AgentMetrics) {
        self.sync(args, active, metrics);
        if let Source::Api(api) = &self.source {
            self.record_due |= self.recorded_connected != Some(api.connected());
        }
        let writing = self
            .record_writer
            .as_ref()
            .is_some_and(|w| !w.is_finished());
        if self.record_due && !writing && self.recorded.is_none_or(|t| t.elapsed() >= RECORD_EVERY)
        {
            self.write_record(args);
        }
    }

    fn sync(&mut self, args: &Args, active: &mut Active, metrics: &AgentMetrics) {
        let mut full = !self.written && !matches!(self.source, Source::Api(_));
        if let Source::File(watch) = &mut self.source {
            if watch.changed() {
                match Objects::from_file(&watch.path) {
                    Ok(objects) => {
                        self.table.replace_services(objects.by_service(&self.node));
                        full = true;
                    }
                    Err(e) => {
                        // Keep serving the last good state.
                        error!("{e}; keeping the previous state");
                        metrics.synced("invalid_input");
                    }
                }
            }
        }
        if let Some(records) = self.host_ports.changed() {
            // No records at start, and none before: nothing to write for them.
            let nothing_new = records.is_empty() && !self.table.has_host_ports();
            self.table
                .set_host_ports(host_port_specs(args, &records, active));
            full |= self.written && !nothing_new;
        }
        let mut changes = Changes::default();
        let mut since = Vec::new();
        if let Source::Api(api) = &self.source {
            let due = self.last_write.is_none_or(|t| t.elapsed() >= self.min_sync);
            if due {
                match api.take() {
                    Some(Batch::All(at)) => {
                        let mut keys = api.all_services();
                        keys.extend(self.table.keys());
                        keys.sort();
                        keys.dedup();
                        for key in keys {
                            changes.extend(self.table.set_service(&key, api.specs(&key)));
                        }
                        since.push(at);
                        // The first full state from the API: a restarted agent now removes
                        // what its pinned maps or chains hold of Services gone meanwhile.
                        full |= !self.written;
                    }
                    Some(Batch::Services(keys)) => {
                        for (key, at) in keys {
                            changes.extend(self.table.set_service(&key, api.specs(&key)));
                            since.push(at);
                        }
                    }
                    None => {}
                }
            }
        }
        let datapath = active.datapath();
        if full {
            self.written = true;
            let desired = self.table.desired();
            self.write(datapath, args, metrics, |d| d.apply(&desired));
        } else if !changes.is_empty() {
            self.write(datapath, args, metrics, |d| d.apply_changes(&changes));
        } else {
            return;
        }
        for at in since {
            metrics
                .programming_seconds
                .observe(at.elapsed().as_secs_f64());
        }
    }

    fn write(
        &mut self,
        datapath: &mut dyn Datapath,
        args: &Args,
        metrics: &AgentMetrics,
        write: impl FnOnce(&mut dyn Datapath) -> ApplyReport,
    ) {
        let _lock = match bpf::lock(&args.bpffs_dir) {
            Ok(lock) => lock,
            Err(e) => {
                error!("{e}");
                return;
            }
        };
        let start = Instant::now();
        let report = write(datapath);
        let elapsed = start.elapsed();
        // Start to start, as kube-proxy's --min-sync-period: a write that takes longer than
        // the period is followed by the next at once.
        self.last_write = Some(start);
        self.record_due = true;
        metrics.sync_seconds.observe(elapsed.as_secs_f64());
        metrics.services.set(datapath.frontends().len() as i64);
        for failure in &report.failed {
            error!("{failure}");
        }
        if report.failed.is_empty() {
            metrics.synced("ok");
            self.last_ok = Some(SystemTime::now());
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            metrics.last_sync.set(now.as_secs_f64());
        } else {
            metrics.synced("error");
        }
        let total = report.created + report.updated + report.deleted + report.unchanged;
        if total > 100 {
            // A large write leaves freed memory behind; hand it back to the system.
            // SAFETY: malloc_trim only releases free heap pages.
            unsafe { libc::malloc_trim(0) };
        }
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

    /// Records, for seinectl, where the services come from, how the API watches are, when the
    /// last write succeeded, and every frontend with its Service and backends as written.
    /// Written whole and renamed into place: a reader never sees half of it.
    fn write_record(&mut self, args: &Args) {
        self.record_due = false;
        self.recorded = Some(Instant::now());
        let (source, connected) = match &self.source {
            Source::Api(api) => ("api", Some(api.connected())),
            Source::File(_) => ("file", None),
            Source::Nothing => ("none", None),
        };
        self.recorded_connected = connected;
        let services: Vec<_> = self
            .table
            .record()
            .into_iter()
            .map(|(key, spec)| (key.cloned(), spec))
            .collect();
        let last_sync = self
            .last_ok
            .and_then(|t| k8s_openapi::jiff::Timestamp::try_from(t).ok())
            .map(|t| {
                t.round(k8s_openapi::jiff::Unit::Second)
                    .map_or_else(|_| t.to_string(), |t| t.to_string())
            });
        let synced = self.written;
        let path = bpf::proxy_path(&args.bpffs_dir);
        self.record_writer = Some(std::thread::spawn(move || {
            let services: Vec<serde_json::Value> = services
                .into_iter()
                .map(|(key, spec)| {
                    serde_json::json!({
                        "service": key.map(|(ns, name)| format!("{ns}/{name}")),
                        "frontend": spec.frontend.to_string(),
                        "backends": spec.backends.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let record = serde_json::json!({
                "source": source,
                "api_connected": connected,
                "synced": synced,
                "last_sync": last_sync,
                "services": services,
            });
            let tmp = path.with_extension("tmp");
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&tmp, record.to_string()))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                warn!("writing {}: {e}", path.display());
            }
        }));
    }

    /// How long until the API's waiting changes may be written (`--min-sync-period`), when
    /// some wait.
    pub(super) fn due_in(&self) -> Option<Duration> {
        let Source::Api(api) = &self.source else {
            return None;
        };
        // Before the first lists nothing is written: waking for it would spin.
        if !api.listed() {
            return None;
        }
        api.pending_since()?;
        let since = self.last_write?.elapsed();
        Some(self.min_sync.saturating_sub(since))
    }

    /// Whether the source's state is written, for readiness: the API's needs its first lists.
    pub(super) fn synced(&self) -> bool {
        self.written
    }
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
