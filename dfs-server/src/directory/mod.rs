//! `DirectoryService`: the namespace and every file's metadata in one metadata store (redb or
//! etcd, `crate::meta`), plus the file server registry. Every namespace change is one
//! transaction: rename is atomic.

pub mod access;
mod bulk;
mod counters;
pub mod feed;
mod paging;
pub mod placement;
pub mod registry;
pub mod repair;
pub mod replicas;
pub mod requests;
pub mod routes;

use std::path::Path;
use std::time::Duration;

use common::api::{
    CommitRequest, CommitResponse, CreateRequest, IntentRequest, LinkRequest, RenameRequest,
    SYMLINK_MAX, SetAttrRequest, StatFs, Superseded,
};
use common::perm::{R, SETGID, SETUID, W, X};
use common::{
    Caller, ContentHash, DirEntry, FenceToken, FileKind, Identity, NodeId, NodeMeta, ServerId,
    ValidName,
};

use crate::error::{ServiceError, ServiceResult};
use crate::meta::{MetaConfig, MetaStore, Table, Txn};
use crate::store::{decode, encode, now_ns};
use common::api::ChangeKind;
pub use registry::Registry;
pub use requests::RequestId;

const NODES: Table<u64, Vec<u8>> = Table::new("nodes");
const CHILDREN: Table<(u64, String), u64> = Table::new("children");
/// The reverse of `children`: `(node, parent, name)` for every entry, kept in the same
/// transactions, so that a node's names are a range read (hard links).
const NAMES: Table<(u64, u64, String), ()> = Table::new("names");
pub(crate) const META: Table<String, u64> = Table::new("dir_meta");
const NEXT_ID: &str = "next_node_id";
pub(crate) const CLUSTER_ID: &str = "cluster_id";
/// Set (to the cluster id) in `dir_meta` while `meta import` fills a store, removed by its
/// last transaction: a directory refuses to open a store an import has not finished.
pub(crate) const IMPORTING: &str = "import_incomplete";

/// Every table of the directory's store, in one place: `meta export` and `meta import` copy
/// each of them, whatever its types. A new table is one more line here.
pub const TABLES: &[&dyn crate::meta::AnyTable] = &[
    &NODES,
    &CHILDREN,
    &NAMES,
    &META,
    &registry::SERVERS,
    &registry::SERVICES,
    &requests::REQUESTS,
    &requests::REQUEST_EXPIRY,
    &replicas::HOLDINGS,
    &replicas::QUEUE,
    &replicas::QUEUE_DUE,
    &replicas::PLACED,
    &replicas::SEEN,
];
/// The store's format: 2 counts links (`nlink`) and stores access times; 3 indexes every
/// node's names (`names`).
pub(crate) const FORMAT: &str = "format";
const FORMAT_LINKS: u64 = 2;
const FORMAT_NAMES: u64 = 3;
/// Versions committed per etcd transaction by `commit_batch`.
const COMMITS_PER_ETCD_TXN: usize = 16;
/// Copies recorded per transaction by `add_holders`.
const HOLDERS_PER_TXN: usize = 24;

/// A number kept in `dir_meta`.
fn meta_get(tx: &Txn, key: &str) -> ServiceResult<Option<u64>> {
    tx.get(META, &key.to_owned())
}

fn meta_put(tx: &Txn, key: &str, value: u64) -> ServiceResult<()> {
    tx.put(META, &key.to_owned(), &value)
}

/// Tunables of the directory.
#[derive(Debug, Clone)]
pub struct DirectoryConfig {
    /// Copies per file (primary + replicas), when that many servers are alive.
    pub replication: u32,
    /// Interval file servers are asked to heartbeat at.
    pub heartbeat: Duration,
    /// Missed heartbeats after which a server is dead.
    pub missed_beats: u32,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            replication: 3,
            heartbeat: Duration::from_secs(2),
            missed_beats: 3,
        }
    }
}

/// The namespace service. Pure logic over the metadata store; the registry decides placement.
pub struct DirectoryService {
    store: MetaStore,
    /// File servers, liveness and lock/auth URLs.
    pub registry: Registry,
    config: DirectoryConfig,
    cluster_id: u64,
    /// Signs the capabilities file servers serve blobs against (the cluster key).
    capability_key: String,
    /// This directory serves TLS: services must register https:// URLs.
    https_only: bool,
    /// The change feed the store publishes every committed change to.
    feed: std::sync::Arc<feed::Feed>,
    /// Node ids reserved for this instance and not yet used: `[next, end)`.
    ids: std::sync::Mutex<(u64, u64)>,
}

/// Node ids an instance reserves at a time (one transaction on `next_node_id` per block), so
/// that creates on several instances do not all write one key.
pub const ID_BLOCK: u64 = 1024;

/// A node as stored. A non-directory whose record has no link count (`nlink` 0: a field its
/// writer did not know) has its names counted, never taken as having none.
fn get_node(tx: &Txn, id: NodeId) -> ServiceResult<NodeMeta> {
    let mut meta: NodeMeta = {
        let v = tx
            .get(NODES, &id.0)?
            .ok_or_else(|| ServiceError::NotFound(format!("node {id}")))?;
        decode(&v)?
    };
    if meta.nlink == 0 && meta.kind != FileKind::Dir {
        meta.nlink = count_names(tx, id)?;
        tracing::warn!(%id, nlink = meta.nlink, "node stored without a link count; counted its names");
    }
    Ok(meta)
}

/// The names of node `id` (the names index), at most `limit`: `(parent, name)`.
fn names_of(tx: &Txn, id: NodeId, limit: Option<usize>) -> ServiceResult<Vec<(u64, String)>> {
    let rows = tx.range(
        NAMES,
        Some(&(id.0, 0, String::new())),
        Some(&(id.0.saturating_add(1), 0, String::new())),
        limit,
    )?;
    Ok(rows.into_iter().map(|((_, p, n), ())| (p, n)).collect())
}

/// How many names node `id` has (the names index).
fn count_names(tx: &Txn, id: NodeId) -> ServiceResult<u32> {
    Ok(u32::try_from(names_of(tx, id, None)?.len()).unwrap_or(u32::MAX))
}

/// Stores a node whose attributes or content changed (published to the change feed).
fn put_node(tx: &Txn, meta: &NodeMeta) -> ServiceResult<()> {
    tx.changed(ChangeKind::Node { node: meta.id });
    put_node_quiet(tx, meta)
}

/// Stores a node where nothing a kernel caches changed (holders, placement, write-back
/// intents): not published.
fn put_node_quiet(tx: &Txn, meta: &NodeMeta) -> ServiceResult<()> {
    tx.put(NODES, &meta.id.0, &encode(meta)?)
}

fn delete_node(tx: &Txn, id: NodeId) -> ServiceResult<()> {
    tx.changed(ChangeKind::Gone { node: id });
    tx.delete(NODES, &id.0)
}

fn child_of(tx: &Txn, parent: NodeId, name: &str) -> ServiceResult<Option<NodeId>> {
    Ok(tx.get(CHILDREN, &(parent.0, name.to_owned()))?.map(NodeId))
}

