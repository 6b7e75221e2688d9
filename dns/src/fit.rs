//! Cutting a reply to what the client can take, as CoreDNS does (miekg/dns `Truncate`): records are
//! kept in message order (answer, authority, additional) up to the first one that does not fit
//! beside the question and the OPT record; nothing after it is kept, and TC tells the client to ask
//! again over TCP. The encoder's own limit is only a backstop: it skips a record that does not fit
//! and goes on with the next section, which breaks that order.

use hickory_proto::{
    op::{Edns, Metadata},
    rr::Record,
    serialize::binary::{BinEncodable as _, BinEncoder},
};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};

use crate::reply::Reply;

/// The most a client takes: 512 bytes over UDP without EDNS0 (RFC 1035 4.2.1), the advertised
/// buffer with it (which `handle_request` has already bounded), 64 KiB over TCP.
pub fn limit(tcp: bool, edns: Option<&Edns>) -> usize {
    if tcp {
        usize::from(u16::MAX)
    } else {
        edns.map_or(512, |e| usize::from(e.max_payload().max(512)))
    }
}

/// Drops the records of `reply` that do not fit in `limit` bytes and sets `truncated` when any
/// were dropped. Sizes are measured by encoding the reply as it will be sent (the question echoed,
/// the same name compression) without the OPT record, whose room is kept aside: the encoder writes
/// records in order and counts those that fit, so the counts up to the first cut section are
/// exactly the prefix that fits.
pub fn fit(
    reply: &mut Reply,
    queries: &Queries,
    metadata: Metadata,
    edns: Option<&Edns>,
    limit: usize,
) {
    let opt = edns.map_or(0, |e| encoded_len(&Record::from(e)));
    let Some(room) = limit.checked_sub(opt) else {
        return;
    };
    let mut bytes = Vec::with_capacity(room.min(4096));
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_max_size(u16::try_from(room).unwrap_or(u16::MAX));
    let measured = MessageResponseBuilder::new(queries, None).build(
        metadata,
        reply.answers.iter(),
        reply.authorities.iter(),
        std::iter::empty(),
        reply.additionals.iter(),
    );
    let Ok(info) = measured.destructive_emit(&mut encoder) else {
        // Not even the question fits, or a record does not encode: the encoder reports it.
        return;
    };
    let counts = info.counts();
    let mut full = true;
    for (section, written) in [
        (&mut reply.answers, counts.answers),
        (&mut reply.authorities, counts.authorities),
        (&mut reply.additionals, counts.additionals),
    ] {
        let keep = if full { usize::from(written) } else { 0 };
        if keep < section.len() {
            section.truncate(keep);
            reply.truncated = true;
            full = false;
        }
    }
}
fn encoded_len(record: &Record) -> usize {
    let mut bytes = Vec::new();
    let mut encoder = BinEncoder::new(&mut bytes);
    match record.emit(&mut encoder) {
        Ok(()) => bytes.len(),
        Err(_) => 0,
    }
}
