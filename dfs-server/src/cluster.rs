//! Starting services: each one alone (for a deployment across machines) or all of them in one
//! process on loopback (`dfs-server all`, and `dfs up` in the client). One cancel token stops
//! every server and worker.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use common::api::{RegisterServiceRequest, ServiceKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, AuthService};
use crate::directory::repair::RepairConfig;
use crate::directory::{DirectoryConfig, DirectoryService};
use crate::file::FileStore;
use crate::file::replicate::FileServer;
use crate::http::Verifier;
use crate::http::listen::{ClientAddr, DfsListener};
use crate::lock::{LockConfig, LockService};
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::tls::{ClientTls, ServerTls};

/// Default address of the directory in `all` mode and for clients.
pub const DEFAULT_DIRECTORY_ADDR: &str = "127.0.0.1:7070";
/// Default time between integrity scrubs of a file server.
pub const DEFAULT_SCRUB_INTERVAL: Duration = Duration::from_secs(3600);
/// Default largest file a file server accepts (64 GiB).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 64 << 30;

/// Everything `all` needs.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Root of all service data (`directory/`, `lock/`, `auth/`, `file-N/`, `cluster.key`).
    pub data: PathBuf,
    /// Directory address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// Number of file servers.
    pub file_servers: usize,
    /// Directory tunables.
    pub directory: DirectoryConfig,
    /// Where the directory keeps its metadata (redb under `data/directory`, or etcd).
    pub meta: crate::meta::MetaConfig,
    /// Lock tunables.
    pub lock: LockConfig,
    /// Auth tunables.
    pub auth: AuthConfig,
    /// Largest file accepted.
    pub max_file_bytes: u64,
    /// Directory repair loop tunables.
    pub repair: RepairConfig,
    /// Time between file server scrubs.
    pub scrub_interval: Duration,
    /// How long a request body may send nothing before the request is dropped.
    pub body_idle: Duration,
    /// Serve every service over TLS with this certificate (None: plain HTTP).
    pub tls: Option<ServerTls>,
    /// The roots the services trust when they call each other over https.
    pub client_tls: ClientTls,
}

impl ClusterConfig {
    /// Defaults for a local cluster under `data`.
    pub fn new(data: PathBuf, listen: SocketAddr) -> Self {
        ClusterConfig {
            data,
            listen,
            file_servers: 3,
            directory: DirectoryConfig::default(),
            meta: crate::meta::MetaConfig::Redb,
            lock: LockConfig::default(),
            auth: AuthConfig::default(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            repair: RepairConfig::default(),
            scrub_interval: DEFAULT_SCRUB_INTERVAL,
            body_idle: crate::http::idle::DEFAULT_BODY_IDLE,
            tls: None,
            client_tls: ClientTls::system(),
        }
    }
}

/// A running local cluster.
pub struct ClusterHandle {
    /// The one address clients need.
    pub directory_url: String,
    /// Lock service URL.
    pub lock_url: String,
    /// Auth service URL.
    pub auth_url: String,
    /// File server URLs, in start order.
    pub file_urls: Vec<String>,
    /// The auth service (for `dfs up` to create its default user in-process).
    pub auth: Arc<AuthService>,
    /// The cluster key (for in-process tests that act as a service).
    pub cluster_key: String,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ClusterHandle {
    /// Stops every server and worker and waits for them.
    /// Requests still running after 10 s (a stalled client) are cut off.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Creates `dir` (and parents) with mode 0700, or makes an existing one 0700: it holds file
/// contents, users' password hashes and keys. An existing directory this process may not
/// chmod (provisioned by an administrator, e.g. owner root, mode 0770, group dfs) is used as
/// it is, with a warning: its access is the administrator's choice.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    make_private_dir(dir, |d| {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
    })
}

/// [`create_private_dir`] with the chmod to 0700 given (tests make it fail as a directory
/// owned by someone else would, which a test run as root cannot otherwise see).
fn make_private_dir(
    dir: &Path,
    chmod_private: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        match chmod_private(dir) {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), mode = format!("{mode:o}"), "data directory made private (0700)")
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "data directory is not this user's to make private (0700); using it as it is")
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads the cluster key at `path`, creating a random one (mode 0600) if missing.
pub fn load_or_create_cluster_key(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(k) if !k.trim().is_empty() => Ok(k.trim().to_owned()),
        Ok(_) => anyhow::bail!("cluster key file {} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = hex::encode(rand::random::<[u8; 32]>());
            // Services starting together must end up with one key: the first one made wins.
            let created = crate::store::create_durable_new(path, key.as_bytes(), 0o600)
                .with_context(|| format!("writing cluster key {}", path.display()))?;
            if created {
                Ok(key)
            } else {
                load_or_create_cluster_key(path)
            }
        }
        Err(e) => Err(e).with_context(|| format!("reading cluster key {}", path.display())),
    }
}