/// Enters `name` in `parent` for node `id`, in `children` and its reverse index.
fn add_name(tx: &Txn, parent: NodeId, name: &str, id: NodeId) -> ServiceResult<()> {
    tx.changed(ChangeKind::Entry {
        dir: parent,
        node: id,
    });
    tx.put(CHILDREN, &(parent.0, name.to_owned()), &id.0)?;
    tx.put(NAMES, &(id.0, parent.0, name.to_owned()), &())?;
    Ok(())
}

/// Removes `name` of node `id` from `parent`, in `children` and its reverse index.
fn remove_name(tx: &Txn, parent: NodeId, name: &str, id: NodeId) -> ServiceResult<()> {
    tx.changed(ChangeKind::Entry {
        dir: parent,
        node: id,
    });
    tx.delete(CHILDREN, &(parent.0, name.to_owned()))?;
    tx.delete(NAMES, &(id.0, parent.0, name.to_owned()))?;
    Ok(())
}

/// The entries of directory `dir` in name order, at most `limit`: `(name, node)`.
fn children_of(
    tx: &Txn,
    dir: NodeId,
    limit: Option<usize>,
) -> ServiceResult<Vec<(String, NodeId)>> {
    let rows = tx.range(
        CHILDREN,
        Some(&(dir.0, String::new())),
        Some(&(dir.0.saturating_add(1), String::new())),
        limit,
    )?;
    Ok(rows
        .into_iter()
        .map(|((_, n), id)| (n, NodeId(id)))
        .collect())
}

fn has_children(tx: &Txn, dir: NodeId) -> ServiceResult<bool> {
    Ok(!children_of(tx, dir, Some(1))?.is_empty())
}

/// Directory `id` as stored (read views: no recount of links).
fn read_dir(tx: &Txn, id: NodeId) -> ServiceResult<NodeMeta> {
    let v = tx
        .get(NODES, &id.0)?
        .ok_or_else(|| ServiceError::NotFound(format!("node {id}")))?;
    let meta: NodeMeta = decode(&v)?;
    if meta.kind != FileKind::Dir {
        return Err(ServiceError::NotDir(format!("node {id}")));
    }
    Ok(meta)
}

fn dir_node(tx: &Txn, id: NodeId) -> ServiceResult<NodeMeta> {
    let meta = get_node(tx, id)?;
    if meta.kind != FileKind::Dir {
        return Err(ServiceError::NotDir(format!("node {id}")));
    }
    Ok(meta)
}

/// Applies `f` to file `id` if its content is still `hash`.
fn update_if_current_in(
    tx: &Txn,
    id: NodeId,
    hash: &ContentHash,
    f: impl Fn(&mut NodeMeta),
) -> ServiceResult<()> {
    let mut meta = get_node(tx, id)?;
    if &meta.hash != hash {
        return Ok(());
    }
    let before = meta.clone();
    f(&mut meta);
    put_node_quiet(tx, &meta)?;
    replicas::node_changed(tx, Some(&before), Some(&meta))
}

fn touch_dir(tx: &Txn, id: NodeId, now: u64) -> ServiceResult<()> {
    touch_dir_links(tx, id, now, 0)
}

/// An entry of directory `id` changed at `now`, and it gained (`subdirs` > 0) or lost
/// subdirectories, each of which is a link to it (its `..`).
fn touch_dir_links(tx: &Txn, id: NodeId, now: u64, subdirs: i64) -> ServiceResult<()> {
    let mut meta = get_node(tx, id)?;
    meta.mtime_ns = now;
    meta.ctime_ns = now;
    let links = i64::from(meta.nlink).saturating_add(subdirs).max(2);
    meta.nlink = u32::try_from(links).unwrap_or(u32::MAX);
    put_node(tx, &meta)
}

/// A directory that still holds a name of `id`, for a node whose recorded parent lost its
/// name of it (hard links): one read of the names index.
fn another_parent(tx: &Txn, id: NodeId) -> ServiceResult<Option<NodeId>> {
    Ok(names_of(tx, id, Some(1))?.first().map(|(p, _)| NodeId(*p)))
}

/// Builds the names index from `children`, for a store written before it (format < 3).
/// Returns the number of names indexed.
fn index_names(tx: &Txn) -> ServiceResult<u64> {
    let mut count = 0u64;
    for ((parent, name), id) in tx.all(CHILDREN)? {
        tx.put(NAMES, &(id, parent, name), &())?;
        count += 1;
    }
    Ok(count)
}

/// One name of non-directory `meta` (in `parent`) is gone: the node goes with its last name,
/// else it keeps the others, with one link less. Returns the node with its new count (0:
/// freed).
fn drop_link(tx: &Txn, mut meta: NodeMeta, parent: NodeId, now: u64) -> ServiceResult<NodeMeta> {
    meta.nlink = meta.nlink.saturating_sub(1);
    if meta.nlink == 0 {
        // Never delete a node that still has a name, whatever its count said.
        let left = count_names(tx, meta.id)?;
        if left == 0 {
            delete_node(tx, meta.id)?;
            replicas::node_changed(tx, Some(&meta), None)?;
            return Ok(meta);
        }
        tracing::warn!(id = %meta.id, left, "link count was short of the names; recounted");
        meta.nlink = left;
    }
    meta.ctime_ns = now;
    if meta.parent == parent
        && let Some(p) = another_parent(tx, meta.id)?
    {
        meta.parent = p;
    }
    put_node(tx, &meta)?;
    Ok(meta)
}

/// Counts every node's links once, for a store written before links were counted: a file's
/// names, 2 + subdirectories for a directory. Access times start as the modification times.
/// Returns the number of nodes counted.
fn count_links(tx: &Txn) -> ServiceResult<u64> {
    let mut names: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
    for (_, id) in tx.all(CHILDREN)? {
        *names.entry(id).or_default() += 1;
    }
    let mut metas = Vec::new();
    for (_, v) in tx.all(NODES)? {
        metas.push(decode::<NodeMeta>(&v)?);
    }
    let mut subdirs: std::collections::HashMap<NodeId, u32> = std::collections::HashMap::new();
    for m in &metas {
        if m.kind == FileKind::Dir && m.id != NodeId::ROOT {
            *subdirs.entry(m.parent).or_default() += 1;
        }
    }
    let counted = metas.len() as u64;
    for mut m in metas {
        m.nlink = if m.kind == FileKind::Dir {
            2u32.saturating_add(subdirs.get(&m.id).copied().unwrap_or(0))
        } else {
            names.get(&m.id.0).copied().unwrap_or(0).max(1)
        };
        if m.atime_ns == 0 {
            m.atime_ns = m.mtime_ns;
        }
        put_node(tx, &m)?;
    }
    meta_put(tx, FORMAT, FORMAT_LINKS)?;
    Ok(counted)
}

