//! seinectl: shows what the datapath's pinned maps hold, and programs services by hand.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use seine_agent::{
    bpf::PinnedMaps,
    datapath::{
        ebpf::{EbpfDatapath, Owner},
        Change, Datapath,
    },
    inspect,
    model::{BackendSpec, Frontend, ServiceSpec},
    pins,
};

#[derive(Parser)]
#[command(
    name = "seinectl",
    version,
    about = "Inspect and program Seine's eBPF service datapath"
)]
struct Cli {
    /// Where the node's maps are pinned (one directory per node). Without it: the directory of
    /// the seine-agent in this network namespace, else the default (/sys/fs/bpf/seine) if it
    /// holds pins, else the only pin directory under /sys/fs/bpf.
    #[arg(long, global = true, env = "SEINE_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read the eBPF maps.
    Bpf {
        #[command(subcommand)]
        what: BpfCommand,
    },
    /// The node agent's datapath mode (eBPF or iptables) and why.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Services by namespace and name with their frontends and backends (`list`), or program
    /// services by hand (`upsert`, `delete`: entries owned by seinectl; the agent leaves them
    /// alone).
    Service {
        #[command(subcommand)]
        what: ServiceCommand,
    },
}

#[derive(Subcommand)]
enum BpfCommand {
    /// Load balancer: each service frontend with its backend slots.
    Lb {
        #[command(subcommand)]
        what: ListOnly,
    },
    /// Conntrack entries with age, state and backend.
    Ct {
        #[command(subcommand)]
        what: ListOnly,
    },
    /// Backends by id.
    Backend {
        #[command(subcommand)]
        what: ListOnly,
    },
    /// Datapath counters by outcome, summed over CPUs.
    Stats {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ListOnly {
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Each Service (namespace/name) with its frontends and backends as the datapath holds them
    /// (in eBPF mode read from the maps), as `cilium-dbg service list` shows them.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Create or replace a service frontend and its backends.
    Upsert {
        /// VIP:PORT/PROTO, for example 10.96.0.10:80/tcp
        #[arg(long)]
        frontend: String,
        /// IP:PORT[,active|terminating]; repeat for each backend (none: connections are refused)
        #[arg(long = "backend")]
        backends: Vec<String>,
        /// ClientIP session affinity with this timeout in seconds
        #[arg(long)]
        affinity_timeout: Option<u32>,
    },
    /// Remove a service frontend.
    Delete {
        #[arg(long)]
        frontend: String,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

/// Exit codes: 1 for a failure of the system (maps missing, not root), 2 for bad input.
enum Failure {
    Input(String),
    System(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(msg)) => {
            eprintln!("seinectl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::System(msg)) => {
            eprintln!("seinectl: {msg}");
            ExitCode::from(1)
        }
    }
}

fn system<E: std::fmt::Display>(e: E) -> Failure {
    Failure::System(e.to_string())
}

/// The pin directory to read: the one given, else the node's as [`pins::find`] finds it (said on
/// stderr, so that JSON output stays clean).
fn pin_dir(given: Option<PathBuf>) -> Result<PathBuf, Failure> {
    if let Some(dir) = given {
        return Ok(dir);
    }
    let (dir, found) = pins::find().map_err(system)?;
    if found != pins::Found::Default {
        eprintln!("seinectl: using {} ({found})", dir.display());
    }
    Ok(dir)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let dir = pin_dir(cli.bpffs_dir)?;
    match cli.command {
        Command::Bpf { what } => {
            let maps = PinnedMaps::open(&dir).map_err(system)?;
            match what {
                BpfCommand::Lb {
                    what: ListOnly::List { output },
                } => {
                    let rows = inspect::lb_list(&maps).map_err(system)?;
                    print(output, &rows, || print_lb(&rows))
                }
                BpfCommand::Ct {
                    what: ListOnly::List { output },
                } => {
                    let rows = inspect::ct_list(&maps).map_err(system)?;
                    print(output, &rows, || print_ct(&rows))
                }
                BpfCommand::Backend {
                    what: ListOnly::List { output },
                } => {
                    let rows = inspect::backend_list(&maps).map_err(system)?;
                    print(output, &rows, || {
                        println!(
                            "{:<10} {:<24} {:<6} {:<12} SERVICE_ID",
                            "ID", "ADDRESS", "PROTO", "STATE"
                        );
                        for r in &rows {
                            println!(
                                "{:<10} {:<24} {:<6} {:<12} {}",
                                r.id, r.address, r.protocol, r.state, r.service_id
                            );
                        }
                    })
                }
                BpfCommand::Stats { output } => {
                    let rows = inspect::stats(&maps).map_err(system)?;
                    print(output, &rows, || {
                        println!("{:<24} PACKETS", "OUTCOME");
                        for r in &rows {
                            println!("{:<24} {}", r.name, r.value);
                        }
                    })
                }
            }
        }
        Command::Service { what } => service(&dir, what),
        Command::Status { output } => status(&dir, output),
    }
}

fn status(dir: &std::path::Path, output: Output) -> Result<(), Failure> {
    let path = seine_agent::bpf::status_path(dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Failure::System(format!(
            "no status of a seine-agent for --bpffs-dir {} ({}: {e})",
            dir.display(),
            path.display()
        ))
    })?;
    let mut status: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Failure::System(format!("{}: {e}", path.display())))?;
    let running = status["pid"]
        .as_u64()
        .is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
    status["running"] = running.into();
    if let Some(record) = proxy_record(dir) {
        for field in ["source", "api_connected", "synced", "last_sync"] {
            status[field] = record[field].clone();
        }
    }
    if status["mode"] == "ebpf" {
        if let Ok(maps) = PinnedMaps::open(dir) {
            if let Ok(rows) = inspect::lb_list(&maps) {
                status["services"] = rows.len().into();
            }
        }
    }
    print(output, &status, || {
        println!(
            "mode:      {}",
            status["mode"].as_str().unwrap_or("unknown")
        );
        if let Some(backend) = status["iptables_backend"].as_str() {
            println!("iptables:  {backend}");
        }
        if let Some(reason) = status["fallback_reason"].as_str() {
            println!("fallback:  {reason}");
        }
        println!(
            "agent:     pid {} ({})",
            status["pid"],
            if running { "running" } else { "not running" }
        );
        if let Some(n) = status["services"].as_u64() {
            println!("services:  {n}");
        }
        if let Some(source) = status["source"].as_str() {
            let api = match status["api_connected"].as_bool() {
                Some(true) => ", watching the API server",
                Some(false) => ", API server unreachable (retrying; the datapath stays)",
                None => "",
            };
            println!("source:    {source}{api}");
            println!(
                "last sync: {}",
                status["last_sync"].as_str().unwrap_or("never")
            );
        }
    })
}

/// The agent's record of what it programmed (`bpf::proxy_path`), if it wrote one.
fn proxy_record(dir: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(seine_agent::bpf::proxy_path(dir)).ok()?;
    serde_json::from_str(&text).ok()
}

#[derive(serde::Serialize)]
struct ServiceRow {
    /// `namespace/name`; none for a host port or an entry programmed by hand.
    service: Option<String>,
    frontend: String,
    backends: Vec<String>,
}

fn service_list(dir: &std::path::Path, output: Output) -> Result<(), Failure> {
    let record = proxy_record(dir);
    let names: std::collections::HashMap<String, String> = record
        .iter()
        .flat_map(|r| r["services"].as_array().cloned().unwrap_or_default())
        .filter_map(|s| {
            Some((
                s["frontend"].as_str()?.to_string(),
                s["service"].as_str()?.to_string(),
            ))
        })
        .collect();
    let mut rows: Vec<ServiceRow> = match PinnedMaps::open(dir) {
        // eBPF: the maps are the truth; the record gives the names.
        Ok(maps) => inspect::lb_list(&maps)
            .map_err(system)?
            .into_iter()
            .map(|e| ServiceRow {
                service: names.get(&e.frontend).cloned(),
                backends: e
                    .backends
                    .iter()
                    .map(|b| format!("{} ({})", b.address, b.state))
                    .collect(),
                frontend: e.frontend,
            })
            .collect(),
        // The rule modes: what the agent wrote.
        Err(e) => {
            let Some(record) = &record else {
                return Err(Failure::System(format!(
                    "no pinned maps and no record of a seine-agent for --bpffs-dir {}: {e}",
                    dir.display()
                )));
            };
            record["services"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| ServiceRow {
                    service: s["service"].as_str().map(str::to_string),
                    frontend: s["frontend"].as_str().unwrap_or_default().to_string(),
                    backends: s["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|b| b.as_str().map(str::to_string))
                        .collect(),
                })
                .collect()
        }
    };
    rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    print(output, &rows, || {
        println!("{:<40} {:<26} BACKENDS", "SERVICE", "FRONTEND");
        for r in &rows {
            let backends = if r.backends.is_empty() {
                "<none>".to_string()
            } else {
                r.backends.join(", ")
            };
            println!(
                "{:<40} {:<26} {backends}",
                r.service.as_deref().unwrap_or("-"),
                r.frontend
            );
        }
    })
}

fn service(dir: &std::path::Path, what: ServiceCommand) -> Result<(), Failure> {
    if let ServiceCommand::List { output } = what {
        return service_list(dir, output);
    }
    // Parse everything before touching the maps: bad input changes nothing.
    let request = match &what {
        ServiceCommand::Upsert {
            frontend,
            backends,
            affinity_timeout,
        } => {
            let frontend: Frontend = frontend
                .parse()
                .map_err(|e| Failure::Input(format!("{e}")))?;
            let backends = backends
                .iter()
                .map(|b| b.parse::<BackendSpec>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::Input(format!("{e}")))?;
            if *affinity_timeout == Some(0) {
                return Err(Failure::Input(
                    "--affinity-timeout must be at least 1 second".into(),
                ));
            }
            Some(ServiceSpec {
                frontend,
                backends,
                affinity_timeout_secs: *affinity_timeout,
            })
        }
        ServiceCommand::Delete { .. } | ServiceCommand::List { .. } => None,
    };
    // Read back and written under the node's lock; a node that is not there gets "not pinned"
    // from open, and no lock file is made for it.
    let _lock = match dir.exists() {
        true => Some(seine_agent::bpf::lock(dir).map_err(system)?),
        false => None,
    };
    let mut dp = EbpfDatapath::open(dir, Owner::Cli).map_err(system)?;
    match (what, request) {
        (_, Some(spec)) => {
            let change = dp.upsert(&spec).map_err(|e| match e {
                seine_agent::datapath::DatapathError::NotOwned(..) => Failure::Input(e.to_string()),
                e => Failure::System(e.to_string()),
            })?;
            let verb = match change {
                Change::Created => "created",
                Change::Updated => "updated",
                Change::Unchanged => "unchanged",
            };
            println!(
                "service {} {verb} with {} backend(s)",
                spec.frontend,
                spec.backends.len()
            );
            Ok(())
        }
        (ServiceCommand::Delete { frontend }, None) => {
            let frontend: Frontend = frontend
                .parse()
                .map_err(|e| Failure::Input(format!("{e}")))?;
            match dp.delete(&frontend) {
                Ok(true) => {
                    println!("service {frontend} deleted");
                    Ok(())
                }
                Ok(false) => Err(Failure::Input(format!("service {frontend} not found"))),
                Err(e @ seine_agent::datapath::DatapathError::NotOwned(..)) => {
                    Err(Failure::Input(e.to_string()))
                }
                Err(e) => Err(system(e)),
            }
        }
        (ServiceCommand::Upsert { .. } | ServiceCommand::List { .. }, None) => Ok(()),
    }
}

fn print<T: serde::Serialize>(
    output: Output,
    rows: &T,
    table: impl FnOnce(),
) -> Result<(), Failure> {
    match output {
        Output::Json => {
            let text = serde_json::to_string_pretty(rows).map_err(system)?;
            println!("{text}");
        }
        Output::Table => table(),
    }
    Ok(())
}

fn print_lb(rows: &[inspect::LbEntry]) {
    println!(
        "{:<26} BACKEND ADDRESS (BACKEND_ID) (SLOT)",
        "SERVICE ADDRESS"
    );
    for e in rows {
        let mut extra = vec![format!("ClusterIP, owner={}", e.owner)];
        if let Some(t) = e.affinity_timeout_secs {
            extra.push(format!("affinity={t}s"));
        }
        println!(
            "{:<26} 0.0.0.0:0 ({}) (0) [{}]",
            e.frontend,
            e.service_id,
            extra.join(", ")
        );
        for b in &e.backends {
            println!(
                "{:<26} {} ({}) ({}) {}",
                "", b.address, b.backend_id, b.slot, b.state
            );
        }
    }
}

fn print_ct(rows: &[inspect::CtRow]) {
    println!(
        "{:<6} {:<5} {:<22} {:<22} {:<22} {:<12} {:>9} {:>10} {:>8}",
        "DIR",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "BACKEND",
        "STATE",
        "AGE(s)",
        "EXPIRES(s)",
        "PACKETS"
    );
    for r in rows {
        println!(
            "{:<6} {:<5} {:<22} {:<22} {:<22} {:<12} {:>9.1} {:>10} {:>8}{}",
            r.direction,
            r.protocol,
            r.source,
            r.destination,
            r.backend.as_deref().unwrap_or("-"),
            r.state,
            r.age_secs,
            if r.expired {
                "expired".to_string()
            } else {
                format!("{:.1}", r.expires_in_secs)
            },
            r.packets,
            if r.hairpin { " hairpin" } else { "" }
        );
    }
}
