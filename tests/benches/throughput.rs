//! Benchmark: the mount against a plain local directory, measured in the same run, printed as
//! values and ratios (no pass/fail thresholds). Each mode gets a fresh cluster (3 file
//! servers, replication 3) and a fresh mount. Needs the release binaries:
//!
//! ```sh
//! cargo build --release --workspace --bins && cargo bench -p dfs-tests
//! ```
//!
//! `DFS_BENCH_MODES` picks the modes (comma-separated, default `default,writeback`);
//! `DFS_BENCH_SCALE` (default 1.0) scales every count, for a quick look.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dfs_tests::{Client, Cluster};

const BIG: usize = 256 << 20;

struct Counts {
    small_files: usize,
    small_dirs: usize,
    saves: usize,
    ns_rounds: usize,
}

impl Counts {
    fn scaled() -> Counts {
        let scale: f64 = std::env::var("DFS_BENCH_SCALE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1.0);
        let n = |v: usize| ((v as f64 * scale) as usize).max(1);
        Counts {
            small_files: n(2000),
            small_dirs: 20,
            saves: n(500),
            ns_rounds: n(500),
        }
    }
}

/// A measured value: what it counts and how it is best read.
#[derive(Clone, Copy)]
enum Value {
    /// Operations (files, entries) per second: higher is better.
    Rate(f64),
    /// MB/s: higher is better.
    Throughput(f64),
    /// Seconds: lower is better.
    Secs(f64),
}

impl Value {
    fn show(self) -> String {
        match self {
            Value::Rate(v) => format!("{v:.0}/s"),
            Value::Throughput(v) => format!("{v:.0} MB/s"),
            Value::Secs(v) => format!("{v:.2} s"),
        }
    }

