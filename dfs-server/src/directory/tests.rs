//! Unit tests of the directory's namespace logic, without HTTP.

use common::api::{
    CommitRequest, CreateRequest, LinkRequest, RegisterServerRequest, RenameRequest,
};
use common::{ContentHash, FenceToken, FileKind, NodeId, UploadId, ValidName};

use super::*;

/// The administrator: these tests are about the namespace, not permissions.
fn admin() -> Identity {
    Caller::cluster().id
}

fn n(s: &str) -> ValidName {
    ValidName::parse(s).expect("valid name")
}

/// The suite, once per engine: `on_redb`, and `on_etcd` against this test binary's etcd
/// (`crate::testing::shared_etcd`), each test under a key prefix of its own. Each module
/// defines `open_raw` (a directory over its engine, in or named after `dir`) and `CASES`
/// (property test cases: fewer on etcd, where every transaction is a consensus round).
macro_rules! conformance {
    ($($item:item)*) => {
        mod on_redb {
            use super::*;

            const CASES: u32 = 48;

            fn open_raw(dir: &Path) -> ServiceResult<DirectoryService> {
                DirectoryService::open(dir, DirectoryConfig::default())
            }

            $($item)*
        }

        mod on_etcd {
            use super::*;

            const CASES: u32 = 8;

            fn open_raw(dir: &Path) -> ServiceResult<DirectoryService> {
                open_on_etcd(dir)
            }

            $($item)*
        }
    };
}

/// A directory over the shared test etcd, under a prefix named after `dir` (a reopen of the
/// same `dir` finds the same namespace). Without etcd the test fails, saying what to install.
pub(super) fn open_on_etcd(dir: &Path) -> ServiceResult<DirectoryService> {
    open_on_etcd_with(dir, DirectoryConfig::default())
}

/// [`open_on_etcd`] with `config`.
pub(super) fn open_on_etcd_with(
    dir: &Path,
    config: DirectoryConfig,
) -> ServiceResult<DirectoryService> {
    let etcd = crate::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a tempdir has a name")
        .replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    let meta =
        crate::meta::MetaConfig::parse(&etcd.meta_url(&format!("test/{name}"))).expect("meta url");
    DirectoryService::open_meta(dir, &meta, config)
}

conformance! {

fn open(dir: &Path) -> DirectoryService {
    let svc = open_raw(dir).expect("open");
    for i in 0..3 {
        svc.register_server(&RegisterServerRequest {
            url: format!("http://127.0.0.1:{}", 9000 + i),
            capacity_bytes: 1 << 30,
            previous_id: None,
            cluster_id: None,
        })
        .expect("register");
    }
    svc
}

fn mk(svc: &DirectoryService, parent: NodeId, name: &str, kind: FileKind) -> NodeMeta {
    svc.create(
        parent,
        &CreateRequest {
            name: n(name),
            kind,
            mode: 0o644,
            symlink_target: None,
            rdev: 0,
        },
        &Caller::cluster(),
    )
    .expect("create")
}

fn commit(svc: &DirectoryService, id: NodeId, fence: u64, upload: u8) -> ServiceResult<NodeMeta> {
    svc.commit(
        id,
        &CommitRequest {
            hash: ContentHash::from_digest(&[upload; 32]),
            size: 10,
            fence: FenceToken(fence),
            upload_id: UploadId::from_bytes([upload; 16]),
            base: common::api::PushBase {
                version: 0,
                waiting: true,
            },
            holders: vec![],
            writer: "t".into(),
            writer_id: None,
            primary: None,
            replicas: None,
            mode: None,
            mtime_ns: None,
            origin: None,
        },
    )
    .map(|r| r.meta)
}

#[test]
fn new_file_is_placed_on_three_distinct_live_servers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "a", FileKind::File);
    let mut all = vec![f.primary.expect("primary")];
    all.extend(&f.replicas);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3);
    assert_eq!(f.version, 0);
}

#[test]
fn create_lookup_list_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let d = mk(&svc, NodeId::ROOT, "d", FileKind::Dir);
    let f = mk(&svc, d.id, "f", FileKind::File);
    assert_eq!(
        svc.lookup(d.id, &n("f"), &admin()).expect("lookup").id,
        f.id
    );
    assert!(matches!(
        svc.create(
            d.id,
            &CreateRequest {
                name: n("f"),
                kind: FileKind::File,
                mode: 0o644,
                symlink_target: None,
                rdev: 0,
            },
            &Caller::cluster()
        ),
        Err(ServiceError::Exists(_))
    ));
    assert_eq!(svc.list(d.id, &admin()).expect("list").len(), 1);
    assert!(matches!(
        svc.remove(NodeId::ROOT, &n("d"), true, &admin()),
        Err(ServiceError::NotEmpty(_))
    ));
    assert!(matches!(
        svc.remove(d.id, &n("f"), true, &admin()),
        Err(ServiceError::NotDir(_))
    ));
    assert!(matches!(
        svc.remove(NodeId::ROOT, &n("d"), false, &admin()),
        Err(ServiceError::IsDir(_))
    ));
    svc.remove(d.id, &n("f"), false, &admin()).expect("unlink");
    svc.remove(NodeId::ROOT, &n("d"), true, &admin())
        .expect("rmdir");
    assert!(matches!(
        svc.lookup(NodeId::ROOT, &n("d"), &admin()),
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(svc.get(f.id), Err(ServiceError::NotFound(_))));
}

#[test]
fn rename_over_existing_file_replaces_it_atomically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let a = mk(&svc, NodeId::ROOT, "a", FileKind::File);
    let b = mk(&svc, NodeId::ROOT, "b", FileKind::File);
    let replaced = svc
        .rename(
            &RenameRequest {
                parent: NodeId::ROOT,
                name: n("a"),
                new_parent: NodeId::ROOT,
                new_name: n("b"),
                no_replace: false,
            },
            &admin(),
        )
        .expect("rename");
    assert_eq!(replaced.map(|m| m.id), Some(b.id));
    assert_eq!(
        svc.lookup(NodeId::ROOT, &n("b"), &admin())
            .expect("lookup")
            .id,
        a.id
    );
    assert!(svc.lookup(NodeId::ROOT, &n("a"), &admin()).is_err());
    assert_eq!(svc.list(NodeId::ROOT, &admin()).expect("list").len(), 1);
}

#[test]
fn rename_of_directory_into_itself_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let d = mk(&svc, NodeId::ROOT, "d", FileKind::Dir);
    let sub = mk(&svc, d.id, "sub", FileKind::Dir);
    for target in [d.id, sub.id] {
        let r = svc.rename(
            &RenameRequest {
                parent: NodeId::ROOT,
                name: n("d"),
                new_parent: target,
                new_name: n("x"),
                no_replace: false,
            },
            &admin(),
        );
        assert!(matches!(r, Err(ServiceError::InvalidMove)), "{r:?}");
    }
}

#[test]
fn commit_grows_version_applies_upload_once_and_refuses_stale_fence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    let v1 = commit(&svc, f.id, 5, 1).expect("commit");
    assert_eq!(v1.version, 1);
    assert_eq!(
        commit(&svc, f.id, 5, 1).expect("retry").version,
        1,
        "same upload applied once"
    );
    assert!(matches!(
        commit(&svc, f.id, 4, 2),
        Err(ServiceError::StaleFence(_))
    ));
    assert_eq!(commit(&svc, f.id, 6, 3).expect("commit").version, 2);
}

#[test]
fn metadata_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let id = {
        let svc = open(dir.path());
        let d = mk(&svc, NodeId::ROOT, "keep", FileKind::Dir);
        let f = mk(&svc, d.id, "f", FileKind::File);
        commit(&svc, f.id, 1, 9).expect("commit");
        f.id
    };
    let svc = open_raw(dir.path()).expect("reopen");
    let d = svc.lookup(NodeId::ROOT, &n("keep"), &admin()).expect("dir");
    let f = svc.lookup(d.id, &n("f"), &admin()).expect("file");
    assert_eq!((f.id, f.version), (id, 1));
    assert_eq!(svc.registry.live().len(), 3, "registrations persisted");
    let g = mk(&svc, NodeId::ROOT, "new", FileKind::File);
    assert!(g.id.0 > id.0, "ids are never reused");
}

#[test]
fn regression_a_server_that_lost_its_data_registers_as_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let req = |previous_id| RegisterServerRequest {
        url: "http://127.0.0.1:9000".into(),
        capacity_bytes: 1,
        previous_id,
        cluster_id: None,
    };
    let old = svc.registry.live()[0];
    assert_eq!(
        svc.register_server(&req(Some(old))).expect("re-register"),
        old
    );
    let fresh = svc.register_server(&req(None)).expect("register");
    assert_ne!(
        fresh, old,
        "no id, no claim to the copies the old server held"
    );
}

#[test]
fn regression_a_server_of_another_cluster_is_refused_not_taken_in() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let before = svc.registry.live().len();
    let req = |cluster_id: Option<String>| RegisterServerRequest {
        url: "http://127.0.0.1:9100".into(),
        capacity_bytes: 1,
        previous_id: None,
        cluster_id,
    };
    let refused = svc.register_server(&req(Some("00000000deadbeef".into())));
    assert!(
        matches!(refused, Err(ServiceError::Forbidden(ref m)) if m.contains("deadbeef")),
        "{refused:?}"
    );
    assert_eq!(svc.registry.live().len(), before, "not registered");
    svc.register_server(&req(Some(svc.cluster_id())))
        .expect("a server of this cluster joins");
}

