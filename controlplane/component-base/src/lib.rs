//! The frame every Seine daemon starts in, staged as Kubernetes stages its component-base:
//!
//! - [`init_logging`]: `tracing` to stderr, as text or JSON lines, filtered by `RUST_LOG`.
//! - [`block_on`]: a daemon's async main on a multi-threaded runtime, its error as exit status 1.
//! - [`stop_signal`]: the future a daemon's main loop stops on (SIGTERM or SIGINT).
//! - [`client`]: the API client from `--kubeconfig`, else in-cluster or the default kubeconfig.

use std::{future::Future, path::Path, process::ExitCode};

use anyhow::Context as _;
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use tracing::{error, info};

/// Logs to stderr, as JSON lines when `json`; `RUST_LOG` overrides `default_filter` (such as
/// `info`).
pub fn init_logging(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Runs `main` to its end on a multi-threaded runtime: exit status 0, or 1 with the error (its
/// whole chain) logged and on stderr as `name: error`, as a supervisor expects.
pub fn block_on(name: &str, main: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM or SIGINT, logging which. Where the handlers cannot be installed it
/// never completes, and the signal's default action (exit) still applies.
pub async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
}

/// The API client: from `kubeconfig` when given (its current context), else what kube infers
/// (in-cluster: a pod's service account; then `$KUBECONFIG` or `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no --kubeconfig, and no in-cluster or default configuration")?,
    };
    Client::try_from(config).context("building the API client")
}
