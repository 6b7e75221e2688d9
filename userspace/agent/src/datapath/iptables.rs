//! The iptables implementation of `Datapath`, for nodes where eBPF cannot be used. It keeps
//! kube-proxy's chain structure under a Seine prefix: a services chain, a chain per service that
//! picks an endpoint with `statistic --mode random` probabilities, REJECT for services without
//! endpoints, `recent` in a chain per endpoint for ClientIP affinity, and a mark-and-masquerade
//! for hairpin traffic.
//!
//! Changes go through `iptables-restore --noflush` in one transaction that names only the chains
//! whose rules changed; a full resync rewrites every Seine chain, removes stray ones and restores the
//! jumps from the built-in chains, repairing whatever someone else removed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
};

use sha2::{Digest, Sha256};

use super::{usable_backends, DatapathError, RuleSet};
use crate::model::{BackendSpec, Frontend, ServiceSpec};

/// Every chain Seine owns starts with this; kube-proxy's `KUBE-` chains are never touched.
pub const CHAIN_PREFIX: &str = "SEINE-";
const SERVICES: &str = "SEINE-SERVICES";
const POSTROUTING: &str = "SEINE-POSTROUTING";
/// The packet mark that asks for masquerade (hairpin); distinct from kube-proxy's 0x4000.
const MASQ_MARK: &str = "0x20000";
/// The packet mark bit that says a service chain's random draw picked the endpoint the next
/// rules are for; cleared on the way into the services chain and out of POSTROUTING.
const PICKED_MARK: &str = "0x40000";

/// Which iptables the node uses: the nf_tables one or the legacy one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesBackend {
    Nft,
    Legacy,
}

impl IptablesBackend {
    fn suffix(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "nft",
            IptablesBackend::Legacy => "legacy",
        }
    }

    pub fn name(self) -> &'static str {
        self.suffix()
    }

    fn iptables(self) -> String {
        format!("iptables-{}", self.suffix())
    }

    fn restore(self) -> String {
        format!("iptables-{}-restore", self.suffix())
    }

    fn save(self) -> String {
        format!("iptables-{}-save", self.suffix())
    }

    /// The backend whose tables already hold rules (as kube-proxy decides); when neither or both
    /// do equally, the one `iptables` points at.
    pub fn detect() -> Result<Self, DatapathError> {
        let rules = |b: IptablesBackend| {
            Command::new(b.save())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .filter(|l| l.starts_with("-A "))
                        .count()
                })
        };
        let (nft, legacy) = (rules(IptablesBackend::Nft), rules(IptablesBackend::Legacy));
        match (nft, legacy) {
            (None, None) => Err(DatapathError::Iptables(
                "neither iptables-nft-save nor iptables-legacy-save works: install iptables".into(),
            )),
            (Some(_), None) => Ok(IptablesBackend::Nft),
            (None, Some(_)) => Ok(IptablesBackend::Legacy),
            (Some(n), Some(l)) if l > n => Ok(IptablesBackend::Legacy),
            (Some(n), Some(l)) if n > l => Ok(IptablesBackend::Nft),
            _ => {
                let version = Command::new("iptables")
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                Ok(if version.contains("legacy") {
                    IptablesBackend::Legacy
                } else {
                    IptablesBackend::Nft
                })
            }
        }
    }
}

