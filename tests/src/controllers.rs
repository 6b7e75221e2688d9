//! seine-controller-manager and seine-scheduler as real processes for tests: against an
//! `ApiServer`'s admin kubeconfig, health and metrics on a free loopback port, stopped by PID
//! (SIGTERM first) on drop.

use std::{
    fs::File,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{
    apiserver::ApiServer, bin, dns::http_get, etcd::Etcd, free_port, unique_prefix, wait_until,
    Process,
};

/// An etcd, a seine-apiserver on it and one daemon against that; dropped in this order, the
/// daemon first.
pub struct Cluster {
    pub daemon: Daemon,
    pub api: ApiServer,
    _etcd: Etcd,
}

impl Cluster {
    /// `program` (`seine-controller-manager` or `seine-scheduler`) with `flags`, started after
    /// `setup` has written what must be there before its first decisions.
    pub fn start(program: &str, flags: &[&str], setup: impl FnOnce(&ApiServer)) -> Result<Self> {
        let etcd = Etcd::start()?;
        let api = ApiServer::start(&etcd)?;
        setup(&api);
        let daemon = Daemon::start(program, &api, flags)?;
        Ok(Cluster {
            daemon,
            api,
            _etcd: etcd,
        })
    }

    /// seine-controller-manager with only `controllers`, without leader election.
    pub fn controller_manager(controllers: &str) -> Result<Self> {
        let flags = ["--leader-elect=false", "--controllers", controllers];
        Self::start("seine-controller-manager", &flags, |_| {})
    }

    /// Waits up to 30 s for `f`; panics naming `what`, with the daemon's log.
    pub fn wait(&self, what: &str, f: impl FnMut() -> bool) {
        if wait_until(Duration::from_secs(30), f).is_err() {
            panic!(
                "{what}: not within 30 s\n{} log:\n{}",
                self.daemon.process.name,
                self.daemon.log_text()
            );
        }
    }
}

/// One daemon process (controller manager or scheduler).
pub struct Daemon {
    pub process: Process,
    /// The port of /healthz, /readyz and /metrics.
    pub port: u16,
}

impl Daemon {
    /// `seine-controller-manager` with `extra` flags (`--controllers ...`,
    /// `--leader-elect=false`, ...); returns once /healthz answers.
    pub fn controller_manager(api: &ApiServer, extra: &[&str]) -> Result<Self> {
        Self::start("seine-controller-manager", api, extra)
    }

    pub fn scheduler(api: &ApiServer, extra: &[&str]) -> Result<Self> {
        Self::start("seine-scheduler", api, extra)
    }

    pub fn start(program: &str, api: &ApiServer, extra: &[&str]) -> Result<Self> {
        let name = unique_prefix(program);
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!("{name}.log"));
        let child = Command::new(bin(program)?)
            .arg("--kubeconfig")
            .arg(&api.kubeconfig)
            .args(["--port", &port.to_string()])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let mut daemon = Daemon {
            process: Process {
                child,
                name: program.into(),
                log,
            },
            port,
        };
        let up = wait_until(Duration::from_secs(20), || {
            matches!(daemon.process.child.try_wait(), Ok(Some(_)))
                || daemon.http("/healthz").is_ok_and(|(code, _)| code == 200)
        });
        if let Ok(Some(status)) = daemon.process.child.try_wait() {
            bail!(
                "{program} exited ({status}):\n{}",
                daemon.process.log_text()
            );
        }
        if up.is_err() {
            bail!(
                "{program} did not serve /healthz:\n{}",
                daemon.process.log_text()
            );
        }
        Ok(daemon)
    }

    /// GET a path of its HTTP endpoint: (status code, body).
    pub fn http(&self, path: &str) -> Result<(u16, String)> {
        http_get(&format!("http://127.0.0.1:{}{path}", self.port))
    }

    /// Whether it leads (its /readyz answers 200 only then).
    pub fn leads(&self) -> bool {
        self.http("/readyz").is_ok_and(|(code, _)| code == 200)
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    /// The log file, for cleanup.
    pub fn files(&self) -> Vec<std::path::PathBuf> {
        vec![self.process.log.clone()]
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.process.log);
    }
}
