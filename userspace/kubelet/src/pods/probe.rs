//! A container instance's probes, as the kubelet's prober workers run them: startup first
//! (liveness and readiness wait for it), then liveness and readiness each on its period, with
//! the initial delay, timeout and success and failure thresholds. `httpGet` and `tcpSocket` go
//! to the pod's IP from the node; `exec` runs through the runtime's ExecSync.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, ObjectReference, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use seine_component_base::events::Recorder;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::Notify,
};
use tokio_util::sync::CancellationToken;

use crate::cri::Runtime;

/// The verdicts of one container instance's probes, read by its pod worker.
#[derive(Debug)]
pub struct Verdicts {
    pub started: AtomicBool,
    pub ready: AtomicBool,
    /// Set when liveness (or startup) failed its threshold: the instance is to be killed.
    pub failed: std::sync::Mutex<Option<String>>,
}

impl Verdicts {
    fn new(container: &Container) -> Self {
        Verdicts {
            started: AtomicBool::new(container.startup_probe.is_none()),
            ready: AtomicBool::new(container.readiness_probe.is_none()),
            failed: Default::default(),
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

/// What a probe needs to reach its container.
#[derive(Clone)]
pub struct Target {
    pub runtime: Runtime,
    pub container_id: String,
    pub pod_ip: Option<String>,
    pub container: Container,
    pub recorder: Recorder,
    pub pod_ref: ObjectReference,
}

fn seconds(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(0) as u64)
}

/// Starts the probes of a container instance; they stop with `stop` (the instance's end).
/// `wake` is notified when a verdict changes.
pub fn start(target: Target, wake: Arc<Notify>, stop: CancellationToken) -> Arc<Verdicts> {
    let verdicts = Arc::new(Verdicts::new(&target.container));
    let c = &target.container;
    let probes = [
        (Kind::Startup, c.startup_probe.clone()),
        (Kind::Liveness, c.liveness_probe.clone()),
        (Kind::Readiness, c.readiness_probe.clone()),
    ];
    for (kind, probe) in probes {
        let Some(probe) = probe else { continue };
        let (target, verdicts, wake, stop) =
            (target.clone(), verdicts.clone(), wake.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = run(kind, probe, target, verdicts, wake) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    verdicts
}

async fn run(kind: Kind, probe: Probe, target: Target, verdicts: Arc<Verdicts>, wake: Arc<Notify>) {
    let period = seconds(probe.period_seconds, 10).max(Duration::from_secs(1));
    let timeout = seconds(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    tokio::time::sleep(seconds(probe.initial_delay_seconds, 0)).await;
    // Liveness and readiness wait for the startup probe.
    while kind != Kind::Startup && !verdicts.started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut successes, mut failures) = (0, 0);
    loop {
        let outcome = match tokio::time::timeout(timeout, attempt(&probe, &target, timeout)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("timeout: probe did not answer within {timeout:?}")),
        };
        match outcome {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if successes >= success_threshold {
                    match kind {
                        Kind::Startup => {
                            verdicts.started.store(true, Ordering::SeqCst);
                            wake.notify_one();
                            // Startup probes stop once they succeed.
                            return;
                        }
                        Kind::Readiness => {
                            if !verdicts.ready.swap(true, Ordering::SeqCst) {
                                wake.notify_one();
                            }
                        }
                        Kind::Liveness => {}
                    }
                }
            }
            Err(why) => {
                successes = 0;
                failures += 1;
                let message = format!("{} probe failed: {why}", kind.name());
                target
                    .recorder
                    .warning(&target.pod_ref, "Unhealthy", &message)
                    .await;
                if failures >= failure_threshold {
                    match kind {
                        Kind::Readiness => {
                            if verdicts.ready.swap(false, Ordering::SeqCst) {
                                wake.notify_one();
                            }
                        }
                        Kind::Liveness | Kind::Startup => {
                            if let Ok(mut failed) = verdicts.failed.lock() {
                                *failed = Some(format!(
                                    "Container {} failed {} probe, will be restarted",
                                    target.container.name,
                                    kind.name().to_lowercase()
                                ));
                            }
                            wake.notify_one();
                            return;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// A port of the probe: a number, or the name of one of the container's ports.
fn port(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("couldn't find port {name:?} in the container's ports")),
    }
}

async fn attempt(probe: &Probe, target: &Target, timeout: Duration) -> Result<(), String> {
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        let out = target
            .runtime
            .exec_sync(&target.container_id, command, timeout)
            .await
            .map_err(|e| e.to_string())?;
        return if out.exit_code == 0 {
            Ok(())
        } else {
            Err(format!(
                "command exited with {}: {}",
                out.exit_code,
                String::from_utf8_lossy(&out.stdout).trim()
            ))
        };
    }
    let host = |explicit: &Option<String>| {
        explicit
            .clone()
            .filter(|h| !h.is_empty())
            .or_else(|| target.pod_ip.clone())
            .ok_or_else(|| "the pod has no IP yet".to_string())
    };
    if let Some(tcp) = &probe.tcp_socket {
        let port = port(&target.container, &tcp.port)?;
        let host = host(&tcp.host)?;
        return tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map(drop)
            .map_err(|e| format!("dial tcp {host}:{port}: {e}"));
    }
    if let Some(http) = &probe.http_get {
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"))
        {
            return Err("HTTPS probes are not supported by this kubelet".into());
        }
        let port = port(&target.container, &http.port)?;
        let host = host(&http.host)?;
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.{}\r\nAccept: */*\r\nConnection: close\r\n",
            seine_component_base::KUBERNETES_MINOR
        );
        for h in http.http_headers.iter().flatten() {
            request.push_str(&format!("{}: {}\r\n", h.name, h.value));
        }
        request.push_str("\r\n");
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("Get \"http://{host}:{port}{path}\": dial tcp: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = vec![0u8; 256];
        let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
        let line = String::from_utf8_lossy(&head[..n]);
        let code: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("malformed HTTP response: {:?}", line.lines().next()))?;
        return if (200..400).contains(&code) {
            Ok(())
        } else {
            Err(format!("HTTP probe failed with statuscode: {code}"))
        };
    }
    if probe.grpc.is_some() {
        return Err("gRPC probes are not supported by this kubelet".into());
    }
    Err("the probe names no handler".into())
}
