//! A real etcd for tests: one member on loopback ports, a data directory of its own, stopped by PID
//! and removed on drop. It can be stopped and started again on the same data, to test outages.

use std::{
    fs::File,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{free_port, unique_prefix, wait_until, Process};

pub struct Etcd {
    pub client_url: String,
    client_addr: SocketAddr,
    peer_url: String,
    data_dir: PathBuf,
    name: String,
    /// `--initial-cluster`: this member alone, or every member of a cluster.
    initial_cluster: String,
    process: Option<Process>,
}

/// Runs `start` again (up to three times) when a port that was free when picked was taken by
/// another test before etcd bound it.
fn retry_on_port_clash<T>(mut start: impl FnMut() -> Result<T>) -> Result<T> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match start() {
            Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {}
            other => return other,
        }
    }
}

impl Etcd {
    /// A one-member etcd on free loopback ports.
    pub fn start() -> Result<Self> {
        retry_on_port_clash(Self::start_once)
    }

    fn start_once() -> Result<Self> {
        let name = unique_prefix("etcd");
        let data_dir = std::env::temp_dir().join(format!("{name}.data"));
        let client_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let mut etcd = Etcd {
            client_url: format!("http://{client_addr}"),
            client_addr,
            initial_cluster: format!("{name}={peer_url}"),
            peer_url,
            data_dir,
            name,
            process: None,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// A cluster of `size` members on loopback ports, all started.
    pub fn cluster(size: usize) -> Result<Vec<Self>> {
        retry_on_port_clash(|| Self::cluster_once(size))
    }

    fn cluster_once(size: usize) -> Result<Vec<Self>> {
        let token = unique_prefix("etcdc");
        let mut members = Vec::new();
        for i in 0..size {
            let name = format!("{token}-{i}");
            let client_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
            members.push(Etcd {
                client_url: format!("http://{client_addr}"),
                client_addr,
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                data_dir: std::env::temp_dir().join(format!("{name}.data")),
                name,
                initial_cluster: String::new(),
                process: None,
            });
        }
        let initial: Vec<String> = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect();
        for member in &mut members {
            member.initial_cluster = initial.join(",");
        }
        // Members wait for each other to elect a leader; start them all before waiting on any.
        for member in &mut members {
            member.spawn()?;
        }
        for member in &mut members {
            member.wait_serving()?;
        }
        Ok(members)
    }

    /// The member's process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// What the member keeps on disk: its data directory and log.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![
            self.data_dir.clone(),
            std::env::temp_dir().join(format!("{}.log", self.name)),
        ]
    }

    /// The client endpoints, as the API server's `--etcd-servers` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }

    /// Starts (again) on the same data directory and waits until it serves clients.
    pub fn resume(&mut self) -> Result<()> {
        self.spawn()?;
        self.wait_serving()
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::env::temp_dir().join(format!("{}.log", self.name));
        let child = Command::new("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args([
                "--initial-cluster-token",
                self.initial_cluster.split('=').next().unwrap_or("seine"),
            ])
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting etcd (Debian package etcd-server)")?;
        self.process = Some(Process {
            child,
            name: "etcd".into(),
            log,
        });
        Ok(())
    }

    /// Waits until the member answers on its client URL (or has exited: a port taken meanwhile).
    fn wait_serving(&mut self) -> Result<()> {
        let addr = self.client_addr;
        let health = format!("{}/health", self.client_url);
        let mut exited = false;
        let process = &mut self.process;
        let waited = wait_until(Duration::from_secs(30), || {
            if let Some(Ok(Some(_))) = process.as_mut().map(|p| p.child.try_wait()) {
                exited = true;
                return true;
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                && std::process::Command::new("curl")
                    .args(["-sf", "--max-time", "1", &health])
                    .output()
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\"")
                    })
        });
        let log = || {
            self.process
                .as_ref()
                .map(Process::log_text)
                .unwrap_or_default()
        };
        if exited {
            anyhow::bail!("etcd exited:\n{}", log());
        }
        waited.with_context(|| format!("etcd did not start:\n{}", log()))
    }

    /// Stops the member (SIGTERM); its data stays for `resume`.
    pub fn pause(&mut self) -> Result<()> {
        if let Some(mut process) = self.process.take() {
            process.stop()?;
        }
        Ok(())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.process.take();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{}.log", self.name)));
    }
}
