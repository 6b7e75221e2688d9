//! The node IPAM controller (kube-controller-manager's "range allocator"): every Node gets
//! `spec.podCIDR` and `spec.podCIDRs`, a `--node-cidr-mask-size` block of `--cluster-cidr`. What
//! is taken comes from the Nodes themselves, listed again on every (re)start, so a restarted or
//! newly elected replica never hands out a range twice; a deleted Node's range is free again.

use std::{collections::BTreeSet, net::Ipv4Addr};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    api::{Patch, PatchParams},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, ResourceExt as _,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("--cluster-cidr {0:?} is not an IPv4 CIDR (like 10.244.0.0/16)")]
    BadClusterCidr(String),
    #[error("--node-cidr-mask-size {mask} must be between the cluster CIDR's /{prefix} and /30")]
    BadMask { mask: u8, prefix: u8 },
    #[error("no free /{0} left in the cluster CIDR")]
    Exhausted(u8),
}

/// The node ranges of a cluster CIDR and which are taken.
#[derive(Debug, Clone)]
pub struct CidrSet {
    base: u32,
    prefix: u8,
    mask: u8,
    used: BTreeSet<u32>,
    /// Where the next search starts: ranges are handed out round the set, so a range just
    /// released is not the next one given (as the range allocator does).
    next: u32,
}

fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, prefix) = text.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some((ip, prefix))
}

impl CidrSet {
    pub fn new(cluster_cidr: &str, mask: u8) -> Result<Self, IpamError> {
        let (ip, prefix) = parse_cidr(cluster_cidr)
            .ok_or_else(|| IpamError::BadClusterCidr(cluster_cidr.into()))?;
        if mask < prefix || mask > 30 {
            return Err(IpamError::BadMask { mask, prefix });
        }
        let net_mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        };
        Ok(CidrSet {
            base: u32::from(ip) & net_mask,
            prefix,
            mask,
            used: BTreeSet::new(),
            next: 0,
        })
    }

    fn count(&self) -> u32 {
        1u32 << (self.mask - self.prefix).min(31)
    }

    fn cidr(&self, index: u32) -> String {
        let ip = Ipv4Addr::from(self.base + (index << (32 - self.mask)));
        format!("{ip}/{}", self.mask)
    }

    /// The index of `cidr` in this set, if it is one of its ranges.
    fn index(&self, cidr: &str) -> Option<u32> {
        let (ip, mask) = parse_cidr(cidr)?;
        let ip = u32::from(ip);
        if mask != self.mask || ip < self.base {
            return None;
        }
        let index = (ip - self.base) >> (32 - self.mask);
        (index < self.count() && self.base + (index << (32 - self.mask)) == ip).then_some(index)
    }

    /// Marks `cidr` taken; false when it is not one of this set's ranges.
    pub fn occupy(&mut self, cidr: &str) -> bool {
        match self.index(cidr) {
            Some(i) => {
                self.used.insert(i);
                true
            }
            None => false,
        }
    }

    pub fn release(&mut self, cidr: &str) {
        if let Some(i) = self.index(cidr) {
            self.used.remove(&i);
        }
    }

    pub fn allocate(&mut self) -> Result<String, IpamError> {
        let count = self.count();
        for step in 0..count {
            let i = (self.next + step) % count;
            if !self.used.contains(&i) {
                self.used.insert(i);
                self.next = (i + 1) % count;
                return Ok(self.cidr(i));
            }
        }
        Err(IpamError::Exhausted(self.mask))
    }

    pub fn used(&self) -> usize {
        self.used.len()
    }
}

