//! The nf_tables rule events of a network namespace, read from netlink as the kernel commits
//! them: what an iptables-nft `nat` table holds, kept up to date rule by rule, and each commit
//! (a new generation) as it happens. `xtables-monitor` prints the same events but cannot enlarge
//! its socket buffer, and a commit of 10,000 Services (some 300,000 rules) overflows it; root may
//! force a buffer of any size.

use std::{collections::HashMap, os::fd::AsRawFd as _, time::Instant};

use anyhow::{Context, Result};

const NETLINK_NETFILTER: i32 = 12;
const NFNLGRP_NFTABLES: i32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWGEN: u16 = 15;
const NFPROTO_IPV4: u8 = 2;
/// A commit of 300,000 rule events fits with room to spare.
const RECEIVE_BUFFER: i32 = 1 << 30;

// Attribute types (linux/netfilter/nf_tables.h).
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFTA_TARGET_NAME: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CHAIN: u16 = 2;

/// One rule of the `nat` table, as far as the bench looks at it.
struct Rule {
    chain: String,
    dnat: bool,
    jump: Option<String>,
}

/// The IPv4 `nat` table as its events leave it.
#[derive(Default)]
pub struct NatTable {
    rules: HashMap<u64, Rule>,
    dnats: HashMap<String, usize>,
    /// (chain, jump target) -> rules.
    jumps: HashMap<(String, String), usize>,
}

impl NatTable {
    /// How many DNAT rules `chain` holds.
    pub fn dnats(&self, chain: &str) -> usize {
        self.dnats.get(chain).copied().unwrap_or(0)
    }

    /// Whether a rule of `from` jumps to `to`.
    pub fn jumps(&self, from: &str, to: &str) -> bool {
        self.jumps
            .get(&(from.to_string(), to.to_string()))
            .is_some_and(|n| *n > 0)
    }

    fn add(&mut self, handle: u64, rule: Rule) {
        if rule.dnat {
            *self.dnats.entry(rule.chain.clone()).or_default() += 1;
        }
        if let Some(to) = &rule.jump {
            *self
                .jumps
                .entry((rule.chain.clone(), to.clone()))
                .or_default() += 1;
        }
        self.rules.insert(handle, rule);
    }

    fn remove(&mut self, handle: u64) {
        let Some(rule) = self.rules.remove(&handle) else {
            return;
        };
        if rule.dnat {
            if let Some(n) = self.dnats.get_mut(&rule.chain) {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(to) = rule.jump {
            if let Some(n) = self.jumps.get_mut(&(rule.chain, to)) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// A netlink socket on the nf_tables events of the namespace of the thread that opens it.
pub struct NftMonitor {
    socket: std::os::fd::OwnedFd,
    buffer: Vec<u8>,
}

impl NftMonitor {
    pub fn open() -> Result<Self> {
        use std::os::fd::FromRawFd as _;
        // SAFETY: plain socket calls; the descriptor is owned from here on.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, NETLINK_NETFILTER) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("opening a netfilter socket");
        }
        let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let set = |level, name, value: i32| -> Result<()> {
            // SAFETY: an int option on our own socket.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    level,
                    name,
                    (&value as *const i32).cast(),
                    std::mem::size_of::<i32>() as u32,
                )
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error()).context("setting a socket option");
            }
            Ok(())
        };
        set(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RECEIVE_BUFFER)?;
        // Bound to the group (a membership added to an unbound socket receives nothing).
        // SAFETY: a zeroed sockaddr_nl is valid; we set its family and groups.
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as u16;
        address.nl_groups = 1 << (NFNLGRP_NFTABLES - 1);
        // SAFETY: binding our own socket to a valid address.
        let rc = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&address as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("joining the nf_tables events");
        }
        // A reader can look up between events (and stop).
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: a timeval option on our own socket.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("setting a receive timeout");
        }
        Ok(NftMonitor {
            socket,
            buffer: vec![0; 1 << 20],
        })
    }

    /// Applies events to `table` until a commit, and returns when it was received; `None` when
    /// no event came for 100 ms.
    pub fn next_commit(&mut self, table: &mut NatTable) -> Result<Option<Instant>> {
        loop {
            // SAFETY: reading into our own buffer.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    self.buffer.as_mut_ptr().cast(),
                    self.buffer.len(),
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => return Ok(None),
                    _ => {}
                }
                // ENOBUFS: events were lost, and the table no longer says what the kernel holds.
                return Err(err).context("receiving nf_tables events");
            }
            let received = Instant::now();
            let mut committed = false;
            for (kind, payload) in messages(&self.buffer[..n as usize]) {
                if kind >> 8 != NFNL_SUBSYS_NFTABLES || payload.len() < 4 {
                    continue;
                }
                let (family, attrs) = (payload[0], &payload[4..]);
                match kind & 0xff {
                    NFT_MSG_NEWGEN => committed = true,
                    NFT_MSG_NEWRULE | NFT_MSG_DELRULE if family == NFPROTO_IPV4 => {
                        let Some((handle, rule)) = parse_rule(attrs) else {
                            continue;
                        };
                        if kind & 0xff == NFT_MSG_NEWRULE {
                            table.add(handle, rule);
                        } else {
                            table.remove(handle);
                        }
                    }
                    _ => {}
                }
            }
            if committed {
                return Ok(Some(received));
            }
        }
    }
}

