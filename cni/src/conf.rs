//! A node's network configuration list, as seine-agent writes it (`10-seine.conflist`) and this
//! plugin reads its own entry back ([`crate::plugin::Config`]): the keys live here once.
//!
//! The list holds seine-cni first, with the node's pod CIDR and the overlay's MTU and device,
//! handling hostPorts itself (the `portMappings` capability) unless `portmap` is chained; then
//! the chained plugins. `cniVersions` are the versions every plugin of the chain speaks, and
//! `cniVersion` the highest of them up to 1.0.0, for runtimes that predate `cniVersions`.

use std::path::Path;

use seine_apimachinery::cidr::Ipv4Cidr;
use serde_json::{json, Value};

use crate::spec;

/// seine-cni's `type`, the binary's name.
pub const PLUGIN_TYPE: &str = "seine-cni";
/// The keys of seine-cni's entry.
pub const POD_CIDR: &str = "podCIDR";
pub const MTU: &str = "mtu";
pub const VXLAN_DEVICE: &str = "vxlanDevice";
pub const DATA_DIR: &str = "dataDir";
pub const BPFFS_DIR: &str = "bpffsDir";

/// What a node's conflist is made of.
#[derive(Debug, Clone)]
pub struct NodeConf<'a> {
    /// The network's `name`.
    pub network: &'a str,
    pub pod_cidr: Ipv4Cidr,
    pub mtu: u32,
    pub vxlan_device: &'a str,
    pub data_dir: &'a Path,
    pub bpffs_dir: &'a Path,
    /// Plugins chained after seine-cni, by type.
    pub chain: &'a [String],
    /// The CNI versions every plugin of the chain speaks.
    pub versions: &'a [String],
}

impl NodeConf<'_> {
    /// The conflist as JSON.
    pub fn conflist(&self) -> Value {
        let portmap_chained = self.chain.iter().any(|t| t == "portmap");
        let mut seine = json!({
            "type": PLUGIN_TYPE,
            POD_CIDR: self.pod_cidr.to_string(),
            MTU: self.mtu,
            VXLAN_DEVICE: self.vxlan_device,
            DATA_DIR: self.data_dir,
            BPFFS_DIR: self.bpffs_dir,
        });
        if !portmap_chained {
            seine["capabilities"] = json!({"portMappings": true});
        }
        let mut plugins = vec![seine];
        plugins.extend(self.chain.iter().map(|t| match t.as_str() {
            "portmap" => json!({"type": t, "capabilities": {"portMappings": true}}),
            "bandwidth" => json!({"type": t, "capabilities": {"bandwidth": true}}),
            _ => json!({"type": t}),
        }));
        let legacy = self
            .versions
            .iter()
            .rev()
            .find(|v| spec::version_key(v) <= spec::version_key("1.0.0"))
            .or(self.versions.first());
        json!({
            "cniVersion": legacy,
            "cniVersions": self.versions,
            "name": self.network,
            "plugins": plugins,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::Config;

    fn versions(list: &[&str]) -> Vec<String> {
        list.iter().map(|v| v.to_string()).collect()
    }

    fn node<'a>(chain: &'a [String], versions: &'a [String]) -> NodeConf<'a> {
        NodeConf {
            network: "seine",
            pod_cidr: Ipv4Cidr::parse("10.244.1.0/24").unwrap(),
            mtu: 1450,
            vxlan_device: "seine.vxlan",
            data_dir: Path::new("/var/lib/cni/seine"),
            bpffs_dir: Path::new("/sys/fs/bpf/seine"),
            chain,
            versions,
        }
    }

    #[test]
    fn the_default_conflist_handles_host_ports_itself_and_needs_no_other_plugin() {
        let all = versions(&spec::SUPPORTED_VERSIONS);
        let list = node(&[], &all).conflist();
        let plugins = list["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 1, "{list}");
        assert_eq!(plugins[0]["type"], "seine-cni");
        assert_eq!(plugins[0]["capabilities"]["portMappings"], true);
        assert_eq!(list["cniVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
        assert_eq!(list["cniVersion"], "1.0.0");

        // Chaining portmap leaves hostPorts to it, and only common versions are offered.
        let chain = versions(&["portmap"]);
        let common = versions(&["0.4.0", "1.0.0"]);
        let chained = node(&chain, &common).conflist();
        let plugins = chained["plugins"].as_array().unwrap();
        assert!(plugins[0].get("capabilities").is_none(), "{chained}");
        assert_eq!(plugins[1]["type"], "portmap");
        assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
        assert_eq!(chained["cniVersions"], json!(["0.4.0", "1.0.0"]));
    }

    #[test]
    fn the_plugin_reads_back_what_the_agent_writes() {
        let all = versions(&spec::SUPPORTED_VERSIONS);
        let list = node(&[], &all).conflist();
        // A runtime hands each plugin its entry with the list's name and version.
        let mut entry = list["plugins"][0].clone();
        entry["name"] = list["name"].clone();
        entry["cniVersion"] = json!("1.1.0");
        let config = Config::parse(&serde_json::to_vec(&entry).unwrap()).unwrap();
        assert_eq!(config.pod_cidr.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(config.mtu, Some(1450));
        assert_eq!(config.vxlan_device.as_deref(), Some("seine.vxlan"));
        assert_eq!(config.data_dir, Path::new("/var/lib/cni/seine"));
        assert_eq!(config.bpffs_dir, Path::new("/sys/fs/bpf/seine"));
        assert_eq!(config.name, "seine");
    }
}