#[test]
fn a_tls_directory_refuses_plain_http_registrations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open_raw(dir.path())
        .expect("open")
        .https_only(true);
    let server = |url: &str| RegisterServerRequest {
        url: url.into(),
        capacity_bytes: 1,
        previous_id: None,
        cluster_id: None,
    };
    let refused = svc.register_server(&server("http://127.0.0.1:9100"));
    assert!(
        matches!(refused, Err(ServiceError::BadRequest(ref m))
            if m.contains("must register an https:// URL") && m.contains("http://127.0.0.1:9100")),
        "{refused:?}"
    );
    assert!(svc.registry.live().is_empty(), "not registered");
    svc.register_server(&server("https://127.0.0.1:9100"))
        .expect("an https server joins");
    for kind in [
        common::api::ServiceKind::Lock,
        common::api::ServiceKind::Auth,
    ] {
        let req = |url: &str| common::api::RegisterServiceRequest {
            kind,
            url: url.into(),
        };
        let refused = svc.register_service(&req("http://127.0.0.1:9200"));
        assert!(
            matches!(refused, Err(ServiceError::BadRequest(ref m)) if m.contains("https://")),
            "{refused:?}"
        );
        svc.register_service(&req("https://127.0.0.1:9200"))
            .expect("an https service joins");
    }
    assert_eq!(
        svc.registry.services(),
        (
            Some("https://127.0.0.1:9200".to_owned()),
            Some("https://127.0.0.1:9200".to_owned())
        )
    );
}

/// Reference model: the namespace as a map from path to kind and node (hard links share one),
/// with POSIX rules.
mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    type Path = Vec<String>;

    #[derive(Debug, Clone)]
    pub enum Op {
        Create {
            parent: usize,
            name: String,
            dir: bool,
        },
        Remove {
            target: usize,
            dir: bool,
        },
        Rename {
            src: usize,
            dst_parent: usize,
            name: String,
        },
        Link {
            src: usize,
            dst_parent: usize,
            name: String,
        },
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("c".to_owned())
        ]
    }

    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<usize>(), name(), any::<bool>()).prop_map(|(parent, name, dir)| Op::Create {
                parent,
                name,
                dir
            }),
            (any::<usize>(), any::<bool>()).prop_map(|(target, dir)| Op::Remove { target, dir }),
            (any::<usize>(), any::<usize>(), name()).prop_map(|(src, dst_parent, name)| {
                Op::Rename {
                    src,
                    dst_parent,
                    name,
                }
            }),
            (any::<usize>(), any::<usize>(), name()).prop_map(|(src, dst_parent, name)| {
                Op::Link {
                    src,
                    dst_parent,
                    name,
                }
            }),
        ]
    }

    #[derive(Default)]
    pub struct Model {
        /// path -> (is_dir, node) (the root, the empty path, is implicit).
        pub nodes: BTreeMap<Path, (bool, u64)>,
        next: u64,
    }

    impl Model {
        pub fn is_dir(&self, p: &Path) -> bool {
            p.is_empty() || self.nodes.get(p).is_some_and(|e| e.0)
        }

        /// Links of the node at `p`: its names for a file, 2 + subdirectories for a directory.
        pub fn nlink(&self, p: &Path) -> u32 {
            let Some(&(dir, node)) = self.nodes.get(p) else {
                return 2 + self.children(p).filter(|c| self.is_dir(c)).count() as u32;
            };
            if dir {
                2 + self.children(p).filter(|c| self.is_dir(c)).count() as u32
            } else {
                self.nodes.values().filter(|e| e.1 == node).count() as u32
            }
        }

        pub fn link(&mut self, src: &Path, dst_parent: &Path, name: &str) -> bool {
            let Some(&(dir, node)) = self.nodes.get(src) else {
                return false;
            };
            let mut dst = dst_parent.clone();
            dst.push(name.to_owned());
            if dir || !self.is_dir(dst_parent) || self.nodes.contains_key(&dst) {
                return false;
            }
            self.nodes.insert(dst, (false, node));
            true
        }

        /// Every directory, root first (ops pick their parent by index into this).
        pub fn dirs(&self) -> Vec<Path> {
            let mut v = vec![vec![]];
            v.extend(
                self.nodes
                    .iter()
                    .filter(|(_, d)| d.0)
                    .map(|(p, _)| p.clone()),
            );
            v
        }

        /// Every node but the root.
        pub fn all(&self) -> Vec<Path> {
            self.nodes.keys().cloned().collect()
        }

        fn children(&self, p: &Path) -> impl Iterator<Item = &Path> {
            self.nodes
                .keys()
                .filter(move |k| k.len() == p.len() + 1 && k.starts_with(p))
        }

        pub fn create(&mut self, parent: &Path, name: &str, dir: bool) -> bool {
            let mut p = parent.clone();
            p.push(name.to_owned());
            if !self.is_dir(parent) || self.nodes.contains_key(&p) {
                return false;
            }
            self.next += 1;
            self.nodes.insert(p, (dir, self.next));
            true
        }

        pub fn remove(&mut self, p: &Path, dir: bool) -> bool {
            let Some(&(is_dir, _)) = self.nodes.get(p) else {
                return false;
            };
            if is_dir != dir || (is_dir && self.children(p).next().is_some()) {
                return false;
            }
            self.nodes.remove(p);
            true
        }

        pub fn rename(&mut self, src: &Path, dst_parent: &Path, name: &str) -> bool {
            let Some(&(src_dir, src_node)) = self.nodes.get(src) else {
                return false;
            };
            if !self.is_dir(dst_parent) || (src_dir && dst_parent.starts_with(src)) {
                return false;
            }
            let mut dst = dst_parent.clone();
            dst.push(name.to_owned());
            if &dst == src {
                return true;
            }
            if let Some(&(dst_dir, dst_node)) = self.nodes.get(&dst) {
                if dst_node == src_node {
                    // Two names of one file: rename(2) does nothing.
                    return true;
                }
                if dst_dir != src_dir || (dst_dir && self.children(&dst).next().is_some()) {
                    return false;
                }
                self.nodes.remove(&dst);
            }
            let moved: Vec<(Path, (bool, u64))> = self
                .nodes
                .iter()
                .filter(|(k, _)| k.starts_with(src))
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            for (k, v) in moved {
                self.nodes.remove(&k);
                let mut nk = dst.clone();
                nk.extend_from_slice(&k[src.len()..]);
                self.nodes.insert(nk, v);
            }
            true
        }
    }
}

fn resolve(svc: &DirectoryService, path: &[String]) -> NodeId {
    let mut id = NodeId::ROOT;
    for part in path {
        id = svc
            .lookup(id, &n(part), &admin())
            .expect("path in model exists in service")
            .id;
    }
    id
}

/// The names index as it is, and as `children` says it should be: `(node, parent, name)`.
type NameRows = Vec<(u64, u64, String)>;

fn names_index(svc: &DirectoryService) -> (NameRows, NameRows) {
    let (children, names) = svc
        .store
        .read(|tx| Ok((tx.all(CHILDREN)?, tx.all(NAMES)?)))
        .expect("read");
    let mut want: NameRows = children
        .into_iter()
        .map(|((parent, name), node)| (node, parent, name))
        .collect();
    want.sort();
    let got: NameRows = names.into_iter().map(|(k, ())| k).collect();
    (got, want)
}

/// Makes the store one from before the names index (on redb without the table, as such a
/// store is; on etcd, never of an older format but upgraded by the same code, without rows).
fn drop_names_index(tx: &Txn) -> ServiceResult<()> {
    tx.drop_table(NAMES)
}

/// Every path below `id`: (path, is_dir, node, links).
type Snapshot = Vec<(Vec<String>, bool, NodeId, u32)>;

fn snapshot(svc: &DirectoryService, id: NodeId, prefix: Vec<String>, out: &mut Snapshot) {
    for e in svc.list(id, &admin()).expect("list") {
        let mut p = prefix.clone();
        p.push(e.name.clone());
        let dir = e.meta.kind == FileKind::Dir;
        out.push((p.clone(), dir, e.meta.id, e.meta.nlink));
        if dir {
            snapshot(svc, e.meta.id, p, out);
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: CASES, ..Default::default() })]

    #[test]
    fn namespace_matches_the_reference_model(ops in proptest::collection::vec(model::op(), 1..40)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = open(dir.path());
        let mut m = model::Model::default();
        for op in ops {
            let (want, got) = match &op {
                model::Op::Create { parent, name, dir } => {
                    let dirs = m.dirs();
                    let parent = dirs[parent % dirs.len()].clone();
                    let kind = if *dir { FileKind::Dir } else { FileKind::File };
                    let req = CreateRequest { name: n(name), kind, mode: 0o755, symlink_target: None, rdev: 0 };
                    let got = svc.create(resolve(&svc, &parent), &req, &Caller::cluster()).is_ok();
                    (m.create(&parent, name, *dir), got)
                }
                model::Op::Remove { target, dir } => {
                    let all = m.all();
                    if all.is_empty() { continue; }
                    let p = all[target % all.len()].clone();
                    let parent = resolve(&svc, &p[..p.len() - 1]);
                    let got = svc.remove(parent, &n(&p[p.len() - 1]), *dir, &admin()).is_ok();
                    (m.remove(&p, *dir), got)
                }
                model::Op::Rename { src, dst_parent, name } => {
                    let all = m.all();
                    if all.is_empty() { continue; }
                    let src = all[src % all.len()].clone();
                    let dirs = m.dirs();
                    let dst = dirs[dst_parent % dirs.len()].clone();
                    let req = RenameRequest {
                        parent: resolve(&svc, &src[..src.len() - 1]),
                        name: n(&src[src.len() - 1]),
                        new_parent: resolve(&svc, &dst),
                        new_name: n(name),
                        no_replace: false,
                    };
                    let got = svc.rename(&req, &admin()).is_ok();
                    (m.rename(&src, &dst, name), got)
                }
                model::Op::Link { src, dst_parent, name } => {
                    let all = m.all();
                    if all.is_empty() { continue; }
                    let src = all[src % all.len()].clone();
                    let dirs = m.dirs();
                    let dst = dirs[dst_parent % dirs.len()].clone();
                    let req = LinkRequest {
                        node: resolve(&svc, &src),
                        parent: resolve(&svc, &src[..src.len() - 1]),
                        name: n(&src[src.len() - 1]),
                        new_parent: resolve(&svc, &dst),
                        new_name: n(name),
                    };
                    let got = svc.link(&req, &admin()).is_ok();
                    (m.link(&src, &dst, name), got)
                }
            };
            proptest::prop_assert_eq!(want, got, "op {:?}", op);
            let mut actual = Vec::new();
            snapshot(&svc, NodeId::ROOT, vec![], &mut actual);
            actual.sort();
            let paths: Vec<(Vec<String>, bool)> = actual.iter().map(|e| (e.0.clone(), e.1)).collect();
            let expected: Vec<(Vec<String>, bool)> = m.nodes.iter().map(|(k, v)| (k.clone(), v.0)).collect();
            proptest::prop_assert_eq!(expected, paths, "after {:?}", op);
            // Names share a node exactly when the model's do, and every count is right.
            for (a, b) in actual.iter().zip(m.nodes.values()) {
                for (c, d) in actual.iter().zip(m.nodes.values()) {
                    proptest::prop_assert_eq!(a.2 == c.2, b.1 == d.1, "{:?} and {:?}", a.0, c.0);
                }
                proptest::prop_assert_eq!(a.3, m.nlink(&a.0), "links of {:?} after {:?}", a.0, op);
            }
            proptest::prop_assert_eq!(svc.get(NodeId::ROOT).expect("root").nlink, m.nlink(&vec![]));
            // The counters, holdings and queue are what a scan would make of the nodes.
            proptest::prop_assert_eq!(replicas::check_against_scan(&svc), Ok(()), "after {:?}", op);
            // The names index is exactly `children`, reversed.
            let (got, want) = names_index(&svc);
            proptest::prop_assert_eq!(&got, &want, "names index after {:?}", op);
            // Every node's recorded parent holds one of its names.
            for (node, _, _) in &want {
                let parent = svc.get(NodeId(*node)).expect("named node").parent;
                proptest::prop_assert!(
                    want.iter().any(|(n, p, _)| n == node && *p == parent.0),
                    "node {} records parent {} after {:?}", node, parent, op
                );
            }
        }
    }
}

