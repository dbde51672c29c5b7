//! Links _fuser_ method calls into the [`DfsFs`] core and replies with data or an errno. No
//! logic. Operations that can wait on a server for long (open, create, flush, fsync, setattr)
//! run as tasks on the tokio runtime and reply from there, so a file whose servers are stuck
//! never holds one of fuser's few worker threads; quick ones run on the worker thread, and go
//! on as a runtime task if they take longer than `FUSE_THREAD_HOLD` (a directory that does
//! not answer). Release (which may hash a whole file) is handed to the blocking pool.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use common::NodeId;
use fuser::{
    AccessFlags, BackingId, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use crate::error::FsError;
use crate::fs::DfsFs;

/// The kernel's entry and attribute TTL is chosen per reply (`DfsFs::reply_ttl`): long while
/// the change feed is healthy, the short `ATTR_TTL` otherwise.
use crate::fs::feed::{Invalidation, KernelCache};
use tokio::time::Instant as Since;

/// The fuser adapter.
pub struct FuseAdapter {
    fs: Arc<DfsFs>,
    rt: tokio::runtime::Handle,
    /// Passthrough wanted by the user; whether the kernel agreed is in `pt`.
    want_passthrough: bool,
    pt: Arc<Passthrough>,
    /// The lock owners seen on each open file (open-file-description locks belong to the
    /// file, and only its release can give them up).
    lock_owners: Arc<Mutex<HashMap<u64, std::collections::HashSet<u64>>>>,
    /// When each open directory listing was asked for (the TTL of its READDIRPLUS entries).
    listed_at: Arc<Mutex<HashMap<u64, Since>>>,
}

/// What the kernel is told to forget, one call each (fuser's `Notifier` in a mount; tests put
/// in their own, e.g. one that blocks like a stuck kernel).
pub trait KernelNotify: Send + 'static {
    /// Drops the entry `name` in `parent`.
    fn inval_entry(&self, parent: NodeId, name: &str) -> std::io::Result<()>;
    /// Drops the attributes and cached content of `node`.
    fn inval_inode(&self, node: NodeId) -> std::io::Result<()>;
    /// Drops the entry `name` in `parent`, whose node `child` is gone.
    fn delete(&self, parent: NodeId, child: NodeId, name: &str) -> std::io::Result<()>;
}

impl KernelNotify for fuser::Notifier {
    fn inval_entry(&self, parent: NodeId, name: &str) -> std::io::Result<()> {
        fuser::Notifier::inval_entry(self, INodeNo(parent.0), OsStr::new(name))
    }

    fn inval_inode(&self, node: NodeId) -> std::io::Result<()> {
        fuser::Notifier::inval_inode(self, INodeNo(node.0), 0, 0)
    }

    fn delete(&self, parent: NodeId, child: NodeId, name: &str) -> std::io::Result<()> {
        fuser::Notifier::delete(self, INodeNo(parent.0), INodeNo(child.0), OsStr::new(name))
    }
}

/// Sends invalidations to the kernel through a [`KernelNotify`] on a thread of its own: a
/// notification can wait on the kernel, which may be waiting on a FUSE thread (deadlock in a
/// handler) or hold up the runtime (in a worker). It tells since when it has made no progress
/// while work waits, so that a stuck kernel makes the feed unhealthy
/// (`fs::feed::NOTIFY_BOUND`); a long batch the kernel takes call by call is progress.
pub struct NotifierThread {
    tx: std::sync::mpsc::Sender<Vec<Invalidation>>,
    queue: Arc<Mutex<NotifyQueue>>,
}

/// What `NotifierThread` has to do, and when it last got something done.
struct NotifyQueue {
    /// When each batch not yet applied was handed over, oldest first.
    waiting: std::collections::VecDeque<std::time::Instant>,
    /// When the thread last finished a call into the kernel.
    progress: std::time::Instant,
}

