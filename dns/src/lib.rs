//! seine-dns, a CoreDNS-compatible cluster DNS server (issue 6, in progress). So far: the Corefile
//! (`corefile`), read as CoreDNS reads it, with an error naming the line for anything seine-dns does
//! not implement; and the answers of the Kubernetes DNS specification and CoreDNS's kubernetes
//! plugin from a view of the cluster (`cluster`), independent of the wire format, and that view
//! built from the Kubernetes objects (`view`) and kept current by watches (`sync`).

pub mod app;
pub mod cache;
pub mod cluster;
pub mod corefile;
pub mod forward;
pub mod metrics;
pub mod server;
pub mod sync;
pub mod view;
