//! The write locks of the default engine: in memory, one process, with the fence counter
//! persisted in reserved blocks in redb (`lock.redb`). A waiter is identified by a
//! client-chosen [`WaiterId`]; polling again with the same id keeps its place, and a waiter
//! that stops polling for a lease time is dropped from the queue. Waiters block on a per-file
//! `Notify`; release, expiry and new grants wake them (no polling). A restarted service
//! starts above every token it could have issued, so tokens never go back.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::api::{AcquireResponse, Grant, LockStatus, WaiterId};
use common::{FenceToken, NodeId};
use redb::{ReadableTable, TableDefinition};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::LockConfig;
use crate::commit::GroupCommit;
use crate::error::{ServiceError, ServiceResult};

/// The fence counter's file in the lock service's data directory.
const FILE: &str = "lock.redb";
const META: TableDefinition<&str, u64> = TableDefinition::new("lock_meta");
const RESERVED_KEY: &str = "fence_reserved_upto";
const RESERVE_BLOCK: u64 = 1024;
/// The lock store's format (`lock_meta` `format`): 1, the first with a format record.
pub const LOCK_FORMAT: u64 = 1;

/// The greatest fencing token the redb engine under `data_dir` may have issued (its reserved
/// high-water mark; 0 for a service that never granted a lock). What a migration to etcd
/// writes as the fence base (`etcd::set_fence_base`), so tokens continue above it.
pub fn fence_high_water(data_dir: &Path) -> ServiceResult<u64> {
    let path = data_dir.join(FILE);
    if !path.exists() {
        return Ok(0);
    }
    let db = GroupCommit::open(&path)?;
    db.write(|tx| {
        crate::store::check_format(tx, META, &path, LOCK_FORMAT)?;
        Ok(tx
            .open_table(META)?
            .get(RESERVED_KEY)?
            .map(|v| v.value())
            .unwrap_or(0))
    })
}

struct Holder {
    waiter: WaiterId,
    user: String,
    fence: FenceToken,
    lease_until: Instant,
}

struct Waiter {
    id: WaiterId,
    last_poll: Instant,
}

#[derive(Default)]
struct FileLock {
    holder: Option<Holder>,
    queue: VecDeque<Waiter>,
    notify: Arc<Notify>,
}

impl FileLock {
    /// Drops an expired holder and waiters that stopped polling. Returns whether anything changed.
    fn expire(&mut self, now: Instant, lease: Duration) -> bool {
        let mut changed = false;
        if self.holder.as_ref().is_some_and(|h| h.lease_until <= now) {
            if let Some(h) = self.holder.take() {
                tracing::warn!(user = %h.user, fence = %h.fence, "lock lease expired; passing it on");
            }
            changed = true;
        }
        let before = self.queue.len();
        self.queue.retain(|w| w.last_poll + lease > now);
        changed || before != self.queue.len()
    }

    /// The next instant at which `expire` could change something.
    fn next_deadline(&self, lease: Duration) -> Option<Instant> {
        let holder = self.holder.as_ref().map(|h| h.lease_until);
        let waiter = self.queue.iter().map(|w| w.last_poll + lease).min();
        match (holder, waiter) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn idle(&self) -> bool {
        self.holder.is_none() && self.queue.is_empty()
    }
}

struct Fences {
    db: GroupCommit,
    next: u64,
    reserved_upto: u64,
}

impl Fences {
    fn issue(&mut self) -> ServiceResult<FenceToken> {
        if self.next > self.reserved_upto {
            let upto = self.next + RESERVE_BLOCK;
            self.db.write(|tx| {
                tx.open_table(META)?.insert(RESERVED_KEY, upto)?;
                Ok(())
            })?;
            self.reserved_upto = upto;
        }
        let t = self.next;
        self.next += 1;
        Ok(FenceToken(t))
    }
}

/// The write locks of one process. All state but the fence counter is in memory: after a
/// restart no lock is held, and every old holder's token is below every new one.
pub(super) struct LocalLocks {
    fence_key: String,
    locks: Mutex<HashMap<NodeId, FileLock>>,
    fences: Mutex<Fences>,
    config: LockConfig,
}

impl LocalLocks {
    /// Opens the fence counter under `data_dir`.
    pub(super) fn open(
        data_dir: &Path,
        config: LockConfig,
        fence_key: &str,
    ) -> ServiceResult<Self> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(FILE);
        let db = GroupCommit::open(&path)?;
        let reserved = db.write(|tx| {
            crate::store::check_format(tx, META, &path, LOCK_FORMAT)?;
            Ok(tx
                .open_table(META)?
                .get(RESERVED_KEY)?
                .map(|v| v.value())
                .unwrap_or(0))
        })?;
        Ok(LocalLocks {
            locks: Mutex::new(HashMap::new()),
            fences: Mutex::new(Fences {
                db,
                next: reserved + 1,
                reserved_upto: reserved,
            }),
            config,
            fence_key: fence_key.to_owned(),
        })
    }

