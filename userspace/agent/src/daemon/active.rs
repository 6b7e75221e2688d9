//! Which datapath runs (eBPF, else nftables or iptables), starting it, its periodic work, the
//! status file seinectl reads, and `--cleanup`.

use std::{
    collections::HashMap,
    process::ExitCode,
    time::{Duration, Instant},
};

use crate::{
    bpf::{self, MapSizes},
    datapath::{
        ebpf::{EbpfDatapath, Owner},
        iptables::{IptablesBackend, IptablesDatapath},
        nftables::NftablesDatapath,
        Datapath,
    },
    hostport,
    metrics::AgentMetrics,
    nodenet, sock_lb,
};
use tracing::{error, info, warn};

use super::{Args, IptablesChoice, Mode};

/// How often the rule modes rewrite everything even when the check finds nothing amiss
/// (kube-proxy's FullSyncPeriod).
const FULL_RESYNC_PERIOD: Duration = Duration::from_secs(3600);

pub(super) fn cleanup(args: &Args) -> anyhow::Result<ExitCode> {
    for (_, name) in pod_interfaces(args) {
        bpf::detach(&name);
    }
    // The uplinks that carried host ports (detaching where nothing is attached is harmless).
    for (name, _) in hostport::node_addresses(|name| is_pod_side(args, name))? {
        bpf::detach(&name);
    }
    bpf::unpin_all(&args.bpffs_dir)?;
    for backend in iptables_backends(args) {
        IptablesDatapath::cleanup(backend)?;
    }
    if NftablesDatapath::available() {
        NftablesDatapath::cleanup()?;
    }
    bpf::remove_node_files(&args.bpffs_dir);
    info!(dir = %args.bpffs_dir.display(), "filters detached, pins and iptables chains removed");
    if args.node_name.is_some() {
        // The pod network: the VXLAN device (its routes and entries go with it) and what
        // install-cni put in place, so that runtimes stop using the network.
        let device = args.vxlan_device.clone();
        seine_netlink::with_netlink(|handle| async move {
            seine_netlink::del_link_named(&handle, &device).await
        })?;
        if !args.no_cni_install {
            nodenet::uninstall_cni(&args.cni_bin_dir, &args.cni_conf_dir)?;
        }
        info!(device = %args.vxlan_device, "VXLAN device, conflist and plugin removed");
    }
    Ok(ExitCode::SUCCESS)
}

/// The backends to clean: the chosen one, or both when detecting (a switch may have left either).
pub(super) fn iptables_backends(args: &Args) -> Vec<IptablesBackend> {
    match args.iptables_backend {
        IptablesChoice::Nft => vec![IptablesBackend::Nft],
        IptablesChoice::Legacy => vec![IptablesBackend::Legacy],
        IptablesChoice::Auto => vec![IptablesBackend::Nft, IptablesBackend::Legacy],
    }
}

/// The datapath in use, with what it needs besides the `Datapath` interface.
pub(super) enum Active {
    Ebpf {
        ebpf: Box<aya::Ebpf>,
        datapath: Box<EbpfDatapath>,
        attached: HashMap<String, u32>,
        /// Uplinks that carry host ports: attached like pod veths, detached when no longer.
        uplinks: Vec<String>,
        last_gc: Instant,
    },
    Rules {
        datapath: Rules,
        /// The last full write; `None` until the services are first written (a full write).
        last_full: Option<Instant>,
        /// The last check that the rules are intact.
        last_check: Instant,
        fallback_reason: Option<String>,
    },
}

/// The rule datapaths: the iptables fallback, or kube-proxy's nftables mode.
pub(super) enum Rules {
    Iptables(IptablesDatapath),
    Nftables(NftablesDatapath),
}

impl Rules {
    pub(super) fn datapath(&mut self) -> &mut dyn Datapath {
        match self {
            Rules::Iptables(d) => d,
            Rules::Nftables(d) => d,
        }
    }

    pub(super) fn full_resync(&mut self) -> Result<(), crate::datapath::DatapathError> {
        match self {
            Rules::Iptables(d) => d.full_resync(),
            Rules::Nftables(d) => d.full_resync(),
        }
    }

    /// Whether the rules still stand as written; nftables' table is cheap enough to rewrite at
    /// every check instead.
    fn intact(&self) -> Result<bool, crate::datapath::DatapathError> {
        match self {
            Rules::Iptables(d) => d.intact(),
            Rules::Nftables(_) => Ok(false),
        }
    }
}

impl Active {
    pub(super) fn datapath(&mut self) -> &mut dyn Datapath {
        match self {
            Active::Ebpf { datapath, .. } => datapath.as_mut(),
            Active::Rules { datapath, .. } => datapath.datapath(),
        }
    }

