//! Seine's node side: the service datapath behind one `Datapath` interface, the Kubernetes objects
//! it is programmed from, and what seinectl reads back out of the pinned maps.

pub mod bpf;
pub mod daemon;
pub mod datapath;
pub mod hostport;
pub mod inspect;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod nodenet;
pub mod overlay;
pub mod pins;
pub mod sock_lb;
