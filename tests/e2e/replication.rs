//! Replication under failure, with every service in its own process so single ones can be
//! killed: failover, catch-up, scrub and repair, restarts. Bounded in count and time.

use std::collections::BTreeMap;
use std::time::Duration;

use dfs_tests::*;

fn server_ids(v: &serde_json::Value, field: &str) -> Vec<u64> {
    v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn killing_a_primary_mid_stream_loses_no_acknowledged_write_and_writes_resume() {
    let mut cluster = SplitCluster::start(3);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "30"]);
    ok(m.sh("echo v0 > hot.txt"));
    let primary = cluster.meta_of("hot.txt")["primary"].as_u64().unwrap();
    let victim = cluster.file_service_of(primary);
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    let mut after_kill = 0;
    for i in 0..12 {
        if i == 4 {
            cluster.stop_service(&victim, true);
        }
        let name = if i % 2 == 0 {
            "hot.txt".to_owned()
        } else {
            format!("f{i}.txt")
        };
        let content = format!("write {i}\n");
        let out = m.sh(&format!("printf '{content}' | tee {name} >/dev/null"));
        if out.status.success() {
            acknowledged.insert(name, content);
            if i >= 4 {
                after_kill += 1;
            }
        }
    }
    assert!(
        after_kill >= 6,
        "writes resume after failover ({after_kill} of 8 succeeded)"
    );
    let new_primary = cluster.meta_of("hot.txt")["primary"].as_u64().unwrap();
    assert_ne!(new_primary, primary, "the dead primary was replaced");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    for (name, content) in &acknowledged {
        assert_eq!(
            &ok(mb.sh(&format!("cat {name}"))),
            content,
            "{name} after failover"
        );
    }
}

#[test]
fn a_dead_replica_does_not_stop_reads_and_catches_up_when_it_returns() {
    let mut cluster = SplitCluster::start(3);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&[]);
    ok(m.sh("echo one > r.txt"));
    let meta = cluster.meta_of("r.txt");
    let replica = server_ids(&meta, "replicas")[0];
    let victim = cluster.file_service_of(replica);
    cluster.stop_service(&victim, true);
    // Reads from a fresh client keep working (a dead copy is skipped).
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    assert_eq!(ok(mb.sh("cat r.txt")), "one\n");
    // A write while it is down: acknowledged by the other two.
    ok(m.sh("echo two > r.txt"));
    assert_eq!(ok(mb.sh("cat r.txt")), "two\n");
    assert!(!server_ids(&cluster.meta_of("r.txt"), "holders").contains(&replica));
    cluster.start_service(&victim);
    let caught_up = eventually(Duration::from_secs(30), || {
        server_ids(&cluster.meta_of("r.txt"), "holders").contains(&replica)
    });
    assert!(
        caught_up,
        "the returning replica gets the version it missed: {}",
        cluster.logs()
    );
    let hash = cluster.meta_of("r.txt")["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    let node = cluster.meta_of("r.txt")["id"].as_u64().unwrap();
    assert_eq!(
        dfs_tests::blob_content(&cluster.data_dir(&victim), node, &hash).unwrap(),
        b"two\n"
    );
}

#[test]
fn a_corrupt_copy_is_found_by_the_scrub_repaired_and_never_served() {
    let cluster = SplitCluster::start_with(3, &["--scrub-interval-secs", "1"]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&[]);
    ok(m.sh("head -c 200000 /dev/urandom > c.bin && sha256sum c.bin > /tmp/dfs-c.sum"));
    let good = ok(m.sh("sha256sum < c.bin"));
    let meta = cluster.meta_of("c.bin");
    let node = meta["id"].as_u64().unwrap();
    let hash = meta["hash"].as_str().unwrap().to_owned();
    // Corrupt every replica's copy (same length, different bytes).
    for r in server_ids(&meta, "replicas") {
        // Same length, every byte of the body zero.
        dfs_tests::corrupt_blob(&cluster.data_dir(&cluster.file_service_of(r)), node, &hash);
    }
    // A fresh reader never gets the corrupt bytes.
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    assert_eq!(ok(mb.sh("sha256sum < c.bin")), good);
    // The scrub finds both bad copies and the directory re-replicates good ones.
    let repaired = eventually(Duration::from_secs(60), || {
        server_ids(&cluster.meta_of("c.bin"), "replicas")
            .iter()
            .all(|r| {
                dfs_tests::blob_content(
                    &cluster.data_dir(&cluster.file_service_of(*r)),
                    node,
                    &hash,
                )
                .is_some_and(|b| b.len() == 200_000 && b.iter().any(|&x| x != 0))
            })
            && server_ids(&cluster.meta_of("c.bin"), "holders").len() == 3
    });
    assert!(repaired, "corrupt copies repaired: {}", cluster.logs());
}

