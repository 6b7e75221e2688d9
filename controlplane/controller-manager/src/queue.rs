//! A work queue as client-go's: a key waits at most once however often it is added, one worker
//! at a time works on a key, a key added while it is being worked on is worked on again after,
//! and a failed key comes back after a growing delay.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::Hash,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::Notify;

struct State<K> {
    order: VecDeque<K>,
    queued: HashSet<K>,
    active: HashSet<K>,
    /// Added again while active: queued when the worker is done.
    again: HashSet<K>,
    failures: HashMap<K, u32>,
}

pub struct Queue<K> {
    state: Mutex<State<K>>,
    ready: Notify,
}

impl<K: Clone + Eq + Hash + Send + 'static> Queue<K> {
    pub fn new() -> Arc<Self> {
        Arc::new(Queue {
            state: Mutex::new(State {
                order: VecDeque::new(),
                queued: HashSet::new(),
                active: HashSet::new(),
                again: HashSet::new(),
                failures: HashMap::new(),
            }),
            ready: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<K>> {
        // A worker that panicked leaves consistent state: every change is a single step.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, key: K) {
        let mut s = self.lock();
        if s.active.contains(&key) {
            s.again.insert(key);
            return;
        }
        if s.queued.insert(key.clone()) {
            s.order.push_back(key);
            drop(s);
            self.ready.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next key to work on; the caller must call `done` with it.
    pub async fn next(&self) -> K {
        loop {
            let notified = self.ready.notified();
            {
                let mut s = self.lock();
                if let Some(key) = s.order.pop_front() {
                    s.queued.remove(&key);
                    s.active.insert(key.clone());
                    if !s.order.is_empty() {
                        // Wake another worker for the rest.
                        self.ready.notify_one();
                    }
                    return key;
                }
            }
            notified.await;
        }
    }

    /// Ends work on `key`: `ok` forgets its failures; a failure adds it back after 5 ms
    /// doubling up to 30 s.
    pub fn done(self: &Arc<Self>, key: K, ok: bool) {
        let retry = {
            let mut s = self.lock();
            s.active.remove(&key);
            let delay = if ok {
                s.failures.remove(&key);
                None
            } else {
                let n = s.failures.entry(key.clone()).or_insert(0);
                *n = n.saturating_add(1);
                Some(
                    Duration::from_millis(5u64.saturating_mul(1 << (*n).min(13)))
                        .min(Duration::from_secs(30)),
                )
            };
            if s.again.remove(&key) && delay.is_none() {
                drop(s);
                self.add(key);
                return;
            }
            delay
        };
        if let Some(delay) = retry {
            let queue = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                queue.add(key);
            });
        }
    }

    /// Adds `key` after `delay`.
    pub fn add_after(self: &Arc<Self>, key: K, delay: Duration) {
        let queue = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            queue.add(key);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_waits_once_and_comes_back_when_added_while_active() {
        let q = Queue::new();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        let a = q.next().await;
        assert_eq!(a, "a");
        q.add("a"); // while active: not handed to a second worker
        assert_eq!(q.next().await, "b");
        q.done("b", true);
        assert!(q.is_empty());
        q.done("a", true);
        assert_eq!(q.next().await, "a", "added while active: worked on again");
        q.done("a", false);
        // A failure returns after its delay.
        let back = tokio::time::timeout(Duration::from_secs(1), q.next()).await;
        assert_eq!(back, Ok("a"));
    }
}
