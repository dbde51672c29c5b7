//! The change feed (issue 10): every namespace or content change the directory made, numbered,
//! in a bounded ring that clients long-poll (`GET /v1/changes`) to drop exactly what their
//! kernel caches hold of it. Pure logic, no HTTP: the routes publish after a change is
//! committed and answer polls from here.
//!
//! A change names node ids only (`ChangeKind`), never a name or metadata: the feed is open to
//! every logged-in user, and ids tell no one what a directory they cannot read holds.
//!
//! Changes are published by the metadata store once the transaction that made them is
//! committed (the directory records them in the transaction: `Txn::changed`), never by a
//! route, so a change is published whether or not its request's answer was ever sent. The
//! source of sequence numbers is the store's: on redb the directory process numbers each
//! committed transaction in memory ([`Feed::publish_from`]) and a restart starts a new epoch
//! (clients resynchronise); on etcd every instance feeds its ring from a watch of the
//! prefix's feed key ([`Feed::publish_at`], the revision of the transaction), under an epoch
//! all instances share ([`Feed::shared`]), so a client may poll any of them with the same
//! position.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use common::api::{Change, ChangeKind, ChangesResponse};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How many changes the ring keeps by default: a client that falls further behind than this
/// (about a minute of a busy directory) resynchronises.
pub const DEFAULT_CAPACITY: usize = 65_536;

/// The client a change came from (`x-dfs-origin`, random per client process) and the uid it
/// acted as: its own polls skip it, since that client changed its caches itself when it made
/// the change. Both must match, so no user can hide changes from another by claiming their
/// origin.
pub type Origin = Option<(u128, u32)>;

thread_local! {
    static CURRENT: std::cell::Cell<Origin> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a service call, synchronous) with `origin` as the origin of every change the
/// metadata store commits from this thread meanwhile.
pub fn with_origin<T>(origin: Origin, f: impl FnOnce() -> T) -> T {
    struct Restore(Origin);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(origin)));
    f()
}

/// The origin [`with_origin`] set for this thread (read by the store as a write begins).
pub fn current_origin() -> Origin {
    CURRENT.with(|c| c.get())
}

/// Changes kept in order, with the position of the oldest one dropped.
struct Ring {
    changes: VecDeque<(Change, Origin)>,
    /// Highest sequence number no longer (wholly) kept: a client positioned below it missed
    /// changes.
    floor: u64,
    /// Highest sequence number published.
    head: u64,
}

/// The feed: a ring of recent changes, an epoch and the wake-up of waiting polls.
pub struct Feed {
    /// Changes only when the source's numbering starts over (etcd restored from a snapshot,
    /// or another etcd cluster): every client resynchronises.
    epoch: std::sync::atomic::AtomicU64,
    /// A feed fed by a watch: how long the source may stay silent before the feed is
    /// unhealthy (`None`: never, the feed is this process's own), and when it last spoke.
    health: Mutex<Health>,
    /// Sequence numbers come from a source every instance shares (etcd revisions): a
    /// position ahead of this ring is one it has not heard yet, not a stale one.
    shared: bool,
    capacity: usize,
    ring: Mutex<Ring>,
    head: watch::Sender<u64>,
    closed: CancellationToken,
}

struct Health {
    stall_after: Option<Duration>,
    confirmed: std::time::Instant,
}

impl Default for Feed {
    fn default() -> Self {
        Feed::new(rand::random::<u64>() | 1, DEFAULT_CAPACITY)
    }
}

impl Feed {
    /// A feed of epoch `epoch` keeping the last `capacity` changes (at least one).
    pub fn new(epoch: u64, capacity: usize) -> Self {
        Feed {
            epoch: std::sync::atomic::AtomicU64::new(epoch),
            health: Mutex::new(Health {
                stall_after: None,
                confirmed: std::time::Instant::now(),
            }),
            shared: false,
            capacity: capacity.max(1),
            ring: Mutex::new(Ring {
                changes: VecDeque::new(),
                floor: 0,
                head: 0,
            }),
            head: watch::Sender::new(0),
            closed: CancellationToken::new(),
        }
    }

