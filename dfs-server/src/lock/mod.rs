//! `LockService`: exclusive per-file locks with a FIFO wait queue, leases and fencing tokens.
//!
//! - A waiter is identified by a client-chosen [`WaiterId`]; polling again with the same id keeps
//!   its place. A waiter that stops polling for a lease time is dropped from the queue.
//! - The holder keeps the lock by renewing within the lease; otherwise the lock passes on.
//! - Waiters block on a per-file `Notify`; release, expiry and new grants wake them (no polling).
//! - Fencing tokens come from one persisted counter, reserved in blocks: a restarted service
//!   starts above everything it could have issued, so tokens never go back.

pub mod app;
pub mod routes;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::api::{AcquireResponse, Grant, LockStatus, WaiterId};
use common::{FenceToken, NodeId};
use redb::{ReadableTable, TableDefinition};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::commit::GroupCommit;
use crate::error::{ServiceError, ServiceResult};

const META: TableDefinition<&str, u64> = TableDefinition::new("lock_meta");
const RESERVED_KEY: &str = "fence_reserved_upto";
const RESERVE_BLOCK: u64 = 1024;
/// The lock store's format (`lock_meta` `format`): 1, the first with a format record.
pub const LOCK_FORMAT: u64 = 1;

/// Tunables of the lock service.
#[derive(Debug, Clone)]
pub struct LockConfig {
    /// How long a grant lasts without renewal; also how long a silent waiter keeps its place.
    pub lease: Duration,
    /// Longest a single acquire call waits before answering `queued`.
    pub max_wait: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            lease: Duration::from_secs(10),
            max_wait: Duration::from_secs(25),
        }
    }
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

