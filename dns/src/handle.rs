//! The cluster view the query path answers from, swapped whole when the watches (`sync`) build a
//! new one.

use std::sync::{
    atomic::{AtomicBool, AtomicU32, Ordering},
    Arc, RwLock,
};

use crate::cluster::ClusterView;

/// The current view, shared with the query path.
#[derive(Clone, Default)]
pub struct ViewHandle {
    pub(crate) view: Arc<RwLock<Arc<ClusterView>>>,
    pub(crate) synced: Arc<AtomicBool>,
    serial: Arc<AtomicU32>,
}

impl ViewHandle {
    /// The view answers come from (a cheap clone of a shared pointer).
    pub fn current(&self) -> Arc<ClusterView> {
        self.view
            .read()
            .map(|v| v.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Whether every watch has listed once (CoreDNS answers SERVFAIL until then).
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::SeqCst)
    }

    /// The SOA serial: when the view last changed (Unix seconds).
    pub fn serial(&self) -> u32 {
        self.serial.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, view: ClusterView) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        self.serial.store(now, Ordering::Relaxed);
        match self.view.write() {
            Ok(mut v) => *v = Arc::new(view),
            Err(e) => *e.into_inner() = Arc::new(view),
        }
    }

    /// A view that never changes, already synced (the fuzz target and benches answer from one).
    pub fn fixed(mut view: ClusterView) -> Self {
        view.index_addresses();
        let handle = ViewHandle::default();
        handle.set(view);
        handle.synced.store(true, Ordering::SeqCst);
        handle
    }
}