    /// A feed whose sequence numbers are etcd revisions, under an epoch every instance on
    /// the same prefix computes alike: a poll ahead of this ring waits for it to catch up
    /// instead of resynchronising.
    pub fn shared(epoch: u64, capacity: usize) -> Self {
        Feed {
            shared: true,
            ..Feed::new(epoch, capacity)
        }
    }

    /// The highest sequence number no longer (wholly) kept: positions from it on are served.
    pub fn floor(&self) -> u64 {
        self.ring().floor
    }

    /// The highest sequence number published.
    pub fn head(&self) -> u64 {
        self.ring().head
    }

    /// Forgets every change kept and moves the floor to `floor`: a client positioned below
    /// it resynchronises (the source lost changes, e.g. a watch restarted after etcd
    /// compacted what it had not delivered).
    pub fn reset(&self, floor: u64) {
        let mut ring = self.ring();
        ring.changes.clear();
        ring.floor = floor;
        ring.head = ring.head.max(floor);
        let head = ring.head;
        drop(ring);
        self.head.send_replace(head);
    }

    /// Starts the numbering over: a new epoch, nothing kept, floor and head at `at` (the
    /// source's numbering went back, e.g. etcd restored from a snapshot). Every client
    /// resynchronises, waiting polls at once.
    pub fn restart(&self, epoch: u64, at: u64) {
        let mut ring = self.ring();
        self.epoch.store(epoch, std::sync::atomic::Ordering::SeqCst);
        ring.changes.clear();
        ring.floor = at;
        ring.head = at;
        drop(ring);
        self.head.send_replace(at);
    }

    /// Makes the feed unhealthy whenever its source was not heard from (`confirm`) for
    /// `stall_after`: a watch whose etcd member lost quorum, or whose stream went silent,
    /// must not let clients take "nothing yet" for "nothing changed".
    pub fn watched(&self, stall_after: Duration) {
        let mut h = self.health();
        h.stall_after = Some(stall_after);
        h.confirmed = std::time::Instant::now();
    }

    /// The source is heard from: everything up to now is delivered (a watch's event or
    /// progress notification).
    pub fn confirm(&self) {
        self.health().confirmed = std::time::Instant::now();
    }

    /// Whether the feed is complete as of a moment ago: its source was heard from within its
    /// stall bound (always, for a feed of this process's own writes).
    pub fn healthy(&self) -> bool {
        self.stall_in().is_none_or(|left| !left.is_zero())
    }

