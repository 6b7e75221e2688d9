//! Seine's controller manager: the controllers kube-controller-manager runs, as API clients
//! (they never touch etcd), safe to run as several replicas through leader election on a
//! `coordination.k8s.io/v1` Lease (seine-component-base's daemon frame).
//!
//! Every controller is `run(client, config, shutdown)`: it watches through kube-runtime, and
//! after the shutdown token it starts nothing new, lets what is in flight finish and returns.
//! The shape follows the work:
//!
//! - A reconcile per object, on kube-runtime's `Controller` (with `graceful_shutdown_on`): `job`,
//!   `namespace`, `servicecidr`, `serviceaccount` (the default account, token Secrets, the root
//!   CA ConfigMap).
//! - A reconcile per key that several kinds feed, on [`queue`] (client-go's work queue) and
//!   workers: `endpointslice` (a Service, from Services, Pods, EndpointSlices and Endpoints).
//! - A loop over one state where order matters: `ipam` (one CIDR set, allocated in watch
//!   order), `gc` (the owner graph and its deletes), `nodelifecycle` (a timed look at every
//!   Node's heartbeat).

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
