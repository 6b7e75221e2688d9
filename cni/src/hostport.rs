//! A pod's `hostPort`s, as seine-cni records them for the agent: the runtime hands the plugin the
//! pod's `portMappings` (the capability its conflist declares), and the plugin writes them down,
//! one file per attachment, written whole. The agent reads the records and programs each mapping
//! in its datapath.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The records' directory under the plugin's data directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("hostports")
}

/// One `portMappings` entry, as the CNI conventions write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// Lower case: `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// Only this node address; every node address when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<Ipv4Addr>,
}

/// What the plugin records for one attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub pod_ip: Ipv4Addr,
    pub port_mappings: Vec<PortMapping>,
}

/// The `portMappings` of a configuration's `runtimeConfig`, checked: none when absent.
pub fn from_runtime_config(config: &Value) -> Result<Vec<PortMapping>, String> {
    let Some(list) = config
        .get("runtimeConfig")
        .and_then(|r| r.get("portMappings"))
    else {
        return Ok(Vec::new());
    };
    if list.is_null() {
        return Ok(Vec::new());
    }
    let list = list
        .as_array()
        .ok_or_else(|| format!("runtimeConfig.portMappings must be a list, not {list}"))?;
    list.iter()
        .map(|m| {
            let port = |key: &str| -> Result<u16, String> {
                m.get(key)
                    .and_then(Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("a port mapping needs {key} from 1 to 65535: {m}"))
            };
            let protocol = match m.get("protocol") {
                None | Some(Value::Null) => "tcp".to_string(),
                Some(Value::String(p)) => p.to_ascii_lowercase(),
                Some(other) => {
                    return Err(format!(
                        "a port mapping's protocol must be a string: {other}"
                    ))
                }
            };
            if !["tcp", "udp", "sctp"].contains(&protocol.as_str()) {
                return Err(format!(
                    "a port mapping's protocol is tcp, udp or sctp, not {protocol:?}"
                ));
            }
            let host_ip = match m.get("hostIP").and_then(Value::as_str) {
                None | Some("") | Some("0.0.0.0") => None,
                Some(text) => match text.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) => Some(ip),
                    // The datapath is IPv4 only; an IPv6 host address has nothing to bind here.
                    Ok(IpAddr::V6(_)) => {
                        return Err(format!(
                            "hostIP {text}: IPv6 host ports are not supported yet"
                        ))
                    }
                    Err(_) => return Err(format!("hostIP {text:?} is not an IP address")),
                },
            };
            Ok(PortMapping {
                host_port: port("hostPort")?,
                container_port: port("containerPort")?,
                protocol,
                host_ip,
            })
        })
        .collect()
}

fn record_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// Writes the record of an attachment under `name` (unique per attachment), whole: the agent
/// reads the old file or the new one. No mappings: the record is removed.
pub fn write(dir: &Path, name: &str, record: &Record) -> std::io::Result<()> {
    if record.port_mappings.is_empty() {
        return remove(dir, name);
    }
    std::fs::create_dir_all(dir)?;
    let path = record_path(dir, name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(record).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// Removes the record of `name`; none is fine.
pub fn remove(dir: &Path, name: &str) -> std::io::Result<()> {
    match std::fs::remove_file(record_path(dir, name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn read_record(path: &Path) -> Result<Record, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// The record of `name`; none when there is no file (or it does not read).
pub fn read(dir: &Path, name: &str) -> Option<Record> {
    read_record(&record_path(dir, name)).ok()
}

/// Every record in `dir` with its name, in name order; files that do not read are reported and
/// skipped (one broken file never hides the others).
pub fn read_all(dir: &Path) -> (Vec<(String, Record)>, Vec<String>) {
    let mut records = Vec::new();
    let mut problems = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (records, problems);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.starts_with('.'))
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        match read_record(&path) {
            Ok(record) => records.push((name.to_string(), record)),
            Err(e) => problems.push(format!("{}: {e}", path.display())),
        }
    }
    records.sort_by(|a, b| a.0.cmp(&b.0));
    (records, problems)
}

/// A fingerprint of the records' files (names, sizes, modification times), to notice changes
/// without reading them.
pub fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<std::time::SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mapping(host_port: u16, container_port: u16, protocol: &str) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol: protocol.into(),
            host_ip: None,
        }
    }

    #[test]
    fn port_mappings_are_read_as_the_cni_conventions_write_them() {
        let config = json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "TCP"},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "192.168.1.5"},
            {"hostPort": 9000, "containerPort": 9000, "hostIP": "0.0.0.0"},
        ]}});
        let got = from_runtime_config(&config).unwrap();
        assert_eq!(got[0], mapping(8080, 80, "tcp"));
        assert_eq!(got[1].host_ip, Some(Ipv4Addr::new(192, 168, 1, 5)));
        assert_eq!(got[2], mapping(9000, 9000, "tcp"));
        assert!(from_runtime_config(&json!({})).unwrap().is_empty());
        assert!(from_runtime_config(&json!({"runtimeConfig": {}}))
            .unwrap()
            .is_empty());
        for bad in [
            json!({"portMappings": {"hostPort": 1}}),
            json!({"portMappings": [{"hostPort": 0, "containerPort": 80}]}),
            json!({"portMappings": [{"hostPort": 70000, "containerPort": 80}]}),
            json!({"portMappings": [{"containerPort": 80}]}),
            json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]}),
            json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "nope"}]}),
        ] {
            let config = json!({ "runtimeConfig": bad });
            assert!(from_runtime_config(&config).is_err(), "{config}");
        }
    }

    #[test]
    fn records_are_written_whole_read_back_and_removed() {
        let dir = std::env::temp_dir().join(format!("seine-hostport-{}", std::process::id()));
        let record = Record {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            pod_ip: Ipv4Addr::new(10, 244, 1, 5),
            port_mappings: vec![mapping(8080, 80, "tcp")],
        };
        write(&dir, "lxc1", &record).unwrap();
        std::fs::write(dir.join("broken.json"), b"{").unwrap();
        let before = fingerprint(&dir);
        let (records, problems) = read_all(&dir);
        assert_eq!(records, [("lxc1".to_string(), record.clone())]);
        assert_eq!(read(&dir, "lxc1"), Some(record.clone()));
        assert_eq!(read(&dir, "lxc2"), None);
        assert_eq!(problems.len(), 1);
        write(
            &dir,
            "lxc1",
            &Record {
                port_mappings: Vec::new(),
                ..record
            },
        )
        .unwrap();
        assert_ne!(fingerprint(&dir), before);
        assert!(read_all(&dir).0.is_empty());
        remove(&dir, "lxc1").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