    fn table(&self) -> ServiceResult<std::sync::MutexGuard<'_, HashMap<NodeId, FileLock>>> {
        self.locks
            .lock()
            .map_err(|_| ServiceError::internal("lock table", "poisoned"))
    }

    fn grant(&self, node: NodeId, fence: FenceToken) -> Grant {
        super::grant(&self.fence_key, self.config.lease, node, fence)
    }

    /// One non-blocking step of acquire: grant if `waiter` is first in line and the lock is free,
    /// otherwise join the queue (`join`: the call's first step) or keep its place. A later
    /// step that finds the waiter gone answers `not_holder`: it was released meanwhile (a
    /// waiting call polls before its place could lapse), and must not be queued again.
    /// Returns the outcome, the file's notifier and when to re-check.
    fn try_acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        user: &str,
        join: bool,
    ) -> ServiceResult<(AcquireResponse, Arc<Notify>, Option<Instant>)> {
        let now = Instant::now();
        let lease = self.config.lease;
        let mut table = self.table()?;
        let lock = table.entry(node).or_default();
        // This poll keeps the waiter's place before anything lapses.
        if let Some(w) = lock.queue.iter_mut().find(|w| &w.id == waiter) {
            w.last_poll = now;
        }
        if lock.expire(now, lease) {
            lock.notify.notify_waiters();
        }
        if let Some(h) = &lock.holder
            && &h.waiter == waiter
        {
            return Ok((
                AcquireResponse::Granted(self.grant(node, h.fence)),
                lock.notify.clone(),
                None,
            ));
        }
        let pos = match lock.queue.iter().position(|w| &w.id == waiter) {
            Some(p) => {
                lock.queue[p].last_poll = now;
                p
            }
            None if !join => {
                return Err(ServiceError::NotHolder(format!(
                    "the waiter for {node} was released while its acquire waited"
                )));
            }
            None => {
                lock.queue.push_back(Waiter {
                    id: waiter.clone(),
                    last_poll: now,
                });
                lock.queue.len() - 1
            }
        };
        if lock.holder.is_none() && pos == 0 {
            let fence = self
                .fences
                .lock()
                .map_err(|_| ServiceError::internal("fences", "poisoned"))?
                .issue()?;
            lock.queue.pop_front();
            lock.holder = Some(Holder {
                waiter: waiter.clone(),
                user: user.to_owned(),
                fence,
                lease_until: now + lease,
            });
            tracing::debug!(%node, %fence, user, "lock granted");
            return Ok((
                AcquireResponse::Granted(self.grant(node, fence)),
                lock.notify.clone(),
                None,
            ));
        }
        let position = u64::try_from(pos + 1).unwrap_or(u64::MAX);
        Ok((
            AcquireResponse::Queued { position },
            lock.notify.clone(),
            lock.next_deadline(lease),
        ))
    }

    /// Waits up to `wait` (capped) for the lock; answers `Granted` or `Queued`. The waiter keeps
    /// its queue position for a lease time after the call returns.
    pub(super) async fn acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        user: &str,
        wait: Duration,
    ) -> ServiceResult<AcquireResponse> {
        let deadline = Instant::now() + wait.min(self.config.max_wait);
        let mut join = true;
        loop {
            let (resp, notify, recheck) = self.try_acquire(node, waiter, user, join)?;
            join = false;
            if matches!(resp, AcquireResponse::Granted(_)) {
                return Ok(resp);
            }
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // State may have changed between try_acquire and enable(): check once more.
            let (resp, _, recheck2) = self.try_acquire(node, waiter, user, false)?;
            if matches!(resp, AcquireResponse::Granted(_)) || Instant::now() >= deadline {
                return Ok(resp);
            }
            let wake = [recheck, recheck2]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            if Instant::now() >= deadline {
                return self
                    .try_acquire(node, waiter, user, false)
                    .map(|(r, _, _)| r);
            }
        }
    }

    /// Extends the holder's lease.
    pub(super) fn renew(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<Grant> {
        let now = Instant::now();
        let mut table = self.table()?;
        let lock = table
            .get_mut(&node)
            .ok_or_else(|| ServiceError::NotHolder(format!("lock on {node} is not held")))?;
        if lock.expire(now, self.config.lease) {
            lock.notify.notify_waiters();
        }
        match &mut lock.holder {
            Some(h) if &h.waiter == waiter => {
                h.lease_until = now + self.config.lease;
                let fence = h.fence;
                Ok(self.grant(node, fence))
            }
            _ => Err(ServiceError::NotHolder(format!(
                "lock on {node} is not held by this waiter (lease expired?)"
            ))),
        }
    }

    /// Releases the lock (or leaves the queue); the next waiter is woken. Idempotent.
    pub(super) fn release(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<()> {
        let mut table = self.table()?;
        if let Some(lock) = table.get_mut(&node) {
            if lock.holder.as_ref().is_some_and(|h| &h.waiter == waiter) {
                lock.holder = None;
                tracing::debug!(%node, "lock released");
            }
            lock.queue.retain(|w| &w.id != waiter);
            lock.notify.notify_waiters();
            if lock.idle() {
                table.remove(&node);
            }
        }
        Ok(())
    }

    /// Every lock held or waited for.
    pub(super) fn status(&self) -> ServiceResult<Vec<LockStatus>> {
        let now = Instant::now();
        let mut table = self.table()?;
        // Locks whose lease ran out with nobody waiting are forgotten here.
        table.retain(|_, lock| {
            lock.expire(now, self.config.lease);
            !lock.idle()
        });
        let mut out = Vec::new();
        for (node, lock) in table.iter() {
            out.push(LockStatus {
                node: *node,
                holder: lock.holder.as_ref().map(|h| h.user.clone()),
                fence: lock.holder.as_ref().map(|h| h.fence),
                queued: u64::try_from(lock.queue.len()).unwrap_or(u64::MAX),
            });
        }
        out.sort_by_key(|s| s.node);
        Ok(out)
    }
}
