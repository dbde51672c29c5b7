//! `GroupCommit`: durable redb writes that share fsyncs.
//!
//! Each write runs in its own transaction (so a failing write never touches another's changes)
//! and is committed without waiting for the disk (redb `Durability::None`). The caller then
//! waits until a durable commit covers it: whoever finds no flush in progress becomes the
//! flusher and makes one durable, empty commit, which persists every commit before it; callers
//! that arrive meanwhile wait for the next one. N concurrent writers pay one fsync between them,
//! a lone writer pays exactly one, and nobody is answered before their data is on disk.
//!
//! A failed flush fails every write it covered and every later one: what reached the disk is
//! then unknown, so the store refuses to acknowledge anything until it is reopened (the rule
//! PostgreSQL follows after a failed fsync).
//!
//! Readers may see a write up to one flush before its writer is answered; a crash in that
//! window undoes it, and the writer's call fails (it never saw success).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use redb::{Database, Durability, WriteTransaction};

use crate::error::{ServiceError, ServiceResult};

/// A hook run before each flush; an `Err` fails the flush as a failed fsync would. Tests use it
/// to inject disk faults in milliseconds.
pub type FlushFault = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Default)]
struct State {
    /// Sequence number of the newest write committed (not necessarily durable).
    committed: u64,
    /// Every write up to this number is durable.
    durable: u64,
    /// A flush is running.
    flushing: bool,
    /// Why the store stopped acknowledging writes.
    failed: Option<String>,
}

/// A redb database whose durable writes share fsyncs (see the module docs).
pub struct GroupCommit {
    db: Database,
    state: Mutex<State>,
    flushed: Condvar,
    fault: Mutex<Option<FlushFault>>,
    /// Durable commits (fsyncs) made.
    pub flushes: AtomicU64,
    /// Writes acknowledged as durable.
    pub durable_writes: AtomicU64,
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

impl GroupCommit {
    /// Wraps an open database.
    pub fn new(db: Database) -> Self {
        GroupCommit {
            db,
            state: Mutex::new(State::default()),
            flushed: Condvar::new(),
            fault: Mutex::new(None),
            flushes: AtomicU64::new(0),
            durable_writes: AtomicU64::new(0),
            writers: AtomicU64::new(0),
        }
    }

    /// The database, for read transactions.
    pub fn db(&self) -> &Database {
        &self.db
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
        let (value, seq) = self.commit(f, true)?;
        self.wait_durable(seq)?;
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

    /// Makes every lazy write so far durable (one fsync if there is anything to persist).
    pub fn flush_lazy(&self) -> ServiceResult<()> {
        let newest = self.state().committed;
        self.wait_durable(newest)
    }

    /// Commits `f`'s transaction. A durable write that finds no flush running commits itself
    /// durably (it is then the flush, for itself and every lazy commit before it: one commit
    /// instead of two); otherwise it commits lazily and waits for a flush.
    fn commit<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> ServiceResult<T>,
        durable: bool,
    ) -> ServiceResult<(T, u64)> {
        if let Some(why) = &self.state().failed {
            return Err(unavailable(why));
        }
        let _active = Active::enter(&self.writers);
        let mut tx = self.db.begin_write()?;
        let value = f(&tx)?;
        // Numbered while this is the only write transaction, so numbers follow commit order: a
        // flusher that read `committed` waits in `begin_write` until this commit is done.
        let (seq, lead) = {
            let mut s = self.state();
            s.committed += 1;
            // Alone: commit durably in one step. With others queued behind this transaction,
            // a durable commit here would hold them all for its fsync, one after another;
            // committing lazily and sharing one flush is cheaper for everyone.
            let alone = self.writers.load(Ordering::Acquire) == 1;
            let lead = durable && alone && !s.flushing && self.fault_free();
            if lead {
                s.flushing = true;
            }
            (s.committed, lead)
        };
        if !lead {
            tx.set_durability(Durability::None)?;
            tx.commit()?;
            return Ok((value, seq));
        }
        let guard = FlushGuard(self);
        let result = tx.commit();
        drop(guard);
        let mut s = self.state();
        s.flushing = false;
        match &result {
            Ok(()) => {
                s.durable = s.durable.max(seq);
                self.flushes.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!(error = %e, "durable commit failed; refusing further writes until restart");
                s.failed = Some(e.to_string());
            }
        }
        self.flushed.notify_all();
        drop(s);
        result?;
        Ok((value, seq))
    }

    /// No fault hook is installed (with one, every flush goes through `flush`, so tests see
    /// each fsync).
    fn fault_free(&self) -> bool {
        self.fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// Waits until write number `seq` is durable, flushing if nobody else is.
    fn wait_durable(&self, seq: u64) -> ServiceResult<()> {
        let mut s = self.state();
        loop {
            if let Some(why) = &s.failed {
                return Err(unavailable(why));
            }
            if s.durable >= seq {
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
                    tracing::error!(error = %e, "durable commit failed; refusing further writes until restart");
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
        let mut tx = self.db.begin_write().map_err(|e| e.to_string())?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn unavailable(why: &str) -> ServiceError {
    ServiceError::Unavailable(format!(
        "the store stopped accepting writes after a failed durable commit ({why}); restart the service"
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use redb::{ReadableDatabase, TableDefinition};

    use super::*;

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn open(dir: &std::path::Path) -> GroupCommit {
        let db = Database::create(dir.join("db.redb")).expect("create");
        GroupCommit::new(db)
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
    fn regression_a_failed_flush_is_never_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let g = open(dir.path());
        put(&g, 1).expect("healthy disk");
        g.set_flush_fault(Some(Box::new(|| Err("EIO from fsync".into()))));
        assert!(matches!(put(&g, 2), Err(ServiceError::Unavailable(_))));
        // The disk "recovers", but what reached it is unknown: still refused.
        g.set_flush_fault(None);
        assert!(matches!(put(&g, 3), Err(ServiceError::Unavailable(_))));
        assert_eq!(g.durable_writes.load(Ordering::Relaxed), 1);
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
        assert!(matches!(put(&g, 2), Err(ServiceError::Unavailable(_))));
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
