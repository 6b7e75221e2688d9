//! Socket-level load balancing for the node's own processes (host network), as Cilium's socket
//! LB does: their packets to a service never cross a pod's veth, where the tc programs translate,
//! so a connect, or an unconnected UDP send, to a frontend is pointed at a backend before any
//! packet exists. The peer such a socket reads back (getpeername, recvfrom) stays the frontend.
//!
//! The programs hang off a cgroup, which sockets of every network namespace share: they act only
//! on sockets of the node's namespace, whose cookie the agent writes to `SOCK_NETNS`. Affinity for
//! these sockets is per node (the client address is not known before connect).

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use seine_common::*;

use crate::maps::{count, SERVICES, SOCK_NETNS, SOCK_REVNAT};

/// What a cgroup socket program returns to let the call go on, or to fail it.
const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

#[cgroup_sock_addr(connect4)]
pub fn seine_sock_connect4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn seine_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn seine_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn seine_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    to_frontend(&ctx);
    PROCEED
}

fn on_this_node(ctx: &SockAddrContext) -> bool {
    let Some(node) = SOCK_NETNS.get(0).copied() else {
        return false;
    };
    // SAFETY: the helper reads the context the kernel handed us.
    node != 0 && node == unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Points a connect or send to a frontend at one of its backends, or refuses it (connection
/// refused, as kube-proxy's REJECT answers) when the service has none.
fn to_backend(ctx: &SockAddrContext) -> i32 {
    if !on_this_node(ctx) {
        return PROCEED;
    }
    // SAFETY: the kernel hands a valid context; the fields read and written are the ones this
    // program type may access.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return PROCEED;
    }
    let (addr, port) = (sa.user_ip4, sa.user_port as u16);
    let key = ServiceKey {
        addr: [addr, 0, 0, 0],
        port,
        proto,
        family: FAMILY_V4,
    };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return PROCEED;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((_, backend)) = crate::select_backend(&svc, 0, now) else {
        count(STAT_NO_BACKEND);
        // SAFETY: sets this call's error; allowed for cgroup programs.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REFUSE;
    };
    sa.user_ip4 = backend.addr[0];
    sa.user_port = backend.port as u32;
    let rev = SockRevKey {
        // SAFETY: the helper reads the context the kernel handed us.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: backend.addr[0],
        port: backend.port,
        _pad: 0,
    };
    let frontend = RevNat {
        addr: [addr, 0, 0, 0],
        port,
        family: FAMILY_V4,
        _pad: 0,
    };
    // Without the entry the socket still works; only its peer reads back as the backend.
    let _ = SOCK_REVNAT.insert(rev, frontend, 0);
    count(STAT_SOCK_TRANSLATED);
    PROCEED
}

/// Shows a socket that `to_backend` pointed at a backend its frontend as the peer.
fn to_frontend(ctx: &SockAddrContext) {
    if !on_this_node(ctx) {
        return;
    }
    // SAFETY: as in `to_backend`.
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    let key = SockRevKey {
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied out at once.
    if let Some(frontend) = (unsafe { SOCK_REVNAT.get(key) }).copied() {
        sa.user_ip4 = frontend.addr[0];
        sa.user_port = frontend.port as u32;
    }
}
