//! Netlink for the plugin and the agent: links, addresses, routes and neighbours through rtnetlink,
//! in the caller's network namespace or, from a thread that entered it, in a pod's; VXLAN
//! devices and their forwarding and neighbour entries in `vxlan`.

use std::{
    fs::File,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd as _,
};

use futures::TryStreamExt as _;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{
        AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoVeth, LinkAttribute, LinkFlags,
        LinkMessage,
    },
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

pub mod vxlan;

/// What VXLAN encapsulation adds to a packet: outer IPv4 (20), UDP (8), VXLAN (8) and inner
/// Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl NetError {
    /// The errno of a netlink error (positive), if it is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetError::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => Some(-m.raw_code()),
            NetError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub fn nl(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let context = context.into();
    move |source| NetError::Netlink { context, source }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetError {
    let context = context.into();
    move |source| NetError::Io { context, source }
}

/// Runs `f` with a netlink handle of the calling thread's network namespace, on a runtime of its
/// own (the plugin is a short-lived process; one thread does).
pub fn with_netlink<T, Fut>(f: impl FnOnce(Handle) -> Fut) -> Result<T, NetError>
where
    Fut: Future<Output = Result<T, NetError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(io("starting the netlink runtime"))?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(io("opening a netlink socket"))?;
        let task = tokio::spawn(connection);
        let out = f(handle).await;
        task.abort();
        out
    })
}

/// Runs `f` on a thread that entered the network namespace `ns` (the calling thread stays where
/// it is).
pub fn in_netns<T: Send>(
    ns: &File,
    f: impl FnOnce() -> Result<T, NetError> + Send,
) -> Result<T, NetError> {
    let fd = ns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a namespace descriptor that outlives this thread; it moves
                // only this thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io("entering the pod's network namespace")(
                        std::io::Error::last_os_error(),
                    ));
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(io("netns thread")(std::io::Error::other(
                    "the thread in the pod's namespace panicked",
                )))
            })
    })
}

/// A link by name, or None when there is none.
pub async fn link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>, NetError> {
    match handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::ENODEV => Ok(None),
        Err(e) => Err(nl(format!("looking up {name}"))(e)),
    }
}

/// A link that must be there (just created, or configured): its absence is an error saying `what`.
pub async fn existing_link(
    handle: &Handle,
    name: &str,
    what: &str,
) -> Result<LinkMessage, NetError> {
    link(handle, name).await?.ok_or_else(|| NetError::Io {
        context: format!("looking up {name}"),
        source: std::io::Error::other(what.to_string()),
    })
}

pub async fn links(handle: &Handle) -> Result<Vec<LinkMessage>, NetError> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))
}

pub fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub fn link_alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(n) => Some(n.as_str()),
        _ => None,
    })
}

pub fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub fn link_mac(link: &LinkMessage) -> Option<[u8; 6]> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
        _ => None,
    })
}

pub fn link_is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

/// Creates a veth pair: `host` here, its peer named `peer` straight in the namespace `peer_ns`
/// (one request, so a pair is there whole or not at all), both with `mtu`; then labels the host
/// side with `alias` (the kernel ignores an alias in the request that creates a link).
pub async fn add_veth(
    handle: &Handle,
    host: &str,
    peer: &str,
    peer_ns: &File,
    mtu: u32,
    alias: &str,
) -> Result<(), NetError> {
    let peer_message = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .mtu(mtu)
        .setns_by_fd(peer_ns.as_raw_fd())
        .build();
    let message = LinkVeth::new(host, peer)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
        .mtu(mtu)
        .build();
    handle
        .link()
        .add(message)
        .execute()
        .await
        .map_err(nl(format!("creating the veth pair {host}/{peer}")))?;
    // No IPv6 link-local address on the host side: it routes IPv4 for the pod, and skipping
    // address generation (and its duplicate detection) makes the pair cheaper to bring up.
    let no_ipv6_ll =
        LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
            In6AddrGenMode::None,
        )])]);
    handle
        .link()
        .set(
            LinkUnspec::new_with_name(host)
                .alias(alias.to_string())
                .append_extra_attribute(no_ipv6_ll)
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("labelling {host}")))
}

pub async fn set_up(handle: &Handle, index: u32) -> Result<(), NetError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("setting link {index} up")))
}

pub async fn del_link(handle: &Handle, index: u32) -> Result<(), NetError> {
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::ENODEV => Ok(()),
        Err(e) => Err(nl(format!("deleting link {index}"))(e)),
    }
}

/// Deletes the link named `name`, if there is one (a veth takes its peer with it).
pub async fn del_link_named(handle: &Handle, name: &str) -> Result<(), NetError> {
    match link(handle, name).await? {
        Some(l) => del_link(handle, l.header.index).await,
        None => Ok(()),
    }
}

/// Adds an address; one that is there already is fine.
pub async fn add_address(
    handle: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), NetError> {
    match handle
        .address()
        .add(index, IpAddr::V4(ip), prefix_len)
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::EEXIST => Ok(()),
        Err(e) => Err(nl(format!("adding {ip}/{prefix_len}"))(e)),
    }
}

pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    Ok(messages
        .iter()
        .filter(|m| m.header.index == index)
        .filter_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                _ => None,
            })
        })
        .collect())
}

/// A route to `dst/len`: through `gateway` (on-link) when given, else directly on the link.
pub fn route(dst: Ipv4Addr, len: u8, index: u32, gateway: Option<Ipv4Addr>) -> RouteMessage {
    let builder = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst, len)
        .output_interface(index);
    match gateway {
        Some(gw) => builder.gateway(gw).onlink().build(),
        None => builder.scope(RouteScope::Link).build(),
    }
}

/// Adds (or replaces) a route.
pub async fn replace_route(handle: &Handle, message: RouteMessage) -> Result<(), NetError> {
    let what = describe_route(&message);
    handle
        .route()
        .add(message)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("adding the route {what}")))
}

pub async fn del_route(handle: &Handle, message: RouteMessage) -> Result<(), NetError> {
    let what = describe_route(&message);
    match handle.route().del(message).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(m)) if -m.raw_code() == libc::ESRCH => Ok(()),
        Err(e) => Err(nl(format!("deleting the route {what}"))(e)),
    }
}

/// The IPv4 routes of the main table.
pub async fn routes(handle: &Handle) -> Result<Vec<RouteMessage>, NetError> {
    let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
    let all: Vec<RouteMessage> = handle
        .route()
        .get(filter)
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing routes"))?;
    Ok(all.into_iter().filter(|r| r.header.table == 254).collect())
}

pub fn route_dst(route: &RouteMessage) -> (Ipv4Addr, u8) {
    let ip = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        })
        .unwrap_or(Ipv4Addr::UNSPECIFIED);
    (ip, route.header.destination_prefix_length)
}

pub fn route_gateway(route: &RouteMessage) -> Option<Ipv4Addr> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

pub fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn describe_route(route: &RouteMessage) -> String {
    let (dst, len) = route_dst(route);
    match route_gateway(route) {
        Some(gw) => format!("{dst}/{len} via {gw}"),
        None => format!("{dst}/{len}"),
    }
}

/// Writes a sysctl of the calling thread's network namespace (`net.ipv4.ip_forward` ...).
pub fn sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(io(format!("writing {path}")))
}
