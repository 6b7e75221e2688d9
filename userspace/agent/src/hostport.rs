//! A pod's `hostPort`s, handled by Seine itself rather than the portmap plugin: seine-cni records
//! each attachment's `portMappings` (`seine_cni::hostport`), and the agent reads the records and
//! programs each mapping as a service frontend `nodeIP:hostPort` with the pod as its one backend,
//! in whichever datapath it runs (eBPF, iptables or nftables).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

pub use seine_cni::hostport::{dir, fingerprint, read, read_all, PortMapping, Record};

use crate::model::{BackendSpec, BackendState, Frontend, Protocol, ServiceSpec};

/// The frontends the records ask for: each mapping on its host address, or on every one of
/// `node_ips`, with the pod as the one backend. A host port taken twice goes to the first record
/// (in name order); SCTP is reported (the datapath has no SCTP yet).
pub fn service_specs(
    records: &[(String, Record)],
    node_ips: &[Ipv4Addr],
) -> (Vec<ServiceSpec>, Vec<String>) {
    let mut specs = Vec::new();
    let mut problems = Vec::new();
    let mut taken = BTreeSet::new();
    for (name, record) in records {
        for m in &record.port_mappings {
            let protocol = match m.protocol.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                other => {
                    problems.push(format!(
                        "{name}: hostPort {}/{other} is not supported by the datapath",
                        m.host_port
                    ));
                    continue;
                }
            };
            let addresses = match m.host_ip {
                Some(ip) => vec![ip],
                None => node_ips.to_vec(),
            };
            for ip in addresses {
                let frontend = Frontend {
                    ip: IpAddr::V4(ip),
                    port: m.host_port,
                    protocol,
                };
                if !taken.insert(frontend) {
                    problems.push(format!(
                        "{name}: hostPort {frontend} is taken by another pod"
                    ));
                    continue;
                }
                specs.push(ServiceSpec {
                    frontend,
                    backends: vec![BackendSpec {
                        ip: IpAddr::V4(record.pod_ip),
                        port: m.container_port,
                        state: BackendState::Active,
                    }],
                    affinity_timeout_secs: None,
                });
            }
        }
    }
    (specs, problems)
}

/// The agent's view of the records: re-read only when their files change.
pub struct Watch {
    dir: PathBuf,
    seen: Option<Vec<(String, u64, Option<std::time::SystemTime>)>>,
}

impl Watch {
    pub fn new(dir: PathBuf) -> Self {
        Watch { dir, seen: None }
    }

    /// The records when their files changed since the last call (always on the first call);
    /// records that do not read are logged and skipped.
    pub fn changed(&mut self) -> Option<Vec<(String, Record)>> {
        let now = fingerprint(&self.dir);
        if self.seen.as_ref() == Some(&now) {
            return None;
        }
        self.seen = Some(now);
        let (records, problems) = read_all(&self.dir);
        for p in problems {
            tracing::warn!("host port record skipped: {p}");
        }
        Some(records)
    }
}

/// The node's IPv4 addresses with their interfaces, except loopback and the interfaces `skip`
/// names (pod veths, the overlay device): where host ports are offered.
pub fn node_addresses(
    skip: impl Fn(&str) -> bool,
) -> Result<Vec<(String, Ipv4Addr)>, seine_netlink::NetError> {
    let mut out = seine_netlink::with_netlink(|handle| async move {
        let mut out = Vec::new();
        for link in seine_netlink::links(&handle).await? {
            let name = seine_netlink::link_name(&link)
                .unwrap_or_default()
                .to_string();
            for (ip, _) in seine_netlink::addresses(&handle, link.header.index).await? {
                out.push((name.clone(), ip));
            }
        }
        Ok(out)
    })?;
    out.retain(|(name, ip)| !ip.is_loopback() && !skip(name));
    out.sort_by_key(|(_, ip)| *ip);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(host_port: u16, container_port: u16, protocol: &str) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol: protocol.into(),
            host_ip: None,
        }
    }

    #[test]
    fn records_become_one_frontend_per_node_address_with_the_pod_behind_it() {
        let web = Record {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            pod_ip: Ipv4Addr::new(10, 244, 1, 5),
            port_mappings: vec![
                mapping(8080, 80, "tcp"),
                PortMapping {
                    host_ip: Some(Ipv4Addr::new(192, 168, 1, 1)),
                    ..mapping(5353, 53, "udp")
                },
                mapping(3868, 3868, "sctp"),
            ],
        };
        let late = Record {
            pod_ip: Ipv4Addr::new(10, 244, 1, 6),
            port_mappings: vec![mapping(8080, 8080, "tcp")],
            ..web.clone()
        };
        let nodes = [Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(172, 16, 0, 1)];
        let (specs, problems) = service_specs(&[("a".into(), web), ("b".into(), late)], &nodes);
        let frontends: Vec<String> = specs.iter().map(|s| s.frontend.to_string()).collect();
        assert_eq!(
            frontends,
            [
                "192.168.1.1:8080/TCP",
                "172.16.0.1:8080/TCP",
                "192.168.1.1:5353/UDP"
            ]
        );
        assert_eq!(specs[0].backends[0].to_string(), "10.244.1.5:80 (active)");
        assert_eq!(specs[2].backends[0].port, 53);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("sctp"), "{problems:?}");
        assert!(problems[1].contains("taken"), "{problems:?}");
    }
}
