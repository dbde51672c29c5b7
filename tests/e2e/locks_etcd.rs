//! The lock service on etcd (`dfs-server all --meta etcd://...`): flock appends from two
//! mounts (application locks) and closes (write locks, whose fencing tokens the file servers
//! check) go through locks kept in etcd.

use std::time::Duration;

use dfs_tests::*;

#[test]
fn flock_appends_from_two_mounts_lose_nothing_with_locks_on_etcd() {
    let etcd = etcd::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!(
        "e2e-locks-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let cluster = Cluster::start(&["--meta", &etcd.meta_url(&prefix)]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let (ma, mb) = (a.mount(&[]), b.mount(&[]));
    ok(ma.sh("touch log"));
    assert!(eventually(Duration::from_secs(5), || mb
        .sh("test -e log")
        .status
        .success()));
    let storm = |dir: std::path::PathBuf, tag: &'static str| {
        std::thread::spawn(move || {
            sh_in(
                &dir,
                &format!(
                    "for i in $(seq 1 40); do flock log sh -c \"echo {tag}$i >> log\" || exit 1; done"
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
            ok(m.sh("wc -l < log")).trim() == "80"
        });
        let log = ok(m.sh("cat log"));
        assert!(all, "{} lines:\n{log}", log.lines().count());
        for tag in ["a", "b"] {
            for i in 1..=40 {
                assert!(
                    log.lines().any(|l| l == format!("{tag}{i}")),
                    "{tag}{i} missing:\n{log}"
                );
            }
        }
    }
    // The locks are in etcd: a flock held on one mount is a key under the prefix.
    let held = std::thread::spawn({
        let dir = ma.dir.clone();
        move || sh_in(&dir, "flock log sleep 3")
    });
    let keys = || {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &etcd.endpoint,
                "get",
                "--prefix",
                "--keys-only",
            ])
            .arg(format!("{prefix}/locks/a/"))
            .output()
            .expect("etcdctl (Debian: etcd-client)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        eventually(Duration::from_secs(3), || !keys().trim().is_empty()),
        "no application lock key in etcd"
    );
    assert!(held.join().unwrap().status.success());
    assert!(
        eventually(Duration::from_secs(3), || keys().trim().is_empty()),
        "the unlocked lock's key stays: {}",
        keys()
    );
}
