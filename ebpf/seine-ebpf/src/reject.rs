//! The answer for a service with no backend: ICMP port unreachable from the service address, sent
//! back into the pod at once. The client's connect() or recv() fails with ECONNREFUSED immediately,
//! as with kube-proxy's REJECT rule.

use aya_ebpf::{
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use seine_common::{PROTO_TCP, STAT_DROP_REJECT_FAILED};

use crate::{
    csum::checksum,
    maps::count,
    packet::{ACT_SHOT, ETH_HLEN},
};

/// New IPv4 header plus ICMP header, inserted in front of the original IP header.
const ROOM: usize = 20 + 8;

/// ICMP header plus the quote, in 32-bit words. The quote is the original IP header and the start
/// of its payload: 8 bytes for UDP, the whole 20-byte base header for TCP. The kernel will not trim
/// a packet whose pending checksum offload points past the new end, and a TCP SYN from a pod with
/// offloads on carries one at TCP offset 16.
const UDP_WORDS: usize = (8 + 20 + 8) / 4;
const TCP_WORDS: usize = (8 + 20 + 20) / 4;

pub fn port_unreachable(ctx: &TcContext, proto: u8) -> i32 {
    let built = if proto == PROTO_TCP {
        build::<TCP_WORDS>(ctx)
    } else {
        build::<UDP_WORDS>(ctx)
    };
    match built {
        Ok(()) => {
            // SAFETY: reading a field of the context the kernel handed us.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Err(()) => {
            count(STAT_DROP_REJECT_FAILED);
            ACT_SHOT
        }
    }
}

fn build<const WORDS: usize>(ctx: &TcContext) -> Result<(), ()> {
    let quote = WORDS * 4 - 8;
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if ver_ihl != 0x45 {
        // Options would make the quote longer than we build; such packets are dropped instead.
        return Err(());
    }
    // The quote as 32-bit words, after the 8-byte ICMP header, for the ICMP checksum.
    let mut icmp = [0u32; WORDS];
    for (i, word) in icmp.iter_mut().skip(2).enumerate() {
        *word = ctx.load(ETH_HLEN + i * 4).map_err(|_| ())?;
    }
    let orig_saddr = icmp[2 + 3];
    let orig_daddr = icmp[2 + 4];

    ctx.adjust_room(ROOM as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| ())?;
    // SAFETY: helper call on the context the kernel handed us.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ROOM + quote) as u32, 0) };
    if ret != 0 {
        return Err(());
    }

    // Ethernet: back to the sender.
    let mut eth = [0u8; 12];
    eth[..6].copy_from_slice(&macs[6..]);
    eth[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &eth, 0).map_err(|_| ())?;

    // IPv4: from the service address to the client.
    let total_len = (ROOM + quote) as u16;
    let mut ip = [
        u32::from_ne_bytes([0x45, 0xc0, (total_len >> 8) as u8, total_len as u8]),
        0,
        u32::from_ne_bytes([64, 1, 0, 0]),
        orig_daddr,
        orig_saddr,
    ];
    let ip_csum = checksum(&mut ip);
    let csum_bytes = ip_csum.to_ne_bytes();
    ip[2] = u32::from_ne_bytes([64, 1, csum_bytes[0], csum_bytes[1]]);
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| ())?;

    // ICMP destination unreachable, port unreachable.
    icmp[0] = u32::from_ne_bytes([3, 3, 0, 0]);
    icmp[1] = 0;
    let icmp_csum = checksum(&mut icmp).to_ne_bytes();
    let header = [u32::from_ne_bytes([3, 3, icmp_csum[0], icmp_csum[1]]), 0u32];
    ctx.store(ETH_HLEN + 20, &header, 0).map_err(|_| ())?;
    Ok(())
}
