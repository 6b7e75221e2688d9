//! A real seine-apiserver for tests: on a free loopback port, over an `Etcd`, with its own cert
//! directory and admin kubeconfig; stopped by PID and cleaned up on drop. `kubectl` and `curl` talk
//! to it as a user would.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{bin, etcd::Etcd, unique_prefix, wait_until, Process};

pub struct ApiServer {
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    pub cert_dir: PathBuf,
    log: PathBuf,
    /// The etcd endpoints and extra flags it runs with.
    args: Vec<String>,
    process: Option<Process>,
}

fn endpoints_and(endpoints: &[String], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["--etcd-servers".to_string(), endpoints.join(",")];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

impl ApiServer {
    pub fn start(etcd: &Etcd) -> Result<Self> {
        Self::start_with(etcd, &[])
    }

    /// Starts with extra flags (`--service-cluster-ip-range ...`, `--watch-cache-size ...`).
    pub fn start_with(etcd: &Etcd, extra: &[&str]) -> Result<Self> {
        Self::start_on(&etcd.endpoints(), extra)
    }

    /// Starts on the given etcd endpoints (several for a cluster).
    pub fn start_on(endpoints: &[String], extra: &[&str]) -> Result<Self> {
        let name = unique_prefix("apiserver");
        let port = crate::free_port()?;
        let mut server = ApiServer {
            addr: ([127, 0, 0, 1], port).into(),
            cert_dir: std::env::temp_dir().join(format!("{name}.pki")),
            kubeconfig: std::env::temp_dir().join(format!("{name}.kubeconfig")),
            log: std::env::temp_dir().join(format!("{name}.log")),
            args: endpoints_and(endpoints, extra),
            process: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts the server again after `stop`, on the same port and files: clients keep their
    /// kubeconfig.
    pub fn restart(&mut self) -> Result<()> {
        if self
            .process
            .as_mut()
            .is_some_and(|p| p.child.try_wait().ok().flatten().is_none())
        {
            bail!("seine-apiserver is still running");
        }
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let port = self.addr.port().to_string();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("seine-apiserver")?)
            .args(&self.args)
            .args(["--bind-address", "127.0.0.1", "--secure-port", &port])
            .arg("--cert-dir")
            .arg(&self.cert_dir)
            .arg("--write-kubeconfig")
            .arg(&self.kubeconfig)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting seine-apiserver")?;
        let process = Process {
            child,
            name: "seine-apiserver".into(),
            log: self.log.clone(),
        };
        let (kubeconfig, addr) = (&self.kubeconfig, self.addr);
        let ready = wait_until(Duration::from_secs(30), || {
            kubeconfig.exists()
                && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        if ready.is_err() {
            bail!("seine-apiserver did not start:\n{}", process.log_text());
        }
        self.process = Some(process);
        Ok(())
    }

    /// SIGTERM, then the exit status (a kill after 5 s, if it comes to that).
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        match &mut self.process {
            Some(process) => process.stop(),
            None => bail!("seine-apiserver is not running"),
        }
    }

    /// The server's process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// What the server keeps on disk: its cert directory, kubeconfig and log.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![
            self.cert_dir.clone(),
            self.kubeconfig.clone(),
            self.log.clone(),
        ]
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A kube-rs client with the admin kubeconfig, as Seine's agents make one.
    pub async fn kube_client(&self) -> kube::Client {
        seine_component_base::client(Some(&self.kubeconfig))
            .await
            .expect("a client from the admin kubeconfig")
    }

    /// A kube-rs client for benchmarks: the admin kubeconfig, with a 120 s read timeout for
    /// answers that take long under load.
    pub async fn bench_client(&self) -> Result<kube::Client> {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        config.read_timeout = Some(Duration::from_secs(120));
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs kubectl against this server; returns its output, failing or not.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .context("running kubectl")
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn admin_token(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.cert_dir.join("admin.token"))?
            .trim()
            .to_string())
    }

    /// One HTTPS request with curl (trusting the server's CA); returns (status, headers, body).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, String, String)> {
        let url = format!("https://{}{path}", self.addr);
        let ca = self.cert_dir.join("ca.crt");
        let mut cmd = Command::new("curl");
        // HTTP/1.1, so that a refused large body is refused before it is sent (100-continue).
        cmd.args(["-sS", "--http1.1", "-D", "-", "-X", method, "--cacert"])
            .arg(&ca)
            .args(["-H", &format!("Content-Type: {content_type}")]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        if body.is_some() {
            cmd.args(["--data-binary", "@-"]);
        }
        cmd.arg(&url).stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut child = cmd.spawn().context("running curl")?;
        if let (Some(body), Some(mut stdin)) = (body, child.stdin.take()) {
            use std::io::Write as _;
            stdin.write_all(body)?;
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut rest = text.as_str();
        // Interim responses (100 Continue) come first, each with its own header block.
        while rest.starts_with("HTTP/1.1 1") {
            rest = rest.split_once("\r\n\r\n").map_or("", |(_, r)| r);
        }
        let (head, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no HTTP status from curl: {text:?}"))?;
        Ok((status, head.to_string(), body.to_string()))
    }
}

impl ApiServer {
    /// A request as the admin with a JSON body; returns the status and the JSON answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value)> {
        let token = self.admin_token()?;
        let body = body.map(Value::to_string);
        let (status, _, text) = self.request(
            method,
            path,
            Some(&token),
            content_type,
            body.as_deref().map(str::as_bytes),
        )?;
        let value = serde_json::from_str(&text)
            .with_context(|| format!("{method} {path}: the answer is not JSON: {text:?}"))?;
        Ok((status, value))
    }

    /// Sets a Pod's address through the status subresource, as a kubelet reports it.
    pub fn set_pod_ip(&self, namespace: &str, name: &str, ip: &str) -> Result<()> {
        let (code, out) = self.call(
            "PATCH",
            &format!("/api/v1/namespaces/{namespace}/pods/{name}/status"),
            "application/merge-patch+json",
            Some(&serde_json::json!({"status": {"podIP": ip, "podIPs": [{"ip": ip}]}})),
        )?;
        if code != 200 {
            bail!("setting the address of pod {namespace}/{name}: {code} {out}");
        }
        Ok(())
    }

    pub fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.call("GET", path, "application/json", None)
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.call("POST", path, "application/json", Some(body))
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.call("PUT", path, "application/json", Some(body))
    }

    pub fn merge_patch(&self, path: &str, body: &Value) -> Result<(u16, Value)> {
        self.call("PATCH", path, "application/merge-patch+json", Some(body))
    }

    pub fn delete(&self, path: &str, options: Option<&Value>) -> Result<(u16, Value)> {
        self.call("DELETE", path, "application/json", options)
    }

    /// A watch (`path` carries `?watch=true...`), read line by line as the server streams it.
    pub fn watch(&self, path: &str) -> Result<Watch> {
        let url = format!("https://{}{path}", self.addr);
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "--cacert"])
            .arg(self.cert_dir.join("ca.crt"))
            .args([
                "-H",
                &format!("Authorization: Bearer {}", self.admin_token()?),
            ])
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("running curl")?;
        let stdout = child.stdout.take().context("curl's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim().is_empty() {
                    continue;
                }
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Ok(Watch { child, rx })
    }
}

/// A watch stream being read; the curl behind it is stopped on drop.
pub struct Watch {
    child: Child,
    rx: mpsc::Receiver<Value>,
}

impl Watch {
    /// The next event, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Value> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next event that is not a BOOKMARK.
    pub fn next_change(&self, timeout: Duration) -> Option<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let event = self.next(left)?;
            if event["type"] != "BOOKMARK" {
                return Some(event);
            }
        }
    }

    /// Whether the server ended the stream (nothing more comes after the events already read).
    pub fn ended(&self, timeout: Duration) -> bool {
        matches!(
            self.rx.recv_timeout(timeout),
            Err(mpsc::RecvTimeoutError::Disconnected)
        )
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        drop(self.process.take());
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_dir_all(&self.cert_dir);
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}
