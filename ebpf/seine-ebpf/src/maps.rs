//! The datapath's maps. Capacities here are defaults: the agent sets the real ones at load time, and
//! every map is pinned by name under the node's bpffs directory so that it outlives the agent.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use seine_common::*;

#[map(name = "seine_services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

/// (service id, bank << 31 | index) -> backend id.
#[map(name = "seine_slots")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(DEFAULT_MAX_BACKENDS * 2, 0);

#[map(name = "seine_backends")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_MAX_BACKENDS, 0);

#[map(name = "seine_ct")]
pub static CT: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(DEFAULT_CT_SIZE, 0);

/// service id -> frontend, for replies.
#[map(name = "seine_revnat")]
pub static REVNAT: HashMap<u32, RevNat> = HashMap::pinned(DEFAULT_MAX_SERVICES, 0);

#[map(name = "seine_affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_AFFINITY_SIZE, 0);

/// The network namespace cookie of the node whose processes the socket programs serve (0: none
/// yet). The programs hang off a cgroup, which processes of every namespace share.
#[map(name = "seine_sock_netns")]
pub static SOCK_NETNS: Array<u64> = Array::pinned(1, 0);

#[map(name = "seine_sock_revnat")]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, RevNat> =
    LruHashMap::pinned(DEFAULT_SOCK_REVNAT_SIZE, 0);

#[map(name = "seine_stats")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);

#[inline(always)]
pub fn count(stat: u32) {
    if let Some(counter) = STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *counter += 1 };
    }
}
