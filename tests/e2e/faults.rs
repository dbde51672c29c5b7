//! Failures during writes: nothing a close acknowledged, nor anything it refused, is lost.

use std::time::Duration;

use dfs_tests::*;

#[test]
fn file_servers_stopped_during_close_keep_the_data_and_push_it_later() {
    let mut cluster = SplitCluster::start(3);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "2"]);
    ok(m.sh("echo v1 > f.txt"));
    for i in 1..=3 {
        cluster.stop_service(&format!("file-{i}"), false);
    }
    // tee reports close() errors (a shell redirection ignores them).
    let out = m.sh("echo v2 | tee f.txt >/dev/null");
    assert!(!out.status.success(), "close must report the failed push");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Input/output error"),
        "{out:?}"
    );
    // The data is kept: readable through the mount, and reported pending.
    assert_eq!(ok(m.sh("cat f.txt")), "v2\n");
    let pending = || {
        let out = a.run(&["status", "--json"], "");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["client"]["pending_uploads"]
            .as_array()
            .map_or(0, |p| p.len())
    };
    assert!(
        eventually(Duration::from_secs(10), || pending() == 1),
        "status shows the pending upload"
    );
    // `dfs umount` refuses while the upload is pending, and lists it.
    let out = a.run(&["umount", m.dir.to_str().unwrap()], "");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pending"),
        "{out:?}"
    );
    assert!(is_mounted(&m.dir));
    for i in 1..=3 {
        cluster.start_service(&format!("file-{i}"));
    }
    cluster.wait_ready();
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    let pushed = eventually(Duration::from_secs(60), || {
        mb.sh("cat f.txt").stdout == b"v2\n"
    });
    assert!(
        pushed,
        "pending upload pushed once servers are back: {}\n{}",
        m.log(),
        cluster.logs()
    );
    assert!(eventually(Duration::from_secs(10), || pending() == 0));
    // Now it unmounts, and waits for the mounting process to exit.
    let out = a.run(&["umount", m.dir.to_str().unwrap()], "");
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mounted(&m.dir));
}

#[test]
fn cached_files_stay_readable_while_the_cluster_is_down() {
    let mut cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "2"]);
    ok(m.sh("mkdir -p docs && echo cached > docs/c.txt && cat docs/c.txt"));
    cluster.stop();
    // Past the kernel's 1 s attribute cache: every lookup now fails to reach the directory.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(ok(m.sh("cat docs/c.txt")), "cached\n");
    let out = m.sh("cat docs/never-seen.txt");
    assert!(!out.status.success(), "an uncached file fails cleanly");
}

#[test]
fn a_failed_close_pushed_later_keeps_both_versions_as_a_conflict_copy() {
    let mut cluster = SplitCluster::start(3);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let ma = a.mount(&["--close-timeout-secs", "2"]);
    let mb = b.mount(&[]);
    ok(ma.sh("echo base > notes.txt"));
    assert_eq!(ok(mb.sh("cat notes.txt")), "base\n");
    for i in 1..=3 {
        cluster.stop_service(&format!("file-{i}"), false);
    }
    let out = ma.sh("echo alice | tee notes.txt >/dev/null");
    assert!(!out.status.success(), "close must report the failed push");
    // Alice's client freezes (a laptop lid closed) while the servers come back and bob's
    // close succeeds on top of the version alice started from.
    let pid = ma.pid().to_string();
    ok(sh_in(&ma.dir, &format!("kill -STOP {pid}")));
    for i in 1..=3 {
        cluster.start_service(&format!("file-{i}"));
    }
    cluster.wait_ready();
    ok(mb.sh("echo bob | tee notes.txt >/dev/null"));
    ok(sh_in(&mb.dir, &format!("kill -CONT {pid}")));
    // Alice's change arrives later than bob's acknowledged close: it is kept next to the file,
    // never written over bob's.
    let copy = eventually(Duration::from_secs(60), || {
        ok(mb.sh("ls")).contains("notes.txt.conflict-alice-")
            && ok(mb.sh("cat notes.txt.conflict-alice-*")) == "alice\n"
    });
    assert!(
        copy,
        "{}\n{}\n{}",
        ok(mb.sh("ls -la")),
        ma.log(),
        cluster.logs()
    );
    assert_eq!(ok(mb.sh("cat notes.txt")), "bob\n");
    assert!(
        eventually(Duration::from_secs(10), || ok(ma.sh("cat notes.txt"))
            == "bob\n"),
        "alice's mount shows the version that won"
    );
    let status = ok(a.run(&["status"], ""));
    assert!(status.contains("conflict:"), "{status}");
    assert!(status.contains("notes.txt.conflict-alice-"), "{status}");
}

