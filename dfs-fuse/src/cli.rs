//! The `dfs` command line.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::creds::{CredStore, KnownKeys};
use crate::fs::{ClientStatus, FsConfig};
use crate::remote::{Remote, RemoteConfig};
use crate::session::{self, MountOptions};

/// The default directory URL (the one `dfs up` and `dfs-server all` listen on).
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7070";

/// dfs: a distributed file system you mount as a directory.
///
/// Files are downloaded whole into a local cache when opened and pushed back, under a
/// per-file lock, when closed. Start a local cluster and mount it with `dfs up`.
/// Logs go to stderr; set the level with RUST_LOG (default: info).
#[derive(Debug, Parser)]
#[command(name = "dfs", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a local cluster (directory, lock, auth, 3 file servers) and mount it.
    Up(UpArgs),
    /// Create a user on a cluster.
    Signup(LoginArgs),
    /// Log in and save the token under the config directory (mode 0600).
    Login(LoginArgs),
    /// Forget the saved login for a server.
    Logout(ServerArg),
    /// Mount a cluster in the foreground; Ctrl-C or SIGTERM unmounts.
    Mount(MountArgs),
    /// Unmount; the mounting process pushes pending uploads before it exits.
    Umount(UmountArgs),
    /// Show file servers, locks and this client's cache.
    Status(StatusArgs),
    /// Users' numeric identities (uid, gid, groups, administrator): for the administrator,
    /// with the cluster key. Changes reach a user's mounts with their next token (within the
    /// token lifetime, an hour by default) or their next login.
    #[command(subcommand)]
    User(UserCommand),
    /// Named groups (name, gid, members): for the administrator, with the cluster key. Members'
    /// tokens carry the group's gid from their next renewal (within the token lifetime, an
    /// hour by default) or their next login.
    #[command(subcommand)]
    Group(GroupCommand),
}

/// `dfs group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List every group with its gid and members.
    List(AdminArgs),
    /// Create a group (if it does not exist) and add users to it.
    Add(GroupArgs),
    /// Remove users from a group, or, with no users named, the group itself (refused while
    /// it is a user's primary group; files keep its gid).
    Remove(GroupArgs),
}

/// `dfs group add|remove`.
#[derive(Debug, Args)]
pub struct GroupArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The group (1 to 32 characters of A-Z a-z 0-9 . _ -).
    name: String,
    /// Users to add or remove.
    users: Vec<String>,
    /// gid of a new group (add only; default: the next free id).
    #[arg(long)]
    gid: Option<u32>,
}

/// `dfs user ...`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// List every user with uid, gid, groups and whether it is the administrator.
    List(AdminArgs),
    /// Change a user's uid, gid, groups or administrator flag.
    Set(SetUserArgs),
}

/// The administrator's credentials: the cluster key.
#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(flatten)]
    server: ServerArg,
    /// File with the cluster key (`dfs up` keeps it in its data directory as `cluster.key`).
    #[arg(long, value_name = "PATH")]
    cluster_key_file: PathBuf,
}

impl AdminArgs {
    /// A client of `--server` (trusting `--ca-file`) and the cluster key it acts with.
    fn connect(&self) -> anyhow::Result<(Remote, String)> {
        let key = read_cluster_key(&self.cluster_key_file)?;
        let remote = Remote::new(
            &self.server.server,
            None,
            None,
            self.server.remote_config()?,
        )?;
        Ok((remote, key))
    }
}

/// `dfs user set`.
#[derive(Debug, Args)]
pub struct SetUserArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// The user.
    name: String,
    /// New uid (no other user may have it).
    #[arg(long)]
    uid: Option<u32>,
    /// New primary gid.
    #[arg(long)]
    gid: Option<u32>,
    /// New list of further groups, comma-separated gids (empty: none).
    #[arg(long, value_delimiter = ',', num_args = 0..)]
    groups: Option<Vec<u32>>,
    /// Make the user the administrator (acts as root everywhere, may chown).
    #[arg(long = "admin", conflicts_with = "no_admin")]
    admin_flag: bool,
    /// Stop the user being the administrator.
    #[arg(long)]
    no_admin: bool,
}

