//! Several directory instances over one etcd cluster (issue 10): a client keeps writing while
//! an etcd member, the directory instance it uses and the lock instance it uses are killed, and a change made through
//! one instance reaches a client of the other through the watch-fed change feed.

use std::time::{Duration, Instant};

use dfs_tests::*;

/// The longest pause of a writer's acknowledged writes this drill accepts. What it is made
/// of (ARCHITECTURE.md, "Failover"): the etcd client resends a call a dead member never
/// received at once, and a call it may have received fails after the 5 s etcd call timeout;
/// a new etcd leader takes about a second (election timeout); the dfs client moves to the
/// next directory URL on the first refused connection. So a few seconds, 15 s with room for
/// a loaded test machine, and well inside `--op-timeout-secs` (30 s): no write fails.
const MAX_WRITE_PAUSE: Duration = Duration::from_secs(15);

/// A 3-member etcd cluster on loopback and the `--meta` URL naming all of its members.
fn etcd3(prefix: &str) -> (Vec<etcd::EtcdServer>, String) {
    let members = etcd::start_cluster(3, &[]).unwrap_or_else(|e| panic!("{e}"));
    let hosts: Vec<&str> = members.iter().map(|m| m.endpoint.as_str()).collect();
    let url = format!("etcd://{}/{prefix}", hosts.join(","));
    (members, url)
}

/// How long after its holder died a lock may stay taken (ARCHITECTURE.md, "Failover"): the
/// lease (10 s), etcd's expiry check (0.5 s) and, when etcd's leader changed meanwhile, its
/// election timeout (1 s), plus the waiter's wake-up and a loaded machine's slack.
const LOCK_FREE_BOUND: Duration = Duration::from_secs(16);

