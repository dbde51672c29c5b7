//! Benchmark: cost proportional to work (issue 10). The same namespace operations and repair
//! passes, timed on a warm redb store holding a small namespace and a large one: a create and
//! a remove in one directory of that size, a lookup in it, `statfs`, a page of its listing,
//! and a repair pass over the same queued work (64 files short of a copy). Printed as medians
//! and large/small ratios (the goal: within 1.5x); nothing is asserted. The two namespaces
//! take turns round by round, so that the machine's other load weighs on both alike. Warm: every operation
//! runs a quarter of its rounds untimed first, and lookups and listings cycle through 256
//! names spread over the directory.
//!
//! ```sh
//! cargo bench -p dfs-server --bench scale
//! ```
//!
//! The large namespace is written through the store directly, untimed (`bulk_load`).
//! `DFS_SCALE_NODES` (default 1000000) sets its size, for a quick look; `DFS_SCALE_ROUNDS`
//! (default 200) the timed rounds of each operation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::{CommitRequest, CreateRequest, PushBase, RegisterServerRequest};
use common::{Caller, ContentHash, FenceToken, FileKind, NodeId, ServerId, UploadId, ValidName};
use dfs_server::directory::repair::{self, InFlight, RepairConfig};
use dfs_server::directory::{DirectoryConfig, DirectoryService};

/// Files queued for repair in every namespace: the work a pass has to do.
const QUEUED: usize = 64;

