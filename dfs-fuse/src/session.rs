//! Mounting: checks that give one-line errors, the fuser session, the background uploader,
//! and an unmount that pushes pending uploads before it returns.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use fuser::{Config, MountOption};
use tokio_util::sync::CancellationToken;

use crate::creds::CredStore;
use crate::fs::{DfsFs, FsConfig};
use crate::fuse::FuseAdapter;
use crate::remote::{Remote, RemoteConfig, RemoteError};

/// Options of one mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Directory URL.
    pub server: String,
    /// Cache directory for this server.
    pub cache_dir: PathBuf,
    /// Core tunables.
    pub fs: FsConfig,
    /// How long unmount waits for pending uploads.
    pub drain_timeout: Duration,
    /// Use kernel FUSE passthrough for open files (falls back if the kernel refuses).
    pub passthrough: bool,
    /// The cluster's identity (the cache must belong to it).
    pub cluster_id: String,
    /// Where to serve the client's Prometheus metrics (`GET /metrics`), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// `--local-ids`: every operation acts as the calling local process's uid, gid and groups
    /// (the administrator's login only), and the mount is shared by the machine's users.
    pub local_ids: bool,
}

/// Whether this process may mount with `allow_other`: root may; anyone else only if
/// `/etc/fuse.conf` says `user_allow_other`.
pub fn may_allow_other() -> bool {
    running_as_root() || std::fs::read_to_string("/etc/fuse.conf").is_ok_and(|c| allows_other(&c))
}

/// Whether this process runs as root (its effective uid is 0).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective uid.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Whether a `/etc/fuse.conf` text lets users mount with `allow_other`.
fn allows_other(conf: &str) -> bool {
    conf.lines()
        .any(|l| l.split('#').next().unwrap_or_default().trim() == "user_allow_other")
}

/// Refuses a `--local-ids` mount that would not work, before mounting: the login must be the
/// administrator's (the services accept a named local caller from no one else), and the mount
/// must be shareable (`allow_other`).
pub fn check_local_ids(remote: &Remote) -> anyhow::Result<()> {
    if !remote.identity().is_some_and(|id| id.admin) {
        bail!(
            "--local-ids needs the administrator's login, and this login is not the \
             administrator's (the cluster key holder runs `dfs user set NAME --admin \
             --cluster-key-file KEY`, then `dfs login` again); or mount without --local-ids"
        );
    }
    if !may_allow_other() {
        bail!(
            "--local-ids shares the mount with the machine's users (allow_other), which FUSE \
             allows a non-root user only with `user_allow_other` in /etc/fuse.conf: add it, \
             mount as root, or mount without --local-ids"
        );
    }
    Ok(())
}

/// File in the cache directory holding the pid of the process that mounts it.
pub const MOUNT_PID_FILE: &str = "mount.pid";

/// The /proc/self/mountinfo line of the mount at `path` (resolved without touching a dead
/// mount, which would fail with ENOTCONN).
fn mountinfo_line(path: &Path) -> Option<String> {
    let abs = path
        .canonicalize()
        .or_else(|_| std::path::absolute(path))
        .ok()?;
    let want = abs.to_string_lossy().replace(' ', "\\040");
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .map(str::to_owned)
}

/// Whether `path` is a dfs mount: a FUSE file system (`fuse` or `fuse.dfs`, depending on how
/// it was mounted) whose source is `dfs` or `dfs:<cache dir>`.
pub fn is_dfs_mount(path: &Path) -> bool {
    mountinfo_line(path).is_some_and(|l| {
        l.split_once(" - ").is_some_and(|(_, tail)| {
            let mut f = tail.split(' ');
            let fstype = f.next().unwrap_or_default();
            let source = f.next().unwrap_or_default();
            fstype.starts_with("fuse") && (source == "dfs" || source.starts_with("dfs:"))
        })
    })
}

/// The cache directory of the dfs mount at `mountpoint`, from /proc/self/mountinfo.
pub fn mounted_cache_dir(mountpoint: &Path) -> Option<PathBuf> {
    let line = mountinfo_line(mountpoint)?;
    let (_, tail) = line.split_once(" - ")?;
    let source = tail.split(' ').nth(1)?;
    let dir = source.strip_prefix("dfs:")?.replace("\\040", " ");
    Some(PathBuf::from(dir))
}

