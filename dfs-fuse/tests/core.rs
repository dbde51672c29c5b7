//! The file system core driven without a kernel mount: two `DfsFs` clients (separate caches)
//! over one in-process cluster on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::NodeId;
use dfs_fuse::creds::SavedLogin;
use dfs_fuse::error::FsError;
use dfs_fuse::fs::{AttrChange, DfsFs};
use dfs_fuse::remote::{Remote, RemoteConfig};
use dfs_server::cluster::{ClusterConfig, ClusterHandle};
use support::crash_image;

mod support;
use tokio::time::Instant;

async fn cluster(dir: &std::path::Path) -> ClusterHandle {
    let cfg = ClusterConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    dfs_server::cluster::start(cfg).await.unwrap()
}

async fn login(c: &ClusterHandle, user: &str) -> SavedLogin {
    let r = Remote::new(&c.directory_url, None, None, RemoteConfig::default()).unwrap();
    // A user from before a restart already exists.
    let _ = r.signup(user, "password123").await;
    r.login(user, "password123").await.unwrap()
}

fn core(c: &ClusterHandle, login: Option<SavedLogin>, cache: &std::path::Path) -> DfsFs {
    core_with(c, login, cache, false)
}

fn core_with(
    c: &ClusterHandle,
    login: Option<SavedLogin>,
    cache: &std::path::Path,
    writeback: bool,
) -> DfsFs {
    support::core_at(&c.directory_url, login, cache, writeback)
}

async fn write_file(fs: &DfsFs, name: &str, data: &[u8]) -> Result<(), FsError> {
    let o = match fs.lookup(NodeId::ROOT, OsStr::new(name)).await {
        Ok(attr) => {
            fs.open(NodeId(attr.ino.0), libc::O_WRONLY | libc::O_TRUNC)
                .await?
        }
        Err(_) => {
            fs.create(NodeId::ROOT, OsStr::new(name), 0o644, libc::O_WRONLY)
                .await?
                .1
        }
    };
    fs.write(o.fh, 0, data)?;
    let r = fs.flush(o.fh).await;
    fs.release(o.fh);
    r
}

async fn read_file(fs: &DfsFs, name: &str) -> Vec<u8> {
    let attr = fs.lookup(NodeId::ROOT, OsStr::new(name)).await.unwrap();
    let o = fs.open(NodeId(attr.ino.0), libc::O_RDONLY).await.unwrap();
    let data = fs.read(o.fh, 0, 1 << 20).unwrap();
    fs.release(o.fh);
    data
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_on_one_client_is_seen_by_the_next_open_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    write_file(&a, "f", b"version one").await.unwrap();
    assert_eq!(read_file(&b, "f").await, b"version one");
    write_file(&a, "f", b"version two").await.unwrap();
    assert_eq!(read_file(&b, "f").await, b"version two");
    let downloads = || b.remote().stats.downloads.load(Ordering::Relaxed);
    assert_eq!(downloads(), 2);
    assert_eq!(read_file(&b, "f").await, b"version two");
    assert_eq!(downloads(), 2, "an unchanged file is a cache hit");
    c.shutdown().await;
}

