//! Unit tests of the directory's namespace logic, without HTTP.

use common::api::{CommitRequest, CreateRequest, RegisterServerRequest, RenameRequest};
use common::{ContentHash, FenceToken, FileKind, NodeId, UploadId, ValidName};

use super::*;

fn n(s: &str) -> ValidName {
    ValidName::parse(s).expect("valid name")
}

fn open(dir: &Path) -> DirectoryService {
    let svc = DirectoryService::open(dir, DirectoryConfig::default()).expect("open");
    for i in 0..3 {
        svc.register_server(&RegisterServerRequest {
            url: format!("http://127.0.0.1:{}", 9000 + i),
            capacity_bytes: 1 << 30,
            previous_id: None,
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
        },
        "t",
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
            holders: vec![],
            writer: "t".into(),
        },
    )
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
    assert_eq!(svc.lookup(d.id, &n("f")).expect("lookup").id, f.id);
    assert!(matches!(
        svc.create(
            d.id,
            &CreateRequest {
                name: n("f"),
                kind: FileKind::File,
                mode: 0o644,
                symlink_target: None
            },
            "t"
        ),
        Err(ServiceError::Exists(_))
    ));
    assert_eq!(svc.list(d.id).expect("list").len(), 1);
    assert!(matches!(
        svc.remove(NodeId::ROOT, &n("d"), true),
        Err(ServiceError::NotEmpty(_))
    ));
    assert!(matches!(
        svc.remove(d.id, &n("f"), true),
        Err(ServiceError::NotDir(_))
    ));
    assert!(matches!(
        svc.remove(NodeId::ROOT, &n("d"), false),
        Err(ServiceError::IsDir(_))
    ));
    svc.remove(d.id, &n("f"), false).expect("unlink");
    svc.remove(NodeId::ROOT, &n("d"), true).expect("rmdir");
    assert!(matches!(
        svc.lookup(NodeId::ROOT, &n("d")),
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
        .rename(&RenameRequest {
            parent: NodeId::ROOT,
            name: n("a"),
            new_parent: NodeId::ROOT,
            new_name: n("b"),
            no_replace: false,
        })
        .expect("rename");
    assert_eq!(replaced.map(|m| m.id), Some(b.id));
    assert_eq!(svc.lookup(NodeId::ROOT, &n("b")).expect("lookup").id, a.id);
    assert!(svc.lookup(NodeId::ROOT, &n("a")).is_err());
    assert_eq!(svc.list(NodeId::ROOT).expect("list").len(), 1);
}

#[test]
fn rename_of_directory_into_itself_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let svc = open(dir.path());
    let d = mk(&svc, NodeId::ROOT, "d", FileKind::Dir);
    let sub = mk(&svc, d.id, "sub", FileKind::Dir);
    for target in [d.id, sub.id] {
        let r = svc.rename(&RenameRequest {
            parent: NodeId::ROOT,
            name: n("d"),
            new_parent: target,
            new_name: n("x"),
            no_replace: false,
        });
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
    let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("reopen");
    let d = svc.lookup(NodeId::ROOT, &n("keep")).expect("dir");
    let f = svc.lookup(d.id, &n("f")).expect("file");
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
