//! The etcd engine of the lock service: write locks and application locks kept in etcd, so
//! that any number of lock instances over one etcd cluster serve any request (they keep no
//! state of their own).
//!
//! Layout, under `<prefix>/locks/` (`--meta etcd://.../<prefix>`):
//! - `w/<node>/<waiter>`: a write-lock waiter; value: the user's name. The queue of a file is
//!   its keys in create-revision order; the first one holds the lock.
//! - `a/<node>/<session>.<owner>`: an application lock request; value: `s` or `x` (shared,
//!   exclusive), then the user's name. Granted: the first key, and the shared keys right
//!   behind a shared first one (nobody overtakes a waiting exclusive request).
//! - `fence_base`: a decimal u64 added to every fencing token (0 when absent).
//! - `fence_high`: a decimal u64 at or above every token granted (written ahead by
//!   `FENCE_RESERVE`); an instance lifts `fence_base` above it at start, and whenever a token
//!   would have gone back while it runs (`checked_fence`).
//!
//! Every key is attached to an etcd lease of its own (the configured lease, in whole seconds):
//! a holder's renewal and a waiter's poll are keepalives of its key's lease, so a dead holder
//! or a waiter that stopped polling goes when etcd expires the lease and deletes the key
//! (within the lease and etcd's 0.5 s expiry check). etcd 3.4 gives every lease its full TTL
//! again (plus its election timeout) when a new leader takes over, so after a leader change a
//! dead holder's lock goes at most a lease and an election timeout after the new leader took
//! over (ARCHITECTURE.md, *Locks on etcd*).
//!
//! A write lock's fencing token is `fence_base + create revision of the holder's key`: the
//! heads of a file's queue follow one another in create-revision order, and revisions never
//! go back in one etcd cluster, so tokens only grow per file across every instance and
//! restart. `fence_base` lets a cluster moved from the redb engine continue above every
//! token the file servers accepted (`set_fence_base`, with `local::fence_high_water`).
//!
//! Waiters wait on an etcd watch of their file's keys (from the revision they last read), not
//! on a timer; while they wait, their own lease is kept alive.

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::api::{AcquireResponse, AppLockConflict, AppLockResponse, Grant, LockOwner};
use common::api::{LockStatus, WaiterId};
use common::{FenceToken, NodeId, UploadId};
use etcd_client::{
    Client, Compare, CompareOp, GetOptions, PutOptions, SortOrder, SortTarget, TxnOp,
    TxnOpResponse, WatchFilterType, WatchOptions,
};
use tokio::time::Instant;

use super::LockConfig;
use crate::error::{ServiceError, ServiceResult};
use crate::meta::etcd::EtcdConfig;

/// How long one etcd call may take.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause before sending again a call no member received.
const RESEND_PAUSE: Duration = Duration::from_millis(20);
/// Most keys one listing reads (a file's queue, oldest first, or `status`): a waiter further
/// back than this finds no place and is refused as unavailable.
const MAX_KEYS: i64 = 10_000;
/// Times one acquire call joins a queue that keeps losing its key (lapsed or released).
const MAX_JOINS: u32 = 3;
/// Most application locks one renewal extends.
const MAX_RENEW: usize = 10_000;
/// Keys one renewal reads per etcd transaction (within etcd's default `--max-txn-ops`, 128).
const RENEW_READS: usize = 64;
/// Lease keepalives one renewal has in flight at once.
const RENEW_AT_ONCE: usize = 16;

/// The key (under `<prefix>/`) holding the fence base.
pub const FENCE_BASE_KEY: &str = "locks/fence_base";
/// The key (under `<prefix>/`) holding the fence high-water mark: a decimal u64 at or above
/// every token any instance granted (written ahead, `FENCE_RESERVE` at a time, before a
/// grant reaches it).
pub const FENCE_HIGH_KEY: &str = "locks/fence_high";
/// How far ahead of a grant the high-water mark is written: one write per this many etcd
/// revisions, not one per grant.
const FENCE_RESERVE: u64 = 1 << 20;

/// The highest fence base an operator may set (`set_fence_base`): leaves 2^62 tokens.
pub const MAX_FENCE_BASE: u64 = 1 << 62;
/// The highest token granted: room for the reserve and the base lifts above it.
const MAX_FENCE: u64 = 1 << 63;
/// Most files whose last grant an instance remembers (to catch a token going back).
const MAX_REMEMBERED: usize = 100_000;

/// One key of a queue.
#[derive(Debug, Clone)]
struct Entry {
    key: Vec<u8>,
    create: i64,
    mod_rev: i64,
    lease: i64,
    value: Vec<u8>,
}

/// A file's queue as read at one revision.
#[derive(Debug)]
struct Queue {
    entries: Vec<Entry>,
    /// The revision it was read at.
    rev: i64,
    base: u64,
}

impl Queue {
    fn position(&self, key: &[u8]) -> Option<usize> {
        self.entries.iter().position(|e| e.key == key)
    }

    /// How many entries at the head are granted (application locks).
    fn granted(&self) -> usize {
        match self.entries.first() {
            None => 0,
            Some(e) if !is_shared(&e.value) => 1,
            Some(_) => self
                .entries
                .iter()
                .take_while(|e| is_shared(&e.value))
                .count(),
        }
    }
}

fn is_shared(value: &[u8]) -> bool {
    value.first() == Some(&b's')
}

fn user_of(value: &[u8]) -> String {
    String::from_utf8_lossy(value.get(1..).unwrap_or_default()).into_owned()
}

fn unavailable(endpoints: &str, what: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Unavailable(format!("etcd at {endpoints} failed {what}: {e}"))
}

/// The lock tables of every instance over one etcd prefix.
pub struct EtcdLocks {
    client: Client,
    /// `<prefix>/locks/`
    root: String,
    /// `<prefix>/locks/fence_base`
    base_key: Vec<u8>,
    endpoints: String,
    fence_key: String,
    config: LockConfig,
    /// The etcd lease TTL of every key, in seconds.
    ttl: i64,
    /// `<prefix>/locks/fence_high`
    high_key: Vec<u8>,
    /// What this instance knows of the tokens granted (`checked_fence`).
    fences: std::sync::Mutex<Fences>,
    /// The highest etcd revision a queue read answered: a read sent after it that answers
    /// a lower one means etcd went back (restored from an older snapshot).
    seen_rev: std::sync::atomic::AtomicI64,
}

/// What an instance knows of the tokens granted: enough to notice a fence base deleted or
/// lowered, or etcd going back to an older snapshot, before a token repeats or goes down.
#[derive(Default)]
struct Fences {
    /// The high-water mark as this instance last wrote or read it: grants below it need no
    /// write.
    reserved: u64,
    /// The highest fence base read.
    base: u64,
    /// The lowest etcd revision at which `base` is known to have been stored: a read at an
    /// older revision that shows a lower base is only older, not a base that went back.
    base_rev: i64,
    /// The highest token this instance granted.
    granted: u64,
    /// Per file, the last token granted, its waiter, and the revision of the queue read it
    /// was computed from (at most `MAX_REMEMBERED` files).
    last: std::collections::HashMap<NodeId, (u64, WaiterId, i64)>,
}

