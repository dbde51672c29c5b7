//! Faults injected at named points inside the services (`dfs_server::faults`), in
//! milliseconds, instead of stopping a whole service. A point is process-wide, so these tests
//! live in a binary of their own and each holds a `fail::FailScenario` (which also serialises
//! them).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::{Duration, Instant};

use common::{ErrorCode, FileKind, NodeId, NodeMeta, routes};

mod support;
use support::*;

async fn meta(h: &Harness, id: NodeId) -> NodeMeta {
    h.get_json(&routes::node(id)).await
}

async fn read(h: &Harness, m: &NodeMeta) -> Vec<u8> {
    let r = h.read_from(m.primary.unwrap(), m).await;
    assert!(r.status().is_success(), "read: {}", r.status());
    r.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn a_commit_whose_answer_was_lost_is_applied_once_and_never_reverts_a_newer_write() {
    let scenario = fail::FailScenario::setup();
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "lost-answer", FileKind::File).await;

    // Close A: the directory commits it, and its answer is lost on the way back. The primary
    // sends the commit again (as it does through a directory restart): the directory knows
    // the upload id, applies nothing twice, and this time the answer arrives.
    fail::cfg("commit-answer-lost", "1*return").unwrap();
    let a = h.write(&f, b"version A", 10, 1).await;
    fail::remove("commit-answer-lost");
    assert!(
        a.status().is_success(),
        "the re-sent commit was answered: {}",
        a.status()
    );
    assert_eq!(meta(&h, f.id).await.version, 1, "A was applied once");

    // Close B, a newer one (its close waits), replaces it.
    let b = h.write(&f, b"version B", 11, 2).await;
    assert!(b.status().is_success(), "B: {}", b.status());

    // A is pushed again later, from the background, with a fresh lock: it is recognised and
    // applied no second time, so B stays.
    let again = h.write_based(&f, b"version A", 12, 1, "0").await;
    assert!(again.status().is_success(), "A again: {}", again.status());
    let m = meta(&h, f.id).await;
    assert_eq!(m.version, 2);
    assert_eq!(read(&h, &m).await, b"version B");

    // However many commits later (its upload id long forgotten), a retry based on version 0
    // is a conflict, never a new version.
    for i in 0..40u8 {
        let body = format!("filler {i}");
        let r = h
            .write(&f, body.as_bytes(), 13 + u64::from(i), 100 + i)
            .await;
        assert!(r.status().is_success());
    }
    let late = h.write_based(&f, b"version A", 60, 1, "0").await;
    assert_eq!(error_code(late).await, (412, ErrorCode::Conflict));
    let m = meta(&h, f.id).await;
    assert_eq!(m.version, 42);
    assert_eq!(read(&h, &m).await, b"filler 39");
    h.cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test]
async fn a_write_is_acknowledged_only_once_the_copies_it_needs_are_durable() {
    let scenario = fail::FailScenario::setup();
    let h = Harness::new(|_| {}).await;
    let f = h.create(NodeId::ROOT, "copies", FileKind::File).await;
    // Every replica refuses: the primary alone is not enough.
    fail::cfg("replica-store", "return").unwrap();
    let r = h.write(&f, b"needs two copies", 5, 1).await;
    assert_eq!(error_code(r).await, (503, ErrorCode::Unavailable));
    assert_eq!(meta(&h, f.id).await.version, 0, "nothing was committed");
    fail::remove("replica-store");
    let r = h.write(&f, b"needs two copies", 6, 1).await;
    assert!(r.status().is_success(), "{}", r.status());
    let m = meta(&h, f.id).await;
    assert_eq!(m.version, 1);
    assert!(m.holders.len() >= 2, "holders {:?}", m.holders);
    h.cluster.shutdown().await;
    scenario.teardown();
}

#[tokio::test]
async fn a_primary_whose_heartbeats_stop_is_replaced_and_writes_go_on() {
    let scenario = fail::FailScenario::setup();
    let h = Harness::new(|c| c.repair.interval = Duration::from_millis(100)).await;
    let f = h.create(NodeId::ROOT, "failover", FileKind::File).await;
    let r = h.write(&f, b"before", 5, 1).await;
    assert!(r.status().is_success());
    // Wait until every replica holds it, so that any of them may take over.
    let deadline = Instant::now() + Duration::from_secs(10);
    while meta(&h, f.id).await.holders.len() < 3 {
        assert!(Instant::now() < deadline, "replicas never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = meta(&h, f.id).await.primary.unwrap();
    fail::cfg("heartbeat-lost", &format!("return({old})")).unwrap();
    let started = Instant::now();
    let m = loop {
        let m = meta(&h, f.id).await;
        if m.primary.is_some_and(|p| p != old) {
            break m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no failover from server {old}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Detection (3 beats of 200 ms) plus a repair pass, not seconds more.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(m.version, 1, "the new primary holds the current version");
    let r = h.write(&m, b"after", 6, 2).await;
    assert!(
        r.status().is_success(),
        "write after failover: {}",
        r.status()
    );
    assert_eq!(read(&h, &meta(&h, f.id).await).await, b"after");
    // Its beats resume: it is alive again.
    fail::remove("heartbeat-lost");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive = h
            .cluster_info()
            .await
            .servers
            .iter()
            .any(|s| s.id == old && s.alive);
        if alive {
            break;
        }
        assert!(Instant::now() < deadline, "server {old} never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.cluster.shutdown().await;
    scenario.teardown();
}
