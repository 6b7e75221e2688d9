//! The Corefile: CoreDNS's configuration format (a Caddyfile), read into server blocks and then into
//! the typed configuration of each plugin seine-dns implements. A directive or an option it does not
//! implement is an error naming its line, so that a Corefile never silently means something else
//! here than under CoreDNS.
//!
//! ```text
//! .:53 {
//!     errors
//!     health { lameduck 5s }
//!     kubernetes cluster.local in-addr.arpa ip6.arpa {
//!        pods insecure
//!        fallthrough in-addr.arpa ip6.arpa
//!     }
//!     forward . /etc/resolv.conf
//!     cache 30
//! }
//! ```

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use seine_apimachinery::duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Corefile line {line}: {message}")]
pub struct CorefileError {
    pub line: usize,
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, CorefileError> {
    Err(CorefileError {
        line,
        message: message.into(),
    })
}

/// A directive (or an option inside a directive's block) with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub name: String,
    pub args: Vec<String>,
    pub block: Vec<Directive>,
    pub line: usize,
}

/// A server block: the zones and port it serves, and its directives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerBlock {
    pub keys: Vec<String>,
    pub directives: Vec<Directive>,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Open,
    Close,
}

/// Splits the text into tokens with their line numbers; a newline ends a directive, so tokens keep
/// the line they are on. `{$NAME}` is replaced with the environment variable, as CoreDNS does.
fn tokenize(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(Token, usize)>, CorefileError> {
    let mut tokens = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let mut chars = raw.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                chars.next();
            } else if c == '#' {
                break;
            } else if c == '"' {
                chars.next();
                let mut word = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => {
                            if let Some(next) = chars.next() {
                                word.push(next);
                            }
                        }
                        Some(ch) => word.push(ch),
                        None => return err(line, "unterminated quoted string"),
                    }
                }
                tokens.push((Token::Word(word), line));
            } else {
                let mut word = String::new();
                while let Some(&ch) = chars.peek() {
                    if ch.is_whitespace() || ch == '"' || (ch == '#' && word.is_empty()) {
                        break;
                    }
                    word.push(ch);
                    chars.next();
                }
                let token = match word.as_str() {
                    "{" => Token::Open,
                    "}" => Token::Close,
                    _ => Token::Word(substitute(&word, env, line)?),
                };
                tokens.push((token, line));
            }
        }
    }
    Ok(tokens)
}