/// The (type, payload) of each netlink message in `buf`.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        if len < 16 || len > buf.len() {
            return None;
        }
        let payload = &buf[16..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, payload))
    })
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// The (type, value) of each attribute in `buf`, the nested flag cleared.
fn attributes(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align(len).min(buf.len())..];
        Some((kind, value))
    })
}

fn attribute(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attributes(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

fn string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

/// A rule of the IPv4 `nat` table: its handle, chain, whether it DNATs and where it jumps.
fn parse_rule(attrs: &[u8]) -> Option<(u64, Rule)> {
    if string(attribute(attrs, NFTA_RULE_TABLE)?) != "nat" {
        return None;
    }
    let chain = string(attribute(attrs, NFTA_RULE_CHAIN)?);
    let handle = u64::from_be_bytes(attribute(attrs, NFTA_RULE_HANDLE)?.try_into().ok()?);
    let mut rule = Rule {
        chain,
        dnat: false,
        jump: None,
    };
    let expressions = attribute(attrs, NFTA_RULE_EXPRESSIONS).unwrap_or_default();
    for (_, expr) in attributes(expressions).filter(|(k, _)| *k == NFTA_LIST_ELEM) {
        let name = attribute(expr, NFTA_EXPR_NAME)
            .map(string)
            .unwrap_or_default();
        let data = attribute(expr, NFTA_EXPR_DATA).unwrap_or_default();
        match name.as_str() {
            // iptables-nft writes DNAT as the xtables target, or as nf_tables' own `nat`
            // expression (which SNAT would be too; Seine's chains masquerade instead).
            "target" => {
                rule.dnat |=
                    attribute(data, NFTA_TARGET_NAME).map(string).as_deref() == Some("DNAT");
            }
            "nat" => rule.dnat = true,
            "immediate" => {
                rule.jump = attribute(data, NFTA_IMMEDIATE_DATA)
                    .and_then(|d| attribute(d, NFTA_DATA_VERDICT))
                    .and_then(|v| attribute(v, NFTA_VERDICT_CHAIN))
                    .map(string);
            }
            _ => {}
        }
    }
    Some((handle, rule))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{unique_prefix, Netns};

    /// Needs root: a namespace of its own, and iptables-nft writing into it.
    #[test]
    fn a_commit_of_iptables_nft_rules_is_read_rule_by_rule() {
        let ns = Netns::create(&unique_prefix("nftmon")).unwrap();
        let path = ns.path();
        let monitor = std::thread::spawn(move || -> Result<(NatTable, usize)> {
            crate::enter(&path)?;
            let mut monitor = NftMonitor::open()?;
            let mut table = NatTable::default();
            let mut commits = 0;
            let deadline = Instant::now() + std::time::Duration::from_secs(10);
            while commits < 2 && Instant::now() < deadline {
                if monitor.next_commit(&mut table)?.is_some() {
                    commits += 1;
                }
            }
            Ok((table, commits))
        });
        // Opened before the first write: the monitor sees both commits.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let restore = |rules: &str| {
            let out = ns
                .command(Path::new("iptables-nft-restore"))
                .arg("--noflush")
                .stdin(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write as _;
                    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
                    child.wait()
                })
                .unwrap();
            assert!(out.success());
        };
        restore(
            "*nat\n:SEINE-SERVICES - [0:0]\n:SEINE-SVC-A - [0:0]\n\
             -A SEINE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j SEINE-SVC-A\n\
             -A SEINE-SVC-A -m statistic --mode random --probability 0.5 -j MARK --or-mark 0x40000\n\
             -A SEINE-SVC-A -m mark --mark 0x40000/0x40000 -p tcp -j DNAT --to-destination 10.0.0.1:80\n\
             -A SEINE-SVC-A -p tcp -j DNAT --to-destination 10.0.0.2:80\nCOMMIT\n",
        );
        // A flush and rewrite of the chain: its old rules are deleted, one DNAT is left.
        restore(
            "*nat\n:SEINE-SVC-A - [0:0]\n\
             -A SEINE-SVC-A -p tcp -j DNAT --to-destination 10.0.0.2:80\nCOMMIT\n",
        );
        let (table, commits) = monitor.join().unwrap().unwrap();
        assert_eq!(commits, 2);
        assert!(table.jumps("SEINE-SERVICES", "SEINE-SVC-A"));
        assert!(!table.jumps("SEINE-SERVICES", "SEINE-SVC-B"));
        assert_eq!(table.dnats("SEINE-SVC-A"), 1);
    }
}
