//! Seine's controller manager and scheduler (issue 7, in progress): so far the leader election
//! every replica of them runs on a `coordination.k8s.io/v1` Lease (`leader`) and the node IPAM
//! controller (`ipam`).

pub mod ipam;
pub mod leader;