/// The default cache directory of cluster `cluster_id`: `dirs::cache_dir()/dfs/clusters/<id>`
/// (keyed by cluster, not by directory URL: adding, removing or renaming a URL keeps the cache
/// and its pending uploads; a recreated cluster, which reuses node ids, has a new id). A cache
/// an older client kept per URL (`dfs/<url>/<id>`, for any of `servers`) is moved here once,
/// unless a mount is using it now (then it is used where it is).
pub fn default_cache_dir(servers: &[String], cluster_id: &str) -> anyhow::Result<PathBuf> {
    let base = dirs::cache_dir().context("no cache directory (set HOME or XDG_CACHE_HOME)")?;
    cache_dir_under(&base, servers, cluster_id)
}

/// `default_cache_dir` under `base` (the user's cache directory).
pub fn cache_dir_under(
    base: &Path,
    servers: &[String],
    cluster_id: &str,
) -> anyhow::Result<PathBuf> {
    let cluster: String = cluster_id
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect();
    if cluster.is_empty() {
        bail!("the directory named no usable cluster id ({cluster_id:?})");
    }
    let dir = base.join("dfs").join("clusters").join(&cluster);
    if dir.exists() {
        return Ok(dir);
    }
    for server in servers {
        let old = base.join("dfs").join(url_key(server)).join(&cluster);
        if !old.is_dir() {
            continue;
        }
        if mounted_by_live_process(&old) {
            tracing::warn!(cache = %old.display(), "the cache is in use by a running mount; using it where it is");
            return Ok(old);
        }
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::rename(&old, &dir)
            .with_context(|| format!("moving the cache {} to {}", old.display(), dir.display()))?;
        dfs_server::store::sync_dir(parent_or_self(&dir))
            .and_then(|()| dfs_server::store::sync_dir(parent_or_self(&old)))
            .with_context(|| format!("syncing the move of the cache to {}", dir.display()))?;
        tracing::info!(from = %old.display(), to = %dir.display(), "cache moved from its directory URL to the cluster id");
        return Ok(dir);
    }
    Ok(dir)
}

fn parent_or_self(p: &Path) -> &Path {
    p.parent().unwrap_or(p)
}

/// How an older client named a cache directory after a directory URL.
fn url_key(server: &str) -> String {
    server
        .trim_end_matches('/')
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether the cache at `dir` names a mounting process that still runs.
fn mounted_by_live_process(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(MOUNT_PID_FILE))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    mountinfo_line(path).is_some()
}

/// The checks that turn common mistakes into one clear line.
pub fn preflight(mountpoint: &Path) -> anyhow::Result<()> {
    if !Path::new("/dev/fuse").exists() {
        bail!("no /dev/fuse: install fuse3 and load the fuse kernel module (modprobe fuse)");
    }
    if is_mounted(mountpoint) {
        bail!(
            "{} is already a mount point; unmount it first (dfs umount {0})",
            mountpoint.display()
        );
    }
    match std::fs::metadata(mountpoint) {
        Ok(m) if m.is_dir() => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => bail!(
            "{} is a dead mount (its dfs process is gone); run `dfs umount {0}` first",
            mountpoint.display()
        ),
        _ => bail!(
            "mount point {} does not exist or is not a directory",
            mountpoint.display()
        ),
    }
}

/// Builds the remote for `server` (one directory URL or several, comma-separated) from the
/// login saved for its cluster, checking that a directory answers and that the login is still
/// accepted.
pub async fn connect(
    server: &str,
    creds: &CredStore,
    config: RemoteConfig,
) -> anyhow::Result<Remote> {
    let remote = Remote::new(server, None, Some(creds.clone()), config)?;
    let cluster = remote
        .cluster(true)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the dfs directory at {server}: {e}"))?;
    let login = creds
        .get_for(&cluster.cluster_id, remote.servers())?
        .with_context(|| {
            format!("not logged in to {server}; run `dfs login --server {server} --user NAME`")
        })?;
    remote.set_login(login).await;
    match remote.get(common::NodeId::ROOT).await {
        Ok(_) => Ok(remote),
        Err(RemoteError::Api {
            code: common::ErrorCode::Unauthorized,
            message,
        }) => {
            bail!("login for {server} is no longer accepted ({message}); run `dfs login` again")
        }
        Err(e) => Err(anyhow::anyhow!("{server}: {e}")),
    }
}

/// A running mount.
pub struct Mounted {
    session: fuser::BackgroundSession,
    /// The core (for status and draining).
    pub fs: Arc<DfsFs>,
    cancel: CancellationToken,
    uploader: tokio::task::JoinHandle<()>,
    mountpoint: PathBuf,
    drain_timeout: Duration,
}