/// Binds `addr` (TLS with `tls`), returning the listener and its `http://` or `https://` URL.
pub async fn bind(
    addr: SocketAddr,
    tls: Option<&ServerTls>,
) -> anyhow::Result<(DfsListener, String)> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let l = DfsListener::new(l, tls).with_context(|| format!("listening on {addr}"))?;
    let url = l.url();
    Ok((l, url))
}

/// Serves `router` on `listener` until `cancel`.
pub fn serve(
    listener: DfsListener,
    router: axum::Router,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let shutdown = cancel.clone();
        let app = router.into_make_service_with_connect_info::<ClientAddr>();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            tracing::error!(error = %e, "server stopped with an error");
        }
    })
}

/// How often a lock or auth service registers again with the directory.
pub const REREGISTER_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Registers a lock or auth service with the directory, retrying every second until it
/// answers, then again every `REREGISTER_EVERY` until `cancel`. The cluster map names the
/// latest registration, so with several lock instances (etcd engine, stateless) a client
/// whose instance died finds a live one in the map within `REREGISTER_EVERY`.
pub fn register_service_loop(
    peer: Peer,
    directory: String,
    kind: ServiceKind,
    url: String,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let req = RegisterServiceRequest { kind, url };
        // One URL or several (comma-separated) of one cluster: registered with whichever
        // answers.
        let dirs = crate::peer::Directories::parse(&directory)
            .unwrap_or_else(|_| crate::peer::Directories::single(directory));
        let mut registered = false;
        loop {
            let (peer, req) = (&peer, &req);
            match dirs
                .call(|d| async move { peer.register_service(&d, req).await })
                .await
            {
                Ok(()) => registered = true,
                Err(e) => {
                    tracing::warn!(error = %e, ?kind, "registering with the directory failed; retrying")
                }
            }
            let pause = if registered {
                REREGISTER_EVERY
            } else {
                std::time::Duration::from_secs(1)
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    })
}

/// How to run one file server.
#[derive(Debug, Clone)]
pub struct FileServerOptions {
    /// Its data directory.
    pub data: PathBuf,
    /// URL others reach it at.
    pub url: String,
    /// The directory's URL.
    pub directory: String,
    /// Largest file accepted.
    pub max_file_bytes: u64,
    /// Capacity reported at registration.
    pub capacity: u64,
    /// Time between integrity scrubs.
    pub scrub_interval: Duration,
    /// How long the scrub keeps the copies it sets aside.
    pub quarantine: Duration,
    /// Bytes of the disk kept back from files; None: 5% of it, at most 1 GiB.
    pub reserve: Option<u64>,
    /// How long a request body may send nothing before the request is dropped.
    pub body_idle: Duration,
    /// The roots it trusts when calling the directory and other file servers over https.
    pub client_tls: ClientTls,
}

/// The directory's metrics: HTTP latency plus its store's fsyncs and durable writes.
pub fn directory_metrics(svc: &Arc<DirectoryService>) -> Arc<Metrics> {
    let m = Arc::new(Metrics::new());
    let s = svc.clone();
    m.counter(
        "directory_fsyncs",
        "Durable commits (fsyncs) of the directory's store",
        Box::new(move || s.store_counters().0),
    );
    let s = svc.clone();
    m.counter(
        "directory_durable_writes",
        "Namespace and version commits acknowledged as durable",
        Box::new(move || s.store_counters().1),
    );
    let s = svc.clone();
    m.counter(
        "directory_store_recoveries",
        "Reopenings of the directory's store after a failed durable commit",
        Box::new(move || s.store_counters().2),
    );
    let s = svc.clone();
    m.counter(
        "directory_store_conflicts",
        "Metadata transactions run again after a conflict with another writer (etcd)",
        Box::new(move || s.store_conflicts()),
    );
    m
}