#[test]
fn a_stuck_file_server_never_freezes_the_mount_and_closes_end_within_the_timeout() {
    let cluster = SplitCluster::start(3);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "3"]);
    ok(m.sh("for i in $(seq 1 40); do echo v1 > f$i; done; echo cached > other; cat other"));
    let primary = |name: &str| cluster.meta_of(name)["primary"].as_u64().unwrap();
    let stuck = primary("f1");
    let files: Vec<String> = (1..=40)
        .map(|i| format!("f{i}"))
        .filter(|f| primary(f) == stuck)
        .collect();
    // The server stops answering but keeps its sockets (SIGSTOP: connections are accepted by
    // the kernel, never answered), like a hung machine.
    let pid = cluster.procs[&cluster.file_service_of(stuck)]
        .id()
        .to_string();
    ok(sh_in(&m.dir, &format!("kill -STOP {pid}")));
    // More closes stuck on it than the mount has FUSE worker threads (8): each on its own.
    let list = files
        .iter()
        .cycle()
        .take(files.len().max(16))
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    let dir = m.dir.clone();
    let started = std::time::Instant::now();
    let writers = std::thread::spawn(move || {
        sh_in(
            &dir,
            &format!(
                "for f in {list}; do (echo v2 | tee $f >/dev/null 2>&1) & done; wait; echo done"
            ),
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile everything else works at once: the directory and the cache are fine.
    for cmd in [
        "ls >/dev/null",
        "cat other",
        "mkdir d && rmdir d",
        "stat f1 >/dev/null",
    ] {
        let t = std::time::Instant::now();
        let out = m.sh(cmd);
        assert!(out.status.success(), "{cmd}: {out:?}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{cmd} took {:?} while one server was stuck",
            t.elapsed()
        );
    }
    let out = writers.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "closes on a stuck server took {:?}",
        started.elapsed()
    );
    // Another client, with nothing cached, still opens files that have a copy on the stuck
    // server: each copy gets its share of the timeout, then the next is tried.
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&["--close-timeout-secs", "3"]);
    let t = std::time::Instant::now();
    assert_eq!(ok(mb.sh("cat other")), "cached\n");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    ok(sh_in(&m.dir, &format!("kill -CONT {pid}")));
    // Nothing is lost: every change reaches the servers (failover or the server's return).
    let pushed = eventually(Duration::from_secs(60), || {
        files
            .iter()
            .all(|f| mb.sh(&format!("cat {f}")).stdout == b"v2\n")
    });
    let state: Vec<String> = files
        .iter()
        .map(|f| {
            let meta = cluster.meta_of(f);
            format!(
                "{f}: version {} holders {} via bob {:?}, via alice {:?}",
                meta["version"],
                meta["holders"],
                String::from_utf8_lossy(&mb.sh(&format!("cat {f}")).stdout),
                String::from_utf8_lossy(&m.sh(&format!("cat {f}")).stdout),
            )
        })
        .collect();
    assert!(
        pushed,
        "{}\n{}\n{}\n{}",
        state.join("\n"),
        ok(a.run(&["status"], "")),
        m.log(),
        cluster.logs()
    );
}

#[test]
fn a_full_server_is_enospc_through_the_mount_and_df_shows_the_real_disk() {
    let cluster = SplitCluster::start_with_small_disk(1, "file-1", 32 << 20);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "3"]);
    ok(m.sh("echo small > a.txt"));
    // df: the server's disk (one copy per file on one server), not a made-up size.
    let total = eventually(Duration::from_secs(10), || {
        let out = ok(m.sh("df -B1 --output=size . | tail -1"));
        out.trim()
            .parse::<u64>()
            .is_ok_and(|b| (30 << 20..=33 << 20).contains(&b))
    });
    assert!(total, "{}", ok(m.sh("df -B1 .")));
    // A file the disk cannot hold: close says ENOSPC, not EIO, and the bytes are kept.
    let out = m.sh("head -c 40M /dev/zero | tee big.bin >/dev/null");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        ok(m.sh("stat -c %s big.bin")).trim(),
        (40u64 << 20).to_string()
    );
    // Removing it frees the mount of it; small files still go through.
    ok(m.sh("rm big.bin && echo more > b.txt && cat a.txt b.txt"));
    assert_eq!(ok(m.sh("cat b.txt")), "more\n");
}

#[test]
fn a_file_servers_reserve_is_kept_back_from_files() {
    // A reserve as large as any disk: the server takes no bytes of files at all.
    let cluster = SplitCluster::start_with(1, &["--reserve-bytes", &u64::MAX.to_string()]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "3"]);
    ok(m.sh("touch empty"));
    let out = m.sh("echo x | tee f >/dev/null");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(ok(m.sh("df -B1 --output=avail . | tail -1")).trim(), "0");
    // Its bytes are kept, pending, until it is removed.
    assert_eq!(ok(m.sh("cat f")), "x\n");
    ok(m.sh("rm f"));
}