#[test]
fn regression_a_commit_with_a_stale_placement_or_too_few_copies_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "p", FileKind::File);
    let primary = f.primary.expect("primary");
    let req = |replicas: Vec<ServerId>, holders: Vec<ServerId>| CommitRequest {
        hash: ContentHash::from_digest(&[9; 32]),
        size: 1,
        fence: FenceToken(1),
        upload_id: UploadId::from_bytes([9; 16]),
        base: common::api::PushBase {
            version: 0,
            waiting: true,
        },
        holders,
        writer: "t".into(),
        writer_id: None,
        primary: Some(primary),
        replicas: Some(replicas),
        mode: None,
        mtime_ns: None,
        origin: None,
    };
    // The writer's placement said "no replicas": a stale view must not lower the copy count.
    assert!(matches!(
        svc.commit(f.id, &req(vec![], vec![primary])),
        Err(ServiceError::NotPrimary(_))
    ));
    // The right placement but only the primary durable.
    assert!(matches!(
        svc.commit(f.id, &req(f.replicas.clone(), vec![primary])),
        Err(ServiceError::Unavailable(_))
    ));
    // One copy counted twice.
    assert!(matches!(
        svc.commit(f.id, &req(f.replicas.clone(), vec![primary, primary])),
        Err(ServiceError::BadRequest(_))
    ));
    let ok = svc
        .commit(f.id, &req(f.replicas.clone(), vec![primary, f.replicas[0]]))
        .expect("primary + one replica");
    assert_eq!(ok.meta.version, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn regression_a_repair_pass_never_waits_for_its_copies() {
    // Every file server is a black hole: it takes connections and never answers, so any copy
    // hangs (a stopped or overloaded copy target).
    let holes: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = std::sync::Arc::new(
        open_raw(dir.path()).expect("open"),
    );
    for l in &holes {
        svc.register_server(&RegisterServerRequest {
            url: format!("http://{}", l.local_addr().expect("addr")),
            capacity_bytes: 1 << 30,
            previous_id: None,
            cluster_id: None,
        })
        .expect("register");
    }
    let f = mk(&svc, NodeId::ROOT, "under-replicated", FileKind::File);
    let primary = f.primary.expect("primary");
    svc.commit(
        f.id,
        &CommitRequest {
            hash: ContentHash::from_digest(&[4; 32]),
            size: 1,
            fence: FenceToken(1),
            upload_id: UploadId::from_bytes([4; 16]),
            base: common::api::PushBase {
                version: 0,
                waiting: true,
            },
            holders: vec![primary, f.replicas[0]],
            writer: "t".into(),
            writer_id: None,
            primary: Some(primary),
            replicas: Some(f.replicas.clone()),
            mode: None,
            mtime_ns: None,
            origin: None,
        },
    )
    .expect("two copies");
    let peer = crate::peer::Peer::new("key").expect("a peer");
    let cfg = repair::RepairConfig::default();
    let inflight = repair::InFlight::default();
    let (_, started) = tokio::time::timeout(
        Duration::from_secs(5),
        repair::pass(&svc, &peer, &cfg, &inflight),
    )
    .await
    .expect("a pass returns while its copy hangs");
    assert_eq!(started, 1);
    // The next pass does not start a second copy of the same file, nor wait for the first.
    let (_, again) = tokio::time::timeout(
        Duration::from_secs(5),
        repair::pass(&svc, &peer, &cfg, &inflight),
    )
    .await
    .expect("a pass returns while a copy hangs");
    assert_eq!((again, inflight.len()), (0, 1));
}

#[test]
fn a_batch_commit_refuses_items_alone_and_applies_the_rest_durably() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let a = mk(&svc, NodeId::ROOT, "a", FileKind::File);
    let b = mk(&svc, NodeId::ROOT, "b", FileKind::File);
    let req = |f: &NodeMeta, fence: u64, id: u8| CommitRequest {
        hash: ContentHash::from_digest(&[id; 32]),
        size: 1,
        fence: FenceToken(fence),
        upload_id: UploadId::from_bytes([id; 16]),
        base: common::api::PushBase {
            version: 0,
            waiting: true,
        },
        holders: f
            .primary
            .iter()
            .chain(&f.replicas)
            .copied()
            .take(2)
            .collect(),
        writer: "t".into(),
        writer_id: None,
        primary: f.primary,
        replicas: Some(f.replicas.clone()),
        mode: None,
        mtime_ns: None,
        origin: None,
    };
    svc.commit(b.id, &req(&b, 7, 1)).expect("b at fence 7");
    let batch = common::api::CommitBatchRequest {
        items: vec![
            common::api::CommitBatchItem {
                node: a.id,
                commit: req(&a, 5, 2),
            },
            // Older than b's fence 7: refused, alone.
            common::api::CommitBatchItem {
                node: b.id,
                commit: req(&b, 5, 3),
            },
            common::api::CommitBatchItem {
                node: NodeId(999_999),
                commit: req(&a, 5, 4),
            },
        ],
    };
    let results = svc.commit_batch(&batch).expect("batch");
    assert_eq!(results[0].as_ref().expect("a committed").meta.version, 1);
    assert!(matches!(results[1], Err(ServiceError::StaleFence(_))));
    assert!(matches!(results[2], Err(ServiceError::NotFound(_))));
    drop(svc);
    // Durable: a reopened store has a's version, and b's is the one from fence 7.
    let svc = open(dir.path());
    assert_eq!(svc.get(a.id).expect("a").version, 1);
    let b = svc.get(b.id).expect("b");
    assert_eq!((b.version, b.fence), (1, FenceToken(7)));
}

fn commit_on(
    svc: &DirectoryService,
    id: NodeId,
    fence: u64,
    upload: u8,
    base: u64,
    waiting: bool,
) -> ServiceResult<NodeMeta> {
    svc.commit(
        id,
        &CommitRequest {
            hash: ContentHash::from_digest(&[upload; 32]),
            size: 10,
            fence: FenceToken(fence),
            upload_id: UploadId::from_bytes([upload; 16]),
            base: common::api::PushBase {
                version: base,
                waiting,
            },
            holders: vec![],
            writer: "t".into(),
            writer_id: None,
            primary: None,
            replicas: None,
            mode: None,
            mtime_ns: None,
            origin: None,
        },
    )
    .map(|r| r.meta)
}

#[test]
fn a_later_push_never_replaces_a_version_it_was_not_based_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    // Two writers opened version 0; the first close commits version 1.
    commit_on(&svc, f.id, 1, 1, 0, true).expect("first close");
    // The second writer's close is still waiting: last close wins.
    let m = commit_on(&svc, f.id, 2, 2, 0, true).expect("a waiting close replaces");
    assert_eq!((m.version, m.hash), (2, ContentHash::from_digest(&[2; 32])));
    // A background retry of content based on version 1 is refused, and changes nothing.
    let r = commit_on(&svc, f.id, 3, 3, 1, false);
    assert!(matches!(r, Err(ServiceError::Conflict(_))), "{r:?}");
    let now = svc.get(f.id).expect("get");
    assert_eq!(
        (now.version, now.hash),
        (2, ContentHash::from_digest(&[2; 32]))
    );
    // Based on the current version, it applies.
    let m = commit_on(&svc, f.id, 3, 3, 2, false).expect("based on the current version");
    assert_eq!(m.version, 3);
}

#[test]
fn regression_a_retried_upload_is_not_applied_again_however_many_commits_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    // Upload 1 is applied, but its writer never hears so (a lost answer, or a crash before
    // the lazily written "clean" record reached its disk).
    commit_on(&svc, f.id, 1, 1, 0, false).expect("applied");
    // Far more commits than the upload ids a node remembers.
    let many = u8::try_from(common::meta::RECENT_UPLOADS + 8).expect("fits");
    for i in 0..many {
        let v = svc.get(f.id).expect("get").version;
        commit_on(&svc, f.id, 2 + u64::from(i), 10 + i, v, true).expect("newer writes");
    }
    let before = svc.get(f.id).expect("get");
    // The retry, sent in the background with the base it was made on: refused, never
    // applied over the newer writes.
    let r = commit_on(&svc, f.id, 1000, 1, 0, false);
    assert!(matches!(r, Err(ServiceError::Conflict(_))), "{r:?}");
    let after = svc.get(f.id).expect("get");
    assert_eq!(
        (after.version, after.hash),
        (before.version, before.hash),
        "the newest acknowledged write stays"
    );
}