/// `--server` and how to trust it.
#[derive(Debug, Args)]
pub struct ServerArg {
    /// URL of the cluster's directory service (https:// for a cluster serving TLS), or
    /// several, comma-separated, of one cluster: requests go to one and move on to the next
    /// when it does not answer. Logins, pinned keys and the cache belong to the cluster (its
    /// id), so adding or removing a URL later loses nothing.
    #[arg(long, default_value = DEFAULT_SERVER, env = "DFS_SERVER", value_name = "URL[,URL...]")]
    pub server: String,
    /// CA certificate(s) (PEM) that signed the cluster's TLS certificates; trusted instead of
    /// the system's roots.
    #[arg(long, value_name = "PEM", env = "DFS_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

impl ServerArg {
    /// Client settings that trust `--ca-file` (or the system's roots).
    pub fn remote_config(&self) -> anyhow::Result<RemoteConfig> {
        Ok(RemoteConfig {
            tls: dfs_server::tls::ClientTls::from_flag(self.ca_file.as_deref())?,
            ..RemoteConfig::default()
        })
    }
}

/// `signup` / `login`.
#[derive(Debug, Args)]
pub struct LoginArgs {
    #[command(flatten)]
    server: ServerArg,
    /// User name (1 to 32 characters of A-Z a-z 0-9 . _ -).
    #[arg(long)]
    user: String,
    /// Read the password from the first line of standard input instead of a prompt.
    #[arg(long)]
    password_stdin: bool,
    /// Sign up as the cluster's administrator, with its cluster key (needed when the cluster
    /// runs with --closed-signup; signup only).
    #[arg(long, value_name = "PATH")]
    cluster_key_file: Option<PathBuf>,
    /// Seal the password only with the auth key of this fingerprint (`SHA256:` + base64, as
    /// `dfs-server` logs it at start), and pin it for this server. Without it the key the
    /// server presents at the first signup or login is pinned (trust on first use) and any
    /// other is refused later.
    #[arg(long, value_name = "SHA256:...", value_parser = parse_fingerprint)]
    auth_key_fingerprint: Option<String>,
}

fn parse_fingerprint(s: &str) -> Result<String, String> {
    match s.strip_prefix("SHA256:") {
        Some(b)
            if b.len() == 43
                && b.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/') =>
        {
            Ok(s.to_owned())
        }
        _ => Err(
            "a fingerprint is SHA256: followed by 43 base64 characters, as dfs-server logs it"
                .into(),
        ),
    }
}

impl LoginArgs {
    /// A client for signup or login that seals only with the pinned auth key (the flag's, else
    /// the one known for this cluster or any of its URLs), where that pin lives, and the
    /// cluster id.
    async fn remote(&self) -> anyhow::Result<(Remote, KnownKeys, String)> {
        let remote = Remote::new(
            &self.server.server,
            None,
            None,
            self.server.remote_config()?,
        )?;
        let cluster_id = remote
            .cluster(true)
            .await
            .with_context(|| format!("cannot reach the dfs directory at {}", remote.server()))?
            .cluster_id;
        let known = KnownKeys::default_location()?;
        let pin = match &self.auth_key_fingerprint {
            Some(f) => Some(f.clone()),
            None => known.get_for(&cluster_id, remote.servers())?,
        };
        remote.pin_auth_key(pin);
        Ok((remote, known, cluster_id))
    }