    /// Which uplinks carry host ports now; those that no longer do are detached.
    pub(super) fn set_uplinks(&mut self, now: Vec<String>) {
        if let Active::Ebpf {
            uplinks, attached, ..
        } = self
        {
            for gone in uplinks.iter().filter(|u| !now.contains(u)) {
                bpf::detach(gone);
                attached.remove(gone);
                info!(interface = %gone, "datapath detached from an uplink without host ports");
            }
            *uplinks = now;
        }
    }

    /// Periodic work: attach to new pod interfaces and expire conntrack (eBPF), or check the
    /// rules and repair them with a full resync (iptables, nftables), once the services are
    /// `written`: before that a resync would write an empty table over the rules an earlier
    /// agent left. A full resync also runs hourly regardless, as kube-proxy's.
    pub(super) fn tick(&mut self, args: &Args, metrics: &AgentMetrics, written: bool) {
        match self {
            Active::Ebpf {
                ebpf,
                datapath,
                attached,
                uplinks,
                last_gc,
            } => {
                attach_new(ebpf, args, uplinks, attached, metrics);
                if last_gc.elapsed() > Duration::from_secs(30) {
                    *last_gc = Instant::now();
                    match datapath.collect_garbage() {
                        Ok(n) if n > 0 => info!(removed = n, "expired conntrack entries removed"),
                        Ok(_) => {}
                        Err(e) => warn!("conntrack garbage collection: {e}"),
                    }
                }
            }
            Active::Rules {
                datapath,
                last_full,
                last_check,
                ..
            } => {
                if !written {
                    return;
                }
                // The first write of the services was a full one.
                let Some(full) = *last_full else {
                    *last_full = Some(Instant::now());
                    *last_check = Instant::now();
                    return;
                };
                if last_check.elapsed() < Duration::from_secs(args.iptables_resync_seconds) {
                    return;
                }
                *last_check = Instant::now();
                let broken = match datapath.intact() {
                    Ok(intact) => !intact,
                    Err(e) => {
                        warn!("checking the rules: {e}");
                        true
                    }
                };
                if broken || full.elapsed() > FULL_RESYNC_PERIOD {
                    *last_full = Some(Instant::now());
                    match datapath.full_resync() {
                        Ok(()) if broken => info!("rules repaired by a full resync"),
                        Ok(()) => tracing::debug!("full resync done"),
                        Err(e) => error!("full resync: {e}"),
                    }
                }
            }
        }
    }
}

pub(super) fn start_ebpf(args: &Args) -> anyhow::Result<Active> {
    let sizes = MapSizes {
        services: args.max_services,
        backends: args.max_backends,
        conntrack: args.ct_size,
        affinity: args.affinity_size,
    };
    let mut ebpf = bpf::load(&args.bpffs_dir, sizes)?;
    let datapath = EbpfDatapath::open(&args.bpffs_dir, Owner::Agent)?;
    // Attaching is part of being able to use eBPF: a failure here is a reason to fall back.
    let mut attached = HashMap::new();
    for (index, name) in pod_interfaces(args) {
        bpf::attach(&mut ebpf, &name)?;
        attached.insert(name, index);
    }
    start_socket_lb(args, &mut ebpf);
    // Rules a previous iptables-mode agent left would translate the same traffic twice.
    for backend in iptables_backends(args) {
        if let Err(e) = IptablesDatapath::cleanup(backend) {
            warn!("removing iptables rules of an earlier mode: {e}");
        }
    }
    remove_nftables_table();
    info!(
        dir = %args.bpffs_dir.display(),
        reused_services = datapath.service_count(),
        attached = attached.len(),
        "datapath loaded"
    );
    Ok(Active::Ebpf {
        ebpf: Box::new(ebpf),
        datapath: Box::new(datapath),
        attached,
        uplinks: Vec::new(),
        last_gc: Instant::now(),
    })
}

/// Socket load balancing is a part of the eBPF mode that a node can lack (no cgroup v2, an old
/// kernel) while pods are still served: its failure is logged, not a reason to fall back.
pub(super) fn start_socket_lb(args: &Args, ebpf: &mut aya::Ebpf) {
    if !args.socket_lb {
        sock_lb::detach(&args.bpffs_dir);
        return;
    }
    let Some(cgroup) = args.cgroup_root.clone().or_else(sock_lb::cgroup2_mount) else {
        warn!("socket load balancing off: no cgroup v2 hierarchy is mounted (give --cgroup-root)");
        return;
    };
    match sock_lb::attach(ebpf, &args.bpffs_dir, &cgroup) {
        Ok(()) => {
            info!(cgroup = %cgroup.display(), "socket load balancing on for this node's processes")
        }
        Err(e) => warn!(
            cgroup = %cgroup.display(),
            "socket load balancing off: {:#}; the node's own processes do not reach services",
            anyhow::Error::from(e)
        ),
    }
}

