//! The scheduling queue, after kube-scheduler's: pods waiting for a decision (highest priority
//! first, then oldest), pods backing off after a failed attempt (1 s doubling to 10 s), and
//! unschedulable pods parked until the cluster changes in a way that may help them (or five
//! minutes pass).

use std::{
    cmp::Reverse,
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    framework::Plugin,
    pod::{PodInfo, PodKey},
};

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long a pod stays parked as unschedulable without any event moving it.
pub const MAX_UNSCHEDULABLE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Active(u64),
    Backoff(Instant),
    Unschedulable(Instant),
    /// Being decided on or bound.
    InFlight,
}

#[derive(Debug)]
struct Entry {
    pod: Arc<PodInfo>,
    attempts: u32,
    state: State,
    /// The filters that rejected nodes in the last attempt.
    rejected_by: HashSet<Plugin>,
}

impl Entry {
    fn backoff_until(&self, since: Instant) -> Instant {
        let doublings = self.attempts.saturating_sub(1).min(8);
        since + (INITIAL_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF)
    }
}

#[derive(Debug, Default)]
pub struct SchedulingQueue {
    entries: HashMap<PodKey, Entry>,
    active: BTreeSet<(Reverse<i32>, u64, PodKey)>,
    backoff: BTreeSet<(Instant, PodKey)>,
    /// When each pod's last attempt ended, for its backoff.
    attempted: HashMap<PodKey, Instant>,
    /// How many entries are parked as unschedulable.
    parked: usize,
    seq: u64,
}

/// How many pods wait in each part of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub active: usize,
    pub backoff: usize,
    pub unschedulable: usize,
}

