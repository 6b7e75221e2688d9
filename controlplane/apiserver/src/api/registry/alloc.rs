//! Service ClusterIP and NodePort allocation, for one range per IP family (dual-stack as
//! kube-apiserver has it: `ipFamilyPolicy` and `ipFamilies` defaulted and checked here, where the
//! cluster's ranges are known, and one cluster IP per family). Each allocated address is an
//! IPAddress object (networking.k8s.io/v1, named by the address, its parentRef the Service) and
//! each node port a key (`/registry/seine/nodeports/<port>`), created in the same transaction that
//! writes the Service: two API servers on one etcd can race for the same address, and exactly one
//! transaction wins. Addresses come from the ranges of `--service-cluster-ip-range` and of the
//! ServiceCIDR objects added at run time; an IPAddress made by hand reserves its address.

use std::{net::IpAddr, ops::RangeInclusive};

use rand::Rng as _;
use serde_json::{json, Value};

use crate::api::status::ApiError;
use crate::storage::{Claims, ObjectKey, Storage, StorageError};

const IP_PREFIX: &str = "/registry/ipaddresses/";
const SERVICE_CIDR_PREFIX: &str = "/registry/servicecidrs/";
const PORT_PREFIX: &str = "/registry/seine/nodeports/";

/// Random picks before falling back to reading which values are free.
const RANDOM_TRIES: usize = 4;

pub use seine_apimachinery::cidr::Family;
use seine_apimachinery::cidr::{to_u128, IpCidr};

/// One service range (`10.96.0.0/12`, `fd00:10:96::/112`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpRange {
    cidr: IpCidr,
}

impl IpRange {
    /// A CIDR of a size kube-apiserver takes for services: IPv4 from /8 (more is wasteful) to
    /// /30, IPv6 at least /108 (at most 2^20 addresses, which the allocator can list when it
    /// must).
    pub fn parse(text: &str) -> Result<Self, String> {
        let cidr = IpCidr::parse(text)?;
        let allowed = match cidr.family {
            Family::V4 => 8..=30,
            Family::V6 => 108..=126,
        };
        if !allowed.contains(&cidr.len) {
            return Err(format!(
                "{text:?}: the prefix length must be between {} and {}",
                allowed.start(),
                allowed.end()
            ));
        }
        Ok(IpRange { cidr })
    }

    pub fn family(&self) -> Family {
        self.cidr.family
    }

    fn address(&self, value: u128) -> IpAddr {
        self.cidr.family.address(value)
    }

    /// Addresses services can be given: the range without its network, first and last
    /// addresses.
    fn usable(&self) -> RangeInclusive<u128> {
        let network = self.cidr.network;
        network + 2..=network + (1u128 << self.cidr.host_bits()) - 2
    }

    /// Whether `ip` is in the range, its network and broadcast addresses excepted.
    fn contains_ip(&self, ip: IpAddr) -> bool {
        let (network, value) = (self.cidr.network, to_u128(ip));
        self.cidr.contains_ip(ip)
            && value > network
            && value < network + (1u128 << self.cidr.host_bits()) - 1
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.cidr.fmt(f)
    }
}

#[derive(Debug, Clone)]
pub struct ServiceRanges {
    /// One per family; the first is the primary (the `kubernetes` service's family).
    pub ranges: Vec<IpRange>,
    pub node_ports: RangeInclusive<u16>,
}

