//! The CNI protocol (spec 1.1.0): the versions a plugin speaks, the error codes and error JSON,
//! and the version negotiation (`VERSION`, `cniVersion`, `cniVersions`).

use serde::Serialize;
use serde_json::{json, Value};

/// The spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
pub const LATEST_VERSION: &str = "1.1.0";

/// The error codes the CNI spec reserves (§ "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    ContainerUnknown = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidNetworkConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin is not available to add containers.
    PluginNotAvailable = 50,
    /// STATUS: the plugin is limited (e.g. no addresses left).
    PluginLimited = 51,
    /// Seine's own (100 and up are the plugin's): CHECK found the container's network differs
    /// from what ADD set up.
    CheckFailed = 100,
}

/// A CNI error: printed to stdout as the spec's error JSON, with a non-zero exit status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error JSON of the spec, in the version the caller asked for.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code as u32, "msg": self.msg,
               "details": self.details})
    }
}

/// Parses "a.b.c" into numbers, for ordering versions.
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    let version = (
        parts.next()??,
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
    );
    parts.next().is_none().then_some(version)
}

/// A version's place in the order of versions ("0.0.0" for what is not one).
pub fn version_key(v: &str) -> (u32, u32, u32) {
    parse_version(v).unwrap_or_default()
}

/// The `cniVersion` a caller's stdin asks for, if it can be read.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(stdin)
        .ok()?
        .get("cniVersion")?
        .as_str()
        .map(str::to_string)
}

/// Whether this plugin speaks `version`.
pub fn supports(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

/// The version to answer in: the configuration's `cniVersion` (a runtime writes the version it
/// negotiated there for each plugin), which this plugin must speak; a configuration that has only
/// `cniVersions` (a conflist read as it is) gets the highest one both sides speak.
pub fn negotiate(config: &Value) -> Result<String, CniError> {
    match config.get("cniVersion").and_then(Value::as_str) {
        Some(v) if supports(v) => return Ok(v.to_string()),
        Some(v) => {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI versions",
                format!("config is {v:?}, plugin supports {SUPPORTED_VERSIONS:?}"),
            ))
        }
        None => {}
    }
    let Some(list) = config.get("cniVersions").and_then(Value::as_array) else {
        return Err(CniError::new(
            Code::InvalidNetworkConfig,
            "invalid network configuration",
            "cniVersion is required",
        ));
    };
    list.iter()
        .filter_map(Value::as_str)
        .filter(|v| supports(v))
        .max_by_key(|v| parse_version(v))
        .map(str::to_string)
        .ok_or_else(|| {
            CniError::new(
                Code::IncompatibleVersion,
                "incompatible CNI versions",
                format!(
                    "the configuration asks for {list:?}; this plugin supports {SUPPORTED_VERSIONS:?}"
                ),
            )
        })
}

/// The answer to `VERSION`: the versions this plugin speaks.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub cni_version: String,
    pub supported_versions: Vec<&'static str>,
}

pub fn version_info(requested: Option<&str>) -> VersionInfo {
    VersionInfo {
        cni_version: requested
            .filter(|v| supports(v))
            .unwrap_or(LATEST_VERSION)
            .to_string(),
        supported_versions: SUPPORTED_VERSIONS.to_vec(),
    }
}

/// Parses a network configuration from stdin: a JSON object (error code 6 when it is not JSON,
/// 7 when it is not a usable configuration).
pub fn parse_config(bytes: &[u8]) -> Result<Value, CniError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            Code::DecodeFailure,
            "failed to decode the network configuration",
            e.to_string(),
        )
    })?;
    if !value.is_object() {
        return Err(CniError::new(
            Code::InvalidNetworkConfig,
            "invalid network configuration",
            "the configuration must be a JSON object",
        ));
    }
    for field in ["name", "type"] {
        if value
            .get(field)
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(CniError::new(
                Code::InvalidNetworkConfig,
                "invalid network configuration",
                format!("{field:?} is required"),
            ));
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_negotiate_to_the_best_common_one() {
        assert_eq!(negotiate(&json!({"cniVersion": "1.0.0"})).unwrap(), "1.0.0");
        assert_eq!(
            negotiate(&json!({"cniVersions": ["0.3.1", "1.0.0", "1.1.0", "2.0.0"]})).unwrap(),
            "1.1.0"
        );
        assert_eq!(
            negotiate(&json!({"cniVersion": "1.0.0", "cniVersions": ["1.0.0", "1.1.0"]})).unwrap(),
            "1.0.0",
            "the runtime's choice for this plugin"
        );
        assert_eq!(
            negotiate(&json!({"cniVersions": ["0.3.1", "2.0.0"]}))
                .unwrap_err()
                .code,
            Code::IncompatibleVersion
        );
        let old = negotiate(&json!({"cniVersion": "0.3.1"})).unwrap_err();
        assert_eq!(old.code, Code::IncompatibleVersion);
        assert_eq!(
            negotiate(&json!({})).unwrap_err().code,
            Code::InvalidNetworkConfig
        );
        assert_eq!(version_info(Some("0.4.0")).cni_version, "0.4.0");
        assert_eq!(version_info(Some("9.9.9")).cni_version, LATEST_VERSION);
    }

    #[test]
    fn bad_configurations_get_the_spec_codes() {
        assert_eq!(
            parse_config(b"{nope").unwrap_err().code,
            Code::DecodeFailure
        );
        assert_eq!(
            parse_config(b"[1]").unwrap_err().code,
            Code::InvalidNetworkConfig
        );
        let missing = parse_config(br#"{"cniVersion":"1.1.0","type":"seine-cni"}"#).unwrap_err();
        assert_eq!(missing.code, Code::InvalidNetworkConfig);
        assert!(missing.details.contains("name"));
        let error = CniError::new(Code::IoFailure, "m", "d").to_json("1.1.0");
        assert_eq!(
            error,
            json!({"cniVersion": "1.1.0", "code": 5, "msg": "m", "details": "d"})
        );
    }
}