#[test]
fn directory_lock_and_auth_killed_and_restarted_lose_nothing_and_leave_no_lock() {
    let mut cluster = SplitCluster::start(3);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "30"]);
    ok(m.sh("mkdir -p d && for i in 1 2 3 4 5; do echo $i > d/$i.txt; done"));
    cluster.stop_service("directory", true);
    cluster.stop_service("lock", true);
    cluster.stop_service("auth", true);
    cluster.start_service("directory");
    cluster.start_service("lock");
    cluster.start_service("auth");
    cluster.wait_ready();
    // Everything acknowledged before is there; new writes take the (new) lock at once.
    assert_eq!(ok(m.sh("cat d/1.txt d/5.txt")), "1\n5\n");
    // tee reports a failed close (a shell redirection would hide it).
    ok(m.sh("echo after | tee d/6.txt >/dev/null && echo again | tee d/1.txt >/dev/null"));
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    assert_eq!(ok(mb.sh("ls d | wc -l")).trim(), "6");
    assert_eq!(ok(mb.sh("cat d/1.txt d/6.txt")), "again\nafter\n");
}

#[test]
fn regression_a_file_server_told_a_wrong_or_wiped_directory_deletes_nothing() {
    let mut cluster = SplitCluster::start_with(3, &["--scrub-interval-secs", "1"]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&[]);
    ok(m.sh("for i in 1 2 3 4 5 6; do echo keep-$i > k$i.txt; done"));
    m.unmount();
    let names = ["file-1", "file-2", "file-3"];
    let held = |c: &SplitCluster| -> Vec<Vec<(u64, String)>> {
        names.iter().map(|n| stored_blobs(&c.data_dir(n))).collect()
    };
    let before = held(&cluster);
    assert!(before.iter().all(|b| b.len() >= 6), "{before:?}");
    // Old enough for the scrub to look at them (its grace is its 1 s interval).
    std::thread::sleep(Duration::from_millis(1500));

    // 1. `--directory` pointing at the lock service: every route there is "no such route".
    let lock_url =
        http_get_json(&format!("{}{}", cluster.url, common::routes::CLUSTER))["lock_url"]
            .as_str()
            .unwrap()
            .to_owned();
    cluster.stop_service("file-1", false);
    cluster.start_service_using("file-1", &lock_url);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        stored_blobs(&cluster.data_dir("file-1")),
        before[0],
        "a server told the lock service is its directory deleted copies: {}",
        cluster.logs()
    );

    // 2. The directory wiped and started afresh at the same address.
    cluster.stop_service("file-1", false);
    cluster.stop_service("directory", true);
    let dir_data = cluster.data_dir("directory");
    let saved = dir_data.with_extension("saved");
    std::fs::rename(&dir_data, &saved).unwrap();
    cluster.start_service("directory");
    cluster.start_service("file-1");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        held(&cluster),
        before,
        "servers of the old cluster deleted copies on a wiped directory's word: {}",
        cluster.logs()
    );
    let file1_log = std::fs::read_to_string(cluster.data_dir("file-1").with_extension("log"))
        .unwrap_or_default();
    assert!(
        file1_log.contains("belongs to cluster"),
        "the refusal is explained in the log: {}",
        cluster.logs()
    );

    // 3. The real directory back: the servers join again and every file reads back.
    cluster.stop_service("directory", true);
    std::fs::remove_dir_all(&dir_data).unwrap();
    std::fs::rename(&saved, &dir_data).unwrap();
    cluster.start_service("directory");
    cluster.wait_ready();
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    assert_eq!(
        ok(mb.sh("cat k1.txt k6.txt")),
        "keep-1\nkeep-6\n",
        "{}",
        cluster.logs()
    );

    // 4. A file really deleted: its copies are set aside by the scrub, not unlinked at once.
    let meta = cluster.meta_of("k2.txt");
    let (node, hash) = (
        meta["id"].as_u64().unwrap(),
        meta["hash"].as_str().unwrap().to_owned(),
    );
    ok(mb.sh("rm k2.txt"));
    let suffix = format!("-{node}-{hash}");
    let quarantined = eventually(Duration::from_secs(30), || {
        names.iter().all(|n| {
            let data = cluster.data_dir(n);
            !dfs_tests::has_blob(&data, node, &hash)
                && std::fs::read_dir(data.join("quarantine")).is_ok_and(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().ends_with(&suffix))
                })
        })
    });
    assert!(
        quarantined,
        "copies of a deleted file quarantined: {}",
        cluster.logs()
    );
}
