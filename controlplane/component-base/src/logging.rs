//! Structured logs for every daemon: `tracing` to stderr, as text or JSON lines.

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
