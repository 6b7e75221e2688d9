//! The nftables implementation of `Datapath`, after kube-proxy's nftables mode: one table of
//! Seine's own (`ip seine`), so nothing else's rules are ever read or rewritten, and verdict maps,
//! so that finding a service is one lookup however many there are.
//!
//! - `services`: `ip daddr . meta l4proto . th dport vmap @service-ips` sends a new connection to
//!   its service's chain, which picks a backend at random (each rule takes 1/(remaining) of what
//!   reaches it) and DNATs to it; ClientIP affinity keeps a timed set of clients per backend.
//! - `no-endpoint-services`: frontends without a usable backend are rejected (port unreachable)
//!   in the filter hooks, as kube-proxy does.
//! - `hairpin`: a pod that reaches itself through a service is masqueraded on the way back in.
//!
//! Chains are per service, not per endpoint: nft 1.0 loads a table of 10,000 services with
//! 10 backends in about 2 s this way, and 110,000 chains (one per endpoint) take minutes.
//! A full resync replaces the table in one transaction; a change writes only the chains and map
//! elements that differ, also in one transaction.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    process::Command,
};

use sha2::{Digest, Sha256};

use super::{usable_backends, DatapathError, RuleSet};
use crate::model::{Frontend, Protocol, ServiceSpec};

/// The table Seine owns (family `ip`).
pub const TABLE: &str = "seine";
/// Where frontends without endpoints go (in the filter hooks).
const REJECT_CHAIN: &str = "reject-chain";

/// Everything Seine writes into its table for a desired state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Rendered {
    /// Service chains: name -> rules.
    chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets: name -> timeout in seconds.
    sets: BTreeMap<String, u32>,
    /// `service-ips` elements: key -> verdict.
    service_ips: BTreeMap<String, String>,
    /// `no-endpoint-services` keys.
    no_endpoints: BTreeSet<String>,
    /// `hairpin` elements (`B . B` for every backend address).
    hairpin: BTreeSet<String>,
}

pub struct NftablesDatapath {
    services: BTreeMap<Frontend, ServiceSpec>,
    written: Option<Written>,
}

/// What the table holds, as last written: the services, and how many of them use each hairpin
/// element (a backend may serve several).
struct Written {
    services: BTreeMap<Frontend, ServiceSpec>,
    hairpin: BTreeMap<String, usize>,
}

impl Default for NftablesDatapath {
    fn default() -> Self {
        Self::new()
    }
}

impl NftablesDatapath {
    pub fn new() -> Self {
        NftablesDatapath {
            services: BTreeMap::new(),
            written: None,
        }
    }

    /// Whether `nft` runs here (the nftables mode needs it).
    pub fn available() -> bool {
        Command::new("nft")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Replaces Seine's table with the whole desired state, in one transaction: whatever someone
    /// else changed in it is repaired.
    pub fn full_resync(&mut self) -> Result<(), DatapathError> {
        run_nft(&full_script(&render(&self.services)))?;
        let mut hairpin = BTreeMap::new();
        for spec in self.services.values() {
            for e in hairpin_of(spec) {
                *hairpin.entry(e).or_insert(0) += 1;
            }
        }
        self.written = Some(Written {
            services: self.services.clone(),
            hairpin,
        });
        Ok(())
    }

    /// Writes the services that differ from the last write, and only those: a change costs the
    /// same with ten services or ten thousand.
    fn sync(&mut self) -> Result<(), DatapathError> {
        let Some(written) = &self.written else {
            return self.full_resync();
        };
        let changed: BTreeSet<Frontend> = self
            .services
            .keys()
            .chain(written.services.keys())
            .filter(|f| self.services.get(f) != written.services.get(f))
            .copied()
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let subset = |from: &BTreeMap<Frontend, ServiceSpec>| -> BTreeMap<Frontend, ServiceSpec> {
            changed
                .iter()
                .filter_map(|f| from.get(f).map(|s| (*f, s.clone())))
                .collect()
        };
        let (old, new) = (subset(&written.services), subset(&self.services));
        let (mut old_r, mut new_r) = (render(&old), render(&new));
        old_r.hairpin.clear();
        new_r.hairpin.clear();
        let mut script = change_script(&old_r, &new_r);
        let mut hairpin = written.hairpin.clone();
        let (mut gone, mut added) = (BTreeSet::new(), BTreeSet::new());
        for e in old.values().flat_map(hairpin_of) {
            if let Some(n) = hairpin.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    hairpin.remove(&e);
                    gone.insert(e);
                }
            }
        }
        for e in new.values().flat_map(hairpin_of) {
            let n = hairpin.entry(e.clone()).or_insert(0);
            *n += 1;
            if *n == 1 && !gone.remove(&e) {
                added.insert(e);
            }
        }
        for e in &gone {
            let _ = writeln!(script, "delete element ip {TABLE} hairpin {{ {e} }}");
        }
        for e in &added {
            let _ = writeln!(script, "add element ip {TABLE} hairpin {{ {e} }}");
        }
        if !script.is_empty() {
            run_nft(&script)?;
        }
        let mut services = std::mem::take(&mut self.written)
            .map(|w| w.services)
            .unwrap_or_default();
        for f in &changed {
            match self.services.get(f) {
                Some(spec) => services.insert(*f, spec.clone()),
                None => services.remove(f),
            };
        }
        self.written = Some(Written { services, hairpin });
        Ok(())
    }

    /// Removes Seine's table.
    pub fn cleanup() -> Result<(), DatapathError> {
        // Adding first makes the delete succeed whether or not the table was there.
        run_nft(&format!("table ip {TABLE} {{}}\ndelete table ip {TABLE}\n"))
    }
}

