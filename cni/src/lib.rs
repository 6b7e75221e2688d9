//! Seine's CNI plugin, as a library: the CNI protocol (`spec`: versions, configuration, results
//! and errors with the spec's codes), the node-local address store (`ipam`) and the commands
//! (`plugin`, with netlink from `seine::net`). The `seine-cni` binary that runtimes call is built on these.

pub mod ipam;
pub mod plugin;
pub mod spec;
