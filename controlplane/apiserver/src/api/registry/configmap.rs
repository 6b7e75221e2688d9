//! ConfigMaps: no rules beyond the shared ones; the columns count both kinds of data.

use serde_json::json;

use super::strategy::Strategy;
use crate::api::http::table::{count, Printer};

pub struct ConfigMaps;

impl Strategy for ConfigMaps {
    fn printer(&self) -> Printer {
        Printer {
            columns: &[("Data", "integer")],
            cells: |o| vec![json!(count(&o["data"]) + count(&o["binaryData"]))],
            ..Printer::NAME_AGE
        }
    }
}