impl RuleSet for NftablesDatapath {
    fn mode(&self) -> &'static str {
        "nftables"
    }
    fn services(&self) -> &BTreeMap<Frontend, ServiceSpec> {
        &self.services
    }
    fn services_mut(&mut self) -> &mut BTreeMap<Frontend, ServiceSpec> {
        &mut self.services
    }
    fn write(&mut self) -> Result<(), DatapathError> {
        self.sync()
    }
}

fn run_nft(script: &str) -> Result<(), DatapathError> {
    super::run_with_input("nft", &["-f", "-"], script).map_err(DatapathError::Nftables)
}

fn hash(kind: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut name = format!("{kind}-");
    for byte in &digest[..8] {
        let _ = write!(name, "{byte:02x}");
    }
    name
}

fn proto(f: &Frontend) -> &'static str {
    match f.protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn key(f: &Frontend) -> String {
    format!("{} . {} . {}", f.ip, proto(f), f.port)
}

fn render(services: &BTreeMap<Frontend, ServiceSpec>) -> Rendered {
    let mut r = Rendered::default();
    for (frontend, spec) in services {
        let endpoints = usable_backends(spec);
        if endpoints.is_empty() {
            r.no_endpoints.insert(key(frontend));
            continue;
        }
        let fe = frontend.to_string();
        let chain = hash("service", &fe);
        let p = proto(frontend);
        let sets: Vec<Option<String>> = endpoints
            .iter()
            .map(|b| {
                spec.affinity_timeout_secs.map(|timeout| {
                    let set = hash("affinity", &format!("{fe} {}:{} {timeout}", b.ip, b.port));
                    r.sets.insert(set.clone(), timeout);
                    set
                })
            })
            .collect();
        let mut rules = Vec::new();
        // A client seen within the timeout goes back to its backend (and is seen again).
        for (b, set) in endpoints.iter().zip(&sets) {
            if let Some(set) = set {
                rules.push(format!(
                    "ip saddr @{set} update @{set} {{ ip saddr }} meta l4proto {p} dnat to {}:{}",
                    b.ip, b.port
                ));
            }
        }
        let n = endpoints.len();
        for (i, (b, set)) in endpoints.iter().zip(&sets).enumerate() {
            let pick = if i + 1 < n {
                format!("numgen random mod {} 0 ", n - i)
            } else {
                String::new()
            };
            let remember = set
                .as_ref()
                .map(|s| format!("update @{s} {{ ip saddr }} "))
                .unwrap_or_default();
            rules.push(format!(
                "{pick}{remember}meta l4proto {p} dnat to {}:{}",
                b.ip, b.port
            ));
        }
        r.hairpin.extend(hairpin_of(spec));
        r.service_ips.insert(key(frontend), format!("goto {chain}"));
        r.chains.insert(chain, rules);
    }
    r
}

