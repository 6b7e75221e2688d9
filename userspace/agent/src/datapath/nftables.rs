//! The nftables implementation of `Datapath`, after kube-proxy's nftables mode: one table of
//! Seine's own (`ip seine`), so nothing else's rules are ever read or rewritten, and maps, so
//! that finding a service and its backend is a lookup however many there are.
//!
//! - `services`: `ip daddr . meta l4proto . th dport vmap @service-ips` sends a new connection to
//!   the pick chain for its service's backend count; `pick-N` draws a number below N and DNATs to
//!   the `endpoints` element keyed by the frontend and that number.
//! - ClientIP affinity needs a timed set of clients per backend, so such a service has a chain of
//!   its own instead: a rule per backend for returning clients, then a random pick.
//! - `no-endpoint-services`: frontends without a usable backend are rejected (port unreachable)
//!   in the filter hooks, as kube-proxy does.
//! - `hairpin`: a pod that reaches itself through a service is masqueraded on the way back in.
//!
//! Services are data, not rules: the kernel checks every rule reachable from the table's hooks
//! whenever a transaction adds one that can jump or NAT (60 ms at 10,000 services x 10 backends
//! with a chain of rules per service), while map elements that are not verdicts are not checked.
//! So a change of backends is element updates alone (28 ms there, most of it nft's start), and
//! a full load of that size takes under 2 s. A full resync replaces the table in one
//! transaction; a change writes only the elements and chains that differ, also in one.

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
    /// Chains of services with ClientIP affinity: name -> rules.
    chains: BTreeMap<String, Vec<String>>,
    /// Affinity sets: name -> timeout in seconds.
    sets: BTreeMap<String, u32>,
    /// `service-ips` elements: key -> verdict.
    service_ips: BTreeMap<String, String>,
    /// `no-endpoint-services` keys.
    no_endpoints: BTreeSet<String>,
    /// `hairpin` elements (`B . B` for every backend address).
    hairpin: BTreeSet<String>,
    /// `endpoints` elements: `frontend key . index` -> `backend address . port`.
    endpoints: BTreeMap<String, String>,
}

pub struct NftablesDatapath {
    services: BTreeMap<Frontend, ServiceSpec>,
    written: Option<Written>,
}

/// What the table holds, as last written: the services, and how many of them use each hairpin
/// element (a backend may serve several).
struct Written {
    services: BTreeMap<Frontend, ServiceSpec>,
    hairpin: Uses,
}

/// How many services use each hairpin element.
struct Uses(BTreeMap<String, usize>);

impl Uses {
    fn count(items: impl IntoIterator<Item = String>) -> Self {
        let mut uses = Uses(BTreeMap::new());
        uses.change(std::iter::empty(), items);
        uses
    }

