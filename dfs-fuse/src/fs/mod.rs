//! `DfsFs`: the file system core. Whole-file caching on open, push under lock on close, every
//! namespace operation forwarded to the directory. Returns plain data (`FileAttr`, handles),
//! never FUSE reply objects, so tests drive it without a kernel mount.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::api::{CreateRequest, LinkRequest, RenameRequest, SetAttrRequest, StatFs};
use common::{ContentHash, ErrorCode, FileKind, NodeId, NodeMeta, ValidName};
use fuser::{FileAttr, FileType, INodeNo};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::cache::{CacheDir, CacheEntry};
use crate::error::{FsError, FsResult};
use crate::metrics::ClientMetrics;
use crate::remote::{Remote, RemoteError};
use dfs_server::keyed::KeyedMutex;

mod applock;
mod batch;
mod conflict;
mod evict;
pub mod feed;
mod known;
mod recover;
mod upload;

/// How many names of a file known here a link tries before asking for its parent's listing.
const LINK_SOURCES_TRIED: usize = 4;

/// What one setattr changes (each `None`: unchanged). `uid` and `gid` are as this mount
/// shows them; `mtime_now` and `atime_now` say a time is "now": both now (`touch`) needs only
/// write permission, any other time change the owner (utimensat(2) on Linux).
#[derive(Debug, Default, Clone, Copy)]
pub struct AttrChange {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Length (a new version, pushed at once).
    pub size: Option<u64>,
    /// Modification time.
    pub mtime: Option<SystemTime>,
    /// `mtime` is the current time.
    pub mtime_now: bool,
    /// Access time.
    pub atime: Option<SystemTime>,
    /// `atime` is the current time.
    pub atime_now: bool,
}

/// Tunables of the core.
#[derive(Debug, Clone)]
pub struct FsConfig {
    /// How long `close` (flush) and `fsync` wait for a push before answering EIO. The data
    /// stays in the cache, marked pending, and is retried in the background.
    pub close_timeout: Duration,
    /// How often pending uploads are retried.
    pub retry_interval: Duration,
    /// Write-back: `close` returns once the change is recorded in the cache; the push runs in
    /// the background (`fsync` still waits for the servers).
    pub writeback: bool,
    /// Most bytes waiting for a write-back push; past it, `close` pushes as in the default mode.
    pub writeback_max_dirty: u64,
    /// How many pending files the background uploader pushes at once (their commits share
    /// fsyncs at the servers).
    pub upload_concurrency: usize,
    /// Most bytes the cache keeps (clean, closed copies beyond it are evicted); None: a
    /// quarter of the cache's file system.
    pub cache_size: Option<u64>,
}

/// How long other clients' opens wait for an announced write-back push.
pub const WRITEBACK_INTENT: Duration = Duration::from_secs(30);

impl Default for FsConfig {
    fn default() -> Self {
        FsConfig {
            close_timeout: Duration::from_secs(30),
            retry_interval: Duration::from_secs(2),
            writeback: false,
            writeback_max_dirty: 256 << 20,
            upload_concurrency: 8,
            cache_size: None,
        }
    }
}

/// One directory entry of a listing, with its attributes (for READDIRPLUS).
#[derive(Debug, Clone)]
pub struct DirItem {
    /// Inode number.
    pub ino: u64,
    /// Kind.
    pub kind: FileType,
    /// Name.
    pub name: String,
    /// Attributes.
    pub attr: FileAttr,
}

/// An open file: a plain local file in the cache.
pub struct Handle {
    node: NodeId,
    file: std::fs::File,
    writable: bool,
    /// Opened with O_APPEND: every write goes to the end of the copy as it is now (the
    /// kernel's offset may come from a size it cached before the copy was refreshed).
    append: bool,
    /// Written through `write`/`setattr` since the last push.
    dirty: AtomicBool,
    /// (length, mtime) of the file at open or at the last push. Under kernel passthrough,
    /// writes never reach `write`, so a change shows only here.
    baseline: Mutex<Option<(u64, SystemTime)>>,
    /// When `baseline` was taken.
    baseline_at: Mutex<SystemTime>,
    /// On a `--local-ids` mount, the local caller that opened it: closes and fsyncs push as
    /// the one whose open was authorised to write, whoever closes.
    opener: Option<common::Identity>,
}

fn stamp(file: &std::fs::File) -> Option<(u64, SystemTime)> {
    let m = file.metadata().ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl Handle {
    /// The open cache file (for kernel passthrough).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Whether the handle has changes not yet pushed.
    fn changed(&self) -> bool {
        if !self.writable {
            return false;
        }
        if self.dirty.load(Ordering::Acquire) {
            return true;
        }
        let base = *self.baseline.lock().unwrap_or_else(|p| p.into_inner());
        base.is_none() || stamp(&self.file) != base
    }

    fn mark_clean(&self) {
        self.dirty.store(false, Ordering::Release);
        *self.baseline.lock().unwrap_or_else(|p| p.into_inner()) = stamp(&self.file);
        *self.baseline_at.lock().unwrap_or_else(|p| p.into_inner()) = SystemTime::now();
    }

    /// Under passthrough, (size, mtime) alone cannot prove "unchanged": a same-size rewrite in
    /// the same timestamp tick as the last change keeps both. It can when the last change was
    /// at least a second before the baseline was taken, since any later write moves the mtime
    /// past it.
    fn provably_unchanged(&self) -> bool {
        let base = *self.baseline.lock().unwrap_or_else(|p| p.into_inner());
        let taken = *self.baseline_at.lock().unwrap_or_else(|p| p.into_inner());
        match base {
            Some((_, mtime)) => !self.changed() && mtime + Duration::from_secs(1) <= taken,
            None => false,
        }
    }
}

/// Attribute changes made while a file holds unpushed changes, applied with its next push.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldedAttrs {
    /// Permission bits.
    pub mode: Option<u32>,
    /// Explicit modification time (ns since the epoch).
    pub mtime_ns: Option<u64>,
}

/// Result of `open`/`create`.
pub struct Opened {
    /// The new handle number.
    pub fh: u64,
    /// The handle, whose file may back kernel passthrough.
    pub handle: Arc<Handle>,
}

/// How long the kernel may cache attributes and entries while the change feed is down (the
/// README's metadata bound then; `feed::FEED_TTL` while it is up). A getattr answered from
/// what this client heard less than the TTL ago gets the rest of it.
pub const ATTR_TTL: Duration = Duration::from_secs(1);

/// What `dfs status` shows of this client; also written to `status.json` in the cache.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientStatus {
    /// Files in the cache.
    pub cached_files: u64,
    /// Bytes in the cache.
    pub cached_bytes: u64,
    /// The cache's size budget (clean, closed copies beyond it are evicted).
    #[serde(default)]
    pub cache_budget: u64,
    /// Nodes with changes not yet on the servers.
    pub pending_uploads: Vec<u64>,
    /// Whole-file downloads since mount.
    pub downloads: u64,
    /// Whole-file uploads since mount.
    pub uploads: u64,
    /// Whether open files are served by kernel FUSE passthrough.
    #[serde(default)]
    pub passthrough: bool,
    /// Whether the mount runs in write-back mode.
    #[serde(default)]
    pub writeback: bool,
    /// (median, 99th percentile) of recent pushes, in ms.
    #[serde(default)]
    pub push_latency_ms: Option<(f64, f64)>,
    /// Conflicts found since the mount started, and where each refused change was kept.
    #[serde(default)]
    pub conflicts: Vec<conflict::ConflictNote>,
    /// Pending changes whose push was refused for permission (`--local-ids`): kept here,
    /// retried with a long back-off, never committed as anyone else.
    #[serde(default)]
    pub refused_uploads: Vec<u64>,
}

pub use conflict::{ConflictNote, conflict_name};