#[test]
fn a_retry_of_the_current_content_is_answered_without_a_new_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    commit_on(&svc, f.id, 1, 1, 0, false).expect("applied");
    for i in 0..u8::try_from(common::meta::RECENT_UPLOADS).expect("fits") {
        // Attribute-only commits of the same content push the upload id out of the window.
        let v = svc.get(f.id).expect("get").version;
        svc.commit(
            f.id,
            &CommitRequest {
                hash: ContentHash::from_digest(&[1; 32]),
                size: 10,
                fence: FenceToken(2 + u64::from(i)),
                upload_id: UploadId::from_bytes([100 + i; 16]),
                base: common::api::PushBase {
                    version: v,
                    waiting: true,
                },
                holders: vec![],
                writer: "t".into(),
                writer_id: None,
                primary: None,
                replicas: None,
                mode: None,
                mtime_ns: None,
                origin: None,
            },
        )
        .expect("same content again");
    }
    let before = svc.get(f.id).expect("get");
    let m = commit_on(&svc, f.id, 1000, 1, 0, false).expect("recognised as current");
    assert_eq!(m.version, before.version, "no new version");
}

#[test]
fn a_refused_write_back_push_ends_the_wait_it_announced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    commit_on(&svc, f.id, 1, 1, 0, true).expect("v1");
    svc.set_intent(
        f.id,
        &common::api::IntentRequest {
            upload_id: UploadId::from_bytes([7; 16]),
            lease_ms: 30_000,
        },
        &admin(),
    )
    .expect("intent");
    let r = commit_on(&svc, f.id, 2, 7, 0, false);
    assert!(matches!(r, Err(ServiceError::Conflict(_))), "{r:?}");
    assert!(
        svc.get(f.id).expect("get").writeback.is_none(),
        "readers stop waiting for a push that will not come"
    );
}

#[test]
fn new_files_avoid_a_server_short_of_space_and_statfs_shows_the_real_disks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let space = |total: u64, free: u64| {
        Some(common::api::Space {
            total_bytes: total,
            free_bytes: free,
        })
    };
    let live = svc.registry.live();
    svc.registry
        .heartbeat(live[0], space(10 << 30, 1 << 20))
        .expect("beat");
    svc.registry
        .heartbeat(live[1], space(10 << 30, 4 << 30))
        .expect("beat");
    svc.registry
        .heartbeat(live[2], space(10 << 30, 5 << 30))
        .expect("beat");
    for i in 0..12 {
        let f = mk(&svc, NodeId::ROOT, &format!("f{i}"), FileKind::File);
        assert_ne!(
            f.primary,
            Some(live[0]),
            "the full server takes no primaries"
        );
        assert_eq!(
            f.replicas.last(),
            Some(&live[0]),
            "only the copy the others cannot hold"
        );
    }
    let s = svc.statfs().expect("statfs");
    // Three copies of every file: one copy's worth of the disks.
    assert_eq!(s.total_bytes, 10 << 30);
    assert_eq!(s.free_bytes, ((1 << 20) + (9u64 << 30)) / 3);
}

/// Liveness is decided on tokio's clock, which tests pause and advance: a server is dead
/// exactly when `missed_beats` heartbeat intervals pass without a beat, and alive again with
/// its next one. Minutes of heartbeats take milliseconds.
#[tokio::test(start_paused = true)]
async fn a_server_is_dead_exactly_after_its_missed_beats_on_the_injected_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path()); // heartbeat 2 s, 3 missed beats: dead after 6 s
    let all = svc.registry.live();
    assert_eq!(all.len(), 3);
    let (quiet, rest) = (all[0], &all[1..]);
    for _ in 0..100 {
        tokio::time::advance(Duration::from_secs(2)).await;
        for s in rest {
            svc.registry.heartbeat(*s, None).expect("beat");
        }
    }
    assert_eq!(svc.registry.live(), rest, "silent for 200 s");
    svc.registry.heartbeat(quiet, None).expect("beat");
    tokio::time::advance(Duration::from_millis(5_999)).await;
    assert!(svc.registry.live().contains(&quiet), "alive until 6 s pass");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(!svc.registry.live().contains(&quiet), "dead once they have");
}

fn user(uid: u32, groups: &[u32]) -> Caller {
    Caller {
        name: format!("u{uid}"),
        id: Identity {
            uid,
            gid: uid,
            groups: groups.to_vec(),
            admin: false,
        },
    }
}

fn mk_as(
    svc: &DirectoryService,
    who: &Caller,
    parent: NodeId,
    name: &str,
    kind: FileKind,
    mode: u32,
) -> ServiceResult<NodeMeta> {
    svc.create(
        parent,
        &CreateRequest {
            name: n(name),
            kind,
            mode,
            symlink_target: None,
            rdev: 0,
        },
        who,
    )
}

#[test]
fn permissions_follow_posix_for_lookup_create_remove_and_rename() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[]), user(10_001, &[]));
    let home = mk_as(&svc, &alice, NodeId::ROOT, "alice", FileKind::Dir, 0o755).expect("mkdir");
    assert_eq!((home.uid, home.gid), (10_000, 10_000));
    let secret = mk_as(&svc, &alice, home.id, "secret", FileKind::File, 0o600).expect("create");
    // Bob may look in (0755) but not create, remove or rename there.
    svc.lookup(home.id, &n("secret"), &bob.id)
        .expect("search allowed");
    fn denied<T>(r: ServiceResult<T>) -> bool {
        matches!(r, Err(ServiceError::AccessDenied(_)))
    }
    assert!(denied(mk_as(
        &svc,
        &bob,
        home.id,
        "mine",
        FileKind::File,
        0o644
    )));
    assert!(denied(svc.remove(home.id, &n("secret"), false, &bob.id)));
    let mv = RenameRequest {
        parent: home.id,
        name: n("secret"),
        new_parent: NodeId::ROOT,
        new_name: n("stolen"),
        no_replace: false,
    };
    assert!(denied(svc.rename(&mv, &bob.id)));
    // ... nor open her 0600 file.
    assert!(denied(svc.get_to_open(secret.id, common::perm::R, &bob.id)));
    svc.get_to_open(secret.id, common::perm::R | common::perm::W, &alice.id)
        .expect("the owner may");
    // A private directory (0700) hides its names.
    svc.setattr(
        home.id,
        &SetAttrRequest {
            mode: Some(0o700),
            ..Default::default()
        },
        &alice.id,
    )
    .expect("owner chmod");
    assert!(denied(svc.lookup(home.id, &n("secret"), &bob.id)));
    assert!(denied(svc.list(home.id, &bob.id)));
    // The administrator passes every check.
    svc.remove(home.id, &n("secret"), false, &admin())
        .expect("admin");
}

#[test]
fn the_sticky_root_lets_everyone_create_but_remove_only_their_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    assert_eq!(svc.get(NodeId::ROOT).expect("root").mode, 0o1777);
    let (alice, bob) = (user(10_000, &[]), user(10_001, &[]));
    mk_as(&svc, &alice, NodeId::ROOT, "a.txt", FileKind::File, 0o666).expect("alice");
    mk_as(&svc, &bob, NodeId::ROOT, "b.txt", FileKind::File, 0o644).expect("bob");
    // EPERM (Forbidden), as unlink(2) says, not EACCES.
    assert!(matches!(
        svc.remove(NodeId::ROOT, &n("a.txt"), false, &bob.id),
        Err(ServiceError::Forbidden(_))
    ));
    // Renaming over someone else's entry is removing it.
    let over = RenameRequest {
        parent: NodeId::ROOT,
        name: n("b.txt"),
        new_parent: NodeId::ROOT,
        new_name: n("a.txt"),
        no_replace: false,
    };
    assert!(matches!(
        svc.rename(&over, &bob.id),
        Err(ServiceError::Forbidden(_))
    ));
    svc.remove(NodeId::ROOT, &n("b.txt"), false, &bob.id)
        .expect("his own");
}

#[test]
fn chmod_chown_and_chgrp_follow_posix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[500]), user(10_001, &[]));
    let f = mk_as(&svc, &alice, NodeId::ROOT, "f", FileKind::File, 0o644).expect("create");
    let set = |who: &Caller, req: SetAttrRequest| svc.setattr(f.id, &req, &who.id);
    let perm = |r: ServiceResult<NodeMeta>| matches!(r, Err(ServiceError::Forbidden(_)));
    assert!(perm(set(
        &bob,
        SetAttrRequest {
            mode: Some(0o777),
            ..Default::default()
        }
    )));
    assert!(
        perm(set(
            &alice,
            SetAttrRequest {
                uid: Some(10_001),
                ..Default::default()
            }
        )),
        "only the administrator gives files away"
    );
    assert!(
        perm(set(
            &alice,
            SetAttrRequest {
                gid: Some(600),
                ..Default::default()
            }
        )),
        "not her group"
    );
    let m = set(
        &alice,
        SetAttrRequest {
            gid: Some(500),
            mode: Some(0o2775),
            ..Default::default()
        },
    )
    .expect("chgrp to her group");
    assert_eq!((m.gid, m.mode), (500, 0o2775));
    // Explicit times are the owner's; "now" is anyone's who may write.
    assert!(perm(set(
        &bob,
        SetAttrRequest {
            mtime_ns: Some(1),
            ..Default::default()
        }
    )));
    assert!(matches!(
        set(
            &bob,
            SetAttrRequest {
                mtime_ns: Some(1),
                mtime_now: true,
                atime_ns: Some(1),
                atime_now: true,
                ..Default::default()
            }
        ),
        Err(ServiceError::AccessDenied(_))
    ));
    let m = set(
        &Caller::cluster(),
        SetAttrRequest {
            uid: Some(10_001),
            ..Default::default()
        },
    )
    .expect("admin chown");
    assert_eq!(m.uid, 10_001);
    assert_eq!(m.mode, 0o2775, "the administrator's chown keeps the bits");
    let m = set(
        &bob,
        SetAttrRequest {
            gid: Some(10_001),
            ..Default::default()
        },
    )
    .expect("bob's now");
    assert_eq!(
        m.mode & 0o6000,
        0,
        "chgrp by a non-administrator drops set-id bits"
    );
}