    /// After a signup or login: pins the key it sealed with (first use, or a new
    /// `--auth-key-fingerprint`), or explains a refused key.
    fn settle<T>(
        &self,
        remote: &Remote,
        known: &KnownKeys,
        cluster_id: &str,
        what: &str,
        result: Result<T, crate::remote::RemoteError>,
    ) -> anyhow::Result<T> {
        let server = remote.server();
        match result {
            Err(crate::remote::RemoteError::AuthKeyChanged { expected, found }) => {
                if self.auth_key_fingerprint.is_some() {
                    bail!(
                        "{what} at {server}: the auth service presents key {found}, not {expected} \
                         as given with --auth-key-fingerprint; nothing was sent"
                    )
                }
                bail!(
                    "{what} at {server}: the auth service's key changed: it presents {found}, but \
                     this client pinned {expected} (in {path}). Someone may be intercepting the \
                     login; nothing was sent. If the cluster's auth key was replaced on purpose, \
                     check the new fingerprint with its administrator (dfs-server logs it at \
                     start), then remove the entry for {server} from {path} or pass \
                     --auth-key-fingerprint {found}",
                    path = known.path().display()
                )
            }
            Err(e) => Err(e).with_context(|| format!("{what} at {server}")),
            Ok(v) => {
                if let Some(used) = remote.auth_key_used() {
                    let before = known.get_for(cluster_id, remote.servers())?;
                    if before.as_deref() != Some(used.as_str()) {
                        known.put_for(cluster_id, remote.servers(), &used)?;
                        // Trust on first use is only as good as a look at what was trusted.
                        let how = match before {
                            None => "first use",
                            Some(_) => "given with --auth-key-fingerprint",
                        };
                        eprintln!(
                            "dfs: pinned the auth key of {server}: {used} ({how}; kept in {}). \
                             Check it against the fingerprint the cluster's administrator sees \
                             (dfs-server prints it at start).",
                            known.path().display()
                        );
                    }
                }
                Ok(v)
            }
        }
    }
}

/// Cache and timing flags shared by `mount` and `up`.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Cache directory [default: the user cache dir (XDG_CACHE_HOME)/dfs/clusters/<cluster id>].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Seconds close() and fsync() wait for an upload before failing with EIO (longer only
    /// while bytes keep moving: a large upload that makes progress is never cut off). The data
    /// stays in the cache and is retried in the background. A download that makes no progress
    /// for this long fails the open, trying each copy for its share of it.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    close_timeout_secs: u64,
    /// Most bytes the local cache keeps, e.g. 2G or 512M (K, M, G: powers of 1024). Beyond
    /// it, clean copies of closed files are evicted, least recently opened first, and
    /// downloaded again when next opened; changes not yet on the servers and open files are
    /// never evicted. Default: a quarter of the cache's file system.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_size: Option<u64>,
    /// Seconds a namespace operation or metadata read (lookup, stat, readdir, create, mkdir,
    /// unlink, rename, chmod, the metadata an open fetches, statfs) keeps retrying while the
    /// directory does not answer or answers "unavailable" (a restart, a failover to another
    /// --server URL), with pauses from 50 ms doubling to 1 s; then it fails with EIO. A
    /// definite answer (no such file, permission denied) is never retried.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    op_timeout_secs: u64,
    /// Seconds unmount waits for pending uploads before giving up (they stay in the cache).
    #[arg(long, default_value_t = 60)]
    drain_timeout_secs: u64,
    /// Serve reads and writes of open files in dfs instead of through kernel FUSE passthrough
    /// (passthrough needs Linux 6.9+ and CAP_SYS_ADMIN; without them dfs falls back by itself).
    #[arg(long)]
    no_passthrough: bool,
    /// Write-back mode: close() returns once the new content is in the local cache and
    /// recorded for upload (a crash of dfs loses nothing: it is pushed after the restart; a
    /// power loss can lose what was never fsynced, as on a local disk). The push runs in the
    /// background; fsync() still waits for the servers; other clients' opens wait for the push.
    #[arg(long)]
    writeback: bool,
    /// With --writeback: most bytes waiting for upload; past it, close() pushes before it
    /// returns, as without --writeback. Accepts K, M, G suffixes (powers of 1024).
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    writeback_max_dirty: u64,
    /// Serve this client's Prometheus metrics (latency per FUSE op and per push stage,
    /// uploads, downloads) at http://ADDR/metrics. Use a loopback address unless you mean to
    /// publish them. `--metrics` alone serves on 127.0.0.1:9470.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9470")]
    metrics: Option<std::net::SocketAddr>,
}

impl CacheArgs {
    /// `--op-timeout-secs`.
    pub fn op_timeout(&self) -> Duration {
        Duration::from_secs(self.op_timeout_secs)
    }

