//! Service ClusterIP and NodePort allocation. Each allocated address or port is a key in etcd
//! (`/registry/seine/serviceips/<ip>`, `/registry/seine/nodeports/<port>`, holding the owning
//! service) claimed in the same transaction that writes the Service: two API servers on one etcd
//! can race for the same address, and exactly one transaction wins.

use std::{net::Ipv4Addr, ops::RangeInclusive};

use rand::Rng as _;
use serde_json::{json, Value};

use super::status::ApiError;
use crate::storage::{Claims, ObjectKey, Storage, StorageError};

const IP_PREFIX: &str = "/registry/seine/serviceips/";
const PORT_PREFIX: &str = "/registry/seine/nodeports/";

/// Random picks before falling back to reading which values are free.
const RANDOM_TRIES: usize = 4;

#[derive(Debug, Clone)]
pub struct ServiceRanges {
    network: u32,
    prefix_len: u8,
    pub node_ports: RangeInclusive<u16>,
}

impl ServiceRanges {
    /// From `--service-cluster-ip-range` (an IPv4 CIDR) and `--service-node-port-range` (a-b).
    pub fn parse(cidr: &str, node_ports: &str) -> Result<Self, String> {
        let (addr, len) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?} is not a CIDR (address/length)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{cidr:?}: only IPv4 service ranges are supported"))?;
        let prefix_len: u8 = len
            .parse()
            .ok()
            .filter(|l| (8..=30).contains(l))
            .ok_or_else(|| format!("{cidr:?}: the prefix length must be between 8 and 30"))?;
        let mask = u32::MAX << (32 - prefix_len);
        let (low, high) = node_ports
            .split_once('-')
            .and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)))
            .filter(|(a, b)| a <= b && *a > 0)
            .ok_or_else(|| format!("{node_ports:?} is not a port range (low-high)"))?;
        Ok(ServiceRanges {
            network: u32::from(addr) & mask,
            prefix_len,
            node_ports: low..=high,
        })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", Ipv4Addr::from(self.network), self.prefix_len)
    }

    /// The first address, which the `default/kubernetes` service holds.
    pub fn kubernetes_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network + 1)
    }

    /// Addresses services can be given: the range without its network, first and broadcast
    /// addresses.
    fn usable(&self) -> RangeInclusive<u32> {
        let size = 1u32 << (32 - self.prefix_len);
        self.network + 2..=self.network + size - 2
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        let size = 1u64 << (32 - self.prefix_len);
        let ip = u64::from(u32::from(ip));
        ip > u64::from(self.network) && ip < u64::from(self.network) + size - 1
    }
}

pub fn ip_key(ip: &str) -> String {
    format!("{IP_PREFIX}{ip}")
}

pub fn port_key(port: i64) -> String {
    format!("{PORT_PREFIX}{port}")
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
    if let Some(ip) = spec["clusterIP"]
        .as_str()
        .filter(|ip| ip.parse::<Ipv4Addr>().is_ok())
    {
        keys.push(ip_key(ip));
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

    if needs_cluster_ip(spec) {
        let given = spec["clusterIP"].as_str().unwrap_or_default().to_string();
        if given.is_empty() {
            let used = if attempt >= RANDOM_TRIES {
                Some(storage.keys(IP_PREFIX).await?)
            } else {
                None
            };
            let ip = pick_ip(ranges, used.as_deref()).ok_or_else(|| {
                ApiError::internal(format!(
                    "failed to allocate a serviceIP: range is full ({})",
                    ranges.cidr()
                ))
            })?;
            claims.claim.push((ip_key(&ip.to_string()), who.clone()));
            spec["clusterIP"] = ip.to_string().into();
        } else if !held.contains(&ip_key(&given)) {
            let ip: Ipv4Addr = given.parse().map_err(|_| {
                ApiError::invalid(
                    "Service",
                    service_name(&who),
                    vec![(
                        "spec.clusterIPs[0]".into(),
                        format!("Invalid value: {given:?}: must be a valid IP address"),
                    )],
                )
            })?;
            if !ranges.contains(ip) {
                return Err(ApiError::invalid(
                    "Service",
                    service_name(&who),
                    vec![(
                        "spec.clusterIPs".into(),
                        format!(
                            "Invalid value: [{given:?}]: failed to allocate IP {given}: the provided IP ({given}) is not in the valid range. The range of valid IPs is {}",
                            ranges.cidr()
                        ),
                    )],
                ));
            }
            claims.claim.push((ip_key(&given), who.clone()));
            requested.push((ip_key(&given), format!("spec.clusterIPs: Invalid value: [{given:?}]: failed to allocate IP {given}: provided IP is already allocated")));
        }
        spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
    }

    let mut keep: Vec<String> = Vec::new();
    if let Some(ip) = spec["clusterIP"].as_str() {
        keep.push(ip_key(ip));
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

fn pick_ip(ranges: &ServiceRanges, used: Option<&[String]>) -> Option<Ipv4Addr> {
    let usable = ranges.usable();
    let mut rng = rand::rng();
    match used {
        None => Some(Ipv4Addr::from(rng.random_range(usable))),
        Some(used) => {
            let taken: std::collections::HashSet<&str> = used
                .iter()
                .filter_map(|k| k.strip_prefix(IP_PREFIX))
                .collect();
            let free: Vec<u32> = usable
                .filter(|ip| !taken.contains(Ipv4Addr::from(*ip).to_string().as_str()))
                .collect();
            (!free.is_empty()).then(|| Ipv4Addr::from(free[rng.random_range(0..free.len())]))
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
    for attempt in 0..RANDOM_TRIES + 28 {
        let plan = plan(ranges, storage, current, service.clone(), attempt).await?;
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
    fn ranges_parse_and_reserve_the_first_address() {
        let r = ServiceRanges::parse("10.96.0.0/12", "30000-32767").unwrap();
        assert_eq!(r.kubernetes_ip(), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(*r.usable().start(), u32::from(Ipv4Addr::new(10, 96, 0, 2)));
        assert_eq!(
            *r.usable().end(),
            u32::from(Ipv4Addr::new(10, 111, 255, 254))
        );
        assert!(r.contains(Ipv4Addr::new(10, 100, 0, 1)));
        assert!(!r.contains(Ipv4Addr::new(10, 112, 0, 1)));
        assert!(ServiceRanges::parse("fd00::/108", "30000-32767").is_err());
        assert!(ServiceRanges::parse("10.0.0.0/24", "5-1").is_err());
    }

    #[test]
    fn a_full_range_has_nothing_to_pick() {
        let r = ServiceRanges::parse("10.0.0.0/30", "30000-30000").unwrap();
        // /30: .0 network, .1 kubernetes, .2 usable, .3 broadcast.
        let used = vec![ip_key("10.0.0.2")];
        assert_eq!(pick_ip(&r, Some(&used)), None);
        assert_eq!(pick_ip(&r, Some(&[])), Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(
            pick_port(&r, Some(&[port_key(30000)]), &Claims::default()),
            None
        );
    }
}
