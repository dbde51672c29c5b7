//! Several directory instances over one etcd prefix (issue 10), and the feed published by the
//! store on both engines.

use std::time::{Duration, Instant};

use common::api::{ChangeKind, CreateRequest, RegisterServerRequest, RenameRequest};
use common::{FileKind, NodeId, ValidName};

use super::*;
use common::ServerId;

fn n(s: &str) -> ValidName {
    ValidName::parse(s).expect("valid name")
}

fn admin() -> Identity {
    Caller::cluster().id
}

fn mk(svc: &DirectoryService, parent: NodeId, name: &str, kind: FileKind) -> NodeMeta {
    let req = CreateRequest {
        name: n(name),
        kind,
        mode: 0o755,
        symlink_target: None,
        rdev: 0,
    };
    svc.create(parent, &req, &Caller::cluster())
        .expect("create")
}

fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// A directory on the shared test etcd under `prefix`.
fn on_etcd(dir: &Path, prefix: &str) -> DirectoryService {
    let etcd = crate::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
    let meta = MetaConfig::parse(&etcd.meta_url(prefix)).expect("meta url");
    DirectoryService::open_meta(dir, &meta, DirectoryConfig::default()).expect("open")
}

/// Every change the feed holds from its floor on.
fn changes(svc: &DirectoryService) -> Vec<ChangeKind> {
    let f = svc.feed();
    f.read(Some(f.epoch()), f.floor(), 1024, None)
        .changes
        .into_iter()
        .map(|c| c.what)
        .collect()
}

fn check_rename_published(svc: &DirectoryService) {
    svc.register_server(&RegisterServerRequest {
        url: "http://127.0.0.1:9100".into(),
        capacity_bytes: 1 << 30,
        previous_id: None,
        cluster_id: None,
    })
    .expect("register");
    let d = mk(svc, NodeId::ROOT, "d", FileKind::Dir);
    let f = mk(svc, NodeId::ROOT, "f", FileKind::File);
    // Called on the service, as a route dropped mid-call would have: the store publishes.
    svc.rename(
        &RenameRequest {
            parent: NodeId::ROOT,
            name: n("f"),
            new_parent: d.id,
            new_name: n("g"),
            no_replace: false,
        },
        &admin(),
    )
    .expect("rename");
    let want = [
        ChangeKind::Entry {
            dir: NodeId::ROOT,
            node: f.id,
        },
        ChangeKind::Entry {
            dir: d.id,
            node: f.id,
        },
        ChangeKind::Node { node: f.id },
    ];
    assert!(
        eventually(Duration::from_secs(10), || {
            let got = changes(svc);
            want.iter().all(|w| got.contains(w))
        }),
        "the rename's moved node was not published: {:?}",
        changes(svc)
    );
}

#[test]
fn a_rename_publishes_the_node_it_moved_from_the_store_on_redb() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("open");
    check_rename_published(&svc);
}

#[test]
fn a_rename_publishes_the_node_it_moved_from_the_store_on_etcd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let svc = on_etcd(dir.path(), &prefix);
    check_rename_published(&svc);
}

#[test]
fn two_instances_share_liveness_ids_and_one_repair_leader() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let a = on_etcd(da.path(), &prefix);
    let b = on_etcd(db.path(), &prefix);
    // A server registered and beating through a only: b learns of it, alive, from the store.
    let id = a
        .register_server(&RegisterServerRequest {
            url: "http://127.0.0.1:9100".into(),
            capacity_bytes: 1 << 30,
            previous_id: None,
            cluster_id: None,
        })
        .expect("register");
    a.heartbeat(id, None).expect("beat");
    b.sync_registry().expect("sync");
    // b learned of the server, but its beat only as a baseline (its first sight of a beat says
    // nothing of its age); a beat after it counts.
    let heard = |svc: &DirectoryService| {
        svc.registry
            .status(&Default::default())
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.last_heartbeat_ms_ago.is_some())
    };
    assert_eq!(heard(&b), Some(false));
    a.heartbeat(id, None).expect("beat");
    b.sync_registry().expect("sync");
    assert_eq!(heard(&b), Some(true), "a beat through a never reached b");
    assert_eq!(b.registry.live(), vec![id]);
    // Creates on both instances take ids from blocks of their own: no two alike.
    let mut ids: Vec<u64> = (0..5)
        .flat_map(|i| {
            [
                mk(&a, NodeId::ROOT, &format!("a{i}"), FileKind::File).id.0,
                mk(&b, NodeId::ROOT, &format!("b{i}"), FileKind::File).id.0,
            ]
        })
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "ids unique across instances");
    // A change made through a reaches b's feed.
    let made = mk(&a, NodeId::ROOT, "seen-by-b", FileKind::File);
    assert!(eventually(Duration::from_secs(10), || changes(&b)
        .contains(&ChangeKind::Entry {
            dir: NodeId::ROOT,
            node: made.id
        })));
    // One leader; its stop hands over; the deposed one's repair write is refused.
    a.start_election();
    assert!(eventually(Duration::from_secs(10), || a.is_leader()));
    b.start_election();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!b.is_leader(), "two leaders");
    a.resign();
    assert!(
        eventually(crate::meta::etcd::LEADER_LEASE * 2, || b.is_leader()),
        "b never took over"
    );
    let e = crate::meta::as_leader(|| a.promote(made.id, &made.hash, id))
        .expect_err("a deposed leader's repair write");
    assert!(e.to_string().contains("no longer the repair leader"), "{e}");
    crate::meta::as_leader(|| b.promote(made.id, &made.hash, id)).expect("the leader's write");
    b.resign();
}