/// Mounts `fs` at `opts.mountpoint` with a multi-threaded fuser session and starts the
/// background uploader on the current runtime.
pub fn mount(remote: Remote, opts: &MountOptions) -> anyhow::Result<Mounted> {
    preflight(&opts.mountpoint)?;
    if opts.local_ids {
        check_local_ids(&remote)?;
        remote.set_local_ids(true);
    }
    let fs = Arc::new(
        DfsFs::new(remote, &opts.cache_dir, opts.fs.clone(), &opts.cluster_id)
            .with_context(|| format!("opening the cache {}", opts.cache_dir.display()))?,
    );
    let mut config = Config::default();
    // The source field names the cache, so `dfs umount` can find the pending uploads and the
    // mounting process (mount options cannot carry a comma).
    let cache = opts.cache_dir.display().to_string();
    let fsname = if cache.contains(',') {
        "dfs".to_owned()
    } else {
        format!("dfs:{cache}")
    };
    std::fs::write(
        opts.cache_dir.join(MOUNT_PID_FILE),
        std::process::id().to_string(),
    )
    .with_context(|| format!("writing {}", opts.cache_dir.join(MOUNT_PID_FILE).display()))?;
    config.mount_options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("dfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if opts.local_ids {
        // The kernel checks each caller against the real owners and modes first
        // (default_permissions); the cluster then checks again as that caller.
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(8);
    let adapter = FuseAdapter::new(
        fs.clone(),
        tokio::runtime::Handle::current(),
        opts.passthrough,
    );
    let session = fuser::spawn_mount(adapter, &opts.mountpoint, &config)
        .with_context(|| format!("mounting at {}", opts.mountpoint.display()))?;
    let cancel = CancellationToken::new();
    if let Some(addr) = opts.metrics {
        serve_metrics(&fs, addr, cancel.clone())?;
    }
    // Another client's changes reach the kernel through the change feed: invalidations go
    // to the kernel from a thread of their own, never from a FUSE or runtime thread.
    fs.set_kernel_cache(
        crate::fuse::NotifierThread::start(session.notifier())
            .context("starting the kernel notification thread")?,
    );
    tokio::spawn(fs.clone().run_feed(cancel.clone()));
    let uploader = tokio::spawn(fs.clone().run_uploader(cancel.clone()));
    tokio::spawn(fs.clone().run_lock_renewals(cancel.clone()));
    fs.write_status();
    Ok(Mounted {
        session,
        fs,
        cancel,
        uploader,
        mountpoint: opts.mountpoint.clone(),
        drain_timeout: opts.drain_timeout,
    })
}

/// Serves `GET /metrics` of the client at `addr` until `cancel`.
fn serve_metrics(
    fs: &Arc<DfsFs>,
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics listener on {addr}"))?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let metrics = fs.metrics().clone();
    let stats = fs.remote().stats.clone();
    let s = stats.clone();
    metrics.registry.counter(
        "client_uploads",
        "Whole-file uploads since mount",
        Box::new(move || s.uploads.load(std::sync::atomic::Ordering::Relaxed)),
    );
    metrics.registry.counter(
        "client_downloads",
        "Whole-file downloads since mount",
        Box::new(move || stats.downloads.load(std::sync::atomic::Ordering::Relaxed)),
    );
    let f = fs.clone();
    metrics.registry.counter(
        "client_feed_up",
        "1 while the change feed is healthy (long TTLs), else 0",
        Box::new(move || u64::from(f.feed_up())),
    );
    let f = fs.clone();
    metrics.registry.counter(
        "client_feed_resyncs",
        "Times everything cached was dropped because the change feed was lost or restarted",
        Box::new(move || f.feed_resyncs()),
    );
    let app = axum::Router::new().route(
        common::routes::METRICS,
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.registry.render(),
                )
            }
        }),
    );
    tracing::info!(%addr, "serving client metrics");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(())
}

impl Mounted {
    /// Waits until Ctrl-C/SIGTERM or until the file system is unmounted from outside
    /// (`dfs umount`).
    pub async fn wait(&self) {
        self.wait_for(dfs_server::cli::shutdown_signal()).await
    }