#[test]
fn writes_ride_out_an_etcd_member_a_directory_instance_and_a_lock_instance_killed() {
    let (members, meta) = etcd3("drill");
    let mut cluster = SplitCluster::start_multi(3, 2, &meta);
    // A second lock instance: the map lists both, and clients fail over between them.
    cluster.start_service("lock-2");
    let locks = [
        ("lock", crate::locks_etcd::instance_url(&cluster, "lock")),
        (
            "lock-2",
            crate::locks_etcd::instance_url(&cluster, "lock-2"),
        ),
    ];
    assert!(
        eventually(Duration::from_secs(20), || mapped_locks(&cluster).len()
            == 2),
        "the map lists both lock instances: {:?}",
        mapped_locks(&cluster)
    );
    // The client names both directory instances; it uses the first until it stops answering.
    let a = Client::new(&cluster.directory_urls());
    a.signup_login("alice");
    let m = a.mount(&[]);
    // Another client checks the locks; a third holds one and dies.
    let b = Client::new(&cluster.directory_urls());
    b.signup_login("alice");
    let mb = b.mount(&[]);
    let c = Client::new(&cluster.directory_urls());
    c.signup_login("alice");
    let mc = c.mount(&[]);
    ok(m.sh("touch held orphan"));
    for mount in [&mb, &mc] {
        assert!(eventually(Duration::from_secs(10), || mount
            .sh("test -e held && test -e orphan")
            .status
            .success()));
    }
    // A writer creating small files in a loop, and rewriting one shared file (a lock and a
    // fencing token per close), bounded in count and time; each acknowledged write is logged
    // with the time it completed, every failed open, write or close too.
    let script = "end=$(( $(date +%s) + 60 )); n=0; \
        while [ $n -lt 600 ] && [ $(date +%s) -lt $end ]; do \
          n=$((n+1)); \
          if echo $n | tee f-$n >/dev/null && echo $n > shared; then echo OK $n $(date +%s%3N); \
          else echo FAILED $n; fi; \
        done; echo DONE $n";
    let dir = m.dir.clone();
    let writer = std::thread::spawn(move || sh_in(&dir, script));
    assert!(
        eventually(Duration::from_secs(30), || m.path("f-10").exists()),
        "the writer started: {}",
        m.log()
    );
    // etcd's leader dies (kill -9: no goodbye to its peers), so the other two elect one ...
    let leader = members
        .iter()
        .position(|m| is_etcd_leader(&m.endpoint))
        .expect("one etcd member says it leads");
    members[leader].kill9().unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(Duration::from_secs(3));
    // ... then the directory instance the client uses ...
    cluster.stop_service("directory", true);
    std::thread::sleep(Duration::from_secs(3));
    // ... then the lock instance the writer's mount uses, while that mount holds a flock
    // (which must stay held: its renewals go to the other instance) and a third mount,
    // holding another, dies with it (its lock must come free within LOCK_FREE_BOUND).
    let held = {
        let dir = m.dir.clone();
        // Held until the test says so (bounded: 120 s), however slow the steps between.
        std::thread::spawn(move || {
            sh_in(
                &dir,
                "flock -x held sh -c 'echo in; i=0; \
                 while [ ! -e held.stop ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done'",
            )
        })
    };
    let orphan = {
        let dir = mc.dir.clone();
        std::thread::spawn(move || sh_in(&dir, "flock -x orphan sleep 40"))
    };
    let taken = |name: &str| !mb.sh(&format!("flock -n {name} true")).status.success();
    assert!(
        eventually(Duration::from_secs(10), || taken("held") && taken("orphan")),
        "both flocks taken: {}\n{}",
        m.log(),
        mc.log()
    );
    let (victim, _) = locks
        .iter()
        .find(|(_, url)| connected(m.pid(), url))
        .unwrap_or_else(|| {
            let first = mapped_locks(&cluster).first().cloned().unwrap_or_default();
            locks.iter().find(|(_, u)| *u == first).unwrap_or(&locks[0])
        });
    let victim = victim.to_string();
    mc.kill9();
    cluster.stop_service(&victim, true);
    let killed = Instant::now();
    eprintln!("killed lock instance {victim} and the holder of `orphan`");
    // The orphaned lock comes free within the bound ...
    let freed = mb.sh(&format!(
        "flock -w {} orphan true",
        LOCK_FREE_BOUND.as_secs()
    ));
    let free_after = killed.elapsed();
    assert!(
        freed.status.success() && free_after < LOCK_FREE_BOUND,
        "the dead holder's lock stuck {free_after:?}: {freed:?}\n{}",
        mb.log()
    );
    eprintln!("a dead holder's flock came free after {free_after:?}");
    // ... while the living holder's stays held past its lease: its renewals reached the
    // surviving instance (its flock ends about 22 s after the kill).
    std::thread::sleep((Duration::from_secs(14)).saturating_sub(killed.elapsed()));
    assert!(
        taken("held"),
        "a held flock lost across the lock instance's death: {}",
        m.log()
    );
    assert!(m.sh("touch held.stop").status.success());
    let out = held.join().unwrap();
    assert!(out.status.success(), "{out:?}\n{}", m.log());
    assert!(
        mb.sh("flock -w 20 held true").status.success(),
        "the held flock was released through the surviving instance"
    );
    drop(orphan);
    let out = writer.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !text.contains("FAILED"),
        "failed writes: {text}\n{}\n{}",
        m.log(),
        cluster.logs()
    );
    let acked: Vec<(usize, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("OK ")?.split(' ');
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect();
    let done: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("DONE "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no DONE line: {text}"));
    assert_eq!(acked.len(), done, "every write acknowledged: {text}");
    let after_kill = acked
        .iter()
        .filter(|(_, ms)| *ms > wall_ms_ago(killed.elapsed()))
        .count();
    assert!(
        after_kill > 0,
        "writes went on after the lock instance died: {text}"
    );
    let pause = acked
        .windows(2)
        .map(|w| w[1].1.saturating_sub(w[0].1))
        .max()
        .unwrap_or(0);
    eprintln!(
        "{done} writes, {after_kill} after the lock kill; longest pause between acknowledged writes: {pause} ms"
    );
    assert!(
        Duration::from_millis(pause) < MAX_WRITE_PAUSE,
        "writes paused {pause} ms (bound {MAX_WRITE_PAUSE:?}): {text}"
    );
    // Every acknowledged write is readable through the kernel, on this mount and on a fresh
    // client of the surviving instance.
    let check = format!(
        "for i in $(seq 1 {done}); do [ \"$(cat f-$i)\" = \"$i\" ] || echo BAD $i; done; \
         [ \"$(cat shared)\" = \"{done}\" ] || echo BAD shared"
    );
    assert_eq!(ok(m.sh(&check)), "", "{}", m.log());
    let d = Client::new(&cluster.dir_url(2));
    d.signup_login("alice");
    let md = d.mount(&[]);
    assert_eq!(ok(md.sh(&check)), "", "{}", cluster.logs());
    // No fencing token repeats, and per file they grow in the order granted, across both
    // lock instances (each logs its grants: node, fence, waiter).
    let grants = lock_grants(&cluster, &["lock", "lock-2"]);
    let by_instance = |name: &str| grants.iter().filter(|g| g.instance == name).count();
    assert!(
        by_instance("lock") > 0 && by_instance("lock-2") > 0,
        "both instances granted: lock {}, lock-2 {}",
        by_instance("lock"),
        by_instance("lock-2")
    );
    check_fences(&grants);
}

/// The lock instances the cluster map lists.
fn mapped_locks(cluster: &SplitCluster) -> Vec<String> {
    http_get_json(&format!("{}{}", cluster.url, common::routes::CLUSTER))["lock_urls"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether process `pid` has a TCP connection established to the service at `url`.
fn connected(pid: u32, url: &str) -> bool {
    let Some(port) = url.rsplit(':').next() else {
        return false;
    };
    let out = std::process::Command::new("ss")
        .args(["-Htnp", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output();
    out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("pid={pid},")))
}

/// One write-lock grant a lock instance logged.
#[derive(Debug)]
struct LockGrant {
    instance: String,
    /// Its log line's timestamp (RFC 3339, UTC: ordered as text).
    at: String,
    node: u64,
    fence: u64,
    waiter: String,
}

/// Every "lock granted" line of the named lock instances' logs.
fn lock_grants(cluster: &SplitCluster, names: &[&str]) -> Vec<LockGrant> {
    let mut grants = Vec::new();
    for name in names {
        let log = cluster.data_dir(name).with_extension("log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for line in text.lines().map(strip_ansi) {
            if !line.contains("lock granted") {
                continue;
            }
            let field = |k: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{k}=")))
                    .map(str::to_owned)
            };
            let (Some(node), Some(fence), Some(waiter)) =
                (field("node"), field("fence"), field("waiter"))
            else {
                panic!("a grant line without node, fence or waiter: {line}");
            };
            grants.push(LockGrant {
                instance: (*name).to_owned(),
                at: line
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
                node: node.parse().expect("node"),
                fence: fence.parse().expect("fence"),
                waiter,
            });
        }
    }
    grants
}

/// No fencing token given to two waiters of one file, and a file's tokens grow in the order
/// one instance granted them (a waiter granted again, its answer lost, keeps its token).
/// Grants of different instances are not ordered by their logs' timestamps (two clocks of
/// one machine, but lines written a scheduling delay after the grant).
fn check_fences(grants: &[LockGrant]) {
    let mut by_node: std::collections::BTreeMap<(u64, &str), Vec<&LockGrant>> = Default::default();
    let mut owner: std::collections::HashMap<(u64, u64), &str> = Default::default();
    for g in grants {
        by_node.entry((g.node, &g.instance)).or_default().push(g);
        let first = *owner.entry((g.node, g.fence)).or_insert(&g.waiter);
        assert_eq!(
            first, g.waiter,
            "fence {} of node {} granted to two waiters",
            g.fence, g.node
        );
    }
    for ((node, _), mut gs) in by_node {
        gs.sort_by(|x, y| x.at.cmp(&y.at));
        for w in gs.windows(2) {
            assert!(
                w[1].fence > w[0].fence || w[1].waiter == w[0].waiter,
                "node {node}: fence went from {:?} to {:?}",
                w[0],
                w[1]
            );
        }
    }
    assert!(!grants.is_empty(), "no grants logged");
}

/// `s` without ANSI colour sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the etcd member at `endpoint` is its cluster's leader (its status, through etcd's
/// JSON gateway: `header.member_id == leader`).
fn is_etcd_leader(endpoint: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(endpoint) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!(
        "POST /v3/maintenance/status HTTP/1.0\r\nHost: {endpoint}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut text = String::new();
    let _ = s.take(65_536).read_to_string(&mut text);
    let Some((_, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    !v["leader"].is_null() && v["header"]["member_id"] == v["leader"]
}

/// The wall-clock time in ms since the epoch, `ago` before now.
fn wall_ms_ago(ago: Duration) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.saturating_sub(ago).as_millis()).unwrap_or(u64::MAX)
}

#[test]
fn a_change_made_through_one_instance_reaches_a_client_of_the_other() {
    let (_members, meta) = etcd3("two");
    let cluster = SplitCluster::start_multi(1, 2, &meta);
    let a = Client::new(&cluster.dir_url(1));
    a.signup_login("alice");
    let b = Client::new(&cluster.dir_url(2));
    b.signup_login("alice");
    let ma = a.mount(&[]);
    let (mb, port) = crate::feed::mount_with_metrics(&b);
    ok(ma.sh("mkdir d && echo one > d/f"));
    // B (on instance 2) holds the entries in its kernel with the long TTL: past the short
    // TTL its kernel still answers (so what follows cannot be the TTL's doing).
    assert!(
        eventually(Duration::from_secs(10), || mb.path("d/f").exists()),
        "b sees d/f: {}",
        mb.log()
    );
    ok(mb.sh("ls -l d >/dev/null && stat d/f >/dev/null && cat d/f >/dev/null"));
    std::thread::sleep(Duration::from_millis(1500));
    ok(mb.sh("stat d d/f >/dev/null"));
    std::thread::sleep(Duration::from_millis(1500));
    let misses = crate::feed::kernel_misses(port);
    std::fs::metadata(mb.path("d/f")).unwrap();
    assert_eq!(
        crate::feed::kernel_misses(port),
        misses,
        "stat after the short TTL is answered by B's kernel"
    );
    // A renames and creates through instance 1; instance 2's feed hears it from its etcd
    // watch, and B's kernel drops what it held well within the 15 s it would keep it.
    ok(ma.sh("mv d/f d/g && echo two > d/h"));
    let t0 = Instant::now();
    let seen = eventually(DELIVERY, || {
        mb.path("d/f").symlink_metadata().is_err()
            && mb.path("d/g").exists()
            && mb.path("d/h").exists()
    });
    assert!(
        seen,
        "B's kernel still shows the old namespace: {}",
        mb.log()
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert_eq!(ok(mb.sh("cat d/g d/h")), "one\ntwo\n");
}

/// How long a change made through one instance may take to reach a client of the other:
/// the watch's delivery plus the client's poll, far below the 15 s long TTL.
const DELIVERY: Duration = Duration::from_secs(3);
