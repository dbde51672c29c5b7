//! The write path's promises through real mounts: what a close guarantees in each mode when the
//! client is killed right after it, and the metrics that show where the time goes.

use std::collections::HashMap;

use dfs_tests::*;

fn file_servers(cluster: &Cluster) -> Vec<String> {
    let info = cluster.get_json(common::routes::CLUSTER);
    info["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["url"].as_str().unwrap().to_owned())
        .collect()
}

fn sum(metrics: &[HashMap<String, f64>], series: &str) -> f64 {
    metrics.iter().filter_map(|m| m.get(series)).sum()
}

fn scrape(urls: &[String]) -> Vec<HashMap<String, f64>> {
    urls.iter()
        .map(|u| parse_metrics(&http_get_text(&format!("{u}/metrics"))))
        .collect()
}

/// Metadata of `/name` from the directory (authorised as the cluster).
fn meta_of(cluster: &Cluster, name: &str) -> serde_json::Value {
    let key = std::fs::read_to_string(cluster.data.join("cluster.key")).unwrap();
    http_get_json_with(
        &format!(
            "{}{}",
            cluster.url,
            common::routes::child(common::NodeId::ROOT, name)
        ),
        Some((common::routes::CLUSTER_KEY_HEADER, key.trim())),
    )
}

/// How many file servers hold `(node, hash)` on disk.
fn copies_on_disk(cluster: &Cluster, node: u64, hash: &str) -> usize {
    (1..=3)
        .filter(|i| has_blob(&cluster.data.join(format!("file-{i}")), node, hash))
        .count()
}

#[test]
fn default_mode_close_is_on_two_servers_even_if_the_client_dies_right_after() {
    let cluster = Cluster::start(&[]);
    let c = Client::new(&cluster.url);
    c.signup_login("alice");
    let m = c.mount(&[]);
    ok(m.sh("printf 'acknowledged\\n' > a.txt"));
    m.kill9();
    let meta = meta_of(&cluster, "a.txt");
    assert_eq!(meta["version"].as_u64(), Some(1), "{meta}");
    assert!(meta["holders"].as_array().unwrap().len() >= 2, "{meta}");
    let node = meta["id"].as_u64().unwrap();
    let hash = meta["hash"].as_str().unwrap();
    assert!(copies_on_disk(&cluster, node, hash) >= 2);
}

#[test]
fn writeback_close_survives_a_client_kill_and_is_pushed_by_the_next_mount() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&["--writeback"]);
    ok(m.sh("for i in 1 2 3 4 5; do echo \"file $i\" > w$i.txt; done"));
    m.kill9();
    // Whatever the dead process managed to push, the next mount of its cache pushes the rest.
    let m = a.mount(&["--writeback"]);
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let mb = b.mount(&[]);
    let all = eventually(std::time::Duration::from_secs(30), || {
        (1..=5)
            .all(|i| mb.sh(&format!("cat w{i}.txt")).stdout == format!("file {i}\n").into_bytes())
    });
    assert!(
        all,
        "every write-back close reached the servers: {}",
        m.log()
    );
    drop(m);
}

#[test]
fn metrics_parse_and_move_when_files_are_written() {
    let cluster = Cluster::start(&[]);
    let c = Client::new(&cluster.url);
    c.signup_login("alice");
    let port = free_port();
    let m = c.mount(&["--metrics", &format!("127.0.0.1:{port}")]);
    let client = vec![format!("http://127.0.0.1:{port}")];
    let directory = vec![cluster.url.clone()];
    let files = file_servers(&cluster);
    let (d0, f0) = (scrape(&directory), scrape(&files));
    ok(m.sh("for i in 1 2 3; do echo $i > f$i; done"));
    let (d1, f1, c1) = (scrape(&directory), scrape(&files), scrape(&client));
    let writes = "dfs_directory_durable_writes_total";
    assert!(
        sum(&d1, writes) >= sum(&d0, writes) + 6.0,
        "three creates and three version commits"
    );
    let uploads = "dfs_file_uploads_total";
    assert_eq!(sum(&f1, uploads), sum(&f0, uploads) + 3.0);
    assert!(sum(&f1, "dfs_file_fsyncs_total") > sum(&f0, "dfs_file_fsyncs_total"));
    let pushes = "dfs_latency_seconds_count{kind=\"push_stage\",name=\"total\"}";
    assert_eq!(sum(&c1, pushes), 3.0, "{:?}", c1);
    assert!(
        sum(
            &c1,
            "dfs_latency_seconds_count{kind=\"fuse_op\",name=\"create\"}"
        ) >= 3.0
    );
    let route = "dfs_latency_seconds_count{kind=\"http\",name=\"POST /v1/nodes/{id}/children\"}";
    assert!(sum(&d1, route) >= 3.0);
}
