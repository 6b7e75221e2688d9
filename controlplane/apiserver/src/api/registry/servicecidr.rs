//! The service ranges (ServiceCIDR: one range, or two of different families, that may gain its
//! other family but never change one) and the allocator's record of each cluster IP (IPAddress:
//! named by the address, immutable), as networking.k8s.io/v1 has them.

use serde_json::{json, Value};

use super::{
    alloc::IpRange,
    strategy::{immutable, invalid, required, Causes, Strategy},
};
use crate::api::{http::table::Printer, status::ApiError};

pub struct ServiceCidrs;

impl Strategy for ServiceCidrs {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        let causes = validate_service_cidr(&object["spec"]);
        invalid("ServiceCIDR", object, causes)?;
        // Ready is the service-cidr controller's to say.
        object["status"] = json!({});
        Ok(())
    }

    /// A range may gain its other family; it never loses or changes one.
    fn prepare_update(&self, current: &Value, new: &mut Value) -> Result<(), ApiError> {
        let (old, sent) = (&current["spec"]["cidrs"], &new["spec"]["cidrs"]);
        let grows = old.as_array().is_some_and(|o| o.len() == 1)
            && sent
                .as_array()
                .is_some_and(|n| n.len() == 2 && n[0] == old[0]);
        let mut causes = validate_service_cidr(&new["spec"]);
        if sent != old && !grows {
            causes.push((
                "spec.cidrs".into(),
                format!("Invalid value: {sent}: field is immutable"),
            ));
        }
        invalid("ServiceCIDR", new, causes)
    }

    /// kube-apiserver's columns: NAME CIDRS AGE.
    fn printer(&self) -> Printer {
        Printer {
            columns: &[("CIDRs", "string")],
            cells: |o| {
                let cidrs: Vec<&str> = o["spec"]["cidrs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                vec![json!(cidrs.join(","))]
            },
            ..Printer::NAME_AGE
        }
    }
}

pub struct IpAddresses;

impl Strategy for IpAddresses {
    fn prepare_create(&self, object: &mut Value) -> Result<(), ApiError> {
        let causes = validate_ip_address(object);
        invalid("IPAddress", object, causes)
    }

    fn prepare_update(&self, current: &Value, new: &mut Value) -> Result<(), ApiError> {
        if new["spec"] != current["spec"] {
            return immutable("IPAddress", new, "spec.parentRef");
        }
        Ok(())
    }

    /// kube-apiserver's columns: NAME PARENTREF AGE.
    fn printer(&self) -> Printer {
        Printer {
            columns: &[("ParentRef", "string")],
            cells: |o| {
                let p = &o["spec"]["parentRef"];
                let resource = match p["group"].as_str().unwrap_or_default() {
                    "" => p["resource"].as_str().unwrap_or_default().to_string(),
                    group => format!("{}.{group}", p["resource"].as_str().unwrap_or_default()),
                };
                vec![json!(format!(
                    "{resource}/{}/{}",
                    p["namespace"].as_str().unwrap_or_default(),
                    p["name"].as_str().unwrap_or_default()
                ))]
            },
            ..Printer::NAME_AGE
        }
    }
}

/// A ServiceCIDR's `spec.cidrs`: one range, or two of different families.
fn validate_service_cidr(spec: &Value) -> Causes {
    let mut causes = Causes::new();
    let cidrs: Vec<&str> = spec["cidrs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if cidrs.is_empty() {
        required(&mut causes, "spec.cidrs");
    }
    if cidrs.len() > 2 {
        causes.push((
            "spec.cidrs".into(),
            format!("Too many: {}: must have at most 2 items", cidrs.len()),
        ));
    }
    let mut families = Vec::new();
    for (i, cidr) in cidrs.iter().enumerate() {
        match IpRange::parse(cidr) {
            Ok(range) if families.contains(&range.family()) => causes.push((
                "spec.cidrs".into(),
                format!("Invalid value: {cidrs:?}: may specify no more than one IP for each IP family, i.e 192.168.0.0/24 and 2001:db8::/64"),
            )),
            Ok(range) => families.push(range.family()),
            Err(e) => causes.push((
                format!("spec.cidrs[{i}]"),
                format!("Invalid value: {cidr:?}: {e}"),
            )),
        }
    }
    causes
}

/// An IPAddress: named by an address in canonical form, with a parentRef.
fn validate_ip_address(object: &Value) -> Causes {
    let mut causes = Causes::new();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.to_string() == name => {}
        Ok(ip) => causes.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: must be a canonical format IP address ({ip})"),
        )),
        Err(_) => causes.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: must be a valid IP address"),
        )),
    }
    let parent = &object["spec"]["parentRef"];
    if !parent.is_object() {
        required(&mut causes, "spec.parentRef");
    } else {
        for field in ["resource", "name"] {
            if parent[field].as_str().is_none_or(str::is_empty) {
                required(&mut causes, &format!("spec.parentRef.{field}"));
            }
        }
    }
    causes
}
