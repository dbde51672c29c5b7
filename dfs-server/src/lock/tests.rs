//! The lock service's tests. Those under `both!` run on each engine: the in-memory one with
//! short leases, the etcd one (the test binary's throwaway etcd, a key prefix per test) with
//! real leases of 2 s or more (etcd's shortest). Paused-clock tests are for the in-memory
//! engine only (etcd's clock cannot be paused); the etcd-only tests follow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::{AcquireResponse, AppLockResponse, LockOwner, WaiterId};
use common::{FenceToken, NodeId};

use super::*;
use crate::error::ServiceError;

fn wid(n: u8) -> WaiterId {
    WaiterId::from_bytes([n; 16])
}

fn owner(session: u8, owner: u64) -> LockOwner {
    LockOwner {
        session: common::UploadId::from_bytes([session; 16]),
        owner,
    }
}

fn fence(r: &AcquireResponse) -> FenceToken {
    match r {
        AcquireResponse::Granted(g) => g.fence,
        AcquireResponse::Queued { .. } => panic!("expected a grant, got {r:?}"),
    }
}

fn granted(r: &AppLockResponse) -> bool {
    matches!(r, AppLockResponse::Granted { .. })
}

/// Where a test's locks live; `open` may be called again for a restart or another instance.
struct Fixture {
    dir: Option<tempfile::TempDir>,
    etcd: Option<EtcdConfig>,
    lease: Duration,
}

impl Fixture {
    fn local(lease_ms: u64) -> Self {
        Fixture {
            dir: Some(tempfile::tempdir().expect("tempdir")),
            etcd: None,
            lease: Duration::from_millis(lease_ms),
        }
    }

    fn etcd(lease_ms: u64) -> Self {
        let etcd = crate::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
        let prefix = format!("locks-unit/{:016x}", rand::random::<u64>());
        Fixture {
            dir: None,
            etcd: Some(EtcdConfig::parse(&etcd.meta_url(&prefix)).expect("url")),
            lease: Duration::from_millis(lease_ms),
        }
    }

    fn on(members: &[crate::testing::EtcdServer], lease_ms: u64) -> Self {
        let hosts: Vec<&str> = members.iter().map(|m| m.endpoint.as_str()).collect();
        let url = format!("etcd://{}/three", hosts.join(","));
        Fixture {
            dir: None,
            etcd: Some(EtcdConfig::parse(&url).expect("url")),
            lease: Duration::from_millis(lease_ms),
        }
    }

    /// Two instances on this fixture's store (the in-memory engine has one: twice the same).
    async fn pair(&self) -> (Arc<LockService>, Arc<LockService>) {
        let one = self.open().await;
        let two = if self.etcd.is_some() {
            self.open().await
        } else {
            one.clone()
        };
        (one, two)
    }

    /// A service (a new instance, or the same one restarted) on this fixture's store.
    async fn open(&self) -> Arc<LockService> {
        let config = LockConfig {
            lease: self.lease,
            max_wait: Duration::from_secs(10),
        };
        let svc = match (&self.dir, &self.etcd) {
            (Some(dir), _) => LockService::open(dir.path(), config, "test-key"),
            (None, Some(etcd)) => LockService::connect_etcd(etcd, config, "test-key").await,
            (None, None) => unreachable!("a fixture has a store"),
        };
        Arc::new(svc.expect("open"))
    }
}

/// A test body run on each engine: `name::local` and `name::etcd`.
macro_rules! both {
    ($name:ident, $local_lease_ms:expr, $etcd_lease_ms:expr) => {
        mod $name {
            #[tokio::test]
            async fn local() {
                super::$name(super::Fixture::local($local_lease_ms)).await
            }
            #[tokio::test]
            async fn etcd() {
                super::$name(super::Fixture::etcd($etcd_lease_ms)).await
            }
        }
    };
}

