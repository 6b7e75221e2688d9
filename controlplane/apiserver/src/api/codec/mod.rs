//! Bodies in and out: Kubernetes' protobuf encoding (`protobuf`), typed decoding and field
//! validation against k8s-openapi's types (`typed`), the PATCH formats (`patch`) and
//! server-side apply with managed fields (`apply`).

pub mod apply;
pub mod patch;
pub mod protobuf;
pub mod typed;
