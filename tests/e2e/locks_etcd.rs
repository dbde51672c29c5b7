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

/// The lock URL the cluster map names.
fn mapped_lock(cluster: &SplitCluster) -> String {
    http_get_json(&format!("{}{}", cluster.url, common::routes::CLUSTER))["lock_url"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The URL a lock instance printed at start.
pub(crate) fn instance_url(cluster: &SplitCluster, name: &str) -> String {
    let log = cluster.data_dir(name).with_extension("log");
    let mut url = String::new();
    assert!(
        eventually(Duration::from_secs(20), || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            url = text
                .lines()
                .find_map(|l| l.strip_prefix("dfs lock service listening on "))
                .unwrap_or_default()
                .trim()
                .to_owned();
            !url.is_empty()
        }),
        "{name} printed no URL: {}",
        cluster.logs()
    );
    url
}

#[test]
fn writes_and_locks_go_on_when_the_lock_instance_in_the_map_is_killed() {
    let etcd = etcd::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
    let prefix = format!("e2e-lock-failover-{}", std::process::id());
    let mut cluster = SplitCluster::start_on_etcd(2, &etcd.meta_url(&prefix));
    cluster.start_service("lock-2");
    let urls = [
        ("lock", instance_url(&cluster, "lock")),
        ("lock-2", instance_url(&cluster, "lock-2")),
    ];
    let c = Client::new(&cluster.url);
    c.signup_login("alice");
    let m = c.mount(&[]);
    ok(m.sh("echo one > f && flock f true"));
    // Kill -9 the instance the map names; the other registers again within 5 s.
    let mapped = mapped_lock(&cluster);
    let (dead, _) = urls
        .iter()
        .find(|(_, u)| *u == mapped)
        .unwrap_or_else(|| panic!("the map names {mapped}, not one of {urls:?}"));
    cluster.stop_service(dead, true);
    let killed = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || mapped_lock(&cluster) != mapped),
        "the map still names the dead instance"
    );
    // Closes (write locks) and flock (application locks) work again through the other.
    let mut n = 0;
    let back = eventually(Duration::from_secs(20), || {
        n += 1;
        m.sh(&format!("echo two{n} > f && flock f true"))
            .status
            .success()
    });
    assert!(
        back,
        "no write within 20 s: {}\n{}",
        m.log(),
        cluster.logs()
    );
    assert!(killed.elapsed() < Duration::from_secs(25));
    assert_eq!(ok(m.sh("cat f")), format!("two{n}\n"));
}
