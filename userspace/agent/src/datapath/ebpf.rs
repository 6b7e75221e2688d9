//! The eBPF implementation of `Datapath`: services, slots, backends and reverse NAT in pinned maps.
//!
//! Write order per service keeps readers consistent: new backends, then the slots of the idle bank,
//! then the reverse NAT entry, then the service entry (one map update that flips the bank), and only
//! then removal of what the new set no longer uses. A failure before the flip undoes what was
//! written, so the service keeps its previous state.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use aya::maps::{IterableMap as _, MapData, MapError};
use seine_common::*;

use super::{Change, Datapath, DatapathError};
use crate::{
    bpf::PinnedMaps,
    model::{BackendSpec, BackendState, Frontend, Protocol, ServiceSpec},
};

/// Who writes: the agent (from its services file or the API) or seinectl. Each owner allocates ids
/// from its own half of the id space and touches only its own services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Agent,
    Cli,
}

impl Owner {
    fn source(self) -> u8 {
        match self {
            Owner::Agent => SOURCE_AGENT,
            Owner::Cli => SOURCE_CLI,
        }
    }
    fn id_range(self) -> (u32, u32) {
        match self {
            Owner::Agent => (1, 0x8000_0000),
            Owner::Cli => (0x8000_0000, u32::MAX),
        }
    }
    pub fn name_of(source: u8) -> &'static str {
        match source {
            SOURCE_AGENT => "seine-agent",
            SOURCE_CLI => "seinectl",
            _ => "unknown",
        }
    }
}

struct Installed {
    spec: ServiceSpec,
    value: ServiceValue,
    backend_ids: Vec<u32>,
    /// How many slots each bank holds, so stale ones can be removed.
    bank_len: [u32; 2],
}

pub struct EbpfDatapath {
    maps: PinnedMaps,
    owner: Owner,
    installed: HashMap<Frontend, Installed>,
    foreign: HashMap<Frontend, u8>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    capacity: Capacity,
}

#[derive(Clone, Copy)]
struct Capacity {
    services: u32,
    slots: u32,
    backends: u32,
}

impl EbpfDatapath {
    /// Opens the pinned maps under `dir` and reads back what `owner` installed before.
    pub fn open(dir: &Path, owner: Owner) -> Result<Self, DatapathError> {
        let maps = PinnedMaps::open(dir)?;
        let capacity = Capacity {
            services: max_entries(maps.services.map())?,
            slots: max_entries(maps.slots.map())?,
            backends: max_entries(maps.backends.map())?,
        };
        let (start, end) = owner.id_range();
        let mut dp = EbpfDatapath {
            maps,
            owner,
            installed: HashMap::new(),
            foreign: HashMap::new(),
            service_ids: IdAllocator::new(start, end),
            backend_ids: IdAllocator::new(start, end),
            capacity,
        };
        dp.read_back()?;
        Ok(dp)
    }

    fn read_back(&mut self) -> Result<(), DatapathError> {
        let read_err = |what: &str| {
            let what = what.to_string();
            move |source| DatapathError::Map {
                context: format!("reading {what}"),
                source,
            }
        };
        let mut slots: HashMap<u32, [Vec<(u32, u32)>; 2]> = HashMap::new();
        for item in self.maps.slots.iter() {
            let (key, backend_id) = item.map_err(read_err(MAP_SLOTS))?;
            let bank = (key.slot >> 31) as usize;
            slots.entry(key.service_id).or_default()[bank]
                .push((key.slot & 0x7fff_ffff, backend_id));
        }
        let mut backends = HashMap::new();
        for item in self.maps.backends.iter() {
            let (id, backend) = item.map_err(read_err(MAP_BACKENDS))?;
            self.backend_ids.mark_used(id);
            backends.insert(id, backend);
        }
        for item in self.maps.services.iter() {
            let (key, value) = item.map_err(read_err(MAP_SERVICES))?;
            self.service_ids.mark_used(value.service_id);
            let Some(frontend) = frontend_of(&key) else {
                continue;
            };
            if value.source != self.owner.source() {
                self.foreign.insert(frontend, value.source);
                continue;
            }
            let mut banks = slots.remove(&value.service_id).unwrap_or_default();
            let bank_len = [banks[0].len() as u32, banks[1].len() as u32];
            let active = &mut banks[(value.bank & 1) as usize];
            active.sort_unstable();
            let n = value.count as usize + value.terminating as usize;
            let backend_ids: Vec<u32> = active.iter().take(n).map(|(_, id)| *id).collect();
            let specs = backend_ids
                .iter()
                .filter_map(|id| backends.get(id).map(backend_spec))
                .collect();
            let spec = ServiceSpec {
                frontend,
                backends: specs,
                affinity_timeout_secs: (value.flags & SVC_FLAG_AFFINITY != 0)
                    .then_some(value.affinity_timeout_secs),
            };
            self.installed.insert(
                frontend,
                Installed {
                    spec,
                    value,
                    backend_ids,
                    bank_len,
                },
            );
        }
        Ok(())
    }

