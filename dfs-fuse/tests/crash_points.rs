//! Crashes and failures at named points inside the client core, injected with fault points
//! (the `fail` crate, compiled in for tests only). A fault point is process-wide, so these
//! never share a process with the other core tests, and each test here holds a
//! `fail::FailScenario` (one at a time).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::time::Duration;

use common::NodeId;
use dfs_fuse::fs::DfsFs;
use dfs_fuse::remote::{Remote, RemoteConfig};
use support::crash_image;

mod support;

fn core(url: &str, login: dfs_fuse::creds::SavedLogin, cache: &std::path::Path) -> DfsFs {
    support::core_at(url, Some(login), cache, false)
}

fn core_with(
    url: &str,
    login: dfs_fuse::creds::SavedLogin,
    cache: &std::path::Path,
    writeback: bool,
) -> DfsFs {
    support::core_at(url, Some(login), cache, writeback)
}

/// An in-process cluster on loopback with one signed-up user (kept alive by the returned dir).
async fn cluster_with_user() -> (
    tempfile::TempDir,
    dfs_server::cluster::ClusterHandle,
    dfs_fuse::creds::SavedLogin,
) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dfs_server::cluster::ClusterConfig::new(
        dir.path().to_path_buf(),
        "127.0.0.1:0".parse().unwrap(),
    );
    let cluster = dfs_server::cluster::start(cfg).await.unwrap();
    let r = Remote::new(&cluster.directory_url, None, None, RemoteConfig::default()).unwrap();
    r.signup("alice", "password123").await.unwrap();
    let login = r.login("alice", "password123").await.unwrap();
    (dir, cluster, login)
}

