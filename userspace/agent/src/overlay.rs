//! The VXLAN overlay: one VXLAN device per node, and for every other node a forwarding entry to
//! its VTEP, a neighbour entry for its gateway and a route to its pod CIDR, as Flannel's vxlan
//! backend lays them out. A node publishes its VTEP (address and MAC) on its Node object.
//!
//! Node `n` with pod CIDR `P` (network address `p0`) and VTEP `ip`/`mac`, seen from another node:
//!   fdb:   mac dev seine.vxlan dst ip self permanent
//!   neigh: p0 lladdr mac dev seine.vxlan permanent
//!   route: P via p0 dev seine.vxlan onlink
//! The local device holds its own `p0`/32, the source of the node's own traffic into the overlay.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::Node;
use netlink_packet_route::{link::LinkMessage, neighbour::NeighbourState};
use rtnetlink::Handle;
use seine_apimachinery::cidr::Ipv4Cidr;

use seine_netlink::{self as net, vxlan, NetError};

/// The annotations a node publishes its VTEP in (as Flannel's `backend-data` and `public-ip`).
pub const ANNOTATION_VTEP_IP: &str = "seine.io/vtep-ip";
pub const ANNOTATION_VTEP_MAC: &str = "seine.io/vtep-mac";
pub const DEFAULT_DEVICE: &str = "seine.vxlan";
pub const DEFAULT_VNI: u32 = 1;
/// The Linux kernel's (and Flannel's) VXLAN port; IANA's is 4789.
pub const DEFAULT_PORT: u16 = 8472;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// The node's underlay address: the outer source of encapsulated packets.
    pub local: Ipv4Addr,
    /// The uplink's MTU minus the VXLAN overhead.
    pub mtu: u32,
}

/// Another node as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub node: String,
    pub pod_cidr: Ipv4Cidr,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

/// The peers among `nodes`: every node but `own` with a pod CIDR and a published VTEP. Nodes
/// without them yet are skipped (they join once they publish).
pub fn peers(nodes: &[Node], own: &str) -> Vec<Peer> {
    let mut out: Vec<Peer> = nodes
        .iter()
        .filter_map(|node| {
            let name = node.metadata.name.as_deref()?;
            if name == own || node.metadata.deletion_timestamp.is_some() {
                return None;
            }
            let annotations = node.metadata.annotations.as_ref()?;
            let pod_cidr = Ipv4Cidr::parse(node.spec.as_ref()?.pod_cidr.as_deref()?)?;
            Some(Peer {
                node: name.to_string(),
                pod_cidr,
                vtep_ip: annotations.get(ANNOTATION_VTEP_IP)?.parse().ok()?,
                vtep_mac: net::parse_mac(annotations.get(ANNOTATION_VTEP_MAC)?)?,
            })
        })
        .collect();
    out.sort();
    out
}

/// The device's MAC: locally administered, derived from the VTEP address, so that a device
/// recreated (after a reboot or by hand) keeps the MAC its peers know.
pub fn vtep_mac(local: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = local.octets();
    [0x02, 0x53, a, b, c, d]
}

/// Creates the device as `device` says (recreating one whose VNI, port or local address differ),
/// gives it its MTU, the pod CIDR's network address and brings it up. Returns its MAC, which a
/// restart keeps (an existing matching device is reused).
pub async fn ensure_device(
    handle: &Handle,
    device: &Device,
    pod_cidr: Ipv4Cidr,
) -> Result<[u8; 6], NetError> {
    let wanted = vxlan::Settings {
        vni: device.vni,
        port: device.port,
        local: Some(device.local),
    };
    if let Some(link) = net::link(handle, &device.name).await? {
        if vxlan::settings(&link) != Some(wanted) {
            net::del_link(handle, link.header.index).await?;
        }
    }
    if net::link(handle, &device.name).await?.is_none() {
        let mac = vtep_mac(device.local);
        vxlan::add_device(handle, &device.name, wanted, device.mtu, mac).await?;
    }
    let link = net::existing_link(handle, &device.name, "the new VXLAN device vanished").await?;
    let index = link.header.index;
    if net::link_mtu(&link) != Some(device.mtu) {
        vxlan::set_mtu(handle, index, &device.name, device.mtu).await?;
    }
    net::add_address(handle, index, pod_cidr.network, 32).await?;
    net::set_up(handle, index).await?;
    link_mac_or_err(&link, &device.name)
}

fn link_mac_or_err(link: &LinkMessage, name: &str) -> Result<[u8; 6], NetError> {
    net::link_mac(link).ok_or_else(|| NetError::Io {
        context: format!("reading the MAC of {name}"),
        source: std::io::Error::other("no link-layer address"),
    })
}

/// What one reconciliation changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
}