    /// Removes conntrack and affinity entries that expired; returns how many.
    pub fn collect_garbage(&mut self) -> Result<usize, DatapathError> {
        let now = monotonic_ns();
        let mut stale = Vec::new();
        for item in self.maps.conntrack.iter() {
            let Ok((key, value)) = item else { continue };
            if value.expires_ns < now {
                stale.push(key);
            }
        }
        for key in &stale {
            let _ = self.maps.conntrack.remove(key);
        }
        Ok(stale.len())
    }

    pub fn service_count(&self) -> usize {
        self.installed.len()
    }
}

impl Datapath for EbpfDatapath {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn upsert(&mut self, spec: &ServiceSpec) -> Result<Change, DatapathError> {
        let spec = spec.normalized();
        let frontend = spec.frontend;
        if let Some(source) = self.foreign.get(&frontend) {
            return Err(DatapathError::NotOwned(frontend, Owner::name_of(*source)));
        }
        let key = service_key(&frontend).ok_or(DatapathError::Ipv6(frontend))?;
        if spec.backends.iter().any(|b| b.ip.is_ipv6()) {
            return Err(DatapathError::Ipv6(frontend));
        }
        if spec.backends.len() > u16::MAX as usize {
            return Err(DatapathError::TooManyBackends {
                service: frontend,
                count: spec.backends.len(),
            });
        }
        let previous = self.installed.get(&frontend);
        if previous.is_some_and(|p| p.spec == spec) {
            return Ok(Change::Unchanged);
        }
        let existed = previous.is_some();
        let service_id = match previous {
            Some(p) => p.value.service_id,
            None => self
                .service_ids
                .allocate()
                .ok_or(DatapathError::IdsExhausted("service"))?,
        };
        let mut tx = Transaction::default();
        let result = self.write_service(&spec, &key, service_id, &mut tx);
        match result {
            Ok((installed, change)) => {
                // Committed: drop what the new set no longer uses.
                for id in tx.retired_backends {
                    let _ = self.maps.backends.remove(&id);
                    self.backend_ids.release(id);
                }
                for slot in tx.stale_slots {
                    let _ = self.maps.slots.remove(&slot);
                }
                self.installed.insert(frontend, installed);
                Ok(change)
            }
            Err(e) => {
                tx.undo(&mut self.maps);
                for id in tx.created_backends {
                    self.backend_ids.release(id);
                }
                if !existed {
                    self.service_ids.release(service_id);
                }
                Err(e)
            }
        }
    }

    fn delete(&mut self, frontend: &Frontend) -> Result<bool, DatapathError> {
        if let Some(source) = self.foreign.get(frontend) {
            return Err(DatapathError::NotOwned(*frontend, Owner::name_of(*source)));
        }
        let Some(installed) = self.installed.remove(frontend) else {
            return Ok(false);
        };
        let Some(key) = service_key(frontend) else {
            return Ok(false);
        };
        let sid = installed.value.service_id;
        // The service entry goes first: from then on no new flow can reach the slots or backends.
        if let Err(source) = self.maps.services.remove(&key) {
            if !matches!(source, MapError::KeyNotFound) && !is_enoent(&source) {
                self.installed.insert(*frontend, installed);
                return Err(DatapathError::Map {
                    context: format!("deleting {frontend}"),
                    source,
                });
            }
        }
        let _ = self.maps.revnat.remove(&sid);
        for bank in 0..2u8 {
            for i in 0..installed.bank_len[bank as usize] {
                let _ = self.maps.slots.remove(&SlotKey::new(sid, bank, i));
            }
        }
        for id in &installed.backend_ids {
            let _ = self.maps.backends.remove(id);
            self.backend_ids.release(*id);
        }
        self.service_ids.release(sid);
        Ok(true)
    }

    fn frontends(&self) -> Vec<Frontend> {
        self.installed.keys().copied().collect()
    }
}

