//! CoreDNS's `cache` plugin: answers kept by (name, type, DO, CD) in two halves — positive answers
//! ("success") and NXDOMAIN/NODATA ("denial") — each with its capacity and TTL bounds. A hit answers
//! with the TTL left; `prefetch` refreshes a popular entry before it expires and `serve_stale`
//! answers from an expired one (TTL 0) while it is refreshed. SERVFAIL, REFUSED and truncated
//! answers are not kept.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::ResponseCode,
    rr::{RData, RecordType},
};

use crate::{
    corefile::{self, in_zone, CacheBucket},
    metrics::{CacheLabels, CacheTypeLabels, Metrics},
    reply::Reply,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub name: String,
    pub qtype: u16,
    pub dnssec_ok: bool,
    pub checking_disabled: bool,
}

struct Entry {
    reply: Reply,
    stored: Instant,
    ttl: Duration,
    /// Hits within the current prefetch window, and when that window began.
    hits: u32,
    window: Instant,
    refreshing: bool,
}

/// What a lookup found.
pub enum Hit {
    Fresh(Reply),
    /// Answer with this and refresh the entry in the background (prefetch or serve_stale).
    Refresh(Reply),
    Miss,
}

/// Entries by key, in a dense list so that evicting a random one is O(1) (a hash map's
/// "first" entry is not: finding it scans past every slot emptied before it).
#[derive(Default)]
struct Store {
    index: HashMap<CacheKey, usize>,
    slots: Vec<(CacheKey, Entry)>,
}

impl Store {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn contains_key(&self, key: &CacheKey) -> bool {
        self.index.contains_key(key)
    }

    fn get_mut(&mut self, key: &CacheKey) -> Option<&mut Entry> {
        let i = *self.index.get(key)?;
        self.slots.get_mut(i).map(|(_, e)| e)
    }

    fn insert(&mut self, key: CacheKey, entry: Entry) {
        match self.index.get(&key) {
            Some(&i) => self.slots[i].1 = entry,
            None => {
                self.index.insert(key.clone(), self.slots.len());
                self.slots.push((key, entry));
            }
        }
    }

    fn remove_at(&mut self, i: usize) {
        let (key, _) = self.slots.swap_remove(i);
        self.index.remove(&key);
        if let Some((moved, _)) = self.slots.get(i) {
            self.index.insert(moved.clone(), i);
        }
    }

    fn remove(&mut self, key: &CacheKey) -> bool {
        match self.index.get(key) {
            Some(&i) => {
                self.remove_at(i);
                true
            }
            None => false,
        }
    }

    /// Drops a random entry, as CoreDNS's cache does when it is full.
    fn evict_random(&mut self) -> bool {
        if self.slots.is_empty() {
            return false;
        }
        self.remove_at(rand::random_range(0..self.slots.len()));
        true
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    Success,
    Denial,
}

pub struct Cache {
    config: corefile::Cache,
    success: Mutex<Store>,
    denial: Mutex<Store>,
    metrics: std::sync::Arc<Metrics>,
    labels: CacheLabels,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

impl Cache {
    pub fn new(
        config: corefile::Cache,
        metrics: std::sync::Arc<Metrics>,
        server: &'static str,
        zones: &'static str,
    ) -> Self {
        Cache {
            config,
            success: Mutex::default(),
            denial: Mutex::default(),
            metrics,
            labels: CacheLabels {
                server,
                zones,
                view: "",
            },
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        self.config.zones.is_empty() || self.config.zones.iter().any(|z| in_zone(name, z))
    }

    fn type_labels(&self, half: Half) -> CacheTypeLabels {
        CacheTypeLabels {
            server: self.labels.server,
            r#type: match half {
                Half::Success => "success",
                Half::Denial => "denial",
            },
            zones: self.labels.zones,
            view: "",
        }
    }

    fn half(&self, half: Half) -> (&Mutex<Store>, CacheBucket) {
        match half {
            Half::Success => (&self.success, self.config.success),
            Half::Denial => (&self.denial, self.config.denial),
        }
    }

