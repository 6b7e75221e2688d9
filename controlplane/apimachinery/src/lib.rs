//! What Seine's components share that does no I/O, staged as Kubernetes stages its apimachinery:
//! types and rules every client of the API applies the same way.
//!
//! - `labels`: label selectors, from the string form (`kubectl get -l`, `?labelSelector=`) or a
//!   `LabelSelector` object, and matching them against an object's labels.
//! - `quantity` and `scheduling` (feature `k8s-openapi`): resource quantities as the integers
//!   the scheduler compares; node selector terms and taint tolerations.
//! - `cidr`: CIDRs of either family (service ranges, dual-stack) and IPv4 node and pod ranges.
//! - `duration`: durations as Go writes them, for flags and the Corefile.
//! - `jwt` (feature `jwt`): the service account token key, shared by the API server and the
//!   controller manager.

pub mod cidr;
pub mod duration;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod labels;
#[cfg(feature = "k8s-openapi")]
pub mod quantity;
#[cfg(feature = "k8s-openapi")]
pub mod scheduling;
