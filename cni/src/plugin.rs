//! The plugin's commands (ADD, DEL, CHECK, GC, STATUS, VERSION) on a parsed environment and
//! configuration. Every pod gets a veth pair: the pod side, named as the runtime asks, holds the
//! pod's address (/32) with the node's gateway address as its next hop; the host side (`lxc…`)
//! holds the gateway address and the /32 route to the pod, so the node routes between pods, to
//! other nodes (over the overlay) and to services. A pod's `portMappings` (hostPorts) are
//! recorded for the agent (`hostport`), which programs them in its datapath.

use std::{fs::File, net::Ipv4Addr, path::PathBuf};

use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};

use seine_netlink::{self as net, NetError, VXLAN_OVERHEAD};

use crate::{
    conf,
    hostport::{self, PortMapping},
    ipam::{Allocation, Store},
    spec::{self, CniError, Code},
};

/// Where allocations are kept unless the configuration says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/seine";
/// The prefix of host-side veth names (the agent attaches the service datapath to these).
pub const HOST_PREFIX: &str = "lxc";
const ALIAS_PREFIX: &str = "seine-cni";

/// The CNI_* environment of one invocation.
#[derive(Debug, Default, Clone)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub path: Option<String>,
}

impl Env {
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = non_empty("CNI_COMMAND").ok_or_else(|| {
            invalid_env("CNI_COMMAND is not set (ADD, DEL, CHECK, GC, STATUS or VERSION)")
        })?;
        Ok(Env {
            command,
            container_id: non_empty("CNI_CONTAINERID"),
            netns: non_empty("CNI_NETNS"),
            ifname: non_empty("CNI_IFNAME"),
            path: non_empty("CNI_PATH"),
        })
    }

    fn require(&self, which: &[&str]) -> Result<(), CniError> {
        let missing: Vec<&str> = which
            .iter()
            .copied()
            .filter(|k| match *k {
                "CNI_CONTAINERID" => self.container_id.is_none(),
                "CNI_NETNS" => self.netns.is_none(),
                "CNI_IFNAME" => self.ifname.is_none(),
                "CNI_PATH" => self.path.is_none(),
                _ => false,
            })
            .collect();
        if !missing.is_empty() {
            return Err(invalid_env(format!(
                "{} required for {} but not set",
                missing.join(", "),
                self.command
            )));
        }
        if let Some(id) = &self.container_id {
            if !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            {
                return Err(invalid_env(format!(
                    "CNI_CONTAINERID {id:?} may hold only letters, digits, '_', '-' and '.'"
                )));
            }
        }
        if let Some(name) = &self.ifname {
            if name.len() > 15
                || name == "."
                || name == ".."
                || name
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace())
            {
                return Err(invalid_env(format!(
                    "CNI_IFNAME {name:?} is not a valid interface name"
                )));
            }
        }
        Ok(())
    }
}

fn invalid_env(details: impl Into<String>) -> CniError {
    CniError::new(
        Code::InvalidEnvironment,
        "invalid environment variables",
        details,
    )
}

fn invalid_config(details: impl Into<String>) -> CniError {
    CniError::new(
        Code::InvalidNetworkConfig,
        "invalid network configuration",
        details,
    )
}

fn io_failure(msg: &str) -> impl FnOnce(NetError) -> CniError + '_ {
    move |e| CniError::new(Code::IoFailure, msg, e.to_string())
}

fn check_failed(details: impl Into<String>) -> CniError {
    CniError::new(
        Code::CheckFailed,
        "the container's network is not as ADD set it up",
        details,
    )
}

/// Seine's part of a network configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The version to answer in (negotiated).
    pub version: String,
    pub name: String,
    pub pod_cidr: Option<String>,
    pub mtu: Option<u32>,
    pub data_dir: PathBuf,
    pub bpffs_dir: PathBuf,
    pub vxlan_device: Option<String>,
    pub prev_result: Option<Value>,
    /// `runtimeConfig.portMappings`: the pod's hostPorts.
    pub port_mappings: Vec<PortMapping>,
    pub raw: Value,
}