/// What an in-flight service update wrote, to undo it or finish it.
#[derive(Default)]
struct Transaction {
    created_backends: Vec<u32>,
    /// Existing backends whose state changed, with their previous value.
    changed_backends: Vec<(u32, Backend)>,
    written_slots: Vec<SlotKey>,
    created_revnat: Option<u32>,
    retired_backends: Vec<u32>,
    stale_slots: Vec<SlotKey>,
}

impl Transaction {
    fn undo(&self, maps: &mut PinnedMaps) {
        for slot in &self.written_slots {
            let _ = maps.slots.remove(slot);
        }
        for (id, old) in &self.changed_backends {
            let _ = maps.backends.insert(id, old, 0);
        }
        for id in &self.created_backends {
            let _ = maps.backends.remove(id);
        }
        if let Some(sid) = self.created_revnat {
            let _ = maps.revnat.remove(&sid);
        }
    }
}

impl EbpfDatapath {
    fn write_service(
        &mut self,
        spec: &ServiceSpec,
        key: &ServiceKey,
        service_id: u32,
        tx: &mut Transaction,
    ) -> Result<(Installed, Change), DatapathError> {
        let frontend = spec.frontend;
        let previous = self.installed.get(&frontend);
        let old_ids: HashMap<(IpAddr, u16), (u32, BackendState)> = previous
            .map(|p| {
                p.spec
                    .backends
                    .iter()
                    .zip(&p.backend_ids)
                    .map(|(b, id)| ((b.ip, b.port), (*id, b.state)))
                    .collect()
            })
            .unwrap_or_default();
        let full = |map: &'static str, capacity: u32| {
            move |source: MapError| {
                if is_full(&source) {
                    DatapathError::MapFull {
                        service: frontend,
                        map,
                        capacity,
                    }
                } else {
                    DatapathError::Map {
                        context: format!("writing {frontend} to {map}"),
                        source,
                    }
                }
            }
        };

        // 1. Backends.
        let mut backend_ids = Vec::with_capacity(spec.backends.len());
        for b in &spec.backends {
            let value = backend_value(b, frontend.protocol, service_id);
            match old_ids.get(&(b.ip, b.port)) {
                Some((id, state)) => {
                    if *state != b.state {
                        let mut old = value;
                        old.state = backend_state(*state);
                        self.maps
                            .backends
                            .insert(id, value, 0)
                            .map_err(full(MAP_BACKENDS, self.capacity.backends))?;
                        tx.changed_backends.push((*id, old));
                    }
                    backend_ids.push(*id);
                }
                None => {
                    let id = self
                        .backend_ids
                        .allocate()
                        .ok_or(DatapathError::IdsExhausted("backend"))?;
                    tx.created_backends.push(id);
                    self.maps
                        .backends
                        .insert(id, value, 0)
                        .map_err(full(MAP_BACKENDS, self.capacity.backends))?;
                    backend_ids.push(id);
                }
            }
        }
        let kept: HashSet<u32> = backend_ids.iter().copied().collect();
        tx.retired_backends = previous
            .map(|p| {
                p.backend_ids
                    .iter()
                    .filter(|id| !kept.contains(id))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();

        // 2. Slots, in the bank readers are not using.
        let bank = previous.map_or(0, |p| 1 - (p.value.bank & 1));
        for (i, id) in backend_ids.iter().enumerate() {
            let slot = SlotKey::new(service_id, bank, i as u32);
            self.maps
                .slots
                .insert(slot, id, 0)
                .map_err(full(MAP_SLOTS, self.capacity.slots))?;
            tx.written_slots.push(slot);
        }
        let mut bank_len = previous.map_or([0, 0], |p| p.bank_len);
        let new_len = backend_ids.len() as u32;
        for i in new_len..bank_len[bank as usize] {
            tx.stale_slots.push(SlotKey::new(service_id, bank, i));
        }
        bank_len[bank as usize] = new_len;

        // 3. Reverse NAT, for a new service.
        if previous.is_none() {
            let rev = RevNat {
                addr: key.addr,
                port: key.port,
                family: key.family,
                _pad: 0,
            };
            self.maps
                .revnat
                .insert(service_id, rev, 0)
                .map_err(full(MAP_REVNAT, self.capacity.services))?;
            tx.created_revnat = Some(service_id);
        }

        // 4. The flip.
        let count = spec
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .count() as u16;
        let value = ServiceValue {
            service_id,
            count,
            terminating: spec.backends.len() as u16 - count,
            bank,
            flags: if spec.affinity_timeout_secs.is_some() {
                SVC_FLAG_AFFINITY
            } else {
                0
            },
            source: self.owner.source(),
            _pad: 0,
            affinity_timeout_secs: spec.affinity_timeout_secs.unwrap_or(0),
        };
        self.maps
            .services
            .insert(key, value, 0)
            .map_err(full(MAP_SERVICES, self.capacity.services))?;

        let change = if previous.is_some() {
            Change::Updated
        } else {
            Change::Created
        };
        Ok((
            Installed {
                spec: spec.clone(),
                value,
                backend_ids,
                bank_len,
            },
            change,
        ))
    }
}

fn backend_value(b: &BackendSpec, protocol: Protocol, service_id: u32) -> Backend {
    Backend {
        addr: addr_words(b.ip),
        port: b.port.to_be(),
        proto: protocol.number(),
        family: FAMILY_V4,
        state: backend_state(b.state),
        _pad: [0; 3],
        service_id,
    }
}

fn backend_state(state: BackendState) -> u8 {
    match state {
        BackendState::Active => BACKEND_ACTIVE,
        BackendState::Terminating => BACKEND_TERMINATING,
    }
}

pub fn backend_spec(b: &Backend) -> BackendSpec {
    BackendSpec {
        ip: ip_of(&b.addr, b.family),
        port: u16::from_be(b.port),
        state: if b.state == BACKEND_TERMINATING {
            BackendState::Terminating
        } else {
            BackendState::Active
        },
    }
}

/// IPv4 in the first word, network order, as the datapath reads it from packets.
pub fn addr_words(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

pub fn ip_of(addr: &[u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))
    }
}