    /// Takes away one use of each of `dropped` and adds one of each of `taken`; returns what
    /// is no longer used and what was not used before.
    fn change(
        &mut self,
        dropped: impl IntoIterator<Item = String>,
        taken: impl IntoIterator<Item = String>,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let (mut gone, mut added) = (BTreeSet::new(), BTreeSet::new());
        for item in dropped {
            if let Some(n) = self.0.get_mut(&item) {
                *n -= 1;
                if *n == 0 {
                    self.0.remove(&item);
                    gone.insert(item);
                }
            }
        }
        for item in taken {
            let n = self.0.entry(item.clone()).or_insert(0);
            *n += 1;
            if *n == 1 && !gone.remove(&item) {
                added.insert(item);
            }
        }
        (gone, added)
    }
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
        self.written = Some(Written {
            services: self.services.clone(),
            hairpin: Uses::count(self.services.values().flat_map(hairpin_of)),
        });
        Ok(())
    }

    /// Writes the services that differ from the last write, and only those: a change costs the
    /// same with ten services or ten thousand.
    fn sync(&mut self) -> Result<(), DatapathError> {
        let Some(written) = &mut self.written else {
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
        // A hairpin element goes or comes only with its last or first user, which `Uses`
        // tells; on failure the counts are put back as the kernel still has them.
        let (dropped, taken) = (
            || old.values().flat_map(hairpin_of),
            || new.values().flat_map(hairpin_of),
        );
        (old_r.hairpin, new_r.hairpin) = written.hairpin.change(dropped(), taken());
        let script = change_script(&old_r, &new_r);
        if let Err(e) = run_if_any(&script) {
            written.hairpin.change(taken(), dropped());
            return Err(e);
        }
        for f in &changed {
            match self.services.get(f) {
                Some(spec) => written.services.insert(*f, spec.clone()),
                None => written.services.remove(f),
            };
        }
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

fn run_if_any(script: &str) -> Result<(), DatapathError> {
    if script.is_empty() {
        return Ok(());
    }
    run_nft(script)
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
        r.hairpin.extend(hairpin_of(spec));
        let n = endpoints.len();
        if spec.affinity_timeout_secs.is_none() && n <= MAX_PICK {
            // A service is data only: its backends by index in `endpoints`, and the pick chain
            // for its backend count.
            for (i, b) in endpoints.iter().enumerate() {
                r.endpoints.insert(
                    format!("{} . {i}", key(frontend)),
                    format!("{} . {}", b.ip, b.port),
                );
            }
            r.service_ips
                .insert(key(frontend), format!("goto {}", pick_chain(n)));
            continue;
        }
        let fe = frontend.to_string();
        let chain = hash("service", &fe);
        let p = proto(frontend);
        // With affinity, a timed set of clients per backend.
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
        for (i, (b, set)) in endpoints.iter().zip(&sets).enumerate() {
            // Each rule takes 1/(remaining) of what reaches it: an even spread overall.
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
        r.service_ips.insert(key(frontend), format!("goto {chain}"));
        r.chains.insert(chain, rules);
    }
    r
}

/// The most backends a service without affinity picks from through the `endpoints` map; a
/// larger one has a chain of rules of its own. The pick chains are all made with the table:
/// nft 1.0.6 cannot add a rule naming `endpoints` once the map is in the kernel (it misreads
/// the map's data type back: "conflicting protocols specified").
const MAX_PICK: usize = 256;

/// The chain that picks one of `n` backends at random: the backend is the `endpoints` element
/// keyed by the packet's frontend and the number drawn.
fn pick_chain(n: usize) -> String {
    format!("pick-{n}")
}

/// The `endpoints` map's declaration, up to its elements.
const ENDPOINTS_MAP: &str = "map endpoints { typeof ip daddr . meta l4proto . th dport . numgen random mod 1 : ip daddr . th dport;";

fn pick_rule(n: usize) -> String {
    format!(
        "meta l4proto {{ tcp, udp }} dnat ip to ip daddr . meta l4proto . th dport . numgen random mod {n} map @endpoints"
    )
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
    let endpoints = elements(r.endpoints.iter().map(|(k, v)| format!("{k} : {v}")))
        .map(|e| format!(" elements = {{ {e} }};"))
        .unwrap_or_default();
    let _ = writeln!(s, "{ENDPOINTS_MAP}{endpoints} }}");
    for n in 1..=MAX_PICK {
        let _ = writeln!(s, "chain {} {{ {}; }}", pick_chain(n), pick_rule(n));
    }
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

/// One command adding or deleting `items` of `map`, if there are any.
fn elements_command(s: &mut String, verb: &str, map: &str, items: Vec<String>) {
    if !items.is_empty() {
        let _ = writeln!(
            s,
            "{verb} element ip {TABLE} {map} {{ {} }}",
            items.join(", ")
        );
    }
}

/// The difference from `old` to `new` as one transaction: elements that go first, then chains
/// and sets rewritten or added, then new elements, then chains and sets no longer used.
fn change_script(old: &Rendered, new: &Rendered) -> String {
    let mut s = String::new();
    let t = format!("ip {TABLE}");
    let changed_keys = |from: &BTreeMap<String, String>, to: &BTreeMap<String, String>| {
        from.iter()
            .filter(|(k, v)| to.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    };
    let with_values = |from: &BTreeMap<String, String>, to: &BTreeMap<String, String>| {
        to.iter()
            .filter(|(k, v)| from.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} : {v}"))
            .collect::<Vec<_>>()
    };
    elements_command(
        &mut s,
        "delete",
        "service-ips",
        changed_keys(&old.service_ips, &new.service_ips),
    );
    elements_command(
        &mut s,
        "delete",
        "endpoints",
        changed_keys(&old.endpoints, &new.endpoints),
    );
    elements_command(
        &mut s,
        "delete",
        "no-endpoint-services",
        old.no_endpoints
            .difference(&new.no_endpoints)
            .cloned()
            .collect(),
    );
    elements_command(
        &mut s,
        "delete",
        "hairpin",
        old.hairpin.difference(&new.hairpin).cloned().collect(),
    );
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
    elements_command(
        &mut s,
        "add",
        "endpoints",
        with_values(&old.endpoints, &new.endpoints),
    );
    elements_command(
        &mut s,
        "add",
        "service-ips",
        with_values(&old.service_ips, &new.service_ips),
    );
    elements_command(
        &mut s,
        "add",
        "no-endpoint-services",
        new.no_endpoints
            .difference(&old.no_endpoints)
            .map(|k| format!("{k} : goto {REJECT_CHAIN}"))
            .collect(),
    );
    elements_command(
        &mut s,
        "add",
        "hairpin",
        new.hairpin.difference(&old.hairpin).cloned().collect(),
    );
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
    fn a_service_is_map_elements_and_services_of_one_size_share_a_pick_chain() {
        let r = render(&services(&[
            spec(
                "10.96.0.1:80",
                &["10.244.0.2:8080", "10.244.0.3:8080", "10.244.0.4:8080"],
                None,
            ),
            spec(
                "10.96.0.3:80",
                &["10.244.0.5:80", "10.244.0.6:80", "10.244.0.7:80"],
                None,
            ),
            spec("10.96.0.2:53", &[], None),
        ]));
        assert_eq!(r.service_ips["10.96.0.1 . tcp . 80"], "goto pick-3");
        assert_eq!(r.service_ips["10.96.0.3 . tcp . 80"], "goto pick-3");
        assert!(r.chains.is_empty());
        assert_eq!(r.endpoints["10.96.0.1 . tcp . 80 . 0"], "10.244.0.2 . 8080");
        assert_eq!(r.endpoints["10.96.0.1 . tcp . 80 . 2"], "10.244.0.4 . 8080");
        assert_eq!(r.endpoints.len(), 6);
        assert!(r.no_endpoints.contains("10.96.0.2 . tcp . 53"));
        assert_eq!(r.hairpin.len(), 6);
        let script = full_script(&r);
        assert!(script.contains("vmap @service-ips"), "{script}");
        assert!(
            script.contains("chain pick-3 { meta l4proto { tcp, udp } dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @endpoints; }"),
            "{script}"
        );
    }

    #[test]
    fn affinity_gives_a_service_its_own_chain_of_rules() {
        let r = render(&services(&[spec(
            "10.96.0.1:80",
            &["10.244.0.2:8080", "10.244.0.3:8080"],
            Some(30),
        )]));
        let chain = hash("service", "10.96.0.1:80/TCP");
        assert_eq!(
            r.service_ips["10.96.0.1 . tcp . 80"],
            format!("goto {chain}")
        );
        let rules = &r.chains[&chain];
        assert_eq!(rules.len(), 4, "{rules:?}");
        assert!(rules[0].starts_with("ip saddr @affinity-"), "{rules:?}");
        assert!(
            rules[2].starts_with("numgen random mod 2 0 update @affinity-"),
            "{rules:?}"
        );
        assert!(r.endpoints.is_empty());
        assert_eq!(r.sets.len(), 2);
    }

    #[test]
    fn a_change_of_backends_is_element_updates_alone() {
        let before = services(&[
            spec("10.96.0.1:80", &["10.244.0.2:8080"], None),
            spec("10.96.0.2:80", &["10.244.0.3:8080"], None),
        ]);
        let mut after = before.clone();
        let changed = spec("10.96.0.2:80", &["10.244.0.4:8080"], None);
        after.insert(changed.frontend, changed);
        let script = change_script(&render(&before), &render(&after));
        assert_eq!(
            script,
            "delete element ip seine endpoints { 10.96.0.2 . tcp . 80 . 0 }\n\
             delete element ip seine hairpin { 10.244.0.3 . 10.244.0.3 }\n\
             add element ip seine endpoints { 10.96.0.2 . tcp . 80 . 0 : 10.244.0.4 . 8080 }\n\
             add element ip seine hairpin { 10.244.0.4 . 10.244.0.4 }\n"
        );
        assert!(change_script(&render(&after), &render(&after)).is_empty());
    }

    #[test]
    fn a_new_backend_count_is_a_new_goto_and_affinity_a_chain_of_its_own() {
        let one = services(&[spec("10.96.0.1:80", &["10.244.0.2:8080"], None)]);
        let two = services(&[spec(
            "10.96.0.1:80",
            &["10.244.0.2:8080", "10.244.0.3:8080"],
            None,
        )]);
        let script = change_script(&render(&one), &render(&two));
        assert!(
            script.contains(
                "add element ip seine service-ips { 10.96.0.1 . tcp . 80 : goto pick-2 }"
            ),
            "{script}"
        );
        assert!(!script.contains("chain"), "{script}");
        let sticky = services(&[spec(
            "10.96.0.1:80",
            &["10.244.0.2:8080", "10.244.0.3:8080"],
            Some(60),
        )]);
        let script = change_script(&render(&two), &render(&sticky));
        assert!(script.contains("add set ip seine affinity-"), "{script}");
        assert!(
            script.contains("delete element ip seine endpoints { 10.96.0.1 . tcp . 80 . 0, 10.96.0.1 . tcp . 80 . 1 }"),
            "{script}"
        );
        let chain = script.find("add chain ip seine service-").unwrap();
        let used = script.find("add element ip seine service-ips").unwrap();
        assert!(chain < used, "{script}");
        let emptied = change_script(&render(&sticky), &Rendered::default());
        assert!(
            emptied.contains("delete chain") && emptied.contains("delete set"),
            "{emptied}"
        );
    }

    #[test]
    fn a_service_larger_than_the_pick_chains_has_a_chain_of_rules() {
        let backends: Vec<String> = (0..=MAX_PICK)
            .map(|i| format!("10.245.{}.{}:80", i / 250, i % 250 + 1))
            .collect();
        let names: Vec<&str> = backends.iter().map(String::as_str).collect();
        let r = render(&services(&[spec("10.96.0.1:80", &names, None)]));
        let chain = hash("service", "10.96.0.1:80/TCP");
        assert_eq!(r.chains[&chain].len(), MAX_PICK + 1);
        assert!(r.endpoints.is_empty() && r.sets.is_empty());
        assert!(full_script(&r).contains(&format!("chain {} {{", pick_chain(MAX_PICK))));
    }

    #[test]
    fn uses_tell_the_first_and_the_last_user() {
        let s = |v: &[&str]| -> Vec<String> { v.iter().map(|x| x.to_string()).collect() };
        let mut uses = Uses::count(s(&["a", "a", "b"]));
        assert_eq!(
            uses.change(s(&["a", "b"]), s(&["c"])),
            (
                s(&["b"]).into_iter().collect(),
                s(&["c"]).into_iter().collect()
            )
        );
        assert_eq!(
            uses.change(s(&["a"]), s(&["a"])),
            (BTreeSet::new(), BTreeSet::new())
        );
    }
}