/// Replaces every `{$NAME}` in `word` with the environment variable's value.
fn substitute(
    word: &str,
    env: &dyn Fn(&str) -> Option<String>,
    line: usize,
) -> Result<String, CorefileError> {
    let mut out = String::new();
    let mut rest = word;
    while let Some(start) = rest.find("{$") {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + len];
        let Some(value) = env(name) else {
            return err(line, format!("environment variable {name} is not set"));
        };
        out.push_str(&rest[..start]);
        out.push_str(&value);
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Reads the directives of a block until its `}` (or the end, for `top`).
fn directives(
    tokens: &[(Token, usize)],
    pos: &mut usize,
    opened_at: usize,
) -> Result<Vec<Directive>, CorefileError> {
    let mut out = Vec::new();
    loop {
        let Some((token, line)) = tokens.get(*pos).cloned() else {
            return err(opened_at, "this block's '{' is never closed");
        };
        match token {
            Token::Close => {
                *pos += 1;
                return Ok(out);
            }
            Token::Open => return err(line, "'{' without a directive before it"),
            Token::Word(name) => {
                *pos += 1;
                let mut args = Vec::new();
                let mut block = Vec::new();
                while let Some((token, l)) = tokens.get(*pos).cloned() {
                    if l != line {
                        break;
                    }
                    match token {
                        Token::Word(w) => {
                            args.push(w);
                            *pos += 1;
                        }
                        Token::Open => {
                            *pos += 1;
                            block = directives(tokens, pos, l)?;
                            break;
                        }
                        Token::Close => break,
                    }
                }
                out.push(Directive {
                    name,
                    args,
                    block,
                    line,
                });
            }
        }
    }
}

/// Parses the server blocks of a Corefile.
pub fn parse_blocks(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<ServerBlock>, CorefileError> {
    let tokens = tokenize(text, env)?;
    let mut pos = 0;
    let mut blocks = Vec::new();
    while let Some((token, line)) = tokens.get(pos).cloned() {
        let mut keys = Vec::new();
        let mut current = token;
        loop {
            match current {
                Token::Word(w) => {
                    keys.extend(w.split(',').filter(|k| !k.is_empty()).map(str::to_string));
                    pos += 1;
                }
                Token::Open => {
                    pos += 1;
                    break;
                }
                Token::Close => return err(line, "'}' without a block to close"),
            }
            match tokens.get(pos) {
                Some((t, _)) => current = t.clone(),
                None => return err(line, "a server block needs '{' after its zones"),
            }
        }
        if keys.is_empty() {
            return err(
                line,
                "a server block needs at least one zone (for example `.:53`)",
            );
        }
        let directives = directives(&tokens, &mut pos, line)?;
        blocks.push(ServerBlock {
            keys,
            directives,
            line,
        });
    }
    if blocks.is_empty() {
        return err(1, "no server block");
    }
    Ok(blocks)
}

/// Where a server block listens, and for which zones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Zones, fully qualified and lower case (`.` for the root).
    pub zones: Vec<String>,
    pub port: u16,
}

/// A zone as a fully qualified, lower-case name.
/// Whether `name` is `zone` or below it (both lowercase fqdns).
pub fn in_zone(name: &str, zone: &str) -> bool {
    zone == "."
        || name == zone
        || (name.len() > zone.len()
            && name.ends_with(zone)
            && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

pub fn fqdn(zone: &str) -> String {
    let zone = zone.trim().to_ascii_lowercase();
    if zone == "." || zone.is_empty() {
        ".".to_string()
    } else if zone.ends_with('.') {
        zone
    } else {
        format!("{zone}.")
    }
}

/// The zones a zone argument stands for: a name, or a CIDR (`10.96.0.0/12`) as the reverse zones
/// that cover it, split at label boundaries as CoreDNS does (a /12 is 16 zones of a /16).
pub fn zones_of(arg: &str) -> Result<Vec<String>, String> {
    let Some((addr, prefix)) = arg.trim_end_matches('.').split_once('/') else {
        return Ok(vec![fqdn(arg)]);
    };
    let addr: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{arg}: {addr:?} is not an IP address"))?;
    let (bits, label_bits, suffix) = match addr {
        std::net::IpAddr::V4(_) => (32u32, 8u32, "in-addr.arpa."),
        std::net::IpAddr::V6(_) => (128, 4, "ip6.arpa."),
    };
    let prefix: u32 = match prefix.parse() {
        Ok(p) if p <= bits => p,
        _ => {
            return Err(format!(
                "{arg}: {prefix:?} is not a prefix length of 0 to {bits}"
            ))
        }
    };
    let value: u128 = match addr {
        std::net::IpAddr::V4(v4) => u128::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => u128::from(v6),
    };
    let labels = prefix.div_ceil(label_bits);
    let zone_bits = labels * label_bits;
    let network = if prefix == 0 {
        0
    } else {
        value >> (bits - prefix) << (bits - prefix)
    };
    Ok((0..1u128 << (zone_bits - prefix))
        .map(|i| {
            let subnet = (network >> (bits - zone_bits)) + i;
            let mut zone = String::new();
            for l in 0..labels {
                let label = (subnet >> (l * label_bits)) & ((1 << label_bits) - 1);
                zone.push_str(&if label_bits == 8 {
                    format!("{label}.")
                } else {
                    format!("{label:x}.")
                });
            }
            zone + suffix
        })
        .collect())
}

fn listen(block: &ServerBlock, default_port: u16) -> Result<Listen, CorefileError> {
    let mut zones = Vec::new();
    let mut port = None;
    for key in &block.keys {
        let key = key.strip_prefix("dns://").unwrap_or(key);
        if key.contains("://") {
            return err(
                block.line,
                format!("{key}: only dns:// servers are supported"),
            );
        }
        let (zone, key_port) = match key.rsplit_once(':') {
            Some((z, p)) => match p.parse::<u16>() {
                Ok(p) => (z, Some(p)),
                Err(_) => return err(block.line, format!("{key}: {p:?} is not a port")),
            },
            None => (key, None),
        };
        let key_port = key_port.unwrap_or(default_port);
        if port.is_some_and(|p| p != key_port) {
            return err(
                block.line,
                "the zones of one server block must share a port",
            );
        }
        port = Some(key_port);
        zones.extend(zones_of(zone).or_else(|e| err(block.line, e))?);
    }
    Ok(Listen {
        zones,
        port: port.unwrap_or(default_port),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodsMode {
    /// No pod records (CoreDNS's default).
    #[default]
    Disabled,
    /// `1-2-3-4.ns.pod.<zone>` answers with the address in the name, whether or not a pod has it.
    Insecure,
    /// Only when a pod in that namespace has that address.
    Verified,
}

/// The `kubernetes` plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kubernetes {
    pub zones: Vec<String>,
    pub endpoint: Option<String>,
    /// Client certificate, key and CA for `endpoint`.
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// A kubeconfig file and, optionally, the context to use.
    pub kubeconfig: Option<(PathBuf, Option<String>)>,
    pub namespaces: Vec<String>,
    pub pods: PodsMode,
    pub endpoint_pod_names: bool,
    pub ttl: u32,
    /// Zones for which a name that is not found goes on to the next plugin; empty for all.
    pub fallthrough: Option<Vec<String>>,
    pub ignore_empty_service: bool,
    pub noendpoints: bool,
    pub startup_timeout: Duration,
}

/// The `forward` plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub from: String,
    /// Upstreams as written: addresses (`8.8.8.8`, `8.8.8.8:53`, `dns://...`) or a resolv.conf path.
    pub to: Vec<String>,
    pub except: Vec<String>,
    pub max_fails: u32,
    pub health_check: Duration,
    pub expire: Duration,
    pub policy: Policy,
    pub force_tcp: bool,
    pub prefer_udp: bool,
    pub max_concurrent: Option<u32>,
}

impl Forward {
    /// `forward FROM TO...` with CoreDNS's defaults for every option.
    pub fn defaults(from: String, to: Vec<String>) -> Self {
        Forward {
            from,
            to,
            except: Vec::new(),
            max_fails: 2,
            health_check: Duration::from_millis(500),
            expire: Duration::from_secs(10),
            policy: Policy::Random,
            force_tcp: false,
            prefer_udp: false,
            max_concurrent: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Random,
    RoundRobin,
    Sequential,
}

/// One of the cache's two halves (answers, or NXDOMAIN/NODATA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheBucket {
    pub capacity: usize,
    pub max_ttl: u32,
    pub min_ttl: u32,
}

/// The `cache` plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    pub zones: Vec<String>,
    pub success: CacheBucket,
    pub denial: CacheBucket,
    /// Prefetch when a name was asked `amount` times within `duration`, at `percentage` of its TTL left.
    pub prefetch: Option<(u32, Duration, u8)>,
    /// Answer from an expired entry for up to this long while refreshing it.
    pub serve_stale: Option<Duration>,
}

/// Everything one server block asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub listen: Listen,
    pub errors: bool,
    pub log: bool,
    /// `health [ADDRESS] { lameduck DURATION }`.
    pub health: Option<(SocketAddr, Duration)>,
    pub ready: Option<SocketAddr>,
    pub prometheus: Option<SocketAddr>,
    pub kubernetes: Option<Kubernetes>,
    pub forward: Option<Forward>,
    pub cache: Option<Cache>,
    pub loop_detect: bool,
    /// `reload [INTERVAL [JITTER]]`.
    pub reload: Option<(Duration, Duration)>,
    pub loadbalance: bool,
    /// `hosts` and others CoreDNS has are not here: they are refused by name.
    pub line: usize,
}

fn address(text: &str, default_port: u16, line: usize) -> Result<SocketAddr, CorefileError> {
    // CoreDNS writes `:8080` for every address and `localhost:9153`.
    let text = text.replace("localhost", "127.0.0.1");
    let full = if text.starts_with(':') {
        format!("0.0.0.0{text}")
    } else if text.contains(':') {
        text
    } else {
        format!("{text}:{default_port}")
    };
    full.parse()
        .or_else(|_| err(line, format!("{full:?} is not an address")))
}

fn duration_arg(d: &Directive, index: usize) -> Result<Duration, CorefileError> {
    let text = d.args.get(index).map(String::as_str).unwrap_or_default();
    duration::parse(text).map_err(|e| CorefileError {
        line: d.line,
        message: format!("{}: {text:?} is {e}", d.name),
    })
}

fn number_arg<T>(d: &Directive, index: usize) -> Result<T, CorefileError>
where
    T: std::str::FromStr<Err = std::num::ParseIntError> + num_max::Max,
{
    let text = d.args.get(index).map(String::as_str).unwrap_or_default();
    text.parse().or_else(|e: std::num::ParseIntError| {
        let reason = match e.kind() {
            std::num::IntErrorKind::PosOverflow => format!("is too large (at most {})", T::MAX),
            _ => "is not a valid number".to_string(),
        };
        err(d.line, format!("{}: {text:?} {reason}", d.name))
    })
}

/// The largest value of the number types Corefile options take, for the "too large" message.
mod num_max {
    pub trait Max {
        const MAX: u64;
    }
    impl Max for u8 {
        const MAX: u64 = u8::MAX as u64;
    }
    impl Max for u16 {
        const MAX: u64 = u16::MAX as u64;
    }
    impl Max for u32 {
        const MAX: u64 = u32::MAX as u64;
    }
    impl Max for usize {
        const MAX: u64 = usize::MAX as u64;
    }
}

fn no_args(d: &Directive) -> Result<(), CorefileError> {
    if d.args.is_empty() {
        Ok(())
    } else {
        err(d.line, format!("{} takes no arguments", d.name))
    }
}

fn no_block(d: &Directive) -> Result<(), CorefileError> {
    match d.block.first() {
        None => Ok(()),
        Some(o) => err(o.line, format!("{} has no option {:?}", d.name, o.name)),
    }
}

fn kubernetes(d: &Directive, server_zones: &[String]) -> Result<Kubernetes, CorefileError> {
    let mut k = Kubernetes {
        zones: if d.args.is_empty() {
            server_zones.to_vec()
        } else {
            let mut zones = Vec::new();
            for z in &d.args {
                zones.extend(zones_of(z).or_else(|e| err(d.line, e))?);
            }
            zones
        },
        endpoint: None,
        tls: None,
        kubeconfig: None,
        namespaces: Vec::new(),
        pods: PodsMode::Disabled,
        endpoint_pod_names: false,
        ttl: 5,
        fallthrough: None,
        ignore_empty_service: false,
        noendpoints: false,
        startup_timeout: Duration::from_secs(5),
    };
    for o in &d.block {
        no_block(o)?;
        match o.name.as_str() {
            "endpoint" => match o.args.as_slice() {
                [url] => k.endpoint = Some(url.clone()),
                _ => return err(o.line, "endpoint takes one URL"),
            },
            "tls" => match o.args.as_slice() {
                [cert, key, ca] => k.tls = Some((cert.into(), key.into(), ca.into())),
                _ => return err(o.line, "tls takes CERT KEY CACERT"),
            },
            "kubeconfig" => match o.args.as_slice() {
                [path] => k.kubeconfig = Some((path.into(), None)),
                [path, context] => k.kubeconfig = Some((path.into(), Some(context.clone()))),
                _ => return err(o.line, "kubeconfig takes KUBECONFIG [CONTEXT]"),
            },
            "namespaces" => k.namespaces = o.args.clone(),
            "pods" => {
                k.pods = match o.args.as_slice() {
                    [m] if m == "disabled" => PodsMode::Disabled,
                    [m] if m == "insecure" => PodsMode::Insecure,
                    [m] if m == "verified" => PodsMode::Verified,
                    _ => return err(o.line, "pods takes disabled, insecure or verified"),
                }
            }
            "endpoint_pod_names" => {
                no_args(o)?;
                k.endpoint_pod_names = true;
            }
            "ttl" => {
                let ttl: u32 = number_arg(o, 0)?;
                if ttl > 3600 {
                    return err(o.line, "ttl must be from 0 to 3600");
                }
                k.ttl = ttl;
            }
            "fallthrough" => {
                let mut zones = Vec::new();
                for z in &o.args {
                    zones.extend(zones_of(z).or_else(|e| err(o.line, e))?);
                }
                k.fallthrough = Some(zones);
            }
            "ignore" => match o.args.as_slice() {
                [w] if w == "empty_service" => k.ignore_empty_service = true,
                _ => return err(o.line, "ignore takes empty_service"),
            },
            "noendpoints" => {
                no_args(o)?;
                k.noendpoints = true;
            }
            "startup_timeout" => k.startup_timeout = duration_arg(o, 0)?,
            other => {
                return err(
                    o.line,
                    format!("kubernetes: option {other:?} is not supported by seine-dns"),
                )
            }
        }
    }
    Ok(k)
}

fn forward(d: &Directive) -> Result<Forward, CorefileError> {
    let [from, to @ ..] = d.args.as_slice() else {
        return err(d.line, "forward takes FROM TO...");
    };
    if to.is_empty() {
        return err(d.line, "forward needs at least one upstream");
    }
    let mut f = Forward::defaults(fqdn(from), to.to_vec());
    for o in &d.block {
        no_block(o)?;
        match o.name.as_str() {
            "except" => f.except = o.args.iter().map(|z| fqdn(z)).collect(),
            "max_fails" => f.max_fails = number_arg(o, 0)?,
            "health_check" => f.health_check = duration_arg(o, 0)?,
            "expire" => f.expire = duration_arg(o, 0)?,
            "force_tcp" => f.force_tcp = true,
            "prefer_udp" => f.prefer_udp = true,
            "max_concurrent" => f.max_concurrent = Some(number_arg(o, 0)?),
            "policy" => {
                f.policy = match o.args.first().map(String::as_str) {
                    Some("random") => Policy::Random,
                    Some("round_robin") => Policy::RoundRobin,
                    Some("sequential") => Policy::Sequential,
                    _ => return err(o.line, "policy takes random, round_robin or sequential"),
                }
            }
            other => {
                return err(
                    o.line,
                    format!("forward: option {other:?} is not supported by seine-dns"),
                )
            }
        }
    }
    Ok(f)
}

fn cache(d: &Directive) -> Result<Cache, CorefileError> {
    let mut max_ttl = 3600;
    let mut zones = Vec::new();
    for (i, arg) in d.args.iter().enumerate() {
        // A first argument of digits is the TTL, never a zone: one too large is refused.
        if i == 0 && arg.bytes().all(|b| b.is_ascii_digit()) {
            max_ttl = number_arg(d, 0)?;
            continue;
        }
        zones.push(fqdn(arg));
    }
    let bucket = |ttl| CacheBucket {
        capacity: 9984,
        max_ttl: ttl,
        min_ttl: 5,
    };
    let mut c = Cache {
        zones,
        success: bucket(max_ttl),
        denial: CacheBucket {
            max_ttl: max_ttl.min(1800),
            ..bucket(max_ttl)
        },
        prefetch: None,
        serve_stale: None,
    };
    for o in &d.block {
        no_block(o)?;
        match o.name.as_str() {
            "success" | "denial" => {
                let mut b = CacheBucket {
                    capacity: number_arg(o, 0)?,
                    ..if o.name == "success" {
                        c.success
                    } else {
                        c.denial
                    }
                };
                if o.args.len() > 1 {
                    b.max_ttl = number_arg(o, 1)?;
                }
                if o.args.len() > 2 {
                    b.min_ttl = number_arg(o, 2)?;
                }
                if o.name == "success" {
                    c.success = b;
                } else {
                    c.denial = b;
                }
            }
            "prefetch" => {
                let amount = number_arg(o, 0)?;
                let duration = if o.args.len() > 1 {
                    duration_arg(o, 1)?
                } else {
                    Duration::from_secs(60)
                };
                let percentage = match o.args.get(2) {
                    Some(p) => p
                        .trim_end_matches('%')
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= 100)
                        .ok_or_else(|| CorefileError {
                            line: o.line,
                            message: format!("prefetch: {p:?} is not a percentage"),
                        })?,
                    None => 10,
                };
                c.prefetch = Some((amount, duration, percentage));
            }
            "serve_stale" => {
                c.serve_stale = Some(if o.args.is_empty() {
                    Duration::from_secs(3600)
                } else {
                    duration_arg(o, 0)?
                })
            }
            other => {
                return err(
                    o.line,
                    format!("cache: option {other:?} is not supported by seine-dns"),
                )
            }
        }
    }
    Ok(c)
}

/// Parses a Corefile into its servers. `default_port` is `-dns.port` (53).
pub fn parse(
    text: &str,
    default_port: u16,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<Server>, CorefileError> {
    let mut servers = Vec::new();
    for block in parse_blocks(text, env)? {
        let listen = listen(&block, default_port)?;
        let mut s = Server {
            listen,
            errors: false,
            log: false,
            health: None,
            ready: None,
            prometheus: None,
            kubernetes: None,
            forward: None,
            cache: None,
            loop_detect: false,
            reload: None,
            loadbalance: false,
            line: block.line,
        };
        for d in &block.directives {
            let twice = |what: bool| -> Result<(), CorefileError> {
                if what {
                    err(
                        d.line,
                        format!("{} appears twice in this server block", d.name),
                    )
                } else {
                    Ok(())
                }
            };
            match d.name.as_str() {
                "errors" => {
                    no_block(d)?;
                    s.errors = true;
                }
                "log" => {
                    no_block(d)?;
                    s.log = true;
                }
                "health" => {
                    twice(s.health.is_some())?;
                    let addr =
                        address(d.args.first().map_or(":8080", String::as_str), 8080, d.line)?;
                    let mut lameduck = Duration::ZERO;
                    for o in &d.block {
                        match o.name.as_str() {
                            "lameduck" => lameduck = duration_arg(o, 0)?,
                            other => return err(o.line, format!("health has no option {other:?}")),
                        }
                    }
                    s.health = Some((addr, lameduck));
                }
                "ready" => {
                    twice(s.ready.is_some())?;
                    no_block(d)?;
                    s.ready = Some(address(
                        d.args.first().map_or(":8181", String::as_str),
                        8181,
                        d.line,
                    )?);
                }
                "prometheus" => {
                    twice(s.prometheus.is_some())?;
                    no_block(d)?;
                    s.prometheus = Some(address(
                        d.args.first().map_or("localhost:9153", String::as_str),
                        9153,
                        d.line,
                    )?);
                }
                "kubernetes" => {
                    twice(s.kubernetes.is_some())?;
                    s.kubernetes = Some(kubernetes(d, &s.listen.zones)?);
                }
                "forward" => {
                    twice(s.forward.is_some())?;
                    s.forward = Some(forward(d)?);
                }
                "cache" => {
                    twice(s.cache.is_some())?;
                    s.cache = Some(cache(d)?);
                }
                "loop" => {
                    no_args(d)?;
                    s.loop_detect = true;
                }
                "reload" => {
                    no_block(d)?;
                    let interval = if d.args.is_empty() {
                        Duration::from_secs(30)
                    } else {
                        duration_arg(d, 0)?
                    };
                    let jitter = if d.args.len() > 1 {
                        duration_arg(d, 1)?
                    } else {
                        interval / 2
                    };
                    s.reload = Some((interval, jitter));
                }
                "loadbalance" => {
                    match d.args.first().map(String::as_str) {
                        None | Some("round_robin") => {}
                        Some(other) => {
                            return err(
                                d.line,
                                format!("loadbalance: policy {other:?} is not supported"),
                            )
                        }
                    }
                    s.loadbalance = true;
                }
                other => {
                    return err(
                        d.line,
                        format!("the directive {other:?} is not supported by seine-dns"),
                    )
                }
            }
        }
        servers.push(s);
    }
    Ok(servers)
}

#[cfg(test)]
mod tests;