/// The hairpin elements of a service: `B . B` for each backend that takes connections.
fn hairpin_of(spec: &ServiceSpec) -> BTreeSet<String> {
    usable_backends(spec)
        .iter()
        .map(|b| format!("{} . {}", b.ip, b.ip))
        .collect()
}

fn set_decl(name: &str, timeout: u32) -> String {
    format!("set {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}")
}

fn elements<'a>(items: impl Iterator<Item = String> + 'a) -> Option<String> {
    let list: Vec<String> = items.collect();
    (!list.is_empty()).then(|| list.join(", "))
}

/// The whole table, replacing whatever is there, as one transaction.
fn full_script(r: &Rendered) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "table ip {TABLE} {{}}\ndelete table ip {TABLE}\ntable ip {TABLE} {{"
    );
    let map = |name: &str, items: Option<String>| {
        let elements = items
            .map(|e| format!(" elements = {{ {e} }};"))
            .unwrap_or_default();
        format!("map {name} {{ type ipv4_addr . inet_proto . inet_service : verdict;{elements} }}")
    };
    let _ = writeln!(
        s,
        "{}",
        map(
            "service-ips",
            elements(r.service_ips.iter().map(|(k, v)| format!("{k} : {v}")))
        )
    );
    let _ = writeln!(
        s,
        "{}",
        map(
            "no-endpoint-services",
            elements(
                r.no_endpoints
                    .iter()
                    .map(|k| format!("{k} : goto {REJECT_CHAIN}"))
            )
        )
    );
    let hairpin = elements(r.hairpin.iter().cloned())
        .map(|e| format!(" elements = {{ {e} }};"))
        .unwrap_or_default();
    let _ = writeln!(s, "set hairpin {{ type ipv4_addr . ipv4_addr;{hairpin} }}");
    for (name, timeout) in &r.sets {
        let _ = writeln!(s, "{}", set_decl(name, *timeout));
    }
    let _ = writeln!(
        s,
        "chain {REJECT_CHAIN} {{ reject with icmp type port-unreachable; }}\n\
         chain services {{ ip daddr . meta l4proto . th dport vmap @service-ips; }}\n\
         chain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump services; }}\n\
         chain nat-output {{ type nat hook output priority -100; policy accept; jump services; }}\n\
         chain nat-postrouting {{ type nat hook postrouting priority srcnat; policy accept; \
         ct status dnat ip saddr . ip daddr @hairpin masquerade fully-random; }}"
    );
    for hook in ["input", "forward", "output"] {
        let _ = writeln!(
            s,
            "chain filter-{hook} {{ type filter hook {hook} priority filter - 1; policy accept; \
             ct state new ip daddr . meta l4proto . th dport vmap @no-endpoint-services; }}"
        );
    }
    for (name, rules) in &r.chains {
        let _ = writeln!(s, "chain {name} {{");
        for rule in rules {
            let _ = writeln!(s, "  {rule}");
        }
        let _ = writeln!(s, "}}");
    }
    let _ = writeln!(s, "}}");
    s
}

