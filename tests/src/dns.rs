//! DNS servers for tests and benches: seine-dns started from a Corefile as CoreDNS is, knotd (Debian
//! `knot`) serving a static zone, and `dig` run as a user would, its output read back. Every server
//! listens on free loopback ports, is stopped by PID and has its files removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{bin, free_port, unique_prefix, wait_until, Process};

/// The ports a seine-dns under test uses.
#[derive(Debug, Clone, Copy)]
pub struct DnsPorts {
    pub dns: u16,
    pub health: u16,
    pub ready: u16,
    pub metrics: u16,
}

impl DnsPorts {
    pub fn pick() -> Result<Self> {
        Ok(DnsPorts {
            dns: free_port()?,
            health: free_port()?,
            ready: free_port()?,
            metrics: free_port()?,
        })
    }
}

/// The Corefile Kubernetes installers ship (kubeadm's), pointed at a kubeconfig and an upstream,
/// on test ports.
pub fn kubeadm_corefile(ports: DnsPorts, kubeconfig: &Path, upstream: &str) -> String {
    format!(
        r#".:{dns} {{
    errors
    health {{
       lameduck 1s
    }}
    ready 127.0.0.1:{ready}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
       kubeconfig {kubeconfig}
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }}
    prometheus 127.0.0.1:{metrics}
    forward . {upstream} {{
       max_concurrent 1000
    }}
    cache 30
    loop
    reload 2s 1s
    loadbalance
}}
"#,
        dns = ports.dns,
        ready = ports.ready,
        metrics = ports.metrics,
        kubeconfig = kubeconfig.display(),
    )
    .replace("health {", &format!("health 127.0.0.1:{} {{", ports.health))
}

/// A running seine-dns.
pub struct SeineDns {
    pub ports: DnsPorts,
    pub corefile: PathBuf,
    pub process: Process,
    dir: PathBuf,
}

impl SeineDns {
    /// Writes `corefile` and starts `seine-dns -conf FILE -dns.port PORT`; returns once /health
    /// answers (or the process has exited, which is an error with its log).
    pub fn start(ports: DnsPorts, corefile: &str) -> Result<Self> {
        Self::start_with(ports, corefile, &[])
    }

    pub fn start_with(ports: DnsPorts, corefile: &str, extra: &[&str]) -> Result<Self> {
        Self::spawn(ports, corefile, extra, None)
    }

    /// Starts it pinned to one CPU (`taskset`), for benches.
    pub fn start_on_cpu(ports: DnsPorts, corefile: &str, cpu: Option<usize>) -> Result<Self> {
        Self::spawn(ports, corefile, &[], cpu)
    }

    fn spawn(ports: DnsPorts, corefile: &str, extra: &[&str], cpu: Option<usize>) -> Result<Self> {
        let name = unique_prefix("seine-dns");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("Corefile");
        std::fs::write(&conf, corefile)?;
        let log = dir.join("log");
        let mut cmd = match cpu {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &c.to_string()]).arg(bin("seine-dns")?);
                cmd
            }
            None => Command::new(bin("seine-dns")?),
        };
        let child = cmd
            .arg("-conf")
            .arg(&conf)
            .args(["-dns.port", &ports.dns.to_string()])
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting seine-dns")?;
        let mut dns = SeineDns {
            ports,
            corefile: conf,
            process: Process { child, name, log },
            dir,
        };
        let health = format!("http://127.0.0.1:{}/health", ports.health);
        let started = wait_until(Duration::from_secs(20), || {
            matches!(dns.process.child.try_wait(), Ok(Some(_))) || http_get(&health).is_ok()
        });
        if let Ok(Some(status)) = dns.process.child.try_wait() {
            bail!("seine-dns exited ({status}): {}", dns.process.log_text());
        }
        started.with_context(|| format!("seine-dns /health: {}", dns.process.log_text()))?;
        Ok(dns)
    }

    /// Waits until DNS answers on the port (the server binds DNS after the first sync).
    pub fn wait_serving(&self) -> Result<()> {
        wait_until(Duration::from_secs(20), || {
            dig(self.ports.dns, &["dns-version.cluster.local", "TXT"]).is_ok()
        })
        .with_context(|| format!("seine-dns not answering: {}", self.process.log_text()))
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// What it keeps on disk (its Corefile and log).
    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.dir.clone()]
    }

    pub fn metrics(&self) -> Result<String> {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.ports.metrics)).map(|(_, b)| b)
    }
}

