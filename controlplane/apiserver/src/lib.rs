//! seine-apiserver: the Kubernetes REST API over etcd, for kubectl and every Kubernetes client.
//!
//! How a request flows (as kube-apiserver's handler chain):
//!
//! ```text
//! request ─▶ api::http::metrics ─▶ api::security (authenticate, impersonate, RBAC)
//!         ─▶ api::http::dispatch (path to a resource, parameters, body via api::codec)
//!         ─▶ api::http::handlers (the verb) ─▶ api::registry (the kind's strategy, allocation)
//!         ─▶ storage (one etcd transaction per write)
//! etcd watch ─▶ watch_cache (one per resource) ─▶ api::http::watch (every API watcher)
//! ```
//!
//! `api::bootstrap` writes what every cluster has at start; `api::status` turns every error
//! into a Kubernetes `Status`.

pub mod api;
pub mod storage;
pub mod watch_cache;