/// The highest fencing token the lock store in `data_dir` may have issued (its reserved
/// block's end; 0 without a store): `meta export` carries it as the etcd fence base. Opens the
/// store, so the lock service must be stopped.
pub fn fence_high_water(data_dir: &Path) -> ServiceResult<u64> {
    let path = data_dir.join("lock.redb");
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

/// The lock table. All state but the fence counter is in memory: after a restart no lock is
/// held, and every old holder's token is below every new one.
pub struct LockService {
    fence_key: String,
    locks: Mutex<HashMap<NodeId, FileLock>>,
    fences: Mutex<Fences>,
    config: LockConfig,
    /// Application locks (`flock`, `fcntl`), apart from the write locks.
    pub apps: app::AppLocks,
}

impl LockService {
    /// Opens the fence counter under `data_dir`.
    /// Grants are signed with `fence_key` (the cluster key), so file servers accept only
    /// fencing tokens this service issued.
    pub fn open(data_dir: &Path, config: LockConfig, fence_key: &str) -> ServiceResult<Self> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("lock.redb");
        let db = GroupCommit::open(&path)?;
        let reserved = db.write(|tx| {
            crate::store::check_format(tx, META, &path, LOCK_FORMAT)?;
            Ok(tx
                .open_table(META)?
                .get(RESERVED_KEY)?
                .map(|v| v.value())
                .unwrap_or(0))
        })?;
        Ok(LockService {
            locks: Mutex::new(HashMap::new()),
            fences: Mutex::new(Fences {
                db,
                next: reserved + 1,
                reserved_upto: reserved,
            }),
            apps: app::AppLocks::new(config.lease, config.max_wait),
            config,
            fence_key: fence_key.to_owned(),
        })
    }

    /// Refuses (EACCES) a capability that does not let its holder write `node`.
    pub fn check_capability(&self, cap: &str, node: NodeId) -> ServiceResult<()> {
        crate::capability::verify_node(
            &self.fence_key,
            cap,
            node,
            common::perm::W,
            crate::store::now_ms(),
        )
    }

    /// The configured lease.
    pub fn lease(&self) -> Duration {
        self.config.lease
    }

    fn table(&self) -> ServiceResult<std::sync::MutexGuard<'_, HashMap<NodeId, FileLock>>> {
        self.locks
            .lock()
            .map_err(|_| ServiceError::internal("lock table", "poisoned"))
    }

    fn grant(&self, node: NodeId, fence: FenceToken) -> Grant {
        Grant {
            fence,
            lease_ms: u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX),
            signature: sign_fence(&self.fence_key, node, fence),
        }
    }

    /// One non-blocking step of acquire: grant if `waiter` is first in line and the lock is free,
    /// otherwise (re)join the queue. Returns the outcome, the file's notifier and when to re-check.
    fn try_acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        user: &str,
    ) -> ServiceResult<(AcquireResponse, Arc<Notify>, Option<Instant>)> {
        let now = Instant::now();
        let lease = self.config.lease;
        let mut table = self.table()?;
        let lock = table.entry(node).or_default();
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
    pub async fn acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        user: &str,
        wait: Duration,
    ) -> ServiceResult<AcquireResponse> {
        let deadline = Instant::now() + wait.min(self.config.max_wait);
        loop {
            let (resp, notify, recheck) = self.try_acquire(node, waiter, user)?;
            if matches!(resp, AcquireResponse::Granted(_)) {
                return Ok(resp);
            }
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // State may have changed between try_acquire and enable(): check once more.
            let (resp, _, recheck2) = self.try_acquire(node, waiter, user)?;
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
                return self.try_acquire(node, waiter, user).map(|(r, _, _)| r);
            }
        }
    }

    /// Extends the holder's lease.
    pub fn renew(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<Grant> {
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
    pub fn release(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<()> {
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
    pub fn status(&self) -> ServiceResult<Vec<LockStatus>> {
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

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn fence_mac(key: &str, node: NodeId, fence: FenceToken) -> HmacSha256 {
    use hmac::{KeyInit, Mac};
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(format!("dfs-fence:{node}:{fence}").as_bytes());
    mac
}

/// HMAC-SHA256 (hex) of a grant, keyed with the cluster key: proof that the lock service
/// issued `fence` for `node`.
pub fn sign_fence(key: &str, node: NodeId, fence: FenceToken) -> String {
    use hmac::Mac;
    hex::encode(fence_mac(key, node, fence).finalize().into_bytes())
}

/// Checks a grant signature in constant time.
pub fn verify_fence(key: &str, node: NodeId, fence: FenceToken, signature: &str) -> bool {
    use hmac::Mac;
    let Ok(sig) = hex::decode(signature) else {
        return false;
    };
    fence_mac(key, node, fence).verify_slice(&sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wid(n: u8) -> WaiterId {
        WaiterId::from_bytes([n; 16])
    }

    fn svc(dir: &Path, lease_ms: u64) -> Arc<LockService> {
        let config = LockConfig {
            lease: Duration::from_millis(lease_ms),
            max_wait: Duration::from_secs(5),
        };
        Arc::new(LockService::open(dir, config, "test-key").expect("open"))
    }

    fn fence(r: &AcquireResponse) -> FenceToken {
        match r {
            AcquireResponse::Granted(g) => g.fence,
            AcquireResponse::Queued { .. } => panic!("expected a grant, got {r:?}"),
        }
    }

    #[tokio::test]
    async fn waiters_are_granted_in_fifo_order_with_growing_fences() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = svc(dir.path(), 5_000);
        let node = NodeId(7);
        let first = s
            .acquire(node, &wid(1), "a", Duration::ZERO)
            .await
            .expect("acquire");
        let f1 = fence(&first);
        // Queue 2 then 3.
        for n in [2, 3] {
            let r = s
                .acquire(node, &wid(n), "u", Duration::ZERO)
                .await
                .expect("queue");
            assert!(
                matches!(r, AcquireResponse::Queued { position } if position == u64::from(n - 1))
            );
        }
        let (s2, s3) = (s.clone(), s.clone());
        let t3 =
            tokio::spawn(
                async move { s3.acquire(node, &wid(3), "c", Duration::from_secs(5)).await },
            );
        let t2 =
            tokio::spawn(
                async move { s2.acquire(node, &wid(2), "b", Duration::from_secs(5)).await },
            );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!t2.is_finished() && !t3.is_finished());
        s.release(node, &wid(1)).expect("release");
        let f2 = fence(&t2.await.expect("join").expect("acquire 2"));
        assert!(f2 > f1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!t3.is_finished(), "3 must wait for 2");
        s.release(node, &wid(2)).expect("release");
        let f3 = fence(&t3.await.expect("join").expect("acquire 3"));
        assert!(f3 > f2);
    }

    #[tokio::test]
    async fn unrenewed_lease_passes_the_lock_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = svc(dir.path(), 200);
        let node = NodeId(9);
        fence(
            &s.acquire(node, &wid(1), "crashed", Duration::ZERO)
                .await
                .expect("acquire"),
        );
        let start = std::time::Instant::now();
        let r = s
            .acquire(node, &wid(2), "next", Duration::from_secs(3))
            .await
            .expect("acquire");
        fence(&r);
        assert!(start.elapsed() >= Duration::from_millis(150));
        assert!(matches!(
            s.renew(node, &wid(1)),
            Err(ServiceError::NotHolder(_))
        ));
        s.renew(node, &wid(2)).expect("holder renews");
    }

    /// Leases are decided on tokio's clock, which tests pause and advance: a 10 s lease runs
    /// out exactly at 10 s, in a test that takes milliseconds.
    #[tokio::test(start_paused = true)]
    async fn a_lease_runs_out_exactly_on_the_injected_clock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = svc(dir.path(), 10_000);
        let node = NodeId(11);
        let first = fence(
            &s.acquire(node, &wid(1), "a", Duration::ZERO)
                .await
                .expect("acquire"),
        );
        tokio::time::advance(Duration::from_millis(9_999)).await;
        let r = s
            .acquire(node, &wid(2), "b", Duration::ZERO)
            .await
            .expect("queue");
        assert!(matches!(r, AcquireResponse::Queued { .. }), "{r:?}");
        s.renew(node, &wid(1)).expect("renewed in time");
        tokio::time::advance(Duration::from_millis(9_999)).await;
        s.renew(node, &wid(1)).expect("renewed in time again");
        // The waiter keeps polling; the holder stops renewing.
        tokio::time::advance(Duration::from_millis(5_000)).await;
        s.acquire(node, &wid(2), "b", Duration::ZERO)
            .await
            .expect("poll");
        tokio::time::advance(Duration::from_millis(5_000)).await;
        let second = fence(
            &s.acquire(node, &wid(2), "b", Duration::ZERO)
                .await
                .expect("granted once the lease ran out"),
        );
        assert!(second > first);
        assert!(matches!(
            s.renew(node, &wid(1)),
            Err(ServiceError::NotHolder(_))
        ));
    }

    #[tokio::test]
    async fn restarted_service_never_reissues_a_fence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = {
            let s = svc(dir.path(), 1_000);
            fence(
                &s.acquire(NodeId(1), &wid(1), "a", Duration::ZERO)
                    .await
                    .expect("acquire"),
            )
        };
        let s = svc(dir.path(), 1_000);
        let after = fence(
            &s.acquire(NodeId(1), &wid(2), "b", Duration::ZERO)
                .await
                .expect("acquire"),
        );
        assert!(after > before, "{after} must exceed {before}");
    }

    #[test]
    fn fence_signatures_bind_node_fence_and_key() {
        let sig = sign_fence("k", NodeId(3), FenceToken(9));
        assert!(verify_fence("k", NodeId(3), FenceToken(9), &sig));
        assert!(!verify_fence("k", NodeId(3), FenceToken(10), &sig));
        assert!(!verify_fence("k", NodeId(4), FenceToken(9), &sig));
        assert!(!verify_fence("other", NodeId(3), FenceToken(9), &sig));
        assert!(!verify_fence("k", NodeId(3), FenceToken(9), "zz"));
    }

    #[tokio::test]
    async fn status_lists_holder_and_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = svc(dir.path(), 5_000);
        fence(
            &s.acquire(NodeId(4), &wid(1), "alice", Duration::ZERO)
                .await
                .expect("acquire"),
        );
        s.acquire(NodeId(4), &wid(2), "bob", Duration::ZERO)
            .await
            .expect("queue");
        let st = s.status().expect("status");
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].holder.as_deref(), Some("alice"));
        assert_eq!(st[0].queued, 1);
    }
}
