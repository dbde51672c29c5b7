//! Reference-model test of the file system core: random sequences of operations on one client
//! (including writes by another client behind its back, and remounts) are applied to `DfsFs`
//! over a real in-process cluster and to a `BTreeMap` model; after every operation the client's
//! whole view must equal the model. No kernel mount needed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::NodeId;
use dfs_fuse::creds::SavedLogin;
use dfs_fuse::fs::{DfsFs, FsConfig};
use dfs_fuse::remote::{Remote, RemoteConfig};
use dfs_server::cluster::{ClusterConfig, ClusterHandle};
use proptest::prelude::*;

type Path = Vec<String>;

struct Shared {
    rt: tokio::runtime::Runtime,
    cluster: ClusterHandle,
    alice: SavedLogin,
    bob: SavedLogin,
    _dir: tempfile::TempDir,
}

/// One cluster for every case (each case works in its own top-level directory).
fn shared() -> &'static Shared {
    static S: OnceLock<Shared> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cluster, alice, bob) = rt.block_on(async {
            let cfg =
                ClusterConfig::new(dir.path().join("cluster"), "127.0.0.1:0".parse().unwrap());
            let cluster = dfs_server::cluster::start(cfg).await.unwrap();
            let r =
                Remote::new(&cluster.directory_url, None, None, RemoteConfig::default()).unwrap();
            // One user on two machines: permissions between users are tested elsewhere.
            r.signup("alice", "password123").await.unwrap();
            let mut logins = Vec::new();
            for _ in 0..2 {
                logins.push(r.login("alice", "password123").await.unwrap());
            }
            let bob = logins.pop().unwrap();
            (cluster, logins.pop().unwrap(), bob)
        });
        Shared {
            rt,
            cluster,
            alice,
            bob,
            _dir: dir,
        }
    })
}

fn client(login: &SavedLogin, cache: &std::path::Path) -> DfsFs {
    let s = shared();
    let remote = Remote::new(
        &s.cluster.directory_url,
        Some(login.clone()),
        None,
        RemoteConfig::default(),
    )
    .unwrap();
    let config = FsConfig {
        close_timeout: Duration::from_secs(5),
        retry_interval: Duration::from_millis(100),
        ..FsConfig::default()
    };
    DfsFs::new(remote, cache, config, "").unwrap()
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        parent: usize,
        name: String,
    },
    Mkdir {
        parent: usize,
        name: String,
    },
    Write {
        file: usize,
        data: Vec<u8>,
    },
    Append {
        file: usize,
        data: Vec<u8>,
    },
    Truncate {
        file: usize,
        len: u8,
    },
    Unlink {
        file: usize,
    },
    Rmdir {
        dir: usize,
    },
    Rename {
        src: usize,
        dst_parent: usize,
        name: String,
    },
    /// Another client writes the file behind this one's back.
    RemoteWrite {
        file: usize,
        data: Vec<u8>,
    },
    /// This client unmounts and mounts again on the same cache.
    Remount,
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("c".to_owned())
    ]
}

fn data() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..64)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (any::<usize>(), name()).prop_map(|(parent, name)| Op::Create { parent, name }),
        1 => (any::<usize>(), name()).prop_map(|(parent, name)| Op::Mkdir { parent, name }),
        3 => (any::<usize>(), data()).prop_map(|(file, data)| Op::Write { file, data }),
        1 => (any::<usize>(), data()).prop_map(|(file, data)| Op::Append { file, data }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(file, len)| Op::Truncate { file, len }),
        1 => any::<usize>().prop_map(|file| Op::Unlink { file }),
        1 => any::<usize>().prop_map(|dir| Op::Rmdir { dir }),
        1 => (any::<usize>(), any::<usize>(), name()).prop_map(|(src, dst_parent, name)| Op::Rename { src, dst_parent, name }),
        2 => (any::<usize>(), data()).prop_map(|(file, data)| Op::RemoteWrite { file, data }),
        1 => Just(Op::Remount),
    ]
}

/// path -> None for a directory, Some(content) for a file; the case root is the empty path.
#[derive(Default)]
struct Model(BTreeMap<Path, Option<Vec<u8>>>);