/// The core.
pub struct DfsFs {
    remote: Arc<Remote>,
    cache: CacheDir,
    cache_root: std::path::PathBuf,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    listings: Mutex<HashMap<u64, Arc<Vec<DirItem>>>>,
    retry_at: Mutex<HashMap<NodeId, (Instant, Duration)>>,
    folded: Mutex<HashMap<NodeId, FoldedAttrs>>,
    /// `--local-ids`: the local caller whose handle made each pending change (None: the
    /// mount's login), whom its background pushes act as; in memory only (see `actor_now`).
    actors: Mutex<HashMap<NodeId, Option<common::Identity>>>,
    /// `--local-ids`: pending changes whose push was refused for permission.
    refused: Mutex<std::collections::HashSet<NodeId>>,
    /// Sizes of the write-back pushes waiting (the `writeback_max_dirty` bound).
    writeback_dirty: Mutex<HashMap<NodeId, u64>>,
    status_at: Mutex<Option<Instant>>,
    next_fh: AtomicU64,
    node_locks: KeyedMutex<NodeId>,
    metrics: Arc<ClientMetrics>,
    writers: Mutex<HashMap<NodeId, usize>>,
    /// Copies changed here whose change could not be recorded as pending (the cache's disk
    /// full, its index unwritable): dirty in memory, never replaced or served as clean,
    /// reported by every later close, fsync and unmount, and recorded once that works again.
    /// Each with the generation it was (last) added at, so that a retry that began earlier
    /// never clears a later failure.
    unrecorded: Mutex<HashMap<NodeId, u64>>,
    unrecorded_gen: AtomicU64,
    /// Held across every read-modify-write of a cache entry that can run without the node's
    /// lock (release records changes without it), so that no update overwrites another.
    entry_updates: Mutex<()>,
    /// Conflicts found (see `conflict.rs`), the newest last.
    conflicts: Mutex<Vec<ConflictNote>>,
    /// The cache's size budget, and the eviction bookkeeping (see `evict.rs`).
    cache_budget: u64,
    cached_since_evict: AtomicU64,
    evict_wanted: AtomicBool,
    /// This mount's session at the lock service, the application locks it may hold or wait
    /// for, their lease, and the renewal loop's wake-up (see `applock.rs`).
    session: common::UploadId,
    app_locks: Mutex<std::collections::HashSet<(NodeId, u64)>>,
    /// Those of `app_locks` granted at least once (what a renewal must find held).
    app_granted: Mutex<std::collections::HashSet<(NodeId, u64)>>,
    app_ranges: Mutex<HashMap<(NodeId, u64), applock::Ranges>>,
    app_lease_ms: AtomicU64,
    lock_wake: tokio::sync::Notify,
    /// Held while an unlock of (file, owner) is on its way, so that a new lock of the same
    /// owner (the kernel reuses owner ids) is asked for only after it.
    unlocking: dfs_server::keyed::KeyedMutex<(NodeId, u64)>,
    /// Copies a failed in-place refresh left damaged while writers had them open: their
    /// pushes are refused, and the next open without writers fetches the file again.
    torn: Mutex<std::collections::HashSet<NodeId>>,
    known: Mutex<known::Known>,
    /// One listing at a time per directory for lookups (`lookup`'s `Relist`): lookups that
    /// run in parallel there share it rather than each list the directory.
    relisting: dfs_server::keyed::KeyedMutex<NodeId>,
    /// The change feed's state (see `feed.rs`).
    feed: feed::FeedState,
    uid: u32,
    gid: u32,
    config: FsConfig,
    wake: tokio::sync::Notify,
    passthrough: AtomicBool,
}

fn ns_to_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn name_of(name: &OsStr) -> FsResult<ValidName> {
    Ok(ValidName::parse(name.to_str().ok_or(FsError::NotUtf8)?)?)
}

fn hash_file(path: &std::path::Path) -> std::io::Result<(ContentHash, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((ContentHash::from_digest(&h.finalize().into()), size))
}

fn kind_of(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

/// The kind `mknod(2)` asks for with `mode`'s file type bits (none: a regular file).
fn kind_of_mode(mode: u32) -> FsResult<FileKind> {
    match mode & libc::S_IFMT {
        0 | libc::S_IFREG => Ok(FileKind::File),
        libc::S_IFIFO => Ok(FileKind::Fifo),
        libc::S_IFSOCK => Ok(FileKind::Socket),
        libc::S_IFCHR => Ok(FileKind::CharDev),
        libc::S_IFBLK => Ok(FileKind::BlockDev),
        _ => Err(FsError::Invalid("mknod of a directory or symlink")),
    }
}

/// Gives the clean copy at `path` the modification time of the version it holds (best
/// effort: a copy that keeps the time it was fetched only shows a wrong mtime while open).
fn match_mtime(path: &std::path::Path, meta: &NodeMeta) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(path) {
        let _ = f.set_modified(ns_to_time(meta.mtime_ns));
    }
}

/// `st_nlink` of a node: its count, or (from a directory that predates counts) 2 for a
/// directory and 1 for anything else.
fn nlink_of(meta: &NodeMeta) -> u32 {
    match (meta.nlink, meta.kind) {
        (0, FileKind::Dir) => 2,
        (0, _) => 1,
        (n, _) => n,
    }
}

impl DfsFs {
    /// A core over `remote`, caching under `cache_root`.
    /// Refuses a cache that belongs to another cluster (its node ids mean other files there).
    pub fn new(
        remote: Remote,
        cache_root: &std::path::Path,
        config: FsConfig,
        cluster_id: &str,
    ) -> FsResult<Self> {
        let cache = CacheDir::open(cache_root)?;
        cache.claim(cluster_id)?;
        let meta = std::fs::metadata(cache_root)?;
        let cache_budget = match config.cache_size {
            Some(b) => b,
            None => dfs_server::file::space::Disk::new(cache_root, Some(0))
                .space()
                .map(|s| evict::default_budget(s.total_bytes))
                .map_err(|e| FsError::Io(std::io::Error::other(e.to_string())))?,
        };
        let fs = DfsFs {
            // Uploads and downloads end after the close timeout without progress.
            remote: Arc::new(remote.with_stall_timeout(config.close_timeout)),
            cache,
            cache_root: cache_root.to_path_buf(),
            handles: Mutex::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            retry_at: Mutex::new(HashMap::new()),
            folded: Mutex::new(HashMap::new()),
            actors: Mutex::new(HashMap::new()),
            refused: Mutex::new(std::collections::HashSet::new()),
            writeback_dirty: Mutex::new(HashMap::new()),
            status_at: Mutex::new(None),
            next_fh: AtomicU64::new(1),
            node_locks: KeyedMutex::default(),
            metrics: Arc::new(ClientMetrics::default()),
            writers: Mutex::new(HashMap::new()),
            unrecorded: Mutex::new(HashMap::new()),
            unrecorded_gen: AtomicU64::new(0),
            entry_updates: Mutex::new(()),
            conflicts: Mutex::new(conflict::load_notes(cache_root)),
            cache_budget,
            cached_since_evict: AtomicU64::new(0),
            // The first uploader pass checks the budget.
            evict_wanted: AtomicBool::new(true),
            session: common::UploadId::from_bytes(rand::random()),
            app_locks: Mutex::new(std::collections::HashSet::new()),
            app_granted: Mutex::new(std::collections::HashSet::new()),
            app_ranges: Mutex::new(HashMap::new()),
            app_lease_ms: AtomicU64::new(3000),
            lock_wake: tokio::sync::Notify::new(),
            unlocking: dfs_server::keyed::KeyedMutex::default(),
            torn: Mutex::new(std::collections::HashSet::new()),
            known: Mutex::new(known::Known::default()),
            relisting: dfs_server::keyed::KeyedMutex::default(),
            feed: feed::FeedState::default(),
            uid: meta.uid(),
            gid: meta.gid(),
            config,
            wake: tokio::sync::Notify::new(),
            passthrough: AtomicBool::new(false),
        };
        fs.recover()?;
        Ok(fs)
    }