    /// Looks `key` up at `now`.
    pub fn get(&self, key: &CacheKey, now: Instant) -> Hit {
        self.metrics
            .cache_requests
            .get_or_create(&self.labels)
            .inc();
        for half in [Half::Success, Half::Denial] {
            let (map, _) = self.half(half);
            let mut map = lock(map);
            let Some(entry) = map.get_mut(key) else {
                continue;
            };
            let age = now.saturating_duration_since(entry.stored);
            if age < entry.ttl {
                self.metrics
                    .cache_hits
                    .get_or_create(&self.type_labels(half))
                    .inc();
                let left = (entry.ttl - age).as_secs() as u32;
                let reply = with_ttl(&entry.reply, left.max(1));
                if let Some((amount, window, percentage)) = self.config.prefetch {
                    if now.saturating_duration_since(entry.window) > window {
                        entry.window = now;
                        entry.hits = 0;
                    }
                    entry.hits += 1;
                    let threshold = entry.ttl.mul_f64(f64::from(percentage) / 100.0);
                    if !entry.refreshing
                        && entry.hits >= amount
                        && entry.ttl - age <= threshold
                        && entry.ttl >= Duration::from_secs(2)
                    {
                        entry.refreshing = true;
                        self.metrics
                            .cache_prefetch
                            .get_or_create(&self.labels)
                            .inc();
                        return Hit::Refresh(reply);
                    }
                }
                return Hit::Fresh(reply);
            }
            if let Some(stale) = self.config.serve_stale {
                if age < entry.ttl + stale {
                    self.metrics
                        .cache_hits
                        .get_or_create(&self.type_labels(half))
                        .inc();
                    self.metrics
                        .cache_served_stale
                        .get_or_create(&self.labels)
                        .inc();
                    let reply = with_ttl(&entry.reply, 0);
                    if entry.refreshing {
                        return Hit::Fresh(reply);
                    }
                    entry.refreshing = true;
                    return Hit::Refresh(reply);
                }
            }
            map.remove(key);
            self.metrics
                .cache_entries
                .get_or_create(&self.type_labels(half))
                .set(map.len() as i64);
        }
        self.metrics.cache_misses.get_or_create(&self.labels).inc();
        Hit::Miss
    }

    /// Keeps `reply` for `key` if it may be cached, for its TTL within the half's bounds.
    pub fn put(&self, key: CacheKey, reply: &Reply, now: Instant) {
        let Some((half, ttl)) = self.classify(reply) else {
            // Not cacheable: a refresh that failed leaves the old entry to expire on its own.
            for half in [Half::Success, Half::Denial] {
                if let Some(e) = lock(self.half(half).0).get_mut(&key) {
                    e.refreshing = false;
                }
            }
            return;
        };
        let (map, bucket) = self.half(half);
        let mut map = lock(map);
        if !map.contains_key(&key) && map.len() >= bucket.capacity.max(1) {
            // Full: drop a random entry, as CoreDNS does.
            if map.evict_random() {
                self.metrics
                    .cache_evictions
                    .get_or_create(&self.type_labels(half))
                    .inc();
            }
        }
        let ttl = ttl.clamp(bucket.min_ttl, bucket.max_ttl.max(bucket.min_ttl));
        let mut stored = reply.clone();
        stored.plugin = "cache";
        map.insert(
            key.clone(),
            Entry {
                reply: stored,
                stored: now,
                ttl: Duration::from_secs(u64::from(ttl)),
                hits: 0,
                window: now,
                refreshing: false,
            },
        );
        self.metrics
            .cache_entries
            .get_or_create(&self.type_labels(half))
            .set(map.len() as i64);
        drop(map);
        // The other half must not keep an older answer to the same question.
        let other = match half {
            Half::Success => Half::Denial,
            Half::Denial => Half::Success,
        };
        let (other_map, _) = self.half(other);
        let mut other_map = lock(other_map);
        if other_map.remove(&key) {
            self.metrics
                .cache_entries
                .get_or_create(&self.type_labels(other))
                .set(other_map.len() as i64);
        }
    }

    /// Which half a reply goes in and for how long, or None when it is not cached.
    fn classify(&self, reply: &Reply) -> Option<(Half, u32)> {
        let denial_ttl = || {
            reply
                .authorities
                .iter()
                .find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })
                .unwrap_or(self.config.denial.min_ttl)
        };
        if reply.truncated {
            return None;
        }
        match reply.rcode {
            ResponseCode::NXDomain => Some((Half::Denial, denial_ttl())),
            ResponseCode::NoError if reply.answers.is_empty() => Some((Half::Denial, denial_ttl())),
            ResponseCode::NoError => {
                let ttl = reply
                    .answers
                    .iter()
                    .chain(&reply.authorities)
                    .chain(&reply.additionals)
                    .filter(|r| r.record_type() != RecordType::OPT)
                    .map(|r| r.ttl)
                    .min()
                    .unwrap_or(0);
                Some((Half::Success, ttl))
            }
            _ => None,
        }
    }
}

