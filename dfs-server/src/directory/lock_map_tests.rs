//! The cluster map's lock instances (`Registry::lock_urls`): every live one, the same on every
//! directory instance over one store, a silent one dropped after `LOCK_DEAD_AFTER`.

use std::path::Path;
use std::time::Duration;

use common::api::{RegisterServiceRequest, ServiceKind};

use super::registry::{LOCK_DEAD_AFTER, Registry, lock_rows};
use super::*;

fn lock(url: &str) -> RegisterServiceRequest {
    RegisterServiceRequest {
        kind: ServiceKind::Lock,
        url: url.into(),
    }
}

fn on_etcd(dir: &Path, prefix: &str) -> DirectoryService {
    let etcd = crate::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
    let meta = crate::meta::MetaConfig::parse(&etcd.meta_url(prefix)).expect("meta url");
    DirectoryService::open_meta(dir, &meta, DirectoryConfig::default()).expect("open")
}

/// Two directory instances' registries over one etcd prefix (registries of their own, so
/// that no background sync of a running instance counts on the real clock).
#[tokio::test(start_paused = true)]
async fn every_instance_lists_every_live_lock_instance_and_drops_a_silent_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("lockmap/{:016x}", rand::random::<u64>());
    let svc = on_etcd(dir.path(), &prefix);
    let open = || {
        svc.store
            .read(|tx| Registry::open(tx, Duration::from_secs(6)))
            .expect("registry")
    };
    let (a, b) = (open(), open());
    let register = |r: &Registry, url: &str| {
        let stale = r.stale_lock_rows(url);
        svc.store
            .write(|tx| r.register_service(tx, &lock(url), &stale))
            .expect("register");
        r.admit_service(&lock(url)).expect("admit");
    };
    // What `Registry::sync` does for lock instances, its clock read on this thread (the
    // store reads on a thread of its own, where tokio's paused clock is not).
    let sync = || {
        for r in [&a, &b] {
            let rows = svc.store.read(lock_rows).expect("read");
            r.note_locks(rows).expect("sync");
        }
    };
    let (one, two) = ("http://127.0.0.1:9201", "http://127.0.0.1:9202");
    // Each lock instance registers through another directory instance.
    register(&a, one);
    register(&b, two);
    sync();
    // Both, by URL; the latest registration is the map's `lock_url`.
    let both = vec![one.to_owned(), two.to_owned()];
    assert_eq!(a.lock_urls(), both);
    assert_eq!(b.lock_urls(), both);
    assert_eq!(a.services().0.as_deref(), Some(two));
    // `one` keeps registering (through a); `two` goes silent.
    let step = crate::cluster::REREGISTER_EVERY;
    let mut waited = Duration::ZERO;
    while waited < LOCK_DEAD_AFTER {
        assert_eq!(b.lock_urls().len(), 2, "still live after {waited:?}");
        tokio::time::advance(step).await;
        waited += step;
        register(&a, one);
        sync();
    }
    assert_eq!(a.lock_urls(), vec![one.to_owned()]);
    assert_eq!(b.lock_urls(), vec![one.to_owned()]);
    // Back: listed again at its next registration, on both.
    register(&b, two);
    sync();
    assert_eq!(a.lock_urls(), both);
    assert_eq!(b.lock_urls(), both);
}

/// Rows of lock instances gone for good (more than the map lists, sorted before the live
/// one) are not counted live by a directory instance that starts and finds them: only a
/// changed tag counts. A row unchanged for `LOCK_PRUNE_AFTER` is deleted.
#[tokio::test(start_paused = true)]
async fn rows_of_dead_lock_instances_found_at_start_are_not_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("lockmap/{:016x}", rand::random::<u64>());
    let svc = on_etcd(dir.path(), &prefix);
    let open = || {
        svc.store
            .read(|tx| Registry::open(tx, Duration::from_secs(6)))
            .expect("registry")
    };
    let a = open();
    let register = |r: &Registry, url: &str| {
        let stale = r.stale_lock_rows(url);
        svc.store
            .write(|tx| r.register_service(tx, &lock(url), &stale))
            .expect("register");
        r.admit_service(&lock(url)).expect("admit");
    };
    let sync = |r: &Registry| {
        let rows = svc.store.read(lock_rows).expect("read");
        r.note_locks(rows).expect("sync");
    };
    for i in 0..20 {
        register(&a, &format!("http://127.0.0.1:91{i:02}"));
    }
    let live = "http://127.0.0.1:9300";
    register(&a, live);
    // A directory instance starts: the 21 rows are there, none known to be live yet.
    let b = open();
    assert_eq!(b.lock_urls(), Vec::<String>::new());
    // The live one registers again: listed, alone.
    register(&a, live);
    sync(&b);
    assert_eq!(b.lock_urls(), vec![live.to_owned()]);
    // An hour on, the dead ones' rows go at the next registration.
    tokio::time::advance(super::registry::LOCK_PRUNE_AFTER + Duration::from_secs(60)).await;
    register(&b, live);
    sync(&b);
    let rows = svc.store.read(lock_rows).expect("read");
    assert_eq!(rows.instances().len(), 1);
    assert_eq!(b.lock_urls(), vec![live.to_owned()]);
}

#[test]
fn a_single_lock_instance_on_redb_is_the_map_s_only_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("open");
    assert!(svc.registry.lock_urls().is_empty());
    svc.register_service(&lock("http://127.0.0.1:9300"))
        .expect("register");
    assert_eq!(svc.registry.lock_urls(), vec!["http://127.0.0.1:9300"]);
    // After a restart, until it registers again, the map names it as `lock_url` (which
    // clients use when the list is empty) ...
    drop(svc);
    let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("reopen");
    assert!(svc.registry.lock_urls().is_empty());
    assert_eq!(
        svc.registry.services().0.as_deref(),
        Some("http://127.0.0.1:9300")
    );
    // ... and in the list from its next registration.
    svc.register_service(&lock("http://127.0.0.1:9300"))
        .expect("register");
    assert_eq!(svc.registry.lock_urls(), vec!["http://127.0.0.1:9300"]);
}
