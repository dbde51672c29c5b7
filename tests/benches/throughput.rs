//! Benchmark: the mount against a plain local directory, measured in the same run, printed as
//! ratios (no pass/fail thresholds). Needs the release binaries:
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo bench -p dfs-tests
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use dfs_tests::{Client, Cluster};

const BIG: usize = 256 << 20;
const SMALL_FILES: usize = 300;

/// One measured operation on a directory.
type Case = (&'static str, fn(&Path) -> Duration);

fn write_big(dir: &Path) -> Duration {
    let buf = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(dir.join("big.bin")).unwrap();
    for _ in 0..BIG / buf.len() {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    start.elapsed()
}

fn read_big(dir: &Path) -> Duration {
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::open(dir.join("big.bin")).unwrap();
    while f.read(&mut buf).unwrap() > 0 {}
    start.elapsed()
}

fn rewrite_in_place(dir: &Path) -> Duration {
    // Random-ish 4 KiB writes into an open file: the case passthrough makes local-speed.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("big.bin"))
        .unwrap();
    let block = [1u8; 4096];
    let start = Instant::now();
    for i in 0..20_000u64 {
        let off = (i * 7919 * 4096) % (BIG as u64 - 4096);
        f.write_at(&block, off).unwrap();
    }
    let t = start.elapsed();
    drop(f);
    t
}

fn small_files(dir: &Path) -> Duration {
    let start = Instant::now();
    for i in 0..SMALL_FILES {
        std::fs::write(dir.join(format!("s{i}.txt")), b"small file\n").unwrap();
    }
    start.elapsed()
}

fn stat_all(dir: &Path) -> Duration {
    let start = Instant::now();
    for e in std::fs::read_dir(dir).unwrap() {
        let _ = e.unwrap().metadata().unwrap();
    }
    start.elapsed()
}

fn main() {
    let cluster = Cluster::start(&[]);
    let client = Client::new(&cluster.url);
    client.signup_login("bench");
    let m = client.mount(&[]);
    let local = tempfile::tempdir().unwrap();
    println!(
        "{:<36} {:>12} {:>12} {:>8}",
        "operation", "local", "dfs", "dfs/local"
    );
    let cases: [Case; 5] = [
        ("write 256 MiB + close", write_big),
        ("read 256 MiB (cached)", read_big),
        ("20k 4 KiB writes into open file", rewrite_in_place),
        ("create 300 small files", small_files),
        ("stat every entry", stat_all),
    ];
    for (name, f) in cases {
        let l = f(local.path());
        let d = f(&m.dir);
        println!(
            "{name:<36} {:>10.1}ms {:>10.1}ms {:>8.2}",
            l.as_secs_f64() * 1e3,
            d.as_secs_f64() * 1e3,
            d.as_secs_f64() / l.as_secs_f64().max(1e-9)
        );
    }
}