fn pod_cidrs(node: &Node) -> Vec<String> {
    let spec = node.spec.as_ref();
    let mut out: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if let Some(c) = spec.and_then(|s| s.pod_cidr.clone()) {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// Runs the controller until the Node watch ends: gives every Node without a range one.
pub async fn run(client: Client, mut set: CidrSet, shutdown: CancellationToken) {
    let nodes: Api<Node> = Api::all(client);
    let mut events = watcher(nodes.clone(), watcher::Config::default())
        .default_backoff()
        .take_until(shutdown.cancelled_owned())
        .boxed();
    let template = set.clone();
    let mut listing: Vec<Node> = Vec::new();
    let mut listed = false;
    let mut waiting: BTreeSet<String> = BTreeSet::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                warn!("watching Nodes: {e}");
                continue;
            }
        };
        let pending: Vec<Node> = match event {
            watcher::Event::Init => {
                listing.clear();
                Vec::new()
            }
            watcher::Event::InitApply(n) => {
                listing.push(n);
                Vec::new()
            }
            watcher::Event::InitDone => {
                // What is taken is what the Nodes hold, every time the list is read again.
                set = template.clone();
                for n in &listing {
                    for c in pod_cidrs(n) {
                        if !set.occupy(&c) {
                            warn!(node = %n.name_any(), cidr = %c, "a podCIDR outside --cluster-cidr; left as it is");
                        }
                    }
                }
                listed = true;
                info!(
                    nodes = listing.len(),
                    taken = set.used(),
                    "node IPAM: ranges read from the Nodes"
                );
                std::mem::take(&mut listing)
            }
            watcher::Event::Apply(n) => {
                for c in pod_cidrs(&n) {
                    set.occupy(&c);
                }
                vec![n]
            }
            watcher::Event::Delete(n) => {
                waiting.remove(&n.name_any());
                let mut freed = false;
                for c in pod_cidrs(&n) {
                    set.release(&c);
                    freed = true;
                    info!(node = %n.name_any(), cidr = %c, "node IPAM: range released");
                }
                // Nodes that found the set full get the freed range.
                let mut retry = Vec::new();
                if freed {
                    for name in waiting.clone() {
                        match nodes.get_opt(&name).await {
                            Ok(Some(node)) => retry.push(node),
                            Ok(None) => {
                                waiting.remove(&name);
                            }
                            Err(e) => warn!(node = %name, "node IPAM: reading the Node: {e}"),
                        }
                    }
                }
                retry
            }
        };
        if !listed {
            continue;
        }
        for node in pending.into_iter().filter(|n| pod_cidrs(n).is_empty()) {
            let name = node.name_any();
            let cidr = match set.allocate() {
                Ok(c) => c,
                Err(e) => {
                    warn!(node = %name, "node IPAM: {e}; the Node waits for a range to be freed");
                    waiting.insert(name);
                    continue;
                }
            };
            waiting.remove(&name);
            let patch = serde_json::json!({"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}});
            match nodes
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => info!(node = %name, %cidr, "node IPAM: range given"),
                Err(e) => {
                    // The Node changed meanwhile (or is gone): its next event decides again.
                    set.release(&cidr);
                    warn!(node = %name, %cidr, "node IPAM: setting podCIDR failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_the_set_and_are_never_given_twice() {
        let mut set = CidrSet::new("10.244.0.0/16", 24).unwrap();
        assert!(set.occupy("10.244.0.0/24"));
        assert_eq!(set.allocate().unwrap(), "10.244.1.0/24");
        assert_eq!(set.allocate().unwrap(), "10.244.2.0/24");
        set.release("10.244.1.0/24");
        assert_eq!(
            set.allocate().unwrap(),
            "10.244.3.0/24",
            "not the one just freed"
        );
        assert!(!set.occupy("10.245.0.0/24"));
        assert!(!set.occupy("10.244.0.0/25"));
        assert!(!set.occupy("10.244.0.128/24"));
        let mut small = CidrSet::new("10.0.0.0/30", 30).unwrap();
        assert_eq!(small.allocate().unwrap(), "10.0.0.0/30");
        assert_eq!(small.allocate(), Err(IpamError::Exhausted(30)));
        assert_eq!(
            CidrSet::new("10.244.0.0/16", 8).unwrap_err(),
            IpamError::BadMask {
                mask: 8,
                prefix: 16
            }
        );
        assert!(CidrSet::new("10.244.0.0", 24).is_err());
    }
}
