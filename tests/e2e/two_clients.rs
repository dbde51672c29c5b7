//! Two clients (own config and cache each, so two machines): visibility after close, cache
//! hits, whole-file writes that never mix, and flock/fcntl locks across mounts.

use std::process::Command;
use std::time::Duration;

use dfs_tests::*;

#[test]
fn write_through_a_is_read_through_b_after_close() {
    let cluster = Cluster::start(&[]);
    let (a, b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("alice");
    let (ma, mb) = (a.mount(&[]), b.mount(&[]));
    ok(ma.sh("echo 'from a' > shared.txt"));
    assert_eq!(ok(mb.sh("cat shared.txt")), "from a\n");
    ok(mb.sh("echo 'from b' > shared.txt"));
    assert_eq!(ok(ma.sh("cat shared.txt")), "from b\n");
    // A same-size rewrite right after a write (same timestamp tick, passthrough): still pushed.
    ok(ma.sh("printf aaaa > same.txt && printf bbbb | dd of=same.txt conv=notrunc status=none"));
    assert_eq!(ok(mb.sh("cat same.txt")), "bbbb");
}

#[test]
fn unchanged_file_is_served_from_the_cache_even_after_remount() {
    let cluster = Cluster::start(&[]);
    let (a, b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("alice");
    let ma = a.mount(&[]);
    ok(ma.sh("head -c 100000 /dev/urandom > data.bin"));
    let mb = b.mount(&[]);
    let before = cluster.server_downloads();
    let first = ok(mb.sh("sha256sum data.bin"));
    assert_eq!(
        cluster.server_downloads(),
        before + 1,
        "first open downloads once"
    );
    for _ in 0..3 {
        assert_eq!(ok(mb.sh("sha256sum data.bin")), first);
    }
    assert_eq!(
        cluster.server_downloads(),
        before + 1,
        "unchanged file is not downloaded again"
    );
    mb.unmount();
    let mb = b.mount(&[]);
    assert_eq!(ok(mb.sh("sha256sum data.bin")), first);
    assert_eq!(
        cluster.server_downloads(),
        before + 1,
        "the cache index survives a remount"
    );
    // A change by A is downloaded once.
    ok(ma.sh("echo changed >> data.bin"));
    assert_ne!(ok(mb.sh("sha256sum data.bin")), first);
    assert_eq!(cluster.server_downloads(), before + 2);
}

/// Whole-file writes racing from two mounts leave one writer's content, never a mix (the
/// primary stores each upload as one blob). This cannot show the file's lock or the fencing
/// at work, since uploads are whole either way: `dfs-server/tests/api.rs` does
/// (`three_waiters_are_granted_in_fifo_order`: nobody is granted while the lock is held;
/// `unrenewed_lease_passes_the_lock_and_stale_fence_is_refused`: a writer whose lease ran out
/// cannot overwrite the next holder's version), and those fail if either is removed.
#[test]
fn concurrent_whole_file_writes_from_two_mounts_never_mix() {
    let cluster = Cluster::start(&[]);
    let (a, b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("alice");
    let (ma, mb) = (a.mount(&[]), b.mount(&[]));
    let src = tempfile::tempdir().unwrap();
    let (fa, fb) = (src.path().join("a"), src.path().join("b"));
    std::fs::write(&fa, vec![b'a'; 4 << 20]).unwrap();
    std::fs::write(&fb, vec![b'b'; 4 << 20]).unwrap();
    for round in 0..3 {
        let (pa, pb) = (ma.path("race.bin"), mb.path("race.bin"));
        let (fa, fb) = (fa.clone(), fb.clone());
        let ta = std::thread::spawn(move || std::fs::copy(&fa, &pa).map(drop));
        let tb = std::thread::spawn(move || std::fs::copy(&fb, &pb).map(drop));
        ta.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: close on A failed: {e}"));
        tb.join()
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: close on B failed: {e}"));
        let c = Client::new(&cluster.url);
        c.signup_login(&format!("check{round}"));
        let mc = c.mount(&[]);
        let content = std::fs::read(mc.path("race.bin")).unwrap();
        assert_eq!(content.len(), 4 << 20);
        let first = content[0];
        assert!(first == b'a' || first == b'b');
        assert!(
            content.iter().all(|&x| x == first),
            "round {round}: content is a mix of both writers"
        );
    }
    let _ = Duration::ZERO;
}

#[test]
fn flock_appends_from_two_mounts_lose_nothing() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let ma = a.mount(&[]);
    let mb = b.mount(&[]);
    ok(ma.sh("touch log"));
    assert!(eventually(Duration::from_secs(5), || mb
        .sh("test -e log")
        .status
        .success()));
    // `flock FILE cmd` opens the file before it locks it: the append must still start from
    // the newest version, whichever mount wrote it.
    let storm = |dir: std::path::PathBuf, tag: &'static str| {
        std::thread::spawn(move || {
            sh_in(
                &dir,
                &format!(
                    "for i in $(seq 1 100); do flock log sh -c \"echo {tag}$i >> log\" || exit 1; done"
                ),
            )
        })
    };
    let (ta, tb) = (storm(ma.dir.clone(), "a"), storm(mb.dir.clone(), "b"));
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    assert!(ra.status.success(), "{ra:?}\n{}", ma.log());
    assert!(rb.status.success(), "{rb:?}\n{}", mb.log());
    for m in [&ma, &mb] {
        let all = eventually(Duration::from_secs(5), || {
            ok(m.sh("wc -l < log")).trim() == "200"
        });
        let log = ok(m.sh("cat log"));
        assert!(all, "{} lines:\n{log}", log.lines().count());
        for tag in ["a", "b"] {
            for i in 1..=100 {
                assert!(
                    log.lines().any(|l| l == format!("{tag}{i}")),
                    "{tag}{i} missing:\n{log}"
                );
            }
        }
    }
    // The same with the file opened for appending before the lock is taken
    // (`exec 9>>log; flock 9`): the open copy is brought up to date when the lock comes.
    let storm = |dir: std::path::PathBuf, tag: &'static str| {
        std::thread::spawn(move || {
            sh_in(
                &dir,
                &format!(
                    "for i in $(seq 1 50); do sh -c \"exec 9>>log2 && flock 9 && echo {tag}$i >&9\" || exit 1; done"
                ),
            )
        })
    };
    let (ta, tb) = (storm(ma.dir.clone(), "a"), storm(mb.dir.clone(), "b"));
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    assert!(ra.status.success(), "{ra:?}\n{}", ma.log());
    assert!(rb.status.success(), "{rb:?}\n{}", mb.log());
    for m in [&ma, &mb] {
        let all = eventually(Duration::from_secs(5), || {
            ok(m.sh("wc -l < log2")).trim() == "100"
        });
        assert!(all, "{}", ok(m.sh("cat log2")));
    }
}