#[test]
fn a_setgid_directory_passes_its_group_on_and_a_write_needs_write_permission() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[500]), user(10_001, &[500]));
    let shared = mk_as(&svc, &alice, NodeId::ROOT, "shared", FileKind::Dir, 0o775).expect("mkdir");
    svc.setattr(
        shared.id,
        &SetAttrRequest {
            gid: Some(500),
            mode: Some(0o2775),
            ..Default::default()
        },
        &alice.id,
    )
    .expect("chgrp");
    let sub =
        mk_as(&svc, &bob, shared.id, "sub", FileKind::Dir, 0o755).expect("group member creates");
    assert_eq!(
        (sub.gid, sub.mode & 0o2000),
        (500, 0o2000),
        "inherits group and setgid"
    );
    let f = mk_as(&svc, &bob, shared.id, "f", FileKind::File, 0o644).expect("file");
    assert_eq!(f.gid, 500);
    // Alice (group 500) may not write bob's 0644 file: the directory refuses the commit.
    let mut req = CommitRequest {
        hash: ContentHash::from_digest(&[9; 32]),
        size: 1,
        fence: FenceToken(1),
        upload_id: UploadId::from_bytes([9; 16]),
        base: common::api::PushBase {
            version: 0,
            waiting: true,
        },
        holders: f.holders.clone(),
        writer: "alice".into(),
        writer_id: Some(alice.id.clone()),
        primary: f.primary,
        replicas: Some(f.replicas.clone()),
        mode: None,
        mtime_ns: None,
        origin: None,
    };
    assert!(matches!(
        svc.commit(f.id, &req),
        Err(ServiceError::AccessDenied(_))
    ));
    req.writer_id = Some(bob.id.clone());
    assert_eq!(
        svc.commit(f.id, &req)
            .expect("the owner writes")
            .meta
            .version,
        1
    );
}

#[test]
fn regression_the_owner_writes_a_file_it_created_read_only() {
    // git makes its objects with open(O_CREAT, 0444) and writes through that descriptor.
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let alice = user(10_000, &[]);
    let f = mk_as(&svc, &alice, NodeId::ROOT, "obj", FileKind::File, 0o444).expect("create");
    let req = CommitRequest {
        hash: ContentHash::from_digest(&[7; 32]),
        size: 1,
        fence: FenceToken(1),
        upload_id: UploadId::from_bytes([7; 16]),
        base: common::api::PushBase {
            version: 0,
            waiting: true,
        },
        holders: f.holders.clone(),
        writer: "alice".into(),
        writer_id: Some(alice.id.clone()),
        primary: f.primary,
        replicas: Some(f.replicas.clone()),
        mode: None,
        mtime_ns: None,
        origin: None,
    };
    assert_eq!(svc.commit(f.id, &req).expect("owner").meta.version, 1);
}

#[test]
fn regression_a_time_folded_into_a_push_is_the_owners_to_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[]), user(10_001, &[]));
    let f = mk_as(&svc, &alice, NodeId::ROOT, "shared", FileKind::File, 0o666).expect("create");
    let push = |who: &Caller, version: u64, byte: u8| CommitRequest {
        hash: ContentHash::from_digest(&[byte; 32]),
        size: 1,
        fence: FenceToken(1),
        upload_id: UploadId::from_bytes([byte; 16]),
        base: common::api::PushBase {
            version,
            waiting: true,
        },
        holders: f.holders.clone(),
        writer: who.name.clone(),
        writer_id: Some(who.id.clone()),
        primary: f.primary,
        replicas: Some(f.replicas.clone()),
        mode: None,
        mtime_ns: Some(1),
        origin: None,
    };
    // Bob may write the file but not set its times: his push is stamped now.
    let before = now_ns();
    let m = svc
        .commit(f.id, &push(&bob, 0, 1))
        .expect("bob writes")
        .meta;
    assert!(
        m.mtime_ns >= before,
        "bob's folded time was applied: {}",
        m.mtime_ns
    );
    // Alice, the owner, may (`cp -p`, `rsync -t`).
    let m = svc
        .commit(f.id, &push(&alice, 1, 2))
        .expect("alice writes")
        .meta;
    assert_eq!(m.mtime_ns, 1);
}

/// Links `node` through a name of it in its recorded parent (any name, as the client sends
/// the one it reached the file by).
fn link(
    svc: &DirectoryService,
    who: &Identity,
    node: NodeId,
    parent: NodeId,
    name: &str,
) -> ServiceResult<NodeMeta> {
    let (src_parent, src_name) = svc
        .get(node)
        .ok()
        .and_then(|m| {
            let entries = svc.list(m.parent, &admin()).ok()?;
            let e = entries.into_iter().find(|e| e.meta.id == node)?;
            Some((m.parent, e.name))
        })
        .unwrap_or((NodeId::ROOT, "absent".into()));
    svc.link(
        &LinkRequest {
            node,
            parent: src_parent,
            name: n(&src_name),
            new_parent: parent,
            new_name: n(name),
        },
        who,
    )
}

#[test]
fn hard_links_share_one_node_which_goes_with_its_last_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let alice = user(10_000, &[]);
    let a = mk_as(&svc, &alice, NodeId::ROOT, "a", FileKind::Dir, 0o755).expect("mkdir");
    let b = mk_as(&svc, &alice, NodeId::ROOT, "b", FileKind::Dir, 0o755).expect("mkdir");
    let f = mk_as(&svc, &alice, a.id, "f", FileKind::File, 0o644).expect("create");
    assert_eq!(f.nlink, 1);
    std::thread::sleep(Duration::from_millis(2));
    let linked = link(&svc, &alice.id, f.id, b.id, "g").expect("link");
    assert_eq!(linked.nlink, 2);
    assert!(linked.ctime_ns > f.ctime_ns, "link changes ctime");
    assert_eq!(
        svc.lookup(b.id, &n("g"), &alice.id).expect("lookup").id,
        f.id
    );
    // Content and attributes are the node's: a chmod through one name shows through the other.
    svc.setattr(
        f.id,
        &SetAttrRequest {
            mode: Some(0o600),
            ..Default::default()
        },
        &alice.id,
    )
    .expect("chmod");
    assert_eq!(
        svc.lookup(b.id, &n("g"), &alice.id).expect("lookup").mode,
        0o600
    );
    // Unlinking the recorded parent's name keeps the node, with a parent that still names it.
    let left = svc.remove(a.id, &n("f"), false, &alice.id).expect("unlink");
    assert_eq!(left.nlink, 1);
    assert!(left.ctime_ns >= linked.ctime_ns, "unlink changes ctime");
    let now = svc.get(f.id).expect("still there");
    assert_eq!((now.nlink, now.parent), (1, b.id));
    // The last name frees it.
    let gone = svc.remove(b.id, &n("g"), false, &alice.id).expect("unlink");
    assert_eq!(gone.nlink, 0);
    assert!(matches!(svc.get(f.id), Err(ServiceError::NotFound(_))));
}

#[test]
fn regression_link_needs_search_permission_on_the_source_and_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[]), user(10_001, &[]));
    let private =
        mk_as(&svc, &alice, NodeId::ROOT, "private", FileKind::Dir, 0o700).expect("mkdir");
    let secret = mk_as(&svc, &alice, private.id, "secret", FileKind::File, 0o644).expect("create");
    let mine = mk_as(&svc, &bob, NodeId::ROOT, "mine", FileKind::Dir, 0o755).expect("mkdir");
    let req = |parent: NodeId, name: &str| LinkRequest {
        node: secret.id,
        parent,
        name: n(name),
        new_parent: mine.id,
        new_name: n("stolen"),
    };
    // Bob cannot search alice's 0700 directory: no link out of it (EACCES).
    assert!(matches!(
        svc.link(&req(private.id, "secret"), &bob.id),
        Err(ServiceError::AccessDenied(_))
    ));
    // Nor through a name that is not the node's.
    assert!(matches!(
        svc.link(&req(mine.id, "secret"), &bob.id),
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(
        svc.link(&req(NodeId::ROOT, "mine"), &bob.id),
        Err(ServiceError::NotFound(_))
    ));
    assert!(matches!(
        svc.lookup(mine.id, &n("stolen"), &bob.id),
        Err(ServiceError::NotFound(_))
    ));
    assert_eq!(svc.get(secret.id).expect("secret").nlink, 1);
    // Alice may.
    let linked = svc
        .link(
            &LinkRequest {
                new_parent: private.id,
                ..req(private.id, "secret")
            },
            &alice.id,
        )
        .expect("owner links");
    assert_eq!(linked.nlink, 2);
}

#[test]
fn link_errors_are_the_ones_posix_gives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[]), user(10_001, &[]));
    let home = mk_as(&svc, &alice, NodeId::ROOT, "home", FileKind::Dir, 0o755).expect("mkdir");
    let f = mk_as(&svc, &alice, home.id, "f", FileKind::File, 0o644).expect("create");
    // A directory: EPERM.
    assert!(matches!(
        link(&svc, &alice.id, home.id, NodeId::ROOT, "h"),
        Err(ServiceError::Forbidden(_))
    ));
    // An existing name: EEXIST, even where the caller may not create.
    assert!(matches!(
        link(&svc, &bob.id, f.id, home.id, "f"),
        Err(ServiceError::Exists(_))
    ));
    // No write permission on the new parent: EACCES.
    assert!(matches!(
        link(&svc, &bob.id, f.id, home.id, "g"),
        Err(ServiceError::AccessDenied(_))
    ));
    // The new parent must be a directory.
    assert!(matches!(
        link(&svc, &alice.id, f.id, f.id, "g"),
        Err(ServiceError::NotDir(_))
    ));
    assert!(matches!(
        link(&svc, &alice.id, NodeId(9999), home.id, "g"),
        Err(ServiceError::NotFound(_))
    ));
    assert_eq!(
        svc.get(f.id).expect("f").nlink,
        1,
        "nothing refused counted"
    );
}