both!(
    waiters_are_granted_in_fifo_order_with_growing_fences,
    5_000,
    5_000
);
async fn waiters_are_granted_in_fifo_order_with_growing_fences(f: Fixture) {
    let s = f.open().await;
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
            matches!(r, AcquireResponse::Queued { position } if position == u64::from(n - 1)),
            "{r:?}"
        );
    }
    let (s2, s3) = (s.clone(), s.clone());
    let t3 =
        tokio::spawn(async move { s3.acquire(node, &wid(3), "c", Duration::from_secs(5)).await });
    let t2 =
        tokio::spawn(async move { s2.acquire(node, &wid(2), "b", Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!t2.is_finished() && !t3.is_finished());
    s.release(node, &wid(1)).await.expect("release");
    let f2 = fence(&t2.await.expect("join").expect("acquire 2"));
    assert!(f2 > f1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!t3.is_finished(), "3 must wait for 2");
    s.release(node, &wid(2)).await.expect("release");
    let f3 = fence(&t3.await.expect("join").expect("acquire 3"));
    assert!(f3 > f2);
}

both!(unrenewed_lease_passes_the_lock_on, 200, 2_000);
async fn unrenewed_lease_passes_the_lock_on(f: Fixture) {
    let s = f.open().await;
    let node = NodeId(9);
    fence(
        &s.acquire(node, &wid(1), "crashed", Duration::ZERO)
            .await
            .expect("acquire"),
    );
    let start = Instant::now();
    let r = s
        .acquire(node, &wid(2), "next", Duration::from_secs(10))
        .await
        .expect("acquire");
    fence(&r);
    let took = start.elapsed();
    assert!(took >= f.lease * 3 / 4, "{took:?}");
    // etcd checks for expired leases every 0.5 s.
    assert!(took <= f.lease + Duration::from_millis(1_500), "{took:?}");
    assert!(matches!(
        s.renew(node, &wid(1)).await,
        Err(ServiceError::NotHolder(_))
    ));
    s.renew(node, &wid(2)).await.expect("holder renews");
}

both!(restarted_service_never_reissues_a_fence, 1_000, 2_000);
async fn restarted_service_never_reissues_a_fence(f: Fixture) {
    let before = {
        let s = f.open().await;
        fence(
            &s.acquire(NodeId(1), &wid(1), "a", Duration::ZERO)
                .await
                .expect("acquire"),
        )
    };
    let s = f.open().await;
    // On etcd the first waiter's key outlives the instance: it goes first.
    s.release(NodeId(1), &wid(1)).await.expect("release");
    let after = fence(
        &s.acquire(NodeId(1), &wid(2), "b", Duration::ZERO)
            .await
            .expect("acquire"),
    );
    assert!(after > before, "{after} must exceed {before}");
}

both!(status_lists_holder_and_queue, 5_000, 5_000);
async fn status_lists_holder_and_queue(f: Fixture) {
    let s = f.open().await;
    let g = fence(
        &s.acquire(NodeId(4), &wid(1), "alice", Duration::ZERO)
            .await
            .expect("acquire"),
    );
    s.acquire(NodeId(4), &wid(2), "bob", Duration::ZERO)
        .await
        .expect("queue");
    let st = s.status().await.expect("status");
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].node, NodeId(4));
    assert_eq!(st[0].holder.as_deref(), Some("alice"));
    assert_eq!(st[0].fence, Some(g));
    assert_eq!(st[0].queued, 1);
}

const N: NodeId = NodeId(7);
const NOW: Duration = Duration::ZERO;
const LONG: Duration = Duration::from_secs(5);

both!(shared_locks_share_and_exclusive_ones_exclude, 500, 2_000);
async fn shared_locks_share_and_exclusive_ones_exclude(f: Fixture) {
    let l = f.open().await;
    let lock = |o: LockOwner, shared: bool, u: &'static str| {
        let l = l.clone();
        async move { l.app_lock(N, &o, shared, u, NOW).await.expect("lock") }
    };
    assert!(granted(&lock(owner(1, 1), true, "a").await));
    assert!(granted(&lock(owner(2, 1), true, "b").await));
    assert_eq!(lock(owner(3, 1), false, "c").await, AppLockResponse::Busy);
    let conflict = l.app_test(N, &owner(3, 1), false).await.expect("test");
    assert_eq!(conflict.map(|c| c.shared), Some(true));
    assert!(
        l.app_test(N, &owner(3, 1), true)
            .await
            .expect("test")
            .is_none()
    );
    l.app_unlock(N, &owner(1, 1)).await.expect("unlock");
    l.app_unlock(N, &owner(2, 1)).await.expect("unlock");
    assert!(granted(&lock(owner(3, 1), false, "c").await));
    assert_eq!(
        lock(owner(1, 1), true, "a").await,
        AppLockResponse::Busy,
        "a refused non-blocking request keeps no place"
    );
    let c = l.app_test(N, &owner(1, 1), true).await.expect("test");
    assert_eq!(c.map(|c| (c.shared, c.user)), Some((false, "c".to_owned())));
    l.app_unlock(N, &owner(3, 1)).await.expect("unlock");
    assert!(l.app_idle(N).await.expect("idle"));
}

