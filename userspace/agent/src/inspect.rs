//! What seinectl shows: the pinned maps read as they are, one row per entry, with the names the
//! datapath uses.

use std::collections::HashMap;

use seine_common::*;
use serde::Serialize;

use crate::{
    bpf::PinnedMaps,
    datapath::ebpf::{backend_spec, frontend_of, ip_of, monotonic_ns, Owner},
    model::Protocol,
};

#[derive(Debug, Serialize)]
pub struct LbEntry {
    pub frontend: String,
    pub service_id: u32,
    pub owner: &'static str,
    pub affinity_timeout_secs: Option<u32>,
    pub bank: u8,
    pub backends: Vec<LbBackend>,
}

#[derive(Debug, Serialize)]
pub struct LbBackend {
    pub slot: u32,
    pub backend_id: u32,
    pub address: String,
    pub state: String,
}

#[derive(Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: String,
    pub protocol: String,
    pub state: String,
    pub service_id: u32,
}

#[derive(Debug, Serialize)]
pub struct CtRow {
    pub direction: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    pub service_id: u32,
    pub backend_id: u32,
    pub backend: Option<String>,
    pub state: &'static str,
    pub hairpin: bool,
    pub age_secs: f64,
    /// The lifetime left; 0 once expired (the datapath ignores the entry and the agent's
    /// sweep removes it).
    pub expires_in_secs: f64,
    pub expired: bool,
    pub packets: u64,
}

#[derive(Debug, Serialize)]
pub struct StatRow {
    pub name: &'static str,
    pub value: u64,
}

type Result<T> = std::result::Result<T, aya::maps::MapError>;

pub fn lb_list(maps: &PinnedMaps) -> Result<Vec<LbEntry>> {
    let mut slots: HashMap<(u32, u32), u32> = HashMap::new();
    for item in maps.slots.iter() {
        let (key, id) = item?;
        slots.insert((key.service_id, key.slot), id);
    }
    let backends = backends_by_id(maps)?;
    let mut entries = Vec::new();
    for item in maps.services.iter() {
        let (key, value) = item?;
        let Some(frontend) = frontend_of(&key) else {
            continue;
        };
        let n = value.count as u32 + value.terminating as u32;
        let list = (0..n)
            .map(|i| {
                let slot = SlotKey::new(value.service_id, value.bank, i).slot;
                let id = slots.get(&(value.service_id, slot)).copied().unwrap_or(0);
                let (address, state) = match backends.get(&id) {
                    Some(b) => {
                        let spec = backend_spec(b);
                        (format!("{}:{}", spec.ip, spec.port), spec.state.to_string())
                    }
                    None => ("<missing>".into(), "missing".into()),
                };
                LbBackend {
                    slot: i + 1,
                    backend_id: id,
                    address,
                    state,
                }
            })
            .collect();
        entries.push(LbEntry {
            frontend: frontend.to_string(),
            service_id: value.service_id,
            owner: Owner::name_of(value.source),
            affinity_timeout_secs: (value.flags & SVC_FLAG_AFFINITY != 0)
                .then_some(value.affinity_timeout_secs),
            bank: value.bank,
            backends: list,
        });
    }
    entries.sort_by(|a, b| a.frontend.cmp(&b.frontend));
    Ok(entries)
}

fn backends_by_id(maps: &PinnedMaps) -> Result<HashMap<u32, Backend>> {
    maps.backends.iter().collect()
}

pub fn backend_list(maps: &PinnedMaps) -> Result<Vec<BackendRow>> {
    let mut rows: Vec<BackendRow> = backends_by_id(maps)?
        .into_iter()
        .map(|(id, b)| {
            let spec = backend_spec(&b);
            BackendRow {
                id,
                address: format!("{}:{}", spec.ip, spec.port),
                protocol: Protocol::from_number(b.proto)
                    .map_or_else(|| b.proto.to_string(), |p| p.to_string()),
                state: spec.state.to_string(),
                service_id: b.service_id,
            }
        })
        .collect();
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn ct_list(maps: &PinnedMaps) -> Result<Vec<CtRow>> {
    let now = monotonic_ns();
    let backends = backends_by_id(maps)?;
    let mut rows = Vec::new();
    for item in maps.conntrack.iter() {
        let (key, value) = item?;
        let endpoint = |addr: &[u32; 4], port: u16| {
            format!("{}:{}", ip_of(addr, key.family), u16::from_be(port))
        };
        let state = if key.proto != PROTO_TCP {
            "-"
        } else if value.flags & CT_CLOSING != 0 {
            "CLOSING"
        } else if value.flags & CT_ESTABLISHED != 0 {
            "ESTABLISHED"
        } else {
            "SYN_SENT"
        };
        rows.push(CtRow {
            direction: if key.dir == CT_DIR_REPLY {
                "reply"
            } else {
                "out"
            },
            protocol: Protocol::from_number(key.proto)
                .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            source: endpoint(&key.saddr, key.sport),
            destination: endpoint(&key.daddr, key.dport),
            service_id: value.service_id,
            backend_id: value.backend_id,
            backend: backends.get(&value.backend_id).map(|b| {
                let s = backend_spec(b);
                format!("{}:{}", s.ip, s.port)
            }),
            state,
            hairpin: value.flags & CT_HAIRPIN != 0,
            age_secs: now.saturating_sub(value.created_ns) as f64 / 1e9,
            expires_in_secs: remaining_secs(value.expires_ns, now),
            expired: value.expires_ns < now,
            packets: value.packets,
        });
    }
    rows.sort_by(|a, b| a.age_secs.total_cmp(&b.age_secs));
    Ok(rows)
}

/// Seconds from `now` until `expires_ns` (both monotonic), never negative.
fn remaining_secs(expires_ns: u64, now: u64) -> f64 {
    expires_ns.saturating_sub(now) as f64 / 1e9
}

pub fn stats(maps: &PinnedMaps) -> std::result::Result<Vec<StatRow>, crate::bpf::BpfError> {
    Ok(maps
        .stats()?
        .into_iter()
        .zip(STAT_NAMES)
        .map(|(value, name)| StatRow { name, value })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_lifetime_is_never_negative() {
        assert_eq!(remaining_secs(5_500_000_000, 1_000_000_000), 4.5);
        assert_eq!(remaining_secs(1_000_000_000, 1_000_000_000), 0.0);
        assert_eq!(remaining_secs(1_000_000_000, 9_000_000_000), 0.0);
    }
}
