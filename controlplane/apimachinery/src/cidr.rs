//! IPv4 CIDRs as node and pod ranges are written (`10.244.1.0/24`): the network address, host
//! bits cleared, and the prefix length.

use std::{fmt, net::Ipv4Addr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub len: u8,
}

impl Ipv4Cidr {
    /// `a.b.c.d/len`; host bits set in the address are cleared. None for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, len) = text.split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u8 = len.parse().ok().filter(|l| *l <= 32)?;
        Some(Ipv4Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask(len)),
            len,
        })
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.len) == u32::from(self.network)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - len)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_with_host_bits_cleared_and_refuse_the_rest() {
        let c = Ipv4Cidr::parse("10.244.1.7/24").unwrap();
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 244, 2, 1)));
        assert_eq!(Ipv4Cidr::parse("0.0.0.0/0").unwrap().len, 0);
        assert!(Ipv4Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains(Ipv4Addr::BROADCAST));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/64",
            "10.0.0.0/x",
            "",
        ] {
            assert!(Ipv4Cidr::parse(bad).is_none(), "{bad}");
        }
    }
}
