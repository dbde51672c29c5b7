//! `GroupCommit`: durable redb writes that share fsyncs, and recovery after a failed one.
//!
//! Each write runs in its own transaction (so a failing write never touches another's changes)
//! and is committed without waiting for the disk (redb `Durability::None`). The caller then
//! waits until a durable commit covers it: whoever finds no flush in progress becomes the
//! flusher and makes one durable, empty commit, which persists every commit before it; callers
//! that arrive meanwhile wait for the next one. N concurrent writers pay one fsync between them,
//! a lone writer pays exactly one, and nobody is answered before their data is on disk.
//!
//! A failed flush fails every write it covered and every one waiting: what reached the disk is
//! then unknown (after a failed fsync Linux may have dropped the dirty pages, and redb answers
//! `PreviousIo` until reopened), so nothing is ever retried and then acknowledged. The next
//! write recovers the store from what is on disk, the rule PostgreSQL follows after a failed
//! fsync: the database is closed, its pages are dropped from the page cache (so that recovery
//! reads the disk, not pages the kernel stopped writing back), and it is opened again, which
//! runs redb's crash recovery back to its last durable commit. Writes committed before the
//! reopen but not yet durable belong to an older *generation*: their writers are failed, never
//! answered with success.
//!
//! Readers may see a write up to one flush before its writer is answered; a crash (or a
//! recovery) in that window undoes it, and the writer's call fails (it never saw success).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, Durability, WriteTransaction};

use crate::error::{ServiceError, ServiceResult};

/// A hook run before each flush; an `Err` fails the flush as a failed fsync would. Tests use it
/// to inject disk faults in milliseconds.
pub type FlushFault = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Opens the database (again): at start and for each recovery. Tests pass one whose storage
/// backend fails fsyncs on demand.
pub type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// How long a recovery waits for callers holding the old database to let go of it.
const DRAIN: Duration = Duration::from_secs(2);
/// Least time between attempts to open a store whose reopening failed.
const RETRY_REOPEN: Duration = Duration::from_millis(200);

#[derive(Default)]
struct State {
    /// Sequence number of the newest write committed (not necessarily durable).
    committed: u64,
    /// Every write up to this number is durable.
    durable: u64,
    /// A flush is running.
    flushing: bool,
    /// Why the store stopped acknowledging writes (until it is recovered).
    failed: Option<String>,
    /// Bumped by every recovery: a write committed in an older generation is never
    /// acknowledged, since the recovery may have undone it.
    generation: u64,
}

/// A redb database whose durable writes share fsyncs (see the module docs).
pub struct GroupCommit {
    /// `None` only while a recovery has closed it and not yet opened it again.
    db: RwLock<Option<Arc<Database>>>,
    opener: Opener,
    /// The file, for dropping its cached pages before a recovery (`None`: a custom opener).
    path: Option<PathBuf>,
    state: Mutex<State>,
    flushed: Condvar,
    fault: Mutex<Option<FlushFault>>,
    /// Recoveries serialised.
    recovering: Mutex<()>,
    /// When a closed store was last tried again.
    last_reopen: Mutex<Option<Instant>>,
    /// Durable commits (fsyncs) made.
    pub flushes: AtomicU64,
    /// Writes acknowledged as durable.
    pub durable_writes: AtomicU64,
    /// Recoveries after a failed durable commit.
    pub recoveries: AtomicU64,
    /// Writes between `begin_write` and their commit, or waiting for `begin_write`.
    writers: AtomicU64,
}

/// Held by whoever flushes: if the flush panics, the store stops accepting writes and wakes
/// the waiters (instead of leaving them waiting for a flush that never ends).
struct FlushGuard<'a>(&'a GroupCommit);

impl Drop for FlushGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut s = self.0.state();
            s.flushing = false;
            s.failed = Some("a durable commit panicked".into());
            self.0.flushed.notify_all();
        }
    }
}

/// Counts a writer in `GroupCommit::writers` while alive.
struct Active<'a>(&'a AtomicU64);