/// The difference from `old` to `new` as one transaction: elements that go first, then chains
/// and sets rewritten, then new elements, then chains and sets no longer used.
fn change_script(old: &Rendered, new: &Rendered) -> String {
    let mut s = String::new();
    let t = format!("ip {TABLE}");
    for (k, v) in &old.service_ips {
        if new.service_ips.get(k) != Some(v) {
            let _ = writeln!(s, "delete element {t} service-ips {{ {k} }}");
        }
    }
    for k in old.no_endpoints.difference(&new.no_endpoints) {
        let _ = writeln!(s, "delete element {t} no-endpoint-services {{ {k} }}");
    }
    for e in old.hairpin.difference(&new.hairpin) {
        let _ = writeln!(s, "delete element {t} hairpin {{ {e} }}");
    }
    // A set's name holds its timeout, so a set that exists already is the same set.
    for (name, timeout) in &new.sets {
        if !old.sets.contains_key(name) {
            let _ = writeln!(
                s,
                "add set {t} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}"
            );
        }
    }
    for (name, rules) in &new.chains {
        match old.chains.get(name) {
            Some(old_rules) if old_rules == rules => continue,
            Some(_) => {
                let _ = writeln!(s, "flush chain {t} {name}");
            }
            None => {
                let _ = writeln!(s, "add chain {t} {name}");
            }
        }
        for rule in rules {
            let _ = writeln!(s, "add rule {t} {name} {rule}");
        }
    }
    for (k, v) in &new.service_ips {
        if old.service_ips.get(k) != Some(v) {
            let _ = writeln!(s, "add element {t} service-ips {{ {k} : {v} }}");
        }
    }
    for k in new.no_endpoints.difference(&old.no_endpoints) {
        let _ = writeln!(
            s,
            "add element {t} no-endpoint-services {{ {k} : goto {REJECT_CHAIN} }}"
        );
    }
    for e in new.hairpin.difference(&old.hairpin) {
        let _ = writeln!(s, "add element {t} hairpin {{ {e} }}");
    }
    for name in old.chains.keys() {
        if !new.chains.contains_key(name) {
            let _ = writeln!(s, "delete chain {t} {name}");
        }
    }
    for name in old.sets.keys() {
        if !new.sets.contains_key(name) {
            let _ = writeln!(s, "delete set {t} {name}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BackendSpec, BackendState};

    fn spec(vip: &str, backends: &[&str], affinity: Option<u32>) -> ServiceSpec {
        ServiceSpec {
            frontend: format!("{vip}/tcp").parse().unwrap(),
            backends: backends
                .iter()
                .map(|b| BackendSpec {
                    state: BackendState::Active,
                    ..b.parse().unwrap()
                })
                .collect(),
            affinity_timeout_secs: affinity,
        }
    }

    fn services(specs: &[ServiceSpec]) -> BTreeMap<Frontend, ServiceSpec> {
        specs.iter().map(|s| (s.frontend, s.normalized())).collect()
    }

    #[test]
    fn a_service_is_one_map_element_and_one_chain_spreading_evenly() {
        let r = render(&services(&[
            spec(
                "10.96.0.1:80",
                &["10.244.0.2:8080", "10.244.0.3:8080", "10.244.0.4:8080"],
                None,
            ),
            spec("10.96.0.2:53", &[], None),
        ]));
        let chain = hash("service", "10.96.0.1:80/TCP");
        assert_eq!(
            r.service_ips["10.96.0.1 . tcp . 80"],
            format!("goto {chain}")
        );
        assert_eq!(
            r.chains[&chain],
            [
                "numgen random mod 3 0 meta l4proto tcp dnat to 10.244.0.2:8080",
                "numgen random mod 2 0 meta l4proto tcp dnat to 10.244.0.3:8080",
                "meta l4proto tcp dnat to 10.244.0.4:8080",
            ]
        );
        assert!(r.no_endpoints.contains("10.96.0.2 . tcp . 53"));
        assert_eq!(r.hairpin.len(), 3);
        assert!(full_script(&r).contains("vmap @service-ips"));
    }

    #[test]
    fn a_change_writes_only_what_differs() {
        let before = services(&[
            spec("10.96.0.1:80", &["10.244.0.2:8080"], None),
            spec("10.96.0.2:80", &["10.244.0.3:8080"], None),
        ]);
        let mut after = before.clone();
        let changed = spec("10.96.0.2:80", &["10.244.0.4:8080"], Some(60));
        after.insert(changed.frontend, changed);
        let script = change_script(&render(&before), &render(&after));
        let untouched = hash("service", "10.96.0.1:80/TCP");
        assert!(!script.contains(&untouched), "{script}");
        assert!(
            script.contains(&format!(
                "flush chain ip seine {}",
                hash("service", "10.96.0.2:80/TCP")
            )),
            "{script}"
        );
        assert!(
            script.contains("delete element ip seine hairpin { 10.244.0.3 . 10.244.0.3 }"),
            "{script}"
        );
        assert!(script.contains("add set ip seine affinity-"), "{script}");
        assert!(change_script(&render(&after), &render(&after)).is_empty());
        let emptied = change_script(&render(&after), &Rendered::default());
        assert!(
            emptied.contains("delete chain") && emptied.contains("delete set"),
            "{emptied}"
        );
    }
}
