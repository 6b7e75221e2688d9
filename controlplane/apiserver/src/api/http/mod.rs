//! The HTTP face of the API: routing a path to a resource (`dispatch`), the verbs
//! (`handlers`), watches, query parameters, server-side tables, discovery and OpenAPI documents,
//! and request metrics.

pub mod discovery;
mod dispatch;
pub mod handlers;
pub mod metrics;
pub mod openapi;
pub mod query;
pub mod request_info;
pub mod table;
pub mod watch;

pub use dispatch::dispatch;