impl Config {
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        let raw = spec::parse_config(bytes)?;
        let version = spec::negotiate(&raw)?;
        let text = |key: &str| -> Result<Option<String>, CniError> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
                Some(other) => Err(invalid_config(format!(
                    "{key:?} must be a non-empty string, not {other}"
                ))),
            }
        };
        let name = text("name")?.unwrap_or_default();
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
            || name.starts_with('.')
        {
            return Err(invalid_config(format!(
                "the network name {name:?} may hold only letters, digits, '_', '-' and '.'"
            )));
        }
        let mtu = match raw.get(conf::MTU) {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|m| (576..=65535).contains(m))
                    .ok_or_else(|| {
                        invalid_config(format!("\"mtu\" {v} is not from 576 to 65535"))
                    })? as u32,
            ),
        };
        let pod_cidr = text(conf::POD_CIDR)?;
        if let Some(cidr) = &pod_cidr {
            if Store::parse_cidr(cidr).is_none() {
                return Err(invalid_config(format!(
                    "\"podCIDR\" {cidr:?} is not an IPv4 CIDR with a prefix length from 8 to 30"
                )));
            }
        }
        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(invalid_config(format!(
                    "\"prevResult\" must be an object, not {other}"
                )))
            }
        };
        Ok(Config {
            version,
            name,
            pod_cidr,
            mtu,
            data_dir: text(conf::DATA_DIR)?
                .map_or_else(|| PathBuf::from(DEFAULT_DATA_DIR), PathBuf::from),
            bpffs_dir: text(conf::BPFFS_DIR)?.map_or_else(
                || PathBuf::from(seine_common::DEFAULT_BPFFS_DIR),
                PathBuf::from,
            ),
            vxlan_device: text(conf::VXLAN_DEVICE)?,
            prev_result,
            port_mappings: hostport::from_runtime_config(&raw).map_err(invalid_config)?,
            raw,
        })
    }

    fn hostports(&self) -> PathBuf {
        hostport::dir(&self.data_dir)
    }

    fn store(&self) -> Result<Store, CniError> {
        let cidr = self.pod_cidr.as_deref().ok_or_else(|| {
            invalid_config(
                "\"podCIDR\" is required (the agent writes it from the Node's spec.podCIDR)",
            )
        })?;
        Ok(Store::open(&self.data_dir.join(&self.name), cidr)?)
    }
}

/// The host-side veth of (container, interface): `lxc` and 11 hex digits of a hash of both, so
/// that DEL finds it without the pod's namespace.
pub fn host_veth_name(container: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{HOST_PREFIX}{}", &hex[..11])
}

fn alias(network: &str, container: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}:{network}:{container}/{ifname}")
}

/// Runs one command. `Ok(Some(json))` is printed on stdout; errors become the spec's error JSON.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    match env.command.as_str() {
        "VERSION" => {
            let info = spec::version_info(spec::requested_version(stdin).as_deref());
            Ok(Some(serde_json::to_value(info).unwrap_or(Value::Null)))
        }
        "ADD" => {
            env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])?;
            let config = Config::parse(stdin)?;
            add(env, &config).map(Some)
        }
        "DEL" => {
            env.require(&["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"])?;
            let config = Config::parse(stdin)?;
            del(env, &config).map(|()| None)
        }
        "CHECK" => {
            env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"])?;
            let config = Config::parse(stdin)?;
            check(env, &config).map(|()| None)
        }
        "GC" => {
            let config = Config::parse(stdin)?;
            gc(&config).map(|()| None)
        }
        "STATUS" => {
            let config = Config::parse(stdin)?;
            status(&config).map(|()| None)
        }
        other => Err(invalid_env(format!(
            "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
        ))),
    }
}

fn ids(env: &Env) -> (&str, &str) {
    (
        env.container_id.as_deref().unwrap_or_default(),
        env.ifname.as_deref().unwrap_or_default(),
    )
}

fn open_netns(env: &Env) -> Result<File, CniError> {
    let path = env.netns.as_deref().unwrap_or_default();
    File::open(path).map_err(|e| {
        CniError::new(
            Code::ContainerUnknown,
            "the container's network namespace cannot be opened",
            format!("CNI_NETNS {path}: {e}"),
        )
    })
}