    /// Mount options for the directory at `servers` at `mountpoint`.
    pub fn options(
        &self,
        servers: &[String],
        mountpoint: PathBuf,
        cluster_id: &str,
    ) -> anyhow::Result<MountOptions> {
        Ok(MountOptions {
            mountpoint,
            server: servers.join(","),
            cache_dir: match &self.cache_dir {
                Some(d) => d.clone(),
                None => session::default_cache_dir(servers, cluster_id)?,
            },
            fs: FsConfig {
                close_timeout: Duration::from_secs(self.close_timeout_secs),
                writeback: self.writeback,
                writeback_max_dirty: self.writeback_max_dirty,
                cache_size: self.cache_size,
                ..FsConfig::default()
            },
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            passthrough: !self.no_passthrough,
            cluster_id: cluster_id.to_owned(),
            metrics: self.metrics,
            local_ids: false,
        })
    }
}

/// A byte count: digits with an optional K, M or G suffix (powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 2G, 1048576)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s} is too large"))
}

/// `mount`.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// Existing, empty directory to mount on.
    mountpoint: PathBuf,
    #[command(flatten)]
    server: ServerArg,
    #[command(flatten)]
    cache: CacheArgs,
    /// Act as the calling local user: every operation acts as the calling process's uid, gid
    /// and supplementary groups, and the cluster checks permissions with those (as NFS
    /// AUTH_SYS from a trusted host). The mount is shared by the machine's users
    /// (allow_other) and shows owners as they are. Needs the administrator's login.
    #[arg(long)]
    local_ids: bool,
}

/// `umount`.
#[derive(Debug, Args)]
pub struct UmountArgs {
    /// The mount point.
    mountpoint: PathBuf,
    /// Unmount even with uploads pending (they stay in the cache and are pushed by the next
    /// mount of the same cache).
    #[arg(long)]
    force: bool,
    /// Seconds to wait for the mounting process to push what is pending and exit.
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
}

/// `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Cache directory of the client to report on [default: as for mount].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// `up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the cluster keeps its data.
    #[arg(long, default_value = ".dfs", value_name = "DIR")]
    pub data: PathBuf,
    /// Where to mount.
    #[arg(long, default_value = "mnt", value_name = "DIR")]
    pub mountpoint: PathBuf,
    /// Address of the directory service (the URL other clients join with).
    #[arg(long, default_value = dfs_server::cluster::DEFAULT_DIRECTORY_ADDR, value_name = "ADDR")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Mount as the `dfs` user for the mounting local user only, instead of acting as each
    /// calling local user (the default when run as root).
    #[arg(long, conflicts_with = "local_ids")]
    pub no_local_ids: bool,
    /// Act as each calling local user (`dfs mount --local-ids`) also when run as a user other
    /// than root: the mount is then shared with the machine's users (needs
    /// `user_allow_other` in /etc/fuse.conf), and files made before by the `dfs` user stay
    /// its own.
    #[arg(long)]
    pub local_ids: bool,
    /// TLS (without: plain HTTP on loopback). `--ca-file` is trusted by this mount too.
    #[command(flatten)]
    pub tls: dfs_server::cli::TlsArgs,
}

