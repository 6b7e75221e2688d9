//! Seine's ClusterIP load balancer at tc on the host side of each pod's veth.
//!
//! `seine_from_pod` (tc ingress: packets leaving the pod) looks the destination up in the services
//! map, picks a backend (conntrack, then ClientIP affinity, then a random ready backend, then a random
//! terminating one), records the flow and rewrites the destination. A service with no backend is
//! answered with ICMP port unreachable, as kube-proxy's REJECT does. `seine_to_pod` (tc egress: packets
//! entering the pod) restores the service address on replies. The node's own processes are served
//! at the socket instead (`sock`).
#![no_std]
#![no_main]

mod csum;
mod maps;
mod packet;
mod reject;
mod sock;

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_redirect},
    macros::classifier,
    programs::TcContext,
};
use seine_common::*;

use maps::{count, AFFINITY, BACKENDS, CT, REVNAT, SERVICES, SLOTS};
use packet::{Tuple, ACT_OK, ACT_SHOT, ETH_HLEN};

#[classifier]
pub fn seine_from_pod(ctx: TcContext) -> i32 {
    match from_pod(&ctx) {
        Ok(action) => action,
        Err(()) => {
            count(STAT_MALFORMED);
            ACT_OK
        }
    }
}

#[classifier]
pub fn seine_to_pod(ctx: TcContext) -> i32 {
    match to_pod(&ctx) {
        Ok(action) => action,
        Err(()) => ACT_OK,
    }
}

fn from_pod(ctx: &TcContext) -> Result<i32, ()> {
    let Some(t) = packet::parse(ctx)? else {
        return Ok(ACT_OK);
    };

    // A pod's reply to its own hairpinned connection comes back addressed to the hairpin address.
    if t.daddr == HAIRPIN_ADDR_V4 {
        return hairpin_reply(ctx, &t);
    }

    let skey = ServiceKey {
        addr: [t.daddr, 0, 0, 0],
        port: t.dport,
        proto: t.proto,
        family: FAMILY_V4,
    };
    // SAFETY: the value is copied out at once; a concurrent update replaces it whole.
    let Some(svc) = (unsafe { SERVICES.get(skey) }).copied() else {
        forget_reused_tuple(&t);
        return Ok(ACT_OK);
    };

    let now = unsafe { bpf_ktime_get_ns() };
    let ct_key = CtKey::v4(t.saddr, t.daddr, t.sport, t.dport, t.proto, CT_DIR_OUT);

    let backend = match existing_flow(&ct_key, &svc, &t, now) {
        Some(backend) => {
            count(STAT_CT_HIT);
            backend
        }
        None => {
            let Some((backend_id, backend)) = select_backend(&svc, t.saddr, now) else {
                count(STAT_NO_BACKEND);
                return Ok(reject::port_unreachable(ctx, t.proto));
            };
            if !new_flow(&ct_key, &svc, backend_id, &backend, &t, now) {
                count(STAT_DROP_CT_FULL);
                return Ok(ACT_SHOT);
            }
            count(STAT_CT_NEW);
            backend
        }
    };

    let hairpin = backend.addr[0] == t.saddr;
    if packet::dnat(ctx, &t, backend.addr[0], backend.port).is_err() {
        count(STAT_DROP_NAT_FAILED);
        return Ok(ACT_SHOT);
    }
    if hairpin {
        // The backend is the client itself: present the flow as coming from the hairpin address and
        // send it straight back into the pod.
        if packet::snat(ctx, &t, HAIRPIN_ADDR_V4, t.sport).is_err() {
            count(STAT_DROP_NAT_FAILED);
            return Ok(ACT_SHOT);
        }
        count(STAT_HAIRPIN);
        count(STAT_TRANSLATED);
        return Ok(bounce(ctx));
    }
    count(STAT_TRANSLATED);
    Ok(ACT_OK)
}

