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
        svc.store
            .write(|tx| r.register_service(tx, &lock(url)))
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

#[test]
fn a_single_lock_instance_on_redb_is_the_map_s_only_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("open");
    assert!(svc.registry.lock_urls().is_empty());
    svc.register_service(&lock("http://127.0.0.1:9300"))
        .expect("register");
    assert_eq!(svc.registry.lock_urls(), vec!["http://127.0.0.1:9300"]);
    // A restart lists it (one period, until it registers again) from the store.
    drop(svc);
    let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("reopen");
    assert_eq!(svc.registry.lock_urls(), vec!["http://127.0.0.1:9300"]);
}