    /// How long until the feed stalls if its source says nothing (`None`: never).
    fn stall_in(&self) -> Option<Duration> {
        let h = self.health();
        h.stall_after
            .map(|d| d.saturating_sub(h.confirmed.elapsed()))
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the feed was closed (its service stopped).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Resolves when the feed is closed.
    pub async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// This feed's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ends every poll waiting now or later at once (the service is stopping: a long poll must
    /// not hold its graceful shutdown).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Closes `self` when `cancel` fires (call within a runtime).
    pub fn close_when(self: &std::sync::Arc<Self>, cancel: CancellationToken) {
        let f = self.clone();
        tokio::spawn(async move {
            cancel.cancelled().await;
            f.close();
        });
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the changes of one operation under the next sequence number (called once the
    /// operation is committed).
    pub fn publish(&self, what: impl IntoIterator<Item = ChangeKind>) {
        self.publish_from(None, what);
    }

    /// [`publish`](Self::publish) for a change made at the request of client `origin`.
    pub fn publish_from(&self, origin: Origin, what: impl IntoIterator<Item = ChangeKind>) {
        let mut ring = self.ring();
        let seq = ring.head + 1;
        self.push(&mut ring, seq, origin, what);
    }

    /// Publishes changes under sequence number `seq` (an etcd revision), which must be above
    /// every one published before; a lower one is ignored and false returned (a watch that
    /// delivers an event twice).
    pub fn publish_at(&self, seq: u64, what: impl IntoIterator<Item = ChangeKind>) -> bool {
        self.publish_at_from(seq, None, what)
    }

    /// [`publish_at`](Self::publish_at) for a change made at the request of client `origin`.
    pub fn publish_at_from(
        &self,
        seq: u64,
        origin: Origin,
        what: impl IntoIterator<Item = ChangeKind>,
    ) -> bool {
        let mut ring = self.ring();
        if seq <= ring.head {
            return false;
        }
        self.push(&mut ring, seq, origin, what);
        true
    }

    fn push(
        &self,
        ring: &mut Ring,
        seq: u64,
        origin: Origin,
        what: impl IntoIterator<Item = ChangeKind>,
    ) {
        let mut any = false;
        for what in what {
            ring.changes.push_back((Change { seq, what }, origin));
            any = true;
        }
        if !any {
            return;
        }
        ring.head = seq;
        while ring.changes.len() > self.capacity {
            if let Some((old, _)) = ring.changes.pop_front() {
                ring.floor = old.seq;
            }
        }
        self.head.send_replace(seq);
    }

    /// The changes after `after` for a client at `epoch`, at most `max` (never cutting one
    /// sequence number's changes apart), leaving out those client `me` made; `resync` when
    /// the epoch is not this one, when `after` is ahead of the feed, or when changes after it
    /// were dropped from the ring.
    pub fn read(&self, epoch: Option<u64>, after: u64, max: usize, me: Origin) -> ChangesResponse {
        let ring = self.ring();
        // Read under the ring's lock, as `restart` changes it.
        let current = self.epoch();
        let resync = |next| ChangesResponse {
            epoch: current,
            resync: true,
            changes: Vec::new(),
            next,
        };
        if epoch != Some(current) || after < ring.floor {
            return resync(ring.head);
        }
        if after > ring.head {
            if !self.shared {
                return resync(ring.head);
            }
            // Another instance numbered this position: this one has not heard that far yet.
            return ChangesResponse {
                epoch: current,
                resync: false,
                changes: Vec::new(),
                next: after,
            };
        }
        let start = ring.changes.partition_point(|(c, _)| c.seq <= after);
        let mut changes: Vec<Change> = Vec::new();
        let mut next = after;
        for (c, origin) in ring.changes.range(start..) {
            if changes.len() >= max.max(1) && next != c.seq {
                break;
            }
            next = c.seq;
            if me.is_none() || *origin != me {
                changes.push(*c);
            }
        }
        ChangesResponse {
            epoch: current,
            resync: false,
            changes,
            next,
        }
    }

    /// [`read`](Self::read), waiting up to `wait` for a change when there is none yet: answers
    /// at once when there are changes (or a resync), when one is published, when `wait` ends
    /// (with none), when the feed is closed, or when it stalls (its caller checks
    /// [`healthy`](Self::healthy) after). Changes the poller made itself (`me`) do not
    /// end the wait: the wait goes on past them, and the answer that ends it carries the
    /// position after them. Otherwise every namespace change of a client would cost that client
    /// a poll answer and a new poll (two more HTTP exchanges per operation) for nothing.
    pub async fn wait(
        &self,
        epoch: Option<u64>,
        after: u64,
        max: usize,
        me: Origin,
        wait: Duration,
    ) -> ChangesResponse {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.head.subscribe();
        let mut at = after;
        loop {
            // Subscribed (or marked seen) before reading: a change published after the read
            // wakes the wait below.
            rx.borrow_and_update();
            let r = self.read(epoch, at, max, me);
            if r.resync || !r.changes.is_empty() || self.closed.is_cancelled() || !self.healthy() {
                return r;
            }
            // Nothing, or only the poller's own changes: read on from past them (a ring that
            // drops them meanwhile then costs no resync), answering `r.next` if nothing else
            // comes.
            at = r.next;
            // Looked at again when the feed would stall (a confirmation meanwhile moves it on).
            let stall = self.stall_in();
            tokio::select! {
                _ = tokio::time::sleep(stall.unwrap_or(wait)) => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        return r;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return r,
                _ = self.closed.cancelled() => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::NodeId;
    use std::sync::Arc;

    fn node(n: u64) -> ChangeKind {
        ChangeKind::Node { node: NodeId(n) }
    }

    fn nodes(r: &ChangesResponse) -> Vec<(u64, ChangeKind)> {
        r.changes.iter().map(|c| (c.seq, c.what)).collect()
    }

    #[test]
    fn changes_come_in_order_after_the_position_asked() {
        let f = Feed::new(7, 100);
        f.publish([node(1)]);
        f.publish([
            ChangeKind::Entry {
                dir: NodeId(1),
                node: NodeId(2),
            },
            ChangeKind::Gone { node: NodeId(2) },
        ]);
        f.publish([node(3)]);
        let r = f.read(Some(7), 0, 100, None);
        assert!(!r.resync);
        assert_eq!(
            nodes(&r),
            vec![
                (1, node(1)),
                (
                    2,
                    ChangeKind::Entry {
                        dir: NodeId(1),
                        node: NodeId(2)
                    }
                ),
                (2, ChangeKind::Gone { node: NodeId(2) }),
                (3, node(3)),
            ],
            "one operation, one sequence number"
        );
        assert_eq!(r.next, 3);
        let r = f.read(Some(7), 2, 100, None);
        assert_eq!(nodes(&r), vec![(3, node(3))]);
        let r = f.read(Some(7), 3, 100, None);
        assert!(!r.resync && r.changes.is_empty());
        assert_eq!(r.next, 3, "nothing new: the same position");
    }

    #[test]
    fn an_answer_is_bounded_but_never_splits_an_operation() {
        let f = Feed::new(1, 1000);
        for i in 0..10 {
            f.publish([node(i)]);
        }
        f.publish([node(100), node(101), node(102)]);
        let r = f.read(Some(1), 0, 4, None);
        assert_eq!(r.changes.len(), 4);
        assert_eq!(r.next, 4);
        let r = f.read(Some(1), 9, 1, None);
        assert_eq!(r.changes.len(), 1);
        let r = f.read(Some(1), 10, 1, None);
        assert_eq!(r.changes.len(), 3, "the three changes of seq 11 together");
        assert_eq!(r.next, 11);
    }

    #[test]
    fn a_client_resyncs_on_another_epoch_a_first_poll_a_future_position_or_a_gap() {
        let f = Feed::new(5, 4);
        f.publish([node(1)]);
        f.publish([node(2)]);
        assert!(f.read(None, 0, 10, None).resync, "first poll");
        assert_eq!(f.read(None, 0, 10, None).next, 2, "told where the feed is");
        assert!(f.read(Some(6), 0, 10, None).resync, "another epoch");
        assert!(f.read(Some(5), 3, 10, None).resync, "ahead of the feed");
        assert!(!f.read(Some(5), 0, 10, None).resync);
        for i in 3..=6 {
            f.publish([node(i)]);
        }
        // Ring of 4: seqs 3..=6 kept, 1 and 2 dropped.
        let r = f.read(Some(5), 1, 10, None);
        assert!(r.resync, "changes after 1 (seq 2) were dropped");
        assert_eq!(r.next, 6);
        let r = f.read(Some(5), 2, 10, None);
        assert!(!r.resync, "everything after 2 is still kept");
        assert_eq!(r.changes.len(), 4);
    }

    #[test]
    fn an_operation_partly_dropped_from_the_ring_makes_its_readers_resync() {
        let f = Feed::new(5, 3);
        f.publish([node(1)]);
        f.publish([node(2), node(3), node(4)]);
        assert!(f.read(Some(5), 0, 10, None).resync, "seq 1 dropped");
        f.publish([node(5)]);
        // One change of seq 2 was dropped to make room.
        assert!(f.read(Some(5), 1, 10, None).resync);
        assert_eq!(f.read(Some(5), 2, 10, None).changes.len(), 1);
    }

    #[test]
    fn publish_at_takes_only_growing_positions() {
        let f = Feed::new(9, 10);
        assert!(f.publish_at(100, [node(1)]));
        assert!(!f.publish_at(100, [node(2)]), "a repeated revision");
        assert!(!f.publish_at(50, [node(2)]));
        assert!(f.publish_at(105, [node(3)]));
        let r = f.read(Some(9), 100, 10, None);
        assert_eq!(nodes(&r), vec![(105, node(3))]);
        assert!(
            !f.read(Some(9), 101, 10, None).resync,
            "a gap in revisions is no loss"
        );
        f.publish([]);
        assert_eq!(
            f.read(None, 0, 10, None).next,
            105,
            "an empty publish is nothing"
        );
    }

    #[test]
    fn a_client_is_not_told_its_own_changes_but_moves_past_them() {
        let f = Feed::new(2, 100);
        f.publish_from(Some((1, 10)), [node(1)]);
        f.publish_from(Some((2, 10)), [node(2)]);
        f.publish([node(3)]);
        let r = f.read(Some(2), 0, 100, Some((1, 10)));
        assert_eq!(nodes(&r), vec![(2, node(2)), (3, node(3))]);
        let r = f.read(Some(2), 0, 100, Some((2, 10)));
        assert_eq!(nodes(&r), vec![(1, node(1)), (3, node(3))]);
        f.publish_from(Some((2, 10)), [node(4)]);
        let r = f.read(Some(2), 3, 1, Some((2, 10)));
        assert!(r.changes.is_empty());
        assert_eq!(r.next, 4, "past its own change");
        assert_eq!(f.read(Some(2), 0, 100, None).changes.len(), 4);
    }

    #[test]
    fn another_user_claiming_a_clients_origin_still_hears_its_changes() {
        let f = Feed::new(2, 100);
        f.publish_from(Some((7, 1000)), [node(1)]);
        // uid 1001 sends the origin of uid 1000's client: the change is not hidden from it.
        assert_eq!(f.read(Some(2), 0, 100, Some((7, 1001))).changes.len(), 1);
        assert!(f.read(Some(2), 0, 100, Some((7, 1000))).changes.is_empty());
    }

    #[test]
    fn a_restart_starts_a_new_numbering_below_the_old_one_and_every_client_resyncs() {
        let f = Feed::shared(9, 100);
        assert!(f.publish_at(500, [node(1)]));
        f.restart(11, 200);
        assert_eq!((f.epoch(), f.floor(), f.head()), (11, 200, 200));
        // A client of the old numbering resyncs, at the new head, whatever its position.
        for after in [0, 200, 500, 900] {
            let r = f.read(Some(9), after, 10, None);
            assert!(r.resync && r.epoch == 11 && r.next == 200, "{r:?}");
        }
        // Revisions below the old head are taken again.
        assert!(f.publish_at(201, [node(2)]));
        assert_eq!(
            nodes(&f.read(Some(11), 200, 10, None)),
            vec![(201, node(2))]
        );
    }

    #[test]
    fn a_watched_feed_is_unhealthy_once_its_source_is_silent_past_the_bound() {
        let f = Feed::shared(9, 100);
        assert!(f.healthy(), "a feed not watched never stalls");
        f.watched(Duration::from_millis(50));
        assert!(f.healthy());
        std::thread::sleep(Duration::from_millis(80));
        assert!(!f.healthy());
        f.confirm();
        assert!(f.healthy());
    }

    #[test]
    fn a_shared_feed_waits_for_a_position_it_has_not_reached_and_a_reset_resyncs() {
        let f = Feed::shared(9, 100);
        f.publish_at(10, [node(1)]);
        // Another instance already numbered 20: not a resync, nothing yet.
        let r = f.read(Some(9), 20, 100, None);
        assert!(!r.resync && r.changes.is_empty() && r.next == 20);
        f.publish_at(21, [node(2)]);
        assert_eq!(nodes(&f.read(Some(9), 20, 100, None)), vec![(21, node(2))]);
        // A local feed (redb) has no other instance: a position ahead of it is stale.
        let local = Feed::new(9, 100);
        assert!(local.read(Some(9), 20, 100, None).resync);
        // The source lost changes up to 30: clients behind it resynchronise.
        f.reset(30);
        assert!(f.read(Some(9), 21, 100, None).resync);
        assert!(!f.read(Some(9), 30, 100, None).resync);
        assert!(
            !f.publish_at(30, [node(3)]),
            "nothing at or below the floor"
        );
        assert!(f.publish_at(31, [node(3)]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_answers_at_once_with_changes_and_waits_without() {
        let f = Arc::new(Feed::new(3, 10));
        f.publish([node(1)]);
        let t0 = tokio::time::Instant::now();
        let r = f.wait(Some(3), 0, 10, None, Duration::from_secs(30)).await;
        assert_eq!(r.changes.len(), 1);
        assert_eq!(t0.elapsed(), Duration::ZERO, "answered at once");

        let poll = tokio::spawn({
            let f = f.clone();
            async move { f.wait(Some(3), 1, 10, None, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!poll.is_finished(), "nothing new: waiting");
        f.publish([node(2)]);
        let r = poll.await.expect("poll task");
        assert_eq!(nodes(&r), vec![(2, node(2))], "woken by the publish");
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_is_not_woken_by_its_own_changes_but_answers_past_them() {
        let f = Arc::new(Feed::new(3, 4));
        let me = Some((7, 10));
        let t0 = tokio::time::Instant::now();
        let poll = tokio::spawn({
            let f = f.clone();
            async move { f.wait(Some(3), 0, 10, me, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        // More of its own changes than the ring holds: the wait moved past them as they came.
        for n in 1..=6 {
            f.publish_from(me, [node(n)]);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !poll.is_finished(),
            "its own changes do not answer the poll"
        );
        f.publish([node(9)]);
        let r = poll.await.expect("poll task");
        assert!(!r.resync, "{r:?}");
        assert_eq!(nodes(&r), vec![(7, node(9))], "only the other's change");
        assert!(t0.elapsed() < Duration::from_secs(3));

        // With nothing else, the deadline's answer moves the poller past its own changes.
        f.publish_from(me, [node(10)]);
        let t1 = tokio::time::Instant::now();
        let r = f.wait(Some(3), 7, 10, me, Duration::from_secs(5)).await;
        assert!(!r.resync && r.changes.is_empty());
        assert_eq!(r.next, 8);
        assert_eq!(
            t1.elapsed(),
            Duration::from_secs(5),
            "waited for another's change"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_poll_without_changes_ends_at_its_deadline_or_when_closed() {
        let f = Arc::new(Feed::new(3, 10));
        let t0 = tokio::time::Instant::now();
        let r = f.wait(Some(3), 0, 10, None, Duration::from_secs(5)).await;
        assert!(!r.resync && r.changes.is_empty());
        assert_eq!(r.next, 0);
        assert_eq!(t0.elapsed(), Duration::from_secs(5));

        let poll = tokio::spawn({
            let f = f.clone();
            async move { f.wait(Some(3), 0, 10, None, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        f.close();
        let r = poll.await.expect("poll task");
        assert!(r.changes.is_empty());
        assert!(
            t0.elapsed() < Duration::from_secs(7),
            "closing ends the wait"
        );
        let r = f.wait(Some(3), 0, 10, None, Duration::from_secs(30)).await;
        assert!(r.changes.is_empty(), "a closed feed never waits");
        assert!(t0.elapsed() < Duration::from_secs(7));
    }
}
