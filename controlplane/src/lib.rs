//! Seine's control plane. The API server keeps every object in etcd through `storage` and serves
//! the Kubernetes REST API through `api`.

pub mod api;
pub mod storage;
