//! Seine's controller manager and scheduler: API clients (they never touch etcd), each safe to
//! run as several replicas through leader election on a `coordination.k8s.io/v1` Lease.

pub mod daemon;
pub mod endpointslice;
pub mod gc;
pub mod ipam;
pub mod job;
pub mod leader;
pub mod metrics;
pub mod namespace;
pub mod nodelifecycle;
pub mod queue;
pub mod scheduler;
pub mod serviceaccount;
pub mod servicecidr;
