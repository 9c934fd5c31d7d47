//! The programs' log output.

use tracing_subscriber::EnvFilter;

/// Logs to standard error, filtered by `RUST_LOG`, or by `default_filter` when `RUST_LOG` is unset
/// or not a valid filter. Call once, at the start of `main` (a second call panics, as
/// `tracing_subscriber`'s `init` does).
pub fn init_stderr_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)))
        .with_writer(std::io::stderr)
        .init();
}