pub fn service_key(f: &Frontend) -> Option<ServiceKey> {
    if f.ip.is_ipv6() {
        return None;
    }
    Some(ServiceKey {
        addr: addr_words(f.ip),
        port: f.port.to_be(),
        proto: f.protocol.number(),
        family: FAMILY_V4,
    })
}

pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: ip_of(&key.addr, key.family),
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.proto)?,
    })
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC is what
    // bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn max_entries(map: &MapData) -> Result<u32, DatapathError> {
    map.info()
        .map(|info| info.max_entries())
        .map_err(|source| DatapathError::Map {
            context: "reading map info".into(),
            source,
        })
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        MapError::IoError(e) => e.raw_os_error(),
        _ => None,
    }
}

fn is_full(e: &MapError) -> bool {
    matches!(
        errno(e),
        Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM)
    )
}

fn is_enoent(e: &MapError) -> bool {
    errno(e) == Some(libc::ENOENT)
}

/// Hands out ids round-robin within a range, so a freed id is reused as late as possible and a
/// stale conntrack entry is unlikely to meet a new owner of its id.
struct IdAllocator {
    start: u32,
    end: u32,
    next: u32,
    used: HashSet<u32>,
}

impl IdAllocator {
    fn new(start: u32, end: u32) -> Self {
        IdAllocator {
            start,
            end,
            next: start,
            used: HashSet::new(),
        }
    }

    fn mark_used(&mut self, id: u32) {
        if (self.start..self.end).contains(&id) {
            self.used.insert(id);
            if id >= self.next {
                self.next = id.wrapping_add(1).max(self.start);
            }
        }
    }

    fn allocate(&mut self) -> Option<u32> {
        let span = (self.end - self.start) as u64;
        if self.used.len() as u64 >= span {
            return None;
        }
        loop {
            if self.next >= self.end {
                self.next = self.start;
            }
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_reused_late() {
        let mut ids = IdAllocator::new(1, 4);
        let a = ids.allocate().unwrap();
        let b = ids.allocate().unwrap();
        ids.release(a);
        let c = ids.allocate().unwrap();
        assert_ne!(c, a, "a freed id is not handed out again at once");
        assert_ne!(c, b);
        assert_eq!(ids.allocate(), Some(a));
        assert_eq!(ids.allocate(), None);
    }

    #[test]
    fn addresses_round_trip_through_map_words() {
        let ip: IpAddr = "10.96.0.10".parse().unwrap();
        assert_eq!(ip_of(&addr_words(ip), FAMILY_V4), ip);
        let words = addr_words(ip);
        assert_eq!(words[0].to_ne_bytes(), [10, 96, 0, 10]);
    }
}