/// Makes the device's forwarding entries, neighbours and routes exactly those of `peers`.
pub async fn reconcile(handle: &Handle, device: &str, peers: &[Peer]) -> Result<Changes, NetError> {
    let link = net::existing_link(handle, device, "the VXLAN device is missing").await?;
    let index = link.header.index;
    let mut changes = Changes::default();

    // What is there now.
    let fdb = vxlan::fdb_entries(handle, index).await?;
    let neighbours = vxlan::neighbour_entries(handle, index).await?;
    let routes: Vec<_> = net::routes(handle)
        .await?
        .into_iter()
        .filter(|r| net::route_oif(r) == Some(index) && net::route_gateway(r).is_some())
        .collect();
    let (lladdr, destination) = (vxlan::lladdr, vxlan::destination);
    let current_fdb: BTreeMap<[u8; 6], Option<Ipv4Addr>> = fdb
        .iter()
        .filter_map(|m| Some((lladdr(m)?, destination(m))))
        .collect();
    let current_neigh: BTreeMap<Ipv4Addr, Option<[u8; 6]>> = neighbours
        .iter()
        .filter_map(|m| Some((destination(m)?, lladdr(m))))
        .collect();
    let current_routes: BTreeMap<(Ipv4Addr, u8), Option<Ipv4Addr>> = routes
        .iter()
        .map(|r| (net::route_dst(r), net::route_gateway(r)))
        .collect();

    // Add or correct what the peers need.
    for peer in peers {
        let gateway = peer.pod_cidr.network;
        if current_fdb.get(&peer.vtep_mac) != Some(&Some(peer.vtep_ip)) {
            vxlan::replace_fdb(handle, index, peer.vtep_mac, peer.vtep_ip, &peer.node).await?;
            changes.added += 1;
        }
        if current_neigh.get(&gateway) != Some(&Some(peer.vtep_mac)) {
            vxlan::replace_neighbour(handle, index, gateway, peer.vtep_mac, &peer.node).await?;
            changes.added += 1;
        }
        let key = (peer.pod_cidr.network, peer.pod_cidr.len);
        if current_routes.get(&key) != Some(&Some(gateway)) {
            net::replace_route(
                handle,
                net::route(
                    peer.pod_cidr.network,
                    peer.pod_cidr.len,
                    index,
                    Some(gateway),
                ),
            )
            .await?;
            changes.added += 1;
        }
    }

    // Remove what no peer needs (nodes that went away or changed).
    let macs: BTreeSet<[u8; 6]> = peers.iter().map(|p| p.vtep_mac).collect();
    let gateways: BTreeSet<Ipv4Addr> = peers.iter().map(|p| p.pod_cidr.network).collect();
    let cidrs: BTreeSet<(Ipv4Addr, u8)> = peers
        .iter()
        .map(|p| (p.pod_cidr.network, p.pod_cidr.len))
        .collect();
    for route in routes {
        if !cidrs.contains(&net::route_dst(&route)) {
            net::del_route(handle, route).await?;
            changes.removed += 1;
        }
    }
    for message in neighbours {
        let stale = destination(&message).is_some_and(|ip| !gateways.contains(&ip));
        if stale && message.header.state == NeighbourState::Permanent {
            vxlan::delete_entry(handle, message, "a neighbour entry").await?;
            changes.removed += 1;
        }
    }
    for message in fdb {
        let stale = lladdr(&message).is_some_and(|mac| !macs.contains(&mac))
            && destination(&message).is_some();
        if stale {
            vxlan::delete_entry(handle, message, "a forwarding entry").await?;
            changes.removed += 1;
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(name: &str, cidr: Option<&str>, vtep: Option<(&str, &str)>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: vtep.map(|(ip, mac)| {
                    [
                        (ANNOTATION_VTEP_IP.to_string(), ip.to_string()),
                        (ANNOTATION_VTEP_MAC.to_string(), mac.to_string()),
                    ]
                    .into()
                }),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                pod_cidr: cidr.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn peers_are_the_other_nodes_that_published_a_vtep() {
        let nodes = vec![
            node(
                "a",
                Some("10.244.0.0/24"),
                Some(("192.0.2.1", "02:00:00:00:00:01")),
            ),
            node(
                "b",
                Some("10.244.1.7/24"),
                Some(("192.0.2.2", "02:00:00:00:00:02")),
            ),
            node("c", None, Some(("192.0.2.3", "02:00:00:00:00:03"))),
            node("d", Some("10.244.3.0/24"), None),
            node("e", Some("10.244.4.0/24"), Some(("192.0.2.5", "not-a-mac"))),
        ];
        let peers = peers(&nodes, "a");
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].node, "b");
        assert_eq!(peers[0].pod_cidr.to_string(), "10.244.1.0/24");
        assert_eq!(peers[0].vtep_mac, [2, 0, 0, 0, 0, 2]);
    }
}