impl SchedulingQueue {
    fn set_state(&mut self, key: &PodKey, state: State) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        match entry.state {
            State::Active(seq) => {
                self.active
                    .remove(&(Reverse(entry.pod.priority), seq, key.clone()));
            }
            State::Backoff(at) => {
                self.backoff.remove(&(at, key.clone()));
            }
            State::Unschedulable(_) => self.parked -= 1,
            State::InFlight => {}
        }
        entry.state = state;
        match state {
            State::Active(seq) => {
                self.active
                    .insert((Reverse(entry.pod.priority), seq, key.clone()));
            }
            State::Backoff(at) => {
                self.backoff.insert((at, key.clone()));
            }
            State::Unschedulable(_) => self.parked += 1,
            State::InFlight => {}
        }
    }

    fn activate(&mut self, key: &PodKey) {
        self.seq += 1;
        let seq = self.seq;
        self.set_state(key, State::Active(seq));
    }

    /// A pod that wants a node; a known one is refreshed, and requeued if it was parked and
    /// something scheduling reads changed.
    pub fn upsert(&mut self, pod: Arc<PodInfo>, now: Instant) {
        let key = pod.key.clone();
        match self.entries.get_mut(&key) {
            None => {
                self.entries.insert(
                    key.clone(),
                    Entry {
                        pod,
                        attempts: 0,
                        state: State::InFlight,
                        rejected_by: HashSet::new(),
                    },
                );
                self.activate(&key);
            }
            Some(entry) => {
                let changed = entry.pod.fingerprint != pod.fingerprint;
                let priority_changed = entry.pod.priority != pod.priority;
                let state = entry.state;
                if priority_changed {
                    // Re-sort under the new priority.
                    self.set_state(&key, State::InFlight);
                }
                if let Some(entry) = self.entries.get_mut(&key) {
                    entry.pod = pod;
                }
                match state {
                    State::Unschedulable(_) if changed => self.requeue(&key, now),
                    State::InFlight => {}
                    other if priority_changed => self.set_state(&key, other),
                    _ => {}
                }
            }
        }
    }

    pub fn remove(&mut self, key: &PodKey) {
        self.set_state(key, State::InFlight);
        self.entries.remove(key);
        self.attempted.remove(key);
    }

    pub fn is_in_flight(&self, key: &PodKey) -> bool {
        self.entries
            .get(key)
            .is_some_and(|e| e.state == State::InFlight)
    }

    /// The next pod to decide on; it stays in the queue, in flight, until `done`,
    /// `unschedulable` or `retry_later`.
    pub fn pop(&mut self) -> Option<Arc<PodInfo>> {
        let (_, _, key) = self.active.first()?.clone();
        self.set_state(&key, State::InFlight);
        let entry = self.entries.get_mut(&key)?;
        entry.attempts += 1;
        Some(entry.pod.clone())
    }

    pub fn has_active(&self) -> bool {
        !self.active.is_empty()
    }

    /// Bound: the pod leaves the queue.
    pub fn done(&mut self, key: &PodKey) {
        self.remove(key);
    }

    /// No node fits: parked until a cluster change may help.
    pub fn unschedulable(&mut self, key: &PodKey, rejected_by: HashSet<Plugin>, now: Instant) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.rejected_by = rejected_by;
            self.attempted.insert(key.clone(), now);
            self.set_state(key, State::Unschedulable(now));
        }
    }

    /// The bind failed: tried again after the backoff.
    pub fn retry_later(&mut self, key: &PodKey, now: Instant) {
        if let Some(entry) = self.entries.get(key) {
            let at = entry.backoff_until(now);
            self.attempted.insert(key.clone(), now);
            self.set_state(key, State::Backoff(at));
        }
    }

    fn requeue(&mut self, key: &PodKey, now: Instant) {
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let at = self
            .attempted
            .get(key)
            .map(|t| entry.backoff_until(*t))
            .unwrap_or(now);
        if at <= now {
            self.activate(key);
        } else {
            self.set_state(key, State::Backoff(at));
        }
    }

    /// Moves parked pods for which `may_help` (given the filters that last rejected them)
    /// holds back to be decided again, after what is left of their backoff.
    pub fn move_unschedulable(
        &mut self,
        now: Instant,
        may_help: impl Fn(&HashSet<Plugin>) -> bool,
    ) {
        let keys: Vec<PodKey> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Unschedulable(_)) && may_help(&e.rejected_by))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.requeue(&key, now);
        }
    }

    /// Activates pods whose backoff is over.
    pub fn flush_backoff(&mut self, now: Instant) {
        while let Some((at, key)) = self.backoff.first().cloned() {
            if at > now {
                break;
            }
            self.activate(&key);
        }
    }

    /// Activates pods whose backoff is over, and pods parked for longer than
    /// `MAX_UNSCHEDULABLE`.
    pub fn flush(&mut self, now: Instant) {
        self.flush_backoff(now);
        let stale: Vec<PodKey> = self
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Unschedulable(since) if now.duration_since(since) >= MAX_UNSCHEDULABLE))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.requeue(&key, now);
        }
    }

    /// When the next backoff ends.
    pub fn next_backoff(&self) -> Option<Instant> {
        self.backoff.first().map(|(at, _)| *at)
    }

    /// Keeps only the pods `keep` accepts (after a relist) and those in flight.
    pub fn retain(&mut self, keep: impl Fn(&PodKey) -> bool) {
        let gone: Vec<PodKey> = self
            .entries
            .iter()
            .filter(|(k, e)| e.state != State::InFlight && !keep(k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.remove(&key);
        }
    }

    pub fn counts(&self) -> QueueCounts {
        QueueCounts {
            active: self.active.len(),
            backoff: self.backoff.len(),
            unschedulable: self.parked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(name: &str, priority: i32) -> Arc<PodInfo> {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"priority": priority, "containers": [{"name": "c"}]}
        }))
        .unwrap();
        Arc::new(PodInfo::from_pod(&pod))
    }

    #[test]
    fn higher_priority_first_then_oldest() {
        let mut q = SchedulingQueue::default();
        let now = Instant::now();
        q.upsert(pod("a", 0), now);
        q.upsert(pod("b", 10), now);
        q.upsert(pod("c", 0), now);
        let order: Vec<String> =
            std::iter::from_fn(|| q.pop().map(|p| p.key.name.clone())).collect();
        assert_eq!(order, ["b", "a", "c"]);
    }

    #[test]
    fn unschedulable_pods_wait_for_a_change_and_their_backoff() {
        let mut q = SchedulingQueue::default();
        let t0 = Instant::now();
        q.upsert(pod("a", 0), t0);
        let a = q.pop().unwrap();
        q.unschedulable(&a.key, [Plugin::NodeResourcesFit].into(), t0);
        assert_eq!(q.counts().unschedulable, 1);
        // A change that cannot help leaves it parked.
        q.move_unschedulable(t0, |p| p.contains(&Plugin::InterPodAffinity));
        assert_eq!(q.counts().unschedulable, 1);
        // One that may help moves it, to back off first (1 s after its attempt).
        q.move_unschedulable(t0 + Duration::from_millis(200), |_| true);
        assert_eq!(q.counts().backoff, 1);
        assert!(q.pop().is_none());
        q.flush(t0 + Duration::from_secs(1));
        assert_eq!(q.pop().map(|p| p.key.name.clone()), Some("a".into()));
        // A second failure backs off for 2 s.
        q.retry_later(&a.key, t0 + Duration::from_secs(1));
        assert_eq!(q.next_backoff(), Some(t0 + Duration::from_secs(3)));
        // A status-only update (same fingerprint) does not requeue a parked pod.
        q.flush(t0 + Duration::from_secs(3));
        let a = q.pop().unwrap();
        q.unschedulable(&a.key, HashSet::new(), t0 + Duration::from_secs(3));
        q.upsert(pod("a", 0), t0 + Duration::from_secs(60));
        assert_eq!(q.counts().unschedulable, 1);
        q.flush(t0 + Duration::from_secs(3) + MAX_UNSCHEDULABLE);
        assert!(q.has_active());
    }
}