/// One commit inside `tx`. The outer error is a storage failure (the whole transaction
/// aborts); the inner one a refusal of this commit, which then wrote nothing.
fn commit_in(
    tx: &Txn,
    id: NodeId,
    req: &CommitRequest,
) -> ServiceResult<ServiceResult<CommitResponse>> {
    let refusal = |e: ServiceError| Ok(Err(e));
    let mut meta = match get_node(tx, id) {
        Ok(m) => m,
        Err(e @ ServiceError::NotFound(_)) => return refusal(e),
        Err(e) => return Err(e),
    };
    if meta.kind != FileKind::File {
        return refusal(ServiceError::IsDir(format!("node {id}")));
    }
    if meta.recent_uploads.contains(&req.upload_id) {
        // Applied already (a retry whose first answer was lost). The version it superseded
        // cannot be told: a node keeps only its current hash and holders, not its previous
        // ones (keeping them would cost every node a second hash and holder list). So
        // `superseded` is `None` and the primary drops nothing: the old copies are removed by
        // the file servers' scrub (`file/scrub.rs`: a copy that is not the current version and
        // predates its commit). A batch commit no longer loses the answers of its committed
        // parts (`commit_batch`), so only a lost answer leads here.
        if meta.writeback.take().is_some() {
            put_node(tx, &meta)?;
        }
        return Ok(Ok(CommitResponse {
            meta,
            superseded: None,
        }));
    }
    if let Some(who) = &req.writer_id
        && let Err(e) = access::need_write(who, &meta)
    {
        return refusal(e);
    }
    if req.fence < meta.fence {
        return refusal(ServiceError::stale(req.fence, meta.fence));
    }
    if !req.base.admits(meta.version) {
        // A later push of content based on an older version. However long ago its upload id
        // left `recent_uploads`, it is never applied over a version its writer did not see.
        if meta.hash == req.hash {
            // The current version already is this content (e.g. this very upload, applied
            // before a restart of the writer made it send again): nothing to apply.
            if meta
                .writeback
                .as_ref()
                .is_some_and(|w| w.upload_id == req.upload_id)
            {
                meta.writeback = None;
                put_node(tx, &meta)?;
            }
            return Ok(Ok(CommitResponse {
                meta,
                superseded: None,
            }));
        }
        return refusal(ServiceError::Conflict(format!(
            "node {id} is at version {}; this push was based on version {} and no close waits for it",
            meta.version, req.base.version
        )));
    }
    if let Some(p) = req.primary
        && meta.primary != Some(p)
    {
        return refusal(ServiceError::NotPrimary(format!(
            "server {p} is not the primary of node {id}; the placement changed"
        )));
    }
    if let Some(r) = &req.replicas
        && r != &meta.replicas
    {
        return refusal(ServiceError::NotPrimary(format!(
            "the placement of node {id} changed; fetch it again"
        )));
    }
    let mut holders = req.holders.clone();
    holders.sort();
    holders.dedup();
    if holders.len() != req.holders.len() {
        return refusal(ServiceError::BadRequest("holders must be distinct".into()));
    }
    // The acknowledgement rule, checked where it is recorded: the primary and one
    // replica, or the primary alone for a file placed on one server.
    let needed = if meta.replicas.is_empty() { 1 } else { 2 };
    if req.primary.is_some() && holders.len() < needed {
        return refusal(ServiceError::Unavailable(format!(
            "node {id} needs {needed} durable copies, the commit names {}",
            holders.len()
        )));
    }
    let members: Vec<ServerId> = meta.primary.iter().chain(&meta.replicas).copied().collect();
    if let Some(h) = req.holders.iter().find(|h| !members.contains(h)) {
        return refusal(ServiceError::NotPrimary(format!(
            "server {h} does not hold node {id} in the current placement"
        )));
    }
    if req.mode.is_some_and(|m| m > 0o7777) {
        return refusal(ServiceError::BadRequest(
            "mode has bits beyond 07777".into(),
        ));
    }
    let before = meta.clone();
    let superseded = Superseded {
        hash: meta.hash.clone(),
        holders: meta.holders.clone(),
    };
    let now = now_ns();
    meta.version += 1;
    meta.size = req.size;
    meta.hash = req.hash.clone();
    meta.fence = req.fence;
    meta.recent_uploads.push(req.upload_id.clone());
    if meta.recent_uploads.len() > common::meta::RECENT_UPLOADS {
        meta.recent_uploads.remove(0);
    }
    meta.holders = req.holders.clone();
    // Any new version ends the wait: a reader then sees content at least as new as the
    // close that announced the push (a writer that re-hashed and resent under a new
    // upload id does not leave readers waiting for an id that never comes).
    meta.writeback = None;
    let writer = req
        .writer_id
        .clone()
        .unwrap_or_else(|| Caller::cluster().id);
    // Writing drops set-user-id and set-group-id, unless the administrator writes; a mode
    // folded into the push (fchmod while open, `cp -p`) comes after the write and is the
    // owner's to make.
    if !writer.admin {
        meta.mode &= !(SETUID | SETGID);
    }
    if let Some(m) = req.mode
        && writer.owns(meta.uid)
    {
        meta.mode = m;
    }
    // A time folded into the push (futimens or `touch -m` while the file had unpushed
    // changes) is set by the writer under utimensat's rule for a time other than "both now":
    // the owner's (or the administrator's) to make; anyone else's push is stamped now.
    meta.mtime_ns = match req.mtime_ns {
        Some(t) if writer.owns(meta.uid) => t,
        _ => now,
    };
    meta.ctime_ns = now;
    meta.committed_ns = now;
    put_node(tx, &meta)?;
    replicas::node_changed(tx, Some(&before), Some(&meta))?;
    tracing::debug!(%id, version = meta.version, writer = %req.writer, "version committed");
    Ok(Ok(CommitResponse {
        meta,
        superseded: Some(superseded),
    }))
}

/// `server` holds the current version of `item.node` (ignored if the version moved on); it joins
/// the placement if it was not a member, replacing dead members that hold nothing current.
fn add_holder_in(
    tx: &Txn,
    item: &common::api::HolderItem,
    live: &[ServerId],
    replication: usize,
) -> ServiceResult<()> {
    let server = item.server;
    update_if_current_in(tx, item.node, &item.hash, |m| {
        if !m.holders.contains(&server) {
            m.holders.push(server);
        }
        if m.primary != Some(server) && !m.replicas.contains(&server) {
            m.replicas.push(server);
        }
        while 1 + m.replicas.len() > replication {
            let holders = m.holders.clone();
            let Some(pos) = m
                .replicas
                .iter()
                .position(|r| !live.contains(r) && !holders.contains(r))
            else {
                break;
            };
            m.replicas.remove(pos);
        }
    })
}

impl DirectoryService {
    /// Opens (or initialises, with an empty root) the redb store under `data_dir`.
    pub fn open(data_dir: &Path, config: DirectoryConfig) -> ServiceResult<Self> {
        Self::open_meta(data_dir, &MetaConfig::Redb, config)
    }

    /// Opens (or initialises) the store `meta` names: redb under `data_dir`, or etcd.
    pub fn open_meta(
        data_dir: &Path,
        meta: &MetaConfig,
        config: DirectoryConfig,
    ) -> ServiceResult<Self> {
        let store = match meta {
            MetaConfig::Redb => {
                std::fs::create_dir_all(data_dir)?;
                MetaStore::Redb(crate::meta::redb::RedbStore::open(
                    &data_dir.join("directory.redb"),
                )?)
            }
            MetaConfig::Etcd(c) => MetaStore::Etcd(crate::meta::etcd::EtcdStore::connect(c)?),
        };
        Self::with_store(store, config)
    }

