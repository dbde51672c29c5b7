//! Shared by the client-core test binaries: a core over an in-process cluster, and crash images
//! of a cache directory.

use std::time::Duration;

use dfs_fuse::creds::SavedLogin;
use dfs_fuse::fs::{DfsFs, FsConfig};
use dfs_fuse::remote::{Remote, RemoteConfig};

/// A client core talking to the directory at `url`, caching under `cache`.
pub fn core_at(
    url: &str,
    login: Option<SavedLogin>,
    cache: &std::path::Path,
    writeback: bool,
) -> DfsFs {
    let remote = Remote::new(url, login, None, RemoteConfig::default()).unwrap();
    let config = FsConfig {
        close_timeout: Duration::from_secs(2),
        retry_interval: Duration::from_millis(100),
        writeback,
        ..FsConfig::default()
    };
    DfsFs::new(remote, cache, config, "").unwrap()
}

/// A client core with `config` (its timeouts shortened as in `core_at`).
#[allow(dead_code)] // Not every test binary uses it.
pub fn core_with_config(
    url: &str,
    login: Option<SavedLogin>,
    cache: &std::path::Path,
    config: FsConfig,
) -> DfsFs {
    let remote = Remote::new(url, login, None, RemoteConfig::default()).unwrap();
    let config = FsConfig {
        close_timeout: Duration::from_secs(2),
        retry_interval: Duration::from_millis(100),
        ..config
    };
    DfsFs::new(remote, cache, config, "").unwrap()
}

/// Copies a cache directory as a crash of its process would leave it (the files as they are).
pub fn crash_image(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            crash_image(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}
