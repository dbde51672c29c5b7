//! Moving a cluster's metadata from redb to etcd: `dfs-server meta export` and `meta import`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dfs_server::meta::etcd::{EtcdConfig, EtcdStore};
use dfs_server::meta::{MetaStore, migrate};
use dfs_tests::*;

fn meta(args: &[&str]) -> std::process::Output {
    Command::new(bin("dfs-server"))
        .arg("meta")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn downloads(cluster: &SplitCluster) -> u64 {
    let map = http_get_json(&format!("{}{}", cluster.url, common::routes::CLUSTER));
    map["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let url = s["url"].as_str().unwrap();
            http_get_json(&format!("{url}{}", common::routes::FILE_STATS))["downloads"]
                .as_u64()
                .unwrap()
        })
        .sum()
}

fn cluster_id(cluster: &SplitCluster) -> String {
    let map = http_get_json(&format!("{}{}", cluster.url, common::routes::CLUSTER));
    map["cluster_id"].as_str().unwrap().to_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_redb_cluster_moves_to_etcd_keeping_its_id_caches_pending_uploads_and_fences() {
    let etcd = etcd::EtcdServer::start(&[]).unwrap_or_else(|e| panic!("{e}"));
    let mut cluster = SplitCluster::start(2);
    let id = cluster_id(&cluster);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--close-timeout-secs", "2", "--drain-timeout-secs", "2"]);
    ok(m.sh(
        "mkdir -p d/e && for i in $(seq 1 40); do echo \"file $i\" > d/f$i; done && \
         echo cached > c.txt && echo deep > d/e/g && ln d/f1 d/link1 && ln -s f2 d/sym2",
    ));
    // Several writes of one file: its fencing token moves on.
    for i in 0..5 {
        ok(m.sh(&format!("echo v{i} > c.txt")));
    }
    // A change no file server can take stays pending in the client's cache.
    cluster.stop_service("file-1", false);
    cluster.stop_service("file-2", false);
    let out = m.sh("echo pending | tee p.txt >/dev/null");
    assert!(!out.status.success(), "the close reports the failed push");
    let out = a.run(&["umount", "--force", m.dir.to_str().unwrap()], "");
    assert!(out.status.success(), "{out:?}");
    drop(m);
    // The highest token the directory recorded for any file before the move.
    let fences_before: u64 = ["c.txt", "d"]
        .iter()
        .map(|n| cluster.meta_of(n)["fence"].as_u64().unwrap_or(0))
        .max()
        .unwrap();
    assert!(fences_before > 0, "c.txt was written under a fence");
    for name in ["directory", "lock", "auth"] {
        cluster.stop_service(name, false);
    }

    // Export (the directory and the lock service are stopped) and import into etcd.
    let export = cluster.data_dir("export.jsonl");
    let out = meta(&[
        "export",
        "--data",
        path_str(&cluster.data_dir("directory")),
        "--lock-data",
        path_str(&cluster.data_dir("lock")),
        "--out",
        path_str(&export),
    ]);
    assert!(out.status.success(), "{out:?}");
    let header = migrate::read_header(&mut std::io::BufReader::new(
        std::fs::File::open(&export).unwrap(),
    ))
    .unwrap();
    assert_eq!(header.cluster_id, id);
    let issued = dfs_server::lock::local::fence_high_water(&cluster.data_dir("lock")).unwrap();
    assert_eq!(header.fence_base, issued);
    assert!(issued >= fences_before);
    let url = etcd.meta_url("moved");
    let out = meta(&["import", "--meta", &url, "--in", path_str(&export)]);
    assert!(out.status.success(), "{out:?}");
    // A second import into the same prefix is refused: it is not empty.
    let again = meta(&["import", "--meta", &url, "--in", path_str(&export)]);
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--replace"),
        "{again:?}"
    );
    // The fence base the etcd lock engine adds to its revision-based tokens is above every
    // token issued before the move.
    let store = MetaStore::Etcd(EtcdStore::connect(&EtcdConfig::parse(&url).unwrap()).unwrap());
    let base = migrate::read_fence_base(&store).unwrap();
    assert_eq!(base, issued);
    drop(store);

    // The cluster again, its directory and its lock service on etcd.
    cluster.meta = Some(url.clone());
    for name in ["directory", "lock", "auth", "file-1", "file-2"] {
        cluster.start_service(name);
    }
    cluster.wait_ready();
    assert_eq!(cluster_id(&cluster), id, "the cluster id is kept");
    let logs = cluster.logs();
    assert!(!logs.contains("another cluster"), "{logs}");

    // The same client, the same cache: the cached file opens without a download, and the
    // pending upload is pushed.
    let before = downloads(&cluster);
    let m = a.mount(&[]);
    assert_eq!(ok(m.sh("cat c.txt")), "v4\n");
    assert_eq!(downloads(&cluster), before, "c.txt came from the cache");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    assert!(
        eventually(Duration::from_secs(60), || mb.sh("cat p.txt").stdout
            == b"pending\n"),
        "the pending upload was pushed: {}\n{}",
        m.log(),
        cluster.logs()
    );
    // Every file reads back on a client with an empty cache, hard and symbolic links too.
    let check = "for i in $(seq 1 40); do [ \"$(cat d/f$i)\" = \"file $i\" ] || echo BAD $i; done; \
                 cat d/e/g d/link1 d/sym2; stat -c %h d/f1";
    assert_eq!(ok(mb.sh(check)), "deep\nfile 1\nfile 2\n2\n");
    // Writes continue, under fencing tokens (the etcd lock engine's: fence base + revision)
    // above every one accepted before the move.
    ok(m.sh("echo after > c.txt && mkdir new && echo n > new/x"));
    assert!(eventually(Duration::from_secs(30), || mb
        .sh("cat c.txt new/x")
        .stdout
        == b"after\nn\n"));
    let fence_after = cluster.meta_of("c.txt")["fence"].as_u64().unwrap();
    assert!(
        fence_after > issued,
        "token {fence_after} after the move, {issued} issued before"
    );
    // The node counter moved across: a new node takes a fresh id.
    let new_id = cluster.meta_of("new")["id"].as_u64().unwrap();
    let old_ids = (cluster.meta_of("d")["id"].as_u64().unwrap())
        .max(cluster.meta_of("p.txt")["id"].as_u64().unwrap());
    assert!(new_id > old_ids, "{new_id} {old_ids}");
}
