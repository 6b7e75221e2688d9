//! Seine's controller manager: the controllers kube-controller-manager runs, as API clients
//! (they never touch etcd), safe to run as several replicas through leader election on a
//! `coordination.k8s.io/v1` Lease (seine-component-base's daemon frame).

pub mod endpointslice;
pub mod gc;
pub mod ipam;
pub mod job;
pub mod metrics;
pub mod namespace;
pub mod nodelifecycle;
pub mod queue;
pub mod serviceaccount;
pub mod servicecidr;