/// The pods' MTU: the configured one, else the VXLAN device's (already uplink minus 50), else the
/// default route's device minus the VXLAN overhead.
fn pod_mtu(config: &Config) -> Result<u32, CniError> {
    if let Some(mtu) = config.mtu {
        return Ok(mtu);
    }
    let device = config.vxlan_device.clone();
    net::with_netlink(|handle| async move {
        if let Some(device) = device {
            if let Some(mtu) = net::link(&handle, &device)
                .await?
                .as_ref()
                .and_then(net::link_mtu)
            {
                return Ok(mtu);
            }
        }
        let default = net::routes(&handle)
            .await?
            .into_iter()
            .find(|r| r.header.destination_prefix_length == 0)
            .and_then(|r| net::route_oif(&r));
        if let Some(index) = default {
            let links = net::links(&handle).await?;
            if let Some(mtu) = links
                .iter()
                .find(|l| l.header.index == index)
                .and_then(net::link_mtu)
            {
                return Ok(mtu.saturating_sub(VXLAN_OVERHEAD).max(576));
            }
        }
        Ok(1500 - VXLAN_OVERHEAD)
    })
    .map_err(io_failure("finding the pod MTU"))
}

fn add(env: &Env, config: &Config) -> Result<Value, CniError> {
    let (container, ifname) = ids(env);
    let netns = open_netns(env)?;
    let store = config.store()?;
    let mtu = pod_mtu(config)?;
    let allocation = store.allocate(container, ifname)?;
    let host = host_veth_name(container, ifname);
    let set_up =
        setup(config, &netns, &host, ifname, container, mtu, allocation).and_then(|macs| {
            record_hostports(config, container, ifname, &host, allocation.ip).map(|()| macs)
        });
    match set_up {
        Ok((host_mac, pod_mac)) => Ok(add_result(
            config, env, &host, host_mac, pod_mac, allocation,
        )),
        Err(e) => {
            // Undo: the host side takes the pod side with it; the address goes back.
            let _ = net::with_netlink(
                |handle| async move { net::del_link_named(&handle, &host).await },
            );
            let _ = store.release(container, ifname);
            Err(e)
        }
    }
}

/// Records the pod's hostPorts for the agent (none: no record).
fn record_hostports(
    config: &Config,
    container: &str,
    ifname: &str,
    host: &str,
    pod_ip: Ipv4Addr,
) -> Result<(), CniError> {
    let record = hostport::Record {
        container_id: container.to_string(),
        ifname: ifname.to_string(),
        pod_ip,
        port_mappings: config.port_mappings.clone(),
    };
    hostport::write(&config.hostports(), host, &record).map_err(|e| {
        CniError::new(
            Code::IoFailure,
            "recording the pod's host ports",
            format!("{}: {e}", config.hostports().display()),
        )
    })
}

/// Creates and configures the pair; returns the host and pod MACs.
fn setup(
    config: &Config,
    netns: &File,
    host: &str,
    ifname: &str,
    container: &str,
    mtu: u32,
    allocation: Allocation,
) -> Result<([u8; 6], [u8; 6]), CniError> {
    let gateway = allocation.gateway;
    let alias = alias(&config.name, container, ifname);
    let host_mac = net::with_netlink(|handle| async move {
        if let Err(e) = net::add_veth(&handle, host, ifname, netns, mtu, &alias).await {
            // A pair left by an ADD of this same attachment that died halfway: start over.
            match net::link(&handle, host).await? {
                Some(stale) if e.errno() == Some(libc::EEXIST) => {
                    net::del_link(&handle, stale.header.index).await?;
                    net::add_veth(&handle, host, ifname, netns, mtu, &alias).await?;
                }
                _ => return Err(e),
            }
        }
        let link = net::existing_link(&handle, host, "the new veth vanished").await?;
        let index = link.header.index;
        net::set_up(&handle, index).await?;
        net::add_address(&handle, index, gateway, 32).await?;
        net::replace_route(&handle, net::route(allocation.ip, 32, index, None)).await?;
        Ok(net::link_mac(&link).unwrap_or_default())
    })
    .map_err(|e| match e.errno() {
        Some(libc::EEXIST) => CniError::new(
            Code::IoFailure,
            "the interface exists already",
            format!("{ifname} exists in {}: {e}", config.name),
        ),
        _ => io_failure("setting up the host side")(e),
    })?;
    net::sysctl("net.ipv4.ip_forward", "1").map_err(io_failure("enabling forwarding"))?;
    let pod_mac = net::in_netns(netns, || {
        net::with_netlink(|handle| async move {
            // The loopback device is the first of every namespace.
            net::set_up(&handle, 1).await?;
            let link = net::existing_link(&handle, ifname, "missing in the pod").await?;
            let index = link.header.index;
            net::set_up(&handle, index).await?;
            net::add_address(&handle, index, allocation.ip, 32).await?;
            net::replace_route(&handle, net::route(gateway, 32, index, None)).await?;
            net::replace_route(
                &handle,
                net::route(Ipv4Addr::UNSPECIFIED, 0, index, Some(gateway)),
            )
            .await?;
            Ok(net::link_mac(&link).unwrap_or_default())
        })
    })
    .map_err(io_failure("setting up the pod side"))?;
    seine_common::tc::attach_pinned(&config.bpffs_dir, host).map_err(|e| {
        CniError::new(
            Code::IoFailure,
            "attaching the service datapath to the pod's veth",
            e.to_string(),
        )
    })?;
    Ok((host_mac, pod_mac))
}

