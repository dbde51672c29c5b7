//! Application locks: `flock` and `fcntl` locks taken by programs on a mount, held here for the
//! whole cluster. Shared or exclusive, on whole files (content moves whole, so a byte-range
//! request locks the whole file). A FIFO queue per file: the head is granted as soon as it is
//! compatible with the holders, and shared requests right behind it with it; nobody overtakes a
//! waiting exclusive request. Holders belong to a client session whose lease the client renews;
//! a client that dies loses its locks when the lease runs out. Waiters long-poll and are woken
//! by a `Notify` (no polling); a waiter that stops asking for a lease time loses its place.
//! Nothing here is persisted: after a restart no application lock is held.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::NodeId;
use common::api::{AppLockConflict, AppLockResponse, LockOwner};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{ServiceError, ServiceResult};

struct Holder {
    owner: LockOwner,
    shared: bool,
    user: String,
    lease_until: Instant,
}

struct Waiter {
    owner: LockOwner,
    shared: bool,
    user: String,
    last_poll: Instant,
}

#[derive(Default)]
struct FileLocks {
    holders: Vec<Holder>,
    queue: VecDeque<Waiter>,
    notify: Arc<Notify>,
}

impl FileLocks {
    /// Drops holders whose session lease ran out and waiters that stopped asking.
    fn expire(&mut self, now: Instant, lease: Duration) -> bool {
        let (h, q) = (self.holders.len(), self.queue.len());
        self.holders.retain(|x| x.lease_until > now);
        self.queue.retain(|w| w.last_poll + lease > now);
        h != self.holders.len() || q != self.queue.len()
    }

    fn compatible(&self, shared: bool) -> bool {
        self.holders.is_empty() || (shared && self.holders.iter().all(|h| h.shared))
    }

    /// Grants from the head of the queue while compatible. Returns whether any was granted.
    fn promote(&mut self, now: Instant, lease: Duration) -> bool {
        let mut any = false;
        while let Some(w) = self.queue.front() {
            if !self.compatible(w.shared) {
                break;
            }
            let Some(w) = self.queue.pop_front() else {
                break;
            };
            self.holders.push(Holder {
                owner: w.owner,
                shared: w.shared,
                user: w.user,
                lease_until: now + lease,
            });
            any = true;
        }
        any
    }

    fn next_deadline(&self, lease: Duration) -> Option<Instant> {
        let h = self.holders.iter().map(|h| h.lease_until).min();
        let w = self.queue.iter().map(|w| w.last_poll + lease).min();
        match (h, w) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn idle(&self) -> bool {
        self.holders.is_empty() && self.queue.is_empty()
    }
}

/// Every application lock of the cluster.
pub struct AppLocks {
    table: Mutex<HashMap<NodeId, FileLocks>>,
    lease: Duration,
    max_wait: Duration,
}

impl AppLocks {
    /// Locks whose sessions must renew within `lease`; one request waits at most `max_wait`.
    pub fn new(lease: Duration, max_wait: Duration) -> Self {
        AppLocks {
            table: Mutex::new(HashMap::new()),
            lease,
            max_wait,
        }
    }

    fn table(&self) -> ServiceResult<std::sync::MutexGuard<'_, HashMap<NodeId, FileLocks>>> {
        self.table
            .lock()
            .map_err(|_| ServiceError::internal("application locks", "poisoned"))
    }