impl Fences {
    /// Records that the fence base was `base` at revision `rev`.
    fn learn_base(&mut self, base: u64, rev: i64) {
        if base > self.base {
            (self.base, self.base_rev) = (base, rev);
        } else if base == self.base {
            self.base_rev = self.base_rev.min(rev);
        }
    }
}

/// What `checked_fence` makes of a queue read.
enum Checked {
    /// The token, safe to grant.
    Safe(FenceToken),
    /// The read is older than what this instance already learnt (another request of this
    /// instance read later and finished first): read the queue again.
    Stale,
}

/// Connects a client to `config`'s endpoints, bounded by `OP_TIMEOUT`.
async fn connect(config: &EtcdConfig) -> ServiceResult<Client> {
    let endpoints = config.endpoints.join(",");
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(OP_TIMEOUT)
        .with_timeout(OP_TIMEOUT)
        .with_keep_alive(Duration::from_secs(10), OP_TIMEOUT);
    match tokio::time::timeout(
        OP_TIMEOUT,
        Client::connect(config.endpoints.clone(), Some(options)),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(ServiceError::Unavailable(format!(
            "connecting to etcd at {endpoints}: {e}"
        ))),
        Err(_) => Err(ServiceError::Unavailable(format!(
            "etcd at {endpoints} did not answer within {} s",
            OP_TIMEOUT.as_secs()
        ))),
    }
}

/// Writes the fence base of the cluster at `config` (the migration from redb: pass
/// `local::fence_high_water` of the old lock service's data directory, before any lock
/// instance on etcd starts). Refuses to lower an existing base: tokens must never go back.
pub async fn set_fence_base(config: &EtcdConfig, base: u64) -> ServiceResult<()> {
    let client = connect(config).await?;
    let key = format!("{}/{FENCE_BASE_KEY}", config.prefix).into_bytes();
    let mut kv = client.kv_client();
    let current = tokio::time::timeout(OP_TIMEOUT, kv.get(key.clone(), None))
        .await
        .map_err(|_| ServiceError::Unavailable("etcd did not answer reading the base".into()))?
        .map_err(|e| unavailable(&config.endpoints.join(","), "reading the fence base", e))?;
    let (old, rev) = match current.kvs().first() {
        Some(kv) => (parse_base(kv.value())?, kv.mod_revision()),
        None => (0, 0),
    };
    if base < old {
        return Err(ServiceError::StaleFence(format!(
            "the fence base is {old} already; it may not go down to {base}"
        )));
    }
    if base > MAX_FENCE_BASE {
        return Err(ServiceError::BadRequest(format!(
            "a fence base above {MAX_FENCE_BASE} would leave no room for tokens"
        )));
    }
    let txn = etcd_client::Txn::new()
        .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev)])
        .and_then([TxnOp::put(key, base.to_string(), None)]);
    let done = tokio::time::timeout(OP_TIMEOUT, kv.txn(txn))
        .await
        .map_err(|_| ServiceError::Unavailable("etcd did not answer writing the base".into()))?
        .map_err(|e| unavailable(&config.endpoints.join(","), "writing the fence base", e))?;
    if !done.succeeded() {
        return Err(ServiceError::Unavailable(
            "the fence base changed meanwhile; run again".into(),
        ));
    }
    Ok(())
}

fn parse_base(v: &[u8]) -> ServiceResult<u64> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ServiceError::internal("the etcd fence base", "not a number"))
}

impl EtcdLocks {
    /// Connects to the etcd cluster of `config` (keys under `<prefix>/locks/`).
    pub async fn connect(
        config: &EtcdConfig,
        locks: LockConfig,
        fence_key: &str,
    ) -> ServiceResult<Self> {
        let client = connect(config).await?;
        let ttl = i64::try_from(locks.lease.as_millis().div_ceil(1000))
            .unwrap_or(i64::MAX)
            .max(1);
        let s = EtcdLocks {
            client,
            root: format!("{}/locks/", config.prefix),
            base_key: format!("{}/{FENCE_BASE_KEY}", config.prefix).into_bytes(),
            endpoints: config.endpoints.join(","),
            fence_key: fence_key.to_owned(),
            config: locks,
            ttl,
            high_key: format!("{}/{FENCE_HIGH_KEY}", config.prefix).into_bytes(),
            fences: std::sync::Mutex::new(Fences::default()),
            seen_rev: std::sync::atomic::AtomicI64::new(0),
        };
        // A first read (a cluster without quorum fails the start, not a request), which also
        // lifts the fence base above the high-water mark.
        s.lift_base().await?;
        Ok(s)
    }