#[test]
fn a_rename_over_another_name_of_a_linked_file_keeps_the_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    let g = mk(&svc, NodeId::ROOT, "g", FileKind::File);
    link(&svc, &admin(), g.id, NodeId::ROOT, "h").expect("link");
    let rename = |from: &str, to: &str| RenameRequest {
        parent: NodeId::ROOT,
        name: n(from),
        new_parent: NodeId::ROOT,
        new_name: n(to),
        no_replace: false,
    };
    // f replaces g, one of g's two names: g lives on as h.
    let replaced = svc
        .rename(&rename("f", "g"), &admin())
        .expect("rename")
        .expect("replaced");
    assert_eq!((replaced.id, replaced.nlink), (g.id, 1));
    assert_eq!(
        svc.lookup(NodeId::ROOT, &n("h"), &admin()).expect("h").id,
        g.id
    );
    assert_eq!(
        svc.lookup(NodeId::ROOT, &n("g"), &admin()).expect("g").id,
        f.id
    );
    // Two names of one node: rename does nothing.
    link(&svc, &admin(), f.id, NodeId::ROOT, "f2").expect("link");
    assert!(
        svc.rename(&rename("f2", "g"), &admin())
            .expect("rename")
            .is_none()
    );
    assert_eq!(svc.get(f.id).expect("f").nlink, 2);
    assert!(svc.lookup(NodeId::ROOT, &n("f2"), &admin()).is_ok());
}

#[test]
fn directory_link_counts_follow_mkdir_rmdir_and_rename() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let links = |id: NodeId| svc.get(id).expect("node").nlink;
    assert_eq!(links(NodeId::ROOT), 2);
    let a = mk(&svc, NodeId::ROOT, "a", FileKind::Dir);
    let b = mk(&svc, NodeId::ROOT, "b", FileKind::Dir);
    let c = mk(&svc, a.id, "c", FileKind::Dir);
    mk(&svc, a.id, "file", FileKind::File);
    assert_eq!(
        (links(NodeId::ROOT), links(a.id), links(b.id), links(c.id)),
        (4, 3, 2, 2)
    );
    let mv = RenameRequest {
        parent: a.id,
        name: n("c"),
        new_parent: b.id,
        new_name: n("c"),
        no_replace: false,
    };
    svc.rename(&mv, &admin()).expect("rename");
    assert_eq!((links(a.id), links(b.id)), (2, 3));
    // An empty directory replaced by another: the parent loses one.
    mk(&svc, NodeId::ROOT, "d", FileKind::Dir);
    let over = RenameRequest {
        parent: b.id,
        name: n("c"),
        new_parent: NodeId::ROOT,
        new_name: n("d"),
        no_replace: false,
    };
    svc.rename(&over, &admin()).expect("rename over");
    assert_eq!((links(NodeId::ROOT), links(b.id)), (5, 2));
    svc.remove(NodeId::ROOT, &n("d"), true, &admin())
        .expect("rmdir");
    assert_eq!(links(NodeId::ROOT), 4);
}

#[test]
fn special_files_anyone_may_make_devices_only_the_administrator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let alice = user(10_000, &[]);
    let mknod = |who: &Caller, name: &str, kind: FileKind, rdev: u64| {
        svc.create(
            NodeId::ROOT,
            &CreateRequest {
                name: n(name),
                kind,
                mode: 0o640,
                symlink_target: None,
                rdev,
            },
            who,
        )
    };
    let fifo = mknod(&alice, "fifo", FileKind::Fifo, 0).expect("mkfifo");
    assert_eq!(
        (fifo.kind, fifo.uid, fifo.mode, fifo.nlink),
        (FileKind::Fifo, 10_000, 0o640, 1)
    );
    assert!(fifo.primary.is_none(), "no content, no placement");
    mknod(&alice, "sock", FileKind::Socket, 0).expect("bind");
    for kind in [FileKind::CharDev, FileKind::BlockDev] {
        assert!(matches!(
            mknod(&alice, "dev", kind, 0x0103),
            Err(ServiceError::Forbidden(_))
        ));
    }
    let null = mknod(&Caller::cluster(), "null", FileKind::CharDev, 0x0103).expect("mknod");
    assert_eq!(svc.get(null.id).expect("null").rdev, 0x0103);
    assert!(matches!(
        mknod(&alice, "f2", FileKind::Fifo, 7),
        Err(ServiceError::BadRequest(_))
    ));
    // They link, rename and go like any file.
    link(&svc, &alice.id, fifo.id, NodeId::ROOT, "fifo2").expect("link");
    svc.remove(NodeId::ROOT, &n("fifo"), false, &alice.id)
        .expect("unlink");
    assert_eq!(svc.get(fifo.id).expect("fifo").nlink, 1);
}

#[test]
fn times_set_to_now_need_write_permission_explicit_ones_the_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[]), user(10_001, &[]));
    let f = mk_as(&svc, &alice, NodeId::ROOT, "f", FileKind::File, 0o666).expect("create");
    let times =
        |atime: Option<u64>, atime_now: bool, mtime: Option<u64>, mtime_now: bool| SetAttrRequest {
            atime_ns: atime,
            atime_now,
            mtime_ns: mtime,
            mtime_now,
            ..Default::default()
        };
    // UTIME_NOW for both (`touch`): write permission is enough, and the times are the
    // directory's clock, not the ones the request carries.
    let before = now_ns();
    let m = svc
        .setattr(f.id, &times(Some(5), true, Some(5), true), &bob.id)
        .expect("now, now");
    assert!(m.atime_ns >= before && m.mtime_ns >= before, "{m:?}");
    // One now, the other omitted (`touch -a`, `touch -m`): the owner only (EPERM), as Linux.
    for req in [
        times(Some(7), true, None, false),
        times(None, false, Some(7), true),
    ] {
        assert!(
            matches!(
                svc.setattr(f.id, &req, &bob.id),
                Err(ServiceError::Forbidden(_))
            ),
            "{req:?}"
        );
    }
    let m = svc
        .setattr(f.id, &times(None, false, Some(7), true), &alice.id)
        .expect("owner, touch -m");
    assert!(m.mtime_ns >= before, "now, not the request's 7");
    // An explicit time: the owner only (EPERM).
    assert!(matches!(
        svc.setattr(f.id, &times(Some(1), false, None, false), &bob.id),
        Err(ServiceError::Forbidden(_))
    ));
    assert!(matches!(
        svc.setattr(f.id, &times(Some(1), true, Some(1), false), &bob.id),
        Err(ServiceError::Forbidden(_))
    ));
    svc.setattr(f.id, &times(None, false, Some(5), false), &alice.id)
        .expect("owner");
    let m = svc
        .setattr(f.id, &times(Some(1), false, None, false), &alice.id)
        .expect("owner");
    assert_eq!(m.atime_ns, 1);
    assert_eq!(m.mtime_ns, 5, "an omitted time stays");
    // Without write permission, not even now (EACCES).
    svc.setattr(
        f.id,
        &SetAttrRequest {
            mode: Some(0o644),
            ..Default::default()
        },
        &alice.id,
    )
    .expect("chmod");
    assert!(matches!(
        svc.setattr(f.id, &times(Some(9), true, Some(9), true), &bob.id),
        Err(ServiceError::AccessDenied(_))
    ));
}

#[test]
fn a_store_from_before_link_counts_is_counted_once_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, f) = {
        let svc = open(dir.path());
        let a = mk(&svc, NodeId::ROOT, "a", FileKind::Dir);
        mk(&svc, a.id, "sub", FileKind::Dir);
        let f = mk(&svc, a.id, "f", FileKind::File);
        // What an earlier build wrote: no counts, no access times, no format.
        svc.store
            .write(|tx| {
                let ids: Vec<u64> = tx.all(NODES)?.into_iter().map(|(k, _)| k).collect();
                for id in ids {
                    let mut v = serde_json::to_value(get_node(tx, NodeId(id))?)?;
                    let fields = v.as_object_mut().expect("a node is an object");
                    for k in ["nlink", "atime_ns", "rdev"] {
                        fields.remove(k);
                    }
                    let old = serde_json::to_vec(&v)?;
                    tx.put(NODES, &id, &old)?;
                }
                tx.put(CHILDREN, &(NodeId::ROOT.0, "f-too".to_owned()), &f.id.0)?;
                drop_names_index(tx)?;
                tx.delete(META, &FORMAT.to_owned())?;
                Ok(())
            })
            .expect("rewrite");
        (a, f)
    };
    let svc = open(dir.path());
    let links = |id: NodeId| svc.get(id).expect("node").nlink;
    assert_eq!((links(NodeId::ROOT), links(a.id), links(f.id)), (3, 3, 2));
    assert_ne!(svc.get(f.id).expect("f").atime_ns, 0);
    // The names index is built from the entries.
    let (got, want) = names_index(&svc);
    assert_eq!(got, want);
    // and serves the unlink of the recorded parent's name: the node moves to its other one.
    svc.remove(a.id, &n("f"), false, &admin()).expect("unlink");
    let f = svc.get(f.id).expect("f keeps a name");
    assert_eq!((f.parent, f.nlink), (NodeId::ROOT, 1));
}

#[test]
fn regression_a_store_of_a_newer_format_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let svc = open(dir.path());
        svc.store
            .write(|tx| {
                tx.put(META, &FORMAT.to_owned(), &(replicas::FORMAT + 1))?;
                Ok(())
            })
            .expect("rewrite");
    }
    let err = match open_raw(dir.path()) {
        Ok(_) => panic!("a newer store was opened"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("newer dfs"), "{err}");
    assert!(
        err.contains(&format!("format {}", replicas::FORMAT + 1)),
        "{err}"
    );
}

