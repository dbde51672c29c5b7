//! The directory restarts or is one of several URLs: operations wait for it (within
//! `--op-timeout-secs`) instead of failing, and a client is the same client whichever of its
//! cluster's URLs it names.

use std::time::{Duration, Instant};

use dfs_tests::*;

#[test]
fn writes_ride_out_a_directory_killed_and_restarted() {
    let mut cluster = SplitCluster::start(3);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&[]);
    // A writer creating small files in a loop, bounded in count and time; tee reports every
    // failed open, write or close.
    let script = "end=$(( $(date +%s) + 40 )); n=0; \
        while [ $n -lt 300 ] && [ $(date +%s) -lt $end ]; do \
          n=$((n+1)); echo $n | tee f-$n >/dev/null || echo FAILED $n; \
        done; echo DONE $n";
    let dir = m.dir.clone();
    let writer = std::thread::spawn(move || sh_in(&dir, script));
    // Once the loop is under way, kill -9 the directory and start it again 3 s later.
    assert!(
        eventually(Duration::from_secs(30), || m.path("f-10").exists()),
        "the writer started: {}",
        m.log()
    );
    // Counted while the directory answers (a lookup during the outage waits for it).
    let written_before = std::fs::read_dir(&m.dir).unwrap().count();
    cluster.stop_service("directory", true);
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    cluster.start_service("directory");
    let out = writer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !text.contains("FAILED"),
        "failed writes: {text}\n{}",
        m.log()
    );
    let done: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("DONE "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no DONE line: {text}"));
    assert!(
        done > written_before && killed.elapsed() >= Duration::from_secs(3),
        "the loop went on past the outage ({written_before} before it, {done} in all)"
    );
    // Every file is on the servers with its content: read back by another client.
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    let check =
        format!("for i in $(seq 1 {done}); do [ \"$(cat f-$i)\" = \"$i\" ] || echo BAD $i; done");
    assert_eq!(ok(mb.sh(&check)), "", "{}", cluster.logs());
}

#[test]
fn a_client_keeps_its_login_cache_and_pending_uploads_across_directory_urls() {
    let mut cluster = SplitCluster::start(1);
    let mut a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "2", "--drain-timeout-secs", "2"]);
    ok(m.sh("echo cached > c.txt"));
    // A change that cannot reach a file server stays pending in the cache.
    cluster.stop_service("file-1", false);
    let out = m.sh("echo pending | tee p.txt >/dev/null");
    assert!(!out.status.success(), "the close reports the failed push");
    let out = a.run(&["umount", "--force", m.dir.to_str().unwrap()], "");
    assert!(out.status.success(), "{out:?}");
    drop(m);
    cluster.start_service("file-1");
    cluster.wait_ready();

    // Mounted again through a URL where nothing listens, then an alias of the same directory.
    let port = cluster.url.rsplit(':').next().unwrap().to_owned();
    let dead = format!("http://127.0.0.1:{}", free_port());
    a.server = format!("{dead},http://localhost:{port}");
    // The same login (no new `dfs login`), the same cache, and its pending upload is pushed.
    let m = a.mount(&[]);
    assert_eq!(ok(m.sh("cat c.txt p.txt")), "cached\npending\n");
    let caches: Vec<_> = std::fs::read_dir(a.cache_dir().join("dfs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(caches, ["clusters"], "one cache, kept by cluster id");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    assert!(
        eventually(Duration::from_secs(60), || {
            mb.sh("cat p.txt").stdout == b"pending\n"
        }),
        "the pending upload was pushed: {}\n{}",
        m.log(),
        cluster.logs()
    );
    // `dfs status` through the URL list finds the same client and cache.
    let out = a.run(&["status", "--json"], "");
    assert!(out.status.success(), "{out:?}");
}