    fn fences(&self) -> std::sync::MutexGuard<'_, Fences> {
        self.fences.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises the fence base, if need be, so that every token from now on (the base plus a
    /// create revision above the current revision) is above the high-water mark, the stored
    /// one and the highest this instance granted or reserved: the start's check, and the
    /// repair when a token would have gone back (a fence base deleted or lowered, etcd
    /// restored from an older snapshot). Tokens only jump up (by less than
    /// `FENCE_RESERVE` at a start).
    async fn lift_base(&self) -> ServiceResult<()> {
        for _ in 0..5 {
            let txn = etcd_client::Txn::new().and_then([
                TxnOp::get(self.base_key.clone(), None),
                TxnOp::get(self.high_key.clone(), None),
            ]);
            let resp = self
                .call("the fence reads", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            let rev = u64::try_from(resp.header().map(|h| h.revision()).unwrap_or(0)).unwrap_or(0);
            let ops = resp.op_responses();
            let [TxnOpResponse::Get(base), TxnOpResponse::Get(high)] = ops.as_slice() else {
                return Err(ServiceError::internal("etcd fence reads", "not two reads"));
            };
            let (old, base_rev) = match base.kvs().first() {
                Some(kv) => (parse_base(kv.value())?, kv.mod_revision()),
                None => (0, 0),
            };
            let stored = match high.kvs().first() {
                Some(kv) => parse_base(kv.value())?,
                None => 0,
            };
            let known = {
                let f = self.fences();
                // Every token granted at a revision this instance saw, with a base at most
                // the highest it read, is at most `base + seen_rev`.
                let seen = u64::try_from(self.seen_rev.load(Ordering::Relaxed)).unwrap_or(0);
                stored
                    .max(f.reserved)
                    .max(f.granted)
                    .max(f.base.saturating_add(seen))
            };
            let need = known.saturating_sub(rev);
            if old >= need {
                let mut f = self.fences();
                f.learn_base(old, i64::try_from(rev).unwrap_or(i64::MAX));
                f.reserved = f.reserved.max(stored);
                return Ok(());
            }
            if let Some(put) = self
                .put_unchanged("raising the fence base", &self.base_key, base_rev, need)
                .await?
            {
                tracing::info!(
                    from = old,
                    to = need,
                    high_water = known,
                    "fence base raised above the fence high-water mark"
                );
                let mut f = self.fences();
                f.learn_base(need, put);
                f.reserved = f.reserved.max(stored);
                return Ok(());
            }
        }
        Err(ServiceError::Unavailable(
            "the fence base kept changing while being raised".into(),
        ))
    }

    /// Puts `value` (decimal) at `key` if its mod revision is still `rev` (0: absent);
    /// the revision of the put if it did.
    async fn put_unchanged(
        &self,
        what: &str,
        key: &[u8],
        rev: i64,
        value: u64,
    ) -> ServiceResult<Option<i64>> {
        let txn = etcd_client::Txn::new()
            .when([Compare::mod_revision(key.to_vec(), CompareOp::Equal, rev)])
            .and_then([TxnOp::put(key.to_vec(), value.to_string(), None)]);
        let done = self
            .call(what, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(done
            .succeeded()
            .then(|| done.header().map(|h| h.revision()).unwrap_or(i64::MAX)))
    }

    /// Raises the stored high-water mark to at least `to` (never lowers it).
    async fn reserve(&self, to: u64) -> ServiceResult<()> {
        for _ in 0..5 {
            let (old, rev) = match self.get(&self.high_key).await? {
                Some(e) => (parse_base(&e.value)?, e.mod_rev),
                None => (0, 0),
            };
            if old >= to {
                let mut f = self.fences();
                f.reserved = f.reserved.max(old);
                return Ok(());
            }
            if self
                .put_unchanged("raising the fence high-water mark", &self.high_key, rev, to)
                .await?
                .is_some()
            {
                let mut f = self.fences();
                f.reserved = f.reserved.max(to);
                return Ok(());
            }
        }
        Err(ServiceError::Unavailable(
            "the fence high-water mark kept changing".into(),
        ))
    }

    /// The token of `waiter`, at the head of `node`'s queue `q` with key create revision
    /// `create`, once it is known to be safe: never below a token this instance granted for
    /// the file, never another waiter's, never below a fence base it read, and at or below
    /// the stored high-water mark (raised first if need be). Only a read at or after the
    /// revision where this instance learnt the higher base or token is evidence that tokens
    /// would go back; an older read (requests of one instance run concurrently) is `Stale`.
    /// A token that would go back lifts the base (`lift_base`) and answers unavailable: the
    /// client asks again. An acquire (`rejoin`) also deletes the waiter's key (made before
    /// the lift, its token is suspect) so it joins anew and gets a token above every one
    /// granted; a renewal never deletes the holder's key.
    async fn checked_fence(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        q: &Queue,
        create: i64,
        rejoin: bool,
    ) -> ServiceResult<Checked> {
        let fence = fence_of(q.base, create)?;
        let (lower, reserved) = {
            let f = self.fences();
            // (went back, read older than what was learnt)
            let base = (q.base < f.base).then_some(q.rev < f.base_rev);
            let last = f.last.get(&node).and_then(|(t, w, rev)| {
                (fence.0 < *t || (fence.0 == *t && w != waiter)).then_some(q.rev < *rev)
            });
            (
                base.into_iter().chain(last).collect::<Vec<bool>>(),
                f.reserved,
            )
        };
        if !lower.is_empty() && lower.iter().all(|older| *older) {
            return Ok(Checked::Stale);
        }
        if !lower.is_empty() {
            tracing::error!(%node, %fence, "a fencing token would have gone back (fence base lowered or deleted, or etcd restored from an older snapshot): raising the fence base");
            self.lift_base().await?;
            if rejoin {
                self.delete(self.waiter_key(node, waiter)).await?;
            }
            return Err(ServiceError::Unavailable(
                "the fence base was lowered or etcd went back; it was raised: ask again".into(),
            ));
        }
        if fence.0 >= reserved {
            self.reserve(fence.0.saturating_add(FENCE_RESERVE)).await?;
        }
        let mut f = self.fences();
        f.learn_base(q.base, q.rev);
        f.granted = f.granted.max(fence.0);
        if f.last.len() >= MAX_REMEMBERED && !f.last.contains_key(&node) {
            // Forget an arbitrary file: only the check of its next grant is lost.
            if let Some(k) = f.last.keys().next().copied() {
                f.last.remove(&k);
            }
        }
        // Only ever raised: a slower grant of an earlier head must not hide a later one.
        if f.last.get(&node).is_none_or(|(t, _, _)| *t < fence.0) {
            f.last.insert(node, (fence.0, waiter.clone(), q.rev));
        }
        Ok(Checked::Safe(fence))
    }

    /// Runs one etcd call, bounded by `OP_TIMEOUT` in all. A call that never left this process
    /// (no connection to the member the balancer picked) is sent again; nothing that may have
    /// reached etcd is sent twice.
    async fn call<T, F>(&self, what: &str, make: impl Fn(Client) -> F) -> ServiceResult<T>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + OP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, make(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let msg = e.to_string();
                    if msg.contains("tcp connect error") && Instant::now() + RESEND_PAUSE < deadline
                    {
                        tracing::debug!(error = %msg, "etcd member unreachable; sending again");
                        tokio::time::sleep(RESEND_PAUSE).await;
                        continue;
                    }
                    return Err(unavailable(&self.endpoints, what, msg));
                }
                Err(_) => {
                    return Err(ServiceError::Unavailable(format!(
                        "etcd at {} did not answer {what} within {} s",
                        self.endpoints,
                        OP_TIMEOUT.as_secs()
                    )));
                }
            }
        }
    }

    fn file_prefix(&self, kind: char, node: NodeId) -> String {
        format!("{}{kind}/{:020}/", self.root, node.0)
    }

    fn waiter_key(&self, node: NodeId, waiter: &WaiterId) -> Vec<u8> {
        format!("{}{}", self.file_prefix('w', node), waiter.as_str()).into_bytes()
    }

    fn owner_key(&self, node: NodeId, owner: &LockOwner) -> Vec<u8> {
        format!(
            "{}{}.{:020}",
            self.file_prefix('a', node),
            owner.session.as_str(),
            owner.owner
        )
        .into_bytes()
    }

    fn grant(&self, node: NodeId, fence: FenceToken) -> Grant {
        super::grant(&self.fence_key, self.config.lease, node, fence)
    }

    /// The key, if it exists.
    async fn get(&self, key: &[u8]) -> ServiceResult<Option<Entry>> {
        let resp = self
            .call("a read", |mut c| {
                let key = key.to_vec();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| Entry {
            key: kv.key().to_vec(),
            create: kv.create_revision(),
            mod_rev: kv.mod_revision(),
            lease: kv.lease(),
            value: kv.value().to_vec(),
        }))
    }

