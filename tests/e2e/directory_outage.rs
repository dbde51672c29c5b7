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

/// Processes `mkdir NAME...` whose first name starts with `prefix`, asleep in a system call.
fn mkdirs_waiting(prefix: &str) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let mut args = cmd.split(|b| *b == 0);
            let is_mkdir = args.next().is_some_and(|a| a.ends_with(b"mkdir"));
            let named = args
                .next()
                .is_some_and(|a| a.starts_with(prefix.as_bytes()));
            // The state follows the command name in parentheses: `pid (comm) S ...`.
            let stat = std::fs::read_to_string(p.path().join("stat")).unwrap_or_default();
            let asleep = stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('S') || rest.starts_with('D'));
            is_mkdir && named && asleep
        })
        .count()
}

#[test]
fn operations_waiting_for_the_directory_leave_the_mount_free_for_cached_files() {
    let mut cluster = SplitCluster::start(1);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&[]);
    // Twelve directories: a create locks its directory in the kernel, so operations in one
    // directory wait for each other there, never reaching more than one FUSE thread.
    ok(m.sh("echo cached > c.txt && cat c.txt >/dev/null && \
             for i in $(seq 1 12); do mkdir outage-wait-$i; done"));
    cluster.stop_service("directory", true);
    // More namespace operations than the mount has FUSE threads (8) wait for the directory,
    // each up to the op timeout (30 s).
    let dir = m.dir.clone();
    let waiting = std::thread::spawn(move || {
        sh_in(
            &dir,
            "for i in $(seq 1 12); do mkdir outage-wait-$i/new & done; wait",
        )
    });
    assert!(
        eventually(Duration::from_secs(10), || mkdirs_waiting("outage-wait-")
            >= 12),
        "the mkdirs wait for the directory: {}",
        m.log()
    );
    // A cached file is still read: what was heard of it answers after a short wait
    // (`FALLBACK_WAIT`), not after the others' op timeout.
    let t = Instant::now();
    let read = std::fs::read_to_string(m.path("c.txt"));
    let took = t.elapsed();
    assert_eq!(read.unwrap(), "cached\n");
    assert!(
        took < Duration::from_secs(10),
        "a read of a cached file waited {took:?} behind operations waiting for the directory"
    );
    // The waiting operations complete once the directory is back.
    cluster.start_service("directory");
    let out = waiting.join().unwrap();
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    assert_eq!(ok(m.sh("ls -d outage-wait-*/new | wc -l")).trim(), "12");
}