pub(super) fn start_rules(args: &Args, fallback_reason: Option<String>) -> anyhow::Result<Active> {
    // eBPF filters of an earlier agent would translate the same traffic twice: remove them.
    let uplinks = hostport::node_addresses(|name| is_pod_side(args, name)).unwrap_or_default();
    for name in uplinks.into_iter().map(|(name, _)| name) {
        bpf::detach(&name);
    }
    for (_, name) in pod_interfaces(args) {
        bpf::detach(&name);
    }
    if let Err(e) = bpf::unpin_all(&args.bpffs_dir) {
        warn!("removing the pins of an earlier eBPF agent: {e}");
    }
    // Where nft is the system's backend, kube-proxy's nftables mode: one table of Seine's own,
    // and a change costs the same however many services there are. It needs no iptables.
    let backend = match args.datapath {
        Mode::Nftables => None,
        _ => Some(match args.iptables_backend {
            IptablesChoice::Nft => IptablesBackend::Nft,
            IptablesChoice::Legacy => IptablesBackend::Legacy,
            IptablesChoice::Auto => IptablesBackend::detect()?,
        }),
    };
    let iptables = match (args.datapath, backend) {
        (Mode::Auto, Some(IptablesBackend::Nft)) if NftablesDatapath::available() => None,
        (_, backend) => backend,
    };
    let datapath = match iptables {
        Some(backend) => {
            remove_nftables_table();
            info!(backend = backend.name(), "datapath loaded (iptables)");
            Rules::Iptables(IptablesDatapath::new(backend))
        }
        None => {
            for backend in iptables_backends(args) {
                if let Err(e) = IptablesDatapath::cleanup(backend) {
                    warn!("removing iptables rules of an earlier mode: {e}");
                }
            }
            info!(
                "datapath loaded (nftables, table ip {})",
                crate::datapath::nftables::TABLE
            );
            Rules::Nftables(NftablesDatapath::new())
        }
    };
    Ok(Active::Rules {
        datapath,
        last_full: None,
        last_check: Instant::now(),
        fallback_reason,
    })
}

/// Removes the table of an earlier nftables-mode agent, where nft is installed.
pub(super) fn remove_nftables_table() {
    if NftablesDatapath::available() {
        if let Err(e) = NftablesDatapath::cleanup() {
            warn!("removing the nftables table of an earlier mode: {e}");
        }
    }
}

/// What `seinectl status` shows: the mode in use and why.
pub(super) fn write_status(args: &Args, active: &Active) {
    let status = match active {
        Active::Ebpf { .. } => serde_json::json!({
            "mode": "ebpf",
            "bpffs_dir": args.bpffs_dir,
        }),
        Active::Rules {
            datapath: Rules::Iptables(datapath),
            fallback_reason,
            ..
        } => serde_json::json!({
            "mode": "iptables",
            "iptables_backend": datapath.backend().name(),
            "fallback_reason": fallback_reason,
        }),
        Active::Rules {
            datapath: Rules::Nftables(_),
            fallback_reason,
            ..
        } => serde_json::json!({
            "mode": "nftables",
            "nftables_table": format!("ip {}", crate::datapath::nftables::TABLE),
            "fallback_reason": fallback_reason,
        }),
    };
    let mut status = status;
    status["pid"] = std::process::id().into();
    status["health_addr"] = args.health_addr.to_string().into();
    let path = bpf::status_path(&args.bpffs_dir);
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&path, status.to_string()));
    if let Err(e) = written {
        warn!("writing {}: {e}", path.display());
    }
}

/// Interfaces that face pods or the overlay, never an uplink.
pub(super) fn is_pod_side(args: &Args, name: &str) -> bool {
    name == args.vxlan_device
        || name.starts_with(nodenet::POD_VETH_PREFIX)
        || args
            .attach_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
}

/// Attaches to pod interfaces that appeared (or came back with a new index) since the last call.
pub(super) fn attach_new(
    ebpf: &mut aya::Ebpf,
    args: &Args,
    uplinks: &[String],
    attached: &mut HashMap<String, u32>,
    metrics: &AgentMetrics,
) {
    let mut current = pod_interfaces(args);
    current.extend(
        bpf::interfaces()
            .into_iter()
            .filter(|(_, name)| uplinks.contains(name)),
    );
    attached.retain(|name, index| current.iter().any(|(i, n)| n == name && i == index));
    for (index, name) in current {
        if attached.get(&name) == Some(&index) {
            continue;
        }
        match bpf::attach(ebpf, &name) {
            Ok(()) => {
                info!(interface = %name, "datapath attached");
                attached.insert(name, index);
            }
            Err(e) => warn!("{e}"),
        }
    }
    metrics.attached.set(attached.len() as i64);
}

/// The host sides of pod veths in this namespace: the interfaces the datapath attaches to.
pub(super) fn pod_interfaces(args: &Args) -> Vec<(u32, String)> {
    bpf::interfaces()
        .into_iter()
        .filter(|(_, name)| {
            args.attach_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
        })
        .collect()
}
