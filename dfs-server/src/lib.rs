//! dfs cluster services. Each service is logic over an embedded store (`*/mod.rs`, no HTTP
//! types) plus a thin axum router (`*/routes.rs`):
//!
//! - `directory`: namespace, file metadata, file server registry and placement;
//! - `lock`: per-file FIFO locks with leases and fencing tokens;
//! - `auth`: users, RSA-sealed credentials, signed tokens;
//! - `file`: blobs by (node id, content hash), the primary's replicated write path.
//!
//! `cluster` starts them, alone or all in one process; `cli` is the `dfs-server` command.

pub mod auth;
pub mod capability;
pub mod cli;
pub mod cluster;
pub mod commit;
pub mod directory;
pub mod error;
pub mod faults;
pub mod file;
pub mod http;
pub mod keyed;
pub mod lock;
pub mod meta;
pub mod metrics;
pub mod peer;
pub mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tls;

/// Initialises `tracing` with `RUST_LOG` (default `info`) on stderr.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