fn read_password(from_stdin: bool, confirm: bool) -> anyhow::Result<String> {
    let pw = if from_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    } else {
        let pw = rpassword::prompt_password("Password: ")
            .context("reading the password (use --password-stdin without a terminal)")?;
        if confirm && rpassword::prompt_password("Again: ").context("reading the password")? != pw {
            bail!("passwords differ");
        }
        pw
    };
    if !(8..=64).contains(&pw.len()) {
        bail!("password must be 8 to 64 bytes");
    }
    Ok(pw)
}

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Up(a) => crate::up::run(a).await,
            Command::Signup(a) => {
                let key = match &a.cluster_key_file {
                    Some(p) => Some(
                        std::fs::read_to_string(p)
                            .with_context(|| format!("reading the cluster key {}", p.display()))?
                            .trim()
                            .to_owned(),
                    ),
                    None => None,
                };
                let pw = read_password(a.password_stdin, true)?;
                let (remote, known, cluster_id) = a.remote().await?;
                let done = remote.signup_as_admin(&a.user, &pw, key.as_deref()).await;
                a.settle(&remote, &known, &cluster_id, "signup", done)?;
                println!("user {} created on {}", a.user, a.server.server);
                Ok(())
            }
            Command::Login(a) => {
                let pw = read_password(a.password_stdin, false)?;
                let creds = CredStore::default_location()?;
                let (remote, known, cluster_id) = a.remote().await?;
                let done = remote.login(&a.user, &pw).await;
                let login = a.settle(&remote, &known, &cluster_id, "login", done)?;
                creds.put_for(&cluster_id, remote.servers(), Some(login))?;
                println!("logged in to {} as {}", a.server.server, a.user);
                Ok(())
            }
            Command::Logout(a) => {
                let creds = CredStore::default_location()?;
                let remote = Remote::new(&a.server, None, None, a.remote_config()?)?;
                // Logins are kept per cluster: ask a directory which one this is. Entries an
                // older client kept under these URLs go either way.
                match remote.cluster(true).await {
                    Ok(c) => creds.put_for(&c.cluster_id, remote.servers(), None)?,
                    Err(e) => {
                        for u in remote.servers() {
                            creds.put(u, None)?;
                        }
                        bail!(
                            "cannot reach the dfs directory at {} ({e}), so its cluster's login \
                             was not found; logins saved by URL were removed",
                            a.server
                        );
                    }
                }
                println!("logged out of {}", a.server);
                Ok(())
            }
            Command::Mount(a) => {
                let server = a.server.server.clone();
                session::preflight(&a.mountpoint)?;
                let config = RemoteConfig {
                    op_timeout: a.cache.op_timeout(),
                    ..a.server.remote_config()?
                };
                let remote =
                    session::connect(&server, &CredStore::default_location()?, config).await?;
                let cluster_id = remote.cluster(false).await?.cluster_id;
                let mut opts = a
                    .cache
                    .options(remote.servers(), a.mountpoint, &cluster_id)?;
                opts.local_ids = a.local_ids;
                session::run_mount(remote, opts).await
            }
            Command::Umount(a) => umount(&a),
            Command::Status(a) => status(a).await,
            Command::User(c) => user_command(c).await,
            Command::Group(c) => group_command(c).await,
        }
    })
}

fn read_cluster_key(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading the cluster key {}", path.display()))?
        .trim()
        .to_owned())
}

fn print_user(u: &common::api::UserInfo) {
    let groups: Vec<String> = u.id.groups.iter().map(|g| g.to_string()).collect();
    println!(
        "{:<20} uid {:<6} gid {:<6} groups {:<16} {}",
        u.user,
        u.id.uid,
        u.id.gid,
        if groups.is_empty() {
            "-".into()
        } else {
            groups.join(",")
        },
        if u.id.admin { "administrator" } else { "" }
    );
}

async fn user_command(c: UserCommand) -> anyhow::Result<()> {
    match c {
        UserCommand::List(a) => {
            let (remote, key) = a.connect()?;
            let users = remote
                .users(&key)
                .await
                .with_context(|| format!("listing users at {}", a.server.server))?;
            for u in &users {
                print_user(u);
            }
            Ok(())
        }
        UserCommand::Set(a) => {
            let (remote, key) = a.admin.connect()?;
            let req = common::api::SetUserRequest {
                uid: a.uid,
                gid: a.gid,
                groups: a.groups,
                admin: match (a.admin_flag, a.no_admin) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            };
            let u = remote
                .set_user(&a.name, &req, &key)
                .await
                .with_context(|| {
                    format!("changing user {} at {}", a.name, a.admin.server.server)
                })?;
            print_user(&u);
            Ok(())
        }
    }
}

fn print_group(g: &common::api::GroupInfo) {
    println!(
        "{:<20} gid {:<6} members {}",
        g.name,
        g.gid,
        if g.members.is_empty() {
            "-".into()
        } else {
            g.members.join(",")
        }
    );
}