impl NotifierThread {
    /// Starts the thread; it ends when the core drops its end.
    pub fn start(notifier: impl KernelNotify) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Invalidation>>();
        let queue = Arc::new(Mutex::new(NotifyQueue {
            waiting: std::collections::VecDeque::new(),
            progress: std::time::Instant::now(),
        }));
        let left = queue.clone();
        let done = move |pop: bool| {
            let mut q = left.lock().unwrap_or_else(|p| p.into_inner());
            q.progress = std::time::Instant::now();
            if pop {
                q.waiting.pop_front();
            }
        };
        std::thread::Builder::new()
            .name("dfs-notify".into())
            .spawn(move || {
                for batch in rx {
                    for inv in batch {
                        // ENOENT (not in the kernel's cache) is already taken as success.
                        let r = match &inv {
                            Invalidation::Entry { parent, name } => {
                                notifier.inval_entry(*parent, name)
                            }
                            Invalidation::Inode(id) => notifier.inval_inode(*id),
                            Invalidation::Delete {
                                parent,
                                child,
                                name,
                            } => notifier.delete(*parent, *child, name),
                        };
                        if let Err(e) = r {
                            // After an unmount every notification fails; nothing to drop then.
                            tracing::debug!(?inv, error = %e, "kernel invalidation failed");
                        }
                        done(false);
                    }
                    done(true);
                }
            })?;
        Ok(Arc::new(NotifierThread { tx, queue }))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, NotifyQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KernelCache for NotifierThread {
    fn invalidate(&self, batch: Vec<Invalidation>) {
        // Queued under the lock, so that the thread never pops a time before it is pushed.
        let mut q = self.queue();
        q.waiting.push_back(std::time::Instant::now());
        if self.tx.send(batch).is_err() {
            q.waiting.pop_back();
        }
    }

    fn backlog(&self) -> usize {
        self.queue().waiting.len()
    }

    fn stuck_since(&self) -> Option<std::time::Instant> {
        let q = self.queue();
        q.waiting.front().map(|t| (*t).max(q.progress))
    }
}

/// Kernel passthrough: whether it is on, and the backing files in use. Shared with the tasks
/// that answer opens.
struct Passthrough {
    fs: Arc<DfsFs>,
    on: AtomicBool,
    backing: Mutex<Backing>,
}

/// Kernel passthrough state (fuser's `BackingCache` pattern): one backing id per open handle,
/// shared by every handle of an inode that opened the same cache file.
#[derive(Default)]
struct Backing {
    by_fh: HashMap<u64, Arc<BackingId>>,
    by_ino: HashMap<u64, (Weak<BackingId>, (u64, u64))>,
}

impl FuseAdapter {
    /// Runs a core operation on this FUSE thread and replies; if it has not finished within
    /// [`FUSE_THREAD_HOLD`] (it waits on a directory that does not answer), it goes on, and
    /// replies, as a task of the runtime (`go_on`): operations waiting out a directory outage
    /// never hold all of the mount's FUSE threads, and what is answered locally (cached
    /// files, what was heard before) is still served meanwhile. Records its latency.
    fn quick<T: Send + 'static>(
        &self,
        req: &Request,
        op: &'static str,
        work: impl std::future::Future<Output = T> + Send + 'static,
        reply: impl FnOnce(T) + Send + 'static,
    ) {
        let start = std::time::Instant::now();
        let mut work = Box::pin(crate::caller::scope_request(self.caller(req), work));
        let done = self
            .rt
            .block_on(async { tokio::time::timeout(FUSE_THREAD_HOLD, &mut work).await.ok() });
        if let Some(r) = done {
            self.fs.metrics().fuse_op(op, start.elapsed());
            reply(r);
            return;
        }
        let metrics = self.fs.metrics().clone();
        go_on(&self.rt, work, move |r| {
            metrics.fuse_op(op, start.elapsed());
            reply(r);
        });
    }