fn to_pod(ctx: &TcContext) -> Result<i32, ()> {
    let Some(t) = packet::parse(ctx)? else {
        return Ok(ACT_OK);
    };
    let key = reply_key(&t);
    let Some(entry) = CT.get_ptr_mut(key) else {
        return Ok(ACT_OK);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: the pointer is into a live map value; fields are plain integers.
    let entry = unsafe { &mut *entry };
    if entry.expires_ns < now {
        return Ok(ACT_OK);
    }
    let Some(rev) = (unsafe { REVNAT.get(entry.service_id) }).copied() else {
        return Ok(ACT_OK);
    };
    refresh(entry, &t, now, true);
    if packet::snat(ctx, &t, rev.addr[0], rev.port).is_err() {
        count(STAT_DROP_NAT_FAILED);
        return Ok(ACT_SHOT);
    }
    count(STAT_REVERSE_TRANSLATED);
    Ok(ACT_OK)
}

/// The pod answered its own hairpinned flow: restore the service as source and the pod as
/// destination, and send it back into the pod.
fn hairpin_reply(ctx: &TcContext, t: &Tuple) -> Result<i32, ()> {
    let key = reply_key(t);
    let Some(entry) = CT.get_ptr_mut(key) else {
        return Ok(ACT_OK);
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as in `to_pod`.
    let entry = unsafe { &mut *entry };
    if entry.flags & CT_HAIRPIN == 0 || entry.expires_ns < now {
        return Ok(ACT_OK);
    }
    let Some(rev) = (unsafe { REVNAT.get(entry.service_id) }).copied() else {
        return Ok(ACT_OK);
    };
    refresh(entry, t, now, true);
    if packet::dnat(ctx, t, t.saddr, t.dport).is_err()
        || packet::snat(ctx, t, rev.addr[0], rev.port).is_err()
    {
        count(STAT_DROP_NAT_FAILED);
        return Ok(ACT_SHOT);
    }
    count(STAT_REVERSE_TRANSLATED);
    Ok(bounce(ctx))
}

/// Sends the packet back out of the interface it came in on, addressed to the sender's MAC.
fn bounce(ctx: &TcContext) -> i32 {
    if packet::swap_macs(ctx).is_err() {
        count(STAT_DROP_NAT_FAILED);
        return ACT_SHOT;
    }
    // SAFETY: reading a field of the context the kernel handed us.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// The key of a reply entry, for a packet travelling in the reply direction.
fn reply_key(t: &Tuple) -> CtKey {
    CtKey::v4(t.saddr, t.daddr, t.sport, t.dport, t.proto, CT_DIR_REPLY)
}

/// A pod that opens a connection straight to a backend from a port it used earlier through a
/// service would get that flow's replies reverse-translated: the reply tuples are the same. A new
/// direct flow (a TCP SYN, or any UDP packet) therefore retires a reply entry on its tuple.
fn forget_reused_tuple(t: &Tuple) {
    if !(t.proto == PROTO_UDP || (t.is_syn() && !t.is_ack())) {
        return;
    }
    let key = CtKey::v4(t.daddr, t.saddr, t.dport, t.sport, t.proto, CT_DIR_REPLY);
    if CT.get_ptr(key).is_some() && CT.remove(key).is_ok() {
        count(STAT_CT_TUPLE_REUSED);
    }
}

/// A live conntrack entry whose backend still belongs to the service keeps its backend.
fn existing_flow(key: &CtKey, svc: &ServiceValue, t: &Tuple, now: u64) -> Option<Backend> {
    let entry = CT.get_ptr_mut(key)?;
    // SAFETY: pointer into a live map value.
    let entry = unsafe { &mut *entry };
    if entry.expires_ns < now || entry.service_id != svc.service_id {
        return None;
    }
    // SAFETY: copied out at once.
    let backend = (unsafe { BACKENDS.get(entry.backend_id) }).copied()?;
    if backend.service_id != svc.service_id {
        return None;
    }
    // A new TCP connection that reuses the tuple of a finished one chooses afresh.
    if t.proto == PROTO_TCP && t.is_syn() && entry.flags & CT_CLOSING != 0 {
        return None;
    }
    refresh(entry, t, now, false);
    Some(backend)
}

fn refresh(entry: &mut CtValue, t: &Tuple, now: u64, reply: bool) {
    entry.last_seen_ns = now;
    entry.packets += 1;
    if t.proto == PROTO_TCP {
        if t.is_fin_or_rst() {
            entry.flags |= CT_CLOSING;
        } else if t.is_ack() && (!t.is_syn() || reply) {
            entry.flags |= CT_ESTABLISHED;
        }
        entry.expires_ns = now + tcp_lifetime(entry.flags);
    } else {
        entry.expires_ns = now + CT_LIFETIME_NONTCP_NS;
    }
}

fn tcp_lifetime(flags: u8) -> u64 {
    if flags & CT_CLOSING != 0 {
        CT_LIFETIME_TCP_CLOSING_NS
    } else if flags & CT_ESTABLISHED != 0 {
        CT_LIFETIME_TCP_ESTABLISHED_NS
    } else {
        CT_LIFETIME_TCP_SYN_NS
    }
}

/// A backend for a new flow from `client` (the key of its ClientIP affinity).
fn select_backend(svc: &ServiceValue, client: u32, now: u64) -> Option<(u32, Backend)> {
    let affinity_key = AffinityKey {
        client: [client, 0, 0, 0],
        service_id: svc.service_id,
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    let affinity = svc.flags & SVC_FLAG_AFFINITY != 0;
    if affinity {
        if let Some(found) = affinity_backend(&affinity_key, svc, now) {
            count(STAT_AFFINITY_HIT);
            return Some(found);
        }
    }

    // Ready backends first; terminating-but-serving ones only when no ready backend is left.
    let (base, n) = if svc.count > 0 {
        (0u32, svc.count as u32)
    } else if svc.terminating > 0 {
        (svc.count as u32, svc.terminating as u32)
    } else {
        return None;
    };
    let index = base + unsafe { bpf_get_prandom_u32() } % n;
    let slot = SlotKey::new(svc.service_id, svc.bank, index);
    // SAFETY: copied out at once.
    let Some(backend_id) = (unsafe { SLOTS.get(slot) }).copied() else {
        count(STAT_DROP_BACKEND_MISSING);
        return None;
    };
    let Some(backend) = (unsafe { BACKENDS.get(backend_id) }).copied() else {
        count(STAT_DROP_BACKEND_MISSING);
        return None;
    };

    if affinity {
        let value = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(affinity_key, value, 0);
    }
    Some((backend_id, backend))
}

fn affinity_backend(key: &AffinityKey, svc: &ServiceValue, now: u64) -> Option<(u32, Backend)> {
    let entry = AFFINITY.get_ptr_mut(key)?;
    // SAFETY: pointer into a live map value.
    let entry = unsafe { &mut *entry };
    let timeout_ns = svc.affinity_timeout_secs as u64 * 1_000_000_000;
    if now > entry.last_used_ns + timeout_ns {
        return None;
    }
    let backend = (unsafe { BACKENDS.get(entry.backend_id) }).copied()?;
    if backend.service_id != svc.service_id {
        return None;
    }
    // A terminating backend keeps no affinity while ready backends exist.
    if backend.state == BACKEND_TERMINATING && svc.count > 0 {
        return None;
    }
    entry.last_used_ns = now;
    Some((entry.backend_id, backend))
}

/// Records both directions of a new flow. Returns false when conntrack cannot take it.
fn new_flow(
    key: &CtKey,
    svc: &ServiceValue,
    backend_id: u32,
    backend: &Backend,
    t: &Tuple,
    now: u64,
) -> bool {
    let hairpin = backend.addr[0] == t.saddr;
    let mut value = CtValue {
        backend_id,
        service_id: svc.service_id,
        created_ns: now,
        last_seen_ns: now,
        expires_ns: 0,
        packets: 0,
        flags: if hairpin { CT_HAIRPIN } else { 0 },
        _pad: [0; 7],
    };
    if t.proto == PROTO_TCP && t.is_syn() {
        value.flags |= CT_SEEN_SYN;
    }
    refresh(&mut value, t, now, false);

    let client = if hairpin { HAIRPIN_ADDR_V4 } else { t.saddr };
    let reply = CtKey::v4(
        backend.addr[0],
        client,
        backend.port,
        t.sport,
        t.proto,
        CT_DIR_REPLY,
    );
    let mut reply_value = value;
    reply_value.packets = 0;
    CT.insert(reply, reply_value, 0).is_ok() && CT.insert(key, value, 0).is_ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

const _: () = assert!(ETH_HLEN == 14);