    /// dfs relative to local, as "fraction of local speed" (1.0 = as fast).
    fn ratio(self, local: Value) -> f64 {
        match (self, local) {
            (Value::Rate(d), Value::Rate(l)) | (Value::Throughput(d), Value::Throughput(l)) => {
                d / l.max(1e-9)
            }
            (Value::Secs(d), Value::Secs(l)) => l / d.max(1e-9),
            _ => f64::NAN,
        }
    }
}

fn rate(n: usize, t: Duration) -> Value {
    Value::Rate(n as f64 / t.as_secs_f64().max(1e-9))
}

fn mbps(bytes: usize, t: Duration) -> Value {
    Value::Throughput(bytes as f64 / 1e6 / t.as_secs_f64().max(1e-9))
}

fn drop_page_cache() {
    // Best effort: needs root (CI and the bench machine run as root).
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn create_small(dir: &Path, c: &Counts) -> Value {
    let data = vec![b'x'; 4096];
    let start = Instant::now();
    for d in 0..c.small_dirs {
        std::fs::create_dir(dir.join(format!("d{d}"))).unwrap();
    }
    for i in 0..c.small_files {
        let p = dir.join(format!("d{}/f{i}", i % c.small_dirs));
        std::fs::write(p, &data).unwrap();
    }
    rate(c.small_files, start.elapsed())
}

fn read_small(dir: &Path, c: &Counts) -> Value {
    let start = Instant::now();
    let mut total = 0;
    for i in 0..c.small_files {
        total += std::fs::read(dir.join(format!("d{}/f{i}", i % c.small_dirs)))
            .unwrap()
            .len();
    }
    assert_eq!(total, c.small_files * 4096);
    rate(c.small_files, start.elapsed())
}

fn stat_small(dir: &Path, c: &Counts) -> Value {
    let start = Instant::now();
    let mut n = 0;
    for d in 0..c.small_dirs {
        for e in std::fs::read_dir(dir.join(format!("d{d}"))).unwrap() {
            let _ = e.unwrap().metadata().unwrap();
            n += 1;
        }
    }
    assert_eq!(n, c.small_files);
    rate(n, start.elapsed())
}

fn untar(dir: &Path, tarball: &Path) -> Value {
    let start = Instant::now();
    let st = Command::new("tar")
        .arg("-xf")
        .arg(tarball)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "tar -x failed");
    Value::Secs(start.elapsed().as_secs_f64())
}

fn editor_saves(dir: &Path, c: &Counts) -> Value {
    let data = vec![b'e'; 16 << 10];
    let target = dir.join("doc.txt");
    std::fs::write(&target, b"first\n").unwrap();
    let tmp = dir.join(".doc.txt.swp");
    let start = Instant::now();
    for _ in 0..c.saves {
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        drop(f);
        std::fs::rename(&tmp, &target).unwrap();
    }
    rate(c.saves, start.elapsed())
}

fn namespace_ops(dir: &Path, c: &Counts) -> Value {
    let start = Instant::now();
    for i in 0..c.ns_rounds {
        let d = dir.join(format!("ns{i}"));
        std::fs::create_dir(&d).unwrap();
        let f = d.join("f");
        drop(std::fs::File::create(&f).unwrap());
        std::fs::remove_file(&f).unwrap();
        std::fs::remove_dir(&d).unwrap();
    }
    rate(c.ns_rounds * 4, start.elapsed())
}

fn write_big(dir: &Path) -> Value {
    let buf = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::create(dir.join("big.bin")).unwrap();
    for _ in 0..BIG / buf.len() {
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    mbps(BIG, start.elapsed())
}

fn read_big(dir: &Path) -> Value {
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut f = std::fs::File::open(dir.join("big.bin")).unwrap();
    let mut n = 0;
    loop {
        let r = f.read(&mut buf).unwrap();
        if r == 0 {
            break;
        }
        n += r;
    }
    assert_eq!(n, BIG);
    mbps(BIG, start.elapsed())
}

/// The serial costs every durable operation is built from, measured on this machine now.
fn floor(scratch: &Path, directory_url: &str) {
    let n = 200;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(scratch.join("fsync.probe")).unwrap();
    let start = Instant::now();
    for i in 0..n {
        f.write_all_at(&[i as u8; 512], 0).unwrap();
        f.sync_all().unwrap();
    }
    let fsync = start.elapsed() / n as u32;
    let start = Instant::now();
    for i in 0..n {
        let tmp = scratch.join(format!("probe{i}.tmp"));
        let mut t = std::fs::File::create(&tmp).unwrap();
        t.write_all(&[1u8; 4096]).unwrap();
        t.sync_all().unwrap();
        std::fs::rename(&tmp, scratch.join("probe")).unwrap();
        std::fs::File::open(scratch).unwrap().sync_all().unwrap();
    }
    let durable_file = start.elapsed() / n as u32;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rtt = rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("{directory_url}/health");
        client.get(&url).send().await.unwrap();
        let start = Instant::now();
        for _ in 0..n {
            client
                .get(&url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
        }
        start.elapsed() / n as u32
    });
    println!(
        "floor: fsync {:.2} ms · temp+fsync+rename+dir fsync {:.2} ms · loopback HTTP round trip {:.3} ms",
        fsync.as_secs_f64() * 1e3,
        durable_file.as_secs_f64() * 1e3,
        rtt.as_secs_f64() * 1e3
    );
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

struct Row {
    name: &'static str,
    local: Value,
    dfs: Value,
}

fn print_rows(mode: &str, rows: &[Row]) {
    println!("\n== mode: {mode} ==");
    println!(
        "{:<44} {:>12} {:>12} {:>10}",
        "workload", "local", "dfs", "dfs/local"
    );
    for r in rows {
        println!(
            "{:<44} {:>12} {:>12} {:>10.3}",
            r.name,
            r.local.show(),
            r.dfs.show(),
            r.dfs.ratio(r.local)
        );
    }
}

/// Runs every workload in `mode`; returns the temp dirs it filled, for the caller to delete
/// after the last mode (see `main`).
fn run_mode(
    mode: &str,
    tarball: &Path,
    c: &Counts,
    local_rows: &mut Option<Vec<Value>>,
) -> Vec<tempfile::TempDir> {
    let cluster = Cluster::start(&[]);
    let client = Client::new(&cluster.url);
    client.signup_login("bench");
    let flags: Vec<&str> = if mode == "writeback" {
        vec!["--writeback"]
    } else {
        vec![]
    };
    let mut m = client.mount(&flags);
    let local = tempfile::tempdir().unwrap();
    floor(local.path(), &cluster.url);

    // Each workload in a fresh subdirectory of both trees.
    type Work<'a> = (&'static str, Box<dyn Fn(&Path) -> Value + 'a>);
    let works: Vec<Work> = vec![
        (
            "create 2,000 x 4 KiB files in 20 dirs",
            Box::new(|d: &Path| create_small(d, c)),
        ),
        ("read them back", Box::new(|d: &Path| read_small(d, c))),
        ("stat them all", Box::new(|d: &Path| stat_small(d, c))),
        (
            "untar /usr/include (s)",
            Box::new(|d: &Path| untar(d, tarball)),
        ),
        (
            "editor saves (16 KiB tmp, fsync, rename)",
            Box::new(|d: &Path| editor_saves(d, c)),
        ),
        (
            "mkdir/create/unlink/rmdir (ops)",
            Box::new(|d: &Path| namespace_ops(d, c)),
        ),
        (
            "write 256 MiB + fsync + close",
            Box::new(|d: &Path| write_big(d)),
        ),
    ];
    let mut rows = Vec::new();
    let mut locals = Vec::new();
    let subdir = |root: &Path, i: usize| -> PathBuf {
        let p = root.join(format!("w{i}"));
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    // "read"/"stat" reuse the tree "create" made.
    let mut dirs: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (i, (name, f)) in works.iter().enumerate() {
        let shared = i <= 2;
        let (l, d) = if shared && i > 0 {
            dirs[0].clone()
        } else {
            (subdir(local.path(), i), subdir(&m.dir, i))
        };
        if i == 0 {
            dirs.push((l.clone(), d.clone()));
        }
        if i == 1 {
            drop_page_cache();
        }
        let lv = match local_rows {
            Some(v) => v[i],
            None => f(&l),
        };
        let dv = f(&d);
        println!("  {name}: local {} · dfs {}", lv.show(), dv.show());
        locals.push(lv);
        rows.push(Row {
            name,
            local: lv,
            dfs: dv,
        });
    }
    let big_dir_local = local.path().join("w6");
    // Cold: the client cache emptied (fresh mount over an empty cache), page cache dropped.
    let rss_write = peak_rss_mib(m.pid());
    m.unmount();
    let _ = std::fs::remove_dir_all(client.cache_dir());
    m = client.mount(&flags);
    let big_dir_dfs = m.dir.join("w6");
    drop_page_cache();
    let lv = match local_rows {
        Some(v) => v[7],
        None => read_big(&big_dir_local),
    };
    let dv = read_big(&big_dir_dfs);
    locals.push(lv);
    rows.push(Row {
        name: "cold read 256 MiB",
        local: lv,
        dfs: dv,
    });
    let lv = match local_rows {
        Some(v) => v[8],
        None => read_big(&big_dir_local),
    };
    let dv = read_big(&big_dir_dfs);
    locals.push(lv);
    rows.push(Row {
        name: "warm read 256 MiB",
        local: lv,
        dfs: dv,
    });
    let rss_read = peak_rss_mib(m.pid());
    print_rows(mode, &rows);
    println!(
        "client peak RSS: {rss_write:.0} MiB (writing), {rss_read:.0} MiB (reading after remount)"
    );
    if local_rows.is_none() {
        *local_rows = Some(locals);
    }
    m.unmount();
    let mut keep = vec![local, client.into_home()];
    keep.extend(cluster.stop_keeping_data());
    keep
}

fn main() {
    let c = Counts::scaled();
    let modes = std::env::var("DFS_BENCH_MODES").unwrap_or_else(|_| "default,writeback".into());
    let pack = tempfile::tempdir().unwrap();
    let tarball = pack.path().join("include.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg("/usr")
        .arg("include")
        .status()
        .unwrap();
    assert!(st.success(), "packing /usr/include failed");
    let mut local_rows = None;
    // Each mode's files are deleted only after the last mode: on ext4 without a journal (this
    // machine's disk) every new inode skips the ones freed in the last 30 s, so deleting one
    // mode's ~20k files right before the next would slow that mode's creates, and not the
    // local baseline's.
    let mut leftovers = Vec::new();
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        leftovers.extend(run_mode(mode, &tarball, &c, &mut local_rows));
    }
    drop(leftovers);
}