#[test]
fn regression_a_node_stored_without_a_link_count_keeps_its_other_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    link(&svc, &admin(), f.id, NodeId::ROOT, "g").expect("link");
    // Its record loses the count (as a writer that did not know the field would leave it).
    svc.store
        .write(|tx| {
            let mut v = serde_json::to_value(get_node(tx, f.id)?)?;
            v.as_object_mut().expect("object").remove("nlink");
            let old = serde_json::to_vec(&v)?;
            tx.put(NODES, &f.id.0, &old)?;
            Ok(())
        })
        .expect("rewrite");
    assert_eq!(
        svc.get(f.id).expect("f").nlink,
        0,
        "the record has no count"
    );
    // Removing one name leaves the node, with the names it still has.
    let left = svc
        .remove(NodeId::ROOT, &n("f"), false, &admin())
        .expect("unlink");
    assert_eq!(left.nlink, 1);
    let g = svc
        .lookup(NodeId::ROOT, &n("g"), &admin())
        .expect("g still names it");
    assert_eq!((g.id, g.nlink), (f.id, 1));
    let gone = svc
        .remove(NodeId::ROOT, &n("g"), false, &admin())
        .expect("unlink");
    assert_eq!(gone.nlink, 0);
    assert!(matches!(svc.get(f.id), Err(ServiceError::NotFound(_))));
}

#[test]
fn the_store_upgrade_is_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = {
        let svc = open(dir.path());
        let a = mk(&svc, NodeId::ROOT, "a", FileKind::Dir);
        let f = mk(&svc, a.id, "f", FileKind::File);
        link(&svc, &admin(), f.id, NodeId::ROOT, "g").expect("link");
        // A format 1 store: no counts, no index.
        svc.store
            .write(|tx| {
                let mut v = serde_json::to_value(get_node(tx, f.id)?)?;
                v.as_object_mut().expect("object").remove("nlink");
                let old = serde_json::to_vec(&v)?;
                tx.put(NODES, &f.id.0, &old)?;
                drop_names_index(tx)?;
                tx.delete(META, &FORMAT.to_owned())?;
                Ok(())
            })
            .expect("rewrite");
        f
    };
    let state = || {
        let svc = open_raw(dir.path()).expect("open");
        let mut all = Vec::new();
        snapshot(&svc, NodeId::ROOT, vec![], &mut all);
        let format = svc.store.read(|tx| meta_get(tx, FORMAT)).expect("format");
        (
            all,
            names_index(&svc),
            format,
            svc.get(f.id).expect("f").nlink,
        )
    };
    let first = state();
    assert_eq!(first.1.0, first.1.1, "the index is built");
    assert_eq!((first.2, first.3), (Some(replicas::FORMAT), 2));
    assert_eq!(state(), first, "reopening changes nothing");
    assert_eq!(state(), first, "nor does a third open");
}

#[test]
fn regression_a_link_past_the_largest_count_is_emlink_not_too_large() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    svc.store
        .write(|tx| {
            let mut m = get_node(tx, f.id)?;
            m.nlink = u32::MAX;
            put_node(tx, &m)
        })
        .expect("rewrite");
    let r = link(&svc, &admin(), f.id, NodeId::ROOT, "g");
    assert!(matches!(r, Err(ServiceError::TooManyLinks(_))), "{r:?}");
    assert_eq!(
        ServiceError::TooManyLinks(String::new()).code(),
        common::ErrorCode::TooManyLinks
    );
}

#[test]
fn regression_rename_noreplace_onto_another_name_of_the_same_file_is_eexist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let f = mk(&svc, NodeId::ROOT, "f", FileKind::File);
    link(&svc, &admin(), f.id, NodeId::ROOT, "g").expect("link");
    let rename = |no_replace: bool| RenameRequest {
        parent: NodeId::ROOT,
        name: n("f"),
        new_parent: NodeId::ROOT,
        new_name: n("g"),
        no_replace,
    };
    assert!(matches!(
        svc.rename(&rename(true), &admin()),
        Err(ServiceError::Exists(_))
    ));
    // Without the flag, rename(2) between two names of one file does nothing.
    assert!(
        svc.rename(&rename(false), &admin())
            .expect("rename")
            .is_none()
    );
    assert_eq!(svc.list(NodeId::ROOT, &admin()).expect("list").len(), 2);
}


fn rid(s: &str) -> RequestId {
    RequestId::parse(s).expect("request id")
}

fn create_req(name: &str, kind: FileKind) -> CreateRequest {
    CreateRequest {
        name: n(name),
        kind,
        mode: 0o644,
        symlink_target: None,
        rdev: 0,
    }
}

#[test]
fn a_create_retried_with_the_same_id_returns_the_same_node_not_eexist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let alice = user(10_000, &[]);
    let id = rid("c-1");
    let req = create_req("f", FileKind::File);
    let first = svc
        .create_with_id(NodeId::ROOT, &req, &alice, Some(&id))
        .expect("create");
    // The answer was lost; the client sends the same request again.
    let again = svc
        .create_with_id(NodeId::ROOT, &req, &alice, Some(&id))
        .expect("a retry is answered, not refused as EEXIST");
    assert_eq!(again, first);
    assert_eq!(svc.list(NodeId::ROOT, &admin()).expect("list").len(), 1);
    // Without the id (or with another), it is a second create: EEXIST.
    assert!(matches!(
        svc.create_with_id(NodeId::ROOT, &req, &alice, Some(&rid("c-2"))),
        Err(ServiceError::Exists(_))
    ));
    assert!(matches!(
        svc.create(NodeId::ROOT, &req, &alice),
        Err(ServiceError::Exists(_))
    ));
}

#[test]
fn a_rename_retried_after_its_source_was_made_again_is_not_applied_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let a = mk(&svc, NodeId::ROOT, "a", FileKind::File);
    let req = RenameRequest {
        parent: NodeId::ROOT,
        name: n("a"),
        new_parent: NodeId::ROOT,
        new_name: n("b"),
        no_replace: false,
    };
    let id = rid("rename-a-b");
    let first = svc
        .rename_with_id(&req, &admin(), Some(&id))
        .expect("rename");
    assert_eq!(first, None);
    // Someone makes a new `a`; then the rename's retry arrives.
    let a2 = mk(&svc, NodeId::ROOT, "a", FileKind::File);
    let again = svc
        .rename_with_id(&req, &admin(), Some(&id))
        .expect("the remembered answer");
    assert_eq!(again, first);
    let look = |name: &str| svc.lookup(NodeId::ROOT, &n(name), &admin()).map(|m| m.id);
    assert_eq!(look("a").expect("the new a stays"), a2.id);
    assert_eq!(look("b").expect("b is the first a"), a.id);
}

#[test]
fn a_refusal_is_remembered_and_ids_are_each_callers_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let (alice, bob) = (user(10_000, &[]), user(10_001, &[]));
    let id = rid("rm-x");
    let refused = svc.remove_with_id(NodeId::ROOT, &n("x"), false, &alice.id, Some(&id));
    assert!(matches!(refused, Err(ServiceError::NotFound(_))), "{refused:?}");
    let x = mk_as(&svc, &alice, NodeId::ROOT, "x", FileKind::File, 0o644).expect("create");
    // The retry gets the first answer (ENOENT), and `x` is not removed by it.
    let again = svc
        .remove_with_id(NodeId::ROOT, &n("x"), false, &alice.id, Some(&id))
        .expect_err("the remembered refusal");
    assert_eq!(again.code(), common::ErrorCode::NotFound, "{again}");
    assert_eq!(
        svc.lookup(NodeId::ROOT, &n("x"), &admin()).expect("x").id,
        x.id
    );
    // Bob's request with the same id is his own: it runs, and is refused for what it is
    // (Bob may not remove Alice's file from the sticky root), not answered with Alice's ENOENT.
    let bobs = svc.remove_with_id(NodeId::ROOT, &n("x"), false, &bob.id, Some(&id));
    assert!(matches!(bobs, Err(ServiceError::Forbidden(_))), "{bobs:?}");
}

#[test]
fn remembered_answers_expire_a_bounded_few_per_operation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let old = 1_000u64;
    svc.store
        .write(|tx| {
            for i in 0..(requests::EXPIRE_PER_OP as u32 + 3) {
                requests::remember(tx, &(7, format!("old-{i}")), Ok(&i), old)?;
            }
            Ok(())
        })
        .expect("remember");
    let count = || {
        svc.store
            .read(|tx| Ok((tx.all(requests::REQUESTS)?.len(), tx.all(requests::REQUEST_EXPIRY)?.len())))
            .expect("count")
    };
    assert_eq!(count(), (requests::EXPIRE_PER_OP + 3, requests::EXPIRE_PER_OP + 3));
    // Expired answers are not served...
    let stale = svc
        .store
        .write(|tx| requests::recall::<u32>(tx, &(7, "old-0".into()), crate::store::now_ms()))
        .expect("recall");
    assert!(stale.is_none());
    // ...and each operation with an id removes a few of them.
    svc.create_with_id(
        NodeId::ROOT,
        &create_req("z", FileKind::File),
        &Caller::cluster(),
        Some(&rid("new")),
    )
    .expect("create");
    assert_eq!(count(), (4, 4), "8 expired ones removed, 3 left and the new one");
}

/// The largest batches the routes admit are recorded whole on either engine (etcd refuses
/// more than `--max-txn-ops`, 128 by default, compares or writes in one transaction: the
/// directory cuts them into chunks there).
#[test]
fn the_largest_batches_are_recorded_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    // More files than etcd's default --max-txn-ops: a holders batch may name them all.
    let all: Vec<NodeMeta> = (0..130)
        .map(|i| mk(&svc, NodeId::ROOT, &format!("f{i}"), FileKind::File))
        .collect();
    let files = &all[..common::api::MAX_BATCH_ITEMS];
    let hash = ContentHash::from_digest(&[9; 32]);
    let batch = common::api::CommitBatchRequest {
        items: files
            .iter()
            .enumerate()
            .map(|(i, f)| common::api::CommitBatchItem {
                node: f.id,
                commit: CommitRequest {
                    hash: hash.clone(),
                    size: 1,
                    fence: FenceToken(1),
                    upload_id: UploadId::from_bytes([u8::try_from(i).expect("small"); 16]),
                    base: common::api::PushBase {
                        version: 0,
                        waiting: true,
                    },
                    holders: f.primary.iter().chain(&f.replicas).copied().take(2).collect(),
                    writer: "t".into(),
                    writer_id: None,
                    primary: f.primary,
                    replicas: Some(f.replicas.clone()),
                    mode: None,
                    mtime_ns: None,
                    origin: None,
                },
            })
            .collect(),
    };
    let results = svc.commit_batch(&batch).expect("batch");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // Every file's third copy, of the version each file is at.
    let late: Vec<common::api::HolderItem> = all
        .iter()
        .enumerate()
        .map(|(i, f)| common::api::HolderItem {
            node: f.id,
            hash: if i < files.len() {
                hash.clone()
            } else {
                f.hash.clone()
            },
            server: *f.replicas.last().expect("three copies"),
        })
        .collect();
    svc.add_holders(&late).expect("add holders");
    for f in files {
        assert_eq!(svc.get(f.id).expect("file").holders.len(), 3, "node {}", f.id);
    }
}