    /// Opens (or initialises, with an empty root) the namespace in `store`.
    pub fn with_store(store: MetaStore, config: DirectoryConfig) -> ServiceResult<Self> {
        let cluster_id = store.write(|tx| {
            // A store a newer dfs wrote may hold what this one would misread or undo: refuse
            // it before touching anything (there is no downgrade).
            let stored = meta_get(tx, FORMAT)?;
            if let Some(f) = stored
                && f > replicas::FORMAT
            {
                return Err(ServiceError::Internal(format!(
                    "{} is format {f}, written by a newer dfs; this dfs-server knows formats \
                     up to {} and does not downgrade a store: run the newer dfs-server",
                    store.describe(),
                    replicas::FORMAT
                )));
            }
            if let Some(id) = meta_get(tx, IMPORTING)? {
                return Err(ServiceError::Internal(format!(
                    "{} holds an unfinished import of cluster {id:016x}: run `dfs-server meta \
                     import` with the same file again to finish it",
                    store.describe()
                )));
            }
            let fresh = meta_get(tx, NEXT_ID)?.is_none();
            if fresh {
                let now = now_ns();
                let root = NodeMeta {
                    id: NodeId::ROOT,
                    parent: NodeId::ROOT,
                    kind: FileKind::Dir,
                    // Everyone may make entries at the top, and remove only their own
                    // (as /tmp); the administrator makes private directories below it.
                    mode: 0o1777,
                    owner: "root".into(),
                    uid: 0,
                    gid: 0,
                    size: 0,
                    version: 0,
                    mtime_ns: now,
                    ctime_ns: now,
                    atime_ns: now,
                    nlink: 2,
                    rdev: 0,
                    committed_ns: now,
                    hash: ContentHash::empty(),
                    primary: None,
                    replicas: vec![],
                    holders: vec![],
                    symlink_target: None,
                    fence: FenceToken(0),
                    recent_uploads: vec![],
                    writeback: None,
                };
                put_node(tx, &root)?;
                meta_put(tx, NEXT_ID, NodeId::ROOT.0 + 1)?;
                replicas::init(tx, config.replication, &root)?;
            }
            let format = meta_get(tx, FORMAT)?.unwrap_or(1);
            if format < FORMAT_LINKS {
                let nodes = count_links(tx)?;
                tracing::info!(
                    from = format,
                    nodes,
                    "directory store upgrade: links counted"
                );
            }
            if format < FORMAT_NAMES {
                let names = index_names(tx)?;
                meta_put(tx, FORMAT, FORMAT_NAMES)?;
                tracing::info!(
                    from = format,
                    to = FORMAT_NAMES,
                    names,
                    "directory store upgrade: names indexed"
                );
            }
            let cluster_id = match meta_get(tx, CLUSTER_ID)? {
                Some(id) => id,
                None => {
                    let id = rand::random::<u64>();
                    meta_put(tx, CLUSTER_ID, id)?;
                    id
                }
            };
            // The root of a cluster from before permissions (0777, nobody's): sticky, as a new
            // one is, so that no user can rename away another's top-level entries.
            let mut root = get_node(tx, NodeId::ROOT)?;
            if root.mode == 0o777 && root.uid == 0 {
                root.mode = 0o1777;
                put_node(tx, &root)?;
            }
            Ok(cluster_id)
        })?;
        replicas::open(&store, config.replication)?;
        // A read view: a registry of any size is never part of a write (etcd compares every
        // key a write read).
        let registry =
            store.read(|tx| Registry::open(tx, config.heartbeat * config.missed_beats))?;
        let store_feed = store.start_feed();
        let svc = DirectoryService {
            store,
            registry,
            config,
            cluster_id,
            capability_key: String::new(),
            https_only: false,
            feed: store_feed,
            ids: std::sync::Mutex::new((0, 0)),
        };
        Ok(svc)
    }

    /// The change feed: every change committed through the store (on etcd, through any
    /// instance on the prefix).
    pub fn feed(&self) -> &std::sync::Arc<feed::Feed> {
        &self.feed
    }

    /// Starts campaigning for the leadership of background work (repair, registry sweeps);
    /// redb always leads.
    pub fn start_election(&self) {
        self.store.start_election(crate::meta::etcd::LEADER_LEASE);
    }

    /// Stops campaigning (tests: an instance that stops renewing its lease, as a killed one).
    pub fn stop_election(&self) {
        self.store.stop_election();
    }

    /// Stops campaigning and hands the leadership over at once (a graceful stop).
    pub fn resign(&self) {
        self.store.resign();
    }

    /// Whether this instance leads background work now.
    pub fn is_leader(&self) -> bool {
        self.store.is_leader()
    }

