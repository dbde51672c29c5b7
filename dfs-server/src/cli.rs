//! The `dfs-server` command line: one service per process, or `all` on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use common::api::ServiceKind;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, AuthService};
use crate::cluster::{self, ClusterConfig, DEFAULT_DIRECTORY_ADDR, DEFAULT_MAX_FILE_BYTES};
use crate::directory::{DirectoryConfig, DirectoryService};
use crate::http::{Verifier, finish};
use crate::lock::{LockConfig, LockService};
use crate::peer::Peer;
use crate::tls::{ClientTls, ServerTls};

/// dfs cluster services: directory, lock, auth and file servers.
///
/// Run `dfs-server all --data DIR` for a whole cluster on loopback, or one service per process
/// for a deployment across machines. The directory's URL is the one address clients need.
/// Logs go to stderr; set the level with RUST_LOG (default: info).
#[derive(Debug, Parser)]
#[command(name = "dfs-server", version)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The services.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Directory, lock, auth and N file servers in one process on loopback.
    All(AllArgs),
    /// The directory service (namespace, metadata, file server registry).
    Directory(DirectoryArgs),
    /// The lock service (FIFO per-file locks, leases, fencing tokens).
    Lock(ServiceArgs),
    /// The auth service (signup, login, tokens).
    Auth(ServiceArgs),
    /// One file server (stores file contents, replicates writes).
    File(FileArgs),
}

/// Flags shared by every service.
#[derive(Debug, Args)]
pub struct Common {
    /// Directory holding this service's persistent state (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// File with the shared secret services use to call each other. Every service of one
    /// cluster must use the same key; created (mode 0600) if missing.
    /// [default: DATA/cluster.key]
    #[arg(long, value_name = "PATH", env = "DFS_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Seconds a request body may send nothing before the request is dropped (and whatever
    /// it holds, such as a file's write mutex, released).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub body_idle_secs: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS flags of every service.
#[derive(Debug, Args)]
pub struct TlsArgs {
    /// Serve over TLS with this certificate chain (PEM, leaf first); with --tls-key. The URLs
    /// this service prints and registers are then https://.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) to trust when calling other services at https:// URLs, instead
    /// of the system's roots.
    #[arg(long, value_name = "PEM", env = "DFS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl TlsArgs {
    /// The server certificate, if asked for, and the client roots.
    pub fn load(&self) -> anyhow::Result<(Option<ServerTls>, ClientTls)> {
        Ok((
            ServerTls::from_flags(self.tls_cert.as_deref(), self.tls_key.as_deref())?,
            ClientTls::from_flag(self.ca_file.as_deref())?,
        ))
    }
}

impl Common {
    /// Makes the data directory private (0700; created if missing), then reads or creates
    /// the cluster key.
    fn prepare(&self) -> anyhow::Result<String> {
        cluster::create_private_dir(&self.data)
            .with_context(|| format!("creating {}", self.data.display()))?;
        let path = self
            .cluster_key_file
            .clone()
            .unwrap_or_else(|| self.data.join("cluster.key"));
        cluster::load_or_create_cluster_key(&path)
    }
}

/// `all`.
#[derive(Debug, Args)]
pub struct AllArgs {
    /// Root of all service data.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Address of the directory service (the URL clients use). The other services take free
    /// loopback ports and register with it.
    #[arg(long, default_value = DEFAULT_DIRECTORY_ADDR, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// Number of file servers.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub file_servers: u16,
    /// Copies of each file (primary + replicas), when that many file servers are alive.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub replication: u32,
    /// Lock lease in milliseconds: a holder that does not renew within it loses the lock.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub lease_ms: u64,
    /// Lifetime of login tokens in seconds (clients renew them with a refresh token).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub token_ttl_secs: u64,
    /// Heartbeat interval of file servers in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..))]
    pub heartbeat_ms: u64,
    /// Missed heartbeats after which a file server counts as dead.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub missed_beats: u32,
    /// Where the directory keeps its metadata: `redb` (a file in the data directory) or an
    /// etcd cluster, `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (prefix default `dfs`), which
    /// several directories can share. With etcd the lock service keeps its locks there too.
    #[arg(long, default_value = "redb", value_name = "STORE")]
    pub meta: crate::meta::MetaConfig,
    /// Milliseconds between repair passes (primary failover, re-replication).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..))]
    pub repair_interval_ms: u64,
    /// Seconds between integrity scrubs of each file server.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub scrub_interval_secs: u64,
    /// Only callers with the cluster key may sign users up
    /// (`dfs signup --cluster-key-file PATH`); otherwise anyone who reaches the auth service can.
    #[arg(long)]
    pub closed_signup: bool,
    #[command(flatten)]
    pub limits: LoginLimitArgs,
    /// Seconds a request body may send nothing before the request is dropped (and whatever
    /// it holds, such as a file's write mutex, released).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub body_idle_secs: u64,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// `directory`.
#[derive(Debug, Args)]
pub struct DirectoryArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on.
    #[arg(long, default_value = DEFAULT_DIRECTORY_ADDR, value_name = "ADDR")]
    listen: SocketAddr,
    /// Copies of each file (primary + replicas), when that many file servers are alive.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=16))]
    replication: u32,
    /// Heartbeat interval asked of file servers, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..))]
    heartbeat_ms: u64,
    /// Missed heartbeats after which a file server counts as dead.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    missed_beats: u32,
    /// Milliseconds between repair passes (primary failover, re-replication).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(50..))]
    repair_interval_ms: u64,
    /// Where the directory keeps its metadata: `redb` (a file in the data directory) or an
    /// etcd cluster, `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (prefix default `dfs`), which
    /// several directories can share.
    #[arg(long, default_value = "redb", value_name = "STORE")]
    meta: crate::meta::MetaConfig,
}

/// `lock` and `auth`.
#[derive(Debug, Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    listen: SocketAddr,
    /// URL of the directory service, where this service registers (several, comma-separated,
    /// of one cluster: whichever answers).
    #[arg(long, value_name = "URL[,URL...]")]
    directory: String,
    /// URL others reach this service at [default: http://LISTEN, https:// with --tls-cert].
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
    /// Lock lease in milliseconds (lock service only).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    lease_ms: u64,
    /// Where the lock service keeps its locks (lock service only): `redb` (in memory, one
    /// instance; the fence counter in the data directory) or the directory's etcd cluster,
    /// `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, which any number of lock instances share.
    #[arg(long, default_value = "redb", value_name = "STORE")]
    meta: crate::meta::MetaConfig,
    /// Lifetime of login tokens in seconds (auth service only).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    token_ttl_secs: u64,
    /// Only callers with the cluster key may sign users up (auth service only).
    #[arg(long)]
    closed_signup: bool,
    #[command(flatten)]
    limits: LoginLimitArgs,
}

