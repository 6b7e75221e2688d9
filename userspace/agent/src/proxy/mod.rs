//! The node's service proxy, kube-proxy's job: what the datapath should hold, per Service, from
//! a source (the API, or a file), merged with the pods' host ports, and the smallest set of
//! writes that brings the datapath there.
//!
//! - `translate`: one Service and its EndpointSlices to frontends and backends, with
//!   kube-proxy's rules (traffic policies, topology, terminating endpoints, what it skips).
//! - `api`: the API as the source: watches with kube-runtime, coalesced into the Services that
//!   changed, held back until the first full list so that a restart removes nothing early.
//! - `file`: a file as the source, for tests and offline use.
//! - [`ServiceTable`]: what was last written, per Service; a change of one Service yields only
//!   its own upserts and deletes.

pub mod api;
pub mod file;
pub mod translate;

use std::collections::{BTreeMap, HashMap};

pub use crate::datapath::Changes;
use crate::model::{Frontend, ServiceSpec};

/// A Service by namespace and name.
pub type ServiceKey = (String, String);

/// The desired state by where it comes from: each Service's frontends, and the host ports
/// (which yield to a Service holding the same address and port).
#[derive(Debug, Default)]
pub struct ServiceTable {
    services: HashMap<ServiceKey, Vec<ServiceSpec>>,
    /// Which Service holds each frontend.
    holders: BTreeMap<Frontend, ServiceKey>,
    host_ports: BTreeMap<Frontend, ServiceSpec>,
}

impl ServiceTable {
    /// Everything the datapath should hold.
    pub fn desired(&self) -> Vec<ServiceSpec> {
        let mut all: Vec<ServiceSpec> = self
            .services
            .iter()
            .flat_map(|(key, specs)| specs.iter().map(move |s| (key, s)))
            .filter(|(key, s)| self.holders.get(&s.frontend) == Some(*key))
            .map(|(_, s)| s.clone())
            .collect();
        for (frontend, spec) in &self.host_ports {
            if self.holders.contains_key(frontend) {
                tracing::warn!(%frontend, "a service holds this host port's address and port; the service wins");
            } else {
                all.push(spec.clone());
            }
        }
        all
    }

    /// The Services it holds frontends of.
    pub fn keys(&self) -> Vec<ServiceKey> {
        self.services.keys().cloned().collect()
    }

    pub fn has_host_ports(&self) -> bool {
        !self.host_ports.is_empty()
    }

    /// Every programmed frontend with the Service holding it (none: a host port), as the
    /// datapath should hold it.
    pub fn record(&self) -> Vec<(Option<&ServiceKey>, ServiceSpec)> {
        self.desired()
            .into_iter()
            .map(|spec| (self.holders.get(&spec.frontend), spec))
            .collect()
    }

    /// The Service holding `frontend`, if one does.
    pub fn holder(&self, frontend: &Frontend) -> Option<&ServiceKey> {
        self.holders.get(frontend)
    }

    /// Sets one Service's frontends (none: it is gone); returns the writes that takes.
    pub fn set_service(&mut self, key: &ServiceKey, specs: Vec<ServiceSpec>) -> Changes {
        let old = match specs.is_empty() {
            true => self.services.remove(key).unwrap_or_default(),
            false => self
                .services
                .insert(key.clone(), specs.clone())
                .unwrap_or_default(),
        };
        let mut changes = Changes::default();
        for spec in &old {
            if specs.iter().any(|s| s.frontend == spec.frontend) {
                continue;
            }
            if self.holders.get(&spec.frontend) == Some(key) {
                self.holders.remove(&spec.frontend);
                match self.host_ports.get(&spec.frontend) {
                    Some(port) => changes.upserts.push(port.clone()),
                    None => changes.deletes.push(spec.frontend),
                }
            }
        }
        for spec in specs {
            // Two Services on one address and port: the first keeps it, as its writes did.
            match self.holders.get(&spec.frontend) {
                Some(holder) if holder != key => {
                    tracing::warn!(frontend = %spec.frontend, service = %format!("{}/{}", key.0, key.1),
                                   holder = %format!("{}/{}", holder.0, holder.1),
                                   "another service holds this address and port; this one is not programmed there");
                    continue;
                }
                _ => {}
            }
            self.holders.insert(spec.frontend, key.clone());
            if !old.contains(&spec) {
                changes.upserts.push(spec);
            }
        }
        changes
    }

