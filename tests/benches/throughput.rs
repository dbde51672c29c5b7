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
/// Returns (one fsync of a file rewritten in place, one temp + fsync + rename + dir fsync).
fn floor(scratch: &Path, directory_url: &str) -> (Duration, Duration) {
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
        let client = dfs_server::tls::client().expect("an HTTP client");
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
    (fsync, durable_file)
}

/// The cluster's flush counters (directory, file servers) once its background work (late
/// replica copies) has settled.
fn settled_flushes(cluster: &Cluster) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = cluster.flushes();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = cluster.flushes();
        if now == last {
            break;
        }
        last = now;
    }
    last
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
    /// Device flushes the cluster made per operation of this workload, if counted:
    /// (directory commits, file server fsyncs).
    flushes_per_op: Option<(f64, f64)>,
}

/// Each row, and how many device flushes its operations cost: directory commits + file server
/// fsyncs. All services share this machine's one disk, whose flushes do not overlap (8 parallel
/// fdatasyncs cost about as much as 8 in a row here), so the flushes are a floor on the time
/// per operation: a directory commit costs one in-place fsync, a file server fsync half of a
/// temp + fsync + rename + dir fsync (it is one of those two). "flush-bound" is the rate that
/// floor allows.
fn print_rows(mode: &str, rows: &[Row], (fsync, durable_file): (Duration, Duration)) {
    println!("\n== mode: {mode} ==");
    println!(
        "{:<44} {:>12} {:>12} {:>10} {:>11} {:>12}",
        "workload", "local", "dfs", "dfs/local", "flushes/op", "flush-bound"
    );
    for r in rows {
        let (per_op, bound) = match r.flushes_per_op {
            Some((d, f)) => {
                let secs = d * fsync.as_secs_f64() + f * durable_file.as_secs_f64() / 2.0;
                let bound = if secs > 0.0 {
                    format!("{:.0}/s", 1.0 / secs)
                } else {
                    "-".to_owned()
                };
                (format!("{d:.1}+{f:.1}"), bound)
            }
            None => ("-".to_owned(), "-".to_owned()),
        };
        println!(
            "{:<44} {:>12} {:>12} {:>10.3} {:>11} {:>12}",
            r.name,
            r.local.show(),
            r.dfs.show(),
            r.dfs.ratio(r.local),
            per_op,
            bound
        );
    }
}

/// Runs every workload in `mode`; returns the temp dirs it filled, for the caller to delete
/// after the last mode (see `main`).
fn run_mode(
    mode: &str,
    tarball: &Path,
    tar_entries: usize,
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
    let costs = floor(local.path(), &cluster.url);

    // Each workload in a fresh subdirectory of both trees, with the operations it counts.
    type Work<'a> = (&'static str, usize, Box<dyn Fn(&Path) -> Value + 'a>);
    let works: Vec<Work> = vec![
        (
            "create 2,000 x 4 KiB files in 20 dirs",
            c.small_files,
            Box::new(|d: &Path| create_small(d, c)),
        ),
        (
            "read them back",
            c.small_files,
            Box::new(|d: &Path| read_small(d, c)),
        ),
        (
            "stat them all",
            c.small_files,
            Box::new(|d: &Path| stat_small(d, c)),
        ),
        (
            "untar /usr/include (s; per entry)",
            tar_entries,
            Box::new(|d: &Path| untar(d, tarball)),
        ),
        (
            "editor saves (16 KiB tmp, fsync, rename)",
            c.saves,
            Box::new(|d: &Path| editor_saves(d, c)),
        ),
        (
            "mkdir/create/unlink/rmdir (ops)",
            c.ns_rounds * 4,
            Box::new(|d: &Path| namespace_ops(d, c)),
        ),
        (
            "write 256 MiB + fsync + close",
            1,
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
    for (i, (name, ops, f)) in works.iter().enumerate() {
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
        let before = settled_flushes(&cluster);
        let dv = f(&d);
        let after = settled_flushes(&cluster);
        let n = (*ops).max(1) as f64;
        let per_op = ((after.0 - before.0) / n, (after.1 - before.1) / n);
        println!(
            "  {name}: local {} · dfs {} · {:.1}+{:.1} flushes/op",
            lv.show(),
            dv.show(),
            per_op.0,
            per_op.1
        );
        locals.push(lv);
        rows.push(Row {
            name,
            local: lv,
            dfs: dv,
            flushes_per_op: Some(per_op),
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
        flushes_per_op: None,
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
        flushes_per_op: None,
    });
    let rss_read = peak_rss_mib(m.pid());
    print_rows(mode, &rows, costs);
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
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&tarball)
        .output()
        .unwrap();
    assert!(listing.status.success(), "listing the tarball failed");
    let tar_entries = listing
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    let mut local_rows = None;
    // Each mode's files are deleted only after the last mode: on ext4 without a journal (this
    // machine's disk) every new inode skips the ones freed in the last 30 s, so deleting one
    // mode's ~20k files right before the next would slow that mode's creates, and not the
    // local baseline's.
    let mut leftovers = Vec::new();
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        leftovers.extend(run_mode(mode, &tarball, tar_entries, &c, &mut local_rows));
    }
    drop(leftovers);
}