/// Login and signup rate limits of the auth service.
#[derive(Debug, Args)]
pub struct LoginLimitArgs {
    /// Failed login and signup attempts allowed per user name and source address and minute
    /// (all at once if saved up); past it the auth service answers 429 "too many attempts" to
    /// that user from that address until one is earned back. Successes spend nothing.
    #[arg(long, default_value_t = crate::auth::DEFAULT_LOGINS_PER_USER, value_parser = clap::value_parser!(u32).range(1..))]
    pub logins_per_user_per_minute: u32,
    /// Login and signup attempts allowed per source address and minute.
    #[arg(long, default_value_t = crate::auth::DEFAULT_LOGINS_PER_ADDR, value_parser = clap::value_parser!(u32).range(1..))]
    pub logins_per_addr_per_minute: u32,
}

impl LoginLimitArgs {
    fn apply(&self, cfg: &mut AuthConfig) {
        cfg.per_user = crate::auth::limit::Rate::per_minute(self.logins_per_user_per_minute);
        cfg.per_addr = crate::auth::limit::Rate::per_minute(self.logins_per_addr_per_minute);
    }
}

/// `file`.
#[derive(Debug, Args)]
pub struct FileArgs {
    #[command(flatten)]
    common: Common,
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    listen: SocketAddr,
    /// URL of the directory service, where this server registers, heartbeats and commits
    /// (several, comma-separated, of one cluster: calls move on to the next when one does not
    /// answer, and stay on the one that answered).
    #[arg(long, value_name = "URL[,URL...]")]
    directory: String,
    /// URL others reach this server at [default: http://LISTEN, https:// with --tls-cert].
    #[arg(long, value_name = "URL")]
    advertise: Option<String>,
    /// Largest file accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FILE_BYTES)]
    max_file_bytes: u64,
    /// Seconds between integrity scrubs (every stored copy re-hashed; corrupt ones repaired).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    scrub_interval_secs: u64,
    /// Seconds a copy of a deleted file (or of a file moved off this server) stays in
    /// `DATA/quarantine/` before the scrub deletes it; move it back into `objects/` to restore.
    #[arg(long, default_value_t = 86400)]
    quarantine_secs: u64,
    /// Bytes of the data directory's disk kept back from files, so that the server's own
    /// bookkeeping never meets a full disk; writes that would eat into it are refused with
    /// "no space" (ENOSPC on the mount). Default: 5% of the disk, at most 1 GiB.
    #[arg(long, value_name = "BYTES")]
    reserve_bytes: Option<u64>,
}