/// Names the lookups and listings cycle through (warm).
const WARM_NAMES: u64 = 256;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn name(s: &str) -> ValidName {
    ValidName::parse(s).unwrap()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn create(svc: &DirectoryService, parent: NodeId, n: &str) -> common::NodeMeta {
    let req = CreateRequest {
        name: name(n),
        kind: FileKind::File,
        mode: 0o644,
        symlink_target: None,
        rdev: 0,
    };
    svc.create(parent, &req, &Caller::cluster()).unwrap()
}

/// One namespace, loaded, with its queued work and its servers' heartbeats.
struct Bench {
    svc: Arc<DirectoryService>,
    big: NodeId,
    nodes: u64,
    peer: dfs_server::peer::Peer,
    cfg: RepairConfig,
    inflight: InFlight,
    stop: Arc<std::sync::atomic::AtomicBool>,
    beats: Option<std::thread::JoinHandle<()>>,
    load: Duration,
    round: u64,
    _dir: tempfile::TempDir,
}

fn setup(nodes: u64) -> Bench {
    let dir = tempfile::tempdir().unwrap();
    let svc = Arc::new(DirectoryService::open(dir.path(), DirectoryConfig::default()).unwrap());
    // Three file servers on closed loopback ports: a copy fails at once, so every pass finds
    // the same work queued.
    let mut servers = Vec::new();
    for _ in 0..3 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        servers.push(
            svc.register_server(&RegisterServerRequest {
                url,
                capacity_bytes: 1 << 40,
                previous_id: None,
                cluster_id: None,
            })
            .unwrap(),
        );
    }
    // Their heartbeats, for as long as the run lasts (loading a large namespace takes longer
    // than a server stays alive without one).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beats = {
        let (svc, stop, servers) = (svc.clone(), stop.clone(), servers.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &servers {
                    svc.registry.heartbeat(*s, None).unwrap();
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let big = {
        let req = CreateRequest {
            name: name("big"),
            kind: FileKind::Dir,
            mode: 0o755,
            symlink_target: None,
            rdev: 0,
        };
        svc.create(NodeId::ROOT, &req, &Caller::cluster())
            .unwrap()
            .id
    };
    let started = Instant::now();
    svc.bulk_load(
        big,
        "f",
        nodes,
        50_000,
        servers[0],
        &[servers[1], servers[2]],
    )
    .unwrap();
    let load = started.elapsed();
    // The queued work: files with a new version held by two servers of three.
    for i in 0..QUEUED {
        let f = create(&svc, big, &format!("short{i}"));
        let holders: Vec<ServerId> = f.primary.into_iter().chain([f.replicas[0]]).collect();
        svc.commit(
            f.id,
            &CommitRequest {
                hash: ContentHash::from_digest(&[7; 32]),
                size: 1,
                fence: FenceToken(1),
                upload_id: UploadId::from_bytes([7; 16]),
                base: PushBase {
                    version: 0,
                    waiting: true,
                },
                holders,
                writer: "bench".into(),
                writer_id: None,
                primary: f.primary,
                replicas: Some(f.replicas.clone()),
                mode: None,
                mtime_ns: None,
                origin: None,
            },
        )
        .unwrap();
    }
    assert_eq!(svc.repair_queue_len().unwrap(), QUEUED as u64);
    let peer = dfs_server::peer::Peer::new("bench").unwrap();
    // Interval 0: an entry re-dated after a failed copy is due again at once.
    let cfg = RepairConfig {
        interval: Duration::ZERO,
        max_copies_per_pass: 8,
    };
    let inflight = InFlight::default();
    Bench {
        svc,
        big,
        nodes,
        peer,
        cfg,
        inflight,
        stop,
        beats: Some(beats),
        load,
        round: 0,
        _dir: dir,
    }
}

/// The operations timed.
#[derive(Clone, Copy)]
enum Op {
    CreateRemove,
    Lookup,
    Statfs,
    ListPage,
    RepairPass,
}

impl Bench {
    /// A name of the loaded directory: the same 256 names, spread over the whole directory,
    /// cycled through (warm: what is timed is the depth of the store's trees, not first reads
    /// of pages from the disk).
    fn spread(&self) -> ValidName {
        let k = (self.round % WARM_NAMES) * (self.nodes / WARM_NAMES).max(1) % self.nodes.max(1);
        name(&format!("f{k}"))
    }

    fn run(&mut self, op: Op, rt: &tokio::runtime::Runtime) -> Duration {
        self.round += 1;
        let who = Caller::cluster().id;
        let (svc, big) = (&self.svc, self.big);
        let tmp = format!("tmp{}", self.round);
        let spread = self.spread();
        let t = Instant::now();
        match op {
            Op::CreateRemove => {
                create(svc, big, &tmp);
                svc.remove(big, &name(&tmp), false, &who).unwrap();
            }
            Op::Lookup => {
                svc.lookup(big, &spread, &who).unwrap();
            }
            Op::Statfs => {
                svc.statfs().unwrap();
            }
            Op::ListPage => {
                svc.list_page(big, Some(&spread), Some(100), &who).unwrap();
            }
            Op::RepairPass => {
                rt.block_on(repair::pass(svc, &self.peer, &self.cfg, &self.inflight));
            }
        }
        t.elapsed()
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(b) = self.beats.take() {
            let _ = b.join();
        }
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a test run (`cargo test --benches`) does not: stay quick.
    let benching = std::env::args().any(|a| a == "--bench");
    let big = env("DFS_SCALE_NODES", if benching { 1_000_000 } else { 10_000 });
    let rounds = usize::try_from(env("DFS_SCALE_ROUNDS", if benching { 200 } else { 20 }))
        .unwrap_or(200)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let small = 1000;
    let mut a = setup(small);
    let mut b = setup(big);
    println!(
        "namespace of {small} vs {big} nodes (redb, warm; median of {rounds} rounds, the two \
         namespaces taking turns; loaded in {:.1?} and {:.1?}, untimed)",
        a.load, b.load
    );
    println!(
        "{:<34} {:>12} {:>12} {:>8}",
        "operation", small, big, "ratio"
    );
    let ops = [
        ("create + remove in one directory", Op::CreateRemove),
        ("lookup in that directory", Op::Lookup),
        ("statfs", Op::Statfs),
        ("list page (100 entries)", Op::ListPage),
        ("repair pass (64 files queued)", Op::RepairPass),
    ];
    let mut rows = Vec::new();
    for (what, op) in ops {
        for _ in 0..rounds / 4 + 1 {
            a.run(op, &rt); // warm
            b.run(op, &rt);
        }
        // Turns, so that whatever else the machine does weighs on both alike.
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            x.push(a.run(op, &rt));
            y.push(b.run(op, &rt));
        }
        rows.push((what, median(x), median(y)));
    }
    assert!(a.svc.repair_queue_len().unwrap() >= QUEUED as u64);
    assert!(b.svc.repair_queue_len().unwrap() >= QUEUED as u64);
    for (what, x, y) in rows {
        println!(
            "{what:<34} {:>12} {:>12} {:>7.2}x",
            format!("{x:.1?}"),
            format!("{y:.1?}"),
            y.as_secs_f64() / x.as_secs_f64().max(1e-9)
        );
    }
}