fn register(svc: &DirectoryService, port: u16) -> ServerId {
    svc.register_server(&RegisterServerRequest {
        url: format!("http://127.0.0.1:{port}"),
        capacity_bytes: 1 << 30,
        previous_id: None,
        cluster_id: None,
    })
    .expect("register")
}

/// Server states as the repair last recorded them.
fn seen(svc: &DirectoryService) -> Vec<(ServerId, bool)> {
    svc.store.read(super::replicas::seen).expect("seen")
}

async fn one_pass(svc: &std::sync::Arc<DirectoryService>) {
    let peer = crate::peer::Peer::new("key").expect("peer");
    let (cfg, inflight) = (repair::RepairConfig::default(), repair::InFlight::default());
    repair::pass(svc, &peer, &cfg, &inflight).await;
}

/// Regression: a leader running passes back to back judged liveness from its registry as
/// last synced; a server beating only through another instance looked dead to it, and the
/// pass recorded its death and queued its files. Every pass syncs first when its view is a
/// heartbeat interval old.
#[tokio::test(start_paused = true)]
async fn regression_a_pass_judges_liveness_from_a_view_synced_first() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let a = std::sync::Arc::new(on_etcd(da.path(), &prefix));
    let b = on_etcd(db.path(), &prefix);
    let (x, y) = (register(&a, 9100), register(&a, 9101));
    b.sync_registry().expect("sync");
    // x beats through b only, y through a; a has seen x's beat once (its baseline).
    b.heartbeat(x, None).expect("beat");
    a.sync_registry().expect("sync");
    a.note_servers(&[(x, true, true), (y, true, true)])
        .expect("note");
    tokio::time::advance(Duration::from_secs(7)).await;
    b.heartbeat(x, None).expect("beat");
    a.heartbeat(y, None).expect("beat");
    one_pass(&a).await;
    assert_eq!(
        seen(&a),
        vec![(x, true), (y, true)],
        "a pass judged a server beating through another instance dead"
    );
    assert_eq!(a.repair_queue_len().expect("queue"), 0);
}

/// Regression (review 1): a failed registry sync did not stop the pass; judged on the view
/// of the last good sync, a server beating only through another instance looked dead: its
/// death was recorded and its files queued, though it was alive.
#[tokio::test(start_paused = true)]
async fn regression_a_pass_whose_registry_sync_failed_records_no_death() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let a = std::sync::Arc::new(on_etcd(da.path(), &prefix));
    let b = on_etcd(db.path(), &prefix);
    let (x, y) = (register(&a, 9100), register(&a, 9101));
    b.sync_registry().expect("sync");
    // x beats through b only, y through a; a hears x's beats through the store.
    b.heartbeat(x, None).expect("beat");
    a.sync_registry().expect("sync");
    b.heartbeat(x, None).expect("beat");
    a.sync_registry().expect("sync");
    a.note_servers(&[(x, true, true), (y, true, true)])
        .expect("note");
    // Past the dead-after period x keeps beating through b, but a cannot read the store.
    tokio::time::advance(Duration::from_secs(7)).await;
    b.heartbeat(x, None).expect("beat");
    a.heartbeat(y, None).expect("beat");
    a.registry
        .sync_fails
        .store(true, std::sync::atomic::Ordering::SeqCst);
    one_pass(&a).await;
    assert_eq!(
        seen(&a),
        vec![(x, true), (y, true)],
        "a pass on a stale view recorded a live server's death"
    );
    assert_eq!(a.repair_queue_len().expect("queue"), 0);
    // The store readable again: the next pass sees x's beat and x stays alive.
    a.registry
        .sync_fails
        .store(false, std::sync::atomic::Ordering::SeqCst);
    one_pass(&a).await;
    assert_eq!(seen(&a), vec![(x, true), (y, true)]);
}

