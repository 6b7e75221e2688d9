//! Endpoints and EndpointSlices: a slice's address type checked and its endpoints list always
//! present, and the columns of both (endpoint lists abbreviated as kubectl does).

use serde_json::{json, Value};

use super::strategy::{invalid, required, Causes, Strategy};
use crate::api::{
    http::table::{abbreviate, text, Printer},
    status::ApiError,
};

pub struct Endpoints;

impl Strategy for Endpoints {
    fn printer(&self) -> Printer {
        Printer {
            columns: &[("Endpoints", "string")],
            cells: |o| {
                let mut out = Vec::new();
                for subset in o["subsets"].as_array().into_iter().flatten() {
                    for a in subset["addresses"].as_array().into_iter().flatten() {
                        for p in subset["ports"].as_array().into_iter().flatten() {
                            out.push(format!(
                                "{}:{}",
                                a["ip"].as_str().unwrap_or_default(),
                                p["port"]
                            ));
                        }
                    }
                }
                vec![json!(abbreviate(out))]
            },
            ..Printer::NAME_AGE
        }
    }
}

pub struct EndpointSlices;

impl Strategy for EndpointSlices {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        let mut causes = Causes::new();
        match object["addressType"].as_str() {
            Some("IPv4" | "IPv6" | "FQDN") => {}
            Some(other) => causes.push((
                "addressType".into(),
                format!(
                    "Unsupported value: {other:?}: supported values: \"FQDN\", \"IPv4\", \"IPv6\""
                ),
            )),
            None => required(&mut causes, "addressType"),
        }
        if !object["endpoints"].is_array() {
            object["endpoints"] = json!([]);
        }
        invalid("EndpointSlice", object, causes)
    }

    fn printer(&self) -> Printer {
        Printer {
            columns: &[
                ("AddressType", "string"),
                ("Ports", "string"),
                ("Endpoints", "string"),
            ],
            cells: |o| {
                let ports: Vec<String> = o["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| p["port"].to_string())
                    .collect();
                let addresses: Vec<String> = o["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                    .filter_map(|a| a.as_str().map(str::to_string))
                    .collect();
                vec![
                    text(&o["addressType"]),
                    json!(abbreviate(ports)),
                    json!(abbreviate(addresses)),
                ]
            },
            ..Printer::NAME_AGE
        }
    }
}