impl Model {
    fn dirs(&self) -> Vec<Path> {
        let mut v = vec![vec![]];
        v.extend(
            self.0
                .iter()
                .filter(|(_, c)| c.is_none())
                .map(|(p, _)| p.clone()),
        );
        v
    }
    fn files(&self) -> Vec<Path> {
        self.0
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(p, _)| p.clone())
            .collect()
    }
    fn all(&self) -> Vec<Path> {
        self.0.keys().cloned().collect()
    }
    fn has_children(&self, p: &Path) -> bool {
        self.0
            .keys()
            .any(|k| k.len() == p.len() + 1 && k.starts_with(p))
    }
}

fn join(p: &Path, n: &str) -> Path {
    let mut v = p.clone();
    v.push(n.to_owned());
    v
}

async fn resolve(fs: &DfsFs, root: NodeId, p: &[String]) -> NodeId {
    let mut id = root;
    for part in p {
        id = NodeId(
            fs.lookup(id, OsStr::new(part))
                .await
                .expect("model path exists")
                .ino
                .0,
        );
    }
    id
}

async fn write_at(fs: &DfsFs, node: NodeId, flags: i32, offset: u64, data: &[u8]) {
    let o = fs.open(node, flags).await.unwrap();
    if !data.is_empty() {
        fs.write(o.fh, offset, data).unwrap();
    }
    fs.flush(o.fh).await.unwrap();
    fs.release(o.fh);
}

async fn read_all(fs: &DfsFs, node: NodeId) -> Vec<u8> {
    let o = fs.open(node, libc::O_RDONLY).await.unwrap();
    let d = fs.read(o.fh, 0, 1 << 16).unwrap();
    fs.release(o.fh);
    d
}

/// Applies `op` to both; returns whether the model says it should succeed and whether it did.
async fn apply(
    a: &DfsFs,
    b: &DfsFs,
    root_a: NodeId,
    root_b: NodeId,
    m: &mut Model,
    op: &Op,
) -> Option<(bool, bool)> {
    let pick = |v: Vec<Path>, i: usize| {
        if v.is_empty() {
            None
        } else {
            Some(v[i % v.len()].clone())
        }
    };
    Some(match op {
        Op::Create { parent, name } | Op::Mkdir { parent, name } => {
            let parent = pick(m.dirs(), *parent)?;
            let pid = resolve(a, root_a, &parent).await;
            let p = join(&parent, name);
            let want = !m.0.contains_key(&p);
            let got = if matches!(op, Op::Create { .. }) {
                match a
                    .create(pid, OsStr::new(name), 0o644, libc::O_WRONLY | libc::O_EXCL)
                    .await
                {
                    Ok((_, o)) => {
                        a.flush(o.fh).await.unwrap();
                        a.release(o.fh);
                        true
                    }
                    Err(_) => false,
                }
            } else {
                a.mkdir(pid, OsStr::new(name), 0o755).await.is_ok()
            };
            if want {
                m.0.insert(
                    p,
                    if matches!(op, Op::Create { .. }) {
                        Some(vec![])
                    } else {
                        None
                    },
                );
            }
            (want, got)
        }
        Op::Write { file, data } | Op::RemoteWrite { file, data } => {
            let f = pick(m.files(), *file)?;
            let (fs, root) = if matches!(op, Op::Write { .. }) {
                (a, root_a)
            } else {
                (b, root_b)
            };
            let id = resolve(fs, root, &f).await;
            write_at(fs, id, libc::O_WRONLY | libc::O_TRUNC, 0, data).await;
            m.0.insert(f, Some(data.clone()));
            (true, true)
        }
        Op::Append { file, data } => {
            let f = pick(m.files(), *file)?;
            let id = resolve(a, root_a, &f).await;
            let cur = m.0[&f].clone().unwrap_or_default();
            write_at(a, id, libc::O_WRONLY, cur.len() as u64, data).await;
            let mut new = cur;
            new.extend_from_slice(data);
            m.0.insert(f, Some(new));
            (true, true)
        }
        Op::Truncate { file, len } => {
            let f = pick(m.files(), *file)?;
            let id = resolve(a, root_a, &f).await;
            let len = u64::from(*len % 80);
            let change = dfs_fuse::fs::AttrChange {
                size: Some(len),
                ..Default::default()
            };
            a.setattr(id, change, None).await.unwrap();
            let mut c = m.0[&f].clone().unwrap_or_default();
            c.resize(usize::try_from(len).unwrap(), 0);
            m.0.insert(f, Some(c));
            (true, true)
        }
        Op::Unlink { file } => {
            let f = pick(m.files(), *file)?;
            let pid = resolve(a, root_a, &f[..f.len() - 1]).await;
            let got = a.unlink(pid, OsStr::new(&f[f.len() - 1])).await.is_ok();
            m.0.remove(&f);
            (true, got)
        }
        Op::Rmdir { dir } => {
            let all: Vec<Path> = m.dirs().into_iter().filter(|d| !d.is_empty()).collect();
            let d = pick(all, *dir)?;
            let pid = resolve(a, root_a, &d[..d.len() - 1]).await;
            let want = !m.has_children(&d);
            let got = a.rmdir(pid, OsStr::new(&d[d.len() - 1])).await.is_ok();
            if want {
                m.0.remove(&d);
            }
            (want, got)
        }
        Op::Rename {
            src,
            dst_parent,
            name,
        } => {
            let s = pick(m.all(), *src)?;
            let dp = pick(m.dirs(), *dst_parent)?;
            let sid = resolve(a, root_a, &s[..s.len() - 1]).await;
            let did = resolve(a, root_a, &dp).await;
            let dst = join(&dp, name);
            let src_dir = m.0[&s].is_none();
            let want = if src_dir && dp.starts_with(&s) {
                false
            } else if dst == s {
                true
            } else {
                match m.0.get(&dst) {
                    None => true,
                    Some(None) => src_dir && !m.has_children(&dst),
                    Some(Some(_)) => !src_dir,
                }
            };
            let got = a
                .rename(sid, OsStr::new(&s[s.len() - 1]), did, OsStr::new(name), 0)
                .await
                .is_ok();
            if want && dst != s {
                m.0.remove(&dst);
                let moved: Vec<(Path, Option<Vec<u8>>)> =
                    m.0.iter()
                        .filter(|(k, _)| k.starts_with(&s))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                for (k, v) in moved {
                    m.0.remove(&k);
                    let mut nk = dst.clone();
                    nk.extend_from_slice(&k[s.len()..]);
                    m.0.insert(nk, v);
                }
            }
            (want, got)
        }
        Op::Remount => return None,
    })
}