/// More file servers than etcd compares in one transaction: registering one reads only the
/// greatest id, and the registry is loaded at open outside any write.
#[test]
fn many_file_servers_register_with_sequential_ids_and_are_known_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let mut last = None;
    for i in 0..140u16 {
        let id = svc
            .register_server(&RegisterServerRequest {
                url: format!("http://127.0.0.2:{}", 10_000 + i),
                capacity_bytes: 1,
                previous_id: None,
                cluster_id: None,
            })
            .expect("register");
        if let Some(prev) = last {
            assert_eq!(id.0, prev + 1);
        }
        last = Some(id.0);
    }
    assert_eq!(last, Some(143), "3 servers from open, then 140");
    drop(svc);
    let svc = open_raw(dir.path()).expect("reopen");
    assert_eq!(svc.registry.status(&Default::default()).len(), 143);
}
}

/// Two directory instances on one etcd prefix (one cluster, two processes' worth of
/// directories): concurrent mkdirs in one parent all land with distinct ids and the right
/// link count, and an rmdir racing a create inside that directory never leaves an entry in a
/// removed directory.
#[test]
fn two_directories_on_one_etcd_never_lose_or_orphan_a_change() {
    let req = |name: &str, kind: FileKind| CreateRequest {
        name: n(name),
        kind,
        mode: 0o755,
        symlink_target: None,
        rdev: 0,
    };
    let mk = move |svc: &DirectoryService, parent: NodeId, name: &str, kind: FileKind| {
        svc.create(parent, &req(name, kind), &Caller::cluster())
            .expect("create")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let a = std::sync::Arc::new(open_on_etcd(dir.path()).expect("first instance"));
    let b = std::sync::Arc::new(open_on_etcd(dir.path()).expect("second instance"));
    assert_eq!(a.cluster_id(), b.cluster_id(), "one cluster");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let svc = if t % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                (0..5)
                    .map(|i| mk(&svc, NodeId::ROOT, &format!("d{t}-{i}"), FileKind::Dir).id)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids: Vec<NodeId> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("join"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "every mkdir got its own node");
    assert_eq!(b.get(NodeId::ROOT).expect("root").nlink, 22);
    assert_eq!(a.list(NodeId::ROOT, &admin()).expect("list").len(), 20);
    // rmdir on one instance against creates inside on the other, a few rounds.
    for round in 0..6 {
        let d = mk(&a, NodeId::ROOT, &format!("race{round}"), FileKind::Dir);
        let (a2, b2) = (a.clone(), b.clone());
        let rm = std::thread::spawn(move || {
            a2.remove(NodeId::ROOT, &n(&format!("race{round}")), true, &admin())
                .is_ok()
        });
        let made = std::thread::spawn(move || {
            b2.create(d.id, &req("x", FileKind::File), &Caller::cluster())
                .is_ok()
        });
        let (removed, created) = (rm.join().expect("join"), made.join().expect("join"));
        assert!(
            !(removed && created),
            "round {round}: rmdir and a create inside both won"
        );
        let still = a.lookup(NodeId::ROOT, &n(&format!("race{round}")), &admin());
        assert_eq!(still.is_ok(), !removed, "round {round}");
    }
    // Every node but the root is named somewhere, and every name is of a node.
    let (nodes, children) = a
        .store
        .read(|tx| Ok((tx.all(NODES)?, tx.all(CHILDREN)?)))
        .expect("read");
    for (id, _) in &nodes {
        assert!(
            *id == NodeId::ROOT.0 || children.iter().any(|(_, c)| c == id),
            "node {id} is named nowhere"
        );
    }
    for ((parent, name), id) in &children {
        assert!(
            nodes.iter().any(|(n, _)| n == id) && nodes.iter().any(|(n, _)| n == parent),
            "{name:?} in {parent} names a missing node {id}"
        );
    }
}

/// Regression: the expiry of request ids ran inside every operation's transaction, which so
/// read the oldest `request_expiry` rows that every concurrent operation read and deleted too:
/// on etcd unrelated changes conflicted on them. Here a sweep by someone else lands while an
/// operation runs: the operation must not conflict (it does not read the expiry queue), and
/// an expired answer still stored for its id is not honoured.
#[test]
fn regression_request_expiry_is_outside_the_operations_transaction_on_etcd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open_on_etcd(dir.path()).expect("open");
    let mine = || RequestId::parse("mine").expect("request id");
    let old = 1_000u64;
    let key = requests::key(0, &mine());
    svc.store
        .write(|tx| {
            for i in 0..(requests::EXPIRE_PER_OP as u32 + 3) {
                requests::remember(tx, &(7, format!("old-{i}")), Ok(&i), old)?;
            }
            // An expired answer for the operation's own id, not swept yet (younger than the
            // ones the sweep below takes).
            requests::remember(tx, &key, Ok(&99u32), old + 1)?;
            Ok(())
        })
        .expect("remember");
    let conflicts = svc.store.conflicts();
    let runs = std::sync::atomic::AtomicU32::new(0);
    let answer: u32 = svc
        .once(0, Some(&mine()), |_tx| {
            if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                // Another operation's sweep commits meanwhile.
                std::thread::scope(|s| {
                    s.spawn(|| {
                        svc.store
                            .write(|tx| requests::expire(tx, crate::store::now_ms()))
                            .expect("concurrent sweep")
                    })
                    .join()
                    .expect("join")
                });
            }
            Ok(5u32)
        })
        .expect("the operation");
    assert_eq!(answer, 5, "the expired answer (99) was honoured");
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the operation ran again: its transaction read the expiry queue"
    );
    assert_eq!(svc.store.conflicts(), conflicts, "no conflict");
    // Its answer is remembered now, and served to a retry.
    let again: u32 = svc
        .once(0, Some(&mine()), |_tx| Ok(6u32))
        .expect("the retry");
    assert_eq!(again, 5);
}

/// Regression: on etcd a batch commit goes in parts of `COMMITS_PER_ETCD_TXN`; a failing part
/// threw away the answers of the parts before it, which had committed (the primary then took
/// every item as failed, and its retry, finding the upload ids applied, learnt of no
/// superseded version to drop). Now the committed parts keep their answers, and only the items
/// of the failed part and the ones after it are refused, each as unavailable.
#[test]
fn regression_a_failing_part_of_a_batch_commit_keeps_the_answers_of_the_committed_parts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open_on_etcd(dir.path()).expect("open");
    for i in 0..3 {
        svc.register_server(&RegisterServerRequest {
            url: format!("http://127.0.0.1:{}", 9000 + i),
            capacity_bytes: 1 << 30,
            previous_id: None,
            cluster_id: None,
        })
        .expect("register");
    }
    let per = COMMITS_PER_ETCD_TXN;
    let files: Vec<NodeMeta> = (0..2 * per + 3)
        .map(|i| {
            svc.create(
                NodeId::ROOT,
                &CreateRequest {
                    name: n(&format!("b{i}")),
                    kind: FileKind::File,
                    mode: 0o644,
                    symlink_target: None,
                    rdev: 0,
                },
                &Caller::cluster(),
            )
            .expect("create")
        })
        .collect();
    let hash = ContentHash::from_digest(&[7; 32]);
    // Upload ids of this test only: the fault point is process-wide, keyed by upload id.
    let salt: [u8; 8] = rand::random();
    let upload = |i: usize| {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&salt);
        b[8..].copy_from_slice(&(i as u64).to_be_bytes());
        UploadId::from_bytes(b)
    };
    let batch = common::api::CommitBatchRequest {
        items: files
            .iter()
            .enumerate()
            .map(|(i, f)| common::api::CommitBatchItem {
                node: f.id,
                commit: CommitRequest {
                    hash: hash.clone(),
                    size: 1,
                    fence: FenceToken(1),
                    upload_id: upload(i),
                    base: common::api::PushBase {
                        version: 0,
                        waiting: true,
                    },
                    holders: f
                        .primary
                        .iter()
                        .chain(&f.replicas)
                        .copied()
                        .take(2)
                        .collect(),
                    writer: "t".into(),
                    writer_id: None,
                    primary: f.primary,
                    replicas: Some(f.replicas.clone()),
                    mode: None,
                    mtime_ns: None,
                    origin: None,
                },
            })
            .collect(),
    };
    // The second part fails.
    let failing = upload(per + 2).to_string();
    fail::cfg("commit-part-fails", &format!("return({failing})")).expect("fault point");
    let results = svc.commit_batch(&batch);
    fail::remove("commit-part-fails");
    let results = results.expect("per-item answers, not one error");
    assert_eq!(results.len(), files.len());
    for (i, r) in results.iter().enumerate() {
        if i < per {
            let c = r
                .as_ref()
                .unwrap_or_else(|e| panic!("item {i} committed: {e}"));
            assert_eq!(c.meta.version, 1, "item {i}");
            assert!(c.superseded.is_some(), "item {i}: its superseded version");
        } else {
            assert!(
                matches!(r, Err(ServiceError::Unavailable(_))),
                "item {i}: {r:?}"
            );
            assert_eq!(svc.get(files[i].id).expect("file").version, 0, "item {i}");
        }
    }
    // The retry commits the rest; the committed ones are recognised by their upload ids.
    let again = svc.commit_batch(&batch).expect("retry");
    for (i, r) in again.iter().enumerate() {
        let c = r
            .as_ref()
            .unwrap_or_else(|e| panic!("item {i} on retry: {e}"));
        assert_eq!(c.meta.version, 1, "item {i}");
        assert_eq!(c.superseded.is_some(), i >= per, "item {i}");
    }
}