async fn group_command(c: GroupCommand) -> anyhow::Result<()> {
    match c {
        GroupCommand::List(a) => {
            let (remote, key) = a.connect()?;
            let groups = remote
                .groups(&key)
                .await
                .with_context(|| format!("listing groups at {}", a.server.server))?;
            for g in &groups {
                print_group(g);
            }
            Ok(())
        }
        GroupCommand::Add(a) => {
            let (remote, key) = a.admin.connect()?;
            let req = common::api::AddGroupRequest {
                gid: a.gid,
                members: a.users,
            };
            let g = remote
                .add_group(&a.name, &req, &key)
                .await
                .with_context(|| {
                    format!("adding to group {} at {}", a.name, a.admin.server.server)
                })?;
            print_group(&g);
            Ok(())
        }
        GroupCommand::Remove(a) => {
            if a.gid.is_some() {
                bail!("--gid is for `dfs group add`");
            }
            let (remote, key) = a.admin.connect()?;
            let req = common::api::RemoveGroupRequest { members: a.users };
            let left = remote
                .remove_group(&a.name, &req, &key)
                .await
                .with_context(|| {
                    format!(
                        "removing from group {} at {}",
                        a.name, a.admin.server.server
                    )
                })?;
            match left {
                Some(g) => print_group(&g),
                None => println!("group {} removed", a.name),
            }
            Ok(())
        }
    }
}