fn add_result(
    config: &Config,
    env: &Env,
    host: &str,
    host_mac: [u8; 6],
    pod_mac: [u8; 6],
    allocation: Allocation,
) -> Value {
    let (_, ifname) = ids(env);
    let mut result = match &config.prev_result {
        Some(Value::Object(prev)) => prev.clone(),
        _ => Map::new(),
    };
    let mut interfaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    interfaces.push(json!({"name": host, "mac": net::format_mac(host_mac)}));
    let pod_index = interfaces.len();
    interfaces.push(json!({"name": ifname, "mac": net::format_mac(pod_mac),
                           "sandbox": env.netns.as_deref().unwrap_or_default()}));
    let mut ip = json!({"address": format!("{}/32", allocation.ip),
                        "gateway": allocation.gateway.to_string(), "interface": pod_index});
    if config.version == "0.4.0" {
        ip["version"] = json!("4");
    }
    let mut ips = result
        .get("ips")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    ips.push(ip);
    let mut routes = result
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    routes.push(json!({"dst": "0.0.0.0/0", "gw": allocation.gateway.to_string()}));
    result.insert("cniVersion".into(), json!(config.version));
    result.insert("interfaces".into(), Value::Array(interfaces));
    result.insert("ips".into(), Value::Array(ips));
    result.insert("routes".into(), Value::Array(routes));
    result.entry("dns").or_insert_with(|| json!({}));
    Value::Object(result)
}

fn del(env: &Env, config: &Config) -> Result<(), CniError> {
    let (container, ifname) = ids(env);
    let host = host_veth_name(container, ifname);
    // The host side takes the pod side with it; gone already (pod netns deleted) is fine.
    hostport::remove(&config.hostports(), &host).map_err(|e| {
        CniError::new(
            Code::IoFailure,
            "removing the pod's host ports",
            format!("{}: {e}", config.hostports().display()),
        )
    })?;
    net::with_netlink(|handle| async move { net::del_link_named(&handle, &host).await })
        .map_err(io_failure("deleting the pod's veth"))?;
    // Without a pod CIDR there is no store, and nothing to release.
    if config.pod_cidr.is_some() {
        config.store()?.release(container, ifname)?;
    }
    Ok(())
}

/// The address the previous result gives the interface `ifname`.
fn prev_address(prev: &Value, ifname: &str) -> Option<Ipv4Addr> {
    let interfaces = prev.get("interfaces")?.as_array()?;
    prev.get("ips")?.as_array()?.iter().find_map(|ip| {
        let index = ip.get("interface")?.as_u64()? as usize;
        let name = interfaces.get(index)?.get("name")?.as_str()?;
        if name != ifname {
            return None;
        }
        let address = ip.get("address")?.as_str()?;
        address.split('/').next()?.parse().ok()
    })
}

