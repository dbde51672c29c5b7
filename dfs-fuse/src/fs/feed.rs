//! The change feed, client side (issue 10): a task long-polls the directory's feed and drops
//! exactly what changed from what this client knows (`known`) and from the kernel's caches,
//! through a [`KernelCache`] the adapter provides (fuser's `Notifier`, on a thread of its own).
//! The core never calls the kernel itself, so it stays testable without a mount.
//!
//! While the feed is healthy, the kernel may cache entries and attributes for [`FEED_TTL`];
//! otherwise for [`ATTR_TTL`](super::ATTR_TTL), as before the feed. A lost feed (an error, a
//! resync, a restarted directory) drops everything this client holds, kernel and `known`
//! alike, before it is trusted again.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::NodeId;
use common::api::{Change, ChangeKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::DfsFs;

/// How long the kernel may cache entries and attributes while the feed is healthy: a change
/// then reaches this client within the feed's delivery time, and a loss of the feed that
/// goes unnoticed (a silent network partition) is noticed within a poll's deadline
/// ([`POLL_WAIT`] + the call timeout), so a longer TTL would gain little and widen that case.
pub const FEED_TTL: Duration = Duration::from_secs(15);

/// How long one poll waits at the directory for a change.
pub const POLL_WAIT: Duration = Duration::from_secs(10);

/// How long the kernel may take no invalidation while some wait before the feed counts as
/// unhealthy: short TTLs until the kernel took everything (what is queued reaches it in
/// order, so no resync is needed). A notifier stuck on the kernel would otherwise leave long
/// TTLs in force over changes the kernel never heard of. Above `remote::FALLBACK_WAIT` (2 s):
/// the kernel's `inval_entry` waits for the lookups in progress in its directory, and a
/// lookup of a known name may wait that long for a directory that does not answer.
pub const NOTIFY_BOUND: Duration = Duration::from_secs(5);

/// At most this many batches wait for the kernel: past it (a kernel stuck for long while
/// this client keeps changing things) a batch is not queued but the feed counts as lost, and
/// once the kernel took what is queued a resync drops everything held.
pub const NOTIFY_QUEUE_MAX: usize = 4096;

/// How often a poll in progress checks that the kernel keeps up.
const NOTIFY_CHECK: Duration = Duration::from_millis(250);

/// After a failed poll, the next one waits this long (the directory may be restarting),
/// doubling with each failure in a row up to `RETRY_MAX` (a directory without a feed, or
/// down for long, is not asked twice a second).
const RETRY_AFTER: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// One thing the kernel must forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// The entry `name` in `parent` (it may name another node now, or none).
    Entry {
        /// The directory.
        parent: NodeId,
        /// The name.
        name: String,
    },
    /// The attributes and cached content of a node.
    Inode(NodeId),
    /// The entry `name` in `parent`, whose node `child` is gone.
    Delete {
        /// The directory.
        parent: NodeId,
        /// The node that was there.
        child: NodeId,
        /// The name.
        name: String,
    },
}

/// Where the core sends what the kernel must forget. The adapter's implementation hands the
/// batch to a thread of its own: a call into the kernel from a FUSE handler or a runtime
/// worker can deadlock.
pub trait KernelCache: Send + Sync {
    /// Drops these from the kernel's caches (never blocks on the kernel).
    fn invalidate(&self, batch: Vec<Invalidation>);

    /// How many batches are waiting for the kernel (the subscriber waits while many are).
    fn backlog(&self) -> usize {
        0
    }

    /// While batches wait: since when the kernel took nothing (the later of the oldest
    /// waiting batch's hand-over and the last call into the kernel that finished). None when
    /// everything was applied.
    fn stuck_since(&self) -> Option<std::time::Instant> {
        None
    }
}

/// What the feed subscriber knows of the feed.
pub(super) struct FeedState {
    /// The feed is healthy: changes reach this client as they happen.
    pub up: std::sync::atomic::AtomicBool,
    /// When the feed was last lost (or the mount started): replies to requests that began
    /// before then get the short TTL.
    pub lost_at: std::sync::Mutex<Instant>,
    /// Resynchronisations (every drop of all that is held) since the mount started.
    pub resyncs: std::sync::atomic::AtomicU64,
    /// Where invalidations go (none: no kernel, as in tests of the core).
    pub kernel: std::sync::OnceLock<Arc<dyn KernelCache>>,
    /// A batch was not queued ([`NOTIFY_QUEUE_MAX`]): a resync is due.
    pub overflow: std::sync::atomic::AtomicBool,
}

