//! Seine's node side: seine-agent (kube-proxy's role and the overlay's) and what seinectl reads.
//!
//! How a Service reaches the kernel:
//!
//! ```text
//! the API (proxy::api watches) or a file (proxy::file)
//!   └─ Service + EndpointSlices ─ proxy::translate ─▶ model::ServiceSpec ─┐
//! seine-cni's host-port records ─ hostport ──────────────────────────────┤ proxy::ServiceTable
//!                                                                        │ (only what changed)
//!                                                                        ▼
//!          datapath::Datapath: only the difference to the kernel, one service at a time
//!           ├─ datapath::ebpf      pinned maps (bpf, pins) and tc programs on pod veths,
//!           │                      sock_lb for the node's own sockets
//!           ├─ datapath::nftables  one table
//!           └─ datapath::iptables  kube-proxy's chains (legacy or nft backend)
//! ```
//!
//! - `daemon`: seine-agent's start-up and loop: which datapath runs, its health and metrics
//!   (`metrics`), SIGTERM with the datapath left in place.
//! - `nodenet` and `overlay`: the node's pod network: the VXLAN device and its entries per
//!   peer Node (netlink from `seine-netlink`), the CNI plugin and conflist installed.
//! - `inspect` and `pins`: seinectl's reading of the pinned maps.

pub mod bpf;
pub mod daemon;
pub mod datapath;
pub mod hostport;
pub mod inspect;
pub mod metrics;
pub mod model;
pub mod nodenet;
pub mod overlay;
pub mod pins;
pub mod proxy;
pub mod sock_lb;