async fn read_all(fs: &DfsFs, node: NodeId) -> Vec<u8> {
    let o = fs.open(node, libc::O_RDONLY).await.unwrap();
    let data = fs.read(o.fh, 0, 1 << 20).unwrap();
    fs.release(o.fh);
    data
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_crash_inside_a_truncating_open_never_leaves_an_empty_copy_named_as_the_file()
{
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;

    // The file's content is on the servers; a second client's cache has no copy of it.
    let writer_cache = tempfile::tempdir().unwrap();
    let writer = core(&cluster.directory_url, login.clone(), writer_cache.path());
    let (attr, o) = writer
        .create(NodeId::ROOT, OsStr::new("kept.txt"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    writer.write(o.fh, 0, b"precious content\n").unwrap();
    writer.flush(o.fh).await.unwrap();
    writer.release(o.fh);
    let node = NodeId(attr.ino.0);

    // The second client crashes inside `open(O_TRUNC)`, right after the emptied copy was put
    // in place and indexed.
    let cache = tempfile::tempdir().unwrap();
    let fs = core(&cluster.directory_url, login.clone(), cache.path());
    fs.lookup(NodeId::ROOT, OsStr::new("kept.txt"))
        .await
        .unwrap();
    fail::cfg("open-installed", "return").unwrap();
    assert!(fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.is_err());
    let image = tempfile::tempdir().unwrap();
    crash_image(cache.path(), image.path());
    // Without a crash too: the failed open left nothing that passes for the file.
    assert!(fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.is_err());
    fail::remove("open-installed");
    assert_eq!(read_all(&fs, node).await, b"precious content\n");
    drop(fs);

    // After the restart the file reads as the servers have it, never as the empty copy.
    let restarted = core(&cluster.directory_url, login, image.path());
    restarted
        .lookup(NodeId::ROOT, OsStr::new("kept.txt"))
        .await
        .unwrap();
    assert_eq!(read_all(&restarted, node).await, b"precious content\n");
    cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_change_that_cannot_be_recorded_stays_dirty_and_is_pushed_later() {
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;
    let cache = tempfile::tempdir().unwrap();
    let fs = core(&cluster.directory_url, login.clone(), cache.path());
    let (attr, o) = fs
        .create(NodeId::ROOT, OsStr::new("notes.txt"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(o.fh, 0, b"v1\n").unwrap();
    fs.flush(o.fh).await.unwrap();
    fs.release(o.fh);
    let node = NodeId(attr.ino.0);

    // The cache cannot record the next change (its disk is full, say).
    fail::cfg("record-pending", "return").unwrap();
    let o = fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    fs.write(o.fh, 0, b"v2, written while the cache was full\n")
        .unwrap();
    let e = fs.flush(o.fh).await.expect_err("close reports it");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    fs.release(o.fh);
    assert!(
        fs.unsettled().unwrap().contains(&node),
        "unmount would say so"
    );
    // Meanwhile another client writes the file (its own cache is fine).
    fail::remove("record-pending");
    let other_cache = tempfile::tempdir().unwrap();
    let other = core(&cluster.directory_url, login.clone(), other_cache.path());
    other
        .lookup(NodeId::ROOT, OsStr::new("notes.txt"))
        .await
        .unwrap();
    let o = other
        .open(node, libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    other.write(o.fh, 0, b"v3 from elsewhere\n").unwrap();
    other.flush(o.fh).await.unwrap();
    other.release(o.fh);
    // This client's copy is never replaced by a download, nor served as that version, and
    // every close reports the change while it still cannot be recorded.
    fail::cfg("record-pending", "return").unwrap();
    let o = fs.open(node, libc::O_RDWR).await.unwrap();
    assert_eq!(
        fs.read(o.fh, 0, 1 << 20).unwrap(),
        b"v2, written while the cache was full\n"
    );
    assert!(fs.flush(o.fh).await.is_err());
    fs.release(o.fh);
    // A reader's close is not failed for it.
    let o = fs.open(node, libc::O_RDONLY).await.unwrap();
    fs.flush(o.fh).await.unwrap();
    fs.release(o.fh);

    // Space is back: the uploader records and pushes the change. It was based on v1 and
    // no close waits for it any more, so it does not overwrite v3: it becomes a conflict copy.
    fail::remove("record-pending");
    for _ in 0..2 {
        fs.push_pending(tokio::time::Instant::now() + Duration::from_secs(10), false)
            .await
            .unwrap();
    }
    assert!(fs.unsettled().unwrap().is_empty());
    assert_eq!(read_all(&other, node).await, b"v3 from elsewhere\n");
    let conflicts = fs.conflicts();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let copy = other
        .lookup(NodeId::ROOT, OsStr::new(&conflicts[0].kept_as))
        .await
        .unwrap();
    assert_eq!(
        read_all(&other, NodeId(copy.ino.0)).await,
        b"v2, written while the cache was full\n"
    );
    // `dfs status` still lists it after the client restarts.
    drop(fs);
    let again = core(&cluster.directory_url, login, cache.path());
    assert_eq!(again.conflicts(), conflicts);
    cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_writeback_close_that_cannot_be_recorded_stays_dirty() {
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;
    let cache = tempfile::tempdir().unwrap();
    let fs = core_with(&cluster.directory_url, login, cache.path(), true);
    fail::cfg("record-pending", "return").unwrap();
    let (attr, o) = fs
        .create(NodeId::ROOT, OsStr::new("wb.txt"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    fs.write(o.fh, 0, b"kept in write-back\n").unwrap();
    let e = fs.flush(o.fh).await.expect_err("close reports it");
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    fs.release(o.fh);
    let node = NodeId(attr.ino.0);
    assert!(fs.unsettled().unwrap().contains(&node));
    fail::remove("record-pending");
    let left = fs
        .push_pending(tokio::time::Instant::now() + Duration::from_secs(10), false)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(fs.unsettled().unwrap().is_empty());
    cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_change_recorded_while_a_push_settles_is_not_lost() {
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;
    let cache = tempfile::tempdir().unwrap();
    let fs = std::sync::Arc::new(core(&cluster.directory_url, login.clone(), cache.path()));
    let (attr, o) = fs
        .create(NodeId::ROOT, OsStr::new("race.txt"), 0o644, libc::O_RDWR)
        .await
        .unwrap();
    let node = NodeId(attr.ino.0);
    fs.write(o.fh, 0, b"first").unwrap();
    // The push of "first" stops between reading and writing the cache entry...
    let (reached_tx, reached) = std::sync::mpsc::channel::<()>();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let reached_tx = std::sync::Mutex::new(reached_tx);
    let go_rx = std::sync::Mutex::new(go_rx);
    fail::cfg_callback("settle-before-write", move || {
        let _ = reached_tx.lock().unwrap().send(());
        let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(10));
    })
    .unwrap();
    let flushing = {
        let fs = fs.clone();
        tokio::spawn(async move { fs.flush(o.fh).await })
    };
    tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(20)))
        .await
        .unwrap()
        .expect("the push reached the point");
    // ...while a write through an mmap is recorded by release (which takes no node lock).
    let releasing = {
        let fs = fs.clone();
        std::thread::spawn(move || {
            fs.write(o.fh, 0, b"second").unwrap();
            fs.release(o.fh);
        })
    };
    // Without the lock, release records its change now, before the push writes its entry.
    std::thread::sleep(Duration::from_millis(300));
    go.send(()).unwrap();
    flushing.await.unwrap().unwrap();
    releasing.join().unwrap();
    fail::remove("settle-before-write");
    assert!(
        fs.pending().unwrap().contains(&node),
        "the newer change is still pending"
    );
    let left = fs
        .push_pending(tokio::time::Instant::now() + Duration::from_secs(10), false)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    let other_cache = tempfile::tempdir().unwrap();
    let other = core(&cluster.directory_url, login, other_cache.path());
    assert_eq!(read_all(&other, node).await, b"second");
    assert!(
        fs.conflicts().is_empty(),
        "the newer change was based on the version just pushed, not a conflict"
    );
    cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_own_push_whose_answer_was_lost_is_no_conflict_for_the_next_change() {
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;
    let cache = tempfile::tempdir().unwrap();
    let fs = core_with(&cluster.directory_url, login.clone(), cache.path(), true);
    let (attr, o) = fs
        .create(NodeId::ROOT, OsStr::new("wb.txt"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let node = NodeId(attr.ino.0);
    fs.write(o.fh, 0, b"one").unwrap();
    fs.flush(o.fh).await.unwrap();
    fs.release(o.fh);
    let push = || fs.push_pending(tokio::time::Instant::now() + Duration::from_secs(3), false);
    assert!(push().await.unwrap().is_empty());
    // The next write-back push reaches the servers, but its answer never comes back.
    let o = fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    fs.write(o.fh, 0, b"two").unwrap();
    fs.flush(o.fh).await.unwrap();
    fs.release(o.fh);
    fail::cfg("upload-answer-lost", "return").unwrap();
    assert_eq!(push().await.unwrap(), vec![node], "in doubt: still pending");
    fail::remove("upload-answer-lost");
    // A newer change of the same copy, pushed in the background: the version it finds is
    // its own earlier push, so it applies.
    let o = fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    fs.write(o.fh, 0, b"three").unwrap();
    fs.flush(o.fh).await.unwrap();
    fs.release(o.fh);
    assert!(push().await.unwrap().is_empty());
    assert!(fs.conflicts().is_empty(), "{:?}", fs.conflicts());
    let other_cache = tempfile::tempdir().unwrap();
    let other = core(&cluster.directory_url, login, other_cache.path());
    assert_eq!(read_all(&other, node).await, b"three");
    cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_conflict_met_while_the_directory_is_away_stays_pending_in_the_mount() {
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;
    let (cache_a, cache_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = core_with(&cluster.directory_url, login.clone(), cache_a.path(), true);
    let b = core(&cluster.directory_url, login, cache_b.path());
    let (attr, o) = a
        .create(NodeId::ROOT, OsStr::new("c.txt"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let node = NodeId(attr.ino.0);
    a.write(o.fh, 0, b"base").unwrap();
    a.flush(o.fh).await.unwrap();
    a.release(o.fh);
    assert!(push_all(&a).await.is_empty());
    // A opens the base version; B's close lands first; A's write-back push comes later.
    let oa = a.open(node, libc::O_RDWR).await.unwrap();
    b.lookup(NodeId::ROOT, OsStr::new("c.txt")).await.unwrap();
    let ob = b.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    b.write(ob.fh, 0, b"bob").unwrap();
    b.flush(ob.fh).await.unwrap();
    b.release(ob.fh);
    a.write(oa.fh, 0, b"alice").unwrap();
    a.flush(oa.fh).await.unwrap();
    a.release(oa.fh);
    // The conflict is found while the directory cannot make the copy: nothing leaves the
    // mount for the cache's recovered/, the change stays pending.
    fail::cfg("conflict-create", "return").unwrap();
    assert_eq!(push_all(&a).await, vec![node]);
    assert!(!cache_a.path().join("recovered").exists());
    assert!(a.conflicts().is_empty());
    fail::remove("conflict-create");
    push_all(&a).await;
    push_all(&a).await;
    assert!(a.pending().unwrap().is_empty());
    let c = a.conflicts();
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0].in_mount);
    assert_eq!(read_all(&b, node).await, b"bob");
    cluster.shutdown().await;
    scenario.teardown();
}

async fn push_all(fs: &DfsFs) -> Vec<NodeId> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    fs.push_pending(deadline, false).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_that_runs_out_mid_push_never_reverts_a_newer_close() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = dfs_server::cluster::ClusterConfig::new(
        dir.path().to_path_buf(),
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.lock.lease = Duration::from_millis(400);
    let cluster = dfs_server::cluster::start(cfg).await.unwrap();
    let r = Remote::new(&cluster.directory_url, None, None, RemoteConfig::default()).unwrap();
    r.signup("alice", "password123").await.unwrap();
    let login = r.login("alice", "password123").await.unwrap();
    let (ca, cb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = std::sync::Arc::new(core(&cluster.directory_url, login.clone(), ca.path()));
    let b = core(&cluster.directory_url, login.clone(), cb.path());
    let (attr, o) = a
        .create(NodeId::ROOT, OsStr::new("f"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let node = NodeId(attr.ino.0);
    a.write(o.fh, 0, b"base").unwrap();
    a.flush(o.fh).await.unwrap();
    a.release(o.fh);
    // A's next push takes the lock, then stalls past its lease with its renewals lost.
    let o = a.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    a.write(o.fh, 0, b"alice").unwrap();
    fail::cfg("push-hold", "1*return(1500)").unwrap();
    fail::cfg("lock-renew", "return").unwrap();
    let closing = {
        let a = a.clone();
        tokio::spawn(async move {
            let r = a.flush(o.fh).await;
            a.release(o.fh);
            (r, std::time::Instant::now())
        })
    };
    // Wait until A's push holds the lock (and so is in its hold: the one hold is A's, never
    // B's, however slow the machine), then past its lease.
    let http = dfs_server::tls::client().expect("an HTTP client");
    let locks = format!("{}{}", cluster.lock_url, common::routes::LOCKS);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held: Vec<common::api::LockStatus> = http
            .get(&locks)
            .bearer_auth(&login.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if held.iter().any(|l| l.node == node && l.holder.is_some()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "A never took the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    // B's close gets the lock the lease gave up, and is acknowledged first.
    b.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    let ob = b.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    b.write(ob.fh, 0, b"bob").unwrap();
    b.flush(ob.fh).await.unwrap();
    let bob_acked = std::time::Instant::now();
    b.release(ob.fh);
    let (r, alice_done) = closing.await.unwrap();
    fail::remove("lock-renew");
    fail::remove("push-hold");
    // A's stale upload never lands after B's: the file is whatever the last acknowledged
    // close wrote (A's close, still waiting, retried under a new lock: last close wins), and
    // nothing acknowledged was silently replaced by an older push.
    let other_cache = tempfile::tempdir().unwrap();
    let other = core(&cluster.directory_url, login, other_cache.path());
    let now = read_all(&other, node).await;
    match r {
        Ok(()) => {
            assert!(alice_done > bob_acked);
            assert_eq!(now, b"alice", "the last acknowledged close wins");
        }
        Err(e) => {
            assert_eq!(now, b"bob", "a failed close changes nothing: {e}");
            assert_eq!(a.pending().unwrap(), vec![node], "and its bytes are kept");
        }
    }
    let meta = other.remote().get(node).await.unwrap();
    assert!(meta.version >= 3, "bob's version was committed: {meta:?}");
    cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_changes_whose_answers_were_lost_are_retried_and_applied_once() {
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;
    let cache = tempfile::tempdir().unwrap();
    let fs = core_with(&cluster.directory_url, login.clone(), cache.path(), false);
    // Each change reaches the directory and is applied; its answer is lost on the way back.
    // The client sends it again with the same request id and gets the first answer: no
    // EEXIST for its own create, no ENOENT for its own rename.
    fail::cfg("dir-answer-lost", "1*return").unwrap();
    let (attr, o) = fs
        .create(NodeId::ROOT, OsStr::new("f"), 0o644, libc::O_WRONLY)
        .await
        .expect("the create's retry is answered with the node it made");
    fs.write(o.fh, 0, b"content").unwrap();
    fs.flush(o.fh).await.unwrap();
    fs.release(o.fh);
    fail::cfg("dir-answer-lost", "1*return").unwrap();
    fs.mkdir(NodeId::ROOT, OsStr::new("d"), 0o755)
        .await
        .expect("the mkdir's retry is answered");
    fail::cfg("dir-answer-lost", "1*return").unwrap();
    fs.rename(
        NodeId::ROOT,
        OsStr::new("f"),
        NodeId::ROOT,
        OsStr::new("g"),
        0,
    )
    .await
    .expect("the rename's retry is answered, not applied again");
    fail::remove("dir-answer-lost");
    // One of each, as a client that lost nothing would have made.
    let other_cache = tempfile::tempdir().unwrap();
    let other = core_with(&cluster.directory_url, login, other_cache.path(), false);
    let g = other.lookup(NodeId::ROOT, OsStr::new("g")).await.unwrap();
    assert_eq!(g.ino, attr.ino, "the node first made, renamed once");
    assert!(other.lookup(NodeId::ROOT, OsStr::new("f")).await.is_err());
    assert!(other.lookup(NodeId::ROOT, OsStr::new("d")).await.is_ok());
    assert_eq!(read_all(&other, NodeId(g.ino.0)).await, b"content");
    cluster.shutdown().await;
    scenario.teardown();
}

/// A batch's lock acquire that never answers (a silent lock instance, a directory away) is
/// cut at the batch's own short wait: the files go the single way, and the batch does not
/// hold their node locks (an open of any of them would wait) for the push's whole deadline.
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_hung_batch_lock_acquire_is_cut_at_the_batch_wait() {
    let scenario = fail::FailScenario::setup();
    let (_dir, cluster, login) = cluster_with_user().await;
    let cache = tempfile::tempdir().unwrap();
    let fs = core_with(&cluster.directory_url, login, cache.path(), true);
    for i in 0..4 {
        let (_, o) = fs
            .create(
                NodeId::ROOT,
                OsStr::new(&format!("f{i}")),
                0o644,
                libc::O_WRONLY,
            )
            .await
            .unwrap();
        fs.write(o.fh, 0, format!("file {i}").as_bytes()).unwrap();
        fs.flush(o.fh).await.unwrap();
        fs.release(o.fh);
    }
    assert_eq!(fs.pending().unwrap().len(), 4);
    fail::cfg("batch-acquire-hang", "return").unwrap();
    let t = std::time::Instant::now();
    let left = tokio::time::timeout(
        Duration::from_secs(15),
        fs.push_pending(tokio::time::Instant::now() + Duration::from_secs(60), false),
    )
    .await
    .expect("not held for the push's deadline")
    .unwrap();
    fail::remove("batch-acquire-hang");
    assert!(left.is_empty(), "left {left:?}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let stats = &fs.remote().stats;
    assert_eq!(stats.uploads.load(std::sync::atomic::Ordering::Relaxed), 4);
    assert_eq!(stats.batches.load(std::sync::atomic::Ordering::Relaxed), 0);
    cluster.shutdown().await;
    scenario.teardown();
}
