//! The controllers' own metric, `seine_controller_syncs_total{controller,result}`, in the
//! process's registry (seine-component-base's, which the daemon's `/metrics` serves).

use std::sync::LazyLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};

pub use seine_component_base::metrics::register;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub controller: String,
    /// `success` or `error`.
    pub result: String,
}

static SYNCS: LazyLock<Family<SyncLabels, Counter>> = LazyLock::new(|| {
    let syncs = Family::<SyncLabels, Counter>::default();
    register(
        "seine_controller_syncs",
        "Objects reconciled, by controller and result",
        syncs.clone(),
    );
    syncs
});

/// Counts one reconcile of `controller`.
pub fn synced(controller: &str, ok: bool) {
    SYNCS
        .get_or_create(&SyncLabels {
            controller: controller.to_string(),
            result: if ok { "success" } else { "error" }.to_string(),
        })
        .inc();
}