/// The client's whole view under `root`, read through the core.
async fn view(fs: &DfsFs, root: NodeId, prefix: Path, out: &mut BTreeMap<Path, Option<Vec<u8>>>) {
    let fh = fs.opendir(root).await.unwrap();
    let items = fs.listing(fh).unwrap();
    fs.releasedir(fh);
    for it in items.iter().filter(|i| i.name != "." && i.name != "..") {
        let p = join(&prefix, &it.name);
        if it.kind == fuser::FileType::Directory {
            out.insert(p.clone(), None);
            Box::pin(view(fs, NodeId(it.ino), p, out)).await;
        } else {
            out.insert(p, Some(read_all(fs, NodeId(it.ino)).await));
        }
    }
}

static CASE: AtomicU64 = AtomicU64::new(0);

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn client_view_matches_the_reference_model(ops in proptest::collection::vec(op(), 1..24)) {
        let s = shared();
        let case = format!("case{}", CASE.fetch_add(1, Ordering::Relaxed));
        let caches = tempfile::tempdir().unwrap();
        let result: Result<(), TestCaseError> = s.rt.block_on(async {
            let mut a = client(&s.alice, &caches.path().join("a"));
            let b = client(&s.bob, &caches.path().join("b"));
            let root_a = NodeId(a.mkdir(NodeId::ROOT, OsStr::new(&case), 0o755).await.unwrap().ino.0);
            let root_b = NodeId(b.lookup(NodeId::ROOT, OsStr::new(&case)).await.unwrap().ino.0);
            let mut m = Model::default();
            for op in &ops {
                if matches!(op, Op::Remount) {
                    drop(a);
                    a = client(&s.alice, &caches.path().join("a"));
                } else if let Some((want, got)) = apply(&a, &b, root_a, root_b, &mut m, op).await {
                    prop_assert_eq!(want, got, "op {:?}", op);
                }
                let mut seen = BTreeMap::new();
                view(&a, root_a, vec![], &mut seen).await;
                prop_assert_eq!(&m.0, &seen, "after {:?}", op);
            }
            Ok(())
        });
        result?;
    }
}