both!(
    a_waiter_is_woken_when_the_holder_unlocks_and_nobody_overtakes_it,
    500,
    2_000
);
async fn a_waiter_is_woken_when_the_holder_unlocks_and_nobody_overtakes_it(f: Fixture) {
    let l = f.open().await;
    l.app_lock(N, &owner(1, 1), false, "a", NOW)
        .await
        .expect("lock");
    let waiting = {
        let l = l.clone();
        tokio::spawn(async move { l.app_lock(N, &owner(2, 1), false, "b", LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A shared request behind a waiting exclusive one does not overtake it.
    let late = {
        let l = l.clone();
        tokio::spawn(async move { l.app_lock(N, &owner(3, 1), true, "c", LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished() && !late.is_finished());
    let t = Instant::now();
    l.app_unlock(N, &owner(1, 1)).await.expect("unlock");
    let r = waiting.await.expect("join").expect("lock");
    assert!(granted(&r), "{r:?}");
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "woken, not polled: {:?}",
        t.elapsed()
    );
    assert!(!late.is_finished());
    l.app_unlock(N, &owner(2, 1)).await.expect("unlock");
    assert!(granted(&late.await.expect("join").expect("lock")));
}

both!(
    regression_an_upgrade_waits_for_the_other_readers_and_a_downgrade_is_at_once,
    500,
    2_000
);
async fn regression_an_upgrade_waits_for_the_other_readers_and_a_downgrade_is_at_once(f: Fixture) {
    let l = f.open().await;
    let lock = |o: LockOwner, shared: bool| {
        let l = l.clone();
        async move { l.app_lock(N, &o, shared, "u", NOW).await.expect("lock") }
    };
    assert!(granted(&lock(owner(1, 1), true).await));
    assert!(granted(&lock(owner(2, 1), true).await));
    // Another reader holds it: no exclusive lock, and a's shared one stays.
    assert_eq!(lock(owner(1, 1), false).await, AppLockResponse::Busy);
    assert_eq!(
        l.app_test(N, &owner(3, 1), true).await.expect("test"),
        None,
        "both still read"
    );
    l.app_unlock(N, &owner(2, 1)).await.expect("unlock");
    assert!(granted(&lock(owner(1, 1), false).await));
    assert!(
        l.app_test(N, &owner(3, 1), true)
            .await
            .expect("test")
            .is_some(),
        "now exclusive"
    );
    // Down to shared, at once: another reader gets in.
    assert!(granted(&lock(owner(1, 1), true).await));
    assert!(granted(&lock(owner(3, 1), true).await));
}

both!(
    a_waiter_that_gave_up_is_not_queued_again_by_its_pending_request,
    500,
    2_000
);
async fn a_waiter_that_gave_up_is_not_queued_again_by_its_pending_request(f: Fixture) {
    let l = f.open().await;
    l.app_lock(N, &owner(1, 1), false, "a", NOW)
        .await
        .expect("lock");
    // Bob's blocking request waits here; bob gives up (Ctrl-C) and unlocks, but the
    // request itself goes on waiting (its connection is not noticed to be gone).
    let ghost = {
        let l = l.clone();
        tokio::spawn(async move { l.app_lock(N, &owner(2, 1), false, "b", LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    l.app_unlock(N, &owner(2, 1)).await.expect("unlock");
    assert_eq!(
        ghost.await.expect("join").expect("lock"),
        AppLockResponse::Busy
    );
    l.app_unlock(N, &owner(1, 1)).await.expect("unlock");
    assert!(l.app_idle(N).await.expect("idle"), "nobody holds or waits");
}

both!(
    a_dead_clients_locks_go_with_its_lease_and_renewal_keeps_them,
    500,
    2_000
);
async fn a_dead_clients_locks_go_with_its_lease_and_renewal_keeps_them(f: Fixture) {
    let l = f.open().await;
    let lock = |node: NodeId, o: LockOwner| {
        let l = l.clone();
        async move { l.app_lock(node, &o, false, "u", NOW).await.expect("lock") }
    };
    assert!(granted(&lock(N, owner(1, 1)).await));
    assert!(granted(&lock(NodeId(8), owner(2, 1)).await));
    // Session 2 also had a lock whose unlock was lost: it no longer names it.
    assert!(granted(&lock(NodeId(9), owner(2, 2)).await));
    for _ in 0..4 {
        tokio::time::sleep(f.lease * 2 / 5).await;
        let held = l
            .app_renew(&owner(2, 0).session, &[(NodeId(8), 1)])
            .await
            .expect("renew");
        assert_eq!(held, 1);
    }
    assert!(granted(&lock(NodeId(9), owner(3, 1)).await));
    // Session 1 stopped renewing: its lock is gone; session 2's is still held.
    assert!(granted(&lock(N, owner(3, 1)).await));
    assert_eq!(lock(NodeId(8), owner(3, 1)).await, AppLockResponse::Busy);
}

// etcd: a lease long enough that taking 150 locks on a loaded machine never outlasts it
// before the first renewal.
both!(a_renewal_of_many_locks_keeps_every_one, 500, 6_000);
async fn a_renewal_of_many_locks_keeps_every_one(f: Fixture) {
    use futures_util::StreamExt;
    let l = f.open().await;
    // More locks than one read of the etcd engine's renewal takes (64), taken 16 at once.
    let held: Vec<(NodeId, u64)> = (0..150).map(|i| (NodeId(1000 + i), 1)).collect();
    let l = &l;
    let taken: Vec<_> = futures_util::stream::iter(&held)
        .map(|(node, o)| async move { l.app_lock(*node, &owner(5, *o), false, "u", NOW).await })
        .buffer_unordered(16)
        .collect()
        .await;
    for r in taken {
        assert!(granted(&r.expect("lock")));
    }
    for _ in 0..3 {
        tokio::time::sleep(f.lease * 2 / 5).await;
        let kept = l
            .app_renew(&owner(5, 0).session, &held)
            .await
            .expect("renew");
        assert_eq!(kept, 150);
    }
    // Past a lease since they were taken: all still held.
    for (node, _) in held.iter().step_by(37) {
        let r = l.app_lock(*node, &owner(6, 1), false, "v", NOW).await;
        assert_eq!(r.expect("try"), AppLockResponse::Busy);
    }
}

// ---- the in-memory engine only ----

/// Leases are decided on tokio's clock, which tests pause and advance: a 10 s lease runs
/// out exactly at 10 s, in a test that takes milliseconds.
#[tokio::test(start_paused = true)]
async fn a_lease_runs_out_exactly_on_the_injected_clock() {
    let f = Fixture::local(10_000);
    let s = f.open().await;
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
    s.renew(node, &wid(1)).await.expect("renewed in time");
    tokio::time::advance(Duration::from_millis(9_999)).await;
    s.renew(node, &wid(1)).await.expect("renewed in time again");
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
        s.renew(node, &wid(1)).await,
        Err(ServiceError::NotHolder(_))
    ));
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

// ---- the etcd engine only ----

#[tokio::test]
async fn etcd_queue_order_is_create_revision_order_across_two_instances() {
    let f = Fixture::etcd(5_000);
    let (a, b) = (f.open().await, f.open().await);
    let node = NodeId(21);
    let g1 = fence(&a.acquire(node, &wid(1), "one", NOW).await.expect("acquire"));
    // 2 joins through b, then 3 through a: 2 is ahead of 3 whichever instance asks.
    b.acquire(node, &wid(2), "two", NOW).await.expect("queue");
    a.acquire(node, &wid(3), "three", NOW).await.expect("queue");
    let r = b.acquire(node, &wid(3), "three", NOW).await.expect("poll");
    assert!(
        matches!(r, AcquireResponse::Queued { position: 2 }),
        "{r:?}"
    );
    let w3 = {
        let b = b.clone();
        tokio::spawn(async move { b.acquire(node, &wid(3), "three", LONG).await })
    };
    let w2 = {
        let a = a.clone();
        tokio::spawn(async move { a.acquire(node, &wid(2), "two", LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.release(node, &wid(1))
        .await
        .expect("release through the other instance");
    let g2 = fence(&w2.await.expect("join").expect("acquire"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!w3.is_finished(), "3 waits for 2");
    assert_eq!(
        b.renew(node, &wid(2))
            .await
            .expect("renew on the other")
            .fence,
        g2
    );
    a.release(node, &wid(2)).await.expect("release");
    let g3 = fence(&w3.await.expect("join").expect("acquire"));
    assert!(g1 < g2 && g2 < g3, "{g1} {g2} {g3}");
}

#[tokio::test]
async fn etcd_a_holder_that_stops_renewing_loses_the_lock_within_its_lease() {
    let f = Fixture::etcd(2_000);
    let (a, b) = (f.open().await, f.open().await);
    let node = NodeId(22);
    fence(
        &a.acquire(node, &wid(1), "dead", NOW)
            .await
            .expect("acquire"),
    );
    // The holder renews for a while (through either instance), then stops.
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let s = if i % 2 == 0 { &a } else { &b };
        s.renew(node, &wid(1)).await.expect("renew");
    }
    let stopped = Instant::now();
    let r = b
        .acquire(node, &wid(2), "next", Duration::from_secs(10))
        .await
        .expect("acquire");
    fence(&r);
    let took = stopped.elapsed();
    assert!(took >= Duration::from_millis(1_500), "{took:?}");
    assert!(took <= Duration::from_millis(3_500), "{took:?}");
}

#[tokio::test]
async fn etcd_tokens_grow_across_instances_and_restarts_and_never_repeat() {
    let f = Fixture::etcd(5_000);
    let mut seen: Vec<FenceToken> = Vec::new();
    for round in 0..3u8 {
        // Every instance restarts between rounds.
        let (a, b) = (f.open().await, f.open().await);
        for i in 0..6u8 {
            let s = if i % 2 == 0 { &a } else { &b };
            let node = NodeId(u64::from(i % 2) + 30);
            let w = wid(round * 10 + i + 1);
            let g = fence(&s.acquire(node, &w, "u", NOW).await.expect("acquire"));
            seen.push(g);
            let other = if i % 2 == 0 { &b } else { &a };
            other.release(node, &w).await.expect("release");
        }
    }
    assert!(
        seen.windows(2).all(|p| p[0] < p[1]),
        "strictly growing: {seen:?}"
    );
}

#[tokio::test]
async fn etcd_a_waiter_is_woken_by_the_watch_at_once() {
    // A long lease: the waiter's keepalive tick (a third of it) is far from the wake-up.
    let f = Fixture::etcd(6_000);
    let (a, b) = (f.open().await, f.open().await);
    let node = NodeId(23);
    fence(&a.acquire(node, &wid(1), "a", NOW).await.expect("acquire"));
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move {
            let r = b.acquire(node, &wid(2), "b", LONG).await;
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    let released = Instant::now();
    a.release(node, &wid(1)).await.expect("release");
    let (r, at) = waiting.await.expect("join");
    fence(&r.expect("acquire"));
    let took = at.duration_since(released);
    assert!(took < Duration::from_millis(300), "woken after {took:?}");
}

#[tokio::test]
async fn etcd_a_waiter_that_stops_polling_loses_its_place() {
    let f = Fixture::etcd(2_000);
    let s = f.open().await;
    let node = NodeId(24);
    fence(&s.acquire(node, &wid(1), "a", NOW).await.expect("acquire"));
    s.acquire(node, &wid(2), "gone", NOW).await.expect("queue");
    s.acquire(node, &wid(3), "c", NOW).await.expect("queue");
    // 1 keeps its lock, 3 keeps polling; 2 went silent.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.renew(node, &wid(1)).await.expect("renew");
        s.acquire(node, &wid(3), "c", NOW).await.expect("poll");
    }
    let r = s.acquire(node, &wid(3), "c", NOW).await.expect("poll");
    assert!(
        matches!(r, AcquireResponse::Queued { position: 1 }),
        "{r:?}"
    );
    assert_eq!(s.status().await.expect("status")[0].queued, 1);
}

#[tokio::test]
async fn etcd_the_fence_base_lifts_every_token_and_never_goes_down() {
    // A redb lock service issued tokens; its high-water mark becomes the etcd base.
    let old = Fixture::local(5_000);
    let mut last = FenceToken(0);
    {
        let s = old.open().await;
        for i in 0..3 {
            last = fence(
                &s.acquire(NodeId(1), &wid(i), "u", NOW)
                    .await
                    .expect("acquire"),
            );
            s.release(NodeId(1), &wid(i)).await.expect("release");
        }
    }
    let dir = old.dir.as_ref().expect("dir").path();
    let high = local::fence_high_water(dir).expect("high water");
    assert!(high >= last.0, "{high} < {last}");
    let f = Fixture::etcd(5_000);
    let etcd = f.etcd.as_ref().expect("etcd");
    etcd::set_fence_base(etcd, high).await.expect("set base");
    let s = f.open().await;
    let g = fence(
        &s.acquire(NodeId(1), &wid(9), "u", NOW)
            .await
            .expect("acquire"),
    );
    assert!(g.0 > high, "{g} must exceed {high}");
    assert!(matches!(
        etcd::set_fence_base(etcd, high - 1).await,
        Err(ServiceError::StaleFence(_))
    ));
}

both!(
    a_release_racing_a_waiting_acquire_does_not_requeue_the_waiter,
    5_000,
    5_000
);
/// A waiter released while its acquire waits (its client gave up; on etcd through another
/// instance) is not queued again by that acquire: the lock goes to the next waiter, not to a
/// waiter nobody polls.
async fn a_release_racing_a_waiting_acquire_does_not_requeue_the_waiter(f: Fixture) {
    let (s, other) = f.pair().await;
    let node = NodeId(31);
    let g1 = fence(&s.acquire(node, &wid(1), "h", NOW).await.expect("acquire"));
    let waiting = {
        let s = s.clone();
        tokio::spawn(async move { s.acquire(node, &wid(2), "w", LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "2 waits behind 1");
    // 2 gives up ...
    other.release(node, &wid(2)).await.expect("release 2");
    let ended = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("the released waiter's acquire ends")
        .expect("join");
    assert!(
        matches!(ended, Err(ServiceError::NotHolder(_))),
        "{ended:?}"
    );
    // ... so when 1 releases, 3 is next, at once.
    s.release(node, &wid(1)).await.expect("release 1");
    let g3 = fence(&s.acquire(node, &wid(3), "n", NOW).await.expect("acquire"));
    assert!(g3 > g1);
    assert_eq!(
        s.status().await.expect("status")[0].queued,
        0,
        "nobody else queued"
    );
}

/// Deletes `<prefix>/<key>` behind the lock service's back (an operator's mistake, or what an
/// etcd snapshot from before the key was written brings back).
async fn delete_behind(etcd: &EtcdConfig, key: &str) {
    let mut c = etcd_client::Client::connect(etcd.endpoints.clone(), None)
        .await
        .expect("etcd client");
    c.delete(format!("{}/{key}", etcd.prefix), None)
        .await
        .expect("delete");
}

/// Asks for `node`'s lock until granted: a token that would have gone back is refused once
/// as unavailable (the base is raised meanwhile), as a client would retry.
async fn acquire_retrying(s: &LockService, node: NodeId, w: u8) -> FenceToken {
    for _ in 0..3 {
        match s.acquire(node, &wid(w), "u", NOW).await {
            Ok(r) => return fence(&r),
            Err(ServiceError::Unavailable(m)) => eprintln!("refused once: {m}"),
            Err(e) => panic!("{e}"),
        }
    }
    panic!("never granted");
}

#[tokio::test]
async fn etcd_a_deleted_fence_base_never_lowers_a_token() {
    let f = Fixture::etcd(5_000);
    let etcd = f.etcd.as_ref().expect("etcd");
    etcd::set_fence_base(etcd, 1 << 40).await.expect("set base");
    let s = f.open().await;
    let node = NodeId(3);
    let t1 = fence(&s.acquire(node, &wid(1), "u", NOW).await.expect("acquire"));
    s.release(node, &wid(1)).await.expect("release");
    // The base goes: a running instance notices before granting, and lifts it again.
    delete_behind(etcd, etcd::FENCE_BASE_KEY).await;
    let t2 = acquire_retrying(&s, node, 2).await;
    assert!(t2 > t1, "{t2} after {t1}");
    s.release(node, &wid(2)).await.expect("release");
    // Gone again: a new instance starts above the high-water mark.
    delete_behind(etcd, etcd::FENCE_BASE_KEY).await;
    let fresh = f.open().await;
    let t3 = acquire_retrying(&fresh, node, 3).await;
    assert!(t3 > t2, "{t3} after {t2}");
    fresh.release(node, &wid(3)).await.expect("release");
    // And the old instance, whose memory says the base was higher, still grants above.
    let t4 = acquire_retrying(&s, node, 4).await;
    assert!(t4 > t3, "{t4} after {t3}");
}

#[tokio::test]
async fn etcd_shared_and_exclusive_app_locks_across_two_instances() {
    let f = Fixture::etcd(2_000);
    let (a, b) = (f.open().await, f.open().await);
    assert!(granted(
        &a.app_lock(N, &owner(1, 1), true, "r1", NOW)
            .await
            .expect("lock")
    ));
    assert!(granted(
        &b.app_lock(N, &owner(2, 1), true, "r2", NOW)
            .await
            .expect("lock")
    ));
    let writer = {
        let b = b.clone();
        tokio::spawn(async move { b.app_lock(N, &owner(3, 1), false, "w", LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A reader behind the waiting writer does not overtake it.
    assert_eq!(
        a.app_lock(N, &owner(4, 1), true, "r3", NOW)
            .await
            .expect("lock"),
        AppLockResponse::Busy
    );
    a.app_unlock(N, &owner(1, 1)).await.expect("unlock");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!writer.is_finished(), "r2 still reads");
    b.app_unlock(N, &owner(2, 1)).await.expect("unlock");
    assert!(granted(&writer.await.expect("join").expect("lock")));
    let c = a.app_test(N, &owner(4, 1), true).await.expect("test");
    assert_eq!(c.map(|c| (c.shared, c.user)), Some((false, "w".to_owned())));
}

#[test]
fn etcd_three_members_losing_one_keeps_a_held_lock_and_grants_again() {
    let mut members = crate::testing::start_cluster(3, &[]).unwrap_or_else(|e| panic!("{e}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let f = Fixture::on(&members, 3_000);
    let s = rt.block_on(f.open());
    let node = NodeId(40);
    let g1 = fence(
        &rt.block_on(s.acquire(node, &wid(1), "a", NOW))
            .expect("acquire"),
    );
    // The first member goes (the leader, as often as not).
    drop(members.remove(0));
    // The holder renews every second: a renewal may fail while a leader is elected, but the
    // lock is never lost (etcd 3.4 gives every lease its full TTL again on a new leader).
    let start = Instant::now();
    let mut renewed = 0;
    while start.elapsed() < Duration::from_secs(8) {
        match rt.block_on(s.renew(node, &wid(1))) {
            Ok(g) => {
                assert_eq!(g.fence, g1);
                renewed += 1;
            }
            Err(ServiceError::Unavailable(_)) => {}
            Err(e) => panic!("the held lock was lost: {e}"),
        }
        std::thread::sleep(Duration::from_millis(1_000));
    }
    assert!(renewed >= 4, "renewed {renewed} times in 8 s");
    // New grants within a bounded time.
    rt.block_on(s.release(node, &wid(1))).expect("release");
    let start = Instant::now();
    let g2 = fence(
        &rt.block_on(s.acquire(node, &wid(2), "b", NOW))
            .expect("acquire"),
    );
    assert!(g2 > g1);
    assert!(start.elapsed() < Duration::from_secs(5));
}