impl ServiceRanges {
    /// From `--service-cluster-ip-range` (one CIDR, or one per family separated by a comma) and
    /// `--service-node-port-range` (a-b).
    pub fn parse(cidrs: &str, node_ports: &str) -> Result<Self, String> {
        let ranges = cidrs
            .split(',')
            .map(|c| IpRange::parse(c.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        match ranges.as_slice() {
            [_] => {}
            [a, b] if a.family() != b.family() => {}
            _ => {
                return Err(format!(
                    "{cidrs:?}: one range, or two of different families (dual-stack)"
                ))
            }
        }
        let (low, high) = node_ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| a <= b && *a > 0)
            .ok_or_else(|| format!("{node_ports:?} is not a port range (low-high)"))?;
        Ok(ServiceRanges {
            ranges,
            node_ports: low..=high,
        })
    }

    pub fn primary(&self) -> &IpRange {
        &self.ranges[0]
    }

    fn range(&self, family: Family) -> Option<&IpRange> {
        self.ranges.iter().find(|r| r.family() == family)
    }

    /// The ranges of `family` to allocate from: the flag's first, then those of ServiceCIDRs.
    fn ranges_of<'a>(&'a self, extra: &'a [IpRange], family: Family) -> Vec<&'a IpRange> {
        let mut out: Vec<&IpRange> = Vec::new();
        for r in self.ranges.iter().chain(extra) {
            if r.family() == family && !out.contains(&r) {
                out.push(r);
            }
        }
        out
    }

    fn dual_stack(&self) -> bool {
        self.ranges.len() == 2
    }

    /// The first address of the primary range, which the `default/kubernetes` service holds.
    pub fn kubernetes_ip(&self) -> IpAddr {
        let primary = self.primary();
        primary.address(primary.cidr.network + 1)
    }
}

pub fn ip_key(ip: &str) -> String {
    format!("{IP_PREFIX}{ip}")
}

pub fn port_key(port: i64) -> String {
    format!("{PORT_PREFIX}{port}")
}

/// The ranges of the ServiceCIDR objects that take new addresses: not those being deleted (the
/// service-cidr controller holds them until their addresses are gone) nor those whose Ready
/// condition is False. One with no Ready condition yet is taken, as kube-apiserver does, so
/// that ranges work without the controller manager.
async fn service_cidr_ranges(storage: &Storage) -> Result<Vec<IpRange>, ApiError> {
    let mut out = Vec::new();
    for object in storage
        .list(SERVICE_CIDR_PREFIX, 0, None, None)
        .await?
        .items
    {
        let not_ready = object["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "False");
        if not_ready || !object["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        for cidr in object["spec"]["cidrs"].as_array().into_iter().flatten() {
            if let Some(range) = cidr.as_str().and_then(|c| IpRange::parse(c).ok()) {
                out.push(range);
            }
        }
    }
    Ok(out)
}

/// The IPAddress object that records `ip` as the address of the service `owner` (ns/name).
fn ip_address(ip: &str, owner: &str) -> String {
    let (namespace, name) = owner.split_once('/').unwrap_or(("", owner));
    let family = ip
        .parse::<IpAddr>()
        .map(Family::of)
        .map_or("", Family::name);
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "IPAddress",
           "metadata": {"name": ip, "uid": crate::api::registry::meta::uid(),
                        "creationTimestamp": crate::api::registry::meta::now(),
                        "labels": {"ipaddress.kubernetes.io/ip-family": family,
                                   "ipaddress.kubernetes.io/managed-by": "ipallocator.k8s.io"}},
           "spec": {"parentRef": {"group": "", "resource": "services",
                                  "namespace": namespace, "name": name}}})
    .to_string()
}

