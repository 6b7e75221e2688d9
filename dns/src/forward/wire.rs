//! The bytes of a query and an answer: the client's question, the IDs swapped, and the checks
//! that an answer belongs to the exchange (ID, QR bit, question) or came back truncated.

use hickory_proto::{
    op::{Header, MessageType, Query},
    rr::{Name, RecordType},
    serialize::binary::{BinDecodable, BinDecoder},
};

use super::{ForwardError, MAX_MESSAGE};

/// What an answer must carry to be taken as the answer to what was sent.
pub(super) struct Expect<'a> {
    pub(super) id: u16,
    /// The question to match (name case-insensitively, type, class); `None` for health checks,
    /// where any answer with the right ID will do.
    pub(super) question: Option<&'a Query>,
}

/// The client's query, checked once.
pub(super) struct ClientQuery<'a> {
    pub(super) wire: &'a [u8],
    pub(super) id: u16,
    pub(super) question: Query,
}

pub(super) fn parse_query(wire: &[u8]) -> Result<ClientQuery<'_>, ForwardError> {
    if wire.len() > MAX_MESSAGE {
        return Err(ForwardError::BadQuery(format!(
            "{} bytes is more than a DNS message holds",
            wire.len()
        )));
    }
    let mut decoder = BinDecoder::new(wire);
    let header = Header::read(&mut decoder).map_err(|e| ForwardError::BadQuery(e.to_string()))?;
    if header.metadata.message_type != MessageType::Query {
        return Err(ForwardError::BadQuery("a response, not a query".into()));
    }
    if header.counts.queries != 1 {
        return Err(ForwardError::BadQuery(format!(
            "{} questions, not one",
            header.counts.queries
        )));
    }
    let question = Query::read(&mut decoder).map_err(|e| ForwardError::BadQuery(e.to_string()))?;
    Ok(ClientQuery {
        wire,
        id: header.metadata.id,
        question,
    })
}

/// `wire` with its message ID replaced.
pub(super) fn with_id(wire: &[u8], id: u16) -> Vec<u8> {
    let mut out = wire.to_vec();
    if out.len() >= 2 {
        out[..2].copy_from_slice(&id.to_be_bytes());
    }
    out
}

/// Why a message read from an upstream is not the answer (logged, then the read goes on).
pub(super) fn mismatch(buf: &[u8], expect: &Expect<'_>) -> Option<&'static str> {
    let mut decoder = BinDecoder::new(buf);
    let Ok(header) = Header::read(&mut decoder) else {
        return Some("shorter than a DNS header");
    };
    if header.metadata.id != expect.id {
        return Some("another message ID");
    }
    if header.metadata.message_type != MessageType::Response {
        return Some("not a response");
    }
    let question = expect.question?;
    if header.counts.queries == 0 {
        // Error answers need not repeat the question (RFC 1035 4.1.2 leaves it open; FORMERR and
        // NOTIMP answers often do not).
        return if header.metadata.response_code.low() != 0 {
            None
        } else {
            Some("no question")
        };
    }
    match Query::read(&mut decoder) {
        Ok(q)
            if q.name() == question.name()
                && q.query_type() == question.query_type()
                && q.query_class() == question.query_class() =>
        {
            None
        }
        Ok(_) => Some("another question"),
        Err(_) => Some("malformed question"),
    }
}

pub(super) fn truncated(buf: &[u8]) -> bool {
    buf.len() > 2 && buf[2] & 0x02 != 0
}

/// The answer's full RCODE: the header's four bits, with the EDNS OPT record's upper eight bits
/// when there is one. Whatever cannot be read leaves the header's.
pub(super) fn response_rcode(buf: &[u8]) -> u16 {
    let low = u16::from(buf.get(3).copied().unwrap_or(0) & 0x0f);
    let mut decoder = BinDecoder::new(buf);
    let Ok(header) = Header::read(&mut decoder) else {
        return low;
    };
    for _ in 0..header.counts.queries {
        if Query::read(&mut decoder).is_err() {
            return low;
        }
    }
    let records = u32::from(header.counts.answers)
        + u32::from(header.counts.authorities)
        + u32::from(header.counts.additionals);
    let additional_from = records - u32::from(header.counts.additionals);
    for i in 0..records {
        if Name::read(&mut decoder).is_err() {
            return low;
        }
        let fields = (|| {
            let rtype = decoder.read_u16().ok()?.unverified();
            let _class = decoder.read_u16().ok()?.unverified();
            let ttl = decoder.read_u32().ok()?.unverified();
            let len = decoder.read_u16().ok()?.unverified();
            decoder.read_slice(usize::from(len)).ok()?;
            Some((rtype, ttl))
        })();
        let Some((rtype, ttl)) = fields else {
            return low;
        };
        if i >= additional_from && rtype == u16::from(RecordType::OPT) {
            return (((ttl >> 24) as u16) << 4) | low;
        }
    }
    low
}