fn check(env: &Env, config: &Config) -> Result<(), CniError> {
    let (container, ifname) = ids(env);
    let prev = config
        .prev_result
        .as_ref()
        .ok_or_else(|| invalid_config("CHECK needs \"prevResult\" (the result of the ADD)"))?;
    let expected = prev_address(prev, ifname)
        .ok_or_else(|| invalid_config(format!("\"prevResult\" gives {ifname} no address")))?;
    let netns = open_netns(env)?;
    let store = config.store()?;
    let owned = store
        .allocations()?
        .into_iter()
        .find(|o| o.container == container && o.ifname == ifname)
        .ok_or_else(|| check_failed(format!("no address is allocated to {container}/{ifname}")))?;
    if owned.ip != expected {
        return Err(check_failed(format!(
            "{container}/{ifname} holds {}, prevResult says {expected}",
            owned.ip
        )));
    }
    let host = host_veth_name(container, ifname);
    let recorded = hostport::read(&config.hostports(), &host)
        .map(|r| r.port_mappings)
        .unwrap_or_default();
    if recorded != config.port_mappings {
        return Err(check_failed(format!(
            "{container}/{ifname} has host ports {recorded:?}, the runtime asks for {:?}",
            config.port_mappings
        )));
    }
    let mtu = pod_mtu(config)?;
    let gateway = store.gateway();
    let host_problem = net::with_netlink(|handle| {
        let host = host.clone();
        async move {
            let Some(link) = net::link(&handle, &host).await? else {
                return Ok(Some(format!("the host-side veth {host} is missing")));
            };
            if !net::link_is_up(&link) {
                return Ok(Some(format!("{host} is down")));
            }
            let index = link.header.index;
            let routed = net::routes(&handle)
                .await?
                .iter()
                .any(|r| net::route_dst(r) == (expected, 32) && net::route_oif(r) == Some(index));
            if !routed {
                return Ok(Some(format!("no route to {expected}/32 through {host}")));
            }
            Ok(None)
        }
    })
    .map_err(io_failure("checking the host side"))?;
    if let Some(problem) = host_problem {
        return Err(check_failed(problem));
    }
    let pod_problem = net::in_netns(&netns, || {
        net::with_netlink(|handle| async move {
            let Some(link) = net::link(&handle, ifname).await? else {
                return Ok(Some(format!("{ifname} is missing in the pod")));
            };
            let index = link.header.index;
            if !net::link_is_up(&link) {
                return Ok(Some(format!("{ifname} is down")));
            }
            if net::link_mtu(&link) != Some(mtu) {
                return Ok(Some(format!(
                    "{ifname} has MTU {:?}, expected {mtu}",
                    net::link_mtu(&link)
                )));
            }
            if !net::addresses(&handle, index)
                .await?
                .contains(&(expected, 32))
            {
                return Ok(Some(format!("{ifname} lacks {expected}/32")));
            }
            let default = net::routes(&handle).await?.iter().any(|r| {
                net::route_dst(r).1 == 0
                    && net::route_gateway(r) == Some(gateway)
                    && net::route_oif(r) == Some(index)
            });
            if !default {
                return Ok(Some(format!("no default route via {gateway} on {ifname}")));
            }
            Ok(None)
        })
    })
    .map_err(io_failure("checking the pod side"))?;
    match pod_problem {
        Some(problem) => Err(check_failed(problem)),
        None => Ok(()),
    }
}

/// The (container, interface) pairs of `cni.dev/valid-attachments`.
fn valid_attachments(config: &Config) -> Result<Vec<(String, String)>, CniError> {
    let Some(list) = config.raw.get("cni.dev/valid-attachments") else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| invalid_config("\"cni.dev/valid-attachments\" must be a list"))?;
    list.iter()
        .map(|a| {
            let field = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            match (field("containerID"), field("ifname")) {
                (Some(c), Some(i)) => Ok((c, i)),
                _ => Err(invalid_config(format!(
                    "a valid attachment needs \"containerID\" and \"ifname\": {a}"
                ))),
            }
        })
        .collect()
}

fn gc(config: &Config) -> Result<(), CniError> {
    let valid = valid_attachments(config)?;
    let keep: Vec<String> = valid
        .iter()
        .map(|(c, i)| alias(&config.name, c, i))
        .collect();
    let keep_names: Vec<String> = valid.iter().map(|(c, i)| host_veth_name(c, i)).collect();
    let prefix = format!("{ALIAS_PREFIX}:{}:", config.name);
    net::with_netlink(|handle| async move {
        for link in net::links(&handle).await? {
            let stale = match net::link_alias(&link) {
                Some(alias) => alias.starts_with(&prefix) && !keep.iter().any(|k| k == alias),
                // A pair whose ADD died before labelling it: Seine's name, no valid owner.
                None => {
                    let name = net::link_name(&link).unwrap_or_default();
                    name.len() == HOST_PREFIX.len() + 11
                        && name.starts_with(HOST_PREFIX)
                        && name[HOST_PREFIX.len()..]
                            .chars()
                            .all(|c| c.is_ascii_hexdigit())
                        && !keep_names.iter().any(|k| k == name)
                }
            };
            if stale {
                net::del_link(&handle, link.header.index).await?;
            }
        }
        Ok(())
    })
    .map_err(io_failure("removing stale veths"))?;
    let (records, _) = hostport::read_all(&config.hostports());
    for (name, record) in records {
        let attachment = (record.container_id, record.ifname);
        if !valid.contains(&attachment) {
            hostport::remove(&config.hostports(), &name).map_err(|e| {
                CniError::new(Code::IoFailure, "removing stale host ports", e.to_string())
            })?;
        }
    }
    if config.pod_cidr.is_some() {
        config.store()?.gc(&valid)?;
    }
    Ok(())
}