/// A copy of `reply` with every record's TTL set to what is left.
fn with_ttl(reply: &Reply, ttl: u32) -> Reply {
    let mut r = reply.clone();
    for rec in r
        .answers
        .iter_mut()
        .chain(r.authorities.iter_mut())
        .chain(r.additionals.iter_mut())
    {
        if rec.record_type() != RecordType::OPT {
            rec.ttl = rec.ttl.min(ttl);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, sync::Arc};

    use hickory_proto::rr::{rdata::A, Name, Record};

    use super::*;

    fn cache(prefetch: Option<(u32, Duration, u8)>, stale: Option<Duration>) -> Cache {
        let config = corefile::Cache {
            zones: vec![".".into()],
            success: CacheBucket {
                capacity: 2,
                max_ttl: 30,
                min_ttl: 5,
            },
            denial: CacheBucket {
                capacity: 2,
                max_ttl: 30,
                min_ttl: 5,
            },
            prefetch,
            serve_stale: stale,
        };
        Cache::new(config, Arc::new(Metrics::new()), "dns://:53", ".")
    }

    fn key(name: &str) -> CacheKey {
        CacheKey {
            name: name.into(),
            qtype: 1,
            dnssec_ok: false,
            checking_disabled: false,
        }
    }

    fn a_reply(ttl: u32) -> Reply {
        let mut r = Reply::error(ResponseCode::NoError, "forward");
        r.answers.push(Record::from_rdata(
            Name::from_ascii("a.example.").unwrap(),
            ttl,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        r
    }

    #[test]
    fn ttl_counts_down_and_is_bounded() {
        let c = cache(None, None);
        let t0 = Instant::now();
        c.put(key("a.example."), &a_reply(3600), t0);
        match c.get(&key("a.example."), t0 + Duration::from_secs(10)) {
            Hit::Fresh(r) => {
                assert_eq!(r.answers[0].ttl, 20, "max 30 s, 10 s gone");
                assert_eq!(r.plugin, "cache");
            }
            _ => panic!("expected a hit"),
        }
        assert!(matches!(
            c.get(&key("a.example."), t0 + Duration::from_secs(31)),
            Hit::Miss
        ));
        // Below the minimum: kept for 5 s anyway.
        c.put(key("b.example."), &a_reply(1), t0);
        assert!(matches!(
            c.get(&key("b.example."), t0 + Duration::from_secs(4)),
            Hit::Fresh(_)
        ));
    }

    #[test]
    fn servfail_is_not_kept_and_capacity_holds() {
        let c = cache(None, None);
        let t0 = Instant::now();
        c.put(
            key("x."),
            &Reply::error(ResponseCode::ServFail, "forward"),
            t0,
        );
        assert!(matches!(c.get(&key("x."), t0), Hit::Miss));
        let mut cut = a_reply(60);
        cut.truncated = true;
        c.put(key("cut."), &cut, t0);
        assert!(
            matches!(c.get(&key("cut."), t0), Hit::Miss),
            "a truncated answer"
        );
        for n in ["1.", "2.", "3."] {
            c.put(key(n), &a_reply(60), t0);
        }
        let held = ["1.", "2.", "3."]
            .iter()
            .filter(|n| matches!(c.get(&key(n), t0), Hit::Fresh(_)))
            .count();
        assert_eq!(held, 2);
    }

    #[test]
    fn denial_uses_the_soa_minimum() {
        let c = cache(None, None);
        let t0 = Instant::now();
        let mut r = Reply::error(ResponseCode::NXDomain, "kubernetes");
        r.authorities.push(Record::from_rdata(
            Name::from_ascii("cluster.local.").unwrap(),
            30,
            RData::SOA(hickory_proto::rr::rdata::SOA::new(
                Name::from_ascii("ns.dns.cluster.local.").unwrap(),
                Name::from_ascii("hostmaster.cluster.local.").unwrap(),
                1,
                7200,
                1800,
                86400,
                7,
            )),
        ));
        c.put(key("nope.cluster.local."), &r, t0);
        assert!(matches!(
            c.get(&key("nope.cluster.local."), t0 + Duration::from_secs(6)),
            Hit::Fresh(_)
        ));
        assert!(matches!(
            c.get(&key("nope.cluster.local."), t0 + Duration::from_secs(8)),
            Hit::Miss
        ));
    }

    #[test]
    fn prefetch_and_serve_stale_ask_for_a_refresh() {
        let c = cache(Some((2, Duration::from_secs(60), 50)), None);
        let t0 = Instant::now();
        c.put(key("p."), &a_reply(20), t0);
        assert!(matches!(c.get(&key("p."), t0), Hit::Fresh(_)));
        // Second hit with less than half the TTL left: prefetch once.
        assert!(matches!(
            c.get(&key("p."), t0 + Duration::from_secs(12)),
            Hit::Refresh(_)
        ));
        assert!(matches!(
            c.get(&key("p."), t0 + Duration::from_secs(13)),
            Hit::Fresh(_)
        ));

        let c = cache(None, Some(Duration::from_secs(60)));
        c.put(key("s."), &a_reply(10), t0);
        match c.get(&key("s."), t0 + Duration::from_secs(20)) {
            Hit::Refresh(r) => assert_eq!(r.answers[0].ttl, 0),
            _ => panic!("expected a stale answer"),
        }
        assert!(matches!(
            c.get(&key("s."), t0 + Duration::from_secs(100)),
            Hit::Miss
        ));
    }
}