    /// Runs a core operation on a thread of the blocking pool and hands its result to `reply`
    /// there: the FUSE thread is free at once, and the operation's own blocking work (hashing
    /// a whole file, fsyncs) never holds one of the runtime's few workers.
    fn spawned<T: Send + 'static>(
        &self,
        req: &Request,
        op: &'static str,
        work: impl std::future::Future<Output = T> + Send + 'static,
        reply: impl FnOnce(T) + Send + 'static,
    ) {
        let metrics = self.fs.metrics().clone();
        let rt = self.rt.clone();
        let work = crate::caller::scope_request(self.caller(req), work);
        self.rt.spawn_blocking(move || {
            let start = std::time::Instant::now();
            let r = rt.block_on(work);
            metrics.fuse_op(op, start.elapsed());
            reply(r);
        });
    }

    /// Whom an operation acts for: on a `--local-ids` mount the calling process (uid, gid and
    /// supplementary groups), else the mount's own login.
    fn caller(&self, req: &Request) -> Option<(u32, u32, u32)> {
        self.fs
            .remote()
            .local_ids()
            .then(|| (req.uid(), req.gid(), req.pid()))
    }

    /// An adapter running core operations on `rt`, using kernel passthrough for open files
    /// when `passthrough` is set and the kernel supports it.
    pub fn new(fs: Arc<DfsFs>, rt: tokio::runtime::Handle, passthrough: bool) -> Self {
        FuseAdapter {
            pt: Arc::new(Passthrough {
                fs: fs.clone(),
                on: AtomicBool::new(false),
                backing: Mutex::new(Backing::default()),
            }),
            fs,
            rt,
            want_passthrough: passthrough,
            lock_owners: Arc::default(),
            listed_at: Arc::default(),
        }
    }
}

impl Passthrough {
    /// The backing id for `fh` (of inode `ino`, opened on `file`), or None to serve this open
    /// through `read`/`write` (direct I/O, so it cannot conflict with a passthrough inode).
    fn backing_for(
        &self,
        ino: u64,
        fh: u64,
        file: &std::fs::File,
        open: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let ident = file.metadata().ok().map(|m| (m.dev(), m.ino()))?;
        let mut b = self.backing.lock().unwrap_or_else(|p| p.into_inner());
        let id = match b
            .by_ino
            .get(&ino)
            .and_then(|(w, i)| w.upgrade().map(|id| (id, *i)))
        {
            Some((id, i)) if i == ident => id,
            // The inode is already passed through to another (older) cache file.
            Some(_) => return None,
            None => match open(file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    b.by_ino.insert(ino, (Arc::downgrade(&id), ident));
                    id
                }
                Err(e) => {
                    if b.by_ino.values().all(|(w, _)| w.strong_count() == 0) {
                        // Refused before any file used it (e.g. EPERM without CAP_SYS_ADMIN):
                        // turn it off for the mount rather than fail or warn on every open.
                        self.on.store(false, Ordering::Relaxed);
                        self.fs.set_passthrough(false);
                        tracing::warn!(error = %e, "kernel refused FUSE passthrough; serving reads and writes in dfs");
                    } else {
                        tracing::warn!(ino, error = %e, "passthrough refused; serving this file in dfs");
                    }
                    return None;
                }
            },
        };
        b.by_fh.insert(fh, id.clone());
        Some(id)
    }

    fn fallback_flags(&self) -> FopenFlags {
        if self.on.load(Ordering::Relaxed) {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }
}

fn errno(op: &str, e: &FsError) -> Errno {
    if e.is_not_found() {
        tracing::debug!(op, error = %e, "not found");
    } else {
        tracing::warn!(op, error = %e, "operation failed");
    }
    Errno::from_i32(e.errno())
}

/// The end of a lock covering the rest of a file (`OFFSET_MAX`).
const OFFSET_MAX: u64 = i64::MAX as u64;