#[test]
fn a_lock_held_on_one_mount_excludes_the_other_and_a_waiter_can_give_up() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let ma = a.mount(&[]);
    let mb = b.mount(&[]);
    ok(ma.sh("touch f"));
    assert!(eventually(Duration::from_secs(5), || mb
        .sh("test -e f")
        .status
        .success()));
    // Alice holds an exclusive lock for a while.
    let dir = ma.dir.clone();
    let holder = std::thread::spawn(move || sh_in(&dir, "flock f sleep 4"));
    std::thread::sleep(Duration::from_millis(800));
    // Bob cannot take it without waiting, nor a shared one.
    assert!(!mb.sh("flock -n f true").status.success());
    assert!(!mb.sh("flock -n -s f true").status.success());
    // A blocking wait given up with Ctrl-C ends at once (not when the lock comes free) ...
    let t = std::time::Instant::now();
    let out = mb.sh("timeout -s INT 1 flock f true; echo $?");
    assert_eq!(ok(out).trim(), "124", "the waiter was interrupted");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // ... and leaves the queue: once alice's lock goes, bob gets it at once.
    assert!(holder.join().unwrap().status.success());
    let t = std::time::Instant::now();
    ok(mb.sh("flock -w 5 f true"));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// `fcntl` record locks with byte ranges, as SQLite takes them: releasing one range keeps the
/// others locked, across mounts.
#[test]
fn releasing_one_fcntl_range_keeps_the_rest_locked_across_mounts() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let ma = a.mount(&[]);
    let mb = b.mount(&[]);
    ok(ma.sh("echo data > db"));
    assert!(eventually(Duration::from_secs(5), || mb
        .sh("test -e db")
        .status
        .success()));
    // struct flock on x86_64/aarch64 Linux: short type, short whence, off_t start, off_t len,
    // pid_t pid (32 bytes with padding).
    let lk = r#"use Fcntl; open(my $fh, "+<", "db") or die "open: $!";
        sub lk { my ($t, $s, $l, $cmd) = @_;
                 fcntl($fh, $cmd, pack("s s x4 q q i x4", $t, 0, $s, $l, 0)) }"#;
    let dir = ma.dir.clone();
    let holder_script = format!(
        r#"perl -e '{lk}
        lk(F_RDLCK, 100, 1, F_SETLKW) or die "pending: $!";
        lk(F_RDLCK, 200, 501, F_SETLKW) or die "shared: $!";
        lk(F_UNLCK, 100, 1, F_SETLK) or die "unlock pending: $!";
        open(my $ready, ">", "/tmp/dfs-fcntl-ready-$ENV{{DFS_MARK}}"); close($ready);
        sleep 4;'"#
    );
    let marker = format!("/tmp/dfs-fcntl-ready-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let holder = std::thread::spawn(move || {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "cd \"$0\" && DFS_MARK={} {holder_script}",
                std::process::id()
            ))
            .arg(&dir)
            .output()
            .unwrap()
    });
    assert!(
        eventually(Duration::from_secs(10), || std::path::Path::new(&marker)
            .exists()),
        "the holder took its locks"
    );
    // Alice still holds the SHARED range: bob can read-lock but not write-lock.
    let try_lock = |t: &str| {
        mb.sh(&format!(
            r#"perl -e '{lk} lk({t}, 300, 1, F_SETLK) ? exit 0 : exit 1'"#
        ))
        .status
        .success()
    };
    assert!(
        !try_lock("F_WRLCK"),
        "a released range must not free the others"
    );
    assert!(try_lock("F_RDLCK"));
    let out = holder.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    let _ = std::fs::remove_file(&marker);
    // Once alice's process is gone, her locks are too.
    assert!(eventually(Duration::from_secs(5), || try_lock("F_WRLCK")));
}