/// A file server's metrics: HTTP latency plus blob fsyncs and bytes moved.
pub fn file_metrics(fs: &Arc<FileServer>) -> Arc<Metrics> {
    let m = fs.metrics.clone();
    type Pick = fn(&crate::file::Stats) -> u64;
    let counters: [(&'static str, &'static str, Pick); 5] = [
        ("file_fsyncs", "fsync calls made to store blobs", |s| {
            s.fsyncs.load(std::sync::atomic::Ordering::Relaxed)
        }),
        ("file_bytes_in", "Blob bytes received", |s| {
            s.bytes_in.load(std::sync::atomic::Ordering::Relaxed)
        }),
        ("file_bytes_out", "Blob bytes served", |s| {
            s.bytes_out.load(std::sync::atomic::Ordering::Relaxed)
        }),
        ("file_uploads", "Client uploads accepted as primary", |s| {
            s.uploads.load(std::sync::atomic::Ordering::Relaxed)
        }),
        ("file_replica_writes", "Replica pushes accepted", |s| {
            s.replica_writes.load(std::sync::atomic::Ordering::Relaxed)
        }),
    ];
    for (name, help, pick) in counters {
        // Weak: the server owns these metrics, so a strong reference would keep it (and its
        // open store) alive forever.
        let f = Arc::downgrade(fs);
        m.counter(
            name,
            help,
            Box::new(move || f.upgrade().map_or(0, |f| pick(&f.store.stats))),
        );
    }
    m
}

/// Starts one file server on `listener`: HTTP, registration + heartbeats, and the scrub loop.
pub fn start_file_server(
    listener: DfsListener,
    opts: FileServerOptions,
    cluster_key: &str,
    verifier: Arc<Verifier>,
    cancel: CancellationToken,
) -> anyhow::Result<(Arc<FileServer>, Vec<JoinHandle<()>>)> {
    let mut store = FileStore::open(&opts.data, opts.max_file_bytes)
        .with_context(|| format!("opening file store {}", opts.data.display()))?;
    store.disk = crate::file::space::Disk::new(&opts.data, opts.reserve);
    let mut fs = FileServer::new(
        cluster_key,
        store,
        Peer::with_tls(cluster_key, &opts.client_tls)?,
        opts.directory,
        &opts.data,
    );
    fs.quarantine_grace = opts.quarantine;
    let fs = Arc::new(fs);
    let beat = tokio::spawn(
        fs.clone()
            .run_heartbeats(opts.url, opts.capacity, cancel.clone()),
    );
    let scrub = tokio::spawn(fs.clone().run_scrub(opts.scrub_interval, cancel.clone()));
    let server = serve(
        listener,
        crate::http::finish(
            crate::file::routes::router(fs.clone()),
            verifier,
            file_metrics(&fs),
            opts.body_idle,
        ),
        cancel,
    );
    Ok((fs, vec![beat, scrub, server]))
}

/// Where a service's verifier finds the auth service's public key, which checks user tokens:
/// the one difference between the services `all` runs in one process and those run one per
/// process.
pub enum AuthKey {
    /// Known: the auth service runs in this process (`all`, and the auth service itself).
    Known(rsa::PublicKey),
    /// Fetched from the auth service the directory at these URLs names (lock, file servers
    /// in processes of their own).
    ViaDirectory(String),
    /// Fetched from the auth service this directory's own registry names (a directory in a
    /// process of its own: its bound URL may be 0.0.0.0 or not named by its certificate; a
    /// TLS directory takes only an https:// URL from it).
    ViaRegistry(Arc<DirectoryService>),
}

/// The verifier of user tokens and the cluster key for a service.
pub fn verifier(
    cluster_key: &str,
    auth: AuthKey,
    client_tls: &ClientTls,
) -> anyhow::Result<Arc<Verifier>> {
    Ok(Arc::new(match auth {
        AuthKey::Known(k) => Verifier::new(cluster_key, Some(k), None, client_tls)?,
        AuthKey::ViaDirectory(urls) => Verifier::new(cluster_key, None, Some(urls), client_tls)?,
        AuthKey::ViaRegistry(svc) => Verifier::new(cluster_key, None, None, client_tls)?
            .with_auth_url(Box::new(move || {
                crate::http::authed::usable_auth_url(svc.registry.services().1, svc.is_https_only())
            })),
    }))
}