/// A blocking lock wait that ends when caller `tid` gets a signal (EINTR), leaving the queue.
async fn lock_unless_signalled(
    fs: &DfsFs,
    node: NodeId,
    owner: u64,
    range: (u64, u64),
    typ: Option<bool>,
    tid: u32,
) -> Result<(), FsError> {
    let outcome = {
        let lock = fs.app_setlk(node, owner, range, typ, true);
        tokio::pin!(lock);
        loop {
            tokio::select! {
                r = &mut lock => break Some(r),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    if crate::interrupt::signalled(tid) {
                        break None;
                    }
                }
            }
        }
    };
    match outcome {
        Some(r) => r,
        None => {
            if let Err(e) = fs.app_unlock(node, owner).await {
                tracing::warn!(error = %e, "leaving a lock queue failed; the place lapses");
            }
            Err(FsError::Interrupted)
        }
    }
}

/// How long a quick operation may hold the FUSE thread that took it (see `FuseAdapter::quick`):
/// far above what one answered locally or by a reachable directory takes, far below the op
/// timeout a directory outage makes it wait.
const FUSE_THREAD_HOLD: Duration = Duration::from_millis(100);

/// Finishes `work` as a task of the runtime and hands its result to `reply` there. The work
/// of a quick operation only waits (on the network) and `reply` is one write to the FUSE
/// device: neither needs a thread of its own, so operations waiting out a directory outage
/// cost a task each, never a thread of the blocking pool, which flushes, fsyncs, releases,
/// name resolution and unmount need.
fn go_on<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    work: impl std::future::Future<Output = T> + Send + 'static,
    reply: impl FnOnce(T) + Send + 'static,
) {
    rt.spawn(async move { reply(work.await) });
}

/// The TTL of a reply about `nodes` to a request that began at `since`.
fn ttl(fs: &DfsFs, since: Since, nodes: &[u64]) -> Duration {
    let ids: Vec<NodeId> = nodes.iter().map(|n| NodeId(*n)).collect();
    fs.reply_ttl(since, &ids)
}

fn node(ino: INodeNo) -> NodeId {
    NodeId(ino.0)
}

