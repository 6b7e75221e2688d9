//! VXLAN through rtnetlink: the device (VNI, UDP port, local VTEP address), its forwarding
//! database entries (`bridge fdb`: a peer's MAC to its VTEP address) and its neighbour entries
//! (`ip neigh`: a peer's gateway address to its MAC), as a VXLAN overlay lays them out.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    AddressFamily,
};
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};

use crate::{nl, NetError};

/// What makes a VXLAN device the one wanted: its VNI, UDP port and local VTEP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub vni: u32,
    pub port: u16,
    pub local: Option<Ipv4Addr>,
}

/// A link's VXLAN settings; None if it is not a VXLAN device.
pub fn settings(link: &LinkMessage) -> Option<Settings> {
    let infos = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => Some(infos),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(data)) => Some(data),
        _ => None,
    })?;
    let (mut vni, mut port, mut local) = (None, None, None);
    for attr in data {
        match attr {
            InfoVxlan::Id(v) => vni = Some(*v),
            InfoVxlan::Port(p) => port = Some(*p),
            InfoVxlan::Local(l) => local = Some(*l),
            _ => {}
        }
    }
    Some(Settings {
        vni: vni?,
        port: port?,
        local,
    })
}

/// Creates VXLAN device `name` without learning (the forwarding entries are programmed), with
/// its MTU and MAC.
pub async fn add_device(
    handle: &Handle,
    name: &str,
    settings: Settings,
    mtu: u32,
    mac: [u8; 6],
) -> Result<(), NetError> {
    let mut builder = LinkVxlan::new(name, settings.vni)
        .port(settings.port)
        .learning(false)
        .mtu(mtu)
        .address(mac.to_vec());
    if let Some(local) = settings.local {
        builder = builder.local(local);
    }
    handle
        .link()
        .add(builder.build())
        .execute()
        .await
        .map_err(nl(format!("creating the VXLAN device {name}")))
}

/// Sets the MTU of link `index` (named `name` in errors).
pub async fn set_mtu(handle: &Handle, index: u32, name: &str, mtu: u32) -> Result<(), NetError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).mtu(mtu).build())
        .execute()
        .await
        .map_err(nl(format!("setting the MTU of {name}")))
}

async fn entries(
    handle: &Handle,
    family: AddressFamily,
    index: u32,
    what: &str,
) -> Result<Vec<NeighbourMessage>, NetError> {
    Ok(handle
        .neighbours()
        .get()
        .set_address_family(family)
        .execute()
        .try_collect::<Vec<_>>()
        .await
        .map_err(nl(format!("listing {what}")))?
        .into_iter()
        .filter(|m| m.header.ifindex == index)
        .collect())
}

/// The forwarding database entries of link `index`.
pub async fn fdb_entries(handle: &Handle, index: u32) -> Result<Vec<NeighbourMessage>, NetError> {
    entries(handle, AddressFamily::Bridge, index, "forwarding entries").await
}

/// The IPv4 neighbour entries of link `index`.
pub async fn neighbour_entries(
    handle: &Handle,
    index: u32,
) -> Result<Vec<NeighbourMessage>, NetError> {
    entries(handle, AddressFamily::Inet, index, "neighbours").await
}

/// An entry's link-layer address.
pub fn lladdr(entry: &NeighbourMessage) -> Option<[u8; 6]> {
    entry.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
        _ => None,
    })
}

/// An entry's IPv4 destination.
pub fn destination(entry: &NeighbourMessage) -> Option<Ipv4Addr> {
    entry.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // Forwarding entries (AF_BRIDGE) come without a family for their IPv4 destination.
        NeighbourAttribute::Destination(NeighbourAddress::Other(bytes)) => {
            <[u8; 4]>::try_from(bytes.as_slice())
                .ok()
                .map(Ipv4Addr::from)
        }
        _ => None,
    })
}

/// `bridge fdb replace MAC dev DEV dst VTEP self permanent`; `whose` names the peer in errors.
pub async fn replace_fdb(
    handle: &Handle,
    index: u32,
    mac: [u8; 6],
    vtep: Ipv4Addr,
    whose: &str,
) -> Result<(), NetError> {
    handle
        .neighbours()
        .add_bridge(index, &mac)
        .destination(IpAddr::V4(vtep))
        .flags(NeighbourFlags::Own)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("adding the forwarding entry of {whose}")))
}

/// `ip neigh replace IP lladdr MAC dev DEV nud permanent`; `whose` names the peer in errors.
pub async fn replace_neighbour(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
    whose: &str,
) -> Result<(), NetError> {
    handle
        .neighbours()
        .add(index, IpAddr::V4(ip))
        .link_layer_address(&mac)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("adding the neighbour entry of {whose}")))
}

/// Removes a forwarding or neighbour entry (`what` names it in errors).
pub async fn delete_entry(
    handle: &Handle,
    entry: NeighbourMessage,
    what: &str,
) -> Result<(), NetError> {
    handle
        .neighbours()
        .del(entry)
        .execute()
        .await
        .map_err(nl(format!("removing {what}")))
}
