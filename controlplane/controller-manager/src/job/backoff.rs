//! The pod-failure backoff: 10 s doubling to 6 min after consecutive failures, reset by a success.

use std::time::Duration;

use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};

use super::{MAX_POD_FAILURE_BACKOFF, POD_FAILURE_BACKOFF};

/// Failures since the last success and when the last one was.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct BackoffRecord {
    pub(super) failures_after_last_success: u32,
    pub(super) last_failure: Option<Timestamp>,
}

impl BackoffRecord {
    /// The record after pods newly seen finished (kube's newBackoffRecord).
    pub(super) fn next(self, succeeded: &[&Pod], failed: &[&Pod], now: Timestamp) -> BackoffRecord {
        let mut succeeded: Vec<Timestamp> =
            succeeded.iter().map(|p| finished_time(p, now)).collect();
        let mut failed: Vec<Timestamp> = failed.iter().map(|p| finished_time(p, now)).collect();
        succeeded.sort();
        failed.sort();
        let Some(last_success) = succeeded.last() else {
            return match failed.last() {
                None => self,
                Some(last) => BackoffRecord {
                    failures_after_last_success: self.failures_after_last_success
                        + failed.len() as u32,
                    last_failure: Some(*last),
                },
            };
        };
        let after: Vec<&Timestamp> = failed.iter().filter(|t| *t > last_success).collect();
        BackoffRecord {
            failures_after_last_success: after.len() as u32,
            last_failure: after.last().copied().copied(),
        }
    }

    /// How long until a failed pod may be replaced.
    pub(super) fn remaining(&self, now: Timestamp) -> Duration {
        let Some(last) = self.last_failure else {
            return Duration::ZERO;
        };
        if self.failures_after_last_success == 0 {
            return Duration::ZERO;
        }
        let mut backoff = POD_FAILURE_BACKOFF;
        for _ in 1..self.failures_after_last_success {
            backoff = (backoff * 2).min(MAX_POD_FAILURE_BACKOFF);
        }
        let elapsed = Duration::try_from(now.duration_since(last)).unwrap_or(Duration::ZERO);
        backoff.saturating_sub(elapsed)
    }
}

/// When a pod finished: its last container's end, else when it stopped being ready, else its
/// deletion, else now (as kube's getFinishedTime).
pub(super) fn finished_time(pod: &Pod, now: Timestamp) -> Timestamp {
    let status = pod.status.as_ref();
    let from_containers = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0)
        .max();
    let from_ready = || {
        status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.type_ == "Ready" && c.status == "False")
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0)
    };
    from_containers
        .or_else(from_ready)
        .or_else(|| pod.metadata.deletion_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now)
}
