//! Leases (coordination.k8s.io/v1): no rules beyond the shared ones; the columns show the holder.

use super::strategy::Strategy;
use crate::api::http::table::{text, Printer};

pub struct Leases;

impl Strategy for Leases {
    fn printer(&self) -> Printer {
        Printer {
            columns: &[("Holder", "string")],
            cells: |o| vec![text(&o["spec"]["holderIdentity"])],
            ..Printer::NAME_AGE
        }
    }
}
