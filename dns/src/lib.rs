//! seine-dns, a CoreDNS-compatible cluster DNS server: the Corefile (`corefile`), read as CoreDNS
//! reads it, with an error naming the line for anything seine-dns does not implement; the answers
//! of the Kubernetes DNS specification and CoreDNS's kubernetes plugin from a view of the cluster
//! (`cluster`), that view built from the Kubernetes objects (`view`) and kept current by watches
//! (`sync`, into a `handle`); the query path on hickory-server with CoreDNS's plugin chain
//! (`server`, `cache`, `forward`) on one `reply` type, with answers cut to the client's size (`fit`), its metrics under CoreDNS's names (`metrics`), and the running
//! server made from a Corefile, with reload and the HTTP endpoints (`app`, and the `seine-dns`
//! binary). Without the default `server` feature the crate has no Kubernetes client (the fuzz
//! target builds it that way).

#[cfg(feature = "server")]
pub mod app;
pub mod cache;
pub mod cluster;
pub mod corefile;
pub mod fit;
pub mod forward;
pub mod handle;
pub mod metrics;
pub mod reply;
pub mod server;
#[cfg(feature = "server")]
pub mod sync;
pub mod udp;
#[cfg(feature = "server")]
pub mod view;
