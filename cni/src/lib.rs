//! Seine's CNI plugin, as a library: the CNI protocol (`spec`: versions, configuration, results
//! and errors with the spec's codes) and the node-local address store (`ipam`). The `seine-cni`
//! binary that runtimes call is built on these.

pub mod ipam;
pub mod spec;
