//! A daemon's async main on a runtime, and the signals that stop it.

use std::{future::Future, process::ExitCode};

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

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

/// Cancels `token` on SIGTERM or SIGINT (from a task on the current runtime): the shutdown
/// token a daemon's work and its health server stop on.
pub fn cancel_on_stop_signal(token: CancellationToken) {
    tokio::spawn(async move {
        stop_signal().await;
        token.cancel();
    });
}