    /// Replaces every Service at once (a file read again); of two on one frontend, the first
    /// holds it.
    pub fn replace_services(&mut self, services: Vec<(ServiceKey, Vec<ServiceSpec>)>) {
        self.services.clear();
        self.holders.clear();
        for (key, specs) in services {
            self.set_service(&key, specs);
        }
    }

    /// Replaces the host ports; a full `desired` write follows (they change rarely).
    pub fn set_host_ports(&mut self, specs: Vec<ServiceSpec>) {
        self.host_ports = specs.into_iter().map(|s| (s.frontend, s)).collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(frontend: &str, backends: &[&str]) -> ServiceSpec {
        ServiceSpec {
            frontend: frontend.parse().unwrap(),
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            affinity_timeout_secs: None,
        }
    }

    fn key(name: &str) -> ServiceKey {
        ("default".into(), name.into())
    }

    #[test]
    fn a_service_change_writes_only_its_own_frontends() {
        let mut table = ServiceTable::default();
        let a = table.set_service(
            &key("a"),
            vec![spec("10.96.0.1:80/tcp", &["10.244.0.2:80"])],
        );
        assert_eq!(a.upserts.len(), 1);
        table.set_service(
            &key("b"),
            vec![spec("10.96.0.2:80/tcp", &["10.244.0.3:80"])],
        );
        // Same spec again: nothing to write.
        let same = table.set_service(
            &key("a"),
            vec![spec("10.96.0.1:80/tcp", &["10.244.0.2:80"])],
        );
        assert!(same.is_empty(), "{same:?}");
        // A port added and one endpoint changed: one upsert each, b untouched.
        let changed = table.set_service(
            &key("a"),
            vec![
                spec("10.96.0.1:80/tcp", &["10.244.0.4:80"]),
                spec("10.96.0.1:53/udp", &[]),
            ],
        );
        assert_eq!(changed.upserts.len(), 2);
        assert!(changed.deletes.is_empty());
        let gone = table.set_service(&key("a"), Vec::new());
        assert_eq!(gone.deletes.len(), 2);
        assert_eq!(table.desired().len(), 1);
    }

    #[test]
    fn host_ports_yield_to_services_and_come_back_when_the_service_goes() {
        let mut table = ServiceTable::default();
        table.set_host_ports(vec![spec("192.168.0.1:8080/tcp", &["10.244.0.9:80"])]);
        table.set_service(
            &key("a"),
            vec![spec("192.168.0.1:8080/tcp", &["10.244.0.2:80"])],
        );
        let desired = table.desired();
        assert_eq!(desired.len(), 1);
        assert_eq!(desired[0].backends[0].to_string(), "10.244.0.2:80 (active)");
        let gone = table.set_service(&key("a"), Vec::new());
        assert_eq!(
            gone.upserts,
            vec![spec("192.168.0.1:8080/tcp", &["10.244.0.9:80"])]
        );
        assert!(gone.deletes.is_empty());
    }

    #[test]
    fn two_services_on_one_frontend_leave_it_to_the_first() {
        let mut table = ServiceTable::default();
        table.set_service(&key("a"), vec![spec("10.96.0.1:80/tcp", &[])]);
        let b = table.set_service(
            &key("b"),
            vec![spec("10.96.0.1:80/tcp", &["10.244.0.2:80"])],
        );
        assert!(b.is_empty(), "{b:?}");
        assert_eq!(
            table.holder(&"10.96.0.1:80/tcp".parse().unwrap()),
            Some(&key("a"))
        );
        // b going away does not take a's frontend with it.
        assert!(table.set_service(&key("b"), Vec::new()).is_empty());
    }
}