    /// The reads of a queue: every key under `prefix`, oldest first, and the fence base.
    fn queue_reads(&self, prefix: &str) -> [TxnOp; 2] {
        [
            TxnOp::get(
                prefix.as_bytes().to_vec(),
                // Oldest first on etcd's side, so a cut list keeps the head of the queue.
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(MAX_KEYS),
                ),
            ),
            TxnOp::get(self.base_key.clone(), None),
        ]
    }

    /// The queue from the answers to `queue_reads` (the last two of `resp`).
    fn parse_queue(resp: etcd_client::TxnResponse) -> ServiceResult<Queue> {
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let ops = resp.op_responses();
        let [.., TxnOpResponse::Get(keys), TxnOpResponse::Get(base)] = ops.as_slice() else {
            return Err(ServiceError::internal("etcd queue read", "not two reads"));
        };
        let mut entries: Vec<Entry> = keys
            .kvs()
            .iter()
            .map(|kv| Entry {
                key: kv.key().to_vec(),
                create: kv.create_revision(),
                mod_rev: kv.mod_revision(),
                lease: kv.lease(),
                value: kv.value().to_vec(),
            })
            .collect();
        entries.sort_by_key(|e| e.create);
        let base = match base.kvs().first() {
            Some(kv) => parse_base(kv.value())?,
            None => 0,
        };
        Ok(Queue { entries, rev, base })
    }

    /// Every key under `prefix` in create-revision order, and the fence base, at one revision.
    /// A read that answers a revision below one an earlier read (answered before this one
    /// was sent) answered means etcd went back (an older snapshot restored without
    /// `--bump-revision`): the fence base is lifted above every token this instance could
    /// have seen, and the request answers unavailable (the client asks again).
    async fn list(&self, prefix: &str) -> ServiceResult<Queue> {
        let before = self.seen_rev.load(Ordering::Relaxed);
        let txn = etcd_client::Txn::new().and_then(self.queue_reads(prefix));
        let resp = self
            .call("a queue read", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        let q = Self::parse_queue(resp)?;
        if q.rev < before {
            tracing::error!(
                seen = before,
                now = q.rev,
                "etcd's revision went back (restored from an older snapshot?): raising the fence base"
            );
            self.lift_base().await?;
            self.seen_rev.store(q.rev, Ordering::Relaxed);
            return Err(ServiceError::Unavailable(
                "etcd went back to an older revision; the fence base was raised: ask again".into(),
            ));
        }
        self.seen_rev.fetch_max(q.rev, Ordering::Relaxed);
        Ok(q)
    }

    /// Creates `key` with `value` on a lease of its own unless it exists, and reads the
    /// queue under `prefix`, in one etcd transaction (an uncontended acquire's one round trip
    /// after the lease grant). Returns the queue and whether it made the key.
    async fn join_and_list(
        &self,
        key: &[u8],
        value: &[u8],
        prefix: &str,
    ) -> ServiceResult<(Queue, bool)> {
        let ttl = self.ttl;
        let lease = self
            .call("a lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?
            .id();
        let mut then = vec![TxnOp::put(
            key.to_vec(),
            value.to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        )];
        then.extend(self.queue_reads(prefix));
        let txn = etcd_client::Txn::new()
            .when([Compare::create_revision(key.to_vec(), CompareOp::Equal, 0)])
            .and_then(then)
            .or_else(self.queue_reads(prefix));
        let resp = self
            .call("a queue join", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await;
        let made = resp.as_ref().is_ok_and(|r| r.succeeded());
        if !made {
            // It existed (a poll), or the call failed: the new lease is not needed.
            self.revoke(lease).await;
        }
        Ok((Self::parse_queue(resp?)?, made))
    }

    /// Creates `key` with `value` on a lease of its own, unless it exists. Returns whether it
    /// made it.
    async fn create(&self, key: &[u8], value: &[u8]) -> ServiceResult<bool> {
        let ttl = self.ttl;
        let lease = self
            .call("a lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?
            .id();
        let txn = etcd_client::Txn::new()
            .when([Compare::create_revision(key.to_vec(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.to_vec(),
                value.to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let made = self
            .call("a queue join", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await;
        match made {
            Ok(r) if r.succeeded() => Ok(true),
            other => {
                // Made by a concurrent request of the same waiter, or failed: the lease is
                // not needed (it would lapse anyway).
                self.revoke(lease).await;
                other.map(|_| false)
            }
        }
    }

    /// Revokes a lease (deleting its key); a lease already gone is fine.
    async fn revoke(&self, lease: i64) {
        let r = self
            .call("a lease revoke", |mut c| async move {
                c.lease_revoke(lease).await
            })
            .await;
        if let Err(e) = r
            && !e.to_string().contains("not found")
        {
            tracing::warn!(error = %e, lease, "revoking an etcd lease failed; it lapses");
        }
    }

    /// Extends a lease to its full TTL; false when it is gone.
    async fn keep_alive(&self, lease: i64) -> ServiceResult<bool> {
        let r = self
            .call("a lease keepalive", |mut c| async move {
                // The request sent as the stream opens goes unanswered (etcd-client 0.21):
                // send one on the open stream.
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                stream.message().await
            })
            .await?;
        Ok(r.is_some_and(|m| m.ttl() > 0))
    }

    /// Whether a lease still runs (its key, if gone, was deleted, not lapsed).
    async fn lease_alive(&self, lease: i64) -> ServiceResult<bool> {
        let r = self
            .call("a lease lookup", |mut c| async move {
                c.lease_time_to_live(lease, None).await
            })
            .await?;
        // etcd answers whole seconds, rounded down: 0 is a lease in its last second; a
        // lease gone is -1.
        Ok(r.ttl() >= 0)
    }

    /// Waits until a key under `prefix` changes after revision `rev` (deletes only, with
    /// `deletes_only`), or `until`; meanwhile keeps `lease` alive. Returns early, never
    /// late: the caller reads the queue again either way.
    async fn wait_change(
        &self,
        prefix: &str,
        rev: i64,
        deletes_only: bool,
        until: Instant,
        lease: i64,
    ) {
        let mut options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        if deletes_only {
            options = options.with_filters([WatchFilterType::NoPut]);
        }
        let watch = self
            .call("a watch", |mut c| {
                let (key, options) = (prefix.as_bytes().to_vec(), options.clone());
                async move { c.watch(key, Some(options)).await }
            })
            .await;
        let mut stream = match watch {
            Ok(s) => s,
            Err(e) => {
                // No watch: look again after a short pause (bounded by `until`).
                tracing::warn!(error = %e, "watching a lock queue failed");
                let pause = Instant::now() + Duration::from_millis(200);
                tokio::time::sleep_until(pause.min(until)).await;
                return;
            }
        };
        let tick = (self.config.lease / 3).max(Duration::from_millis(100));
        let mut next_keep = Instant::now() + tick;
        loop {
            tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(resp)) if resp.events().is_empty() && !resp.canceled() => {}
                    // An event: look again.
                    Ok(Some(resp)) if !resp.canceled() => return,
                    // A cancelled watch (compacted) or a broken stream: look again, after a
                    // short pause so that a stream that keeps ending cannot spin.
                    _ => {
                        let pause = Instant::now() + Duration::from_millis(100);
                        tokio::time::sleep_until(pause.min(until)).await;
                        return;
                    }
                },
                _ = tokio::time::sleep_until(next_keep) => {
                    match self.keep_alive(lease).await {
                        Ok(true) => {}
                        // Our own key lapsed: the caller finds it gone.
                        Ok(false) => return,
                        Err(e) => tracing::warn!(error = %e, "keeping a waiter's lease alive failed"),
                    }
                    next_keep = Instant::now() + tick;
                }
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }

    // ---- write locks ----

    /// Waits up to `wait` (capped) for `node`'s write lock; answers `Granted` or `Queued`.
    pub async fn acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        user: &str,
        wait: Duration,
    ) -> ServiceResult<AcquireResponse> {
        let deadline = Instant::now() + wait.min(self.config.max_wait);
        let key = self.waiter_key(node, waiter);
        let prefix = self.file_prefix('w', node);
        let mut joins = 1;
        let (mut q, made) = self.join_and_list(&key, user.as_bytes(), &prefix).await?;
        // Whether the key's lease is whole (made or renewed since the last wait). A poll
        // keeps its place by renewing it.
        let mut fresh = made;
        // The lease of the key as last seen.
        let mut lease = None;
        loop {
            let me = match q.position(&key) {
                Some(pos) => (pos, q.entries[pos].clone()),
                None => {
                    // Released meanwhile (its key deleted, its lease still running): this
                    // call ends, and must not queue the waiter again behind the release.
                    if let Some(l) = lease
                        && self.lease_alive(l).await?
                    {
                        return Err(ServiceError::NotHolder(format!(
                            "the waiter for {node} was released while its acquire waited"
                        )));
                    }
                    // Its lease lapsed: join again.
                    if joins == MAX_JOINS {
                        return Err(ServiceError::Unavailable(format!(
                            "the queue of {node} lost this waiter {MAX_JOINS} times in one call"
                        )));
                    }
                    joins += 1;
                    let (again, made) = self.join_and_list(&key, user.as_bytes(), &prefix).await?;
                    (q, fresh) = (again, made);
                    continue;
                }
            };
            let (pos, me) = me;
            lease = Some(me.lease);
            if !fresh && !self.keep_alive(me.lease).await? {
                // The lease ran out; its key goes when etcd revokes it: a short pause, not a
                // spin of keepalives and reads meanwhile.
                let pause = Instant::now() + Duration::from_millis(100);
                tokio::time::sleep_until(pause.min(deadline.max(Instant::now()))).await;
                q = self.list(&prefix).await?;
                continue;
            }
            if pos == 0 {
                let fence = match self
                    .checked_fence(node, waiter, &q, me.create, true)
                    .await?
                {
                    Checked::Safe(fence) => fence,
                    Checked::Stale => {
                        (q, fresh) = (self.list(&prefix).await?, true);
                        continue;
                    }
                };
                tracing::debug!(%node, %fence, user, waiter = waiter.as_str(), "lock granted");
                return Ok(AcquireResponse::Granted(self.grant(node, fence)));
            }
            if Instant::now() >= deadline {
                return Ok(AcquireResponse::Queued {
                    position: u64::try_from(pos).unwrap_or(u64::MAX),
                });
            }
            self.wait_change(&prefix, q.rev, true, deadline, me.lease)
                .await;
            fresh = false;
            q = self.list(&prefix).await?;
        }
    }

    /// Extends the holder's lease.
    pub async fn renew(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<Grant> {
        let key = self.waiter_key(node, waiter);
        let mut q = self.list(&self.file_prefix('w', node)).await?;
        let head = q.entries.first().filter(|e| e.key == key);
        let Some(head) = head.cloned() else {
            return Err(ServiceError::NotHolder(format!(
                "lock on {node} is not held by this waiter (lease expired?)"
            )));
        };
        if !self.keep_alive(head.lease).await? {
            return Err(ServiceError::NotHolder(format!(
                "lock on {node}: the lease expired"
            )));
        }
        // A read older than another request's (this instance's) is read again, a few times.
        for _ in 0..3 {
            if let Checked::Safe(fence) = self
                .checked_fence(node, waiter, &q, head.create, false)
                .await?
            {
                return Ok(self.grant(node, fence));
            }
            q = self.list(&self.file_prefix('w', node)).await?;
            if q.entries.first().is_none_or(|e| e.key != key) {
                return Err(ServiceError::NotHolder(format!(
                    "lock on {node} is not held by this waiter (lease expired?)"
                )));
            }
        }
        Err(ServiceError::Unavailable(format!(
            "the fence base of {node} kept moving during a renewal: ask again"
        )))
    }

    /// Deletes `key` (one round trip; its lease, with no key left, lapses on its own).
    async fn delete(&self, key: Vec<u8>) -> ServiceResult<()> {
        self.call("a delete", |mut c| {
            let key = key.clone();
            async move { c.delete(key, None).await }
        })
        .await
        .map(|_| ())
    }

    /// Releases the lock (or leaves the queue). Idempotent.
    pub async fn release(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<()> {
        self.delete(self.waiter_key(node, waiter)).await?;
        tracing::debug!(%node, "lock released");
        Ok(())
    }

    /// Every write lock held or waited for (at most `MAX_KEYS` keys read).
    pub async fn status(&self) -> ServiceResult<Vec<LockStatus>> {
        let prefix = format!("{}w/", self.root);
        let q = self.list(&prefix).await?;
        let mut by_node: std::collections::BTreeMap<u64, Vec<&Entry>> = Default::default();
        for e in &q.entries {
            let node = e
                .key
                .get(prefix.len()..prefix.len() + 20)
                .and_then(|d| std::str::from_utf8(d).ok())
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or_else(|| ServiceError::internal("etcd lock key", "no node"))?;
            by_node.entry(node).or_default().push(e);
        }
        by_node
            .into_iter()
            .map(|(node, entries)| {
                let head = entries.first().copied();
                Ok(LockStatus {
                    node: NodeId(node),
                    holder: head.map(|h| String::from_utf8_lossy(&h.value).into_owned()),
                    fence: head.map(|h| fence_of(q.base, h.create)).transpose()?,
                    queued: u64::try_from(entries.len().saturating_sub(1)).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    // ---- application locks ----

    /// Takes an application lock, waiting up to `wait` (capped); `wait` zero: answers at once.
    pub async fn app_lock(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared: bool,
        user: &str,
        wait: Duration,
    ) -> ServiceResult<AppLockResponse> {
        let blocking = !wait.is_zero();
        let deadline = Instant::now() + wait.min(self.config.max_wait);
        let mut join = true;
        loop {
            let (resp, rev, lease) = self
                .app_step(node, owner, shared, user, blocking, join)
                .await?;
            join = false;
            if !matches!(resp, AppLockResponse::Queued { .. }) || Instant::now() >= deadline {
                return Ok(resp);
            }
            self.wait_change(&self.file_prefix('a', node), rev, false, deadline, lease)
                .await;
        }
    }

    fn granted_app(&self) -> AppLockResponse {
        AppLockResponse::Granted {
            lease_ms: u64::try_from(self.config.lease.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Changes the mode of an existing request in place (its place and lease kept). To
    /// shared, it only widens what is granted; to exclusive it could take a grant back from
    /// a shared request behind it, so then only while the request is the file's only one
    /// (`prefix`: every key of the file must have its create revision).
    async fn set_mode(&self, e: &Entry, shared: bool, prefix: &str) -> ServiceResult<bool> {
        let mut value = e.value.clone();
        if let Some(first) = value.first_mut() {
            *first = if shared { b's' } else { b'x' };
        }
        let guard = if shared {
            Compare::create_revision(e.key.clone(), CompareOp::Equal, e.create)
        } else {
            let mut end = prefix.as_bytes().to_vec();
            if let Some(last) = end.last_mut() {
                *last += 1;
            }
            Compare::create_revision(prefix.as_bytes().to_vec(), CompareOp::Equal, e.create)
                .with_range(end)
        };
        let txn = etcd_client::Txn::new().when([guard]).and_then([TxnOp::put(
            e.key.clone(),
            value,
            Some(PutOptions::new().with_ignore_lease()),
        )]);
        let r = self
            .call("a lock mode change", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }

    /// One step of `app_lock`: grant, queue (keeping the place) or, not `blocking`, answer
    /// busy. Only the first step of a request (`join`) takes a place in the queue. Returns the
    /// answer, the revision the queue was read at and the request's lease.
    async fn app_step(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared: bool,
        user: &str,
        blocking: bool,
        join: bool,
    ) -> ServiceResult<(AppLockResponse, i64, i64)> {
        let key = self.owner_key(node, owner);
        let prefix = self.file_prefix('a', node);
        let q = self.list(&prefix).await?;
        let mine = q.position(&key).map(|p| (p, q.entries[p].clone()));
        let value = {
            let mut v = vec![if shared { b's' } else { b'x' }];
            v.extend_from_slice(user.as_bytes());
            v
        };
        match mine {
            Some((pos, e)) if pos < q.granted() => {
                if is_shared(&e.value) == shared || shared {
                    // Held already, or an exclusive lock converted down to shared.
                    if !is_shared(&e.value) && shared {
                        self.set_mode(&e, true, &prefix).await?;
                    }
                    if self.keep_alive(e.lease).await? {
                        return Ok((self.granted_app(), q.rev, e.lease));
                    }
                } else if q.entries.len() == 1
                    && self.set_mode(&e, false, &prefix).await?
                    && self.keep_alive(e.lease).await?
                {
                    // The only one: shared to exclusive in place.
                    return Ok((self.granted_app(), q.rev, e.lease));
                } else if !blocking {
                    // A non-blocking upgrade that cannot be had keeps the shared lock.
                    return Ok((AppLockResponse::Busy, q.rev, e.lease));
                } else {
                    // Shared to exclusive: given up, then asked for anew (as Linux does).
                    self.revoke(e.lease).await;
                    self.create(&key, &value).await?;
                }
            }
            Some((_, e)) => {
                if !is_shared(&e.value) && shared {
                    self.set_mode(&e, true, &prefix).await?;
                } else if is_shared(&e.value) && !shared {
                    // A waiting shared request turned exclusive: asked anew at the back (in
                    // place it could take a grant back from shared requests behind it).
                    self.revoke(e.lease).await;
                    self.create(&key, &value).await?;
                }
                if !is_shared(&e.value) || shared {
                    // Polling keeps the place (a lapsed key is asked anew below).
                    self.keep_alive(e.lease).await?;
                }
            }
            None if !join => {
                // Given up meanwhile (or lapsed): this request ends.
                return Ok((AppLockResponse::Busy, q.rev, 0));
            }
            None if !blocking => {
                // A try: the key is made only if it is granted at once, in one transaction,
                // so nobody else's try ever sees a request that was never going to wait.
                return self.try_create(&key, &value, shared, &prefix).await;
            }
            None => {
                self.create(&key, &value).await?;
            }
        }
        let mut q = self.list(&prefix).await?;
        if join && q.position(&key).is_none() {
            // Its lease lapsed meanwhile: this request asks anew.
            self.create(&key, &value).await?;
            q = self.list(&prefix).await?;
        }
        let Some(pos) = q.position(&key) else {
            return Ok((AppLockResponse::Busy, q.rev, 0));
        };
        let lease = q.entries[pos].lease;
        let granted = q.granted();
        if pos < granted {
            return Ok((self.granted_app(), q.rev, lease));
        }
        if !blocking {
            self.revoke(lease).await;
            return Ok((AppLockResponse::Busy, q.rev, lease));
        }
        let position = u64::try_from(pos - granted + 1).unwrap_or(u64::MAX);
        Ok((AppLockResponse::Queued { position }, q.rev, lease))
    }

    /// A non-blocking request's key, made only if the request is granted at once: exclusive,
    /// when the file has no request at all; shared, when every request is shared (a shared
    /// key behind only shared ones is granted; one behind an exclusive one would wait). One
    /// etcd transaction after the lease grant; the lease goes again if the key is not made.
    async fn try_create(
        &self,
        key: &[u8],
        value: &[u8],
        shared: bool,
        prefix: &str,
    ) -> ServiceResult<(AppLockResponse, i64, i64)> {
        let ttl = self.ttl;
        let lease = self
            .call("a lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?
            .id();
        let mut end = prefix.as_bytes().to_vec();
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let put = TxnOp::put(
            key.to_vec(),
            value.to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        );
        // No key in the file's range (a compare over an empty range sees create revision 0).
        let none = Compare::create_revision(prefix.as_bytes().to_vec(), CompareOp::Equal, 0)
            .with_range(end.clone());
        let txn = if shared {
            // Or every key shared: each value below "t" starts with 's' (a value compare over
            // an empty range fails, hence the empty case first).
            let all_shared =
                Compare::value(prefix.as_bytes().to_vec(), CompareOp::Less, b"t".to_vec())
                    .with_range(end);
            etcd_client::Txn::new()
                .when([none])
                .and_then([put.clone()])
                .or_else([TxnOp::txn(
                    etcd_client::Txn::new().when([all_shared]).and_then([put]),
                )])
        } else {
            etcd_client::Txn::new().when([none]).and_then([put])
        };
        let resp = self
            .call("a lock try", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await;
        let made = match &resp {
            Ok(r) if r.succeeded() => true,
            Ok(r) => r.op_responses().iter().any(|op| match op {
                TxnOpResponse::Txn(t) => t.succeeded(),
                _ => false,
            }),
            Err(_) => false,
        };
        let rev = resp
            .as_ref()
            .ok()
            .and_then(|r| r.header())
            .map_or(0, |h| h.revision());
        if !made {
            self.revoke(lease).await;
            resp?;
            // The same request sent again elsewhere (its answer slow) may have made the
            // owner's key after this one read the queue: its key, if granted, is this
            // request's grant (a Busy would leave a lock the application never knew of).
            let q = self.list(prefix).await?;
            if let Some(pos) = q.position(key)
                && pos < q.granted()
                && is_shared(&q.entries[pos].value) == shared
            {
                return Ok((self.granted_app(), q.rev, q.entries[pos].lease));
            }
            return Ok((AppLockResponse::Busy, rev, 0));
        }
        Ok((self.granted_app(), rev, lease))
    }

    /// Gives an application lock up, or its place in the queue. Idempotent.
    pub async fn app_unlock(&self, node: NodeId, owner: &LockOwner) -> ServiceResult<()> {
        self.delete(self.owner_key(node, owner)).await
    }

    /// A holder another owner's request (`shared` or not) would conflict with.
    pub async fn app_test(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared_req: bool,
    ) -> ServiceResult<Option<AppLockConflict>> {
        let key = self.owner_key(node, owner);
        let q = self.list(&self.file_prefix('a', node)).await?;
        Ok(q.entries
            .iter()
            .take(q.granted())
            .filter(|e| e.key != key)
            .find(|e| !(shared_req && is_shared(&e.value)))
            .map(|e| AppLockConflict {
                shared: is_shared(&e.value),
                user: user_of(&e.value),
            }))
    }

    /// Extends the locks `held` of `session` (file, owner); returns how many it holds (or
    /// waits for). A lock of the session it no longer names lapses with its lease. The keys
    /// are read `RENEW_READS` per transaction and their leases kept alive `RENEW_AT_ONCE` at a
    /// time: a renewal of n locks costs n/64 reads and n keepalives in parallel, not 3n
    /// round trips in a row.
    pub async fn app_renew(
        &self,
        session: &UploadId,
        held: &[(NodeId, u64)],
    ) -> ServiceResult<u64> {
        use futures_util::StreamExt;
        let keys: Vec<Vec<u8>> = held
            .iter()
            .take(MAX_RENEW)
            .map(|(node, owner)| {
                let owner = LockOwner {
                    session: session.clone(),
                    owner: *owner,
                };
                self.owner_key(*node, &owner)
            })
            .collect();
        let mut leases = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(RENEW_READS) {
            let reads: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
            let txn = etcd_client::Txn::new().and_then(reads);
            let resp = self
                .call("the renewal reads", |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            for op in resp.op_responses() {
                if let TxnOpResponse::Get(g) = op
                    && let Some(kv) = g.kvs().first()
                {
                    leases.push(kv.lease());
                }
            }
        }
        let kept: Vec<ServiceResult<bool>> = futures_util::stream::iter(leases)
            .map(|lease| self.keep_alive(lease))
            .buffer_unordered(RENEW_AT_ONCE)
            .collect()
            .await;
        let mut count = 0;
        for k in kept {
            if k? {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Whether nobody holds or waits for an application lock on `node` (tests).
    #[cfg(test)]
    pub(super) async fn app_idle(&self, node: NodeId) -> ServiceResult<bool> {
        Ok(self
            .list(&self.file_prefix('a', node))
            .await?
            .entries
            .is_empty())
    }
}

fn fence_of(base: u64, create: i64) -> ServiceResult<FenceToken> {
    u64::try_from(create)
        .ok()
        .and_then(|c| base.checked_add(c))
        .filter(|t| *t <= MAX_FENCE)
        .map(FenceToken)
        .ok_or_else(|| {
            ServiceError::internal(
                "a fencing token",
                format!("fence base {base} too high: tokens would pass {MAX_FENCE}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(n: u8) -> LockOwner {
        LockOwner {
            session: UploadId::from_bytes([n; 16]),
            owner: 1,
        }
    }

    async fn unit_locks(lease: Duration) -> (EtcdLocks, EtcdConfig) {
        let etcd = crate::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
        let prefix = format!("locks-unit/{:016x}", rand::random::<u64>());
        let config = EtcdConfig::parse(&etcd.meta_url(&prefix)).expect("url");
        let locks = LockConfig {
            lease,
            max_wait: Duration::from_secs(5),
        };
        let l = EtcdLocks::connect(&config, locks, "k")
            .await
            .expect("connect");
        (l, config)
    }

    /// A refused try (non-blocking) never shows a key another request could see: no put
    /// under the file's prefix at all. Tries that are granted are still granted.
    #[tokio::test]
    async fn a_refused_try_makes_no_key_that_others_could_see() {
        // A lease that outlasts the test's quiet waits (nothing renews owner 1's lock).
        let (l, config) = unit_locks(Duration::from_secs(30)).await;
        let node = NodeId(9);
        let zero = Duration::ZERO;
        let granted = |r: AppLockResponse| matches!(r, AppLockResponse::Granted { .. });
        // Shared behind shared: granted at once; exclusive behind them: refused.
        assert!(granted(
            l.app_lock(node, &owner(1), true, "a", zero)
                .await
                .expect("lock")
        ));
        let files = l.file_prefix('a', node);
        let mut c = Client::connect(config.endpoints.clone(), None)
            .await
            .expect("client");
        let from = l.list(&files).await.expect("list").rev + 1;
        let mut events = c
            .watch(
                files.clone(),
                Some(WatchOptions::new().with_prefix().with_start_revision(from)),
            )
            .await
            .expect("watch");
        for (n, shared) in [(2, false), (3, false)] {
            assert_eq!(
                l.app_lock(node, &owner(n), shared, "b", zero)
                    .await
                    .expect("try"),
                AppLockResponse::Busy
            );
        }
        assert!(granted(
            l.app_lock(node, &owner(4), true, "c", zero)
                .await
                .expect("lock")
        ));
        // The only change under the prefix is 4's grant.
        let mut keys = Vec::new();
        while let Ok(Ok(Some(resp))) =
            tokio::time::timeout(Duration::from_millis(500), events.message()).await
        {
            for e in resp.events() {
                let kv = e.kv().expect("kv");
                keys.push((
                    e.event_type(),
                    String::from_utf8_lossy(kv.key()).into_owned(),
                ));
            }
        }
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(
            keys[0]
                .1
                .ends_with(&format!("{}.{:020}", owner(4).session.as_str(), 1)),
            "{keys:?}"
        );
        // Exclusive behind a shared holder, and shared behind an exclusive one: refused, no key.
        l.app_unlock(node, &owner(1)).await.expect("unlock");
        l.app_unlock(node, &owner(4)).await.expect("unlock");
        assert!(granted(
            l.app_lock(node, &owner(5), false, "d", zero)
                .await
                .expect("lock")
        ));
        assert_eq!(
            l.app_lock(node, &owner(6), true, "e", zero)
                .await
                .expect("try"),
            AppLockResponse::Busy
        );
        assert_eq!(l.list(&files).await.expect("list").entries.len(), 1);
    }

    /// A renewal whose queue read is older than a base another request of the same instance
    /// learnt (a routine base lift by another instance's start, seen in between) is a slow
    /// read, not a base that went back: the holder's key stays and the renewal succeeds.
    #[tokio::test]
    async fn a_renewal_read_before_a_base_lift_keeps_the_holders_key() {
        let (l, config) = unit_locks(Duration::from_secs(10)).await;
        let node = NodeId(3);
        let w = WaiterId::from_bytes([7; 16]);
        let r = l
            .acquire(node, &w, "u", Duration::ZERO)
            .await
            .expect("acquire");
        assert!(matches!(r, AcquireResponse::Granted(_)), "{r:?}");
        let prefix = l.file_prefix('w', node);
        // R1 reads the queue with the old base...
        let old = l.list(&prefix).await.expect("list");
        let create = old.entries[0].create;
        // ... another instance starts and lifts the base; R2 reads it and finishes first.
        set_fence_base(&config, old.base + (1 << 20))
            .await
            .expect("lift");
        let after = l.renew(node, &w).await.expect("renew");
        // R1 goes on with its older read: stale, not "went back".
        assert!(matches!(
            l.checked_fence(node, &w, &old, create, false)
                .await
                .expect("a stale read is no error"),
            Checked::Stale
        ));
        assert_eq!(l.list(&prefix).await.expect("list").entries.len(), 1);
        let again = l.renew(node, &w).await.expect("renew");
        assert_eq!(again.fence, after.fence);
    }

    /// A lease in its last second (etcd answers a TTL of 0, rounded down) still runs: a
    /// waiter released then is not taken for a lapsed one (which would queue it again).
    #[tokio::test]
    async fn a_lease_in_its_last_second_is_alive() {
        let (l, config) = unit_locks(Duration::from_secs(2)).await;
        let mut c = Client::connect(config.endpoints.clone(), None)
            .await
            .expect("client");
        let lease = c.lease_grant(1, None).await.expect("grant").id();
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let ttl = c.lease_time_to_live(lease, None).await.expect("ttl").ttl();
            assert!(ttl >= 0, "lapsed before its last second was seen");
            if ttl == 0 {
                break;
            }
            assert!(
                Instant::now() < until,
                "the lease never reached its last second"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(l.lease_alive(lease).await.expect("lookup"));
        // Gone: not alive.
        c.lease_revoke(lease).await.expect("revoke");
        assert!(!l.lease_alive(lease).await.expect("lookup"));
    }

    /// A try sent twice (its first answer slow, the client asked another instance), the
    /// second's queue read made before the first's key: the second finds the key its own
    /// and answers granted, not busy (which would leave a lock the application never knew
    /// of, renewed until close).
    #[tokio::test]
    async fn a_try_sent_twice_is_granted_by_its_own_key() {
        let (l, _config) = unit_locks(Duration::from_secs(10)).await;
        let node = NodeId(4);
        let prefix = l.file_prefix('a', node);
        let key = l.owner_key(node, &owner(1));
        let value = b"xu".to_vec();
        let first = l
            .try_create(&key, &value, false, &prefix)
            .await
            .expect("try");
        assert!(
            matches!(first.0, AppLockResponse::Granted { .. }),
            "{first:?}"
        );
        let again = l
            .try_create(&key, &value, false, &prefix)
            .await
            .expect("try");
        assert!(
            matches!(again.0, AppLockResponse::Granted { .. }),
            "{again:?}"
        );
        // Another owner's try is still refused.
        let other = l.owner_key(node, &owner(2));
        let busy = l
            .try_create(&other, &value, false, &prefix)
            .await
            .expect("try");
        assert_eq!(busy.0, AppLockResponse::Busy);
    }

    /// A fence base so high that tokens would overflow is refused when set, and a token
    /// beyond the range is an error that says why.
    #[tokio::test]
    async fn a_fence_base_without_room_for_tokens_is_refused() {
        let (l, config) = unit_locks(Duration::from_secs(10)).await;
        let e = set_fence_base(&config, u64::MAX - 5)
            .await
            .expect_err("refused");
        assert!(matches!(e, ServiceError::BadRequest(_)), "{e:?}");
        let r = l
            .acquire(
                NodeId(2),
                &WaiterId::from_bytes([1; 16]),
                "u",
                Duration::ZERO,
            )
            .await
            .expect("still granting");
        assert!(matches!(r, AcquireResponse::Granted(_)), "{r:?}");
        let e = fence_of(u64::MAX - 5, 10).expect_err("out of range");
        assert!(e.to_string().contains("too high"), "{e}");
    }

    /// etcd going back (a snapshot restore without `--bump-revision`: revisions, and so
    /// create revisions, start lower again) is noticed at the next queue read: the base is
    /// lifted above every token granted at a revision this instance saw.
    #[tokio::test]
    async fn etcd_going_back_in_revisions_lifts_the_fence_base() {
        let (l, _config) = unit_locks(Duration::from_secs(10)).await;
        let node = NodeId(6);
        let prefix = l.file_prefix('w', node);
        let now = l.list(&prefix).await.expect("list").rev;
        // As if this instance had seen a million more revisions before the restore.
        let before_restore = now + 1_000_000;
        l.seen_rev.store(before_restore, Ordering::Relaxed);
        let base = l.fences().base;
        let Err(e) = l.list(&prefix).await else {
            panic!("a read below a revision seen passed");
        };
        assert!(matches!(e, ServiceError::Unavailable(_)), "{e:?}");
        let r = l
            .acquire(node, &WaiterId::from_bytes([3; 16]), "u", Duration::ZERO)
            .await
            .expect("granted after the lift");
        let AcquireResponse::Granted(g) = r else {
            panic!("{r:?}");
        };
        assert!(
            g.fence.0 > base + u64::try_from(before_restore).expect("rev"),
            "{} <= {base} + {before_restore}",
            g.fence.0
        );
    }

    #[tokio::test]
    async fn an_upgrade_in_place_is_refused_once_another_request_joined() {
        let etcd = crate::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
        let prefix = format!("locks-unit/{:016x}", rand::random::<u64>());
        let config = EtcdConfig::parse(&etcd.meta_url(&prefix)).expect("url");
        let locks = LockConfig {
            lease: Duration::from_secs(2),
            max_wait: Duration::from_secs(5),
        };
        let l = EtcdLocks::connect(&config, locks, "k")
            .await
            .expect("connect");
        let node = NodeId(5);
        let granted = |r: AppLockResponse| matches!(r, AppLockResponse::Granted { .. });
        let zero = Duration::ZERO;
        assert!(granted(
            l.app_lock(node, &owner(1), true, "a", zero)
                .await
                .expect("lock")
        ));
        let files = l.file_prefix('a', node);
        // What an upgrade of 1 read while it was alone...
        let alone = l.list(&files).await.expect("list").entries[0].clone();
        // ... then 2 joins, shared behind shared: granted.
        assert!(granted(
            l.app_lock(node, &owner(2), true, "b", zero)
                .await
                .expect("lock")
        ));
        // The upgrade must not take 2's grant back.
        assert!(!l.set_mode(&alone, false, &files).await.expect("set mode"));
        assert_eq!(
            l.app_test(node, &owner(3), true).await.expect("test"),
            None,
            "both still read"
        );
        // Alone again: in place.
        l.app_unlock(node, &owner(2)).await.expect("unlock");
        let alone = l.list(&files).await.expect("list").entries[0].clone();
        assert!(l.set_mode(&alone, false, &files).await.expect("set mode"));
        let c = l.app_test(node, &owner(3), true).await.expect("test");
        assert_eq!(c.map(|c| c.shared), Some(false));
    }
}