/// Opens the directory on its metadata store, signing capabilities with the cluster key.
pub fn open_directory(
    data: &Path,
    meta: &crate::meta::MetaConfig,
    cfg: DirectoryConfig,
    cluster_key: &str,
    https_only: bool,
) -> anyhow::Result<Arc<DirectoryService>> {
    Ok(Arc::new(
        DirectoryService::open_meta(data, meta, cfg)
            .context("opening the directory service")?
            .with_capability_key(cluster_key)
            .https_only(https_only),
    ))
}

/// Serves the directory on `listener`, with its repair loop and change feed (both end with
/// `cancel`).
#[allow(clippy::too_many_arguments)]
pub fn start_directory(
    svc: &Arc<DirectoryService>,
    listener: DfsListener,
    verifier: Arc<Verifier>,
    cluster_key: &str,
    repair: RepairConfig,
    client_tls: &ClientTls,
    body_idle: Duration,
    cancel: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    Ok(vec![
        start_repair(svc.clone(), cluster_key, repair, client_tls, cancel.clone())?,
        serve(
            listener,
            crate::http::finish(
                crate::directory::routes::router_until(svc.clone(), cancel.clone()),
                verifier,
                directory_metrics(svc),
                body_idle,
            ),
            cancel,
        ),
    ])
}

/// Opens the lock service on the engine `meta` names (redb: its fence counter under `data`;
/// etcd: the directory's prefix).
pub async fn open_lock(
    meta: &crate::meta::MetaConfig,
    data: &Path,
    cfg: LockConfig,
    cluster_key: &str,
) -> anyhow::Result<Arc<LockService>> {
    Ok(Arc::new(
        LockService::build(meta, data, cfg, cluster_key)
            .await
            .context("opening the lock service")?,
    ))
}

/// Serves the lock service on `listener`.
pub fn start_lock(
    svc: Arc<LockService>,
    listener: DfsListener,
    verifier: Arc<Verifier>,
    body_idle: Duration,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    start_router(
        crate::lock::routes::router(svc),
        listener,
        verifier,
        body_idle,
        cancel,
    )
}

/// Serves `router` (a service's routes) on `listener`, with the common outer layers and
/// metrics of its own.
fn start_router(
    router: axum::Router,
    listener: DfsListener,
    verifier: Arc<Verifier>,
    body_idle: Duration,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    serve(
        listener,
        crate::http::finish(router, verifier, Arc::new(Metrics::new()), body_idle),
        cancel,
    )
}

/// Opens the auth service's store and key pair under `data` (off the runtime's workers: the
/// first start makes an RSA key).
pub async fn open_auth(data: &Path, cfg: AuthConfig) -> anyhow::Result<Arc<AuthService>> {
    let data = data.to_path_buf();
    Ok(Arc::new(
        tokio::task::spawn_blocking(move || AuthService::open(&data, cfg))
            .await
            .context("auth start-up task")?
            .context("opening the auth service")?,
    ))
}

/// Serves the auth service on `listener`.
pub fn start_auth(
    svc: Arc<AuthService>,
    listener: DfsListener,
    verifier: Arc<Verifier>,
    body_idle: Duration,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    start_router(
        crate::auth::routes::router(svc),
        listener,
        verifier,
        body_idle,
        cancel,
    )
}

/// Starts the directory's repair loop (failover, re-replication).
pub fn start_repair(
    directory: Arc<DirectoryService>,
    cluster_key: &str,
    cfg: RepairConfig,
    client_tls: &ClientTls,
    cancel: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    Ok(tokio::spawn(crate::directory::repair::run(
        directory,
        Peer::with_tls(cluster_key, client_tls)?,
        cfg,
        cancel,
    )))
}