fn time_of(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // O_TRUNC arrives with open() instead of as a separate truncate, so `echo > f` is one
        // new version, not an empty one followed by the real one.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC) {
            tracing::warn!(
                ?missing,
                "kernel lacks atomic O_TRUNC; truncating opens push twice"
            );
        }
        // flock and fcntl locks come to dfs (for the whole cluster) instead of staying in
        // this kernel.
        if let Err(missing) =
            config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS)
        {
            tracing::warn!(
                ?missing,
                "kernel lacks FUSE lock forwarding; flock/fcntl locks stay local to this client"
            );
        }
        // Lookups and listings of one directory run at once (the kernel serializes them per
        // directory otherwise): one waiting on the directory never holds up the others there.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS) {
            tracing::warn!(
                ?missing,
                "kernel lacks parallel directory operations; a lookup waiting on the directory \
                 holds up the others in its directory"
            );
        }
        // `ls -l`: names and attributes in one round trip per listing.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        if self.want_passthrough {
            // Reads and writes of open files then go straight to the cache file in the kernel.
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok();
            let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
            self.pt.on.store(ok, Ordering::Relaxed);
            self.fs.set_passthrough(ok);
            if !ok {
                tracing::warn!(
                    "kernel FUSE passthrough unavailable; serving reads and writes in dfs"
                );
            }
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.fs.write_status();
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let since = Since::now();
        let (fs, core) = (self.fs.clone(), self.fs.clone());
        let name = name.to_owned();
        let op = async move { fs.lookup(node(parent), &name).await };
        self.quick(req, "lookup", op, move |r| match r {
            Ok(attr) => reply.entry(
                &ttl(&core, since, &[parent.0, attr.ino.0]),
                &attr,
                Generation(0),
            ),
            Err(e) => reply.error(errno("lookup", &e)),
        });
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let since = Since::now();
        let (fs, core) = (self.fs.clone(), self.fs.clone());
        let op = async move { fs.getattr(node(ino)).await };
        self.quick(req, "getattr", op, move |r| match r {
            Ok((attr, left)) => reply.attr(&left.min(ttl(&core, since, &[ino.0])), &attr),
            Err(e) => reply.error(errno("getattr", &e)),
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fs = self.fs.clone();
        let change = crate::fs::AttrChange {
            mode,
            uid,
            gid,
            size,
            mtime_now: matches!(mtime, Some(TimeOrNow::Now)),
            mtime: mtime.map(time_of),
            atime_now: matches!(atime, Some(TimeOrNow::Now)),
            atime: atime.map(time_of),
        };
        let since = Since::now();
        let core = self.fs.clone();
        let op = async move { fs.setattr(node(ino), change, fh.map(|f| f.0)).await };
        self.spawned(req, "setattr", op, move |r| match r {
            Ok(attr) => reply.attr(&ttl(&core, since, &[ino.0]), &attr),
            Err(e) => reply.error(errno("setattr", &e)),
        });
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let fs = self.fs.clone();
        let op = async move { fs.readlink(node(ino)).await };
        self.quick(req, "readlink", op, move |r| match r {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(errno("readlink", &e)),
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let since = Since::now();
        let (fs, core) = (self.fs.clone(), self.fs.clone());
        let name = name.to_owned();
        let op = async move { fs.mkdir(node(parent), &name, mode & !umask).await };
        self.quick(req, "mkdir", op, move |r| match r {
            Ok(attr) => reply.entry(
                &ttl(&core, since, &[parent.0, attr.ino.0]),
                &attr,
                Generation(0),
            ),
            Err(e) => reply.error(errno("mkdir", &e)),
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        let name = name.to_owned();
        let op = async move { fs.unlink(node(parent), &name).await };
        self.quick(req, "unlink", op, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("unlink", &e)),
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        let name = name.to_owned();
        let op = async move { fs.rmdir(node(parent), &name).await };
        self.quick(req, "rmdir", op, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rmdir", &e)),
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let since = Since::now();
        let (fs, core) = (self.fs.clone(), self.fs.clone());
        let (name, target) = (link_name.to_owned(), target.to_owned());
        let op = async move { fs.symlink(node(parent), &name, &target).await };
        self.quick(req, "symlink", op, move |r| match r {
            Ok(attr) => reply.entry(
                &ttl(&core, since, &[parent.0, attr.ino.0]),
                &attr,
                Generation(0),
            ),
            Err(e) => reply.error(errno("symlink", &e)),
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        let (name, newname) = (name.to_owned(), newname.to_owned());
        let op = async move {
            fs.rename(node(parent), &name, node(newparent), &newname, flags.bits())
                .await
        };
        self.quick(req, "rename", op, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("rename", &e)),
        });
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let since = Since::now();
        let (fs, core) = (self.fs.clone(), self.fs.clone());
        let newname = newname.to_owned();
        let op = async move { fs.link(node(ino), node(newparent), &newname).await };
        self.quick(req, "link", op, move |r| match r {
            Ok(attr) => reply.entry(
                &ttl(&core, since, &[newparent.0, attr.ino.0]),
                &attr,
                Generation(0),
            ),
            Err(e) => reply.error(errno("link", &e)),
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let pt = self.pt.clone();
        let op = async move { fs.open(node(ino), flags.0).await };
        self.spawned(req, "open", op, move |r| match r {
            Ok(o) => {
                match pt.backing_for(ino.0, o.fh, o.handle.file(), |f| reply.open_backing(f)) {
                    Some(id) => {
                        reply.opened_passthrough(FileHandle(o.fh), FopenFlags::empty(), &id)
                    }
                    None => reply.opened(FileHandle(o.fh), pt.fallback_flags()),
                }
            }
            Err(e) => reply.error(errno("open", &e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno("read", &e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", &e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        let work = async move {
            let r = fs.flush(fh.0).await;
            // A close gives up the closing process's record locks on the file (POSIX), once
            // its changes are pushed, so the next holder reads them.
            if fs.app_lock_known(node(ino), lock_owner.0)
                && let Err(e) = fs.app_unlock(node(ino), lock_owner.0).await
            {
                tracing::warn!(error = %e, "unlocking at close failed; the lock lapses with the lease");
            }
            r
        };
        self.spawned(req, "flush", work, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("flush", &e)),
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The last close of an open file gives up its flock (the kernel names the owner) and
        // any lock taken through it.
        let mut owners = self
            .lock_owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0)
            .unwrap_or_default();
        owners.extend(lock_owner.map(|o| o.0));
        for owner in owners {
            if self.fs.app_lock_known(node(ino), owner) {
                let _rt = self.rt.enter();
                self.fs.app_unlock_later(node(ino), owner);
            }
        }
        // Recording unflushed changes may hash the whole file: not on a FUSE thread. Until it
        // is done the handle still counts as a writer, so no open replaces the copy meanwhile.
        let fs = self.fs.clone();
        self.rt.spawn_blocking(move || fs.release(fh.0));
        let mut b = self.pt.backing.lock().unwrap_or_else(|p| p.into_inner());
        if b.by_fh.remove(&fh.0).is_some() {
            b.by_ino.retain(|_, (w, _)| w.strong_count() > 0);
        }
        drop(b);
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        self.spawned(
            req,
            "fsync",
            async move { fs.fsync(fh.0).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("fsync", &e)),
            },
        );
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let since = Since::now();
        let fs = self.fs.clone();
        let listed_at = self.listed_at.clone();
        let op = async move { fs.opendir(node(ino)).await };
        self.quick(req, "opendir", op, move |r| match r {
            Ok(fh) => {
                listed_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, since);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(errno("opendir", &e)),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.listing(fh.0) {
            Ok(items) => {
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, it) in items.iter().enumerate().skip(skip) {
                    if reply.add(INodeNo(it.ino), (i + 1) as u64, it.kind, &it.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdir", &e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let since = self
            .listed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .copied();
        match self.fs.listing(fh.0) {
            Ok(items) => {
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, it) in items.iter().enumerate().skip(skip) {
                    let off = (i + 1) as u64;
                    if reply.add(
                        INodeNo(it.ino),
                        off,
                        &it.name,
                        // A listing not known here: the short TTL.
                        &since.map_or(crate::fs::ATTR_TTL, |s| ttl(&self.fs, s, &[ino.0, it.ino])),
                        &it.attr,
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno("readdirplus", &e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        self.listed_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every namespace change is already durable at the directory when it returns.
        reply.ok();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let fs = self.fs.clone();
        let op = async move { fs.statfs().await };
        self.quick(req, "statfs", op, move |r| match r {
            Ok(s) => {
                // The cluster's disks, one copy's worth (see `StatFs`); before any server
                // reported its space, the bytes stored and no room beyond.
                let (total, free) = if s.total_bytes > 0 {
                    (s.total_bytes / 4096, s.free_bytes / 4096)
                } else {
                    (s.bytes.div_ceil(4096), 0)
                };
                reply.statfs(
                    total,
                    free,
                    free,
                    s.nodes + 1_000_000,
                    1_000_000,
                    4096,
                    255,
                    4096,
                );
            }
            Err(e) => reply.error(errno("statfs", &e)),
        });
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let fs = self.fs.clone();
        let work = async move {
            fs.app_test(node(ino), lock_owner.0, typ == libc::F_RDLCK)
                .await
        };
        self.spawned(req, "getlk", work, move |r| match r {
            // Locks cover whole files: the conflicting one, from 0 to the end.
            Ok(Some(c)) => {
                let typ = if c.shared {
                    libc::F_RDLCK
                } else {
                    libc::F_WRLCK
                };
                reply.locked(0, OFFSET_MAX, typ, 0);
            }
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, pid),
            Err(e) => reply.error(errno("getlk", &e)),
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let fs = self.fs.clone();
        let (node, owner, caller) = (node(ino), lock_owner.0, req.pid());
        if typ != libc::F_UNLCK {
            self.lock_owners
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(fh.0)
                .or_default()
                .insert(owner);
        }
        let work = async move {
            let typ = match typ {
                libc::F_UNLCK => None,
                libc::F_RDLCK => Some(true),
                libc::F_WRLCK => Some(false),
                _ => return Err(FsError::Unsupported("lock type")),
            };
            let range = (start, end);
            if sleep && typ.is_some() {
                lock_unless_signalled(&fs, node, owner, range, typ, caller).await
            } else {
                fs.app_setlk(node, owner, range, typ, false).await
            }
        };
        self.spawned(req, "setlk", work, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("setlk", &e)),
        });
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        let mask = mask.bits();
        let op = async move { fs.access(node(ino), mask).await };
        self.quick(req, "access", op, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("access", &e)),
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let fs = self.fs.clone();
        let pt = self.pt.clone();
        let name = name.to_owned();
        let (since, core) = (Since::now(), self.fs.clone());
        let op = async move { fs.create(node(parent), &name, mode & !umask, flags).await };
        self.spawned(req, "create", op, move |r| match r {
            Ok((attr, o)) => {
                let ttl = ttl(&core, since, &[parent.0, attr.ino.0]);
                match pt.backing_for(attr.ino.0, o.fh, o.handle.file(), |f| reply.open_backing(f)) {
                    Some(id) => reply.created_passthrough(
                        &ttl,
                        &attr,
                        Generation(0),
                        FileHandle(o.fh),
                        FopenFlags::empty(),
                        &id,
                    ),
                    None => reply.created(
                        &ttl,
                        &attr,
                        Generation(0),
                        FileHandle(o.fh),
                        pt.fallback_flags(),
                    ),
                }
            }
            Err(e) => reply.error(errno("create", &e)),
        });
    }

    // Extended attributes are not supported. ENOSYS (rather than ENODATA) tells the kernel once
    // for the whole mount, so it stops asking on every write (security.capability checks) and
    // answers applications with EOPNOTSUPP itself.
    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mode = mode & !(umask & 0o7777);
        // A task, as create: mknod(S_IFREG) makes a file (with its placement), which must not
        // hold one of the few FUSE threads for its round trip.
        let fs = self.fs.clone();
        let name = name.to_owned();
        let (since, core) = (Since::now(), self.fs.clone());
        let op = async move { fs.mknod(node(parent), &name, mode, rdev).await };
        self.spawned(req, "mknod", op, move |r| match r {
            Ok(attr) => reply.entry(
                &ttl(&core, since, &[parent.0, attr.ino.0]),
                &attr,
                Generation(0),
            ),
            Err(e) => reply.error(errno("mknod", &e)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_operations_waiting_on_the_directory_leave_the_blocking_pool_free() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (release, released) = tokio::sync::watch::channel(false);
        let (replied, replies) = std::sync::mpsc::channel();
        // Operations still waiting on a directory that does not answer.
        for i in 0..4 {
            let mut released = released.clone();
            let replied = replied.clone();
            go_on(
                rt.handle(),
                Box::pin(async move {
                    let _ = released.wait_for(|r| *r).await;
                    i
                }),
                move |i| {
                    let _ = replied.send(i);
                },
            );
        }
        // Meanwhile the blocking pool still serves (a release hashing a file, a flush).
        let (done, ran) = std::sync::mpsc::channel();
        rt.spawn_blocking(move || {
            let _ = done.send(());
        });
        assert!(
            ran.recv_timeout(Duration::from_secs(2)).is_ok(),
            "the blocking pool is not held by waiting operations"
        );
        let _ = release.send(true);
        let mut got: Vec<i32> = (0..4)
            .filter_map(|_| replies.recv_timeout(Duration::from_secs(2)).ok())
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3], "each replied once its work finished");
    }
}
