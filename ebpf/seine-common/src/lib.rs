//! Map keys and values shared by Seine's eBPF programs and userspace.
//!
//! Every type is `#[repr(C)]`, has explicit padding and holds addresses and ports in network byte
//! order, exactly as the datapath reads them from packets. Addresses are 16 bytes wide with a family
//! field, so IPv6 services fit the same maps; IPv4 uses the first word.
//!
//! With the `user` feature (userspace only) it also holds `tc`: attaching the programs to an
//! interface, which the agent and the CNI plugin both do.
#![cfg_attr(not(feature = "user"), no_std)]

#[cfg(feature = "user")]
pub mod tc;

/// Where the agent pins a node's maps and programs unless told otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/seine";

/// Default capacities, overridable by the agent (`--max-services`, `--max-backends`, `--ct-size`).
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_CT_SIZE: u32 = 262_144;
pub const DEFAULT_AFFINITY_SIZE: u32 = 65_536;

/// Names of the pinned maps and programs: the same in the datapath, the agent and seinectl.
pub const MAP_SERVICES: &str = "seine_services";
pub const MAP_SLOTS: &str = "seine_slots";
pub const MAP_BACKENDS: &str = "seine_backends";
pub const MAP_CT: &str = "seine_ct";
pub const MAP_REVNAT: &str = "seine_revnat";
pub const MAP_AFFINITY: &str = "seine_affinity";
pub const MAP_STATS: &str = "seine_stats";
pub const MAP_SOCK_NETNS: &str = "seine_sock_netns";
pub const MAP_SOCK_REVNAT: &str = "seine_sock_revnat";
pub const PROG_FROM_POD: &str = "seine_from_pod";
pub const PROG_TO_POD: &str = "seine_to_pod";
/// The socket-level programs, each with the cgroup hook it attaches to.
pub const PROG_SOCK_CONNECT4: &str = "seine_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "seine_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "seine_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "seine_sock_getpeername4";
pub const DEFAULT_SOCK_REVNAT_SIZE: u32 = 65_536;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The source address a pod sees when it reaches itself through a service (hairpin), so that its
/// reply leaves the pod instead of short-cutting over its own loopback. 169.254.42.1, network order.
pub const HAIRPIN_ADDR_V4: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

/// Services map: frontend (VIP, port, protocol) -> [`ServiceValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// `flags` bits of [`ServiceValue`].
pub const SVC_FLAG_AFFINITY: u8 = 1;

/// `source` of a [`ServiceValue`]: who owns the entry. The agent reconciles only its own.
pub const SOURCE_AGENT: u8 = 0;
pub const SOURCE_CLI: u8 = 1;

/// A service entry. Its backends are `count` ready slots followed by `terminating` slots of
/// terminating-but-serving backends, all in slot bank `bank` (see [`SlotKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub service_id: u32,
    pub count: u16,
    pub terminating: u16,
    pub bank: u8,
    pub flags: u8,
    pub source: u8,
    pub _pad: u8,
    pub affinity_timeout_secs: u32,
}

/// Slot map key. Each service has two banks of slots; an update writes the idle bank and then flips
/// `ServiceValue::bank` in one map update, so a reader never sees a half-written backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

impl SlotKey {
    pub const fn new(service_id: u32, bank: u8, index: u32) -> Self {
        SlotKey {
            service_id,
            slot: ((bank as u32) << 31) | index,
        }
    }
}

pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;

/// Backends map: backend id -> [`Backend`]. Backend ids belong to one service, so a backend that
/// leaves a service disappears from this map and every conntrack or affinity entry that named it
/// stops being used.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub state: u8,
    pub _pad: [u8; 3],
    pub service_id: u32,
}

/// Conntrack key: the packet's own tuple. A translated flow has two entries: `CT_DIR_OUT` keyed by
/// what the client sent (client -> VIP) and `CT_DIR_REPLY` keyed by what the backend sends back
/// (backend -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad: u8,
}

impl CtKey {
    /// An IPv4 tuple as the packet carries it (addresses and ports in network order).
    pub const fn v4(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8, dir: u8) -> Self {
        CtKey {
            saddr: [saddr, 0, 0, 0],
            daddr: [daddr, 0, 0, 0],
            sport,
            dport,
            proto,
            family: FAMILY_V4,
            dir,
            _pad: 0,
        }
    }
}

pub const CT_DIR_OUT: u8 = 0;
pub const CT_DIR_REPLY: u8 = 1;

/// `flags` bits of [`CtValue`].
pub const CT_SEEN_SYN: u8 = 1;
pub const CT_ESTABLISHED: u8 = 2;
pub const CT_CLOSING: u8 = 4;
pub const CT_HAIRPIN: u8 = 8;

/// Lifetimes, as Cilium's defaults: a TCP flow before its handshake completes, an established one,
/// one that saw FIN or RST, and any non-TCP flow.
pub const CT_LIFETIME_TCP_SYN_NS: u64 = 60 * 1_000_000_000;
pub const CT_LIFETIME_TCP_ESTABLISHED_NS: u64 = 21_600 * 1_000_000_000;
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_LIFETIME_NONTCP_NS: u64 = 60 * 1_000_000_000;

/// Conntrack value. Times are `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub backend_id: u32,
    pub service_id: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub expires_ns: u64,
    pub packets: u64,
    pub flags: u8,
    pub _pad: [u8; 7],
}

/// Reverse NAT map: service id -> the frontend to restore on replies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// A socket the node's own processes pointed at a service: (socket cookie, backend) -> the
/// frontend, so that the peer a process reads back (getpeername, recvfrom) is the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// ClientIP session affinity: (client, service) -> backend, refreshed on each new connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u32; 4],
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// Per-CPU counters, indexed by outcome.
pub const STAT_TRANSLATED: u32 = 0;
pub const STAT_REVERSE_TRANSLATED: u32 = 1;
pub const STAT_NO_BACKEND: u32 = 2;
pub const STAT_CT_NEW: u32 = 3;
pub const STAT_CT_HIT: u32 = 4;
pub const STAT_AFFINITY_HIT: u32 = 5;
pub const STAT_HAIRPIN: u32 = 6;
pub const STAT_DROP_BACKEND_MISSING: u32 = 7;
pub const STAT_DROP_CT_FULL: u32 = 8;
/// A packet too short for the headers it claims: counted and left to the kernel, which drops it.
pub const STAT_MALFORMED: u32 = 9;
pub const STAT_DROP_REJECT_FAILED: u32 = 10;
pub const STAT_DROP_NAT_FAILED: u32 = 11;
/// A connection that bypasses the service reused the tuple of an earlier translated flow.
pub const STAT_CT_TUPLE_REUSED: u32 = 12;
/// A connect or send of the node's own processes sent to a backend at the socket.
pub const STAT_SOCK_TRANSLATED: u32 = 13;
pub const STAT_COUNT: u32 = 14;

/// Counter names, indexed as above; seinectl and the agent's metrics use them.
pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "translated",
    "reverse_translated",
    "no_backend",
    "ct_new",
    "ct_hit",
    "affinity_hit",
    "hairpin",
    "drop_backend_missing",
    "drop_ct_full",
    "malformed",
    "drop_reject_failed",
    "drop_nat_failed",
    "ct_tuple_reused",
    "sock_translated",
];

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is #[repr(C)], Copy, built only of integers with explicit padding fields,
    // so any bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for RevNat {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevKey {}
}
