//! CIDRs as Kubernetes writes them: `IpCidr` of either family (service ranges, dual-stack, with
//! the `Family` names Services use), and `Ipv4Cidr` for the overlay's node and pod ranges. Both
//! keep the network address with host bits cleared, and the prefix length.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// An IP family, by the names Services use (`IPv4`, `IPv6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// The address of this family with `value` as its number.
    pub fn address(self, value: u128) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(value)),
        }
    }
}

/// An address as a number, for arithmetic over either family.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// A CIDR of either family (`10.96.0.0/12`, `fd00:10:96::/112`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpCidr {
    pub family: Family,
    /// The network address as a number, host bits cleared.
    pub network: u128,
    pub len: u32,
}

impl IpCidr {
    /// `address/len` of either family; host bits set in the address are cleared.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (address/length)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an IP address"))?;
        let family = Family::of(addr);
        let len: u32 = len
            .parse()
            .ok()
            .filter(|l| *l <= family.bits())
            .ok_or_else(|| {
                format!(
                    "{text:?}: the prefix length must be between 0 and {}",
                    family.bits()
                )
            })?;
        Ok(IpCidr {
            family,
            network: masked(to_u128(addr), family.bits() - len),
            len,
        })
    }

    pub fn host_bits(&self) -> u32 {
        self.family.bits() - self.len
    }

    /// The network address.
    pub fn network_address(&self) -> IpAddr {
        self.family.address(self.network)
    }

    /// Whether `ip` is in the range (its network and broadcast addresses included).
    pub fn contains_ip(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family && masked(to_u128(ip), self.host_bits()) == self.network
    }

    /// Whether `other` lies wholly inside this range.
    pub fn contains(&self, other: &IpCidr) -> bool {
        self.family == other.family
            && self.len <= other.len
            && masked(other.network, self.host_bits()) == self.network
    }
}

fn masked(value: u128, host_bits: u32) -> u128 {
    match host_bits {
        128 => 0,
        host => (value >> host) << host,
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network_address(), self.len)
    }
}

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

    fn c(text: &str) -> IpCidr {
        IpCidr::parse(text).unwrap()
    }

    #[test]
    fn cidrs_of_either_family_contain_addresses_and_narrower_cidrs_of_their_family() {
        let wide = c("10.100.0.0/16");
        assert!(wide.contains(&c("10.100.7.0/24")));
        assert!(!c("10.100.7.0/24").contains(&wide));
        assert!(wide.contains_ip("10.100.255.1".parse().unwrap()));
        assert!(!wide.contains_ip("10.101.0.1".parse().unwrap()));
        assert!(!wide.contains_ip("::ffff:10.100.0.1".parse().unwrap()));
        assert!(c("fd00:10:96::/112").contains_ip("fd00:10:96::a".parse().unwrap()));
        assert!(c("::/0").contains(&c("fd00::/8")));
        assert_eq!(c("10.100.3.4/16"), wide, "host bits are masked");
        assert_eq!(c("fd00:10:96::7/112").to_string(), "fd00:10:96::/112");
        assert_eq!(c("0.0.0.0/0").family.name(), "IPv4");
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "x/8",
            "fd00::/129",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(IpCidr::parse(bad).is_err(), "{bad}");
        }
    }

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