fn owner(service: &Value) -> String {
    format!(
        "{}/{}",
        service["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default(),
        service["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn needs_cluster_ip(spec: &Value) -> bool {
    spec["type"] != "ExternalName" && spec["clusterIP"] != "None"
}

fn wants_node_ports(spec: &Value) -> bool {
    matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer"))
}

/// The keys a stored service holds.
pub fn held_keys(service: &Value) -> Vec<String> {
    let spec = &service["spec"];
    let mut keys = Vec::new();
    for ip in cluster_ips(spec) {
        if ip.parse::<IpAddr>().is_ok() && !keys.contains(&ip_key(&ip)) {
            keys.push(ip_key(&ip));
        }
    }
    for p in spec["ports"].as_array().into_iter().flatten() {
        if let Some(port) = p["nodePort"].as_i64().filter(|p| *p > 0) {
            if !keys.contains(&port_key(port)) {
                keys.push(port_key(port));
            }
        }
    }
    keys
}

/// The cluster IPs a spec holds or asks for: `clusterIPs`, else `clusterIP`.
fn cluster_ips(spec: &Value) -> Vec<String> {
    let listed: Vec<String> = spec["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    if !listed.is_empty() {
        return listed;
    }
    spec["clusterIP"]
        .as_str()
        .filter(|ip| !ip.is_empty())
        .map(|ip| vec![ip.to_string()])
        .unwrap_or_default()
}

type Causes = Vec<(String, String)>;

/// `ipFamilyPolicy` and `ipFamilies` as kube-apiserver defaults and checks them against the
/// cluster's ranges (and, on update, the stored service): the families to give addresses in.
fn families(
    ranges: &ServiceRanges,
    spec: &mut Value,
    current: Option<&Value>,
    ips: &[String],
) -> Result<Vec<Family>, Causes> {
    let mut causes = Causes::new();
    let mut given = Vec::new();
    let listed = spec["ipFamilies"].as_array().cloned().unwrap_or_default();
    if listed.len() > 2 {
        causes.push((
            "spec.ipFamilies".into(),
            format!("Too many: {}: must have at most 2 items", listed.len()),
        ));
    }
    for (i, f) in listed.iter().enumerate() {
        match f.as_str().and_then(Family::from_name) {
            Some(family) if given.contains(&family) => causes.push((
                format!("spec.ipFamilies[{i}]"),
                format!("Duplicate value: {f}"),
            )),
            Some(family) => given.push(family),
            None => causes.push((
                format!("spec.ipFamilies[{i}]"),
                format!("Unsupported value: {f}: supported values: \"IPv4\", \"IPv6\""),
            )),
        }
    }
    let mut ip_families = Vec::new();
    let headless = ips.first().is_some_and(|ip| ip == "None");
    for (i, ip) in ips.iter().enumerate() {
        if headless && i == 0 {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) => ip_families.push(Family::of(ip)),
            Err(_) => causes.push((
                format!("spec.clusterIPs[{i}]"),
                format!("Invalid value: {ip:?}: must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)"),
            )),
        }
    }
    if ip_families.len() == 2 && ip_families[0] == ip_families[1] {
        causes.push((
            "spec.clusterIPs".into(),
            format!("Invalid value: {ips:?}: may specify no more than one IP for each IP family"),
        ));
    }
    for (i, (f, ipf)) in given.iter().zip(&ip_families).enumerate() {
        if f != ipf {
            causes.push((
                format!("spec.ipFamilies[{i}]"),
                format!(
                    "Invalid value: {:?}: must match the address family of spec.clusterIPs[{i}] ({:?})",
                    f.name(),
                    ips[i]
                ),
            ));
        }
    }
    let several = given.len() == 2 || ip_families.len() == 2;
    let policy = match spec["ipFamilyPolicy"].as_str() {
        Some(p @ ("SingleStack" | "PreferDualStack" | "RequireDualStack")) => p.to_string(),
        Some(other) => {
            causes.push((
                "spec.ipFamilyPolicy".into(),
                format!("Unsupported value: {other:?}: supported values: \"PreferDualStack\", \"RequireDualStack\", \"SingleStack\""),
            ));
            "SingleStack".into()
        }
        None if several => "RequireDualStack".into(),
        None => "SingleStack".into(),
    };
    if policy == "SingleStack" && several {
        causes.push((
            "spec.ipFamilyPolicy".into(),
            "Invalid value: \"SingleStack\": must be RequireDualStack or PreferDualStack when multiple IP families are specified".into(),
        ));
    }
    if policy == "RequireDualStack" && !ranges.dual_stack() {
        causes.push((
            "spec.ipFamilyPolicy".into(),
            "Invalid value: \"RequireDualStack\": this cluster is not configured for dual-stack services".into(),
        ));
    }
    let mut families = if !given.is_empty() {
        given
    } else if !ip_families.is_empty() {
        ip_families
    } else if let Some(stored) = current
        .and_then(|c| c["spec"]["ipFamilies"][0].as_str())
        .and_then(Family::from_name)
    {
        vec![stored]
    } else {
        vec![ranges.primary().family()]
    };
    if policy != "SingleStack" && ranges.dual_stack() && families.len() == 1 {
        let other = ranges
            .ranges
            .iter()
            .map(|r| r.family())
            .find(|f| *f != families[0]);
        families.extend(other);
    }
    for (i, f) in families.iter().enumerate() {
        if ranges.range(*f).is_none() {
            causes.push((
                format!("spec.ipFamilies[{i}]"),
                format!(
                    "Invalid value: {:?}: not configured on this cluster",
                    f.name()
                ),
            ));
        }
    }
    if let Some(stored) = current
        .and_then(|c| c["spec"]["ipFamilies"][0].as_str())
        .and_then(Family::from_name)
    {
        if families.first() != Some(&stored) {
            causes.push((
                "spec.ipFamilies[0]".into(),
                format!(
                    "Invalid value: {:?}: may not change once set",
                    families.first().map_or("", |f| f.name())
                ),
            ));
        }
    }
    if !causes.is_empty() {
        return Err(causes);
    }
    spec["ipFamilyPolicy"] = policy.into();
    spec["ipFamilies"] = families.iter().map(|f| f.name()).collect::<Vec<_>>().into();
    Ok(families)
}

/// What one attempt at writing a service claims: the values the client asked for, and random or
/// free ones for the rest.
struct Plan {
    service: Value,
    claims: Claims,
    /// Claimed keys the client asked for by value (a conflict on these is the client's error).
    requested: Vec<(String, String)>,
}

/// Fills in and claims the ClusterIP and NodePorts of `service` (new, or updated from `current`).
async fn plan(
    ranges: &ServiceRanges,
    extra: &[IpRange],
    storage: &Storage,
    current: Option<&Value>,
    mut service: Value,
    attempt: usize,
) -> Result<Plan, ApiError> {
    let mut claims = Claims::default();
    let mut requested = Vec::new();
    let held: Vec<String> = current.map(held_keys).unwrap_or_default();
    let who = owner(&service);
    let spec = &mut service["spec"];

    let mut keep: Vec<String> = Vec::new();
    if needs_cluster_ip(spec) || spec["clusterIP"] == "None" {
        // A service updated to SingleStack keeps its primary family and address only.
        if current.is_some() && spec["ipFamilyPolicy"] == "SingleStack" {
            for field in ["ipFamilies", "clusterIPs"] {
                if let Some(list) = spec[field].as_array_mut() {
                    list.truncate(1);
                }
            }
        }
        let ips = cluster_ips(spec);
        let families = families(ranges, spec, current, &ips)
            .map_err(|causes| ApiError::invalid("Service", service_name(&who), causes))?;
        if spec["clusterIP"] == "None" {
            spec["clusterIPs"] = json!(["None"]);
        } else {
            let mut assigned = Vec::new();
            for (i, family) in families.iter().enumerate() {
                let family_ranges = ranges.ranges_of(extra, *family);
                let ip = match ips.get(i) {
                    Some(given) if held.contains(&ip_key(given)) => given.clone(),
                    Some(given) => {
                        let ip: IpAddr = given.parse().map_err(|_| {
                            ApiError::internal(format!("{given:?} was checked as an address"))
                        })?;
                        if !family_ranges.iter().any(|r| r.contains_ip(ip)) {
                            let valid = family_ranges
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join(",");
                            return Err(ApiError::invalid(
                                "Service",
                                service_name(&who),
                                vec![(
                                    "spec.clusterIPs".into(),
                                    format!(
                                        "Invalid value: [{given:?}]: failed to allocate IP {given}: the provided IP ({given}) is not in the valid range. The range of valid IPs is {valid}"
                                    ),
                                )],
                            ));
                        }
                        claims.claim.push((ip_key(given), ip_address(given, &who)));
                        requested.push((ip_key(given), format!("spec.clusterIPs: Invalid value: [{given:?}]: failed to allocate IP {given}: provided IP is already allocated")));
                        given.clone()
                    }
                    None => {
                        let used = if attempt >= RANDOM_TRIES {
                            Some(storage.keys(IP_PREFIX).await?)
                        } else {
                            None
                        };
                        // The flag's range first, a ServiceCIDR's once the earlier ones are full
                        // (random picks that keep colliding list the free addresses).
                        let order = &family_ranges;
                        let ip = order
                            .iter()
                            .find_map(|r| pick_ip(r, used.as_deref()))
                            .ok_or_else(|| {
                                ApiError::internal(format!(
                                    "failed to allocate a serviceIP: range is full ({})",
                                    family_ranges
                                        .iter()
                                        .map(ToString::to_string)
                                        .collect::<Vec<_>>()
                                        .join(",")
                                ))
                            })?
                            .to_string();
                        claims.claim.push((ip_key(&ip), ip_address(&ip, &who)));
                        ip
                    }
                };
                keep.push(ip_key(&ip));
                assigned.push(ip);
            }
            spec["clusterIP"] = assigned[0].clone().into();
            spec["clusterIPs"] = json!(assigned);
        }
    }

    if wants_node_ports(spec) {
        let mut used = if attempt >= RANDOM_TRIES {
            Some(storage.keys(PORT_PREFIX).await?)
        } else {
            None
        };
        let ports = spec["ports"]
            .as_array_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut out = Vec::with_capacity(ports.len());
        for (i, mut p) in ports.into_iter().enumerate() {
            let given = p["nodePort"].as_i64().unwrap_or(0);
            let port = if given == 0 {
                let port = pick_port(ranges, used.as_deref(), &claims).ok_or_else(|| {
                    ApiError::internal(format!(
                        "failed to allocate a nodePort: range is full ({}-{})",
                        ranges.node_ports.start(),
                        ranges.node_ports.end()
                    ))
                })?;
                claims.claim.push((port_key(port), who.clone()));
                if let Some(used) = used.as_mut() {
                    used.push(port_key(port));
                }
                port
            } else {
                let key = port_key(given);
                let in_range = u16::try_from(given).is_ok_and(|g| ranges.node_ports.contains(&g));
                if !in_range {
                    return Err(ApiError::invalid(
                        "Service",
                        service_name(&who),
                        vec![(
                            format!("spec.ports[{i}].nodePort"),
                            format!(
                                "Invalid value: {given}: provided port is not in the valid range. The range of valid ports is {}-{}",
                                ranges.node_ports.start(),
                                ranges.node_ports.end()
                            ),
                        )],
                    ));
                }
                if !held.contains(&key) && !claims.claim.iter().any(|(k, _)| *k == key) {
                    claims.claim.push((key.clone(), who.clone()));
                    requested.push((
                        key,
                        format!("spec.ports[{i}].nodePort: Invalid value: {given}: provided port is already allocated"),
                    ));
                }
                given
            };
            p["nodePort"] = port.into();
            keep.push(port_key(port));
            out.push(p);
        }
        spec["ports"] = Value::Array(out);
    } else if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for p in ports {
            if let Some(p) = p.as_object_mut() {
                p.remove("nodePort");
            }
        }
    }
    claims.release = held.into_iter().filter(|k| !keep.contains(k)).collect();
    Ok(Plan {
        service,
        claims,
        requested,
    })
}

fn service_name(owner: &str) -> &str {
    owner.rsplit('/').next().unwrap_or(owner)
}

/// A random free address of `range`; with `used` (after random picks collided), one of the
/// free addresses listed.
fn pick_ip(range: &IpRange, used: Option<&[String]>) -> Option<IpAddr> {
    let usable = range.usable();
    let mut rng = rand::rng();
    match used {
        None => Some(range.address(rng.random_range(usable))),
        Some(used) => {
            let taken: std::collections::HashSet<&str> = used
                .iter()
                .filter_map(|k| k.strip_prefix(IP_PREFIX))
                .collect();
            let free: Vec<u128> = usable
                .filter(|ip| !taken.contains(range.address(*ip).to_string().as_str()))
                .collect();
            (!free.is_empty()).then(|| range.address(free[rng.random_range(0..free.len())]))
        }
    }
}

fn pick_port(ranges: &ServiceRanges, used: Option<&[String]>, claims: &Claims) -> Option<i64> {
    let mut rng = rand::rng();
    let claimed = |port: i64| claims.claim.iter().any(|(k, _)| *k == port_key(port));
    match used {
        None => {
            for _ in 0..16 {
                let port = i64::from(rng.random_range(ranges.node_ports.clone()));
                if !claimed(port) {
                    return Some(port);
                }
            }
            None
        }
        Some(used) => {
            let free: Vec<i64> = ranges
                .node_ports
                .clone()
                .map(i64::from)
                .filter(|p| !claimed(*p) && !used.contains(&port_key(*p)))
                .collect();
            (!free.is_empty()).then(|| free[rng.random_range(0..free.len())])
        }
    }
}

/// Creates (`current` None) or updates a service, allocating what it needs in the same etcd
/// transaction; retries with other values when another writer took the chosen ones.
pub async fn write_service(
    ranges: &ServiceRanges,
    storage: &Storage,
    key: &ObjectKey,
    current: Option<&Value>,
    service: Value,
    expected_revision: Option<i64>,
) -> Result<Value, ApiError> {
    let extra = service_cidr_ranges(storage).await?;
    for attempt in 0..RANDOM_TRIES + 28 {
        let plan = plan(ranges, &extra, storage, current, service.clone(), attempt).await?;
        let result = match current {
            None => storage.create_with(key, plan.service, &plan.claims).await,
            Some(_) => {
                storage
                    .update_with(key, plan.service, expected_revision, &plan.claims)
                    .await
            }
        };
        match result {
            Ok(stored) => return Ok(stored),
            Err(StorageError::Claimed(taken)) => {
                if let Some((_, message)) = plan.requested.iter().find(|(k, _)| taken.contains(k)) {
                    let (field, text) = message.split_once(": ").unwrap_or(("spec", message));
                    return Err(ApiError::invalid(
                        "Service",
                        &key.name,
                        vec![(field.to_string(), text.to_string())],
                    ));
                }
                // Someone else got the randomly chosen value first: choose again.
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal(
        "failed to allocate the service's addresses: too many concurrent allocations; try again",
    ))
}

/// Where versions before the IPAddress API recorded cluster IPs.
const OLD_IP_PREFIX: &str = "/registry/seine/serviceips/";

/// Gives every cluster IP of a stored Service its IPAddress where it has none (as
/// kube-apiserver's IP repair loop does at start), then drops the records of earlier versions,
/// which these replace. The IPAddress is written with the Service, at the revision read, so a
/// Service deleted or changed meanwhile gets none.
pub async fn repair(storage: &Storage) -> Result<(), ApiError> {
    let recorded: std::collections::HashSet<String> =
        storage.keys(IP_PREFIX).await?.into_iter().collect();
    let services = storage
        .list(
            &crate::storage::list_prefix("services", None),
            0,
            None,
            None,
        )
        .await?;
    let mut repaired = 0;
    for (service, etcd_key) in services.items.into_iter().zip(services.keys) {
        let who = owner(&service);
        let claim: Vec<(String, String)> = cluster_ips(&service["spec"])
            .into_iter()
            .filter(|ip| ip.parse::<IpAddr>().is_ok() && !recorded.contains(&ip_key(ip)))
            .map(|ip| (ip_key(&ip), ip_address(&ip, &who)))
            .collect();
        if claim.is_empty() {
            continue;
        }
        let (namespace, name) = who.split_once('/').unwrap_or_default();
        let key = ObjectKey::new("services", Some(namespace), name);
        let revision = crate::storage::resource_version(&service);
        let claims = Claims {
            claim,
            release: Vec::new(),
        };
        match storage
            .update_with(&key, service, Some(revision), &claims)
            .await
        {
            Ok(_) => repaired += 1,
            Err(
                StorageError::Conflict { .. }
                | StorageError::NotFound { .. }
                | StorageError::Claimed(_),
            ) => tracing::warn!(
                service = %who,
                key = %etcd_key,
                "cluster IP not recorded: the service changed meanwhile or its address is another's"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    let old = storage.keys(OLD_IP_PREFIX).await?;
    for key in &old {
        storage.delete_key(key).await?;
    }
    if repaired > 0 || !old.is_empty() {
        tracing::info!(
            services = repaired,
            old_records = old.len(),
            "cluster IPs without an IPAddress were given one"
        );
    }
    Ok(())
}

/// The claims a deletion releases.
pub fn release_all(service: &Value) -> Claims {
    Claims {
        claim: Vec::new(),
        release: held_keys(service),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_one_per_family_and_reserve_the_first_address() {
        let r = ServiceRanges::parse("10.96.0.0/12", "30000-32767").unwrap();
        let v4 = r.primary();
        assert_eq!(r.kubernetes_ip(), "10.96.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(v4.address(*v4.usable().start()).to_string(), "10.96.0.2");
        assert_eq!(v4.address(*v4.usable().end()).to_string(), "10.111.255.254");
        assert!(v4.contains_ip("10.100.0.1".parse().unwrap()));
        assert!(!v4.contains_ip("10.112.0.1".parse().unwrap()));
        let dual = ServiceRanges::parse("10.96.0.0/12,fd00:10:96::/112", "30000-32767").unwrap();
        let cidrs: Vec<String> = dual.ranges.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["10.96.0.0/12", "fd00:10:96::/112"]);
        let v6 = dual.range(Family::V6).unwrap();
        assert!(v6.contains_ip("fd00:10:96::a".parse().unwrap()));
        assert!(!v6.contains_ip("10.96.0.10".parse().unwrap()));
        let v6_first = ServiceRanges::parse("1234:abcd::/112", "30000-32767").unwrap();
        assert_eq!(v6_first.kubernetes_ip().to_string(), "1234:abcd::1");
        for bad in ["fd00::/64", "10.0.0.0/24,10.1.0.0/24", "a,b,c", "10.0.0.0"] {
            assert!(ServiceRanges::parse(bad, "30000-32767").is_err(), "{bad}");
        }
        assert!(ServiceRanges::parse("10.0.0.0/24", "5-1").is_err());
    }

    #[test]
    fn a_full_range_has_nothing_to_pick() {
        let r = ServiceRanges::parse("10.0.0.0/30", "30000-30000").unwrap();
        // /30: .0 network, .1 kubernetes, .2 usable, .3 broadcast.
        let used = vec![ip_key("10.0.0.2")];
        assert_eq!(pick_ip(r.primary(), Some(&used)), None);
        assert_eq!(
            pick_ip(r.primary(), Some(&[])),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(
            pick_port(&r, Some(&[port_key(30000)]), &Claims::default()),
            None
        );
    }

    fn families_of(cidrs: &str, spec: Value) -> Result<(Vec<&'static str>, Value), Causes> {
        let ranges = ServiceRanges::parse(cidrs, "30000-32767").unwrap();
        let mut spec = spec;
        let ips = cluster_ips(&spec);
        let f = families(&ranges, &mut spec, None, &ips)?;
        Ok((f.iter().map(|f| f.name()).collect(), spec))
    }

    #[test]
    fn ip_families_are_defaulted_and_checked_as_kube_apiserver_does() {
        let dual = "10.96.0.0/12,fd00:10:96::/112";
        let single = "10.96.0.0/12";
        // Defaults: the primary family, single stack.
        let (f, spec) = families_of(dual, json!({})).unwrap();
        assert_eq!(f, ["IPv4"]);
        assert_eq!(spec["ipFamilyPolicy"], "SingleStack");
        // PreferDualStack gets both on a dual-stack cluster, one on a single-stack one.
        assert_eq!(
            families_of(dual, json!({"ipFamilyPolicy": "PreferDualStack"}))
                .unwrap()
                .0,
            ["IPv4", "IPv6"]
        );
        assert_eq!(
            families_of(single, json!({"ipFamilyPolicy": "PreferDualStack"}))
                .unwrap()
                .0,
            ["IPv4"]
        );
        let (f, spec) = families_of(dual, json!({"ipFamilies": ["IPv6", "IPv4"]})).unwrap();
        assert_eq!(f, ["IPv6", "IPv4"]);
        assert_eq!(spec["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(
            families_of(dual, json!({"clusterIPs": ["fd00:10:96::a"]}))
                .unwrap()
                .0,
            ["IPv6"]
        );
        // Refused, with kube-apiserver's fields and words.
        let cases = [
            (
                single,
                json!({"ipFamilyPolicy": "RequireDualStack"}),
                "spec.ipFamilyPolicy",
                "not configured for dual-stack",
            ),
            (
                single,
                json!({"ipFamilies": ["IPv6"]}),
                "spec.ipFamilies[0]",
                "not configured on this cluster",
            ),
            (
                dual,
                json!({"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4", "IPv6"]}),
                "spec.ipFamilyPolicy",
                "must be RequireDualStack or PreferDualStack",
            ),
            (
                dual,
                json!({"ipFamilies": ["IPv4", "IPv4"]}),
                "spec.ipFamilies[1]",
                "Duplicate value",
            ),
            (
                dual,
                json!({"ipFamilies": ["IPv5"]}),
                "spec.ipFamilies[0]",
                "Unsupported value",
            ),
            (
                dual,
                json!({"ipFamilyPolicy": "Sometimes"}),
                "spec.ipFamilyPolicy",
                "Unsupported value",
            ),
            (
                dual,
                json!({"clusterIPs": ["10.96.0.5", "10.96.0.6"]}),
                "spec.clusterIPs",
                "no more than one IP for each IP family",
            ),
            (
                dual,
                json!({"clusterIP": "10.96.0.300"}),
                "spec.clusterIPs[0]",
                "must be a valid IP address",
            ),
            (
                dual,
                json!({"clusterIPs": ["10.96.0.5"], "ipFamilies": ["IPv6"]}),
                "spec.ipFamilies[0]",
                "must match the address family",
            ),
        ];
        for (cidrs, spec, field, words) in cases {
            let causes = families_of(cidrs, spec.clone()).unwrap_err();
            assert!(
                causes.iter().any(|(f, m)| f == field && m.contains(words)),
                "{spec}: {causes:?}"
            );
        }
    }
}