impl Drop for SeineDns {
    fn drop(&mut self) {
        let _ = self.process.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A GET with curl: (status, body).
pub fn http_get(url: &str) -> Result<(u16, String)> {
    let out = Command::new("curl")
        .args(["-s", "-m", "2", "-w", "\n%{http_code}", url])
        .output()?;
    if !out.status.success() {
        bail!("curl {url}: exit {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

/// knotd serving static zones on a loopback port.
pub struct Knot {
    pub port: u16,
    dir: PathBuf,
    process: Option<Process>,
}

impl Knot {
    /// Starts knotd with `zones` (origin, zone file text), pinned to `cpu` when given.
    pub fn start(zones: &[(&str, String)], cpu: Option<usize>) -> Result<Self> {
        let name = unique_prefix("knot");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let mut conf = format!(
            "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: {d}\n\
             log:\n  - target: stderr\n    any: warning\n\
             zone:\n",
            d = dir.display()
        );
        for (origin, text) in zones {
            let file = dir.join(format!("{}zone", origin.trim_end_matches('.')));
            std::fs::write(&file, text)?;
            conf.push_str(&format!(
                "  - domain: {origin}\n    file: {}\n    zonefile-load: whole\n    journal-content: none\n",
                file.display()
            ));
        }
        let conf_path = dir.join("knot.conf");
        std::fs::write(&conf_path, conf)?;
        let log = dir.join("log");
        let mut cmd = match cpu {
            Some(c) => {
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &c.to_string(), "knotd"]);
                cmd
            }
            None => Command::new("knotd"),
        };
        let child = cmd
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting knotd (Debian package knot)")?;
        let mut knot = Knot {
            port,
            dir,
            process: Some(Process { child, name, log }),
        };
        let origin = zones.first().map(|z| z.0).unwrap_or(".");
        let ready = wait_until(Duration::from_secs(10), || {
            dig(port, &[origin, "SOA"]).is_ok_and(|d| d.status == "NOERROR")
        });
        if let Err(e) = ready {
            let log = knot
                .process
                .as_ref()
                .map(Process::log_text)
                .unwrap_or_default();
            knot.stop();
            bail!("knotd did not answer: {e}: {log}");
        }
        Ok(knot)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let _ = p.stop();
        }
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `dig` answer as its user reads it.
#[derive(Debug, Clone, Default)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    /// (name, ttl, type, data) of each section.
    pub answer: Vec<(String, u32, String, String)>,
    pub authority: Vec<(String, u32, String, String)>,
    pub additional: Vec<(String, u32, String, String)>,
    /// dig said the UDP answer was truncated and it retried over TCP.
    pub retried_tcp: bool,
    /// The answer came over TCP.
    pub tcp: bool,
    pub edns: bool,
    pub text: String,
}

impl Dig {
    /// The data of the answer records of `rtype`, sorted.
    pub fn data(&self, rtype: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .answer
            .iter()
            .filter(|r| r.2 == rtype)
            .map(|r| r.3.clone())
            .collect();
        v.sort();
        v
    }
}

/// `dig @127.0.0.1 -p PORT ARGS...` (one try, 2 s); an error when dig gets no answer at all.
pub fn dig(port: u16, args: &[&str]) -> Result<Dig> {
    let out = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .context("running dig (Debian package bind9-dnsutils)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("dig {} failed ({}): {text}", args.join(" "), out.status);
    }
    Ok(parse_dig(&text))
}

fn parse_dig(text: &str) -> Dig {
    let mut d = Dig {
        text: text.to_string(),
        ..Default::default()
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or_default().to_string();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest
                .split(';')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect();
        } else if line.starts_with(";; Truncated, retrying in TCP mode") {
            d.retried_tcp = true;
        } else if line.starts_with(";; SERVER:") {
            d.tcp = line.contains("(TCP)");
        } else if line.starts_with("; EDNS:") {
            d.edns = true;
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.trim().is_empty() || line.starts_with(';') {
            section = if line.trim().is_empty() { "" } else { section };
        } else {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() >= 5 {
                let rec = (
                    parts[0].to_string(),
                    parts[1].parse().unwrap_or(0),
                    parts[3].to_string(),
                    parts[4..].join(" "),
                );
                match section {
                    "answer" => d.answer.push(rec),
                    "authority" => d.authority.push(rec),
                    "additional" => d.additional.push(rec),
                    _ => {}
                }
            }
        }
    }
    d
}
