//! Desired state as users write it: a service frontend (VIP, port, protocol) with its backends.
//! Parsing is strict: a malformed frontend or backend is an error naming the input.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("invalid frontend {0:?}: expected VIP:PORT/PROTO, for example 10.96.0.10:80/tcp")]
    Frontend(String),
    #[error(
        "invalid backend {0:?}: expected IP:PORT[,active|terminating], for example 10.244.1.2:8080"
    )]
    Backend(String),
    #[error("invalid protocol {0:?}: expected tcp or udp")]
    Protocol(String),
    #[error("invalid port in {0:?}: expected 1-65535")]
    Port(String),
    #[error("{0}: IPv6 is not supported by the datapath yet")]
    Ipv6(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => seine_common::PROTO_TCP,
            Protocol::Udp => seine_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            seine_common::PROTO_TCP => Some(Protocol::Tcp),
            seine_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl FromStr for Protocol {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(ParseError::Protocol(s.to_string())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A service frontend: what clients connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl FromStr for Frontend {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::Frontend(s.to_string());
        let (addr, proto) = s.rsplit_once('/').ok_or_else(bad)?;
        let protocol = proto.parse()?;
        let (ip, port) = split_host_port(addr).ok_or_else(bad)?;
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        if ip.is_ipv6() {
            return Err(ParseError::Ipv6(s.to_string()));
        }
        let port = parse_port(port, s)?;
        Ok(Frontend { ip, port, protocol })
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}/{}", self.port, self.protocol),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}/{}", self.port, self.protocol),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Ready: takes new connections.
    Active,
    /// Terminating but still serving: takes new connections only when no ready backend is left.
    Terminating,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Terminating => "terminating",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendSpec {
    pub ip: IpAddr,
    pub port: u16,
    pub state: BackendState,
}

impl FromStr for BackendSpec {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::Backend(s.to_string());
        let (addr, state) = match s.split_once(',') {
            Some((addr, "active")) => (addr, BackendState::Active),
            Some((addr, "terminating")) => (addr, BackendState::Terminating),
            Some(_) => return Err(bad()),
            None => (s, BackendState::Active),
        };
        let (ip, port) = split_host_port(addr).ok_or_else(bad)?;
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        if ip.is_ipv6() {
            return Err(ParseError::Ipv6(s.to_string()));
        }
        let port = parse_port(port, s)?;
        Ok(BackendSpec { ip, port, state })
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.ip, self.port, self.state)
    }
}

/// One service frontend with its backends: the unit the datapath updates atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub frontend: Frontend,
    pub backends: Vec<BackendSpec>,
    /// ClientIP session affinity timeout in seconds; `None` for no affinity.
    pub affinity_timeout_secs: Option<u32>,
}

impl ServiceSpec {
    /// Backends in slot order (ready first, then terminating), each address once.
    pub fn normalized(&self) -> ServiceSpec {
        let mut backends = self.backends.clone();
        backends.sort_by_key(|b| (b.state, b.ip, b.port));
        backends.dedup_by_key(|b| (b.ip, b.port));
        ServiceSpec {
            frontend: self.frontend,
            backends,
            affinity_timeout_secs: self.affinity_timeout_secs,
        }
    }
}

fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port));
    }
    s.rsplit_once(':')
}

fn parse_port(port: &str, whole: &str) -> Result<u16, ParseError> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(ParseError::Port(whole.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontend_parses_vip_port_and_protocol() {
        let f: Frontend = "10.96.0.10:53/udp".parse().unwrap();
        assert_eq!(f.to_string(), "10.96.0.10:53/UDP");
        assert_eq!(f.protocol, Protocol::Udp);
    }

    #[test]
    fn malformed_frontends_are_rejected() {
        for bad in [
            "10.96.0.10:80",
            "10.96.0.10/tcp",
            "10.96.0.300:80/tcp",
            "10.96.0.10:0/tcp",
            "10.96.0.10:70000/tcp",
            "10.96.0.10:80/sctp",
            "",
        ] {
            assert!(bad.parse::<Frontend>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn backends_parse_with_optional_state() {
        let b: BackendSpec = "10.244.1.2:8080,terminating".parse().unwrap();
        assert_eq!(b.state, BackendState::Terminating);
        let b: BackendSpec = "10.244.1.2:8080".parse().unwrap();
        assert_eq!(b.state, BackendState::Active);
        assert!("10.244.1.2:8080,ready".parse::<BackendSpec>().is_err());
        assert!("10.244.1.2".parse::<BackendSpec>().is_err());
    }

    #[test]
    fn normalized_puts_ready_backends_first_and_drops_duplicates() {
        let spec = ServiceSpec {
            frontend: "10.96.0.1:80/tcp".parse().unwrap(),
            backends: vec![
                "10.0.0.3:80,terminating".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
                "10.0.0.2:80".parse().unwrap(),
            ],
            affinity_timeout_secs: None,
        };
        let n = spec.normalized();
        assert_eq!(n.backends.len(), 2);
        assert_eq!(n.backends[0].state, BackendState::Active);
    }
}