impl Default for FeedState {
    fn default() -> Self {
        FeedState {
            up: std::sync::atomic::AtomicBool::new(false),
            lost_at: std::sync::Mutex::new(Instant::now()),
            resyncs: std::sync::atomic::AtomicU64::new(0),
            kernel: std::sync::OnceLock::new(),
            overflow: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// What `changes` drop: the invalidations for the kernel and the nodes `known` must distrust.
fn invalidations(known: &super::known::Known, changes: &[Change]) -> Vec<Invalidation> {
    let gone: std::collections::HashSet<NodeId> = changes
        .iter()
        .filter_map(|c| match c.what {
            ChangeKind::Gone { node } => Some(node),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    let mut inodes = std::collections::HashSet::new();
    for c in changes {
        match c.what {
            ChangeKind::Entry { dir, node } => {
                for name in known.names_for(dir, node) {
                    out.push(if gone.contains(&node) {
                        Invalidation::Delete {
                            parent: dir,
                            child: node,
                            name,
                        }
                    } else {
                        Invalidation::Entry { parent: dir, name }
                    });
                }
                inodes.insert(dir);
            }
            ChangeKind::Node { node } | ChangeKind::Gone { node } => {
                inodes.insert(node);
            }
        }
    }
    out.extend(inodes.into_iter().map(Invalidation::Inode));
    out
}

impl DfsFs {
    /// Sends invalidations to the kernel, if there is one.
    pub(super) fn to_kernel(&self, batch: Vec<Invalidation>) {
        if batch.is_empty() {
            return;
        }
        let Some(k) = self.feed.kernel.get() else {
            return;
        };
        if k.backlog() < NOTIFY_QUEUE_MAX {
            k.invalidate(batch);
            return;
        }
        // Not queued: the kernel may keep what this batch drops until a resync.
        if !self.feed.overflow.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                max = NOTIFY_QUEUE_MAX,
                "too many invalidations wait for the kernel; short TTLs, then a resync"
            );
        }
        self.feed.up.store(false, Ordering::Release);
        *self.feed.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Connects the kernel's caches (set once, by the adapter's side, at mount).
    pub fn set_kernel_cache(&self, kernel: Arc<dyn KernelCache>) {
        if self.feed.kernel.set(kernel).is_err() {
            tracing::warn!("the kernel cache was connected twice; keeping the first");
        }
    }

    /// Whether the change feed is healthy (long TTLs).
    pub fn feed_up(&self) -> bool {
        self.feed.up.load(Ordering::Acquire)
    }

    /// Whether the kernel has taken no invalidation for [`NOTIFY_BOUND`] while some wait.
    fn kernel_stalled(&self) -> bool {
        self.feed
            .kernel
            .get()
            .and_then(|k| k.stuck_since())
            .is_some_and(|t| t.elapsed() >= NOTIFY_BOUND)
    }

    /// The kernel stopped taking invalidations: short TTLs (from replies to requests begun
    /// before now on) until it took everything queued.
    fn kernel_fell_behind(&self) {
        if self.feed.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                bound = ?NOTIFY_BOUND,
                "the kernel takes no invalidations; short TTLs until it catches up"
            );
        }
        *self.feed.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Waits until the kernel keeps up: at most 64 batches waiting, and no stall (a stall
    /// marks the feed unhealthy and sets `*behind`; then it waits until the kernel took
    /// everything queued, and the feed is healthy again if it is in sync, `at`, for replies
    /// to requests begun from then on; after an overflow `*at` is cleared instead, for a
    /// resync). False if cancelled.
    async fn until_kernel_keeps_up(
        &self,
        cancel: &CancellationToken,
        at: &mut Option<(u64, u64)>,
        behind: &mut bool,
    ) -> bool {
        loop {
            let backlog = self.feed.kernel.get().map_or(0, |k| k.backlog());
            if self.feed.overflow.load(Ordering::Acquire) {
                self.kernel_fell_behind();
                *behind = true;
            }
            if self.kernel_stalled() {
                self.kernel_fell_behind();
                *behind = true;
            } else if *behind && backlog == 0 {
                *behind = false;
                if self.feed.overflow.swap(false, Ordering::AcqRel) {
                    *at = None;
                } else if at.is_some() {
                    *self.feed.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                    self.feed.up.store(true, Ordering::Release);
                    tracing::info!("the kernel took every invalidation; long TTLs again");
                }
                return true;
            } else if !*behind && backlog <= 64 {
                return true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
        }
    }

    /// Ends when the kernel stalls (checked every [`NOTIFY_CHECK`]).
    async fn kernel_stall(&self) {
        loop {
            tokio::time::sleep(NOTIFY_CHECK).await;
            if self.kernel_stalled() {
                return;
            }
        }
    }

    /// Resynchronisations since the mount started.
    pub fn feed_resyncs(&self) -> u64 {
        self.feed.resyncs.load(Ordering::Relaxed)
    }

    /// How long the kernel and `known` may keep what is heard now: [`FEED_TTL`] while the
    /// feed is healthy, else [`ATTR_TTL`](super::ATTR_TTL).
    pub fn ttl(&self) -> Duration {
        if self.feed_up() {
            FEED_TTL
        } else {
            super::ATTR_TTL
        }
    }

    /// The TTL of a reply to the kernel about `nodes`, for a request that began at `since`:
    /// the long one only if the feed was healthy all along and said none of them changed
    /// meanwhile (the answer may predate that change), else the short one.
    pub fn reply_ttl(&self, since: Instant, nodes: &[NodeId]) -> Duration {
        let lost = *self.feed.lost_at.lock().unwrap_or_else(|p| p.into_inner());
        if !self.feed_up() || lost >= since {
            return super::ATTR_TTL;
        }
        let k = self.known();
        if nodes.iter().any(|n| k.touched_since(*n, since)) {
            super::ATTR_TTL
        } else {
            FEED_TTL
        }
    }

    /// Applies changes heard from the feed: `known` distrusts them and the kernel drops them.
    pub fn apply_changes(&self, changes: &[Change]) {
        if changes.is_empty() {
            return;
        }
        let now = Instant::now();
        let batch = {
            let mut k = self.known();
            let batch = invalidations(&k, changes);
            for c in changes {
                match c.what {
                    ChangeKind::Entry { dir, node } => {
                        for name in k.names_for(dir, node) {
                            k.forget_name(dir, &name);
                        }
                        k.unsure(dir);
                        k.feed_changed(dir, now);
                    }
                    ChangeKind::Node { node } | ChangeKind::Gone { node } => {
                        k.feed_changed(node, now);
                    }
                }
            }
            batch
        };
        self.to_kernel(batch);
    }

    /// The feed is lost (or was never there): short TTLs from now on, and everything this
    /// client holds is dropped, from `known` and from the kernel.
    pub fn feed_lost(&self) {
        self.distrust_all(super::known::FEED_RACE);
    }

    /// Drops everything this client holds (from `known` and the kernel), and distrusts what
    /// is heard for `race` after (see `Known::distrust_all`).
    fn distrust_all(&self, race: Duration) {
        self.feed.up.store(false, Ordering::Release);
        *self.feed.lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.feed.resyncs.fetch_add(1, Ordering::Relaxed);
        let (names, nodes) = self.known().distrust_all(race);
        let mut batch: Vec<Invalidation> = names
            .into_iter()
            .map(|(parent, name)| Invalidation::Entry { parent, name })
            .collect();
        batch.extend(nodes.into_iter().map(Invalidation::Inode));
        self.to_kernel(batch);
    }

    /// Polls the directory's change feed until `cancel`, applying what it hears; after any
    /// failure it drops everything held and subscribes again.
    pub async fn run_feed(self: Arc<Self>, cancel: CancellationToken) {
        let mut at: Option<(u64, u64)> = None;
        let mut retry = RETRY_AFTER;
        let mut behind = false;
        // Until the first subscription no feed position was ever held, so no change was
        // missed: that one drops what is held but distrusts nothing heard after it (a loss
        // does, for `FEED_RACE`: otherwise every namespace op in the mount's first seconds
        // costs one more request).
        let mut subscribed_once = false;
        loop {
            // The kernel takes invalidations on one thread: never run far ahead of it.
            if !self
                .until_kernel_keeps_up(&cancel, &mut at, &mut behind)
                .await
            {
                return;
            }
            let (epoch, after) = match at {
                Some((e, n)) => (Some(e), n),
                None => (None, 0),
            };
            let polled = tokio::select! {
                _ = cancel.cancelled() => return,
                // The poll is dropped (asked again from the same position once the kernel
                // took everything queued).
                _ = self.kernel_stall() => {
                    self.kernel_fell_behind();
                    behind = true;
                    continue;
                }
                r = self.remote.changes(epoch, after, POLL_WAIT) => r,
            };
            match polled {
                Ok(r) if r.resync => {
                    retry = RETRY_AFTER;
                    if at.is_some() {
                        tracing::info!(
                            "change feed restarted or fell behind; dropping cached metadata"
                        );
                    }
                    // Everything is dropped after the position is taken: a change after it
                    // comes in the next poll, one before it is covered by the drop.
                    if subscribed_once {
                        self.feed_lost();
                    } else {
                        self.distrust_all(Duration::ZERO);
                    }
                    subscribed_once = true;
                    at = Some((r.epoch, r.next));
                    self.feed.up.store(true, Ordering::Release);
                }
                Ok(r) => {
                    retry = RETRY_AFTER;
                    self.apply_changes(&r.changes);
                    at = Some((r.epoch, r.next));
                }
                Err(e) => {
                    if self.feed_up() {
                        tracing::warn!(error = %e, "change feed lost; short TTLs until it is back");
                    } else {
                        tracing::debug!(error = %e, "change feed still unreachable");
                    }
                    if self.feed_up() || at.is_some() {
                        self.feed_lost();
                    }
                    // Subscribe again from scratch: a resync tells where the feed is.
                    at = None;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::known::Known;
    use crate::fs::known::tests::meta;
    use common::DirEntry;

    fn change(seq: u64, what: ChangeKind) -> Change {
        Change { seq, what }
    }

    #[test]
    fn a_change_drops_the_names_of_its_node_and_the_attributes_of_both() {
        let mut k = Known::default();
        let now = Instant::now();
        let dir = NodeId(5);
        let start = k.listing_start(dir, now);
        let entries = [
            DirEntry {
                name: "a".into(),
                meta: meta(10),
            },
            DirEntry {
                name: "b".into(),
                meta: meta(11),
            },
        ];
        let dropped = k.listed(dir, &entries, start);
        assert!(dropped.is_empty());
        let changes = [
            change(
                1,
                ChangeKind::Entry {
                    dir,
                    node: NodeId(10),
                },
            ),
            change(1, ChangeKind::Node { node: NodeId(10) }),
            change(
                2,
                ChangeKind::Entry {
                    dir,
                    node: NodeId(11),
                },
            ),
            change(2, ChangeKind::Gone { node: NodeId(11) }),
            change(
                3,
                ChangeKind::Entry {
                    dir,
                    node: NodeId(12),
                },
            ),
        ];
        let mut got = invalidations(&k, &changes);
        got.sort_by_key(|i| format!("{i:?}"));
        let mut want = vec![
            Invalidation::Entry {
                parent: dir,
                name: "a".into(),
            },
            Invalidation::Delete {
                parent: dir,
                child: NodeId(11),
                name: "b".into(),
            },
            Invalidation::Inode(dir),
            Invalidation::Inode(NodeId(10)),
            Invalidation::Inode(NodeId(11)),
        ];
        want.sort_by_key(|i| format!("{i:?}"));
        assert_eq!(got, want, "a new node (12) has no name here to drop");
    }

    #[test]
    fn a_node_the_feed_changed_is_not_fresh_even_if_heard_right_after() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let ttl = FEED_TTL;
        k.remember(&meta(10), Some((NodeId(5), "a")), t0);
        assert!(k.recent(NodeId(10), ttl, t0).is_some());
        k.feed_changed(NodeId(10), t0);
        assert!(k.recent(NodeId(10), ttl, t0).is_none());
        // An answer that arrives just after may have been sent before the change.
        k.remember(&meta(10), None, t0 + Duration::from_millis(5));
        assert!(
            k.recent(NodeId(10), ttl, t0 + Duration::from_millis(5))
                .is_none()
        );
        assert!(k.touched_since(NodeId(10), t0));
        // Long after, an answer is fresh again.
        let later = t0 + super::super::known::FEED_RACE + Duration::from_secs(1);
        k.remember(&meta(10), None, later);
        assert!(k.recent(NodeId(10), ttl, later).is_some());
    }

    #[test]
    fn a_lost_feed_distrusts_everything_known() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let dir = NodeId(5);
        k.made_dir(dir, t0);
        k.remember(&meta(10), Some((dir, "a")), t0);
        assert_eq!(
            k.lookup(dir, "zz", FEED_TTL, t0),
            super::super::known::Lookup::Absent
        );
        let (names, nodes) = k.distrust_all(super::super::known::FEED_RACE);
        assert_eq!(names, vec![(dir, "a".to_owned())]);
        assert_eq!(nodes, vec![NodeId(10)]);
        assert!(k.recent(NodeId(10), FEED_TTL, t0).is_none());
        assert_ne!(
            k.lookup(dir, "zz", FEED_TTL, t0),
            super::super::known::Lookup::Absent,
            "no longer known completely"
        );
        assert!(
            k.meta(NodeId(10)).is_some(),
            "kept for when the directory is down"
        );
    }

    #[test]
    fn a_listing_that_shows_a_name_moved_says_so() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let dir = NodeId(5);
        k.remember(&meta(10), Some((dir, "a")), t0);
        k.remember(&meta(11), Some((dir, "b")), t0);
        let start = k.listing_start(dir, t0);
        let mut dropped = k.listed(
            dir,
            &[DirEntry {
                name: "a".into(),
                meta: meta(12),
            }],
            start,
        );
        dropped.sort();
        assert_eq!(dropped, vec!["a".to_owned(), "b".to_owned()]);
    }
}
