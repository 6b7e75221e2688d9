//! A real etcd for tests: one member on loopback ports, a data directory of its own, stopped by PID
//! and removed on drop. It can be stopped and started again on the same data, to test outages.

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::{unique_prefix, wait_until, Process};

pub struct Etcd {
    pub client_url: String,
    client_addr: SocketAddr,
    peer_url: String,
    data_dir: PathBuf,
    name: String,
    process: Option<Process>,
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    pub fn start() -> Result<Self> {
        let name = unique_prefix("etcd");
        let data_dir = std::env::temp_dir().join(format!("{name}.data"));
        let client_addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
        let peer_url = format!("http://127.0.0.1:{}", free_port()?);
        let mut etcd = Etcd {
            client_url: format!("http://{client_addr}"),
            client_addr,
            peer_url,
            data_dir,
            name,
            process: None,
        };
        etcd.resume()?;
        Ok(etcd)
    }

    /// The client endpoints, as the API server's `--etcd-servers` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }

    /// Starts (again) on the same data directory and waits until it serves clients.
    pub fn resume(&mut self) -> Result<()> {
        let log = std::env::temp_dir().join(format!("{}.log", self.name));
        let child = Command::new("etcd")
            .args(["--name", &self.name])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args([
                "--initial-cluster",
                &format!("{}={}", self.name, self.peer_url),
            ])
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting etcd (Debian package etcd-server)")?;
        let process = Process {
            child,
            name: "etcd".into(),
            log,
        };
        let addr = self.client_addr;
        wait_until(Duration::from_secs(20), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .with_context(|| format!("etcd did not start:\n{}", process.log_text()))?;
        self.process = Some(process);
        Ok(())
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