/// Regression (review 7): a sync stamped a changed beat with its `now`, taken before its
/// read, over a newer beat heard directly meanwhile: a server's last beat moved backwards,
/// and a live server could look dead.
#[tokio::test(start_paused = true)]
async fn regression_a_sync_never_moves_a_last_beat_back() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let a = on_etcd(da.path(), &prefix);
    let b = on_etcd(db.path(), &prefix);
    let x = register(&a, 9100);
    b.sync_registry().expect("sync");
    b.heartbeat(x, None).expect("beat");
    a.sync_registry().expect("sync");
    // A sync begins (its `now`); a beat is heard directly before its read; another instance
    // recorded a beat, which the read finds changed.
    let before = tokio::time::Instant::now();
    tokio::time::advance(Duration::from_secs(7)).await;
    a.heartbeat(x, None).expect("beat");
    b.heartbeat(x, None).expect("beat");
    a.store
        .read(|tx| a.registry.sync(tx, before))
        .expect("sync");
    assert_eq!(a.registry.live(), vec![x], "the last beat moved back");
}

/// Regression: an instance (re)started after a server died took the server's last beat,
/// read for the first time, as a beat heard now: the dead server counted as returned, and
/// as a live holder of its files.
#[tokio::test(start_paused = true)]
async fn regression_an_old_beat_first_seen_by_a_restarted_instance_is_no_return() {
    let (da, dc) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let a = on_etcd(da.path(), &prefix);
    let (x, y) = (register(&a, 9100), register(&a, 9101));
    // x's last beat, then its death, recorded by a pass.
    a.heartbeat(x, None).expect("beat");
    a.note_servers(&[(x, false, true), (y, true, true)])
        .expect("note");
    // An instance started later: past its start-up grace, y beats through it, x never again.
    let c = std::sync::Arc::new(on_etcd(dc.path(), &prefix));
    tokio::time::advance(Duration::from_secs(7)).await;
    c.heartbeat(y, None).expect("beat");
    c.sync_registry().expect("sync");
    assert_eq!(
        c.registry.live(),
        vec![y],
        "a long-dead server counted as alive"
    );
    one_pass(&c).await;
    assert_eq!(seen(&c), vec![(x, false), (y, true)], "x taken as returned");
}

/// A killed repair leader (it stops renewing; its lease is not revoked) is replaced within
/// the lease plus a follower's next try.
#[test]
fn a_killed_repair_leader_is_replaced_within_its_lease_and_a_try() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let a = on_etcd(da.path(), &prefix);
    let b = on_etcd(db.path(), &prefix);
    let lease = crate::meta::etcd::LEADER_LEASE;
    a.start_election();
    assert!(eventually(Duration::from_secs(10), || a.is_leader()));
    b.start_election();
    let killed = Instant::now();
    a.stop_election();
    let bound = lease + lease / 3 + Duration::from_secs(2);
    assert!(eventually(bound * 2, || b.is_leader()), "b never took over");
    assert!(killed.elapsed() <= bound, "{:?}", killed.elapsed());
    assert!(!a.is_leader());
    b.resign();
}

/// A server registered through another instance, learned from the store by an instance up
/// for longer than its start-up grace, is alive (not heard yet) until the dead-after period
/// passes without a beat: not found dead before its next beat could be seen.
#[tokio::test(start_paused = true)]
async fn a_server_learned_from_the_store_is_alive_unheard_until_its_beat_is_seen() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let prefix = format!("multi/{:016x}", rand::random::<u64>());
    let a = on_etcd(da.path(), &prefix);
    let b = on_etcd(db.path(), &prefix);
    tokio::time::advance(Duration::from_secs(7)).await;
    let x = register(&b, 9100);
    b.heartbeat(x, None).expect("beat");
    a.sync_registry().expect("sync");
    let heard = |svc: &DirectoryService| {
        svc.registry
            .status(&Default::default())
            .iter()
            .find(|s| s.id == x)
            .map(|s| (s.alive, s.last_heartbeat_ms_ago.is_some()))
    };
    assert_eq!(heard(&a), Some((true, false)));
    tokio::time::advance(Duration::from_secs(1)).await;
    b.heartbeat(x, None).expect("beat");
    a.sync_registry().expect("sync");
    assert_eq!(heard(&a), Some((true, true)));
    // Silent for the dead-after period: dead.
    tokio::time::advance(Duration::from_secs(7)).await;
    a.sync_registry().expect("sync");
    assert_eq!(heard(&a), Some((false, true)));
}