fn not_ready(details: impl Into<String>) -> CniError {
    CniError::new(
        Code::PluginNotAvailable,
        "the node's network is not configured",
        details,
    )
}

fn status(config: &Config) -> Result<(), CniError> {
    let cidr = config
        .pod_cidr
        .as_deref()
        .ok_or_else(|| not_ready("no pod CIDR: the Node has no spec.podCIDR yet"))?;
    let store = Store::open(&config.data_dir.join(&config.name), cidr)
        .map_err(|e| not_ready(format!("the address store: {e}")))?;
    if let Some(device) = config.vxlan_device.clone() {
        let state = net::with_netlink(|handle| async move {
            Ok(net::link(&handle, &device)
                .await?
                .map(|l| net::link_is_up(&l)))
        })
        .map_err(io_failure("looking up the overlay device"))?;
        let device = config.vxlan_device.as_deref().unwrap_or_default();
        match state {
            None => return Err(not_ready(format!("the overlay device {device} is missing"))),
            Some(false) => return Err(not_ready(format!("the overlay device {device} is down"))),
            Some(true) => {}
        }
    }
    if store.free()? == 0 {
        return Err(CniError::new(
            Code::PluginLimited,
            "no free pod address",
            format!("every address of {cidr} is allocated"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn the_example_conflist_gives_each_plugin_a_usable_configuration() {
        let text = include_str!("../10-seine.conflist");
        let list: Value = serde_json::from_str(text).unwrap();
        let mut ours = list["plugins"][0].clone();
        ours["name"] = list["name"].clone();
        ours["cniVersion"] = list["cniVersion"].clone();
        let config = Config::parse(&serde_json::to_vec(&ours).unwrap()).unwrap();
        assert_eq!(config.version, "1.0.0");
        assert_eq!(config.pod_cidr.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(config.mtu, Some(1450));
        // hostPorts are Seine's own: no third-party plugin in the chain.
        assert_eq!(list["plugins"].as_array().unwrap().len(), 1);
        assert_eq!(list["plugins"][0]["capabilities"]["portMappings"], true);
        assert!(config.port_mappings.is_empty());
        // A runtime writes the version it picked into each plugin's configuration.
        assert_eq!(spec::negotiate(&list).unwrap(), "1.0.0");
        let mut picked = list.clone();
        picked.as_object_mut().unwrap().remove("cniVersion");
        assert_eq!(spec::negotiate(&picked).unwrap(), "1.1.0");
    }

    #[test]
    fn the_environment_is_checked_as_the_spec_asks() {
        assert_eq!(env(&[]).unwrap_err().code, Code::InvalidEnvironment);
        let add = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")]).unwrap();
        let err = add
            .require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidEnvironment);
        assert!(
            err.details.contains("CNI_NETNS, CNI_IFNAME"),
            "{}",
            err.details
        );
        let bad_id = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "a/b")]).unwrap();
        assert!(bad_id.require(&["CNI_CONTAINERID"]).is_err());
        let long_if = env(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "0123456789abcdef")]).unwrap();
        assert!(long_if.require(&["CNI_IFNAME"]).is_err());
        let unknown = env(&[("CNI_COMMAND", "FROB")]).unwrap();
        assert_eq!(
            run(&unknown, b"{}").unwrap_err().code,
            Code::InvalidEnvironment
        );
    }

    #[test]
    fn host_veth_names_are_stable_short_and_distinct() {
        let a = host_veth_name("container-a", "eth0");
        assert_eq!(a, host_veth_name("container-a", "eth0"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with(HOST_PREFIX));
        assert_ne!(a, host_veth_name("container-a", "net1"));
        assert_ne!(a, host_veth_name("container-b", "eth0"));
    }

    #[test]
    fn a_previous_result_names_the_interface_address() {
        let prev = serde_json::json!({
            "interfaces": [{"name": "lxc1"}, {"name": "eth0", "sandbox": "/x"}],
            "ips": [{"address": "10.244.1.5/32", "interface": 1}],
        });
        assert_eq!(
            prev_address(&prev, "eth0"),
            Some(Ipv4Addr::new(10, 244, 1, 5))
        );
        assert_eq!(prev_address(&prev, "net1"), None);
    }
}
