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
    b.signup_login("bob");
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
    b.signup_login("bob");
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