async fn names(fs: &DfsFs) -> Vec<String> {
    let fh = fs.opendir(NodeId::ROOT).await.unwrap();
    let names = fs
        .listing(fh)
        .unwrap()
        .iter()
        .map(|i| i.name.clone())
        .collect();
    fs.releasedir(fh);
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_failed_close_pushed_later_never_overwrites_a_newer_version() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    let cache_a = dir.path().join("a");
    let c = cluster(&data).await;
    {
        let a = core(&c, Some(login(&c, "alice").await), &cache_a);
        write_file(&a, "f", b"base").await.unwrap();
        let attr = a.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
        let o = a
            .open(NodeId(attr.ino.0), libc::O_WRONLY | libc::O_TRUNC)
            .await
            .unwrap();
        a.write(o.fh, 0, b"local edit").unwrap();
        // The whole cluster goes away before the close: the bytes must stay pending.
        c.shutdown().await;
        let err = a.flush(o.fh).await.unwrap_err();
        assert!(matches!(err.errno(), libc::EIO | libc::ETIMEDOUT), "{err}");
        a.release(o.fh);
        assert_eq!(a.pending().unwrap().len(), 1);
    }
    // The cluster comes back (on another port); another client's close succeeds meanwhile.
    let c = cluster(&data).await;
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    write_file(&b, "f", b"remote edit").await.unwrap();
    // After a restart of the client, its pending copy is still what it sees (never replaced
    // by a download).
    let a = core(&c, Some(login(&c, "alice").await), &cache_a);
    assert_eq!(read_file(&a, "f").await, b"local edit");
    // Its push comes later than bob's acknowledged close and was based on the version before
    // it: it must not overwrite it. Alice's bytes are kept as a conflict copy next to it.
    let left = a
        .push_pending(Instant::now() + Duration::from_secs(10), false)
        .await
        .unwrap();
    let left = if left.is_empty() {
        left
    } else {
        // The conflict copy itself is pushed by the next pass.
        a.push_pending(Instant::now() + Duration::from_secs(10), false)
            .await
            .unwrap()
    };
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(read_file(&b, "f").await, b"remote edit");
    let copies: Vec<String> = names(&b)
        .await
        .into_iter()
        .filter(|n| n.starts_with("f.conflict-alice-"))
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert_eq!(read_file(&b, &copies[0]).await, b"local edit");
    let conflicts = a.status().unwrap().conflicts;
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].kept_as, copies[0]);
    assert!(conflicts[0].in_mount);
    // Alice's next open of the file sees the version that won.
    assert_eq!(read_file(&a, "f").await, b"remote edit");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_close_that_waits_replaces_a_newer_version_last_close_wins() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    write_file(&a, "f", b"base").await.unwrap();
    // Both open the same version; bob closes first, alice last.
    let attr = a.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    let oa = a.open(NodeId(attr.ino.0), libc::O_RDWR).await.unwrap();
    write_file(&b, "f", b"bob's").await.unwrap();
    a.write(oa.fh, 0, b"alice's").unwrap();
    a.flush(oa.fh).await.unwrap();
    a.release(oa.fh);
    assert_eq!(read_file(&b, "f").await, b"alice's");
    assert!(
        names(&b).await.iter().all(|n| !n.contains(".conflict-")),
        "no conflict copy for closes serialised by the lock"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_operations_map_to_the_right_errno() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let d = NodeId(
        a.mkdir(NodeId::ROOT, OsStr::new("d"), 0o755)
            .await
            .unwrap()
            .ino
            .0,
    );
    a.mkdir(d, OsStr::new("sub"), 0o755).await.unwrap();
    let errno = |r: Result<(), FsError>| r.unwrap_err().errno();
    assert_eq!(
        errno(a.rmdir(NodeId::ROOT, OsStr::new("d")).await),
        libc::ENOTEMPTY
    );
    assert_eq!(
        errno(a.unlink(NodeId::ROOT, OsStr::new("d")).await),
        libc::EISDIR
    );
    let into_itself = a
        .rename(NodeId::ROOT, OsStr::new("d"), d, OsStr::new("x"), 0)
        .await;
    assert_eq!(errno(into_itself), libc::EINVAL);
    assert_eq!(
        errno(a.unlink(NodeId::ROOT, OsStr::new("missing")).await),
        libc::ENOENT
    );
    let long = "n".repeat(256);
    let err = a.lookup(NodeId::ROOT, OsStr::new(&long)).await.unwrap_err();
    assert_eq!(err.errno(), libc::ENAMETOOLONG);
    let err = a
        .mkdir(NodeId::ROOT, OsStr::new("d"), 0o755)
        .await
        .unwrap_err();
    assert_eq!(err.errno(), libc::EEXIST);
    let target = std::path::Path::new("d/sub");
    let l = a
        .symlink(NodeId::ROOT, OsStr::new("link"), target)
        .await
        .unwrap();
    assert_eq!(a.readlink(NodeId(l.ino.0)).await.unwrap(), "d/sub");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_truncating_open_of_an_uncached_file_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    write_file(&a, "f", b"something").await.unwrap();
    // B has no copy: `: > f` opens with O_TRUNC and writes nothing.
    let attr = b.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    let o = b
        .open(NodeId(attr.ino.0), libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    b.flush(o.fh).await.unwrap();
    b.release(o.fh);
    assert_eq!(
        read_file(&a, "f").await,
        b"",
        "the truncation reached the servers"
    );
    assert_eq!(read_file(&b, "f").await, b"", "and B's cache is not stale");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_write_cut_off_by_a_crash_is_set_aside_not_served_as_clean() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let alice = login(&c, "alice").await;
    let cache_a = dir.path().join("a");
    {
        let a = core(&c, Some(alice.clone()), &cache_a);
        write_file(&a, "f", b"acknowledged").await.unwrap();
        let attr = a.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
        let o = a
            .open(NodeId(attr.ino.0), libc::O_WRONLY | libc::O_TRUNC)
            .await
            .unwrap();
        a.write(o.fh, 0, b"half").unwrap();
        // The client dies here: no flush, no release.
    }
    let a = core(&c, Some(alice), &cache_a);
    assert_eq!(
        read_file(&a, "f").await,
        b"acknowledged",
        "the server version is served again"
    );
    assert!(
        a.pending().unwrap().is_empty(),
        "the cut-off write is not pushed over it"
    );
    let saved: Vec<_> = std::fs::read_dir(cache_a.join("recovered"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(saved.len(), 1);
    assert_eq!(
        std::fs::read(saved[0].path()).unwrap(),
        b"half",
        "and not deleted either"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writeback_close_returns_before_the_push_and_another_client_still_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = std::sync::Arc::new(core_with(
        &c,
        Some(login(&c, "alice").await),
        &dir.path().join("a"),
        true,
    ));
    let b = std::sync::Arc::new(core(
        &c,
        Some(login(&c, "alice").await),
        &dir.path().join("b"),
    ));
    write_file(&a, "f", b"old").await.unwrap();
    // Nothing pushes yet (no uploader runs): the close returned with the change pending.
    let uploads = a.remote().stats.uploads.load(Ordering::Relaxed);
    assert_eq!(uploads, 0, "write-back close pushed nothing itself");
    assert_eq!(a.pending().unwrap().len(), 1);
    // Another client's open waits for the announced push, and sees the new content.
    let reader = {
        let b = b.clone();
        tokio::spawn(async move { read_file(&b, "f").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !reader.is_finished(),
        "the open waits for the announced push"
    );
    let cancel = tokio_util::sync::CancellationToken::new();
    let uploader = tokio::spawn(a.clone().run_uploader(cancel.clone()));
    assert_eq!(reader.await.unwrap(), b"old");
    assert!(a.pending().unwrap().is_empty());
    // fsync waits for the servers in write-back mode too.
    let attr = a.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    cancel.cancel();
    uploader.await.unwrap();
    let o = a
        .open(NodeId(attr.ino.0), libc::O_WRONLY | libc::O_TRUNC)
        .await
        .unwrap();
    a.write(o.fh, 0, b"synced").unwrap();
    a.fsync(o.fh).await.unwrap();
    assert!(a.pending().unwrap().is_empty(), "fsync pushed");
    a.release(o.fh);
    assert_eq!(read_file(&b, "f").await, b"synced");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_writeback_close_survives_a_client_crash_and_is_pushed_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let alice = login(&c, "alice").await;
    let a = core_with(&c, Some(alice.clone()), &dir.path().join("a"), true);
    write_file(&a, "f", b"written before the crash")
        .await
        .unwrap();
    // kill -9 right after close returned: the cache as the dead process left it.
    crash_image(&dir.path().join("a"), &dir.path().join("a2"));
    drop(a);
    let a2 = core_with(&c, Some(alice), &dir.path().join("a2"), true);
    assert_eq!(
        a2.pending().unwrap().len(),
        1,
        "the close's record survived"
    );
    let left = a2
        .push_pending(Instant::now() + Duration::from_secs(10), false)
        .await
        .unwrap();
    assert!(left.is_empty());
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    assert_eq!(read_file(&b, "f").await, b"written before the crash");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_default_mode_close_is_on_two_servers_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    write_file(&a, "f", b"durable").await.unwrap();
    let attr = a.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    let meta = a.remote().get(NodeId(attr.ino.0)).await.unwrap();
    assert_eq!(meta.version, 1);
    assert!(meta.holders.len() >= 2, "holders {:?}", meta.holders);
    assert!(meta.holders.contains(&meta.primary.unwrap()));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chmod_and_utimes_while_open_fold_into_the_push() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let (attr, o) = a
        .create(NodeId::ROOT, OsStr::new("t"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let id = NodeId(attr.ino.0);
    a.write(o.fh, 0, b"tar member").unwrap();
    let when = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let shown = a
        .setattr(
            id,
            AttrChange {
                mode: Some(0o600),
                mtime: Some(when),
                ..AttrChange::default()
            },
            Some(o.fh),
        )
        .await
        .unwrap();
    assert_eq!(shown.perm, 0o600, "shown locally at once");
    let before = a.remote().get(id).await.unwrap();
    assert_eq!(before.mode, 0o644, "not sent on its own");
    a.flush(o.fh).await.unwrap();
    a.release(o.fh);
    let after = a.remote().get(id).await.unwrap();
    assert_eq!((after.mode, after.version), (0o600, 1));
    assert_eq!(after.mtime_ns, 1_000_000_000 * 1_000_000_000);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writeback_closes_are_pushed_in_batches_with_their_folded_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core_with(
        &c,
        Some(login(&c, "alice").await),
        &dir.path().join("a"),
        true,
    );
    for i in 0..12 {
        write_file(&a, &format!("f{i}"), format!("file {i}").as_bytes())
            .await
            .unwrap();
    }
    // tar's chmod after close, while the push is pending: folded into the batched push.
    let f3 = a.lookup(NodeId::ROOT, OsStr::new("f3")).await.unwrap();
    a.setattr(
        NodeId(f3.ino.0),
        AttrChange {
            mode: Some(0o600),
            ..AttrChange::default()
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(a.pending().unwrap().len(), 12);
    let left = a
        .push_pending(Instant::now() + Duration::from_secs(10), false)
        .await
        .unwrap();
    assert!(left.is_empty(), "left {left:?}");
    let stats = &a.remote().stats;
    assert_eq!(stats.uploads.load(Ordering::Relaxed), 12);
    let batches = stats.batches.load(Ordering::Relaxed);
    assert!(
        (1..=3).contains(&batches),
        "12 small files over 3 primaries go in at most 3 batches, not one by one ({batches})"
    );
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    for i in 0..12 {
        assert_eq!(
            read_file(&b, &format!("f{i}")).await,
            format!("file {i}").as_bytes()
        );
    }
    let meta = b.remote().get(NodeId(f3.ino.0)).await.unwrap();
    assert_eq!((meta.mode, meta.version), (0o600, 1));
    assert!(meta.holders.len() >= 2, "holders {:?}", meta.holders);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn names_known_absent_here_never_hide_another_clients_create_past_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    let d = a.mkdir(NodeId::ROOT, OsStr::new("d"), 0o755).await.unwrap();
    let d = NodeId(d.ino.0);
    // Made here: a new name in it is absent without asking; names made or moved here are found.
    let err = a.lookup(d, OsStr::new("new")).await.unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    let (_, o) = a
        .create(d, OsStr::new("mine"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    a.release(o.fh);
    a.lookup(d, OsStr::new("mine")).await.unwrap();
    a.rename(d, OsStr::new("mine"), d, OsStr::new("moved"), 0)
        .await
        .unwrap();
    a.lookup(d, OsStr::new("moved")).await.unwrap();
    assert_eq!(
        a.lookup(d, OsStr::new("mine")).await.unwrap_err().errno(),
        libc::ENOENT
    );
    // Another client's create shows within the metadata bound (ATTR_TTL) at the latest.
    let bd = NodeId(b.lookup(NodeId::ROOT, OsStr::new("d")).await.unwrap().ino.0);
    let (_, o) = b
        .create(bd, OsStr::new("theirs"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    b.release(o.fh);
    tokio::time::sleep(dfs_fuse::fs::ATTR_TTL + Duration::from_millis(50)).await;
    a.lookup(d, OsStr::new("theirs")).await.unwrap();
    // And a create refused because the name exists makes this client ask again at once.
    let (_, o) = b
        .create(bd, OsStr::new("race"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    b.release(o.fh);
    assert_eq!(
        a.lookup(d, OsStr::new("race")).await.unwrap_err().errno(),
        libc::ENOENT,
        "still within the bound of the listing"
    );
    assert!(a.mkdir(d, OsStr::new("race"), 0o755).await.is_err());
    a.lookup(d, OsStr::new("race")).await.unwrap();
    c.shutdown().await;
}

/// A small tmpfs mounted for the test's lifetime (needs root, as every mount test here).
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs for the test (needs root)");
        SmallDisk(at.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_full_local_cache_is_enospc_not_eio() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let big = vec![7u8; 3 << 20];
    write_file(&a, "big.bin", &big).await.unwrap();
    // A second client whose cache disk is smaller than the file.
    let disk = SmallDisk::mount(&dir.path().join("small"), "1m");
    let b = core(&c, Some(login(&c, "alice").await), &disk.0);
    let attr = b.lookup(NodeId::ROOT, OsStr::new("big.bin")).await.unwrap();
    let Err(e) = b.open(NodeId(attr.ino.0), libc::O_RDONLY).await else {
        panic!("a 3 MiB copy fit into a 1 MiB cache");
    };
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_eq!(
        b.remote().stats.downloads.load(Ordering::Relaxed),
        0,
        "no copy counted as downloaded"
    );
    drop(b);
    drop(disk);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_keeps_its_budget_and_evicts_only_clean_closed_copies() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    let chunk = vec![7u8; 16 << 10];
    for i in 0..8 {
        write_file(&b, &format!("f{i}"), &chunk).await.unwrap();
    }
    write_file(&b, "keep", b"held open").await.unwrap();
    let budget = 64 << 10;
    let a = support::core_with_config(
        &c.directory_url,
        Some(login(&c, "alice").await),
        &dir.path().join("a"),
        dfs_fuse::fs::FsConfig {
            writeback: true,
            cache_size: Some(budget),
            ..Default::default()
        },
    );
    assert_eq!(a.cache_budget(), budget);
    // A change not on the servers yet (write-back, no uploader running) and an open file.
    let mine = vec![1u8; 40 << 10];
    write_file(&a, "mine", &mine).await.unwrap();
    assert_eq!(a.pending().unwrap().len(), 1);
    let keep = a.lookup(NodeId::ROOT, OsStr::new("keep")).await.unwrap();
    let held = a.open(NodeId(keep.ino.0), libc::O_RDONLY).await.unwrap();
    for i in 0..8 {
        assert_eq!(read_file(&a, &format!("f{i}")).await, chunk);
    }
    let before = a.status().unwrap().cached_bytes;
    assert!(before > budget, "{before}");
    let freed = a.evict().unwrap();
    assert!(freed > 0);
    let after = a.status().unwrap().cached_bytes;
    assert!(after <= budget, "{after} bytes cached, budget {budget}");
    // Never evicted: the pending change and the open file.
    assert_eq!(a.pending().unwrap().len(), 1);
    assert_eq!(read_file(&a, "mine").await, mine);
    assert_eq!(a.read(held.fh, 0, 100).unwrap(), b"held open");
    a.release(held.fh);
    // An evicted file is fetched again.
    let downloads = a.remote().stats.downloads.load(Ordering::Relaxed);
    assert_eq!(read_file(&a, "f0").await, chunk);
    assert_eq!(
        a.remote().stats.downloads.load(Ordering::Relaxed),
        downloads + 1,
        "the least recently opened copy was evicted"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_push_refused_for_permission_is_kept_aside_not_retried_forever() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let b = core(&c, Some(login(&c, "bob").await), &dir.path().join("b"));
    let (attr, o) = a
        .create(NodeId::ROOT, OsStr::new("shared"), 0o666, libc::O_WRONLY)
        .await
        .unwrap();
    a.write(o.fh, 0, b"alice\n").unwrap();
    a.flush(o.fh).await.unwrap();
    a.release(o.fh);
    let node = NodeId(attr.ino.0);
    // Bob opens it while anyone may write it; Alice takes that away before his close.
    b.lookup(NodeId::ROOT, OsStr::new("shared")).await.unwrap();
    let o = b.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
    b.write(o.fh, 0, b"bob\n").unwrap();
    let change = AttrChange {
        mode: Some(0o644),
        ..AttrChange::default()
    };
    a.setattr(node, change, None).await.unwrap();
    let e = b.flush(o.fh).await.expect_err("no permission any more");
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    b.release(o.fh);
    // Bob's bytes are not lost and not pending for ever: the background push keeps them
    // aside and lists them.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await; // past the retry interval
        b.push_pending(tokio::time::Instant::now() + Duration::from_secs(10), false)
            .await
            .unwrap();
    }
    assert!(
        b.unsettled().unwrap().is_empty(),
        "nothing retried for ever"
    );
    let notes = b.conflicts();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(read_file(&a, "shared").await, b"alice\n");
    let copy = a
        .lookup(NodeId::ROOT, OsStr::new(&notes[0].kept_as))
        .await
        .unwrap();
    let o = a.open(NodeId(copy.ino.0), libc::O_RDONLY).await;
    // The copy is Bob's (0644 from the original's mode): Alice may read it.
    let o = o.unwrap();
    assert_eq!(a.read(o.fh, 0, 100).unwrap(), b"bob\n");
    a.release(o.fh);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_unlinking_one_name_of_a_linked_file_keeps_its_pending_copy() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = std::sync::Arc::new(core_with(
        &c,
        Some(login(&c, "alice").await),
        &dir.path().join("a"),
        true,
    ));
    let b = core(&c, Some(login(&c, "alice").await), &dir.path().join("b"));
    write_file(&a, "f", b"pending").await.unwrap();
    assert_eq!(a.pending().unwrap().len(), 1, "write-back: not pushed yet");
    let f = a.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    let g = a
        .link(NodeId(f.ino.0), NodeId::ROOT, OsStr::new("g"))
        .await
        .unwrap();
    assert_eq!((g.ino, g.nlink), (f.ino, 2));
    // One of two names goes: the copy, and its change, stay.
    a.unlink(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    assert_eq!(a.pending().unwrap().len(), 1, "the pending change is kept");
    assert_eq!(a.getattr(NodeId(f.ino.0)).await.unwrap().0.nlink, 1);
    let cancel = tokio_util::sync::CancellationToken::new();
    let uploader = tokio::spawn(a.clone().run_uploader(cancel.clone()));
    assert_eq!(read_file(&b, "g").await, b"pending");
    cancel.cancel();
    uploader.await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn access_answers_for_this_mounts_user_with_the_clusters_rules() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let b = core(&c, Some(login(&c, "bob").await), &dir.path().join("b"));
    let (_, o) = a
        .create(NodeId::ROOT, OsStr::new("f"), 0o640, libc::O_WRONLY)
        .await
        .unwrap();
    a.flush(o.fh).await.unwrap();
    a.release(o.fh);
    let d = a.mkdir(NodeId::ROOT, OsStr::new("d"), 0o711).await.unwrap();
    let f = NodeId(b.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap().ino.0);
    let d = NodeId(d.ino.0);
    let errno = |r: Result<(), FsError>| r.map_err(|e| e.errno());
    assert_eq!(errno(a.access(f, libc::R_OK | libc::W_OK).await), Ok(()));
    assert_eq!(
        errno(a.access(f, libc::X_OK).await),
        Err(libc::EACCES),
        "no x bit"
    );
    assert_eq!(errno(b.access(f, libc::F_OK).await), Ok(()));
    assert_eq!(errno(b.access(f, libc::R_OK).await), Err(libc::EACCES));
    assert_eq!(errno(b.access(d, libc::X_OK).await), Ok(()));
    assert_eq!(
        errno(b.access(d, libc::R_OK | libc::X_OK).await),
        Err(libc::EACCES)
    );
    assert_eq!(
        errno(b.access(NodeId(9999), libc::F_OK).await),
        Err(libc::ENOENT)
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_utimes_with_an_atime_still_folds_the_mtime_of_an_open_file() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let (attr, o) = a
        .create(NodeId::ROOT, OsStr::new("t"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let id = NodeId(attr.ino.0);
    a.write(o.fh, 0, b"tar member").unwrap();
    // tar and `cp -p` set both times on the open file: the push must not put its commit
    // time over the mtime.
    let atime = std::time::UNIX_EPOCH + Duration::from_secs(1_100_000_000);
    let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    a.setattr(
        id,
        AttrChange {
            atime: Some(atime),
            mtime: Some(mtime),
            ..AttrChange::default()
        },
        Some(o.fh),
    )
    .await
    .unwrap();
    a.flush(o.fh).await.unwrap();
    a.release(o.fh);
    let after = a.remote().get(id).await.unwrap();
    assert_eq!(after.version, 1);
    assert_eq!(after.mtime_ns, 1_000_000_000 * 1_000_000_000);
    assert_eq!(after.atime_ns, 1_100_000_000 * 1_000_000_000);
    c.shutdown().await;
}

/// A `--local-ids` core: the administrator's login ("admin", made one with the cluster key),
/// acting for each local caller named with `caller::scope`. Also makes `/shared`, 0777.
async fn local_ids_core(c: &ClusterHandle, cache: &std::path::Path) -> (DfsFs, NodeId) {
    let r = Remote::new(&c.directory_url, None, None, RemoteConfig::default()).expect("client");
    let _ = r.signup("admin", "password123").await;
    let set = common::api::SetUserRequest {
        admin: Some(true),
        ..Default::default()
    };
    r.set_user("admin", &set, &c.cluster_key).await.unwrap();
    let admin = r.login("admin", "password123").await.unwrap();
    let fs = core(c, Some(admin), cache);
    fs.remote().set_local_ids(true);
    let shared = match fs.lookup(NodeId::ROOT, OsStr::new("shared")).await {
        Ok(a) => NodeId(a.ino.0),
        Err(_) => {
            let a = fs
                .mkdir(NodeId::ROOT, OsStr::new("shared"), 0o777)
                .await
                .unwrap();
            NodeId(a.ino.0)
        }
    };
    (fs, shared)
}

/// A local user of a `--local-ids` mount (its private group has its uid).
fn local(uid: u32) -> common::Identity {
    common::Identity {
        uid,
        gid: uid,
        groups: vec![],
        admin: false,
    }
}

/// Runs `f` as local user `who` on a `--local-ids` core.
async fn as_user<F: std::future::Future>(who: u32, f: F) -> F::Output {
    dfs_fuse::caller::scope(Some(local(who)), f).await
}

/// A file `name` in `dir` made by `who` (mode `mode`) with `data` pushed, and its node.
async fn make_as(fs: &DfsFs, who: u32, dir: NodeId, name: &str, mode: u32, data: &[u8]) -> NodeId {
    as_user(who, async {
        let (attr, o) = fs
            .create(dir, OsStr::new(name), mode, libc::O_WRONLY)
            .await
            .unwrap();
        fs.write(o.fh, 0, data).unwrap();
        fs.flush(o.fh).await.unwrap();
        fs.release(o.fh);
        NodeId(attr.ino.0)
    })
    .await
}

/// The content of `node` as the servers hold it (read through a fresh core of `login`).
async fn server_content(c: &ClusterHandle, node: NodeId, cache: &std::path::Path) -> Vec<u8> {
    let r = core(c, Some(login(c, "reader").await), cache);
    let meta = r.remote().get(node).await.unwrap();
    let tmp = cache.join("content");
    r.remote().download(&meta, &tmp).await.unwrap();
    std::fs::read(&tmp).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_readers_fsync_never_moves_a_writers_pending_change_aside() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let (fs, shared) = local_ids_core(&c, &dir.path().join("a")).await;
    let node = make_as(&fs, 1000, shared, "notes", 0o644, b"one\n").await;
    // Alice's change is recorded as pending by her close (released without a flush, as
    // after an mmap write), not pushed yet.
    as_user(1000, async {
        let o = fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
        fs.write(o.fh, 0, b"two\n").unwrap();
        fs.release(o.fh);
    })
    .await;
    assert_eq!(fs.pending().unwrap(), vec![node]);
    // Bob may read it, not write it: his fsync must not push as him, nor take the change away.
    as_user(1001, async {
        let o = fs.open(node, libc::O_RDONLY).await.unwrap();
        let _ = fs.fsync(o.fh).await;
        fs.release(o.fh);
    })
    .await;
    assert!(fs.conflicts().is_empty(), "{:?}", fs.conflicts());
    let names: Vec<String> = {
        let fh = fs.opendir(shared).await.unwrap();
        let n = fs
            .listing(fh)
            .unwrap()
            .iter()
            .map(|i| i.name.clone())
            .collect();
        fs.releasedir(fh);
        n
    };
    assert_eq!(names, [".", "..", "notes"], "no conflict copy");
    // Alice's change is on the servers, or still pending to be pushed as her.
    fs.push_pending(Instant::now() + Duration::from_secs(10), false)
        .await
        .unwrap();
    assert!(fs.pending().unwrap().is_empty());
    assert_eq!(
        server_content(&c, node, &dir.path().join("r")).await,
        b"two\n"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_owners_chmod_goes_through_while_another_local_user_writes() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let (fs, shared) = local_ids_core(&c, &dir.path().join("a")).await;
    let node = make_as(&fs, 1000, shared, "f", 0o666, b"one\n").await;
    // Bob writes the file (anyone may); meanwhile Alice, its owner, takes that away.
    let o = as_user(1001, fs.open(node, libc::O_WRONLY)).await.unwrap();
    fs.write(o.fh, 0, b"bob\n").unwrap();
    let chmod = AttrChange {
        mode: Some(0o600),
        ..AttrChange::default()
    };
    as_user(1000, fs.setattr(node, chmod, None)).await.unwrap();
    assert_eq!(
        fs.remote().get(node).await.unwrap().mode & 0o7777,
        0o600,
        "the owner's chmod is at the directory at once, not folded into Bob's push"
    );
    // Bob's close is judged with the new mode, and never undoes or fails for her chmod.
    let e = fs
        .flush(o.fh)
        .await
        .expect_err("Bob may not write any more");
    assert_eq!(e.errno(), libc::EACCES, "{e}");
    fs.release(o.fh);
    assert_eq!(fs.remote().get(node).await.unwrap().mode & 0o7777, 0o600);
    // A time the writer sets on its own open file is still folded (tar, `cp -p`).
    let o = as_user(1000, fs.open(node, libc::O_WRONLY)).await.unwrap();
    fs.write(o.fh, 0, b"alice\n").unwrap();
    let mtime = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let touch = AttrChange {
        mtime: Some(mtime),
        ..AttrChange::default()
    };
    as_user(1000, fs.setattr(node, touch, Some(o.fh)))
        .await
        .unwrap();
    as_user(1000, fs.flush(o.fh)).await.unwrap();
    fs.release(o.fh);
    let after = fs.remote().get(node).await.unwrap();
    assert_eq!(after.mtime_ns, 1_000_000_000 * 1_000_000_000);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_folded_chmod_the_directory_drops_fails_the_close() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let (admin, _) = local_ids_core(&c, &dir.path().join("admin")).await;
    let bob = login(&c, "bob").await.id.unwrap();
    let (attr, o) = a
        .create(NodeId::ROOT, OsStr::new("f"), 0o666, libc::O_WRONLY)
        .await
        .unwrap();
    let node = NodeId(attr.ino.0);
    a.write(o.fh, 0, b"alice\n").unwrap();
    let chmod = AttrChange {
        mode: Some(0o640),
        ..AttrChange::default()
    };
    a.setattr(node, chmod, Some(o.fh)).await.unwrap();
    // The administrator gives the file to Bob before Alice's close pushes her chmod.
    let chown = AttrChange {
        uid: Some(bob.uid),
        ..AttrChange::default()
    };
    admin.setattr(node, chown, None).await.unwrap();
    let e = a.flush(o.fh).await.expect_err("her chmod was not applied");
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    a.release(o.fh);
    let meta = a.remote().get(node).await.unwrap();
    assert_eq!(meta.mode & 0o7777, 0o666);
    assert_eq!(meta.version, 1, "the content is committed");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_change_refused_to_its_writer_is_never_pushed_as_the_administrator() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    for writeback in [false, true] {
        let cache = dir.path().join(format!("a{writeback}"));
        let (fs, shared) = local_ids_core(&c, &cache).await;
        let fs = if writeback {
            drop(fs);
            let admin = fs_login_of(&c).await;
            let fs = core_with(&c, Some(admin), &cache, true);
            fs.remote().set_local_ids(true);
            fs
        } else {
            fs
        };
        let name = format!("f{writeback}");
        let node = make_as(&fs, 1000, shared, &name, 0o666, b"one\n").await;
        fs.push_pending(Instant::now() + Duration::from_secs(5), false)
            .await
            .unwrap();
        let o = as_user(1001, fs.open(node, libc::O_WRONLY | libc::O_TRUNC))
            .await
            .unwrap();
        fs.write(o.fh, 0, b"bob\n").unwrap();
        let chmod = AttrChange {
            mode: Some(0o644),
            ..AttrChange::default()
        };
        as_user(1000, fs.setattr(node, chmod, None)).await.unwrap();
        // Default mode: Bob's close is refused. Write-back: it returns, and the push comes later.
        let closed = fs.flush(o.fh).await;
        if !writeback {
            assert_eq!(closed.expect_err("refused").errno(), libc::EACCES);
        }
        fs.release(o.fh);
        // Background pushes act as Bob, not as the mount's administrator login.
        for _ in 0..2 {
            fs.push_pending(Instant::now() + Duration::from_secs(5), false)
                .await
                .unwrap();
        }
        assert_eq!(fs.pending().unwrap(), vec![node], "kept pending");
        assert_eq!(fs.status().unwrap().refused_uploads, vec![node.0]);
        assert!(fs.conflicts().is_empty());
        let meta = fs.remote().get(node).await.unwrap();
        assert_eq!((meta.version, meta.size), (1, 4), "{meta:?}");
    }
    c.shutdown().await;
}

/// The administrator's login again (as made by `local_ids_core`).
async fn fs_login_of(c: &ClusterHandle) -> SavedLogin {
    let r = Remote::new(&c.directory_url, None, None, RemoteConfig::default()).expect("client");
    r.login("admin", "password123").await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_mount_whose_login_lost_the_administrator_flag_fails_at_once_and_keeps_the_change()
 {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let (fs, shared) = local_ids_core(&c, &dir.path().join("a")).await;
    let node = make_as(&fs, 1000, shared, "f", 0o644, b"one\n").await;
    let o = as_user(1000, fs.open(node, libc::O_WRONLY)).await.unwrap();
    fs.write(o.fh, 0, b"two\n").unwrap();
    // The login stops being the administrator (and the mount's token says so).
    let set = common::api::SetUserRequest {
        admin: Some(false),
        ..Default::default()
    };
    fs.remote()
        .set_user("admin", &set, &c.cluster_key)
        .await
        .unwrap();
    fs.remote().login("admin", "password123").await.unwrap();
    let started = std::time::Instant::now();
    let e = fs
        .flush(o.fh)
        .await
        .expect_err("no longer the administrator");
    assert_eq!(e.errno(), libc::EPERM, "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a permanent refusal, not retried until the close timeout: {:?}",
        started.elapsed()
    );
    fs.release(o.fh);
    fs.push_pending(Instant::now() + Duration::from_secs(5), false)
        .await
        .unwrap();
    assert_eq!(fs.pending().unwrap(), vec![node], "the change is kept");
    assert!(fs.conflicts().is_empty());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_change_left_pending_for_a_file_deleted_meanwhile_is_dropped_not_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let cache = dir.path().join("a");
    let (node, shared) = {
        let (fs, shared) = local_ids_core(&c, &cache).await;
        let node = make_as(&fs, 1000, shared, "gone", 0o644, b"v1\n").await;
        as_user(1000, async {
            let o = fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
            fs.write(o.fh, 0, b"v2\n").unwrap();
            fs.release(o.fh);
        })
        .await;
        assert_eq!(fs.pending().unwrap(), vec![node]);
        (node, shared)
    };
    // Deleted by someone else while this client was away; the next run knows neither who
    // made the change nor the file: the push finds it gone and drops the copy.
    let fs = core(&c, Some(fs_login_of(&c).await), &cache);
    fs.remote()
        .remove(shared, &common::ValidName::parse("gone").unwrap(), false)
        .await
        .unwrap();
    fs.remote().set_local_ids(true);
    let _ = fs
        .push_pending(Instant::now() + Duration::from_secs(5), false)
        .await;
    assert!(fs.pending().unwrap().is_empty(), "not stuck pending");
    assert!(fs.remote().get(node).await.is_err_and(|e| e.is_not_found()));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_left_pending_by_an_earlier_run_is_pushed_as_the_files_owner() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let cache = dir.path().join("a");
    let node = {
        let (fs, shared) = local_ids_core(&c, &cache).await;
        let node = make_as(&fs, 1000, shared, "tool", 0o755, b"v1\n").await;
        let suid = AttrChange {
            mode: Some(0o4755),
            ..AttrChange::default()
        };
        as_user(1000, fs.setattr(node, suid, None)).await.unwrap();
        assert_eq!(fs.remote().get(node).await.unwrap().mode & 0o7777, 0o4755);
        as_user(1000, async {
            let o = fs.open(node, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
            fs.write(o.fh, 0, b"v2\n").unwrap();
            fs.release(o.fh);
        })
        .await;
        assert_eq!(fs.pending().unwrap(), vec![node]);
        node
    };
    // The next run does not know who made the change: it pushes as the file's owner, an
    // ordinary user, whose write drops set-user-id (the administrator's would keep it).
    let fs = core(&c, Some(fs_login_of(&c).await), &cache);
    fs.remote().set_local_ids(true);
    fs.push_pending(Instant::now() + Duration::from_secs(5), false)
        .await
        .unwrap();
    assert!(fs.pending().unwrap().is_empty());
    let meta = fs.remote().get(node).await.unwrap();
    assert_eq!((meta.size, meta.mode & 0o7777), (3, 0o755), "{meta:?}");
    c.shutdown().await;
}

/// A client core whose closes wait up to 10 s, over the directory at `url`.
fn patient_core(url: &str, login: SavedLogin, cache: &std::path::Path) -> DfsFs {
    let remote = Remote::new(url, Some(login), None, RemoteConfig::default()).unwrap();
    let config = dfs_fuse::fs::FsConfig {
        close_timeout: Duration::from_secs(10),
        retry_interval: Duration::from_millis(100),
        ..dfs_fuse::fs::FsConfig::default()
    };
    DfsFs::new(remote, cache, config, "").unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_ops_and_closes_ride_out_a_cluster_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cluster");
    // A fixed directory address, so that the restarted cluster is at the same URL.
    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let start = move |data: std::path::PathBuf| async move {
        dfs_server::cluster::start(ClusterConfig::new(data, listen))
            .await
            .unwrap()
    };
    let c = start(data.clone()).await;
    let url = c.directory_url.clone();
    let alice = login(&c, "alice").await;
    let a = patient_core(&url, alice.clone(), &dir.path().join("a"));
    write_file(&a, "before", b"written before").await.unwrap();
    let d = a.mkdir(NodeId::ROOT, OsStr::new("d"), 0o755).await.unwrap();

    // The whole cluster (directory, lock, auth, file servers) goes away for 1.5 s.
    c.shutdown().await;
    let back = tokio::spawn({
        let data = data.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            start(data).await
        }
    });
    let t = Instant::now();
    // A create + write + close, a mkdir and a rename, all started while nothing answers:
    // every one waits for the cluster and succeeds.
    let (written, made, renamed) = tokio::join!(
        write_file(&a, "during", b"written during the outage"),
        a.mkdir(NodeId(d.ino.0), OsStr::new("sub"), 0o755),
        a.rename(
            NodeId::ROOT,
            OsStr::new("before"),
            NodeId::ROOT,
            OsStr::new("renamed"),
            0,
        ),
    );
    let waited = t.elapsed();
    written.unwrap();
    made.unwrap();
    renamed.unwrap();
    assert!(
        waited >= Duration::from_millis(1000),
        "the operations really waited for the restart: {waited:?}"
    );
    let c = back.await.unwrap();
    let mut seen = names(&a).await;
    seen.sort();
    assert_eq!(seen, [".", "..", "d", "during", "renamed"]);

    // Another client sees everything, with its content.
    let b = core(&c, Some(alice), &dir.path().join("b"));
    assert_eq!(read_file(&b, "during").await, b"written during the outage");
    assert_eq!(read_file(&b, "renamed").await, b"written before");
    c.shutdown().await;
}

/// A cluster and two cores of one user on it: A, and B to subscribe to the feed.
async fn two_cores(dir: &std::path::Path) -> (ClusterHandle, DfsFs, std::sync::Arc<DfsFs>) {
    let c = cluster(&dir.join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.join("a"));
    let b = core(&c, Some(login(&c, "alice").await), &dir.join("b"));
    (c, a, std::sync::Arc::new(b))
}

/// What a core asked the kernel to forget (the adapter's `Notifier` thread in a mount).
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<dfs_fuse::fs::feed::Invalidation>>);

impl dfs_fuse::fs::feed::KernelCache for Recorded {
    fn invalidate(&self, batch: Vec<dfs_fuse::fs::feed::Invalidation>) {
        self.0.lock().unwrap().extend(batch);
    }
}

impl Recorded {
    fn has(&self, f: impl Fn(&dfs_fuse::fs::feed::Invalidation) -> bool) -> bool {
        self.0.lock().unwrap().iter().any(f)
    }

    fn count(&self, f: impl Fn(&dfs_fuse::fs::feed::Invalidation) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|i| f(i)).count()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_clients_rename_and_write_reach_this_clients_kernel_through_the_feed() {
    use dfs_fuse::fs::feed::Invalidation;
    let dir = tempfile::tempdir().unwrap();
    let (c, a, b) = two_cores(dir.path()).await;
    let kernel = std::sync::Arc::new(Recorded::default());
    let cancel = subscribed(&b, kernel.clone()).await;
    assert_eq!(
        b.ttl(),
        dfs_fuse::fs::feed::FEED_TTL,
        "long TTLs while healthy"
    );
    let heard = |what: Invalidation| {
        let kernel = kernel.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !kernel.has(|i| *i == what) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            kernel.has(|i| *i == what)
        }
    };

    write_file(&a, "f", b"one").await.unwrap();
    assert!(
        heard(Invalidation::Inode(NodeId::ROOT)).await,
        "A's create reaches B"
    );
    let f = b.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    let f = NodeId(f.ino.0);
    assert_eq!(b.getattr(f).await.unwrap().0.size, 3);
    // B's own change never comes back to it.
    let mine = b
        .mkdir(NodeId::ROOT, OsStr::new("mine"), 0o755)
        .await
        .unwrap();
    let mine = NodeId(mine.ino.0);
    // B lists the root: it knows it completely, and would answer "g" absent without asking
    // for the long TTL, unless the feed tells it the root changed.
    let mut listed = names(&b).await;
    listed.sort();
    assert_eq!(listed, [".", "..", "f", "mine"]);
    kernel.0.lock().unwrap().clear();

    let rename = common::api::RenameRequest {
        parent: NodeId::ROOT,
        name: common::ValidName::parse("f").unwrap(),
        new_parent: NodeId::ROOT,
        new_name: common::ValidName::parse("g").unwrap(),
        no_replace: false,
    };
    a.remote().rename(&rename).await.unwrap();
    assert!(
        heard(Invalidation::Entry {
            parent: NodeId::ROOT,
            name: "f".into()
        })
        .await,
        "the old name is dropped from the kernel"
    );
    assert!(heard(Invalidation::Inode(NodeId::ROOT)).await);
    assert_eq!(
        b.lookup(NodeId::ROOT, OsStr::new("g")).await.unwrap().ino.0,
        f.0,
        "B no longer trusts its listing of the root, well within the TTL"
    );
    assert!(b.lookup(NodeId::ROOT, OsStr::new("f")).await.is_err());
    assert!(
        !kernel.has(|i| *i == Invalidation::Inode(mine)),
        "B's own mkdir (published before A's rename) is not echoed"
    );

    // A new version: B's attributes of the file are dropped, and asked again.
    write_file(&a, "g", b"a longer second version")
        .await
        .unwrap();
    kernel.0.lock().unwrap().clear();
    write_file(&a, "g", b"third, longer still, version")
        .await
        .unwrap();
    assert!(heard(Invalidation::Inode(f)).await);
    assert_eq!(b.getattr(f).await.unwrap().0.size, 28);
    cancel.cancel();
    c.shutdown().await;
}

/// A loopback proxy in front of the directory that, while `lose` is set, forwards namespace
/// changes (requests carrying a request id) to the directory but never their answers: the
/// directory applies them and the client hears nothing (the proxy closes the client's
/// connection, and keeps the directory's open until it answered, unheard).
struct AnswerLosingProxy {
    url: String,
    lose: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn answer_losing_proxy(directory_url: &str) -> AnswerLosingProxy {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = directory_url.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let lose = Arc::new(AtomicBool::new(false));
    let losing = lose.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let losing = losing.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let swallow = Arc::new(AtomicBool::new(false));
                let swallowing = swallow.clone();
                let requests = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match from_client.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let change = buf[..n]
                            .windows(common::routes::REQUEST_ID.len())
                            .any(|w| w.eq_ignore_ascii_case(common::routes::REQUEST_ID.as_bytes()));
                        let lost = change && losing.load(Ordering::SeqCst);
                        if lost {
                            // Set before the request goes on: its answer is never passed back.
                            swallowing.store(true, Ordering::SeqCst);
                        }
                        if to_server.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if lost {
                            // Nothing more on this connection; the directory's side stays open
                            // (a half-closed connection may cancel the request there).
                            std::future::pending::<()>().await;
                        }
                    }
                });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match from_server.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if swallow.load(Ordering::SeqCst) {
                        // The client's connection ends without the answer; the directory's
                        // answer is read and dropped until it closes (bounded).
                        let _ = to_client.shutdown().await;
                        drop(to_client);
                        let drain = async {
                            while let Ok(n) = from_server.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
                        break;
                    }
                    if to_client.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                requests.abort();
            });
        }
    });
    AnswerLosingProxy { url, lose }
}

/// A loopback proxy in front of the directory that counts the listing requests (pages of
/// `/children`) passing through it.
async fn listing_counting_proxy(
    directory_url: &str,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    counting_proxy(directory_url, b"/children?").await
}

/// A loopback proxy in front of the directory that counts the requests whose text contains
/// `pattern`.
async fn counting_proxy(
    directory_url: &str,
    pattern: &'static [u8],
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = directory_url.trim_start_matches("http://").to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counting = count.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let counting = counting.clone();
            tokio::spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let answers = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = from_client.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let pages = buf[..n].windows(pattern.len());
                    let pages = pages.filter(|w| *w == pattern).count();
                    counting.fetch_add(pages, Ordering::SeqCst);
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                answers.abort();
            });
        }
    });
    (url, count)
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_clients_own_push_does_not_come_back_through_its_feed() {
    use dfs_fuse::fs::feed::Invalidation;
    let dir = tempfile::tempdir().unwrap();
    let (_c, a, b) = two_cores(dir.path()).await;
    let a = std::sync::Arc::new(a);
    let heard_by_a = std::sync::Arc::new(Recorded::default());
    let heard_by_b = std::sync::Arc::new(Recorded::default());
    let _ca = subscribed(&a, heard_by_a.clone()).await;
    let _cb = subscribed(&b, heard_by_b.clone()).await;
    let f = b
        .create(NodeId::ROOT, OsStr::new("f"), 0o644, libc::O_WRONLY)
        .await
        .unwrap();
    let node = NodeId(f.0.ino.0);
    b.write(f.1.fh, 0, b"mine").unwrap();
    b.flush(f.1.fh).await.unwrap();
    b.release(f.1.fh);
    // Another client hears the new version (the commit is published) ...
    let deadline = Instant::now() + Duration::from_secs(5);
    while !heard_by_a.has(|i| *i == Invalidation::Inode(node)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(heard_by_a.has(|i| *i == Invalidation::Inode(node)));
    // ... the writer does not: it knows its own push (its answer), and a change it made
    // itself coming back would cost it a poll answer, a second invalidation and a refetch.
    // Its kernel drops the node's attributes once, told by the push itself (the kernel may
    // hold attributes from before the commit).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let told = heard_by_b.count(|i| *i == Invalidation::Inode(node));
    assert_eq!(
        told,
        1,
        "the writer's kernel is told of its own push once, by the push, never by the feed: {:?}",
        heard_by_b.0.lock().unwrap()
    );
    assert_eq!(b.getattr(node).await.unwrap().0.size, 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_mounts_first_subscription_does_not_make_its_namespace_ops_ask_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let (url, gets) = counting_proxy(&c.directory_url, b"GET /v1/nodes/").await;
    let b = std::sync::Arc::new(patient_core(
        &url,
        login(&c, "alice").await,
        &dir.path().join("b"),
    ));
    let _cancel = subscribed(&b, std::sync::Arc::new(Recorded::default())).await;
    // Well within `FEED_RACE` of the subscription: what is heard now is fresh (nothing was
    // missed by a feed that never ran before), so a namespace op and the attributes after
    // it cost no extra request.
    b.getattr(NodeId::ROOT).await.unwrap();
    b.mkdir(NodeId::ROOT, OsStr::new("d"), 0o755).await.unwrap();
    let before = gets.load(Ordering::SeqCst);
    for _ in 0..5 {
        b.getattr(NodeId::ROOT).await.unwrap();
    }
    assert_eq!(
        gets.load(Ordering::SeqCst) - before,
        0,
        "the root's attributes came from what this client heard, not the directory"
    );
    // A loss later still distrusts what is heard for a while.
    b.feed_lost();
    b.getattr(NodeId::ROOT).await.unwrap();
    b.getattr(NodeId::ROOT).await.unwrap();
    assert!(gets.load(Ordering::SeqCst) - before >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_lookups_in_parallel_in_one_directory_share_one_listing() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(&dir.path().join("cluster")).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.path().join("a"));
    let (url, listings) = listing_counting_proxy(&c.directory_url).await;
    let b = std::sync::Arc::new(patient_core(
        &url,
        login(&c, "alice").await,
        &dir.path().join("b"),
    ));
    for i in 0..3 {
        write_file(&a, &format!("f{i}"), b"x").await.unwrap();
    }
    // B knows the directory completely, then that view is older than its TTL (no feed: 1 s):
    // a lookup of an absent name lists the small directory again.
    assert!(names(&b).await.len() >= 3);
    tokio::time::sleep(dfs_fuse::fs::ATTR_TTL + Duration::from_millis(200)).await;
    let before = listings.load(Ordering::SeqCst);
    let lookups: Vec<_> = (0..16)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move { b.lookup(NodeId::ROOT, OsStr::new(&format!("x{i}"))).await })
        })
        .collect();
    for l in lookups {
        let r = l.await.unwrap();
        assert!(r.as_ref().is_err_and(|e| e.is_not_found()), "{r:?}");
    }
    assert_eq!(
        listings.load(Ordering::SeqCst) - before,
        1,
        "one listing answers every lookup that waited for it"
    );
    c.shutdown().await;
}

/// A core whose directory calls go through `url` and give up after about a second.
fn impatient_core(url: &str, login: SavedLogin, cache: &std::path::Path) -> DfsFs {
    let config = RemoteConfig {
        call_timeout: Duration::from_millis(400),
        op_timeout: Duration::from_secs(1),
        ..RemoteConfig::default()
    };
    let remote = Remote::new(url, Some(login), None, config).unwrap();
    let config = dfs_fuse::fs::FsConfig {
        close_timeout: Duration::from_secs(2),
        retry_interval: Duration::from_millis(100),
        ..dfs_fuse::fs::FsConfig::default()
    };
    DfsFs::new(remote, cache, config, "").unwrap()
}

/// Starts `fs`'s feed into `kernel` and waits until it is healthy.
async fn subscribed(
    fs: &std::sync::Arc<DfsFs>,
    kernel: std::sync::Arc<dyn dfs_fuse::fs::feed::KernelCache>,
) -> tokio_util::sync::CancellationToken {
    fs.set_kernel_cache(kernel);
    let cancel = tokio_util::sync::CancellationToken::new();
    tokio::spawn(fs.clone().run_feed(cancel.clone()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs.feed_up() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(fs.feed_up(), "subscribed");
    cancel
}

/// A cluster, A on it, and B through an answer-losing proxy, subscribed to the feed into a
/// recorded kernel.
async fn answers_lost_for_b(
    dir: &std::path::Path,
) -> (
    ClusterHandle,
    AnswerLosingProxy,
    DfsFs,
    std::sync::Arc<DfsFs>,
    std::sync::Arc<Recorded>,
    tokio_util::sync::CancellationToken,
) {
    let c = cluster(&dir.join("cluster")).await;
    let proxy = answer_losing_proxy(&c.directory_url).await;
    let a = core(&c, Some(login(&c, "alice").await), &dir.join("a"));
    let b = std::sync::Arc::new(impatient_core(
        &proxy.url,
        login(&c, "alice").await,
        &dir.join("b"),
    ));
    let kernel = std::sync::Arc::new(Recorded::default());
    let cancel = subscribed(&b, kernel.clone()).await;
    (c, proxy, a, b, kernel, cancel)
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_an_unlink_or_rename_applied_without_an_answer_leaves_no_long_kernel_entry() {
    use dfs_fuse::fs::ATTR_TTL;
    use dfs_fuse::fs::feed::{FEED_TTL, Invalidation};
    let dir = tempfile::tempdir().unwrap();
    let (c, proxy, a, b, kernel, cancel) = answers_lost_for_b(dir.path()).await;
    write_file(&a, "f", b"one").await.unwrap();
    write_file(&a, "g", b"two").await.unwrap();
    let f = NodeId(b.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap().ino.0);
    let g = NodeId(b.lookup(NodeId::ROOT, OsStr::new("g")).await.unwrap().ino.0);
    assert_eq!(
        b.reply_ttl(Instant::now(), &[NodeId::ROOT, f]),
        FEED_TTL,
        "B's kernel would hold f for the long TTL"
    );
    kernel.0.lock().unwrap().clear();

    // B's unlink reaches the directory, which applies it; its answer never comes back.
    proxy.lose.store(true, Ordering::SeqCst);
    let err = b
        .unlink(NodeId::ROOT, OsStr::new("f"))
        .await
        .expect_err("no answer");
    proxy.lose.store(false, Ordering::SeqCst);
    assert!(matches!(err.errno(), libc::EIO | libc::ETIMEDOUT), "{err}");
    assert!(
        a.lookup(NodeId::ROOT, OsStr::new("f")).await.is_err(),
        "the directory applied it"
    );
    // B's own change never comes back in its feed: B itself drops the name from its kernel,
    // and gives the short TTL to what it says of that directory now.
    assert!(
        kernel.has(|i| *i
            == Invalidation::Entry {
                parent: NodeId::ROOT,
                name: "f".into()
            }),
        "the kernel forgets f"
    );
    assert!(kernel.has(|i| *i == Invalidation::Inode(f)));
    assert_eq!(b.reply_ttl(Instant::now(), &[NodeId::ROOT, f]), ATTR_TTL);
    assert!(b.lookup(NodeId::ROOT, OsStr::new("f")).await.is_err());

    // The same for a rename: both names.
    kernel.0.lock().unwrap().clear();
    proxy.lose.store(true, Ordering::SeqCst);
    b.rename(
        NodeId::ROOT,
        OsStr::new("g"),
        NodeId::ROOT,
        OsStr::new("h"),
        0,
    )
    .await
    .expect_err("no answer");
    proxy.lose.store(false, Ordering::SeqCst);
    assert!(a.lookup(NodeId::ROOT, OsStr::new("h")).await.is_ok());
    for name in ["g", "h"] {
        assert!(
            kernel.has(|i| *i
                == Invalidation::Entry {
                    parent: NodeId::ROOT,
                    name: name.into()
                }),
            "the kernel forgets {name}"
        );
    }
    assert_eq!(b.reply_ttl(Instant::now(), &[g]), ATTR_TTL);
    assert_eq!(
        b.lookup(NodeId::ROOT, OsStr::new("h")).await.unwrap().ino.0,
        g.0
    );
    cancel.cancel();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_chmod_or_link_applied_without_an_answer_leaves_no_long_kernel_attributes() {
    use dfs_fuse::fs::ATTR_TTL;
    use dfs_fuse::fs::feed::{FEED_TTL, Invalidation};
    let dir = tempfile::tempdir().unwrap();
    let (c, proxy, a, b, kernel, cancel) = answers_lost_for_b(dir.path()).await;
    write_file(&a, "f", b"one").await.unwrap();
    let f = NodeId(b.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap().ino.0);
    assert_eq!(b.reply_ttl(Instant::now(), &[f]), FEED_TTL);
    kernel.0.lock().unwrap().clear();

    // B's chmod lands; its answer never comes back, and B's feed never brings it.
    proxy.lose.store(true, Ordering::SeqCst);
    let change = AttrChange {
        mode: Some(0o600),
        ..AttrChange::default()
    };
    b.setattr(f, change, None).await.expect_err("no answer");
    proxy.lose.store(false, Ordering::SeqCst);
    let at_a = a.lookup(NodeId::ROOT, OsStr::new("f")).await.unwrap();
    assert_eq!(at_a.perm, 0o600, "the directory applied it");
    assert!(
        kernel.has(|i| *i == Invalidation::Inode(f)),
        "the kernel forgets f's attributes"
    );
    assert_eq!(b.reply_ttl(Instant::now(), &[f]), ATTR_TTL);
    let (attr, _) = b.getattr(f).await.unwrap();
    assert_eq!(attr.perm, 0o600, "asked again, not answered from before");

    // The same for a link: the linked node's link count changed.
    kernel.0.lock().unwrap().clear();
    proxy.lose.store(true, Ordering::SeqCst);
    b.link(f, NodeId::ROOT, OsStr::new("f2"))
        .await
        .expect_err("no answer");
    proxy.lose.store(false, Ordering::SeqCst);
    assert!(a.lookup(NodeId::ROOT, OsStr::new("f2")).await.is_ok());
    assert!(
        kernel.has(|i| *i == Invalidation::Inode(f)),
        "the kernel forgets f's link count"
    );
    cancel.cancel();
    c.shutdown().await;
}

/// Stands for the kernel in `NotifierThread`: records what it is told, and blocks (a stuck
/// kernel) while `stuck` is set.
#[derive(Clone, Default)]
struct StuckKernel {
    stuck: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    told: std::sync::Arc<std::sync::Mutex<Vec<NodeId>>>,
}

impl StuckKernel {
    fn set_stuck(&self, stuck: bool) {
        *self.stuck.0.lock().unwrap() = stuck;
        self.stuck.1.notify_all();
    }

    fn wait(&self) {
        let (lock, cond) = &*self.stuck;
        let mut stuck = lock.lock().unwrap();
        // Bounded: a test that never lets go still ends.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while *stuck && std::time::Instant::now() < deadline {
            stuck = cond
                .wait_timeout(stuck, Duration::from_millis(50))
                .unwrap()
                .0;
        }
    }
}

impl dfs_fuse::fuse::KernelNotify for StuckKernel {
    fn inval_entry(&self, parent: NodeId, _name: &str) -> std::io::Result<()> {
        self.wait();
        self.told.lock().unwrap().push(parent);
        Ok(())
    }

    fn inval_inode(&self, node: NodeId) -> std::io::Result<()> {
        self.wait();
        self.told.lock().unwrap().push(node);
        Ok(())
    }

    fn delete(&self, parent: NodeId, _child: NodeId, _name: &str) -> std::io::Result<()> {
        self.wait();
        self.told.lock().unwrap().push(parent);
        Ok(())
    }
}

/// Stands for a kernel that takes every invalidation, slowly (each call waits `delay`): one
/// busy with lookups in the directories concerned.
struct SlowKernel {
    delay: Duration,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SlowKernel {
    fn call(&self) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl dfs_fuse::fuse::KernelNotify for SlowKernel {
    fn inval_entry(&self, _parent: NodeId, _name: &str) -> std::io::Result<()> {
        self.call()
    }

    fn inval_inode(&self, _node: NodeId) -> std::io::Result<()> {
        self.call()
    }

    fn delete(&self, _parent: NodeId, _child: NodeId, _name: &str) -> std::io::Result<()> {
        self.call()
    }
}

/// A kernel that keeps taking invalidations, however long the queue takes to drain, is not
/// stuck: the feed stays healthy and nothing is resynchronised (a resync would queue every
/// name known, which a slow kernel takes longer still to drain: a resync loop).
#[tokio::test(flavor = "multi_thread")]
async fn regression_a_slow_but_progressing_kernel_never_makes_the_feed_resync() {
    use dfs_fuse::fs::feed::{KernelCache, NOTIFY_BOUND};
    let dir = tempfile::tempdir().unwrap();
    let (c, a, b) = two_cores(dir.path()).await;
    let files = 40u32;
    for i in 0..files {
        write_file(&a, &format!("f{i}"), b"one").await.unwrap();
    }
    let delay = Duration::from_millis(200);
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let notifier = dfs_fuse::fuse::NotifierThread::start(SlowKernel {
        delay,
        calls: calls.clone(),
    })
    .unwrap();
    let cancel = subscribed(&b, notifier.clone()).await;
    assert!(
        names(&b).await.len() >= files as usize,
        "B knows every name"
    );
    let drained = Instant::now() + Duration::from_secs(10);
    while notifier.backlog() > 0 && Instant::now() < drained {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resyncs = b.feed_resyncs();
    let before = calls.load(Ordering::SeqCst);

    // A changes every file: one invalidation each, more than the bound's worth of calls.
    for i in 0..files {
        write_file(&a, &format!("f{i}"), b"two").await.unwrap();
    }
    assert!(delay * files > NOTIFY_BOUND + Duration::from_secs(1));
    let deadline = Instant::now() + delay * files * 3;
    while calls.load(Ordering::SeqCst) < before + files as usize && Instant::now() < deadline {
        assert!(b.feed_up(), "a kernel that makes progress is not stuck");
        assert_eq!(b.feed_resyncs(), resyncs, "no resync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        calls.load(Ordering::SeqCst) >= before + files as usize,
        "every change reached the kernel"
    );
    assert!(b.feed_up());
    assert_eq!(b.feed_resyncs(), resyncs);
    cancel.cancel();
    c.shutdown().await;
}

/// A kernel stuck for long while changes keep coming: the queue for it stays bounded, and
/// what could not be queued is made good by a resync once the kernel takes invalidations again.
#[tokio::test(flavor = "multi_thread")]
async fn regression_invalidations_for_a_stuck_kernel_stay_bounded_and_a_resync_makes_good() {
    use common::api::{Change, ChangeKind};
    use dfs_fuse::fs::feed::{FEED_TTL, KernelCache, NOTIFY_QUEUE_MAX};
    let dir = tempfile::tempdir().unwrap();
    let (c, _a, b) = two_cores(dir.path()).await;
    let stuck = StuckKernel::default();
    let notifier = dfs_fuse::fuse::NotifierThread::start(stuck.clone()).unwrap();
    let cancel = subscribed(&b, notifier.clone()).await;
    let resyncs = b.feed_resyncs();
    stuck.set_stuck(true);
    let changes = NOTIFY_QUEUE_MAX as u64 + 100;
    for i in 0..changes {
        let what = ChangeKind::Node {
            node: NodeId(1_000_000 + i),
        };
        b.apply_changes(&[Change { seq: i, what }]);
        assert!(notifier.backlog() <= NOTIFY_QUEUE_MAX, "bounded");
    }
    assert!(
        !b.feed_up(),
        "what was not queued makes the feed unhealthy at once"
    );
    stuck.set_stuck(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while (!b.feed_up() || b.feed_resyncs() == resyncs) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        b.feed_resyncs() > resyncs,
        "a resync makes good what was not queued"
    );
    assert!(b.feed_up(), "healthy again");
    assert_eq!(b.ttl(), FEED_TTL);
    cancel.cancel();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_stuck_kernel_notifier_turns_the_long_ttl_off_until_it_catches_up() {
    use dfs_fuse::fs::ATTR_TTL;
    use dfs_fuse::fs::feed::{FEED_TTL, KernelCache, NOTIFY_BOUND};
    let dir = tempfile::tempdir().unwrap();
    let (c, a, b) = two_cores(dir.path()).await;
    let stuck = StuckKernel::default();
    let notifier = dfs_fuse::fuse::NotifierThread::start(stuck.clone()).unwrap();
    let cancel = subscribed(&b, notifier.clone()).await;
    assert_eq!(b.ttl(), FEED_TTL);
    let resyncs = b.feed_resyncs();

    // The kernel stops taking invalidations; A's change is heard and queued for it.
    stuck.set_stuck(true);
    let t0 = Instant::now();
    write_file(&a, "f", b"one").await.unwrap();
    let bound = NOTIFY_BOUND + Duration::from_secs(3);
    while b.ttl() == FEED_TTL && t0.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        b.ttl(),
        ATTR_TTL,
        "short TTLs once the kernel lags by more than {NOTIFY_BOUND:?}"
    );
    assert!(!b.feed_up());
    assert!(
        t0.elapsed() >= NOTIFY_BOUND,
        "not before the bound: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        b.reply_ttl(Instant::now(), &[NodeId::ROOT]),
        ATTR_TTL,
        "replies too"
    );
    // Still stuck: still short.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(b.ttl(), ATTR_TTL);

    // The kernel takes everything again: the long TTL, for requests begun from then on. What
    // was queued reached the kernel in order: no resync.
    stuck.set_stuck(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.feed_up() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let healthy = Instant::now();
    assert!(b.feed_up(), "healthy again");
    assert_eq!(notifier.backlog(), 0, "once everything queued was applied");
    assert_eq!(b.feed_resyncs(), resyncs, "no resync");
    assert_eq!(b.ttl(), FEED_TTL);
    assert_eq!(
        b.reply_ttl(t0, &[NodeId::ROOT]),
        ATTR_TTL,
        "a request begun while the kernel lagged"
    );
    assert_eq!(b.reply_ttl(healthy, &[NodeId::ROOT]), FEED_TTL);
    assert!(
        stuck.told.lock().unwrap().contains(&NodeId::ROOT),
        "what was queued reached the kernel"
    );
    cancel.cancel();
    c.shutdown().await;
}
