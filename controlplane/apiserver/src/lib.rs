//! Seine's control plane. The API server keeps every object in etcd through `storage`, fans etcd's
//! changes out to API watchers through `watch_cache` and serves the Kubernetes REST API through
//! `api`.

pub mod api;
pub mod storage;
pub mod watch_cache;
