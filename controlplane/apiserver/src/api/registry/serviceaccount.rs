//! ServiceAccounts: no rules beyond the shared ones; the columns count their token Secrets.
//! Their tokens are `security::sa_token`'s.

use serde_json::json;

use super::strategy::Strategy;
use crate::api::http::table::Printer;

pub struct ServiceAccounts;

impl Strategy for ServiceAccounts {
    fn printer(&self) -> Printer {
        Printer {
            columns: &[("Secrets", "integer")],
            cells: |o| vec![json!(o["secrets"].as_array().map_or(0, Vec::len))],
            ..Printer::NAME_AGE
        }
    }
}