    /// Records whether the kernel accepted passthrough (set by the FUSE adapter at init).
    pub fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    /// The remote (for status and tests).
    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    /// This client's metrics (FUSE ops, push stages).
    pub fn metrics(&self) -> &Arc<ClientMetrics> {
        &self.metrics
    }

    /// One writer of `node` fewer; whether it was the last.
    fn drop_writer(&self, node: NodeId) -> bool {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        match w.get_mut(&node) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                w.remove(&node);
                true
            }
        }
    }

    /// The guard of `entry_updates`.
    fn entry_updates(&self) -> std::sync::MutexGuard<'_, ()> {
        self.entry_updates.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writer_count(&self, node: NodeId) -> usize {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
            .unwrap_or(0)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, known::Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, meta: &NodeMeta, name: Option<(NodeId, &str)>) {
        self.known().remember(meta, name, Instant::now());
    }

    /// This client just changed directory `dir` (an entry created, removed or renamed): its
    /// times move on locally, so the kernel's getattr after the change needs no round trip.
    fn touched_dir(&self, dir: NodeId) {
        self.known().touched_dir(dir, common::meta::now_ns());
    }

    /// What this client heard of `id` less than the TTL ago (`ttl()`), with the time left.
    fn recent_meta(&self, id: NodeId) -> Option<(NodeMeta, Duration)> {
        let ttl = self.ttl();
        self.known().recent(id, ttl, Instant::now())
    }

    /// Names a listing of `dir` showed gone or naming another node: the kernel forgets them.
    fn names_dropped(&self, dir: NodeId, names: Vec<String>) {
        self.to_kernel(
            names
                .into_iter()
                .map(|name| feed::Invalidation::Entry { parent: dir, name })
                .collect(),
        );
    }

    fn forget_name(&self, parent: NodeId, name: &str) {
        self.known().forget_name(parent, name);
    }

    /// A change of `names` (their directories, and the nodes they named) and of `nodes`
    /// failed: the directories are no longer known completely. If it failed without an
    /// answer (`e` says the directory was unreachable, timed out or broke down), the
    /// directory may have applied it, or may still (its answer lost, an attempt still in
    /// flight), and this client's own changes never come back in its feed: the kernel forgets
    /// these entries and nodes now, and whatever is heard of them gets the short TTL until
    /// the change can no longer happen (`known::FEED_RACE`).
    fn change_failed(&self, e: &RemoteError, names: &[(NodeId, &str)], nodes: &[NodeId]) {
        let mut batch = Vec::new();
        {
            let mut k = self.known();
            let unknown = e.is_unreachable();
            let now = Instant::now();
            for (parent, name) in names {
                k.unsure(*parent);
                if !unknown {
                    continue;
                }
                k.doubt(*parent, now);
                batch.push(feed::Invalidation::Entry {
                    parent: *parent,
                    name: (*name).to_owned(),
                });
                batch.push(feed::Invalidation::Inode(*parent));
                if let Some(m) = k.by_name(*parent, name) {
                    k.doubt(m.id, now);
                    batch.push(feed::Invalidation::Inode(m.id));
                }
            }
            if unknown {
                for id in nodes {
                    k.doubt(*id, now);
                    batch.push(feed::Invalidation::Inode(*id));
                }
            }
            if unknown {
                tracing::info!(
                    error = %e,
                    ?names,
                    ?nodes,
                    "a namespace change got no answer; the kernel forgets its names and \
                     they get short TTLs while the directory may still apply it"
                );
            }
        }
        self.to_kernel(batch);
    }

    /// Changes `id`'s attributes at the directory; one that got no answer may still land
    /// there (see `change_failed`).
    async fn set_attrs(&self, id: NodeId, req: &SetAttrRequest) -> Result<NodeMeta, RemoteError> {
        self.remote
            .setattr(id, req)
            .await
            .inspect_err(|e| self.change_failed(e, &[], &[id]))
    }

    fn known_meta(&self, id: NodeId) -> Option<NodeMeta> {
        self.known().meta(id)
    }

    /// The handles open on `node`.
    fn handles_of(&self, node: NodeId) -> Vec<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|h| h.node == node)
            .cloned()
            .collect()
    }

    fn open_here(&self, node: NodeId) -> bool {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|h| h.node == node)
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))
    }

    /// Whether the copy of `node` may differ from the server's (open for writing, or pending).
    fn has_local_changes(&self, node: NodeId) -> bool {
        self.writer_count(node) > 0 || self.cache.is_pending(node) || self.is_unrecorded(node)
    }

    /// Owner and group as this mount shows them (as sshfs `idmap=user`): this user's uid and
    /// primary gid are shown as the mounting user's, everyone else's as they are. Before the
    /// login says who this user is, everything shows as the mounting user's. A `--local-ids`
    /// mount shows every owner as it is: its callers are local users acting as themselves.
    fn local_ids(&self, meta: &NodeMeta) -> (u32, u32) {
        if self.remote.local_ids() {
            return (meta.uid, meta.gid);
        }
        match self.remote.identity() {
            None => (self.uid, self.gid),
            Some(me) => (
                if meta.uid == me.uid {
                    self.uid
                } else {
                    meta.uid
                },
                if meta.gid == me.gid {
                    self.gid
                } else {
                    meta.gid
                },
            ),
        }
    }

    /// The attributes the kernel sees: the directory's, with size and mtime of the local copy
    /// while it holds changes the servers do not have yet.
    pub fn attr(&self, meta: &NodeMeta) -> FileAttr {
        let mut size = meta.size;
        let mut mtime = ns_to_time(meta.mtime_ns);
        let mut mode = meta.mode;
        if meta.kind == FileKind::File {
            if let Some(m) = self.folded_attrs(meta.id).mode {
                mode = m;
            }
            let local = self.has_local_changes(meta.id);
            if local && let Ok(m) = std::fs::metadata(self.cache.path(meta.id)) {
                size = m.len();
                mtime = m.modified().unwrap_or(mtime);
            }
        }
        let (uid, gid) = self.local_ids(meta);
        let atime = if meta.atime_ns == 0 {
            mtime
        } else {
            ns_to_time(meta.atime_ns)
        };
        FileAttr {
            ino: INodeNo(meta.id.0),
            size,
            blocks: size.div_ceil(512),
            atime,
            mtime,
            ctime: ns_to_time(meta.ctime_ns),
            crtime: ns_to_time(meta.ctime_ns),
            kind: kind_of(meta.kind),
            perm: u16::try_from(mode & 0o7777).unwrap_or(0o644),
            nlink: nlink_of(meta),
            uid,
            gid,
            // The kernel's dev_t is 32 bits wide on the FUSE wire.
            rdev: u32::try_from(meta.rdev).unwrap_or(0),
            blksize: 4096,
            flags: 0,
        }
    }

    /// Metadata from the directory, or what was last heard if it cannot be reached (then the
    /// directory is waited for `FALLBACK_WAIT` only, not the whole op timeout).
    async fn meta(&self, id: NodeId) -> FsResult<NodeMeta> {
        let asked = if self.known_meta(id).is_some() {
            self.remote
                .get_within(id, crate::remote::FALLBACK_WAIT)
                .await
        } else {
            self.remote.get(id).await
        };
        match asked {
            Ok(m) => {
                self.remember(&m, None);
                Ok(m)
            }
            Err(e) if e.is_unreachable() => self.known_meta(id).ok_or(FsError::Remote(e)),
            // Unlinked while open here: the open handles keep it alive (POSIX).
            Err(e) if e.is_not_found() && self.open_here(id) => {
                self.known_meta(id).ok_or(FsError::Remote(e))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// lookup.
    pub async fn lookup(&self, parent: NodeId, name: &OsStr) -> FsResult<FileAttr> {
        let name = name_of(name)?;
        let ttl = self.ttl();
        let how = self
            .known()
            .lookup(parent, name.as_str(), ttl, Instant::now());
        match how {
            known::Lookup::Absent => return Err(FsError::Absent),
            known::Lookup::Relist => {
                if let Some(answer) = self.relist_lookup(parent, name.as_str()).await {
                    return answer;
                }
            }
            known::Lookup::Ask => {}
        }
        // A name this client heard of is answered from that while the directory is down, after
        // a short wait; any other waits for the directory (the op timeout).
        let heard = self.known().by_name(parent, name.as_str()).is_some();
        let asked = if heard {
            self.remote
                .lookup_within(parent, &name, crate::remote::FALLBACK_WAIT)
                .await
        } else {
            self.remote.lookup(parent, &name).await
        };
        match asked {
            Ok(m) => {
                self.remember(&m, Some((parent, name.as_str())));
                Ok(self.attr(&m))
            }
            Err(e) if e.is_unreachable() => {
                let meta = self.known().by_name(parent, name.as_str());
                meta.map(|m| self.attr(&m)).ok_or(FsError::Remote(e))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A lookup answered by listing `parent` again (`Lookup::Relist`); None: ask for the name.
    /// One listing at a time per directory: a lookup that waited for another's listing is
    /// answered from it.
    async fn relist_lookup(&self, parent: NodeId, name: &str) -> Option<FsResult<FileAttr>> {
        let gate = self.relisting.get(parent);
        let _turn = gate.lock().await;
        let how = self
            .known()
            .lookup(parent, name, self.ttl(), Instant::now());
        match how {
            known::Lookup::Absent => return Some(Err(FsError::Absent)),
            known::Lookup::Ask => return None,
            known::Lookup::Relist => {}
        }
        let start = self.known().listing_start(parent, Instant::now());
        // A failed listing is followed by a lookup, which waits for the directory.
        let entries = self
            .remote
            .list_within(parent, crate::remote::FALLBACK_WAIT)
            .await
            .ok()?;
        let mut k = self.known();
        let dropped = k.listed(parent, &entries, start);
        let found = k.by_name(parent, name);
        drop(k);
        self.names_dropped(parent, dropped);
        Some(found.map(|m| self.attr(&m)).ok_or(FsError::Absent))
    }

    /// getattr.
    /// getattr, with how long the kernel may cache the answer. What this client heard from
    /// the directory (or changed itself) less than the TTL ago (`ttl()`) and the feed has not
    /// reported changed since is answered locally, cached for the rest of that time.
    pub async fn getattr(&self, id: NodeId) -> FsResult<(FileAttr, Duration)> {
        if let Some((meta, left)) = self.recent_meta(id) {
            return Ok((self.attr(&meta), left));
        }
        Ok((self.attr(&self.meta(id).await?), self.ttl()))
    }

    /// setattr: mode and mtime at the directory; size as a new version (truncate locally,
    /// then push like a close).
    pub async fn setattr(
        &self,
        id: NodeId,
        change: AttrChange,
        fh: Option<u64>,
    ) -> FsResult<FileAttr> {
        let AttrChange {
            mode,
            uid,
            gid,
            size,
            mtime,
            mtime_now,
            atime,
            atime_now,
        } = change;
        if let Some(size) = size {
            match fh.map(|fh| self.handle(fh)).transpose()? {
                Some(h) if h.writable => {
                    h.file.set_len(size)?;
                    h.dirty.store(true, Ordering::Release);
                }
                _ => {
                    let opened = self.open(id, libc::O_WRONLY).await?;
                    let result = async {
                        opened.handle.file.set_len(size)?;
                        opened.handle.dirty.store(true, Ordering::Release);
                        self.flush(opened.fh).await
                    }
                    .await;
                    self.release(opened.fh);
                    result?;
                }
            }
        }
        // truncate(2) asks for mtime now with the new size: the push above stamped it (a
        // request of its own would be "one time now", which only the owner may set).
        let mtime = mtime.filter(|_| size.is_none() || !mtime_now || atime.is_some());
        let ns_of = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        };
        let mut mtime = mtime;
        let mut mtime_ns = ns_of(mtime);
        let mut mtime_now = mtime_now;
        let atime_ns = ns_of(atime);
        if atime_ns.is_some() {
            // Access times are never folded into a push: their own request, now. The mtime
            // goes with it unless it is folded (a file with changes not pushed yet, whose push
            // would otherwise set the commit time over it) or goes with a chmod below.
            let folds = self
                .known_meta(id)
                .is_some_and(|m| m.kind == FileKind::File && self.has_local_changes(id));
            // Both now (`touch`) goes as one request: write permission is enough for that
            // pair only, never for one time now alone.
            let touch = atime_now && mtime_now && mtime_ns.is_some();
            let with_mtime = touch || (!folds && mode.is_none());
            let req = SetAttrRequest {
                atime_ns,
                atime_now,
                mtime_ns: mtime_ns.filter(|_| with_mtime),
                mtime_now: mtime_now && with_mtime,
                ..SetAttrRequest::default()
            };
            let meta = self.set_attrs(id, &req).await?;
            self.remember(&meta, None);
            if with_mtime && folds {
                // The local copy's time is what getattr shows until its push: it follows.
                if let Ok(f) = std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.cache.path(id))
                {
                    let _ = f.set_modified(ns_to_time(meta.mtime_ns));
                }
            }
            if with_mtime {
                mtime = None;
                mtime_ns = None;
            }
            if mode.is_none() && mtime_ns.is_none() && uid.is_none() && gid.is_none() {
                return Ok(self.attr(&meta));
            }
        }
        let mode = mode.map(|m| m & 0o7777);
        // Owner and group as the cluster knows them (this mount shows this user's as the
        // mounting user's); unchanged ones are left out.
        let (uid, gid) = {
            let me = self.remote.identity().filter(|_| !self.remote.local_ids());
            let known = self.known_meta(id);
            let uid = uid
                .map(|u| match &me {
                    Some(me) if u == self.uid => me.uid,
                    _ => u,
                })
                .filter(|u| known.as_ref().is_none_or(|m| m.uid != *u));
            let gid = gid
                .map(|g| match &me {
                    Some(me) if g == self.gid => me.gid,
                    _ => g,
                })
                .filter(|g| known.as_ref().is_none_or(|m| m.gid != *g));
            (uid, gid)
        };
        if uid.is_some() || gid.is_some() {
            let req = SetAttrRequest {
                uid,
                gid,
                ..SetAttrRequest::default()
            };
            let meta = self.set_attrs(id, &req).await?;
            self.remember(&meta, None);
        }
        if mode.is_none() && mtime_ns.is_none() {
            // Nothing dfs stores changed (fchown, as tar does for every file, or a size change
            // already pushed above): answer like getattr, locally while what this client
            // heard is fresh.
            return Ok(self.getattr(id).await?.0);
        }
        let mut mode = mode;
        if let Some(meta) = self.known_meta(id)
            && meta.kind == FileKind::File
            && self.has_local_changes(id)
        {
            // fchmod/futimens on a file open for writing (GNU tar, `cp -p`, `rsync -t`), or
            // times set on a file whose new content is not pushed yet: folded into the push
            // that follows, instead of a round trip and a commit of their own now (an mtime
            // must be: the push would set its commit time over it). The local copy carries
            // the time meanwhile (its mtime is what getattr shows until then). Only what the
            // push will apply as its caller asked is folded (see `folds`); the rest goes to
            // the directory now, as its caller.
            let (fold_mode, fold_mtime) = self.folds(id);
            let fold_mode = mode.filter(|_| fold_mode);
            let fold_mtime = mtime_ns.filter(|_| fold_mtime);
            if fold_mode.is_some() || fold_mtime.is_some() {
                // Both are the owner's to make (a time here is never "both now", which goes
                // on its own above): refused now, as the directory would, not at the push.
                let me = crate::caller::current().or_else(|| self.remote.identity());
                if me.is_some_and(|me| !me.owns(meta.uid)) {
                    return Err(FsError::NotOwner("change the mode or set the times"));
                }
                if fold_mtime.is_some()
                    && let Some(t) = mtime
                    && let Ok(f) = std::fs::OpenOptions::new()
                        .write(true)
                        .open(self.cache.path(id))
                {
                    let _ = f.set_modified(t);
                }
                let mut folded = self.folded.lock().unwrap_or_else(|p| p.into_inner());
                let f = folded.entry(id).or_default();
                f.mode = fold_mode.or(f.mode);
                f.mtime_ns = fold_mtime.or(f.mtime_ns);
                drop(folded);
                if fold_mode.is_some() {
                    mode = None;
                }
                if fold_mtime.is_some() {
                    mtime_ns = None;
                    mtime_now = false;
                }
                if mode.is_none() && mtime_ns.is_none() {
                    return Ok(self.attr(&meta));
                }
            }
        }
        let req = SetAttrRequest {
            mode,
            mtime_ns,
            mtime_now,
            ..SetAttrRequest::default()
        };
        let meta = self.set_attrs(id, &req).await?;
        self.remember(&meta, None);
        Ok(self.attr(&meta))
    }

    /// Which attribute changes of the caller running now may be folded into the next push of
    /// `node` (mode, mtime): only those that push applies as the caller asked. On an ordinary
    /// mount every push acts as this mount's login, the caller of every change. On a
    /// `--local-ids` mount a mode change never folds (it goes to the directory at once, judged
    /// for its caller: a push by another local user would drop it, or fail the close of a
    /// writer who never made it), and an mtime folds only when every push it can ride
    /// with acts as this caller (or as the mount's login, which applies any time).
    fn folds(&self, node: NodeId) -> (bool, bool) {
        if !self.remote.local_ids() {
            return (true, true);
        }
        let me = crate::caller::current().map(|i| i.uid);
        let same = self
            .pushers(node)
            .iter()
            .all(|p| p.as_ref().is_none_or(|p| Some(p.uid) == me));
        (false, same)
    }

    /// Who the next push of `node` may act as (None: the mount's login): the openers of its
    /// handles open for writing, or, with none, whoever pushes the change already pending.
    fn pushers(&self, node: NodeId) -> Vec<Option<common::Identity>> {
        let mut who: Vec<Option<common::Identity>> = self
            .handles_of(node)
            .into_iter()
            .filter(|h| h.writable)
            .map(|h| h.opener.clone())
            .collect();
        // With writers open, the next push is a writer's close (which carries any change
        // pending from before); else a background push of the pending change.
        if who.is_empty() && self.cache.is_pending(node) {
            // Unknown (not even the owner heard of): nobody this caller can be.
            who.push(
                self.actor_now(node)
                    .unwrap_or_else(|| Some(common::Identity::nobody())),
            );
        }
        who
    }

    /// opendir: lists the directory once; the kernel then pages through this snapshot (one
    /// request to the directory per listing, not per page).
    pub async fn opendir(&self, id: NodeId) -> FsResult<u64> {
        let dir = self.meta(id).await?;
        let start = self.known().listing_start(id, Instant::now());
        let entries = self.remote.list(id).await?;
        let dir_attr = self.attr(&dir);
        let mut out = vec![
            DirItem {
                ino: id.0,
                kind: FileType::Directory,
                name: ".".into(),
                attr: dir_attr,
            },
            DirItem {
                ino: dir.parent.0,
                kind: FileType::Directory,
                name: "..".into(),
                attr: dir_attr,
            },
        ];
        let dropped = self.known().listed(id, &entries, start);
        self.names_dropped(id, dropped);
        for e in entries {
            out.push(DirItem {
                ino: e.meta.id.0,
                kind: kind_of(e.meta.kind),
                attr: self.attr(&e.meta),
                name: e.name,
            });
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.listings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, Arc::new(out));
        Ok(fh)
    }

    /// The listing taken by `opendir`.
    pub fn listing(&self, fh: u64) -> FsResult<Arc<Vec<DirItem>>> {
        self.listings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle(fh))
    }

    /// releasedir.
    pub fn releasedir(&self, fh: u64) {
        self.listings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
    }

    async fn create_node(
        &self,
        parent: NodeId,
        name: &OsStr,
        kind: FileKind,
        mode: u32,
        target: Option<String>,
    ) -> FsResult<NodeMeta> {
        let name = name_of(name)?;
        let req = CreateRequest {
            name: name.clone(),
            kind,
            mode: mode & 0o7777,
            symlink_target: target,
            rdev: 0,
        };
        let m = self
            .remote
            .create(parent, &req)
            .await
            // The name may exist after all (made by another client, or by this request).
            .inspect_err(|e| self.change_failed(e, &[(parent, name.as_str())], &[]))?;
        self.remember(&m, Some((parent, name.as_str())));
        self.touched_dir(parent);
        Ok(m)
    }

    /// mkdir.
    pub async fn mkdir(&self, parent: NodeId, name: &OsStr, mode: u32) -> FsResult<FileAttr> {
        let m = self
            .create_node(parent, name, FileKind::Dir, mode, None)
            .await?;
        // Empty, and every later change there by this client is recorded: lookups of new
        // names in it are answered here while that is fresh.
        self.known().made_dir(m.id, Instant::now());
        self.known().dir_links(parent, 1);
        Ok(self.attr(&m))
    }

    /// mknod: a FIFO, a socket (`bind`), a device (the administrator's only), or an empty
    /// regular file. Special files have no content: the kernel serves their opens itself.
    pub async fn mknod(
        &self,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> FsResult<FileAttr> {
        let kind = kind_of_mode(mode)?;
        if kind == FileKind::File {
            let (attr, opened) = self
                .create(parent, name, mode & 0o7777, libc::O_WRONLY | libc::O_EXCL)
                .await?;
            self.release(opened.fh);
            return Ok(attr);
        }
        let name = name_of(name)?;
        let req = CreateRequest {
            name: name.clone(),
            kind,
            mode: mode & 0o7777,
            symlink_target: None,
            rdev: if kind.is_device() { u64::from(rdev) } else { 0 },
        };
        let m = self
            .remote
            .create(parent, &req)
            .await
            .inspect_err(|e| self.change_failed(e, &[(parent, name.as_str())], &[]))?;
        self.remember(&m, Some((parent, name.as_str())));
        self.touched_dir(parent);
        Ok(self.attr(&m))
    }

    /// link: one more name for a file (EPERM for a directory).
    pub async fn link(
        &self,
        node: NodeId,
        new_parent: NodeId,
        new_name: &OsStr,
    ) -> FsResult<FileAttr> {
        let name = name_of(new_name)?;
        // The directory wants a name the file is reached by (it checks search permission
        // there): the kernel looked one up just before. A name known here may be stale (gone
        // on another client): then the next, and last the recorded parent's listing.
        let hint = self.meta(node).await?.parent;
        let mut sources = self.known().names_of(node, hint);
        sources.truncate(LINK_SOURCES_TRIED);
        let mut listed = false;
        let m = loop {
            if sources.is_empty() && !listed {
                listed = true;
                sources = self
                    .remote
                    .list(hint)
                    .await?
                    .into_iter()
                    .filter(|e| e.meta.id == node)
                    .map(|e| (hint, e.name))
                    .collect();
            }
            if sources.is_empty() {
                return Err(FsError::Absent);
            }
            let (parent, source) = sources.remove(0);
            let req = LinkRequest {
                node,
                parent,
                name: name_of(OsStr::new(&source))?,
                new_parent,
                new_name: name.clone(),
            };
            match self.remote.link(&req).await {
                Err(RemoteError::Api {
                    code: ErrorCode::NotFound,
                    ..
                }) => self.forget_name(parent, &source),
                r => {
                    break r.inspect_err(|e| {
                        self.change_failed(e, &[(new_parent, name.as_str())], &[node])
                    })?;
                }
            }
        };
        self.remember(&m, Some((new_parent, name.as_str())));
        self.touched_dir(new_parent);
        Ok(self.attr(&m))
    }

    /// access(2) for this mount's identity (`mask`: `F_OK` or `R_OK | W_OK | X_OK`), decided
    /// with the cluster's rules on the attributes as this client knows them (fresh within the
    /// attribute TTL). The directory still decides every operation itself.
    pub async fn access(&self, id: NodeId, mask: i32) -> FsResult<()> {
        let meta = match self.recent_meta(id) {
            Some((m, _)) => m,
            None => self.meta(id).await?,
        };
        // On a --local-ids mount the caller of the request, else this mount's login.
        let Some(me) = crate::caller::current().or_else(|| self.remote.identity()) else {
            return Ok(());
        };
        let want = [
            (libc::R_OK, common::perm::R),
            (libc::W_OK, common::perm::W),
            (libc::X_OK, common::perm::X),
        ]
        .iter()
        .filter(|(m, _)| mask & m != 0)
        .fold(0, |w, (_, b)| w | b);
        let mode = match self.folded_attrs(id).mode {
            Some(m) if meta.kind == FileKind::File => m,
            _ => meta.mode,
        };
        if want == 0 || me.may(meta.uid, meta.gid, mode, want, meta.kind == FileKind::Dir) {
            Ok(())
        } else {
            Err(FsError::AccessDenied)
        }
    }

    /// symlink.
    pub async fn symlink(
        &self,
        parent: NodeId,
        name: &OsStr,
        target: &std::path::Path,
    ) -> FsResult<FileAttr> {
        let target = target.to_str().ok_or(FsError::NotUtf8)?.to_owned();
        Ok(self.attr(
            &self
                .create_node(parent, name, FileKind::Symlink, 0o777, Some(target))
                .await?,
        ))
    }

    /// readlink.
    pub async fn readlink(&self, id: NodeId) -> FsResult<String> {
        self.meta(id).await?.symlink_target.ok_or(FsError::NotAFile)
    }

    /// create + open: an empty file, placed by the directory, opened from a fresh cache file.
    pub async fn create(
        &self,
        parent: NodeId,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> FsResult<(FileAttr, Opened)> {
        // Without O_EXCL, a name another client created meanwhile is opened instead (POSIX
        // `open(O_CREAT)` semantics).
        let meta = match self
            .create_node(parent, name, FileKind::File, mode, None)
            .await
        {
            Err(FsError::Remote(RemoteError::Api {
                code: common::ErrorCode::Exists,
                ..
            })) if flags & libc::O_EXCL == 0 => {
                let existing = self.remote.lookup(parent, &name_of(name)?).await?;
                let opened = self.open(existing.id, flags).await?;
                return Ok((self.attr(&existing), opened));
            }
            other => other?,
        };
        // Eviction (which takes node locks) never sees the new copy before it is open.
        let lock = self.node_locks.get(meta.id);
        let _g = lock.lock().await;
        let path = self.cache.path(meta.id);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        self.cache.put_lazy(meta.id, &CacheEntry::clean(&meta))?;
        let opened = self.open_local(meta.id, flags & !libc::O_TRUNC, false)?;
        Ok((self.attr(&meta), opened))
    }

    /// A name of `removed` is gone (unlink, or replaced by a rename), which the directory
    /// answered with the links left: its last name drops the cached copy (open handles read on
    /// from the file they hold); with names left, the copy, pending changes and all, stays.
    fn gone_name(&self, removed: &NodeMeta) {
        if removed.nlink == 0 {
            self.drop_cached(removed.id);
        } else {
            self.remember(removed, None);
        }
    }

    fn drop_cached(&self, node: NodeId) {
        self.forget_actor(node);
        self.writeback_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
        if let Err(e) = self.cache.remove(node) {
            tracing::warn!(%node, error = %e, "dropping a deleted file from the cache failed");
        }
    }

    /// unlink (also of an open file: open handles keep their data until closed).
    pub async fn unlink(&self, parent: NodeId, name: &OsStr) -> FsResult<()> {
        let name = name_of(name)?;
        let removed = self
            .remote
            .remove(parent, &name, false)
            .await
            .inspect_err(|e| self.change_failed(e, &[(parent, name.as_str())], &[]))?;
        self.forget_name(parent, name.as_str());
        self.touched_dir(parent);
        self.gone_name(&removed);
        Ok(())
    }

    /// rmdir.
    pub async fn rmdir(&self, parent: NodeId, name: &OsStr) -> FsResult<()> {
        let name = name_of(name)?;
        self.remote
            .remove(parent, &name, true)
            .await
            .inspect_err(|e| self.change_failed(e, &[(parent, name.as_str())], &[]))?;
        self.forget_name(parent, name.as_str());
        self.touched_dir(parent);
        self.known().dir_links(parent, -1);
        Ok(())
    }

    /// rename (atomic at the directory; replaces an existing target).
    pub async fn rename(
        &self,
        parent: NodeId,
        name: &OsStr,
        new_parent: NodeId,
        new_name: &OsStr,
        flags: u32,
    ) -> FsResult<()> {
        if flags & libc::RENAME_EXCHANGE != 0 || flags & libc::RENAME_WHITEOUT != 0 {
            return Err(FsError::Unsupported("RENAME_EXCHANGE / RENAME_WHITEOUT"));
        }
        let req = RenameRequest {
            parent,
            name: name_of(name)?,
            new_parent,
            new_name: name_of(new_name)?,
            no_replace: flags & libc::RENAME_NOREPLACE != 0,
        };
        let moved = self.known().by_name(parent, req.name.as_str());
        let replaced = self.remote.rename(&req).await.inspect_err(|e| {
            self.change_failed(
                e,
                &[
                    (parent, req.name.as_str()),
                    (new_parent, req.new_name.as_str()),
                ],
                &[],
            );
        })?;
        self.known()
            .renamed(parent, req.name.as_str(), new_parent, req.new_name.as_str());
        self.touched_dir(parent);
        self.touched_dir(new_parent);
        {
            // Link counts of the parents: a directory moved takes its `..` along, one
            // replaced takes its own away.
            let mut k = self.known();
            if let Some(m) = &moved {
                k.touched_node(m.id, common::meta::now_ns());
            }
            match moved.map(|m| m.kind) {
                Some(FileKind::Dir) => {
                    k.dir_links(parent, -1);
                    k.dir_links(new_parent, 1);
                }
                Some(_) => {}
                None => {
                    k.stale(parent);
                    k.stale(new_parent);
                }
            }
            if replaced.as_ref().is_some_and(|r| r.kind == FileKind::Dir) {
                k.dir_links(new_parent, -1);
            }
        }
        if let Some(old) = replaced {
            self.gone_name(&old);
        }
        Ok(())
    }

    /// statfs numbers: (blocks, bfree, files) in 4 KiB blocks.
    pub async fn statfs(&self) -> FsResult<StatFs> {
        Ok(self.remote.statfs().await?)
    }

    /// Opens the cached copy. `truncated`: the copy was just emptied instead of downloaded
    /// (O_TRUNC of a non-empty server version), which is a change to push even without writes.
    fn open_local(&self, node: NodeId, flags: i32, truncated: bool) -> FsResult<Opened> {
        let acc = flags & libc::O_ACCMODE;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(self.cache.path(node))?;
        let mut dirty = truncated && writable;
        if writable {
            // Counted as a writer before the mark is set, so that a release of another handle
            // running now never clears the mark this open relies on.
            *self
                .writers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(node)
                .or_default() += 1;
            let prepared = (|| -> FsResult<bool> {
                // Durably noted before any byte changes (the truncation below included), so a
                // crash is noticed at the next start.
                self.set_writing(node, true)?;
                if flags & libc::O_TRUNC != 0 && file.metadata()?.len() > 0 {
                    file.set_len(0)?;
                    return Ok(true);
                }
                Ok(false)
            })();
            match prepared {
                Ok(emptied) => dirty |= emptied,
                Err(e) => {
                    self.drop_writer(node);
                    return Err(e);
                }
            }
        }
        let baseline = Mutex::new(stamp(&file));
        let baseline_at = Mutex::new(SystemTime::now());
        let handle = Arc::new(Handle {
            node,
            file,
            writable,
            append: flags & libc::O_APPEND != 0,
            dirty: AtomicBool::new(dirty),
            baseline,
            baseline_at,
            opener: crate::caller::current(),
        });
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fh, handle.clone());
        Ok(Opened { fh, handle })
    }

    /// Moves a finished temp file to the copy of `node` and makes the rename durable before
    /// the index says the copy is that version.
    fn install(&self, node: NodeId, tmp: &std::path::Path) -> FsResult<()> {
        let path = self.cache.path(node);
        std::fs::rename(tmp, &path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// open: fetch the metadata; download the whole file if the cache has no copy of that
    /// version; then serve every read and write from the local copy. A copy with pending
    /// changes, or one open here (for writing, or at all under kernel passthrough, which binds
    /// the inode to one file), is never replaced. If the directory cannot be reached, or the
    /// file is busy with a push for longer than a moment, a cached copy is used as it is.
    pub async fn open(&self, node: NodeId, flags: i32) -> FsResult<Opened> {
        // Only a copy with pending changes is never replaced by whoever holds the lock (a push),
        // so only then may an open go ahead without it.
        let pending_copy = || {
            self.cache
                .get(node)
                .ok()
                .flatten()
                .is_some_and(|e| e.pending.is_some())
                && self.cache.path(node).exists()
        };
        self.note_open(node);
        let lock = self.node_locks.get(node);
        let _g = match tokio::time::timeout(Duration::from_secs(2), lock.lock()).await {
            Ok(g) => g,
            Err(_) if pending_copy() => {
                tracing::info!(%node, "file busy with a push; opening the cached copy");
                return self.open_local(node, flags, false);
            }
            // Whoever holds it (another open downloading the file) gives up after the close
            // timeout without progress; this open waits no longer than that either.
            Err(_) => match tokio::time::timeout(self.config.close_timeout, lock.lock()).await {
                Ok(g) => g,
                Err(_) => {
                    return Err(FsError::Remote(RemoteError::Timeout(
                        "the file is busy with another open or a push here".into(),
                    )));
                }
            },
        };
        if self.torn_copy(node) && self.writer_count(node) == 0 {
            // Damaged by a failed refresh: set aside (it may hold bytes written since, whose
            // closes failed) and fetched again.
            let path = self.cache.path(node);
            if path.exists() {
                let kept = self.set_aside(&path, node)?;
                tracing::warn!(%node, kept, "a copy damaged by a failed refresh was set aside");
            }
            self.cache.remove(node)?;
            self.torn
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&node);
        }
        let entry = self.cache.get(node)?;
        let path = self.cache.path(node);
        let have_copy = entry.is_some() && path.exists();
        let asked = if have_copy {
            self.remote
                .get_to_open_within(node, flags, crate::remote::FALLBACK_WAIT)
                .await
        } else {
            self.remote.get_to_open(node, flags).await
        };
        let mut meta = match asked {
            Ok(m) => {
                self.remember(&m, None);
                m
            }
            Err(e) if e.is_unreachable() && have_copy => {
                tracing::warn!(%node, error = %e, "directory unreachable; opening the cached copy");
                return self.open_local(node, flags, false);
            }
            Err(e) => return Err(e.into()),
        };
        if meta.kind != FileKind::File {
            return Err(FsError::NotAFile);
        }
        let local_changes = entry.as_ref().is_some_and(|e| e.pending.is_some())
            || self.writer_count(node) > 0
            || self.is_unrecorded(node)
            || (self.passthrough.load(Ordering::Relaxed) && self.open_here(node));
        if !local_changes && meta.writeback.is_some() {
            meta = self.wait_for_writeback(meta).await?;
        }
        let fresh = entry.as_ref().is_some_and(|e| e.hash == meta.hash);
        if have_copy && !local_changes && fresh {
            // The copy is the current content, whichever version it was fetched as: changes
            // made to it now are based on the current version.
            self.rebase(node, &meta)?;
            // What getattr shows while the file is open for writing comes from the copy: it
            // has the server's times, not the time it was fetched or pushed (another client may
            // have set them since).
            match_mtime(&path, &meta);
        }
        if have_copy && (local_changes || fresh) {
            return self.open_local(node, flags, false);
        }
        let truncating = flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY;
        let truncated = truncating && meta.hash.as_str() != ContentHash::EMPTY_HEX;
        if truncated {
            // The copy is about to be emptied: until it is, and is open, the index names no
            // server version for it (and says it is being written, for `recover` after a
            // crash), so that nothing ever takes the emptied copy for `meta`'s content.
            // It keeps the version it replaces, which is what the change is based on.
            self.cache
                .put(node, &CacheEntry::being_replaced(meta.version))?;
        }
        let result = self.fetch_and_open(node, flags, meta, truncating).await;
        if result.is_err() && truncated {
            // The copy is in an unknown state: forgotten, fetched again by the next open.
            let _ = self.cache.remove(node);
        }
        result
    }

    /// Records that the clean copy of `node` is `meta`'s version (its content is).
    fn rebase(&self, node: NodeId, meta: &NodeMeta) -> FsResult<()> {
        let _g = self.entry_updates();
        if let Some(mut e) = self.cache.get(node)?
            && e.pending.is_none()
            && e.hash == meta.hash
            && e.version != meta.version
        {
            e.version = meta.version;
            self.cache.put_lazy(node, &e)?;
        }
        Ok(())
    }

    /// `open` once the copy must be fetched or emptied: puts the new copy in place, indexes it
    /// and opens it.
    async fn fetch_and_open(
        &self,
        node: NodeId,
        flags: i32,
        mut meta: NodeMeta,
        truncating: bool,
    ) -> FsResult<Opened> {
        let truncated = truncating && meta.hash.as_str() != ContentHash::EMPTY_HEX;
        let tmp = self.cache.tmp_path();
        if meta.hash.as_str() == ContentHash::EMPTY_HEX || truncating {
            // Nothing to fetch: the content is empty, or about to be truncated.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?
                .sync_all()?;
        } else {
            // A version superseded between our metadata read and the download may already be
            // gone from the servers: read the metadata again and retry once.
            let mut result = self.remote.download(&meta, &tmp).await;
            if result.as_ref().is_err_and(|e| e.is_not_found()) {
                meta = self.remote.get_to_open(node, libc::O_RDONLY).await?;
                result = self.remote.download(&meta, &tmp).await;
            }
            if matches!(&result, Err(RemoteError::Local { errno, .. }) if *errno == libc::ENOSPC)
                && self.evict().unwrap_or(0) > 0
            {
                // The cache's disk is full: make room with clean copies, then once more.
                result = self.remote.download(&meta, &tmp).await;
            }
            if let Err(e) = result {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        }
        match_mtime(&tmp, &meta);
        self.install(node, &tmp)?;
        self.cached_more(meta.size);
        let entry = CacheEntry {
            writing: truncated,
            ..CacheEntry::clean(&meta)
        };
        self.cache.put(node, &entry)?;
        fail::fail_point!("open-installed", |_| Err(FsError::Io(
            std::io::Error::other("fault injected after the copy was installed")
        )));
        self.open_local(node, flags, truncated)
    }

    /// Another client closed this file in write-back mode and is still pushing it: wait (at
    /// most the close timeout, and no longer than the intent lasts) for the new version, so
    /// that this open sees what that close wrote.
    async fn wait_for_writeback(&self, mut meta: NodeMeta) -> FsResult<NodeMeta> {
        let deadline = Instant::now() + self.config.close_timeout;
        let mut pause = Duration::from_millis(2);
        while let Some(w) = &meta.writeback {
            if w.until_ms <= dfs_server::store::now_ms() || Instant::now() >= deadline {
                tracing::info!(node = %meta.id, "a write-back push announced by another client did not arrive; opening the current version");
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
            meta = self.remote.get(meta.id).await?;
            self.remember(&meta, None);
        }
        Ok(meta)
    }

    /// read from the local copy.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let h = self.handle(fh)?;
        let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let mut done = 0;
        while done < buf.len() {
            let n = h.file.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }

    /// write to the local copy; pushed on flush/fsync/close.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(FsError::BadHandle(fh));
        }
        let offset = if h.append {
            h.file.metadata()?.len()
        } else {
            offset
        };
        h.file.write_all_at(data, offset)?;
        // A write after an explicit time makes "now" the modification time again.
        if let Some(f) = self
            .folded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&h.node)
        {
            f.mtime_ns = None;
        }
        h.dirty.store(true, Ordering::Release);
        Ok(u32::try_from(data.len()).unwrap_or(u32::MAX))
    }

    /// flush (every close) and fsync: push the handle's changes, waiting at most the close
    /// timeout. On failure the changes stay in the cache, pending, and are retried.
    /// On a `--local-ids` mount it acts as the handle's opener, whoever closes.
    pub async fn flush(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        crate::caller::scope(h.opener.clone(), self.flush_handle(h)).await
    }

    async fn flush_handle(&self, h: Arc<Handle>) -> FsResult<()> {
        // Under passthrough the writes bypass us and (size, mtime) may not move for a same-size
        // rewrite within one timestamp tick: let the content hash decide instead.
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        let folded = h.writable && self.folded_attrs(h.node) != FoldedAttrs::default();
        if h.writable {
            self.record_unrecorded(h.node)?;
        }
        if !(h.changed() || passthrough && h.writable && !h.provably_unchanged() || folded) {
            return Ok(());
        }
        // No fsync of the cache copy: the close is acknowledged only once the servers hold
        // the content durably, and a crash of this process keeps the page cache (the pending
        // record survives it through the cache journal).
        // From here on the change is recorded as pending by `push`, so the handle is clean.
        h.mark_clean();
        if h.writable {
            self.note_actor(h.node, h.opener.as_ref());
        }
        if self.config.writeback {
            match self.writeback(&h).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    // Not recorded: dirty again, so release records it (or keeps it in the
                    // unrecorded set).
                    h.dirty.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        self.push_now(&h).await
    }

    /// fsync: waits for the servers in every mode. A writer's fsync acts as the handle's
    /// opener, as `flush`. A read-only handle's fsync that finds a change pending (written
    /// through another handle) never pushes as its reader, who may not write the file: it
    /// pushes that change as a background push would.
    pub async fn fsync(&self, fh: u64) -> FsResult<()> {
        let h = self.handle(fh)?;
        let who = if h.writable {
            h.opener.clone()
        } else {
            self.push_actor(h.node).await?
        };
        crate::caller::scope(who, self.fsync_handle(h)).await
    }

    async fn fsync_handle(&self, h: Arc<Handle>) -> FsResult<()> {
        let passthrough = self.passthrough.load(Ordering::Relaxed);
        if h.writable {
            self.record_unrecorded(h.node)?;
        }
        let pending = self.cache.get(h.node)?.is_some_and(|e| e.pending.is_some());
        if !(h.changed() || passthrough && h.writable && !h.provably_unchanged() || pending) {
            return Ok(());
        }
        h.mark_clean();
        if h.writable {
            self.note_actor(h.node, h.opener.as_ref());
        }
        self.push_now(&h).await
    }

    /// Pushes the handle's file now, waiting at most the close timeout.
    async fn push_now(&self, h: &Handle) -> FsResult<()> {
        let deadline = Instant::now() + self.config.close_timeout;
        // The close waits: this push may replace a version newer than its base (last close
        // wins).
        // (Only a writer's close or fsync: an fsync of a read-only handle that finds an old
        // pending change pushes it as a later push would.)
        match self.push(h.node, deadline, h.writable).await {
            Ok(()) => Ok(()),
            Err(e) => {
                // Keep the handle dirty too, so release records the change even if `push`
                // failed before it could.
                h.dirty.store(true, Ordering::Release);
                self.wake.notify_one();
                // close() reports EIO for a push that did not happen (the data stays pending),
                // except for the causes the user must act on.
                Err(match e.errno() {
                    libc::EACCES | libc::EPERM | libc::EFBIG | libc::ENOSPC => e,
                    _ => FsError::PushFailed(e.to_string()),
                })
            }
        }
    }

    /// release: forget the handle; anything unpushed is already pending in the index.
    pub fn release(&self, fh: u64) {
        let h = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh);
        if let Some(h) = h {
            // Record changes before this handle stops counting as a writer, so no open() can
            // replace the copy in between.
            let mut recorded = true;
            if h.changed() {
                // Written after the last flush (e.g. through an mmap): record and push later,
                // as its opener.
                self.note_actor(h.node, h.opener.as_ref());
                if let Err(e) = self.mark_pending(h.node) {
                    recorded = false;
                    let generation = self.unrecorded_gen.fetch_add(1, Ordering::Relaxed) + 1;
                    self.unrecorded
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(h.node, generation);
                    tracing::error!(node = %h.node, error = %e, "recording unpushed changes failed; the copy is kept dirty and recorded when that works again");
                }
                self.wake.notify_one();
            }
            if h.writable {
                let last = self.drop_writer(h.node);
                if last
                    && recorded
                    && let Err(e) = self.set_writing(h.node, false)
                {
                    tracing::warn!(node = %h.node, error = %e, "clearing the writing mark failed");
                }
                if last && self.config.writeback {
                    // The uploader skips files open for writing: now it may push this one.
                    self.wake.notify_one();
                }
            }
        }
    }

    /// This client's status.
    pub fn status(&self) -> FsResult<ClientStatus> {
        let (cached_files, cached_bytes) = self.cache.usage()?;
        Ok(ClientStatus {
            cached_files,
            cached_bytes,
            cache_budget: self.cache_budget,
            pending_uploads: self.unsettled()?.into_iter().map(|n| n.0).collect(),
            downloads: self.remote.stats.downloads.load(Ordering::Relaxed),
            uploads: self.remote.stats.uploads.load(Ordering::Relaxed),
            passthrough: self.passthrough.load(Ordering::Relaxed),
            writeback: self.config.writeback,
            push_latency_ms: self
                .metrics
                .recent_push_latency()
                .map(|(a, b)| (a.as_secs_f64() * 1e3, b.as_secs_f64() * 1e3)),
            conflicts: self.conflicts(),
            refused_uploads: self.refused_uploads(),
        })
    }

    /// Writes `status.json` into the cache directory for `dfs status`.
    /// Informational only, so written without fsyncs (a temp file renamed over the old one,
    /// so a reader never sees half of it).
    pub fn write_status(&self) {
        *self.status_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if let Ok(s) = self.status()
            && let Ok(data) = serde_json::to_vec_pretty(&s)
        {
            let path = self.cache_root.join("status.json");
            let tmp = self.cache_root.join(format!(
                ".status.{}.tmp",
                hex::encode(rand::random::<[u8; 6]>())
            ));
            if std::fs::write(&tmp, &data).is_ok() && std::fs::rename(&tmp, &path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }

    /// `write_status`, at most once a second (the uploader runs after every write-back close).
    pub(crate) fn write_status_throttled(&self) {
        let last = *self.status_at.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            self.write_status();
        }
    }
}
