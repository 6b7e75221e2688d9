//! Storage rules, per kind, as kube-apiserver's `pkg/registry`: what the API serves
//! (`resources`), the shape of a kind's rules and the ones all kinds share (`strategy`), one file
//! per kind with its strategy (`pod`, `service`, ...), what the server writes into metadata
//! (`meta`), and cluster IP and node port allocation (`alloc`).

pub mod alloc;
pub mod meta;
pub mod resources;
pub mod strategy;

mod configmap;
mod endpoints;
mod event;
mod job;
mod lease;
mod namespace;
mod node;
mod pod;
mod rbac;
mod secret;
mod service;
mod serviceaccount;
mod servicecidr;