/// Starts directory, lock, auth and N file servers in this process, on loopback.
pub async fn start(cfg: ClusterConfig) -> anyhow::Result<ClusterHandle> {
    let dirs = ["auth".to_owned(), "directory".to_owned(), "lock".to_owned()]
        .into_iter()
        .chain((1..=cfg.file_servers).map(|i| format!("file-{i}")));
    for d in std::iter::once(cfg.data.clone()).chain(dirs.map(|d| cfg.data.join(d))) {
        create_private_dir(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cancel = CancellationToken::new();
    let key = load_or_create_cluster_key(&cfg.data.join("cluster.key"))?;
    let peer = Peer::with_tls(&key, &cfg.client_tls)?;
    let tls = cfg.tls.as_ref();
    let mut tasks = Vec::new();

    let auth = open_auth(&cfg.data.join("auth"), cfg.auth.clone()).await?;
    // One verifier for every service of the process: the auth key is known here.
    let verifier = verifier(
        &key,
        AuthKey::Known(auth.public_key().clone()),
        &cfg.client_tls,
    )?;

    let directory = open_directory(
        &cfg.data.join("directory"),
        &cfg.meta,
        cfg.directory.clone(),
        &key,
        cfg.tls.is_some(),
    )?;
    let (dl, directory_url) = bind(cfg.listen, tls).await.context("directory service")?;
    tasks.extend(start_directory(
        &directory,
        dl,
        verifier.clone(),
        &key,
        cfg.repair.clone(),
        &cfg.client_tls,
        cfg.body_idle,
        cancel.clone(),
    )?);

    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let (al, auth_url) = bind(loopback, tls).await.context("auth service")?;
    tasks.push(start_auth(
        auth.clone(),
        al,
        verifier.clone(),
        cfg.body_idle,
        cancel.clone(),
    ));

    let lock = open_lock(&cfg.meta, &cfg.data.join("lock"), cfg.lock.clone(), &key).await?;
    let (ll, lock_url) = bind(loopback, tls).await.context("lock service")?;
    tasks.push(start_lock(
        lock,
        ll,
        verifier.clone(),
        cfg.body_idle,
        cancel.clone(),
    ));

    // Register synchronously so the cluster map is complete when `start` returns.
    for (kind, url) in [
        (ServiceKind::Auth, &auth_url),
        (ServiceKind::Lock, &lock_url),
    ] {
        peer.register_service(
            &directory_url,
            &RegisterServiceRequest {
                kind,
                url: url.clone(),
            },
        )
        .await
        .with_context(|| format!("registering {kind:?} with the directory"))?;
    }

    let mut file_urls = Vec::new();
    for i in 1..=cfg.file_servers {
        let (fl, url) = bind(loopback, tls).await.context("file server")?;
        let opts = FileServerOptions {
            data: cfg.data.join(format!("file-{i}")),
            url: url.clone(),
            directory: directory_url.clone(),
            max_file_bytes: cfg.max_file_bytes,
            capacity: cfg.max_file_bytes,
            scrub_interval: cfg.scrub_interval,
            quarantine: crate::file::replicate::DEFAULT_QUARANTINE_GRACE,
            reserve: None,
            body_idle: cfg.body_idle,
            client_tls: cfg.client_tls.clone(),
        };
        let (fs, t) = start_file_server(fl, opts, &key, verifier.clone(), cancel.clone())?;
        tasks.extend(t);
        // Wait for registration so that new files are placed on every server from the start.
        for _ in 0..200 {
            if fs.id().is_some()
                && peer
                    .cluster(&directory_url)
                    .await
                    .is_ok_and(|c| c.servers.iter().any(|s| s.url == url && s.alive))
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        file_urls.push(url);
    }
    tracing::info!(%directory_url, %lock_url, %auth_url, file_servers = file_urls.len(), "cluster up");
    Ok(ClusterHandle {
        directory_url,
        lock_url,
        auth_url,
        file_urls,
        auth,
        cluster_key: key,
        cancel,
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::make_private_dir;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_data_dirs_are_private_and_open_existing_ones_are_made_private() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("a/b");
        super::create_private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
        super::create_private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);
    }

    #[test]
    fn a_data_dir_the_service_may_not_chmod_is_used_as_it_is() {
        let tmp = tempfile::tempdir().unwrap();
        let provisioned = tmp.path().join("provisioned");
        std::fs::create_dir(&provisioned).unwrap();
        std::fs::set_permissions(&provisioned, std::fs::Permissions::from_mode(0o770)).unwrap();
        let eperm = |_: &std::path::Path| Err(std::io::Error::from_raw_os_error(libc::EPERM));
        make_private_dir(&provisioned, eperm).expect("an admin's directory is usable");
        assert_eq!(
            mode(&provisioned),
            0o770,
            "left as the administrator made it"
        );
        // Any other failure still stops the service.
        let eio = |_: &std::path::Path| Err(std::io::Error::from_raw_os_error(libc::EIO));
        assert!(make_private_dir(&provisioned, eio).is_err());
        // A new directory below it is still private.
        let inner = provisioned.join("inner");
        make_private_dir(&inner, eperm).unwrap();
        assert_eq!(mode(&inner), 0o700);
    }
}
