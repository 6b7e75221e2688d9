//! Indexed Jobs: a pod's completion index, and the intervals of `status.completedIndexes`.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use tracing::warn;

use super::COMPLETION_INDEX_KEY;

/// A pod's completion index, from its annotation (kube's getCompletionIndex).
pub(super) fn completion_index(pod: &Pod) -> Option<i32> {
    pod.annotations()
        .get(COMPLETION_INDEX_KEY)?
        .parse::<i32>()
        .ok()
        .filter(|i| *i >= 0)
}

/// Completion indexes as `status.completedIndexes` writes them (`"0-2,4,6-7"`): sorted,
/// disjoint, non-adjacent inclusive intervals, so a million indexes stay one short string.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct IndexIntervals(Vec<(i32, i32)>);

impl IndexIntervals {
    /// Reads the status field, keeping only indexes below `completions`; malformed parts are
    /// dropped (kube's parseIndexesFromString).
    pub(super) fn parse(text: &str, completions: i32) -> Self {
        let mut intervals = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bounds = match part.split_once('-') {
                Some((first, last)) => first.parse::<i32>().ok().zip(last.parse::<i32>().ok()),
                None => part.parse::<i32>().ok().map(|i| (i, i)),
            };
            let Some((first, last)) = bounds else {
                warn!(
                    part,
                    "job controller: ignoring a malformed part of completedIndexes"
                );
                continue;
            };
            if first < 0 || last < first || first >= completions {
                continue;
            }
            intervals.push((first, last.min(completions - 1)));
        }
        IndexIntervals(intervals).merged()
    }

    /// These intervals with `indexes` added.
    pub(super) fn with(&self, indexes: impl IntoIterator<Item = i32>) -> Self {
        let mut intervals = self.0.clone();
        intervals.extend(indexes.into_iter().map(|i| (i, i)));
        IndexIntervals(intervals).merged()
    }

    pub(super) fn merged(mut self) -> Self {
        self.0.sort_unstable();
        let mut out: Vec<(i32, i32)> = Vec::with_capacity(self.0.len());
        for (first, last) in self.0 {
            match out.last_mut() {
                Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
                _ => out.push((first, last)),
            }
        }
        IndexIntervals(out)
    }

    pub(super) fn contains(&self, index: i32) -> bool {
        let at = self.0.partition_point(|(_, last)| *last < index);
        self.0.get(at).is_some_and(|(first, _)| *first <= index)
    }

    pub(super) fn total(&self) -> i32 {
        self.0.iter().map(|(first, last)| last - first + 1).sum()
    }
}

impl std::fmt::Display for IndexIntervals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, (first, last)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        Ok(())
    }
}

/// The lowest `count` indexes below `completions` neither succeeded nor `taken` by a pod
/// (kube's firstPendingIndexes).
pub(super) fn first_pending_indexes(
    succeeded: &IndexIntervals,
    taken: &HashSet<i32>,
    count: usize,
    completions: i32,
) -> Vec<i32> {
    (0..completions)
        .filter(|i| !succeeded.contains(*i) && !taken.contains(i))
        .take(count)
        .collect()
}