/// Runs the command on a fresh tokio runtime until Ctrl-C or SIGTERM.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        let cancel = CancellationToken::new();
        let tasks = match cli.command {
            Command::All(a) => {
                let mut cfg = ClusterConfig::new(a.data, a.listen);
                cfg.file_servers = usize::from(a.file_servers);
                cfg.directory.replication = a.replication;
                cfg.directory.heartbeat = Duration::from_millis(a.heartbeat_ms);
                cfg.directory.missed_beats = a.missed_beats;
                cfg.meta = a.meta;
                cfg.repair.interval = Duration::from_millis(a.repair_interval_ms);
                cfg.scrub_interval = Duration::from_secs(a.scrub_interval_secs);
                cfg.lock.lease = Duration::from_millis(a.lease_ms);
                cfg.auth.token_ttl = Duration::from_secs(a.token_ttl_secs);
                cfg.auth.open_signup = !a.closed_signup;
                a.limits.apply(&mut cfg.auth);
                cfg.body_idle = Duration::from_secs(a.body_idle_secs);
                (cfg.tls, cfg.client_tls) = a.tls.load()?;
                let handle = cluster::start(cfg).await?;
                println!("dfs cluster up; directory: {}", handle.directory_url);
                println!("auth key fingerprint: {}", handle.auth.fingerprint()?);
                println!(
                    "lock: {}  auth: {}  file servers: {}",
                    handle.lock_url,
                    handle.auth_url,
                    handle.file_urls.join(" ")
                );
                shutdown_signal().await;
                handle.shutdown().await;
                return Ok(());
            }
            Command::Directory(a) => {
                let key = a.common.prepare()?;
                let (tls, client_tls) = a.common.tls.load()?;
                let cfg = DirectoryConfig {
                    replication: a.replication,
                    heartbeat: Duration::from_millis(a.heartbeat_ms),
                    missed_beats: a.missed_beats,
                };
                let svc = Arc::new(
                    DirectoryService::open_meta(&a.common.data, &a.meta, cfg)
                        .context("opening the directory")?
                        .with_capability_key(&key)
                        .https_only(tls.is_some()),
                );
                let (l, url) = cluster::bind(a.listen, tls.as_ref()).await?;
                // The auth service's URL comes from this directory's own registry: its bound
                // URL may be 0.0.0.0 or an address its certificate does not name. A TLS
                // directory never fetches the key that signs tokens in clear: a plain-HTTP URL
                // left in its registry from before TLS counts as no auth service at all.
                let registry = svc.clone();
                let https_only = tls.is_some();
                let verifier =
                    Arc::new(Verifier::new(&key, None, None, &client_tls)?.with_auth_url(
                        Box::new(move || {
                            registry
                                .registry
                                .services()
                                .1
                                .filter(|u| !https_only || u.starts_with("https://"))
                        }),
                    ));
                println!("dfs directory listening on {url}");
                let repair = crate::directory::repair::RepairConfig {
                    interval: Duration::from_millis(a.repair_interval_ms),
                    ..Default::default()
                };
                vec![
                    cluster::start_repair(svc.clone(), &key, repair, &client_tls, cancel.clone())?,
                    cluster::serve(
                        l,
                        finish(
                            crate::directory::routes::router_until(svc.clone(), cancel.clone()),
                            verifier,
                            cluster::directory_metrics(&svc),
                            Duration::from_secs(a.common.body_idle_secs),
                        ),
                        cancel.clone(),
                    ),
                ]
            }
            Command::Lock(a) => {
                let key = a.common.prepare()?;
                let (tls, client_tls) = a.common.tls.load()?;
                let cfg = LockConfig {
                    lease: Duration::from_millis(a.lease_ms),
                    ..LockConfig::default()
                };
                let svc = Arc::new(
                    LockService::build(&a.meta, &a.common.data, cfg, &key)
                        .await
                        .context("opening the lock service")?,
                );
                let (l, url) = cluster::bind(a.listen, tls.as_ref()).await?;
                let url = a.advertise.unwrap_or(url);
                let verifier = Arc::new(Verifier::new(
                    &key,
                    None,
                    Some(a.directory.clone()),
                    &client_tls,
                )?);
                println!("dfs lock service listening on {url}");
                vec![
                    cluster::serve(
                        l,
                        finish(
                            crate::lock::routes::router(svc),
                            verifier,
                            Arc::new(crate::metrics::Metrics::new()),
                            Duration::from_secs(a.common.body_idle_secs),
                        ),
                        cancel.clone(),
                    ),
                    cluster::register_service_loop(
                        Peer::with_tls(&key, &client_tls)?,
                        a.directory,
                        ServiceKind::Lock,
                        url,
                        cancel.clone(),
                    ),
                ]
            }
            Command::Auth(a) => {
                let key = a.common.prepare()?;
                let (tls, client_tls) = a.common.tls.load()?;
                let mut cfg = AuthConfig {
                    token_ttl: Duration::from_secs(a.token_ttl_secs),
                    open_signup: !a.closed_signup,
                    ..AuthConfig::default()
                };
                a.limits.apply(&mut cfg);
                let svc = Arc::new(
                    AuthService::open(&a.common.data, cfg).context("opening the auth service")?,
                );
                let (l, url) = cluster::bind(a.listen, tls.as_ref()).await?;
                let url = a.advertise.unwrap_or(url);
                let verifier = Arc::new(Verifier::new(
                    &key,
                    Some(svc.public_key().clone()),
                    None,
                    &client_tls,
                )?);
                println!(
                    "dfs auth service listening on {url}; key fingerprint {}",
                    svc.fingerprint()?
                );
                vec![
                    cluster::serve(
                        l,
                        finish(
                            crate::auth::routes::router(svc),
                            verifier,
                            Arc::new(crate::metrics::Metrics::new()),
                            Duration::from_secs(a.common.body_idle_secs),
                        ),
                        cancel.clone(),
                    ),
                    cluster::register_service_loop(
                        Peer::with_tls(&key, &client_tls)?,
                        a.directory,
                        ServiceKind::Auth,
                        url,
                        cancel.clone(),
                    ),
                ]
            }
            Command::File(a) => {
                let key = a.common.prepare()?;
                let (tls, client_tls) = a.common.tls.load()?;
                let (l, url) = cluster::bind(a.listen, tls.as_ref()).await?;
                let url = a.advertise.unwrap_or(url);
                let verifier = Arc::new(Verifier::new(
                    &key,
                    None,
                    Some(a.directory.clone()),
                    &client_tls,
                )?);
                println!("dfs file server listening on {url}");
                let opts = cluster::FileServerOptions {
                    data: a.common.data.clone(),
                    url,
                    directory: a.directory,
                    max_file_bytes: a.max_file_bytes,
                    capacity: a.max_file_bytes,
                    scrub_interval: Duration::from_secs(a.scrub_interval_secs),
                    quarantine: Duration::from_secs(a.quarantine_secs),
                    reserve: a.reserve_bytes,
                    body_idle: Duration::from_secs(a.common.body_idle_secs),
                    client_tls,
                };
                let (_, tasks) =
                    cluster::start_file_server(l, opts, &key, verifier, cancel.clone())?;
                tasks
            }
        };
        shutdown_signal().await;
        cancel.cancel();
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

/// Resolves on Ctrl-C, SIGTERM or SIGHUP (call again to wait for the next one).
pub async fn shutdown_signal() {
    listen_for_shutdown().await
}

/// Catches Ctrl-C, SIGTERM and SIGHUP from now on (they no longer end the process at once)
/// and returns a future that resolves on the first one caught, even one caught before it is
/// first polled.
pub fn listen_for_shutdown() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    // A closed terminal: shut down cleanly rather than die with the mount left behind.
    let mut hup = signal(SignalKind::hangup()).ok();
    async move {
        tokio::select! {
            _ = next_signal(int.as_mut()) => {}
            _ = next_signal(term.as_mut()) => {}
            _ = next_signal(hup.as_mut()) => {}
        }
        tracing::info!("shutting down");
    }
}

/// Resolves on the next signal `s` catches (never, without a handler).
async fn next_signal(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}
