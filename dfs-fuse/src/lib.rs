//! The dfs client: a FUSE mount over a whole-file cache (`fs`, `fuse`), the cluster client
//! (`remote`), saved logins (`creds`) and the `dfs` command (`cli`, `session`, `up`).

pub mod cache;
pub mod caller;
pub mod cli;
pub mod creds;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod interrupt;
pub mod metrics;
pub mod progress;
pub mod remote;
pub mod session;
pub mod up;
