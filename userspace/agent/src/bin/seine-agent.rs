//! seine-agent: the node agent. Runs the service datapath — eBPF (maps pinned per node, programs
//! attached to pod veths) or, where eBPF cannot be used, nftables or iptables — and programs
//! services from a watched file of Service and EndpointSlice objects, and pods' hostPorts from
//! what seine-cni records (attaching the eBPF programs to the uplinks that carry them). Serves
//! /healthz, /readyz and /metrics; stops on SIGTERM leaving the datapath in place, so a restart
//! breaks no connection.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use clap::{Parser, ValueEnum};
use seine_agent::{
    bpf::{self, MapSizes, PinnedMaps, DEFAULT_BPFFS_DIR},
    datapath::{
        ebpf::{EbpfDatapath, Owner},
        iptables::{IptablesBackend, IptablesDatapath},
        nftables::NftablesDatapath,
        Datapath,
    },
    hostport,
    k8s::Objects,
    metrics::AgentMetrics,
    model::ServiceSpec,
    nodenet, sock_lb,
};
use seine_common::STAT_NAMES;
use seine_component_base::{health, metrics};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Parser, Clone)]
#[command(
    name = "seine-agent",
    version,
    about = "Seine's node agent: the eBPF service datapath"
)]
struct Args {
    /// Where this node's maps and programs are pinned.
    #[arg(long, env = "SEINE_BPFFS_DIR", default_value = DEFAULT_BPFFS_DIR)]
    bpffs_dir: PathBuf,
    /// Service and EndpointSlice objects (YAML or JSON), re-read when the file changes.
    #[arg(long)]
    services_file: Option<PathBuf>,
    /// Attach the datapath to every interface whose name starts with one of these prefixes
    /// (the host side of pod veths).
    #[arg(long = "attach-prefix", default_values = ["lxc"])]
    attach_prefixes: Vec<String>,
    /// Datapath implementation.
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    datapath: Mode,
    /// iptables backend, for the iptables datapath and for cleanup.
    #[arg(long, value_enum, default_value_t = IptablesChoice::Auto)]
    iptables_backend: IptablesChoice,
    /// Seconds between full iptables resyncs, which repair rules removed by someone else.
    #[arg(long, default_value_t = 30)]
    iptables_resync_seconds: u64,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "127.0.0.1:9962")]
    health_addr: std::net::SocketAddr,
    #[arg(long, default_value_t = seine_common::DEFAULT_MAX_SERVICES)]
    max_services: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_MAX_BACKENDS)]
    max_backends: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_CT_SIZE)]
    ct_size: u32,
    #[arg(long, default_value_t = seine_common::DEFAULT_AFFINITY_SIZE)]
    affinity_size: u32,
    /// Serve the node's own processes (host network) at the socket, as Cilium's socket LB does:
    /// in eBPF mode their connects and sends to a service or host port go straight to a backend.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// The cgroup v2 directory whose processes' sockets are served [default: the root of the
    /// unified hierarchy, as mounted].
    #[arg(long)]
    cgroup_root: Option<PathBuf>,
    /// Remove Seine's filters from matching interfaces, its pinned maps and its iptables chains,
    /// then exit.
    #[arg(long)]
    cleanup: bool,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// This node's name: turns on the pod network (VXLAN overlay and CNI install) for the Node of
    /// this name, read from the API server.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The API server's kubeconfig; in a pod, the service account is used without it.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    #[arg(long, default_value = seine_agent::overlay::DEFAULT_DEVICE)]
    vxlan_device: String,
    #[arg(long, default_value_t = seine_agent::overlay::DEFAULT_VNI)]
    vxlan_vni: u32,
    #[arg(long, default_value_t = seine_agent::overlay::DEFAULT_PORT)]
    vxlan_port: u16,
    /// The node's underlay address (the VTEP) [default: the Node's InternalIP].
    #[arg(long)]
    vtep_address: Option<std::net::Ipv4Addr>,
    /// Where to install the seine-cni binary.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// Where to write the conflist (10-seine.conflist).
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// Where the plugin keeps its address allocations.
    #[arg(long, default_value = "/var/lib/cni/seine")]
    cni_data_dir: PathBuf,
    /// The network name in the conflist.
    #[arg(long, default_value = "seine")]
    cni_network: String,
    /// The plugin binary to install [default: seine-cni next to this agent].
    #[arg(long)]
    cni_plugin: Option<PathBuf>,
    /// Plugins to chain after seine-cni in the conflist, by type (found in --cni-bin-dir), for
    /// example `portmap` (which then handles hostPorts instead of Seine) or `bandwidth`.
    #[arg(long, value_delimiter = ',')]
    cni_chain: Vec<String>,
    /// Skip installing the CNI plugin and conflist.
    #[arg(long)]
    no_cni_install: bool,
    /// Seconds between overlay checks when no Node changed.
    #[arg(long, default_value_t = 10)]
    overlay_resync_seconds: u64,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Mode {
    /// eBPF, falling back when loading or attaching fails: to nftables where nft is the system's
    /// iptables backend (and `nft` is installed), else to iptables.
    Auto,
    Ebpf,
    Iptables,
    /// kube-proxy's nftables mode: one table of Seine's own, verdict maps.
    Nftables,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum IptablesChoice {
    /// The backend that already holds rules, else the one `iptables` points at.
    Auto,
    Nft,
    Legacy,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

struct Shared {
    metrics: AgentMetrics,
    /// The pod network, when this agent runs it.
    overlay: Option<nodenet::Status>,
    ready: AtomicBool,
    /// Cancelled on SIGTERM: the loop, the health server and readiness stop on it.
    shutdown: CancellationToken,
    /// The eBPF counters, when the eBPF datapath runs.
    stats_maps: Option<std::sync::Mutex<PinnedMaps>>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    seine_component_base::init_logging(args.log_format == LogFormat::Json, "info");
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("seine-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.cleanup {
        return cleanup(&args);
    }
    // Bad input is refused before anything is touched.
    let initial = match &args.services_file {
        Some(path) => match Objects::from_file(path) {
            Ok(objects) => Some(objects.service_specs()),
            Err(e) => {
                eprintln!("seine-agent: {e}");
                return Ok(ExitCode::from(2));
            }
        },
        None => None,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // The pod network's inputs are checked before anything is touched, like the services file.
    let plugin = cni_plugin(&args)?;
    let client = match &args.node_name {
        None => None,
        Some(_) => {
            if !args.no_cni_install && !plugin.is_file() {
                eprintln!(
                    "seine-agent: the CNI plugin to install, {}, does not exist (--cni-plugin)",
                    plugin.display()
                );
                return Ok(ExitCode::from(2));
            }
            match runtime.block_on(seine_component_base::client(args.kubeconfig.as_deref())) {
                Ok(client) => Some(client),
                Err(e) => {
                    eprintln!("seine-agent: the API server client: {e}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
    };

    let mut active = match args.datapath {
        Mode::Ebpf => start_ebpf(&args)?,
        Mode::Iptables | Mode::Nftables => start_rules(&args, None)?,
        Mode::Auto => match start_ebpf(&args) {
            Ok(active) => active,
            Err(e) => {
                let reason = format!("{e:#}");
                warn!(%reason, "the eBPF datapath cannot be used here; falling back to nftables or iptables");
                start_rules(&args, Some(reason))?
            }
        },
    };
    let stats_maps = match &active {
        Active::Ebpf { .. } => Some(std::sync::Mutex::new(PinnedMaps::open(&args.bpffs_dir)?)),
        Active::Rules { .. } => None,
    };
    let agent_metrics = AgentMetrics::register(active.datapath().mode());
    let overlay = args.node_name.as_ref().map(|_| {
        let status = nodenet::Status::default();
        metrics::register(
            "seine_overlay_peers",
            "Other nodes the VXLAN overlay reaches",
            status.peers.clone(),
        );
        metrics::register(
            "seine_overlay_reconciles",
            "Reconciliations of the overlay's entries, by result",
            status.reconciles.clone(),
        );
        status
    });
    let shared = Arc::new(Shared {
        metrics: agent_metrics,
        overlay: overlay.clone(),
        ready: AtomicBool::new(false),
        shutdown: CancellationToken::new(),
        stats_maps,
    });
    write_status(&args, &active);

    let shutdown = shared.shutdown.clone();
    {
        let _in_runtime = runtime.enter();
        seine_component_base::cancel_on_stop_signal(shutdown.clone());
    }
    runtime.block_on(health::serve(
        args.health_addr,
        shared.clone(),
        shutdown.clone(),
    ))?;

    if let (Some(status), Some(node_name), Some(client)) = (overlay, args.node_name.clone(), client)
    {
        let options = nodenet::Options {
            node_name,
            device: args.vxlan_device.clone(),
            vni: args.vxlan_vni,
            port: args.vxlan_port,
            vtep_address: args.vtep_address,
            cni_bin_dir: (!args.no_cni_install).then(|| args.cni_bin_dir.clone()),
            cni_conf_dir: (!args.no_cni_install).then(|| args.cni_conf_dir.clone()),
            cni_plugin: plugin,
            cni_data_dir: args.cni_data_dir.clone(),
            cni_network: args.cni_network.clone(),
            cni_chain: args.cni_chain.clone(),
            bpffs_dir: args.bpffs_dir.clone(),
            resync: Duration::from_secs(args.overlay_resync_seconds.max(1)),
        };
        runtime.spawn(async move {
            if let Err(e) = nodenet::run(client, options, status).await {
                error!("pod network: {e}");
            }
        });
    }

    let mut watcher = args.services_file.clone().map(FileWatch::new);
    let mut host_ports = hostport::Watch::new(hostport::dir(&args.cni_data_dir));
    // The desired state is the services and the pods' host ports together.
    let mut services = initial.clone().unwrap_or_default();
    let mut ports = Vec::new();
    if let Some(records) = host_ports.changed() {
        ports = host_port_specs(&args, &records, &mut active);
    }
    if initial.is_some() || !ports.is_empty() {
        apply(
            active.datapath(),
            &desired(&services, &ports),
            &args.bpffs_dir,
            &shared.metrics,
        );
    }
    if let Some(w) = watcher.as_mut() {
        w.changed();
    }
    active.tick(&args, &shared.metrics, true);
    shared.ready.store(true, Ordering::SeqCst);
    info!("ready");

    // Polls the file and the host-port records; the work runs on this thread, not the runtime's
    // worker, so the health server answers while a large change is applied.
    let mut tick = {
        let _in_runtime = runtime.enter();
        tokio::time::interval(Duration::from_millis(200))
    };
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopped = runtime.block_on(async {
            tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.cancelled() => true,
            }
        });
        if stopped {
            break;
        }
        let mut dirty = false;
        if let Some(w) = watcher.as_mut() {
            if w.changed() {
                match Objects::from_file(&w.path) {
                    Ok(objects) => {
                        services = objects.service_specs();
                        dirty = true;
                    }
                    Err(e) => {
                        // Keep serving the last good state.
                        error!("{e}; keeping the previous state");
                        shared.metrics.synced("invalid_input");
                    }
                }
            }
        }
        if let Some(records) = host_ports.changed() {
            ports = host_port_specs(&args, &records, &mut active);
            dirty = true;
        }
        if dirty {
            apply(
                active.datapath(),
                &desired(&services, &ports),
                &args.bpffs_dir,
                &shared.metrics,
            );
        }
        active.tick(&args, &shared.metrics, false);
    }
    info!("stopping; the datapath stays in place");
    // Dropping the loaded object would not detach the filters (their links were released), but the
    // process exits right away anyway.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

/// The services, then the host ports whose frontends no service holds.
fn desired(services: &[ServiceSpec], ports: &[ServiceSpec]) -> Vec<ServiceSpec> {
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
fn host_port_specs(
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

/// Interfaces that face pods or the overlay, never an uplink.
fn is_pod_side(args: &Args, name: &str) -> bool {
    name == args.vxlan_device
        || name.starts_with(nodenet::POD_VETH_PREFIX)
        || args
            .attach_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
}

fn apply(
    datapath: &mut dyn Datapath,
    specs: &[seine_agent::model::ServiceSpec],
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

/// Attaches to pod interfaces that appeared (or came back with a new index) since the last call.
fn attach_new(
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
fn pod_interfaces(args: &Args) -> Vec<(u32, String)> {
    bpf::interfaces()
        .into_iter()
        .filter(|(_, name)| {
            args.attach_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
        })
        .collect()
}

fn cleanup(args: &Args) -> anyhow::Result<ExitCode> {
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

/// The plugin binary to install: `--cni-plugin`, else `seine-cni` next to this agent.
fn cni_plugin(args: &Args) -> anyhow::Result<PathBuf> {
    match &args.cni_plugin {
        Some(path) => Ok(path.clone()),
        None => Ok(std::env::current_exe()?.with_file_name("seine-cni")),
    }
}

/// The backends to clean: the chosen one, or both when detecting (a switch may have left either).
fn iptables_backends(args: &Args) -> Vec<IptablesBackend> {
    match args.iptables_backend {
        IptablesChoice::Nft => vec![IptablesBackend::Nft],
        IptablesChoice::Legacy => vec![IptablesBackend::Legacy],
        IptablesChoice::Auto => vec![IptablesBackend::Nft, IptablesBackend::Legacy],
    }
}

/// The datapath in use, with what it needs besides the `Datapath` interface.
enum Active {
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
        last_resync: Instant,
        fallback_reason: Option<String>,
    },
}

/// The rule datapaths: the iptables fallback, or kube-proxy's nftables mode.
enum Rules {
    Iptables(IptablesDatapath),
    Nftables(NftablesDatapath),
}

impl Rules {
    fn datapath(&mut self) -> &mut dyn Datapath {
        match self {
            Rules::Iptables(d) => d,
            Rules::Nftables(d) => d,
        }
    }

    fn full_resync(&mut self) -> Result<(), seine_agent::datapath::DatapathError> {
        match self {
            Rules::Iptables(d) => d.full_resync(),
            Rules::Nftables(d) => d.full_resync(),
        }
    }
}

impl Active {
    fn datapath(&mut self) -> &mut dyn Datapath {
        match self {
            Active::Ebpf { datapath, .. } => datapath.as_mut(),
            Active::Rules { datapath, .. } => datapath.datapath(),
        }
    }

    /// Which uplinks carry host ports now; those that no longer do are detached.
    fn set_uplinks(&mut self, now: Vec<String>) {
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

    /// Periodic work: attach to new pod interfaces and expire conntrack (eBPF), or a full resync
    /// (iptables).
    fn tick(&mut self, args: &Args, metrics: &AgentMetrics, first: bool) {
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
                last_resync,
                ..
            } => {
                if first
                    || last_resync.elapsed() > Duration::from_secs(args.iptables_resync_seconds)
                {
                    *last_resync = Instant::now();
                    match datapath.full_resync() {
                        Ok(()) => tracing::debug!("full resync done"),
                        Err(e) => error!("full resync: {e}"),
                    }
                }
            }
        }
    }
}

fn start_ebpf(args: &Args) -> anyhow::Result<Active> {
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
fn start_socket_lb(args: &Args, ebpf: &mut aya::Ebpf) {
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

fn start_rules(args: &Args, fallback_reason: Option<String>) -> anyhow::Result<Active> {
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
                seine_agent::datapath::nftables::TABLE
            );
            Rules::Nftables(NftablesDatapath::new())
        }
    };
    Ok(Active::Rules {
        datapath,
        last_resync: Instant::now(),
        fallback_reason,
    })
}

/// Removes the table of an earlier nftables-mode agent, where nft is installed.
fn remove_nftables_table() {
    if NftablesDatapath::available() {
        if let Err(e) = NftablesDatapath::cleanup() {
            warn!("removing the nftables table of an earlier mode: {e}");
        }
    }
}

/// What `seinectl status` shows: the mode in use and why.
fn write_status(args: &Args, active: &Active) {
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
            "nftables_table": format!("ip {}", seine_agent::datapath::nftables::TABLE),
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

/// Notices changes of a file by modification time and size.
struct FileWatch {
    path: PathBuf,
    seen: Option<(SystemTime, u64)>,
}

impl FileWatch {
    fn new(path: PathBuf) -> Self {
        FileWatch { path, seen: None }
    }

    fn changed(&mut self) -> bool {
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

impl health::Probes for Shared {
    fn ready(&self) -> bool {
        let overlay_ready = self
            .overlay
            .as_ref()
            .is_none_or(|o| o.ready.load(Ordering::SeqCst));
        self.ready.load(Ordering::SeqCst) && overlay_ready && !self.shutdown.is_cancelled()
    }

    fn refresh_metrics(&self) {
        let Some(Ok(maps)) = self.stats_maps.as_ref().map(|m| m.lock()) else {
            return;
        };
        if let Ok(values) = maps.stats() {
            for (value, name) in values.into_iter().zip(STAT_NAMES) {
                self.metrics
                    .packets
                    .get_or_create(&vec![("outcome".into(), name.into())])
                    .set(value as i64);
            }
        }
    }
}