/// Unmounts, refusing while uploads are pending (unless `--force`), then waits for the
/// mounting process to push the rest and exit.
fn umount(a: &UmountArgs) -> anyhow::Result<()> {
    let mountpoint = &a.mountpoint;
    if !session::is_mounted(mountpoint) {
        bail!("{} is not mounted", mountpoint.display());
    }
    if !session::is_dfs_mount(mountpoint) {
        bail!(
            "{} is not a dfs mount; not touching it",
            mountpoint.display()
        );
    }
    let cache = session::mounted_cache_dir(mountpoint);
    if let Some(cache) = &cache {
        let status: Option<ClientStatus> = std::fs::read(cache.join("status.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let pending = status.map(|s| s.pending_uploads).unwrap_or_default();
        if !pending.is_empty() && !a.force {
            let ids: Vec<String> = pending.iter().map(|n| n.to_string()).collect();
            bail!(
                "{} upload(s) still pending (nodes {}); not unmounting. They are retried in the background; \
                 run again when `dfs status` shows none, or use --force (they stay in the cache for the next mount)",
                pending.len(),
                ids.join(", ")
            );
        }
    }
    let ok = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        || std::process::Command::new("umount")
            .arg(mountpoint)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if !ok {
        bail!(
            "could not unmount {} (busy? close the files and shells using it)",
            mountpoint.display()
        );
    }
    let pid = cache
        .and_then(|c| std::fs::read_to_string(c.join(session::MOUNT_PID_FILE)).ok())
        .and_then(|p| p.trim().parse::<u32>().ok());
    if let Some(pid) = pid {
        // Running unless gone or a zombie (exited, not yet reaped by its parent).
        let running = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .is_some_and(|zombie| !zombie)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(a.wait_secs);
        while running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if running() {
            bail!(
                "unmounted {}, but dfs (pid {pid}) is still pushing uploads",
                mountpoint.display()
            );
        }
    }
    println!("unmounted {}", mountpoint.display());
    Ok(())
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    // Status is what one runs when servers misbehave: never wait long on any of them.
    let config = a.server.remote_config()?;
    let quick = config
        .tls
        .builder()?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let server = a.server.server.clone();
    let creds = CredStore::default_location()?;
    let remote = Remote::new(&server, None, Some(creds.clone()), config)?;
    let cluster = remote
        .cluster(true)
        .await
        .with_context(|| format!("cannot reach {server}"))?;
    let cache_dir = match a.cache_dir {
        Some(d) => d,
        None => session::default_cache_dir(remote.servers(), &cluster.cluster_id)?,
    };
    let client: Option<ClientStatus> = std::fs::read(cache_dir.join("status.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let locks: Vec<common::api::LockStatus> = match &cluster.lock_url {
        Some(url) => {
            let token = creds_token(&remote).await;
            let req = quick.clone().get(format!("{url}{}", common::routes::LOCKS));
            let req = match token {
                Some(t) => req.bearer_auth(t),
                None => req,
            };
            match req.send().await {
                Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
                _ => vec![],
            }
        }
        None => vec![],
    };
    let mut downloads = 0u64;
    for s in &cluster.servers {
        if let Ok(r) = quick
            .get(format!("{}{}", s.url, common::routes::FILE_STATS))
            .send()
            .await
            && let Ok(st) = r.json::<common::api::FileServerStats>().await
        {
            downloads += st.downloads;
        }
    }
    if a.json {
        let v = serde_json::json!({ "cluster": cluster, "locks": locks, "client": client, "server_downloads": downloads });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("directory: {server}  (replication {})", cluster.replication);
    println!(
        "lock: {}  auth: {}",
        cluster.lock_url.as_deref().unwrap_or("-"),
        cluster.auth_url.as_deref().unwrap_or("-")
    );
    println!("file servers:");
    for s in &cluster.servers {
        let beat = s.last_heartbeat_ms_ago.map_or("never".to_owned(), |ms| {
            format!("{:.1}s ago", ms as f64 / 1000.0)
        });
        println!(
            "  {} {:<28} {:<5} heartbeat {beat:<10} primary for {} file(s), replica for {}",
            s.id,
            s.url,
            if s.alive { "alive" } else { "DEAD" },
            s.primaries,
            s.replicas
        );
    }
    println!("locks: {} held", locks.len());
    for l in &locks {
        println!(
            "  node {} held by {} (fence {}), {} waiting",
            l.node,
            l.holder.as_deref().unwrap_or("-"),
            l.fence.map_or(0, |f| f.0),
            l.queued
        );
    }
    match client {
        Some(c) => {
            println!(
                "this client's cache ({}): {} file(s), {} bytes (budget {}), {} upload(s) pending, {} download(s) and {} upload(s) since mount, passthrough {}, write-back {}",
                cache_dir.display(),
                c.cached_files,
                c.cached_bytes,
                c.cache_budget,
                c.pending_uploads.len(),
                c.downloads,
                c.uploads,
                if c.passthrough { "on" } else { "off" },
                if c.writeback { "on" } else { "off" }
            );
            if let Some((p50, p99)) = c.push_latency_ms {
                println!("  recent pushes: median {p50:.1} ms, 99th percentile {p99:.1} ms");
            }
            if !c.pending_uploads.is_empty() {
                let nodes: Vec<String> = c.pending_uploads.iter().map(|n| n.to_string()).collect();
                println!("  pending: node {}", nodes.join(", node "));
            }
            if !c.refused_uploads.is_empty() {
                let nodes: Vec<String> = c.refused_uploads.iter().map(|n| n.to_string()).collect();
                println!(
                    "  refused for permission (kept pending, retried; never pushed as anyone else): node {}",
                    nodes.join(", node ")
                );
            }
            for k in &c.conflicts {
                let place = if k.in_mount {
                    "kept next to it as"
                } else {
                    "kept in the cache at"
                };
                println!(
                    "  conflict: a change to {} (node {}) was based on an older version than the servers' newest; {place} {}",
                    if k.name.is_empty() { "?" } else { &k.name },
                    k.node,
                    k.kept_as
                );
            }
        }
        None => println!(
            "this client's cache ({}): no mount has used it",
            cache_dir.display()
        ),
    }
    // Content no server has, set aside after a crash or a conflict that could not be kept in
    // the mount: the user decides what to do with it.
    if let Ok(dir) = std::fs::read_dir(cache_dir.join("recovered")) {
        for e in dir.flatten() {
            println!("  set aside, not on the servers: {}", e.path().display());
        }
    }
    Ok(())
}

async fn creds_token(remote: &Remote) -> Option<String> {
    let id = remote.cluster_id()?;
    let login = CredStore::default_location()
        .ok()?
        .get_for(&id, remote.servers())
        .ok()??;
    remote.set_login(login).await;
    remote.get(common::NodeId::ROOT).await.ok()?;
    CredStore::default_location()
        .ok()?
        .get_for(&id, remote.servers())
        .ok()?
        .map(|l| l.token)
}
