//! Parsing and rewriting IPv4 TCP/UDP packets in an skb.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use seine_common::{PROTO_TCP, PROTO_UDP};

/// tc verdicts as the program returns them (the bindings' integer type differs between targets).
#[allow(clippy::unnecessary_cast)]
pub const ACT_OK: i32 = TC_ACT_OK as i32;
#[allow(clippy::unnecessary_cast)]
pub const ACT_SHOT: i32 = TC_ACT_SHOT as i32;

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SADDR_OFF: usize = ETH_HLEN + 12;
const IP_DADDR_OFF: usize = ETH_HLEN + 16;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The 5-tuple of a packet, addresses and ports in network order, plus where its L4 header is.
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub l4_off: usize,
}

impl Tuple {
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & TCP_SYN != 0
    }
    pub fn is_ack(&self) -> bool {
        self.tcp_flags & TCP_ACK != 0
    }
    pub fn is_fin_or_rst(&self) -> bool {
        self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
    fn l4_csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4_off + 16
        } else {
            self.l4_off + 6
        }
    }
    fn l4_csum_flags(&self) -> u64 {
        // A UDP checksum of 0 means "none" and must stay 0.
        if self.proto == PROTO_UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        }
    }
}

/// `Ok(None)` for anything that is not an unfragmented IPv4 TCP or UDP packet (left alone);
/// `Err` for a packet too short for the headers it claims.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Tuple>, ()> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
    if ethertype != ETH_P_IP {
        return Ok(None);
    }
    let ver_ihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    if ver_ihl >> 4 != 4 {
        return Err(());
    }
    let ihl = ((ver_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(());
    }
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).map_err(|_| ())?);
    // A later fragment carries no ports; leave fragments to the kernel.
    if frag & 0x1fff != 0 {
        return Ok(None);
    }
    let proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Ok(None);
    }
    let saddr: u32 = ctx.load(IP_SADDR_OFF).map_err(|_| ())?;
    let daddr: u32 = ctx.load(IP_DADDR_OFF).map_err(|_| ())?;
    let l4_off = ETH_HLEN + ihl;
    let sport: u16 = ctx.load(l4_off).map_err(|_| ())?;
    let dport: u16 = ctx.load(l4_off + 2).map_err(|_| ())?;
    let tcp_flags: u8 = if proto == PROTO_TCP {
        ctx.load(l4_off + 13).map_err(|_| ())?
    } else {
        // The UDP checksum field must be present for a rewrite.
        let _: u16 = ctx.load(l4_off + 6).map_err(|_| ())?;
        0
    };
    Ok(Some(Tuple {
        saddr,
        daddr,
        sport,
        dport,
        proto,
        tcp_flags,
        l4_off,
    }))
}

/// Rewrites the destination address and port, fixing the L3 and L4 checksums.
#[inline(always)]
pub fn dnat(ctx: &TcContext, t: &Tuple, addr: u32, port: u16) -> Result<(), ()> {
    rewrite(
        ctx,
        t,
        IP_DADDR_OFF,
        t.daddr,
        addr,
        t.l4_off + 2,
        t.dport,
        port,
    )
}

/// Rewrites the source address and port, fixing the L3 and L4 checksums.
#[inline(always)]
pub fn snat(ctx: &TcContext, t: &Tuple, addr: u32, port: u16) -> Result<(), ()> {
    rewrite(ctx, t, IP_SADDR_OFF, t.saddr, addr, t.l4_off, t.sport, port)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    t: &Tuple,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), ()> {
    let csum_off = t.l4_csum_off();
    let flags = t.l4_csum_flags();
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            csum_off,
            old_addr as u64,
            new_addr as u64,
            flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| ())?;
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)
            .map_err(|_| ())?;
        ctx.store(addr_off, &new_addr, 0).map_err(|_| ())?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, flags | 2)
            .map_err(|_| ())?;
        ctx.store(port_off, &new_port, 0).map_err(|_| ())?;
    }
    Ok(())
}

/// Exchanges source and destination MAC, for a packet sent back where it came from.
#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), ()> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| ())?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| ())
}
