//! Two clients (own config and cache each, so two machines): visibility after close, cache
//! hits, and concurrent writers serialised by the lock.

use std::time::Duration;

use dfs_tests::*;

#[test]
fn write_through_a_is_read_through_b_after_close() {
    let cluster = Cluster::start(&[]);
    let (a, b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("bob");
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
    b.signup_login("bob");
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

#[test]
fn concurrent_writers_are_serialised_and_never_mixed() {
    let cluster = Cluster::start(&[]);
    let (a, b) = (Client::new(&cluster.url), Client::new(&cluster.url));
    a.signup_login("alice");
    b.signup_login("bob");
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
