//! Seine's CNI plugin, as a library: a node's conflist (`conf`, which the agent writes and the
//! plugin reads), the CNI protocol (`spec`: versions, configuration, results
//! and errors with the spec's codes), the node-local address store (`ipam`), the host-port
//! records the agent reads (`hostport`) and the commands (`plugin`, with netlink from
//! `seine-netlink` and the tc attachment from `seine-common`). The `seine-cni` binary that
//! runtimes call is built on these; it does not depend on the agent.

pub mod conf;
pub mod hostport;
pub mod ipam;
pub mod plugin;
pub mod spec;
