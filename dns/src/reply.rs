//! A reply before encoding: what the plugins produce, the cache keeps and `fit` cuts to size. A
//! leaf of its own, so that the server, the cache and `fit` depend on it and not on each other.

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::Record,
};

/// A reply before encoding: what the plugins produce and the cache keeps.
#[derive(Debug, Clone)]
pub struct Reply {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub recursion_available: bool,
    /// An upstream's answer cut short (its TCP retry failed): passed on with TC, not cached.
    pub truncated: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The plugin that wrote it (`coredns_dns_responses_total{plugin}`).
    pub plugin: &'static str,
}

impl Reply {
    pub fn error(rcode: ResponseCode, plugin: &'static str) -> Self {
        Reply {
            rcode,
            authoritative: false,
            recursion_available: false,
            truncated: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            plugin,
        }
    }

    /// A reply from an upstream's message.
    pub fn from_message(message: Message, plugin: &'static str) -> Self {
        Reply {
            rcode: message.metadata.response_code,
            authoritative: message.metadata.authoritative,
            recursion_available: message.metadata.recursion_available,
            truncated: message.metadata.truncation,
            answers: message.answers,
            authorities: message.authorities,
            additionals: message.additionals,
            plugin,
        }
    }
}