impl<'a> Active<'a> {
    fn enter(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Active(n)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A write committed (maybe not yet durable): its number and the store generation it is in.
#[derive(Clone, Copy)]
struct Ticket {
    seq: u64,
    generation: u64,
}

impl GroupCommit {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> ServiceResult<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let owned = path.to_path_buf();
        let mut g = GroupCommit::with_opener(Box::new(move || Database::create(&owned)))?;
        g.path = Some(path.to_path_buf());
        Ok(g)
    }

    /// Opens the database with `opener`, which recoveries call again.
    pub fn with_opener(opener: Opener) -> ServiceResult<Self> {
        let db = opener()?;
        Ok(GroupCommit {
            db: RwLock::new(Some(Arc::new(db))),
            opener,
            path: None,
            state: Mutex::new(State::default()),
            flushed: Condvar::new(),
            fault: Mutex::new(None),
            recovering: Mutex::new(()),
            last_reopen: Mutex::new(None),
            flushes: AtomicU64::new(0),
            durable_writes: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            writers: AtomicU64::new(0),
        })
    }

    /// The database, for read transactions. While a recovery could not open it again (the
    /// disk still failing), each call tries again, at most every `RETRY_REOPEN`; meanwhile the
    /// answer is "unavailable".
    pub fn db(&self) -> ServiceResult<Arc<Database>> {
        if let Some(db) = self.db.read().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(db);
        }
        let due = {
            let mut last = self.last_reopen.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= RETRY_REOPEN);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            self.recover()?;
        }
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| unavailable("the store is closed until the disk lets it open again"))
    }

    /// Records that the store failed (redb refuses everything after an I/O error until it
    /// is reopened): waiters fail, and the next write recovers it.
    fn mark_failed(&self, why: String) {
        tracing::error!(error = %why, "the store failed; it is recovered before the next write");
        let mut s = self.state();
        if s.failed.is_none() {
            s.failed = Some(why);
        }
        self.flushed.notify_all();
    }

    /// Installs (or with `None` removes) a fault hook run before every flush.
    pub fn set_flush_fault(&self, fault: Option<FlushFault>) {
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in a write transaction and returns once its changes are durable. An `Err` from
    /// `f` aborts the transaction (nothing of it is applied).
    pub fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        let (value, ticket) = self.commit(f, true)?;
        self.wait_durable(ticket)?;
        self.durable_writes.fetch_add(1, Ordering::Relaxed);
        Ok(value)
    }

    /// Runs `f` in a write transaction committed without waiting for the disk: for records whose
    /// loss in a crash is harmless. The next flush (of any durable write) persists it.
    pub fn write_lazy<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> ServiceResult<T>,
    ) -> ServiceResult<T> {
        Ok(self.commit(f, false)?.0)
    }

    /// Makes every lazy write so far durable (one fsync if there is anything to persist). Lazy
    /// writes a recovery undid are not brought back: they were ones whose loss is harmless.
    pub fn flush_lazy(&self) -> ServiceResult<()> {
        let ticket = {
            let s = self.state();
            Ticket {
                seq: s.committed,
                generation: s.generation,
            }
        };
        self.wait_durable(ticket)
    }

    /// Commits `f`'s transaction. A durable write that finds no flush running commits itself
    /// durably (it is then the flush, for itself and every lazy commit before it: one commit
    /// instead of two); otherwise it commits lazily and waits for a flush.
    fn commit<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> ServiceResult<T>,
        durable: bool,
    ) -> ServiceResult<(T, Ticket)> {
        let failed = self.state().failed.is_some();
        if failed {
            self.recover()?;
        }
        let _active = Active::enter(&self.writers);
        let mut tx = match self.db()?.begin_write() {
            Ok(tx) => tx,
            Err(e) => {
                // After any I/O error redb refuses every transaction until it is reopened.
                self.mark_failed(e.to_string());
                return Err(unavailable(&e.to_string()));
            }
        };
        let value = f(&tx)?;
        // Numbered while this is the only write transaction, so numbers follow commit order: a
        // flusher that read `committed` waits in `begin_write` until this commit is done.
        let (ticket, lead) = {
            let mut s = self.state();
            if let Some(why) = &s.failed {
                // A flush failed while `f` ran: this transaction's base is unknown.
                return Err(unavailable(why));
            }
            s.committed += 1;
            // Alone: commit durably in one step. With others queued behind this transaction,
            // a durable commit here would hold them all for its fsync, one after another;
            // committing lazily and sharing one flush is cheaper for everyone.
            let alone = self.writers.load(Ordering::Acquire) == 1;
            let lead = durable && alone && !s.flushing && self.fault_free();
            if lead {
                s.flushing = true;
            }
            let ticket = Ticket {
                seq: s.committed,
                generation: s.generation,
            };
            (ticket, lead)
        };
        if !lead {
            tx.set_durability(Durability::None)?;
            if let Err(e) = tx.commit() {
                self.mark_failed(e.to_string());
                return Err(unavailable(&e.to_string()));
            }
            return Ok((value, ticket));
        }
        let guard = FlushGuard(self);
        let result = tx.commit();
        drop(guard);
        let mut s = self.state();
        s.flushing = false;
        match &result {
            Ok(()) => {
                s.durable = s.durable.max(ticket.seq);
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "durable commit failed; the store is recovered before the next write");
                s.failed = Some(e.to_string());
            }
        }
        self.flushed.notify_all();
        drop(s);
        result.map_err(|e| unavailable(&e.to_string()))?;
        Ok((value, ticket))
    }

    /// No fault hook is installed (with one, every flush goes through `flush`, so tests see
    /// each fsync).
    fn fault_free(&self) -> bool {
        self.fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Waits until the write of `ticket` is durable, flushing if nobody else is.
    fn wait_durable(&self, ticket: Ticket) -> ServiceResult<()> {
        let mut s = self.state();
        loop {
            if let Some(why) = &s.failed {
                return Err(unavailable(why));
            }
            if s.generation != ticket.generation {
                return Err(unavailable(
                    "a failed durable commit was recovered before this write became durable",
                ));
            }
            if s.durable >= ticket.seq {
                return Ok(());
            }
            if s.flushing {
                s = self.flushed.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            s.flushing = true;
            let target = s.committed;
            drop(s);
            let guard = FlushGuard(self);
            let result = self.flush();
            drop(guard);
            s = self.state();
            s.flushing = false;
            match result {
                Ok(()) => s.durable = s.durable.max(target),
                Err(e) => {
                    tracing::error!(error = %e, "durable commit failed; the store is recovered before the next write");
                    s.failed = Some(e);
                }
            }
            self.flushed.notify_all();
        }
    }

    fn flush(&self) -> Result<(), String> {
        if let Some(fault) = self
            .fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            fault()?;
        }
        let db = self.db().map_err(|e| e.to_string())?;
        let mut tx = db.begin_write().map_err(|e| e.to_string())?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Recovers after a failed durable commit: closes the database, drops its pages from the
    /// page cache and opens it again (redb's crash recovery). Fails (the store stays failed,
    /// and the next write tries again) if readers keep the old one open or the disk refuses.
    fn recover(&self) -> ServiceResult<()> {
        let _one = self.recovering.lock().unwrap_or_else(|p| p.into_inner());
        if self.state().failed.is_none() {
            return Ok(()); // another writer recovered it meanwhile
        }
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(old) = old {
            // Callers hold the old database for one statement (`begin_read`/`begin_write`);
            // wait for them, bounded. A transaction still open on it keeps redb's file lock,
            // so opening again fails until it ends, and a later call tries again.
            let deadline = Instant::now() + DRAIN;
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still) if Instant::now() < deadline => {
                        old = still;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still) => {
                        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(still);
                        return Err(unavailable("readers kept the store open during recovery"));
                    }
                }
            }
        }
        if let Some(path) = &self.path {
            drop_cached_pages(path);
        }
        let db = (self.opener)().map_err(|e| {
            tracing::error!(error = %e, "reopening the store after a failed durable commit failed");
            unavailable(&format!("reopening the store failed: {e}"))
        })?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        let mut s = self.state();
        s.failed = None;
        s.generation += 1;
        // Whatever was committed before is now either on disk or undone: nobody waits for it.
        s.durable = s.committed;
        self.recoveries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("store recovered from disk after a failed durable commit");
        Ok(())
    }
}