/// A chain's identity: (table, name).
type ChainId = (&'static str, String);

pub struct IptablesDatapath {
    backend: IptablesBackend,
    services: BTreeMap<Frontend, ServiceSpec>,
    /// What the kernel holds, as last written by us: each service and its rules.
    written: BTreeMap<Frontend, (ServiceSpec, ServiceRules)>,
    synced_once: bool,
}

impl IptablesDatapath {
    pub fn new(backend: IptablesBackend) -> Self {
        IptablesDatapath {
            backend,
            services: BTreeMap::new(),
            written: BTreeMap::new(),
            synced_once: false,
        }
    }

    pub fn backend(&self) -> IptablesBackend {
        self.backend
    }

    /// Whether a full resync has run since start (the first sync is always a full one).
    pub fn synced_once(&self) -> bool {
        self.synced_once
    }

    /// Rewrites every Seine chain, deletes stray ones and restores the jumps from the built-in
    /// chains.
    pub fn full_resync(&mut self) -> Result<(), DatapathError> {
        let next: BTreeMap<Frontend, (ServiceSpec, ServiceRules)> = self
            .services
            .iter()
            .map(|(f, spec)| (*f, (spec.clone(), render_service(f, spec))))
            .collect();
        let desired = render(next.values().map(|(_, rules)| rules));
        let present = self.present()?;
        let mut payload = Payload::default();
        for ((table, chain), rules) in &desired {
            payload.replace(table, chain, rules);
        }
        for (table, chain) in present.chains {
            if !desired.contains_key(&(table, chain.clone())) {
                payload.delete(table, &chain);
            }
        }
        // The jumps go in with the chains, in the same transaction: a separate check and insert
        // per jump would read (and on legacy, rewrite) the whole table each time.
        for (table, chain, rule) in jumps() {
            if !present.jumps.contains(&(table, chain)) {
                payload.insert_first(table, chain, &rule);
            }
        }
        self.restore(&payload)?;
        self.written = next;
        self.synced_once = true;
        Ok(())
    }

    /// Whether the kernel still holds the frame of what was last written, as far as a cheap look
    /// tells: every jump from the built-in chains, every Seine chain, and every line of the
    /// services chains (rules edited inside a service's chain are left to the hourly resync).
    pub fn intact(&self) -> Result<bool, DatapathError> {
        if !self.synced_once {
            return Ok(false);
        }
        let present = self.present()?;
        if present.jumps.len() != jumps().len() {
            return Ok(false);
        }
        let chains: BTreeSet<(&str, &str)> = present
            .chains
            .iter()
            .map(|(t, c)| (*t, c.as_str()))
            .collect();
        let services = self.written.values().map(|(_, rules)| rules);
        let fixed = fixed_chains();
        let mut wanted: Vec<(&str, &str)> =
            fixed.iter().map(|((t, c), _)| (*t, c.as_str())).collect();
        wanted.extend([("nat", SERVICES), ("filter", SERVICES)]);
        wanted.extend(
            services
                .clone()
                .flat_map(|r| r.chains.iter().map(|(c, _)| ("nat", c.as_str()))),
        );
        if wanted.iter().any(|id| !chains.contains(id)) {
            return Ok(false);
        }
        for table in ["nat", "filter"] {
            let listing = self.list(
                &self.backend.iptables(),
                &["-w", "-t", table, "-S", SERVICES],
            )?;
            let held = listing.lines().filter(|l| l.starts_with("-A ")).count();
            let (_, lines) = services_chain(table, services.clone());
            if held != lines.len() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes only the services that differ from what was written last, and of those only the
    /// chains whose rules differ, and their lines in a services chain when those do: a change
    /// costs the same with ten services or ten thousand, up to the backend's own cost.
    fn sync(&mut self) -> Result<(), DatapathError> {
        if !self.synced_once {
            return self.full_resync();
        }
        let changed: BTreeSet<Frontend> = self
            .services
            .keys()
            .chain(self.written.keys())
            .filter(|f| self.services.get(f) != self.written.get(f).map(|(spec, _)| spec))
            .copied()
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let mut payload = Payload::default();
        let mut updates: BTreeMap<Frontend, Option<(ServiceSpec, ServiceRules)>> = BTreeMap::new();
        for f in &changed {
            let old = self.written.get(f).map(|(_, rules)| rules);
            let new = self
                .services
                .get(f)
                .map(|spec| (spec.clone(), render_service(f, spec)));
            let old_chains: BTreeMap<&String, &Vec<String>> = old
                .iter()
                .flat_map(|r| r.chains.iter().map(|(c, rules)| (c, rules)))
                .collect();
            let new_rules = new.as_ref().map(|(_, rules)| rules);
            for (chain, rules) in new_rules.iter().flat_map(|r| &r.chains) {
                if old_chains.get(chain) != Some(&rules) {
                    payload.replace("nat", chain, rules);
                }
            }
            for chain in old_chains.keys() {
                if !new_rules.is_some_and(|r| r.chains.iter().any(|(c, _)| c == *chain)) {
                    payload.delete("nat", chain);
                }
            }
            // The service's line in a services chain changes alone: rewriting the chain would
            // cost ten thousand rules out and in (0.6 s on the nft backend) for one.
            let (old_line, new_line) = (old.map(|r| &r.dispatch), new_rules.map(|r| &r.dispatch));
            if old_line != new_line {
                if let Some((table, line)) = old_line {
                    payload.remove_rule(table, SERVICES, line);
                }
                if let Some((table, line)) = new_line {
                    payload.append_rule(table, SERVICES, line);
                }
            }
            updates.insert(*f, new);
        }
        if let Err(e) = self.restore(&payload) {
            // A line someone else removed makes its `-D` fail: a full resync repairs that too.
            tracing::warn!("writing the changed services: {e}; rewriting all of them");
            return self.full_resync();
        }
        for (f, update) in updates {
            match update {
                Some(entry) => self.written.insert(f, entry),
                None => self.written.remove(&f),
            };
        }
        Ok(())
    }

    fn restore(&self, payload: &Payload) -> Result<(), DatapathError> {
        let text = payload.render(|table, named| self.prefetch(table, named));
        tracing::debug!(input = %text, "iptables-restore");
        super::run_with_input(&self.backend.restore(), &["--noflush", "--wait"], &text)
            .map_err(DatapathError::Iptables)
    }

    /// The chainless command a restore that names `named` chains of `table` starts that table
    /// with, if one pays. iptables-nft 1.8.9 under --noflush keeps the chains a restore names in
    /// a list it searches linearly for every rule (10,000 services x 10 took minutes); a
    /// chainless command makes it fetch the table whole instead. `-S` only reads, but prints
    /// the table at a cost that grows faster than the table (a minute at 110,000 chains, where
    /// it also overflows an 8 MiB stack); `-Z` fetches it for zeroing, 1.8 s there, at the price
    /// of the table's packet counters. So: nothing for small restores, `-S` while the table is
    /// small, `-Z` once listing it would cost more than the restore.
    fn prefetch(&self, table: &str, named: usize) -> Option<&'static str> {
        if self.backend != IptablesBackend::Nft || named <= 1000 {
            return None;
        }
        let held = nft_chains().map_or(0, |c| c.iter().filter(|(t, _)| t == table).count());
        Some(if held < 10_000 { "-S" } else { "-Z" })
    }

    /// Seine's chains in the kernel now, and which jumps into them the built-in chains hold. On
    /// the nft backend the chains come from nft's list of chains (a third of a second at 110,000
    /// chains, where iptables-nft-save takes a minute) and the built-in chains are listed one by
    /// one (each alone is quick); on legacy one iptables-save per table gives both.
    fn present(&self) -> Result<Present, DatapathError> {
        let mut present = Present::default();
        let wanted = jumps();
        if self.backend == IptablesBackend::Nft {
            if let Some(listed) = nft_chains() {
                present.chains = listed
                    .into_iter()
                    .filter(|(_, c)| c.starts_with(CHAIN_PREFIX))
                    .filter_map(|(t, c)| Some((known_table(&t)?, c)))
                    .collect();
                for (table, chain, rule) in &wanted {
                    let listing =
                        self.list(&self.backend.iptables(), &["-w", "-t", table, "-S", chain])?;
                    if listing.lines().any(|l| is_jump(l, chain, rule)) {
                        present.jumps.insert((*table, *chain));
                    }
                }
                return Ok(present);
            }
        }
        for table in ["filter", "nat"] {
            let listing = self.list(&self.backend.save(), &["-t", table])?;
            for line in listing.lines() {
                if let Some(name) = line
                    .strip_prefix(':')
                    .and_then(|l| l.split_whitespace().next())
                {
                    if name.starts_with(CHAIN_PREFIX) {
                        present.chains.push((table, name.to_string()));
                    }
                }
                for (t, chain, rule) in &wanted {
                    if *t == table && is_jump(line, chain, rule) {
                        present.jumps.insert((*t, *chain));
                    }
                }
            }
        }
        Ok(present)
    }

    /// A listing's output (`iptables -S`, `iptables-save`); a failure is an error, never an empty
    /// listing (which would read as "nothing there").
    fn list(&self, program: &str, args: &[&str]) -> Result<String, DatapathError> {
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| DatapathError::Iptables(format!("running {program}: {e}")))?;
        if !out.status.success() {
            return Err(DatapathError::Iptables(format!(
                "{program} {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Removes every Seine rule and chain from this backend's tables.
    pub fn cleanup(backend: IptablesBackend) -> Result<(), DatapathError> {
        let dp = IptablesDatapath::new(backend);
        for (table, chain, rule) in jumps() {
            // A jump may have been added more than once by hand; remove them all.
            for _ in 0..16 {
                let removed = Command::new(backend.iptables())
                    .args(["-w", "-t", table, "-D", chain])
                    .args(&rule)
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !removed {
                    break;
                }
            }
        }
        let mut payload = Payload::default();
        for (table, chain) in dp.present()?.chains {
            payload.delete(table, &chain);
        }
        if !payload.is_empty() {
            dp.restore(&payload)?;
        }
        Ok(())
    }
}

impl RuleSet for IptablesDatapath {
    fn mode(&self) -> &'static str {
        "iptables"
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

/// Every chain of the `ip` family's tables as (table, chain), from `nft list chains ip`; None
/// where nft is not installed or fails. On the nft backend these are iptables' tables.
fn nft_chains() -> Option<Vec<(String, String)>> {
    let out = Command::new("nft")
        .args(["list", "chains", "ip"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(parse_nft_chains(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_nft_chains(listing: &str) -> Vec<(String, String)> {
    let mut table = String::new();
    let mut chains = Vec::new();
    for line in listing.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", _family, name, "{"] => table = name.to_string(),
            ["chain", name, "{"] => {
                chains.push((table.clone(), name.trim_matches('"').to_string()))
            }
            _ => {}
        }
    }
    chains
}

/// The jumps from built-in chains into Seine's: (table, chain, rule arguments).
fn jumps() -> Vec<(&'static str, &'static str, Vec<String>)> {
    let rule = |comment: &str, target: &str, new_only: bool| {
        let mut r: Vec<String> = Vec::new();
        if new_only {
            r.extend(["-m", "conntrack", "--ctstate", "NEW"].map(String::from));
        }
        r.extend(["-m", "comment", "--comment", comment, "-j", target].map(String::from));
        r
    };
    vec![
        (
            "nat",
            "PREROUTING",
            rule("seine service portals", SERVICES, false),
        ),
        (
            "nat",
            "OUTPUT",
            rule("seine service portals", SERVICES, false),
        ),
        (
            "nat",
            "POSTROUTING",
            rule("seine postrouting", POSTROUTING, false),
        ),
        (
            "filter",
            "FORWARD",
            rule("seine service portals", SERVICES, true),
        ),
        (
            "filter",
            "OUTPUT",
            rule("seine service portals", SERVICES, true),
        ),
        (
            "filter",
            "INPUT",
            rule("seine service portals", SERVICES, true),
        ),
    ]
}

/// What a full resync finds in the kernel before it writes.
#[derive(Default)]
struct Present {
    chains: Vec<ChainId>,
    /// (table, built-in chain) pairs whose jump into Seine's chains is there.
    jumps: BTreeSet<(&'static str, &'static str)>,
}

fn known_table(table: &str) -> Option<&'static str> {
    match table {
        "filter" => Some("filter"),
        "nat" => Some("nat"),
        _ => None,
    }
}

/// A rule's arguments as iptables-save prints them (arguments with spaces quoted).
fn rule_text(rule: &[String]) -> String {
    rule.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether a listing's line is Seine's jump from `chain`.
fn is_jump(line: &str, chain: &str, rule: &[String]) -> bool {
    line.strip_prefix("-A ")
        .and_then(|l| l.strip_prefix(chain))
        .and_then(|l| l.strip_prefix(' '))
        .is_some_and(|l| l.trim_end() == rule_text(rule))
}

/// The `nat` chain that picks an endpoint of `frontend` (present while it has endpoints).
pub fn service_chain(frontend: &Frontend) -> String {
    chain_name("SVC", &frontend.to_string())
}

fn chain_name(kind: &str, key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut name = format!("{CHAIN_PREFIX}{kind}-");
    for byte in &digest[..8] {
        let _ = write!(name, "{byte:02X}");
    }
    name
}

fn proto_args(f: &Frontend) -> String {
    let p = match f.protocol {
        crate::model::Protocol::Tcp => "tcp",
        crate::model::Protocol::Udp => "udp",
    };
    format!("-p {p} -m {p}")
}

fn ip4(ip: IpAddr) -> String {
    format!("{ip}/32")
}

/// One service's share of the rules: its line in a services chain (`nat` when it has endpoints,
/// `filter`'s REJECT when not) and its own `nat` chains (the service chain and one per endpoint).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceRules {
    dispatch: (&'static str, String),
    chains: Vec<(String, Vec<String>)>,
}

fn render_service(frontend: &Frontend, spec: &ServiceSpec) -> ServiceRules {
    let proto = proto_args(frontend);
    let fe = frontend.to_string();
    let endpoints = usable_backends(spec);
    if endpoints.is_empty() {
        return ServiceRules {
            dispatch: (
                "filter",
                format!(
                    "-d {} {proto} --dport {} -m comment --comment \"{fe} has no endpoints\" -j REJECT --reject-with icmp-port-unreachable",
                    ip4(frontend.ip),
                    frontend.port
                ),
            ),
            chains: Vec::new(),
        };
    }
    let svc_chain = service_chain(frontend);
    let dispatch = format!(
        "-d {} {proto} --dport {} -m comment --comment \"{fe}\" -j {svc_chain}",
        ip4(frontend.ip),
        frontend.port
    );
    let n = endpoints.len();
    let Some(timeout) = spec.affinity_timeout_secs else {
        return ServiceRules {
            dispatch: ("nat", dispatch),
            chains: vec![(svc_chain, inline_picks(&proto, &endpoints))],
        };
    };
    // With affinity, a chain per endpoint: a returning client must reach its endpoint's DNAT
    // by its own `recent` check, and a new one be remembered by the endpoint it got.
    let sep_chains: Vec<String> = endpoints
        .iter()
        .map(|b| chain_name("SEP", &format!("{fe} {}:{}", b.ip, b.port)))
        .collect();
    let mut svc_rules = Vec::new();
    for sep in &sep_chains {
        svc_rules.push(format!(
            "-m recent --name {sep} --rcheck --seconds {timeout} --reap -j {sep}"
        ));
    }
    for (i, sep) in sep_chains.iter().enumerate() {
        match probability(i, n) {
            Some(p) => svc_rules.push(format!("-m statistic --mode random {p} -j {sep}")),
            None => svc_rules.push(format!("-j {sep}")),
        }
    }
    let mut chains = vec![(svc_chain, svc_rules)];
    for (b, sep) in endpoints.iter().zip(sep_chains) {
        let rules = vec![
            format!("-s {} -j MARK --or-mark {MASQ_MARK}", ip4(b.ip)),
            format!("-m recent --name {sep} --set"),
            format!("{proto} -j DNAT --to-destination {}:{}", b.ip, b.port),
        ];
        chains.push((sep, rules));
    }
    ServiceRules {
        dispatch: ("nat", dispatch),
        chains,
    }
}

/// The `statistic` match of the `i`th of `n` endpoints: each takes 1/(remaining) of what
/// reaches it, an even spread overall; the last takes the rest.
fn probability(i: usize, n: usize) -> Option<String> {
    (i + 1 < n).then(|| format!("--probability {:.11}", 1.0 / (n - i) as f64))
}

/// A service chain that picks and DNATs by itself, without a chain per endpoint: the draw sets
/// the `PICKED_MARK` bit, and the endpoint's hairpin check and DNAT match it. A chain per
/// endpoint would make ten times the chains, and iptables-nft's restore and the kernel's
/// validation grow with them (10,000 x 10 from empty: 16 s with them, 7 s without).
fn inline_picks(proto: &str, endpoints: &[&BackendSpec]) -> Vec<String> {
    let n = endpoints.len();
    let mut rules = Vec::new();
    for (i, b) in endpoints.iter().enumerate() {
        let picked = match probability(i, n) {
            Some(p) => {
                rules.push(format!(
                    "-m statistic --mode random {p} -j MARK --or-mark {PICKED_MARK}"
                ));
                format!("-m mark --mark {PICKED_MARK}/{PICKED_MARK} ")
            }
            None => String::new(),
        };
        rules.push(format!(
            "{picked}-s {} -j MARK --or-mark {MASQ_MARK}",
            ip4(b.ip)
        ));
        rules.push(format!(
            "{picked}{proto} -j DNAT --to-destination {}:{}",
            b.ip, b.port
        ));
    }
    rules
}

/// The chain that does not depend on the services: POSTROUTING's masquerade of marked packets.
fn fixed_chains() -> [(ChainId, Vec<String>); 1] {
    [(
        ("nat", POSTROUTING.to_string()),
        vec![
            format!("-j MARK --set-xmark 0x0/{PICKED_MARK}"),
            format!("-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
            format!("-j MARK --xor-mark {MASQ_MARK}"),
            "-j MASQUERADE --random-fully".to_string(),
        ],
    )]
}

/// `table`'s services chain: every service's line there, in frontend order.
fn services_chain<'a>(
    table: &'static str,
    services: impl Iterator<Item = &'a ServiceRules>,
) -> (ChainId, Vec<String>) {
    // A picked bit from elsewhere would make every service take its first endpoint.
    let clear = (table == "nat").then(|| format!("-j MARK --set-xmark 0x0/{PICKED_MARK}"));
    let rules = clear
        .into_iter()
        .chain(
            services
                .filter(|r| r.dispatch.0 == table)
                .map(|r| r.dispatch.1.clone()),
        )
        .collect();
    ((table, SERVICES.to_string()), rules)
}

/// Every Seine chain with its rules, for the whole desired state.
fn render<'a>(
    services: impl Iterator<Item = &'a ServiceRules> + Clone,
) -> BTreeMap<ChainId, Vec<String>> {
    let mut chains: BTreeMap<ChainId, Vec<String>> = fixed_chains().into_iter().collect();
    for table in ["nat", "filter"] {
        let (id, rules) = services_chain(table, services.clone());
        chains.insert(id, rules);
    }
    for rules in services {
        for (chain, chain_rules) in &rules.chains {
            chains.insert(("nat", chain.clone()), chain_rules.clone());
        }
    }
    chains
}

/// One iptables-restore transaction: chains to (re)write and chains to delete, per table.
#[derive(Default)]
struct Payload {
    replace: BTreeMap<&'static str, Vec<(String, Vec<String>)>>,
    /// Rules put first in built-in chains: the jumps into Seine's chains, whose targets must be
    /// rewritten by the same payload.
    insert: BTreeMap<&'static str, Vec<(&'static str, String)>>,
    delete: BTreeMap<&'static str, BTreeSet<String>>,
    /// Single rules out of and into chains that are not rewritten: (chain, rule).
    remove_rules: BTreeMap<&'static str, Vec<(&'static str, String)>>,
    append_rules: BTreeMap<&'static str, Vec<(&'static str, String)>>,
}

impl Payload {
    fn replace(&mut self, table: &'static str, chain: &str, rules: &[String]) {
        self.replace
            .entry(table)
            .or_default()
            .push((chain.to_string(), rules.to_vec()));
    }

    fn insert_first(&mut self, table: &'static str, chain: &'static str, rule: &[String]) {
        self.insert
            .entry(table)
            .or_default()
            .push((chain, rule_text(rule)));
    }

    fn delete(&mut self, table: &'static str, chain: &str) {
        self.delete
            .entry(table)
            .or_default()
            .insert(chain.to_string());
    }

    fn remove_rule(&mut self, table: &'static str, chain: &'static str, rule: &str) {
        self.remove_rules
            .entry(table)
            .or_default()
            .push((chain, rule.to_string()));
    }

    fn append_rule(&mut self, table: &'static str, chain: &'static str, rule: &str) {
        self.append_rules
            .entry(table)
            .or_default()
            .push((chain, rule.to_string()));
    }

    fn is_empty(&self) -> bool {
        self.replace.values().all(Vec::is_empty)
            && self.insert.values().all(Vec::is_empty)
            && self.delete.values().all(BTreeSet::is_empty)
            && self.remove_rules.values().all(Vec::is_empty)
            && self.append_rules.values().all(Vec::is_empty)
    }

    /// The restore's text; `prefetch(table, chains named)` gives the chainless command that
    /// starts the table, if any (see `IptablesDatapath::prefetch`; a listing goes to /dev/null).
    fn render(&self, prefetch: impl Fn(&str, usize) -> Option<&'static str>) -> String {
        let mut out = String::new();
        for table in ["filter", "nat"] {
            let replace = self.replace.get(table).map(Vec::as_slice).unwrap_or(&[]);
            let insert = self.insert.get(table).map(Vec::as_slice).unwrap_or(&[]);
            let delete = self.delete.get(table);
            let remove = self
                .remove_rules
                .get(table)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let append = self
                .append_rules
                .get(table)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let named = replace.len() + delete.map_or(0, BTreeSet::len);
            if named == 0 && insert.is_empty() && remove.is_empty() && append.is_empty() {
                continue;
            }
            let _ = writeln!(out, "*{table}");
            // Jumps first, each after its target's declaration: after a chainless prefetch of a
            // table that did not exist yet, iptables-nft 1.8.9 finds no built-in chains to add
            // rules to ("RULE_INSERT failed"). Only a full rewrite inserts, so the target is
            // rewritten below anyway.
            for (chain, rule) in insert {
                if let Some(target) = rule.rsplit(' ').next() {
                    let _ = writeln!(out, ":{target} - [0:0]");
                }
                let _ = writeln!(out, "-I {chain} 1 {rule}");
            }
            if let Some(command) = prefetch(table, named) {
                let _ = writeln!(out, "{command}");
            }
            // Declaring a chain under --noflush creates it or empties it.
            for (chain, _) in replace {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            for chain in delete.into_iter().flatten() {
                let _ = writeln!(out, ":{chain} - [0:0]");
            }
            for (chain, rules) in replace {
                for rule in rules {
                    let _ = writeln!(out, "-A {chain} {rule}");
                }
            }
            // After the chains a new line jumps to, before the chains an old one did go.
            for (chain, rule) in remove {
                let _ = writeln!(out, "-D {chain} {rule}");
            }
            for (chain, rule) in append {
                let _ = writeln!(out, "-A {chain} {rule}");
            }
            for chain in delete.into_iter().flatten() {
                let _ = writeln!(out, "-X {chain}");
            }
            let _ = writeln!(out, "COMMIT");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str, backends: &[&str], affinity: Option<u32>) -> ServiceSpec {
        ServiceSpec {
            frontend: text.parse().unwrap(),
            backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
            affinity_timeout_secs: affinity,
        }
    }

    fn rendered(specs: &[ServiceSpec]) -> BTreeMap<ChainId, Vec<String>> {
        let rules: Vec<ServiceRules> = specs
            .iter()
            .map(|s| render_service(&s.frontend, &s.normalized()))
            .collect();
        render(rules.iter())
    }

    fn service_chain(chains: &BTreeMap<ChainId, Vec<String>>) -> &Vec<String> {
        chains
            .iter()
            .find(|((_, c), _)| c.starts_with("SEINE-SVC-"))
            .unwrap()
            .1
    }

    #[test]
    fn probabilities_give_each_endpoint_an_even_share() {
        let chains = rendered(&[spec(
            "10.96.0.1:80/tcp",
            &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"],
            None,
        )]);
        let draws: Vec<&String> = service_chain(&chains)
            .iter()
            .filter(|r| r.contains("statistic"))
            .collect();
        assert_eq!(draws.len(), 2, "{draws:?}");
        assert!(
            draws[0].contains("--probability 0.33333333333"),
            "{draws:?}"
        );
        assert!(
            draws[1].contains("--probability 0.50000000000"),
            "{draws:?}"
        );
    }

    #[test]
    fn each_draw_is_followed_by_its_endpoints_hairpin_mark_and_dnat() {
        let chains = rendered(&[spec(
            "10.96.0.1:80/tcp",
            &["10.0.0.1:80", "10.0.0.2:80"],
            None,
        )]);
        assert_eq!(
            service_chain(&chains),
            &[
                "-m statistic --mode random --probability 0.50000000000 -j MARK --or-mark 0x40000",
                "-m mark --mark 0x40000/0x40000 -s 10.0.0.1/32 -j MARK --or-mark 0x20000",
                "-m mark --mark 0x40000/0x40000 -p tcp -m tcp -j DNAT --to-destination 10.0.0.1:80",
                "-s 10.0.0.2/32 -j MARK --or-mark 0x20000",
                "-p tcp -m tcp -j DNAT --to-destination 10.0.0.2:80",
            ]
        );
        assert!(!chains.keys().any(|(_, c)| c.starts_with("SEINE-SEP-")));
        // The picked bit is cleared before any service chain and after NAT.
        let nat = &chains[&("nat", SERVICES.to_string())];
        assert_eq!(nat[0], "-j MARK --set-xmark 0x0/0x40000");
        assert_eq!(
            chains[&("nat", POSTROUTING.to_string())][0],
            "-j MARK --set-xmark 0x0/0x40000"
        );
    }

    #[test]
    fn a_service_without_endpoints_is_rejected_in_the_filter_table() {
        let chains = rendered(&[spec("10.96.0.1:53/udp", &[], None)]);
        let filter = &chains[&("filter", SERVICES.to_string())];
        assert_eq!(filter.len(), 1);
        assert!(filter[0].contains("-d 10.96.0.1/32 -p udp -m udp --dport 53"));
        assert!(filter[0].contains("-j REJECT"));
        let nat = &chains[&("nat", SERVICES.to_string())];
        assert!(!nat.iter().any(|r| r.contains("10.96.0.1")), "{nat:?}");
    }

    #[test]
    fn terminating_endpoints_are_used_only_when_none_is_ready() {
        let dnats = |chains: &BTreeMap<ChainId, Vec<String>>| -> Vec<String> {
            service_chain(chains)
                .iter()
                .filter(|r| r.contains("DNAT"))
                .cloned()
                .collect()
        };
        let chains = rendered(&[spec(
            "10.96.0.1:80/tcp",
            &["10.0.0.1:80", "10.0.0.2:80,terminating"],
            None,
        )]);
        assert_eq!(dnats(&chains).len(), 1);
        assert!(dnats(&chains)[0].ends_with("10.0.0.1:80"));
        let chains = rendered(&[spec("10.96.0.1:80/tcp", &["10.0.0.2:80,terminating"], None)]);
        assert_eq!(dnats(&chains).len(), 1);
        assert!(dnats(&chains)[0].ends_with("10.0.0.2:80"));
    }

    #[test]
    fn affinity_uses_recent_per_endpoint() {
        let chains = rendered(&[spec("10.96.0.1:80/tcp", &["10.0.0.1:80"], Some(30))]);
        let svc = chains
            .iter()
            .find(|((_, c), _)| c.starts_with("SEINE-SVC-"))
            .unwrap()
            .1;
        assert!(svc[0].contains("--rcheck --seconds 30 --reap"), "{svc:?}");
        let sep = chains
            .iter()
            .find(|((_, c), _)| c.starts_with("SEINE-SEP-"))
            .unwrap()
            .1;
        assert!(sep.iter().any(|r| r.contains("--set")), "{sep:?}");
    }

    #[test]
    fn chain_names_fit_iptables_and_never_collide_with_kube_proxy() {
        let name = chain_name("SVC", "10.96.0.1:80/TCP");
        assert!(name.len() <= 28, "{name}");
        assert!(name.starts_with("SEINE-SVC-"));
    }

    #[test]
    fn the_payload_deletes_after_rewriting_references() {
        let mut p = Payload::default();
        p.replace("nat", SERVICES, &["-j RETURN".to_string()]);
        p.delete("nat", "SEINE-SVC-OLD");
        let text = p.render(|_, _| None);
        let rewrite = text.find("-A SEINE-SERVICES").unwrap();
        let delete = text.find("-X SEINE-SVC-OLD").unwrap();
        assert!(rewrite < delete, "{text}");
        assert!(text.starts_with("*nat\n"));
    }

    #[test]
    fn an_nft_payload_starts_a_table_with_its_prefetch_so_the_restore_is_not_quadratic() {
        let mut p = Payload::default();
        p.replace("nat", SERVICES, &["-j RETURN".to_string()]);
        p.delete("nat", "SEINE-SVC-OLD");
        p.replace("filter", SERVICES, &[]);
        let text = p.render(|table, named| match (table, named) {
            ("nat", 2) => Some("-Z"),
            _ => None,
        });
        assert!(text.starts_with("*filter\n:SEINE-SERVICES"), "{text}");
        assert!(text.contains("*nat\n-Z\n:SEINE-SERVICES"), "{text}");
        assert!(!p.render(|_, _| None).contains("-Z\n"));
    }

    #[test]
    fn jumps_are_recognised_in_listings_and_inserted_in_the_same_restore() {
        let (table, chain, rule) = jumps().remove(3);
        assert_eq!((table, chain), ("filter", "FORWARD"));
        let listed = "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"seine service portals\" -j SEINE-SERVICES";
        assert!(is_jump(listed, chain, &rule));
        assert!(!is_jump(&listed.replace("FORWARD", "INPUT"), chain, &rule));
        assert!(!is_jump(&listed.replace(" NEW", ""), chain, &rule));
        let mut p = Payload::default();
        p.replace("filter", SERVICES, &[]);
        p.insert_first(table, chain, &rule);
        let text = p.render(|_, _| None);
        let declared = text.find(":SEINE-SERVICES").unwrap();
        let inserted = text
            .find(&format!("-I FORWARD 1 {}", &listed[11..]))
            .unwrap();
        assert!(declared < inserted, "{text}");
        // Before a prefetch, which would leave a new table without its built-in chains.
        let text = p.render(|_, _| Some("-S"));
        assert!(
            text.find(&listed[11..]).unwrap() < text.find("\n-S\n").unwrap(),
            "{text}"
        );
    }

    #[test]
    fn nft_chain_listings_give_each_chain_its_table() {
        let listing = "table ip filter {\n\tchain INPUT {\n\t\ttype filter hook input priority filter; policy accept;\n\t}\n\tchain SEINE-SERVICES {\n\t}\n}\ntable ip nat {\n\tchain SEINE-SVC-0123456789ABCDEF {\n\t}\n}\n";
        assert_eq!(
            parse_nft_chains(listing),
            [
                ("filter".to_string(), "INPUT".to_string()),
                ("filter".to_string(), "SEINE-SERVICES".to_string()),
                ("nat".to_string(), "SEINE-SVC-0123456789ABCDEF".to_string()),
            ]
        );
    }
}