    /// A node id no instance has used or will use: from this instance's reserved block,
    /// reserving the next one (one durable transaction) when it is used up. Ids a failed
    /// create took are skipped, never reused.
    fn next_node_id(&self) -> ServiceResult<NodeId> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if ids.0 >= ids.1 {
            let start = self.store.write(|tx| {
                let start = meta_get(tx, NEXT_ID)?.unwrap_or(NodeId::ROOT.0 + 1);
                meta_put(tx, NEXT_ID, start.saturating_add(ID_BLOCK))?;
                Ok(start)
            })?;
            *ids = (start, start.saturating_add(ID_BLOCK));
        }
        let id = ids.0;
        ids.0 += 1;
        Ok(NodeId(id))
    }

    /// This cluster's identity (random, made at first start): node ids mean something only
    /// within one cluster, so clients key their caches by it.
    pub fn cluster_id(&self) -> String {
        format!("{:016x}", self.cluster_id)
    }

    /// Durable commits (fsyncs) of the store, writes acknowledged by them, and recoveries
    /// after a failed one.
    pub fn store_counters(&self) -> (u64, u64, u64) {
        self.store.counters()
    }

    /// Metadata transactions run again after a conflict with another writer (etcd).
    pub fn store_conflicts(&self) -> u64 {
        self.store.conflicts()
    }

    /// The configured replication factor.
    pub fn replication(&self) -> u32 {
        self.config.replication
    }

    /// The heartbeat interval servers are told to use.
    pub fn heartbeat_interval(&self) -> Duration {
        self.config.heartbeat
    }

    /// The key capabilities are signed with (the cluster key, which the file servers that
    /// check them hold).
    pub fn with_capability_key(mut self, key: &str) -> Self {
        self.capability_key = key.to_owned();
        self
    }

    /// A directory serving TLS (`on`): it refuses registrations of plain http:// URLs, which
    /// would silently send its clients' tokens and files in clear.
    pub fn https_only(mut self, on: bool) -> Self {
        self.https_only = on;
        self
    }

    /// Whether this directory serves TLS (`https_only`).
    pub fn is_https_only(&self) -> bool {
        self.https_only
    }

    fn check_scheme(&self, what: &str, url: &str) -> ServiceResult<()> {
        if self.https_only && !url.starts_with("https://") {
            return Err(ServiceError::BadRequest(format!(
                "this directory serves TLS only: the {what} at {url} must register an https:// \
                 URL (serve it with --tls-cert and --tls-key)"
            )));
        }
        Ok(())
    }

    /// The capability for `uid` to write new versions of file `meta` (given to its creator).
    pub fn write_capability(&self, meta: &NodeMeta, uid: u32) -> Option<String> {
        (meta.kind == FileKind::File).then(|| {
            crate::capability::issue(
                &self.capability_key,
                meta.id,
                &meta.hash,
                uid,
                W,
                crate::store::now_ms(),
            )
        })
    }

    /// Metadata of a node about to be opened for `want` (`R`, `W` or both) by `who`: refused
    /// (EACCES) unless its permission bits allow it. With read access comes the capability
    /// to download the current version from any file server holding it.
    pub fn get_to_open(
        &self,
        id: NodeId,
        want: u32,
        who: &Identity,
    ) -> ServiceResult<(NodeMeta, Option<String>)> {
        let meta = self.get(id)?;
        let want = if want & common::perm::COMMIT != 0 {
            access::need_write(who, &meta)?;
            W
        } else {
            access::need(who, &meta, want)?;
            want
        };
        let cap = (meta.kind == FileKind::File).then(|| {
            crate::capability::issue(
                &self.capability_key,
                id,
                &meta.hash,
                who.uid,
                want,
                crate::store::now_ms(),
            )
        });
        Ok((meta, cap))
    }

    /// Metadata of one node.
    pub fn get(&self, id: NodeId) -> ServiceResult<NodeMeta> {
        self.store.read(|tx| {
            let v = tx
                .get(NODES, &id.0)?
                .ok_or_else(|| ServiceError::NotFound(format!("node {id}")))?;
            decode(&v)
        })
    }

    /// The node named `name` in directory `parent` (search permission on `parent` needed).
    pub fn lookup(
        &self,
        parent: NodeId,
        name: &ValidName,
        who: &Identity,
    ) -> ServiceResult<NodeMeta> {
        self.store.read(|tx| {
            let pmeta = read_dir(tx, parent)?;
            access::need(who, &pmeta, X)?;
            let id = child_of(tx, parent, name.as_str())?.ok_or_else(|| {
                ServiceError::NotFound(format!("{:?} in node {parent}", name.as_str()))
            })?;
            let v = tx
                .get(NODES, &id.0)?
                .ok_or_else(|| ServiceError::internal("lookup", "dangling entry"))?;
            decode(&v)
        })
    }

    /// The entries of directory `parent`, sorted by name (read permission on it needed).
    pub fn list(&self, parent: NodeId, who: &Identity) -> ServiceResult<Vec<DirEntry>> {
        self.store.read(|tx| {
            let pmeta = read_dir(tx, parent)?;
            access::need(who, &pmeta, R)?;
            let entries = children_of(tx, parent, None)?;
            let ids: Vec<u64> = entries.iter().map(|(_, id)| id.0).collect();
            let metas = tx.get_many(NODES, &ids)?;
            let mut out = Vec::with_capacity(entries.len());
            for ((name, _), meta) in entries.into_iter().zip(metas) {
                let meta = meta.ok_or_else(|| ServiceError::internal("list", "dangling entry"))?;
                out.push(DirEntry {
                    name,
                    meta: decode(&meta)?,
                });
            }
            Ok(out)
        })
    }

    /// Creates a file, directory, symlink or special file (FIFO, socket; devices only by the
    /// administrator). A new file is empty (version 0) and is placed on distinct live servers.
    pub fn create(
        &self,
        parent: NodeId,
        req: &CreateRequest,
        who: &Caller,
    ) -> ServiceResult<NodeMeta> {
        self.create_with_id(parent, req, who, None)
    }

    /// `create`, applied once per request id `rid` (`requests`).
    pub fn create_with_id(
        &self,
        parent: NodeId,
        req: &CreateRequest,
        who: &Caller,
        rid: Option<&RequestId>,
    ) -> ServiceResult<NodeMeta> {
        if req.mode > 0o7777 {
            return Err(ServiceError::BadRequest(format!(
                "mode {:o} has bits beyond 07777",
                req.mode
            )));
        }
        let target = match (req.kind, &req.symlink_target) {
            (FileKind::Symlink, Some(t))
                if !t.is_empty() && t.len() <= SYMLINK_MAX && !t.contains('\0') =>
            {
                Some(t.clone())
            }
            (FileKind::Symlink, Some(t)) if t.len() > SYMLINK_MAX => {
                return Err(ServiceError::NameTooLong(format!(
                    "symlink target is {} bytes, more than {SYMLINK_MAX}",
                    t.len()
                )));
            }
            (FileKind::Symlink, _) => {
                return Err(ServiceError::BadRequest(format!(
                    "symlink target must be 1 to {SYMLINK_MAX} bytes without NUL"
                )));
            }
            (_, Some(_)) => {
                return Err(ServiceError::BadRequest(
                    "only symlinks have a target".into(),
                ));
            }
            (_, None) => None,
        };
        if req.rdev != 0 && !req.kind.is_device() {
            return Err(ServiceError::BadRequest(
                "only device nodes have a device number".into(),
            ));
        }
        let placement = if req.kind == FileKind::File {
            let (roomy, short) = self.registry.live_by_room();
            Some(placement::place_by_room(
                &roomy,
                &short,
                self.config.replication,
                rand::random(),
            )?)
        } else {
            None
        };
        let new_id = self.next_node_id()?;
        self.once(who.id.uid, rid, |tx| {
            let pmeta = dir_node(tx, parent)?;
            access::need(&who.id, &pmeta, X)?;
            // An existing name is EEXIST even where the caller may not create (as Linux).
            if child_of(tx, parent, req.name.as_str())?.is_some() {
                return Err(ServiceError::Exists(format!("{:?}", req.name.as_str())));
            }
            access::need(&who.id, &pmeta, W | X)?;
            access::need_mknod(&who.id, req.kind)?;
            let (uid, gid, mode) = access::new_node(&who.id, &pmeta, req.kind, req.mode);
            let id = new_id;
            let now = now_ns();
            let (primary, replicas) = match &placement {
                Some(p) => (Some(p.primary), p.replicas.clone()),
                None => (None, vec![]),
            };
            let holders = primary
                .into_iter()
                .chain(replicas.iter().copied())
                .collect();
            let meta = NodeMeta {
                id,
                parent,
                kind: req.kind,
                mode,
                owner: who.name.clone(),
                uid,
                gid,
                size: target.as_ref().map_or(0, |t| t.len() as u64),
                version: 0,
                mtime_ns: now,
                ctime_ns: now,
                atime_ns: now,
                nlink: if req.kind == FileKind::Dir { 2 } else { 1 },
                rdev: req.rdev,
                committed_ns: now,
                hash: ContentHash::empty(),
                primary,
                replicas,
                holders,
                symlink_target: target.clone(),
                fence: FenceToken(0),
                recent_uploads: vec![],
                writeback: None,
            };
            put_node(tx, &meta)?;
            replicas::node_changed(tx, None, Some(&meta))?;
            add_name(tx, parent, req.name.as_str(), id)?;
            let subdirs = i64::from(req.kind == FileKind::Dir);
            touch_dir_links(tx, parent, now, subdirs)?;
            Ok(meta)
        })
    }

    /// unlink (`dir == false`: the entry must not be a directory) or rmdir (`dir == true`: it
    /// must be an empty directory). Returns the node with its links left: 0 if it is gone (a
    /// directory, or a file's last name), more if other names of the file remain.
    pub fn remove(
        &self,
        parent: NodeId,
        name: &ValidName,
        dir: bool,
        who: &Identity,
    ) -> ServiceResult<NodeMeta> {
        self.remove_with_id(parent, name, dir, who, None)
    }

    /// `remove`, applied once per request id `rid` (`requests`).
    pub fn remove_with_id(
        &self,
        parent: NodeId,
        name: &ValidName,
        dir: bool,
        who: &Identity,
        rid: Option<&RequestId>,
    ) -> ServiceResult<NodeMeta> {
        self.once(who.uid, rid, |tx| {
            let pmeta = dir_node(tx, parent)?;
            access::need(who, &pmeta, X)?;
            let id = child_of(tx, parent, name.as_str())?.ok_or_else(|| {
                ServiceError::NotFound(format!("{:?} in node {parent}", name.as_str()))
            })?;
            let meta = get_node(tx, id)?;
            access::need_unlink(who, &pmeta, &meta)?;
            match (dir, meta.kind == FileKind::Dir) {
                (true, false) => return Err(ServiceError::NotDir(format!("{:?}", name.as_str()))),
                (false, true) => return Err(ServiceError::IsDir(format!("{:?}", name.as_str()))),
                (true, true) if has_children(tx, id)? => {
                    return Err(ServiceError::NotEmpty(format!("{:?}", name.as_str())));
                }
                _ => {}
            }
            remove_name(tx, parent, name.as_str(), id)?;
            let now = now_ns();
            if meta.kind == FileKind::Dir {
                delete_node(tx, id)?;
                replicas::node_changed(tx, Some(&meta), None)?;
                touch_dir_links(tx, parent, now, -1)?;
                return Ok(NodeMeta { nlink: 0, ..meta });
            }
            let meta = drop_link(tx, meta, parent, now)?;
            touch_dir(tx, parent, now)?;
            Ok(meta)
        })
    }

    /// Atomic rename; replaces an existing target (file over file, empty dir over dir).
    /// Returns the node that was replaced, if any, with its links left (0: it is gone). Link
    /// counts follow: a directory moved to another parent moves its `..` link with it.
    pub fn rename(&self, req: &RenameRequest, who: &Identity) -> ServiceResult<Option<NodeMeta>> {
        self.rename_with_id(req, who, None)
    }

    /// `rename`, applied once per request id `rid` (`requests`).
    pub fn rename_with_id(
        &self,
        req: &RenameRequest,
        who: &Identity,
        rid: Option<&RequestId>,
    ) -> ServiceResult<Option<NodeMeta>> {
        self.once(who.uid, rid, |tx| {
            let from = dir_node(tx, req.parent)?;
            let to = dir_node(tx, req.new_parent)?;
            access::need(who, &from, X)?;
            let id = child_of(tx, req.parent, req.name.as_str())?.ok_or_else(|| {
                ServiceError::NotFound(format!("{:?} in node {}", req.name.as_str(), req.parent))
            })?;
            let mut meta = get_node(tx, id)?;
            access::need_unlink(who, &from, &meta)?;
            access::need(who, &to, W | X)?;
            if meta.kind == FileKind::Dir && req.new_parent != req.parent {
                // Its ".." changes: the moved directory must be writable too (POSIX).
                access::need(who, &meta, W)?;
            }
            if meta.kind == FileKind::Dir {
                // The destination must not be the moved directory or inside it.
                let mut cur = req.new_parent;
                loop {
                    if cur == id {
                        return Err(ServiceError::InvalidMove);
                    }
                    if cur == NodeId::ROOT {
                        break;
                    }
                    cur = get_node(tx, cur)?.parent;
                }
            }
            let replaced = match child_of(tx, req.new_parent, req.new_name.as_str())? {
                // RENAME_NOREPLACE: any existing name is EEXIST, even one of the same node
                // (as Linux checks before it finds the two names are one file).
                Some(_) if req.no_replace => {
                    return Err(ServiceError::Exists(format!("{:?}", req.new_name.as_str())));
                }
                Some(old) if old == id => return Ok(None),
                Some(old) => {
                    let old_meta = get_node(tx, old)?;
                    access::need_unlink(who, &to, &old_meta)?;
                    match (meta.kind == FileKind::Dir, old_meta.kind == FileKind::Dir) {
                        (true, false) => {
                            return Err(ServiceError::NotDir(format!(
                                "{:?}",
                                req.new_name.as_str()
                            )));
                        }
                        (false, true) => {
                            return Err(ServiceError::IsDir(format!(
                                "{:?}",
                                req.new_name.as_str()
                            )));
                        }
                        (true, true) if has_children(tx, old)? => {
                            return Err(ServiceError::NotEmpty(format!(
                                "{:?}",
                                req.new_name.as_str()
                            )));
                        }
                        _ => {}
                    }
                    Some(old_meta)
                }
                None => None,
            };
            if let Some(old) = &replaced {
                remove_name(tx, req.new_parent, req.new_name.as_str(), old.id)?;
            }
            remove_name(tx, req.parent, req.name.as_str(), id)?;
            add_name(tx, req.new_parent, req.new_name.as_str(), id)?;
            let now = now_ns();
            // Subdirectories each parent gains (its `..` links to it).
            let mut from_links = 0i64;
            let mut to_links = 0i64;
            let replaced = match replaced {
                Some(old) if old.kind == FileKind::Dir => {
                    delete_node(tx, old.id)?;
                    replicas::node_changed(tx, Some(&old), None)?;
                    to_links -= 1;
                    Some(NodeMeta { nlink: 0, ..old })
                }
                Some(old) => Some(drop_link(tx, old, req.new_parent, now)?),
                None => None,
            };
            if meta.kind == FileKind::Dir {
                from_links -= 1;
                to_links += 1;
            }
            meta.parent = req.new_parent;
            meta.ctime_ns = now;
            put_node(tx, &meta)?;
            if req.new_parent == req.parent {
                touch_dir_links(tx, req.parent, now, from_links + to_links)?;
            } else {
                touch_dir_links(tx, req.parent, now, from_links)?;
                touch_dir_links(tx, req.new_parent, now, to_links)?;
            }
            Ok(replaced)
        })
    }

    /// One more name for file `req.node` (`link(2)`), reached through its existing name
    /// `req.name` in `req.parent`: search permission on that parent (as on every directory of
    /// the path), write and search permission on the new parent, EEXIST for a name that
    /// exists, EPERM for a directory. Returns the node with its new link count.
    pub fn link(&self, req: &LinkRequest, who: &Identity) -> ServiceResult<NodeMeta> {
        self.link_with_id(req, who, None)
    }

    /// `link`, applied once per request id `rid` (`requests`).
    pub fn link_with_id(
        &self,
        req: &LinkRequest,
        who: &Identity,
        rid: Option<&RequestId>,
    ) -> ServiceResult<NodeMeta> {
        self.once(who.uid, rid, |tx| {
            let from = dir_node(tx, req.parent)?;
            access::need(who, &from, X)?;
            if child_of(tx, req.parent, req.name.as_str())? != Some(req.node) {
                return Err(ServiceError::NotFound(format!(
                    "{:?} in node {} is not node {}",
                    req.name.as_str(),
                    req.parent,
                    req.node
                )));
            }
            let to = dir_node(tx, req.new_parent)?;
            access::need(who, &to, X)?;
            let mut meta = get_node(tx, req.node)?;
            if child_of(tx, req.new_parent, req.new_name.as_str())?.is_some() {
                return Err(ServiceError::Exists(format!("{:?}", req.new_name.as_str())));
            }
            access::need(who, &to, W | X)?;
            access::need_linkable(&meta)?;
            meta.nlink = meta.nlink.checked_add(1).ok_or_else(|| {
                ServiceError::TooManyLinks(format!("node {} has too many links", meta.id))
            })?;
            let now = now_ns();
            meta.ctime_ns = now;
            put_node(tx, &meta)?;
            add_name(tx, req.new_parent, req.new_name.as_str(), meta.id)?;
            touch_dir(tx, req.new_parent, now)?;
            Ok(meta)
        })
    }

    /// Changes mode, owner, group and/or times, as far as `who` may (`access::apply_setattr`).
    pub fn setattr(
        &self,
        id: NodeId,
        req: &SetAttrRequest,
        who: &Identity,
    ) -> ServiceResult<NodeMeta> {
        self.setattr_with_id(id, req, who, None)
    }

    /// `setattr`, applied once per request id `rid` (`requests`).
    pub fn setattr_with_id(
        &self,
        id: NodeId,
        req: &SetAttrRequest,
        who: &Identity,
        rid: Option<&RequestId>,
    ) -> ServiceResult<NodeMeta> {
        if req.mode.is_some_and(|m| m > 0o7777) {
            return Err(ServiceError::BadRequest(
                "mode has bits beyond 07777".into(),
            ));
        }
        self.once(who.uid, rid, |tx| {
            let mut meta = get_node(tx, id)?;
            let now = now_ns();
            access::apply_setattr(who, &mut meta, req, now)?;
            meta.ctime_ns = now;
            put_node(tx, &meta)?;
            Ok(meta)
        })
    }

    /// Runs namespace change `op` in one durable transaction, once per request id (see
    /// `requests`): a remembered answer is returned without running `op`.
    fn once<T: serde::Serialize + serde::de::DeserializeOwned + Send>(
        &self,
        uid: u32,
        rid: Option<&RequestId>,
        mut op: impl FnMut(&Txn) -> ServiceResult<T> + Send,
    ) -> ServiceResult<T> {
        let Some(rid) = rid else {
            return self.store.write(op);
        };
        let key = requests::key(uid, rid);
        let first = self.store.write(|tx| {
            let now = crate::store::now_ms();
            if let Some(answer) = requests::recall(tx, &key, now)? {
                return Ok(answer);
            }
            let value = op(tx)?;
            requests::remember(tx, &key, Ok(&value), now)?;
            Ok(Ok(value))
        });
        requests::sweep(&self.store);
        let refusal = match first {
            Ok(answer) => return answer,
            Err(e) if requests::is_refusal(&e) => e,
            Err(e) => return Err(e),
        };
        // The refusal aborted the operation's transaction: remember it in one of its own,
        // unless an answer was remembered meanwhile (a concurrent retry), which then stands.
        let body = refusal.to_body();
        let second = self.store.write(|tx| {
            let now = crate::store::now_ms();
            if let Some(answer) = requests::recall::<T>(tx, &key, now)? {
                return Ok(Some(answer));
            }
            requests::remember::<T>(tx, &key, Err(&body), now)?;
            Ok(None)
        });
        match second {
            Ok(Some(answer)) => answer,
            Ok(None) => Err(refusal),
            Err(e) => {
                tracing::warn!(error = %e, "remembering a refusal failed; a retry runs again");
                Err(refusal)
            }
        }
    }

    /// Records a new version written by a primary. Applies each upload id once; refuses a fence
    /// older than the newest committed one.
    pub fn commit(&self, id: NodeId, req: &CommitRequest) -> ServiceResult<CommitResponse> {
        let r = self.store.write(|tx| commit_in(tx, id, req)?);
        if matches!(r, Err(ServiceError::Conflict(_))) {
            self.end_intent(id, &req.upload_id);
        }
        crate::faults::commit_answer_lost()?;
        r
    }

    /// A push refused as a conflict will not come: readers waiting for the write-back intent it
    /// announced stop waiting (lazily, like the intent itself).
    fn end_intent(&self, id: NodeId, upload_id: &common::UploadId) {
        let r = self.store.write_lazy(|tx| {
            let mut meta = get_node(tx, id)?;
            if meta
                .writeback
                .as_ref()
                .is_some_and(|w| &w.upload_id == upload_id)
            {
                meta.writeback = None;
                put_node_quiet(tx, &meta)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!(%id, error = %e, "ending a refused push's write-back intent failed; it lapses");
        }
    }

    /// Several commits (a batched upload): each is checked and refused on its own, exactly as
    /// `commit` would. On redb in one durable transaction; on etcd in chunks, each durable on
    /// its own: a chunk that committed keeps its answers even if a later one fails, and every
    /// item of a chunk that failed (the store unavailable, conflicts) is refused on its own as
    /// `Unavailable`, which its client retries.
    pub fn commit_batch(
        &self,
        req: &common::api::CommitBatchRequest,
    ) -> ServiceResult<Vec<ServiceResult<CommitResponse>>> {
        if req.items.len() > common::api::MAX_BATCH_ITEMS {
            return Err(ServiceError::TooLarge(format!(
                "a batch commits at most {} versions",
                common::api::MAX_BATCH_ITEMS
            )));
        }
        // One transaction on redb. On etcd a commit reads and writes a few keys of its own
        // (its node, its repair queue entry) besides the shared counters' shards: a batch
        // goes in chunks that stay within `--max-txn-ops`, each durable before the next. The
        // items of a chunk that failed, and of the ones after it (not tried), are refused one
        // by one as unavailable; the answers of the chunks that committed stand (their
        // superseded versions are dropped by the primary now, not missed by a retry that
        // finds the upload id already applied).
        let per = match &self.store {
            MetaStore::Redb(_) => req.items.len().max(1),
            MetaStore::Etcd(_) => COMMITS_PER_ETCD_TXN,
        };
        let mut results: Vec<ServiceResult<CommitResponse>> = Vec::with_capacity(req.items.len());
        let mut failed: Option<String> = None;
        for part in req.items.chunks(per) {
            if let Some(why) = &failed {
                results.extend(part.iter().map(|_| {
                    Err(ServiceError::Unavailable(format!(
                        "not committed: an earlier part of the batch failed ({why}); retry"
                    )))
                }));
                continue;
            }
            match self.commit_part(part) {
                Ok(done) => results.extend(done),
                Err(e) => {
                    tracing::warn!(error = %e, items = part.len(), "a part of a batch commit failed; its items are refused as unavailable");
                    let why = e.to_string();
                    results.extend(part.iter().map(|_| {
                        Err(ServiceError::Unavailable(format!(
                            "not committed ({why}); retry"
                        )))
                    }));
                    failed = Some(why);
                }
            }
        }
        for (i, r) in req.items.iter().zip(&results) {
            if matches!(r, Err(ServiceError::Conflict(_))) {
                self.end_intent(i.node, &i.commit.upload_id);
            }
        }
        crate::faults::commit_answer_lost()?;
        Ok(results)
    }

    /// One transaction of a batch commit (`commit_batch`): the per-item answers.
    fn commit_part(
        &self,
        part: &[common::api::CommitBatchItem],
    ) -> ServiceResult<Vec<ServiceResult<CommitResponse>>> {
        crate::faults::commit_part_fails(part.iter().map(|i| i.commit.upload_id.as_str()))?;
        self.store.write(|tx| {
            part.iter()
                .map(|i| commit_in(tx, i.node, &i.commit))
                .collect()
        })
    }

    /// Records that a client will push `id` in the background (write-back), so that other
    /// clients' opens wait for it. Not waited onto disk: after a directory crash readers just
    /// stop waiting, as they do when the intent lapses.
    pub fn set_intent(
        &self,
        id: NodeId,
        req: &IntentRequest,
        who: &Identity,
    ) -> ServiceResult<NodeMeta> {
        let until_ms = crate::store::now_ms() + req.lease_ms.min(common::api::MAX_INTENT_MS);
        self.store.write_lazy(|tx| {
            let mut meta = get_node(tx, id)?;
            if meta.kind != FileKind::File {
                return Err(ServiceError::IsDir(format!("node {id}")));
            }
            access::need_write(who, &meta)?;
            meta.writeback = Some(common::WritebackIntent {
                upload_id: req.upload_id.clone(),
                until_ms,
            });
            put_node_quiet(tx, &meta)?;
            Ok(meta)
        })
    }

    /// Applies `f` to the metadata of file `id` if its content is still `hash` (a concurrent
    /// commit wins over a repair step planned for the older version).
    fn update_if_current(
        &self,
        id: NodeId,
        hash: &ContentHash,
        f: impl Fn(&mut NodeMeta) + Sync,
    ) -> ServiceResult<()> {
        self.store
            .write(|tx| update_if_current_in(tx, id, hash, &f))
    }

    /// Failover: `to`, a holder of the current version, becomes the primary; the old primary
    /// stays a member (it catches up if it returns).
    pub fn promote(&self, id: NodeId, hash: &ContentHash, to: ServerId) -> ServiceResult<()> {
        self.update_if_current(id, hash, |m| {
            if !m.holders.contains(&to) {
                return;
            }
            let old = m.primary.replace(to);
            m.replicas.retain(|r| *r != to);
            if let Some(old) = old {
                m.replicas.push(old);
            }
        })
    }

    /// Records that `server` now holds the current version; it joins the placement if it was
    /// not a member, replacing dead members that hold nothing current.
    pub fn add_holder(
        &self,
        id: NodeId,
        hash: &ContentHash,
        server: ServerId,
    ) -> ServiceResult<()> {
        let item = common::api::HolderItem {
            node: id,
            hash: hash.clone(),
            server,
        };
        let live = self.registry.live();
        let replication = usize::try_from(self.config.replication).unwrap_or(usize::MAX);
        self.store
            .write_lazy(|tx| add_holder_in(tx, &item, &live, replication))
    }

    /// `add_holder` for several copies at once, in one transaction not waited onto the disk
    /// (a record whose loss in a crash the repair loop makes good): the late replicas of a
    /// batched upload. A copy of a version that is no longer current is ignored.
    pub fn add_holders(&self, items: &[common::api::HolderItem]) -> ServiceResult<()> {
        if items.len() > common::api::MAX_BATCH_ITEMS * 16 {
            return Err(ServiceError::TooLarge(
                "too many holders in one request".into(),
            ));
        }
        let live = self.registry.live();
        let replication = usize::try_from(self.config.replication).unwrap_or(usize::MAX);
        // Each copy is recorded alone (a lost one is found again by the repair loop), so
        // they need not share one transaction: 24 files per transaction (each up to four
        // writes with the holdings index and the repair queue) stays within etcd's
        // `--max-txn-ops` (128 by default).
        for chunk in items.chunks(HOLDERS_PER_TXN) {
            self.store.write_lazy(|tx| {
                for item in chunk {
                    match add_holder_in(tx, item, &live, replication) {
                        // Deleted meanwhile: nothing to record.
                        Ok(()) | Err(ServiceError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Records that `server` no longer holds `hash` of `id` (a scrub found it corrupt).
    pub fn drop_holder(
        &self,
        id: NodeId,
        hash: &ContentHash,
        server: ServerId,
    ) -> ServiceResult<()> {
        self.update_if_current(id, hash, |m| m.holders.retain(|h| *h != server))
    }

    /// Node count and total bytes (from the counters kept with every change).
    pub fn statfs(&self) -> ServiceResult<StatFs> {
        let (nodes, bytes) = self.store.read(counters::totals)?;
        // Every file takes `copies` bytes of disk per byte: the size and room one copy has.
        let (total, free, reporting) = self.registry.live_space();
        let copies = u64::from(self.config.replication)
            .min(reporting as u64)
            .max(1);
        Ok(StatFs {
            nodes,
            bytes,
            total_bytes: total / copies,
            free_bytes: free / copies,
        })
    }

    /// Per-server (primaries, replicas) counts, from the counters kept with every change.
    pub fn placement_counts(&self) -> std::collections::HashMap<ServerId, (u64, u64)> {
        let counts = self.store.read(replicas::placement_counts);
        counts.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the placement counters failed");
            Default::default()
        })
    }

    /// Registers a file server (persisted) and marks it alive.
    pub fn register_server(
        &self,
        req: &common::api::RegisterServerRequest,
    ) -> ServiceResult<common::ServerId> {
        self.check_scheme("file server", &req.url)?;
        if let Some(theirs) = &req.cluster_id
            && *theirs != self.cluster_id()
        {
            return Err(ServiceError::Forbidden(format!(
                "the server at {} belongs to cluster {theirs}; this directory is cluster {}",
                req.url,
                self.cluster_id()
            )));
        }
        let (id, rec) = self.store.write(|tx| self.registry.register(tx, req))?;
        self.registry.admit(id, rec)?;
        Ok(id)
    }

    /// A heartbeat of file server `id`: alive here at once, and, when several instances share
    /// the store (etcd), recorded there for the others (one blind put per beat).
    pub fn heartbeat(&self, id: ServerId, space: Option<common::api::Space>) -> ServiceResult<()> {
        self.registry.heartbeat(id, space)?;
        if self.store.is_shared() {
            self.store
                .write_lazy(|tx| registry::record_beat(tx, id, space))?;
        }
        Ok(())
    }

    /// Brings the registry up to date with what other instances recorded (etcd; nothing on
    /// redb, where this is the only instance).
    pub fn sync_registry(&self) -> ServiceResult<()> {
        if self.store.is_shared() {
            let now = tokio::time::Instant::now();
            self.store.read(|tx| self.registry.sync(tx, now))?;
        }
        Ok(())
    }

    /// Whether the registry's view of the shared store is a heartbeat interval old or more
    /// (never on redb, where there is nothing to sync).
    pub fn registry_sync_due(&self) -> bool {
        self.store.is_shared() && !self.registry.synced_within(self.heartbeat_interval())
    }

    /// Records the URL of the lock or auth service (persisted).
    pub fn register_service(&self, req: &common::api::RegisterServiceRequest) -> ServiceResult<()> {
        self.check_scheme(&format!("{:?} service", req.kind).to_lowercase(), &req.url)?;
        let stale = self.registry.stale_lock_rows(&req.url);
        self.store
            .write(|tx| self.registry.register_service(tx, req, &stale))?;
        self.registry.admit_service(req)
    }
}

#[cfg(test)]
mod lock_map_tests;
#[cfg(test)]
mod multi_tests;
#[cfg(test)]
mod tests;