/// Asks the kernel to forget the file's cached pages, so that reopening reads what is on the
/// disk. Best effort: pages still dirty stay (they are written back, not dropped).
fn drop_cached_pages(path: &Path) {
    if let Ok(f) = std::fs::File::open(path)
        && let Err(e) = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
    {
        tracing::warn!(error = %e, "dropping cached pages before recovery");
    }
}

fn unavailable(why: &str) -> ServiceError {
    ServiceError::Unavailable(format!(
        "the store refused a write after a failed durable commit ({why}); retry"
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redb::{ReadableDatabase, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn open(dir: &std::path::Path) -> GroupCommit {
        GroupCommit::open(&dir.join("db.redb")).expect("create")
    }

    fn put(g: &GroupCommit, k: u64) -> ServiceResult<()> {
        g.write(|tx| {
            tx.open_table(T)?.insert(k, k)?;
            Ok(())
        })
    }

    fn get(dir: &std::path::Path, k: u64) -> Option<u64> {
        let db = Database::create(dir.join("db.redb")).expect("reopen");
        let tx = db.begin_read().expect("read");
        let t = tx.open_table(T).ok()?;
        t.get(k).expect("get").map(|v| v.value())
    }

    #[test]
    fn acknowledged_writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let g = open(dir.path());
            put(&g, 1).expect("put");
            put(&g, 2).expect("put");
            assert_eq!(
                g.flushes.load(Ordering::Relaxed),
                2,
                "a lone writer pays one flush"
            );
        }
        assert_eq!(get(dir.path(), 1), Some(1));
        assert_eq!(get(dir.path(), 2), Some(2));
    }

    #[test]
    fn concurrent_writers_share_flushes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = Arc::new(open(dir.path()));
        // A slow disk: every flush takes 20 ms, so writers pile up behind it.
        g.set_flush_fault(Some(Box::new(|| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            Ok(())
        })));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let g = g.clone();
                std::thread::spawn(move || put(&g, i).expect("put"))
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        let flushes = g.flushes.load(Ordering::Relaxed);
        assert!(flushes < 16, "16 writers made {flushes} flushes");
        assert_eq!(g.durable_writes.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn regression_a_failed_flush_is_never_acknowledged_and_the_store_recovers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = open(dir.path());
        put(&g, 1).expect("healthy disk");
        g.set_flush_fault(Some(Box::new(|| Err("EIO from fsync".into()))));
        assert!(matches!(put(&g, 2), Err(ServiceError::Unavailable(_))));
        assert_eq!(g.durable_writes.load(Ordering::Relaxed), 1);
        // The disk works again: the next write recovers the store from disk and goes through.
        // The failed write may or may not be there (as with a lost answer); it was never
        // reported durable. The acknowledged ones are.
        g.set_flush_fault(None);
        put(&g, 3).expect("after recovery");
        assert_eq!(g.recoveries.load(Ordering::Relaxed), 1);
        drop(g);
        assert_eq!(get(dir.path(), 1), Some(1));
        assert_eq!(get(dir.path(), 3), Some(3));
    }

    #[test]
    fn regression_a_write_committed_before_a_recovery_is_never_acknowledged_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = open(dir.path());
        g.set_flush_fault(Some(Box::new(|| Err("EIO from fsync".into()))));
        // Committed, not yet durable: its writer is still on its way to `wait_durable`.
        let ((), late) = g
            .commit(
                |tx| {
                    tx.open_table(T)?.insert(5, 5)?;
                    Ok(())
                },
                true,
            )
            .expect("commit");
        assert!(put(&g, 6).is_err(), "the flush fails");
        g.set_flush_fault(None);
        put(&g, 7).expect("recovered");
        // The recovery may have undone write 5: it must not be reported durable.
        assert!(matches!(
            g.wait_durable(late),
            Err(ServiceError::Unavailable(_))
        ));
        drop(g);
        assert_eq!(get(dir.path(), 7), Some(7));
    }

    /// A storage backend whose fsyncs fail while `fail` is set, as a disk that returns EIO.
    #[derive(Debug)]
    struct FailingSyncs {
        inner: redb::backends::FileBackend,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl redb::StorageBackend for FailingSyncs {
        fn len(&self) -> Result<u64, std::io::Error> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("EIO from fsync"));
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            self.inner.write(offset, data)
        }
    }

    #[test]
    fn regression_redb_failing_an_fsync_is_recovered_by_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let f2 = fail.clone();
        let g = GroupCommit::with_opener(Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            redb::Builder::new().create_with_backend(FailingSyncs {
                inner: redb::backends::FileBackend::new(file)?,
                fail: f2.clone(),
            })
        }))
        .expect("open");
        put(&g, 1).expect("healthy disk");
        fail.store(true, Ordering::SeqCst);
        assert!(put(&g, 2).is_err(), "redb's own commit fails");
        assert!(
            put(&g, 3).is_err(),
            "still failing: no recovery can help yet"
        );
        fail.store(false, Ordering::SeqCst);
        put(&g, 4).expect("recovered by reopening");
        assert!(g.recoveries.load(Ordering::Relaxed) >= 1);
        let db = g.db().expect("db");
        let tx = db.begin_read().expect("read");
        let t = tx.open_table(T).expect("table");
        assert_eq!(t.get(1).expect("get").map(|v| v.value()), Some(1));
        assert_eq!(t.get(4).expect("get").map(|v| v.value()), Some(4));
    }

    #[test]
    fn regression_a_store_that_cannot_be_reopened_yet_is_tried_again_by_readers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.redb");
        let refuse = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r2 = refuse.clone();
        let g = GroupCommit::with_opener(Box::new(move || {
            if r2.load(Ordering::SeqCst) {
                return Err(redb::DatabaseError::Storage(redb::StorageError::Io(
                    std::io::Error::other("EIO opening"),
                )));
            }
            Database::create(&path)
        }))
        .expect("open");
        put(&g, 1).expect("healthy");
        g.set_flush_fault(Some(Box::new(|| Err("EIO from fsync".into()))));
        assert!(put(&g, 2).is_err());
        g.set_flush_fault(None);
        refuse.store(true, Ordering::SeqCst);
        assert!(
            put(&g, 3).is_err(),
            "the disk still fails: the reopen does too"
        );
        assert!(g.db().is_err(), "closed meanwhile");
        refuse.store(false, Ordering::SeqCst);
        std::thread::sleep(RETRY_REOPEN + Duration::from_millis(50));
        // A reader (a file server checks fences before it writes) brings it back.
        let db = g.db().expect("reopened by a reader");
        drop(db);
        put(&g, 4).expect("writes again");
        assert_eq!(g.recoveries.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn regression_a_panicking_flush_fails_the_waiters_instead_of_hanging_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = Arc::new(open(dir.path()));
        g.set_flush_fault(Some(Box::new(|| panic!("disk driver bug"))));
        let g2 = g.clone();
        let t = std::thread::spawn(move || put(&g2, 1));
        assert!(t.join().is_err(), "the flusher panicked");
        g.set_flush_fault(None);
        put(&g, 2).expect("recovered after the panic");
    }

    #[test]
    fn a_failing_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = open(dir.path());
        let r: ServiceResult<()> = g.write(|tx| {
            tx.open_table(T)?.insert(9, 9)?;
            Err(ServiceError::BadRequest("refused".into()))
        });
        assert!(r.is_err());
        put(&g, 1).expect("put");
        drop(g);
        assert_eq!(get(dir.path(), 9), None);
    }
}