    /// Waits until `stop` resolves (a signal caught by the caller) or until the file system is
    /// unmounted from outside.
    pub async fn wait_for(&self, stop: impl std::future::Future<Output = ()>) {
        let external = async {
            loop {
                if self.session.guard.is_finished() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            _ = stop => {
                // A second signal ends the process at once: pending uploads are durable in the
                // cache and pushed by the next mount.
                tokio::spawn(async {
                    dfs_server::cli::shutdown_signal().await;
                    eprintln!("dfs: second signal: exiting now; pending uploads stay in the cache");
                    std::process::exit(130);
                });
            }
            _ = external => tracing::info!("file system was unmounted"),
        }
    }

    /// Unmounts (lazily if busy), then pushes pending uploads for up to the drain timeout.
    /// Returns the nodes still pending: they stay in the cache and are pushed by the next mount.
    pub async fn unmount(self) -> anyhow::Result<Vec<common::NodeId>> {
        let mountpoint = self.mountpoint.clone();
        let session = self.session;
        let joined = tokio::task::spawn_blocking(move || session.umount_and_join()).await;
        if !matches!(joined, Ok(Ok(()))) && is_mounted(&mountpoint) {
            eprintln!("dfs: {} is busy; detaching it lazily", mountpoint.display());
            let _ = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&mountpoint)
                .status();
        }
        self.cancel.cancel();
        let _ = self.uploader.await;
        // After a lazy detach, files may still be open for writing: wait for their closes (which
        // push) and push what is pending, within the drain timeout.
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let mut unsettled = self.fs.unsettled()?;
        let mut said = false;
        while !unsettled.is_empty() && tokio::time::Instant::now() < deadline {
            if self.fs.open_writers() > 0 && !said {
                eprintln!("dfs: waiting for files still open for writing to be closed");
                said = true;
            }
            self.fs.push_pending(deadline, false).await?;
            unsettled = self.fs.unsettled()?;
            if !unsettled.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        self.fs.write_status();
        Ok(unsettled)
    }
}

/// Foreground mount until a signal or an external unmount.
pub async fn run_mount(remote: Remote, opts: MountOptions) -> anyhow::Result<()> {
    let m = mount(remote, &opts)?;
    println!(
        "dfs mounted {} at {}",
        opts.server,
        opts.mountpoint.display()
    );
    m.wait().await;
    report_pending(m.unmount().await?)
}

/// Prints what could not be pushed; never silent about unpushed data.
pub fn report_pending(pending: Vec<common::NodeId>) -> anyhow::Result<()> {
    if pending.is_empty() {
        println!("dfs: unmounted; all changes are on the servers");
        Ok(())
    } else {
        let ids: Vec<String> = pending.iter().map(|n| n.to_string()).collect();
        bail!(
            "unmounted with {} upload(s) still pending (nodes {}); they are kept in the cache and pushed by the next mount",
            pending.len(),
            ids.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{MOUNT_PID_FILE, cache_dir_under};

    #[test]
    fn only_an_uncommented_user_allow_other_lets_users_share_mounts() {
        assert!(super::allows_other(
            "# mount_max = 1000\nuser_allow_other\n"
        ));
        assert!(super::allows_other("  user_allow_other  # shared mounts\n"));
        assert!(!super::allows_other("#user_allow_other\n"));
        assert!(!super::allows_other("mount_max = 1000\n"));
    }

    #[test]
    fn a_cache_kept_per_url_moves_to_the_cluster_id_once() {
        let tmp = tempfile::tempdir().expect("tmp");
        let base = tmp.path();
        let url = "http://127.0.0.1:7070".to_owned();
        let old = base.join("dfs").join("127.0.0.1_7070").join("abc123");
        std::fs::create_dir_all(old.join("files")).expect("old cache");
        std::fs::write(old.join("files").join("5"), b"pending").expect("a pending copy");
        let dir = cache_dir_under(
            base,
            &["http://localhost:7070".to_owned(), url.clone()],
            "abc123",
        )
        .expect("cache dir");
        assert_eq!(dir, base.join("dfs").join("clusters").join("abc123"));
        assert_eq!(
            std::fs::read(dir.join("files").join("5")).expect("moved"),
            b"pending"
        );
        assert!(!old.exists());
        // Any URL list of the cluster finds it now, the old one included.
        let again =
            cache_dir_under(base, &["http://127.0.0.2:1".to_owned()], "abc123").expect("cache dir");
        assert_eq!(again, dir);
        // Another cluster gets its own.
        let other = cache_dir_under(base, std::slice::from_ref(&url), "def456").expect("cache dir");
        assert_ne!(other, dir);
    }

    #[test]
    fn a_cache_in_use_by_a_running_mount_is_left_where_it_is() {
        let tmp = tempfile::tempdir().expect("tmp");
        let base = tmp.path();
        let old = base.join("dfs").join("127.0.0.1_7070").join("abc123");
        std::fs::create_dir_all(&old).expect("old cache");
        // This test process stands for the running mount.
        std::fs::write(old.join(MOUNT_PID_FILE), std::process::id().to_string()).expect("pid");
        let dir = cache_dir_under(base, &["http://127.0.0.1:7070".to_owned()], "abc123")
            .expect("cache dir");
        assert_eq!(dir, old);
    }
}