    fn granted(&self) -> AppLockResponse {
        AppLockResponse::Granted {
            lease_ms: u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// One step: grant, queue (keeping the place), or for `wait == false` answer busy. Only
    /// the first step of a request (`join`) takes a place in the queue: a waiter that gave up
    /// (unlocked) while its request still waits here is not queued again by it.
    fn step(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared: bool,
        user: &str,
        wait: bool,
        join: bool,
    ) -> ServiceResult<(AppLockResponse, Arc<Notify>, Option<Instant>)> {
        let now = Instant::now();
        let mut table = self.table()?;
        let locks = table.entry(node).or_default();
        let mut changed = locks.expire(now, self.lease);
        if let Some(h) = locks.holders.iter_mut().find(|h| &h.owner == owner) {
            if h.shared == shared || shared {
                // Held already, or an exclusive lock converted down to shared.
                h.shared = shared;
                h.lease_until = now + self.lease;
                changed |= locks.promote(now, self.lease);
                if changed {
                    locks.notify.notify_waiters();
                }
                return Ok((self.granted(), locks.notify.clone(), None));
            }
            if !wait && (locks.holders.len() > 1 || !locks.queue.is_empty()) {
                // A non-blocking upgrade that cannot be had keeps the shared lock.
                return Ok((AppLockResponse::Busy, locks.notify.clone(), None));
            }
            // Shared to exclusive: given up, then asked for anew (as Linux does for flock).
            locks.holders.retain(|h| &h.owner != owner);
            changed = true;
        }
        match locks.queue.iter_mut().find(|w| &w.owner == owner) {
            Some(w) => {
                w.last_poll = now;
                w.shared = shared;
            }
            None if !join => {
                // Given up meanwhile: this request ends.
                return Ok((AppLockResponse::Busy, locks.notify.clone(), None));
            }
            None => locks.queue.push_back(Waiter {
                owner: owner.clone(),
                shared,
                user: user.to_owned(),
                last_poll: now,
            }),
        }
        changed |= locks.promote(now, self.lease);
        if changed {
            locks.notify.notify_waiters();
        }
        if locks.holders.iter().any(|h| &h.owner == owner) {
            return Ok((self.granted(), locks.notify.clone(), None));
        }
        if !wait {
            locks.queue.retain(|w| &w.owner != owner);
            return Ok((AppLockResponse::Busy, locks.notify.clone(), None));
        }
        let position = locks
            .queue
            .iter()
            .position(|w| &w.owner == owner)
            .map_or(0, |p| p + 1);
        Ok((
            AppLockResponse::Queued {
                position: u64::try_from(position).unwrap_or(u64::MAX),
            },
            locks.notify.clone(),
            locks.next_deadline(self.lease),
        ))
    }

    /// Takes the lock, waiting up to `wait` (capped); `wait` zero: answers at once.
    pub async fn lock(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared: bool,
        user: &str,
        wait: Duration,
    ) -> ServiceResult<AppLockResponse> {
        if wait.is_zero() {
            return self
                .step(node, owner, shared, user, false, true)
                .map(|r| r.0);
        }
        let deadline = Instant::now() + wait.min(self.max_wait);
        let mut join = true;
        loop {
            let (resp, notify, _) = self.step(node, owner, shared, user, true, join)?;
            join = false;
            if resp == AppLockResponse::Busy {
                return Ok(resp);
            }
            if matches!(resp, AppLockResponse::Granted { .. }) {
                return Ok(resp);
            }
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (resp, _, recheck) = self.step(node, owner, shared, user, true, false)?;
            if !matches!(resp, AppLockResponse::Queued { .. }) || Instant::now() >= deadline {
                return Ok(resp);
            }
            let wake = recheck.unwrap_or(deadline).min(deadline);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Gives the lock up, or the place in its queue. Idempotent.
    pub fn unlock(&self, node: NodeId, owner: &LockOwner) -> ServiceResult<()> {
        let now = Instant::now();
        let mut table = self.table()?;
        if let Some(locks) = table.get_mut(&node) {
            locks.holders.retain(|h| &h.owner != owner);
            locks.queue.retain(|w| &w.owner != owner);
            locks.expire(now, self.lease);
            locks.promote(now, self.lease);
            locks.notify.notify_waiters();
            if locks.idle() {
                table.remove(&node);
            }
        }
        Ok(())
    }

    /// A holder another owner's request (`shared` or not) would conflict with.
    pub fn test(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared: bool,
    ) -> ServiceResult<Option<AppLockConflict>> {
        let now = Instant::now();
        let mut table = self.table()?;
        let Some(locks) = table.get_mut(&node) else {
            return Ok(None);
        };
        locks.expire(now, self.lease);
        Ok(locks
            .holders
            .iter()
            .filter(|h| &h.owner != owner)
            .find(|h| !(shared && h.shared))
            .map(|h| AppLockConflict {
                shared: h.shared,
                user: h.user.clone(),
            }))
    }

    /// Extends the locks `held` of `session` (file, owner); returns how many it holds. A lock
    /// of the session it no longer names lapses with its lease.
    pub fn renew(&self, session: &common::UploadId, held: &[(NodeId, u64)]) -> ServiceResult<u64> {
        let until = Instant::now() + self.lease;
        let mut count = 0;
        let mut table = self.table()?;
        for (node, owner) in held.iter().take(100_000) {
            let Some(locks) = table.get_mut(node) else {
                continue;
            };
            for h in locks
                .holders
                .iter_mut()
                .filter(|h| &h.owner.session == session && h.owner.owner == *owner)
            {
                h.lease_until = until;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Whether nobody holds or waits for a lock on `node` (tests).
    #[cfg(test)]
    pub(super) fn idle(&self, node: NodeId) -> ServiceResult<bool> {
        Ok(!self.table()?.contains_key(&node))
    }
}
