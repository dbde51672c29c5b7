//! `CacheDir`: whole-file copies by node id, plus a persisted index (redb) saying which version
//! each copy is and whether it holds local changes not yet on the servers (dirty). A dirty copy
//! is never replaced or deleted until the servers have it.
//!
//! Three ways to record an entry, by what its loss would cost:
//! - `put`: durable (one fsync) — the "open for writing" mark of a copy that holds data;
//! - `record`: survives a crash of the dfs process without an fsync — a pending upload. It is
//!   applied to the index without waiting for the disk and appended to `journal.log` with one
//!   `write` (the kernel keeps it when the process dies); the next open replays the journal.
//!   A power loss can lose it, as it can lose any write never fsynced;
//! - `put_lazy`: may be lost in any crash — records whose loss only costs a re-download or a
//!   re-sent upload (applied once, by its upload id).
//!
//! Every record carries a sequence number, so a journal line never overrides a newer record.

use std::path::{Path, PathBuf};

use common::{ContentHash, NodeId, UploadId};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");

/// One cached file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// Server version the copy was downloaded as (or last pushed as).
    pub version: u64,
    /// Hash of that server version.
    pub hash: ContentHash,
    /// Local changes not yet pushed: the upload id to push them with (stable across retries).
    pub pending: Option<Pending>,
    /// Open for writing: the copy may differ from `hash`/`pending` until the handles close.
    /// Still set after a crash, which tells the next start to check the copy.
    #[serde(default)]
    pub writing: bool,
    /// Order of this record among all records of the cache (set when it is stored).
    #[serde(default)]
    pub seq: u64,
}

impl CacheEntry {
    /// An entry for a copy of no known server version (nothing cached yet).
    pub fn unknown() -> Self {
        CacheEntry {
            version: 0,
            hash: ContentHash::empty(),
            pending: None,
            writing: false,
            seq: 0,
        }
    }

    /// A copy about to be replaced or emptied in place, for a change based on `version`: it
    /// names no content (so nothing takes it for a version) and is marked as being written
    /// (so `recover` looks at it after a crash).
    pub fn being_replaced(version: u64) -> Self {
        CacheEntry {
            writing: true,
            version,
            ..CacheEntry::unknown()
        }
    }

    /// A copy equal to the server version `meta`.
    pub fn clean(meta: &common::NodeMeta) -> Self {
        CacheEntry {
            version: meta.version,
            hash: meta.hash.clone(),
            pending: None,
            writing: false,
            seq: 0,
        }
    }
}

/// One line of `journal.log`.
#[derive(Serialize, Deserialize)]
struct JournalLine {
    node: u64,
    entry: CacheEntry,
}

const JOURNAL_CHECKPOINT_BYTES: u64 = 1 << 20;

/// A pending upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Idempotency key of the upload.
    pub upload_id: UploadId,
    /// Hash of the content to push.
    pub hash: ContentHash,
    /// Its size.
    pub size: u64,
    /// Hashes of earlier pending contents of this copy that this one replaced (newest last, a
    /// few at most). Any of them may have reached the servers with its answer lost: a newer
    /// server version with one of these hashes is this copy's own past, not a conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier: Vec<ContentHash>,
}

/// How many earlier pending hashes a pending record remembers.
pub const EARLIER_PENDING: usize = 8;

/// Errors of the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Local I/O.
    #[error("cache I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The index.
    #[error("cache index: {0}")]
    Index(String),
}

fn index_err(e: impl std::fmt::Display) -> CacheError {
    CacheError::Index(e.to_string())
}

/// The cache directory of one server.
pub struct CacheDir {
    root: PathBuf,
    db: Database,
    journal: std::sync::Mutex<Journal>,
    next_seq: std::sync::atomic::AtomicU64,
    /// The nodes whose entry has a pending upload, kept with the index, so that "is it
    /// pending?" and "what is pending?" never scan the index. Held only briefly: readers
    /// (every getattr) never wait for the disk.
    pending: std::sync::Mutex<std::collections::BTreeSet<NodeId>>,
    /// Held across an index write and the matching change of `pending`, so that the set
    /// changes in the same order as the index.
    writes: std::sync::Mutex<()>,
    /// The copies in `files/`, kept as they change, so that usage and eviction never list
    /// the directory (issue 10).
    copies: std::sync::Mutex<Copies>,
}

/// Copies of files: each one's size as last seen (at its last index write or open) and last
/// use, ordered by use. Listed from `files/` once at open, then kept by the index writes,
/// opens and removals.
#[derive(Default)]
struct Copies {
    by_node: std::collections::HashMap<NodeId, (u64, u64)>,
    by_use: std::collections::BTreeSet<(u64, NodeId)>,
    bytes: u64,
}

impl Copies {
    /// Notes the copy of `node` at `size` bytes, used at `used` (`None`: when it was last
    /// noted, or now if never).
    fn set(&mut self, node: NodeId, size: u64, used: Option<u64>) {
        let before = self.by_node.get(&node).copied();
        let used = used.or(before.map(|b| b.1)).unwrap_or_else(now_ns);
        if let Some((old_size, old_used)) = before {
            self.bytes = self.bytes.saturating_sub(old_size);
            self.by_use.remove(&(old_used, node));
        }
        self.by_node.insert(node, (size, used));
        self.by_use.insert((used, node));
        self.bytes = self.bytes.saturating_add(size);
    }

    fn forget(&mut self, node: NodeId) {
        if let Some((size, used)) = self.by_node.remove(&node) {
            self.bytes = self.bytes.saturating_sub(size);
            self.by_use.remove(&(used, node));
        }
    }
}

/// Nanoseconds since the epoch (the order copies were used in).
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A place in the order copies were used in: eviction's cursor.
pub type UseKey = (u64, NodeId);

struct Journal {
    file: std::fs::File,
    bytes: u64,
}

impl CacheDir {
    /// Opens (creating) the cache at `root`. Fails if another mount uses it.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        std::fs::create_dir_all(root.join("files"))?;
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        let db = Database::create(root.join("index.redb")).map_err(|e| {
            CacheError::Index(format!(
                "{e} (is another dfs mount using {}?)",
                root.display()
            ))
        })?;
        let tx = db.begin_write().map_err(index_err)?;
        tx.open_table(ENTRIES).map_err(index_err)?;
        tx.commit().map_err(index_err)?;
        let journal_path = root.join("journal.log");
        let max_seq = replay_journal(&db, &journal_path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)?;
        file.set_len(0)?;
        let cache = CacheDir {
            root: root.to_path_buf(),
            db,
            journal: std::sync::Mutex::new(Journal { file, bytes: 0 }),
            next_seq: std::sync::atomic::AtomicU64::new(max_seq + 1),
            pending: Default::default(),
            writes: Default::default(),
            copies: Default::default(),
        };
        {
            // The one listing of the copies: at open.
            let mut copies = cache.copies_mut();
            for e in std::fs::read_dir(root.join("files"))?.flatten() {
                let Some(node) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                let Ok(m) = e.metadata() else { continue };
                let used = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                copies.set(NodeId(node), m.len(), Some(used));
            }
        }
        let pending = cache
            .entries()?
            .into_iter()
            .filter(|(_, e)| e.pending.is_some())
            .map(|(n, _)| n)
            .collect();
        *cache.pending_set() = pending;
        Ok(cache)
    }

    fn copies_mut(&self) -> std::sync::MutexGuard<'_, Copies> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes the copy of `node` as it is on disk now (its size; gone: forgotten), and, with
    /// `used`, that it was used now.
    fn note_copy(&self, node: NodeId, used: bool) {
        let now = used.then(now_ns);
        match std::fs::metadata(self.path(node)) {
            Ok(m) => self.copies_mut().set(node, m.len(), now),
            Err(_) => self.copies_mut().forget(node),
        }
    }

    /// An open of `node`: its copy is the most recently used (the order eviction follows).
    pub fn touch(&self, node: NodeId) {
        self.note_copy(node, true);
    }

    /// Up to `n` copies (node, size as last seen), least recently used first, after `after`.
    pub fn least_used(&self, after: Option<UseKey>, n: usize) -> Vec<(NodeId, u64, UseKey)> {
        use std::ops::Bound;
        let copies = self.copies_mut();
        let start = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        copies
            .by_use
            .range((start, Bound::Unbounded))
            .take(n)
            .map(|&(used, node)| {
                let size = copies.by_node.get(&node).map_or(0, |c| c.0);
                (node, size, (used, node))
            })
            .collect()
    }

    fn pending_set(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<NodeId>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seq(&self) -> u64 {
        self.next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores `entry` with the next sequence number, taken inside the write transaction so
    /// that numbers follow commit order (redb runs one write transaction at a time). Returns
    /// the entry as stored.
    fn insert(
        &self,
        node: NodeId,
        entry: &CacheEntry,
        durability: redb::Durability,
    ) -> Result<CacheEntry, CacheError> {
        let _writing = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = self.db.begin_write().map_err(index_err)?;
        let mut entry = entry.clone();
        entry.seq = self.seq();
        let data = serde_json::to_vec(&entry).map_err(index_err)?;
        tx.set_durability(durability).map_err(index_err)?;
        tx.open_table(ENTRIES)
            .map_err(index_err)?
            .insert(node.0, data.as_slice())
            .map_err(index_err)?;
        tx.commit().map_err(index_err)?;
        {
            let mut pending = self.pending_set();
            if entry.pending.is_some() {
                pending.insert(node);
            } else {
                pending.remove(&node);
            }
        }
        self.note_copy(node, false);
        Ok(entry)
    }

    /// Records `entry` so that it survives a crash of this process, without an fsync (see the
    /// module docs): a pending upload.
    pub fn record(&self, node: NodeId, entry: &CacheEntry) -> Result<(), CacheError> {
        use std::io::Write;
        let mut journal = self.journal.lock().unwrap_or_else(|p| p.into_inner());
        let entry = self.insert(node, entry, redb::Durability::None)?;
        let mut line = serde_json::to_vec(&JournalLine {
            node: node.0,
            entry,
        })
        .map_err(index_err)?;
        line.push(b'\n');
        journal.file.write_all(&line)?;
        journal.bytes += line.len() as u64;
        if journal.bytes > JOURNAL_CHECKPOINT_BYTES {
            // Everything the journal holds is in the index: make the index durable, then start
            // the journal afresh (sequence numbers keep an old line from winning if the
            // truncation is lost).
            let tx = self.db.begin_write().map_err(index_err)?;
            tx.commit().map_err(index_err)?;
            journal.file.set_len(0)?;
            journal.bytes = 0;
        }
        Ok(())
    }

    /// Binds the cache to the cluster `id` on first use; fails if it belongs to another one.
    pub fn claim(&self, id: &str) -> Result<(), CacheError> {
        let path = self.root.join("cluster_id");
        match std::fs::read_to_string(&path) {
            Ok(existing) if existing.trim() == id || id.is_empty() => Ok(()),
            // Empty: a claim interrupted by a crash.
            Ok(existing) if existing.trim().is_empty() => self.write_claim(&path, id),
            Ok(existing) => Err(CacheError::Index(format!(
                "{} holds files of another cluster ({}), not of this one ({id}); use another --cache-dir",
                self.root.display(),
                existing.trim()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.write_claim(&path, id),
            Err(e) => Err(e.into()),
        }
    }

    fn write_claim(&self, path: &Path, id: &str) -> Result<(), CacheError> {
        dfs_server::store::write_durable(path, id.as_bytes(), 0o644).map_err(index_err)
    }

    /// Where the copy of `node` lives.
    pub fn path(&self, node: NodeId) -> PathBuf {
        self.root.join("files").join(node.0.to_string())
    }

    /// A fresh temp path inside the cache (same file system, for rename).
    pub fn tmp_path(&self) -> PathBuf {
        self.root
            .join("tmp")
            .join(format!("{}.part", hex::encode(rand::random::<[u8; 12]>())))
    }

    /// The index entry of `node`.
    pub fn get(&self, node: NodeId) -> Result<Option<CacheEntry>, CacheError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let t = tx.open_table(ENTRIES).map_err(index_err)?;
        let Some(v) = t.get(node.0).map_err(index_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(v.value())
            .map(Some)
            .map_err(index_err)
    }

    /// Records `entry` durably.
    pub fn put(&self, node: NodeId, entry: &CacheEntry) -> Result<(), CacheError> {
        self.insert(node, entry, redb::Durability::Immediate)
            .map(drop)
    }

    /// Records `entry` without waiting for the disk: for records whose loss in a crash is
    /// harmless (the copy is then fetched again, or a pending upload re-sent with its id).
    pub fn put_lazy(&self, node: NodeId, entry: &CacheEntry) -> Result<(), CacheError> {
        self.insert(node, entry, redb::Durability::None).map(drop)
    }

    /// Forgets `node` and deletes its copy (the record may come back after a crash; it then
    /// names a file that no longer exists, which the client handles as "not cached").
    pub fn remove(&self, node: NodeId) -> Result<(), CacheError> {
        let writing = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut tx = self.db.begin_write().map_err(index_err)?;
        tx.set_durability(redb::Durability::None)
            .map_err(index_err)?;
        tx.open_table(ENTRIES)
            .map_err(index_err)?
            .remove(node.0)
            .map_err(index_err)?;
        tx.commit().map_err(index_err)?;
        self.pending_set().remove(&node);
        self.copies_mut().forget(node);
        drop(writing);
        match std::fs::remove_file(self.path(node)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every entry with a pending upload.
    pub fn pending(&self) -> Result<Vec<(NodeId, CacheEntry)>, CacheError> {
        let mut out = Vec::new();
        for node in self.pending_nodes() {
            if let Some(e) = self.get(node)?.filter(|e| e.pending.is_some()) {
                out.push((node, e));
            }
        }
        Ok(out)
    }

    /// The nodes with a pending upload, without reading the index.
    pub fn pending_nodes(&self) -> Vec<NodeId> {
        self.pending_set().iter().copied().collect()
    }

    /// Whether `node` has a pending upload, without reading the index.
    pub fn is_pending(&self, node: NodeId) -> bool {
        self.pending_set().contains(&node)
    }

    /// Every entry.
    pub fn entries(&self) -> Result<Vec<(NodeId, CacheEntry)>, CacheError> {
        let tx = self.db.begin_read().map_err(index_err)?;
        let t = tx.open_table(ENTRIES).map_err(index_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(index_err)? {
            let (k, v) = row.map_err(index_err)?;
            let e: CacheEntry = serde_json::from_slice(v.value()).map_err(index_err)?;
            out.push((NodeId(k.value()), e));
        }
        Ok(out)
    }

    /// The root directory of this cache.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// (files cached, bytes cached), as last seen: from the index of copies, never a listing
    /// (a copy being written counts at its size when last recorded or opened).
    pub fn usage(&self) -> Result<(u64, u64), CacheError> {
        let copies = self.copies_mut();
        Ok((copies.by_node.len() as u64, copies.bytes))
    }
}

/// Applies the journal lines newer than their index entries, durably. Returns the highest
/// sequence number seen. A torn last line (power loss mid-write) is ignored.
fn replay_journal(db: &Database, path: &Path) -> Result<u64, CacheError> {
    let mut max_seq = 0;
    {
        let tx = db.begin_read().map_err(index_err)?;
        let t = tx.open_table(ENTRIES).map_err(index_err)?;
        for row in t.iter().map_err(index_err)? {
            let (_, v) = row.map_err(index_err)?;
            if let Ok(e) = serde_json::from_slice::<CacheEntry>(v.value()) {
                max_seq = max_seq.max(e.seq);
            }
        }
    }
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(max_seq),
        Err(e) => return Err(e.into()),
    };
    let tx = db.begin_write().map_err(index_err)?;
    let mut replayed = 0;
    {
        let mut t = tx.open_table(ENTRIES).map_err(index_err)?;
        for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(j) = serde_json::from_slice::<JournalLine>(line) else {
                tracing::warn!("ignoring a torn line at the end of the cache journal");
                continue;
            };
            let current = t
                .get(j.node)
                .map_err(index_err)?
                .and_then(|v| serde_json::from_slice::<CacheEntry>(v.value()).ok())
                .map_or(0, |e| e.seq);
            max_seq = max_seq.max(j.entry.seq);
            if j.entry.seq > current {
                let data = serde_json::to_vec(&j.entry).map_err(index_err)?;
                t.insert(j.node, data.as_slice()).map_err(index_err)?;
                replayed += 1;
            }
        }
    }
    tx.commit().map_err(index_err)?;
    if replayed > 0 {
        tracing::info!(replayed, "pending uploads recovered from the cache journal");
    }
    Ok(max_seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_and_the_use_order_are_kept_without_listing_the_copies() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = CacheDir::open(dir.path()).expect("open");
            for (n, len) in [(1u64, 10usize), (2, 20), (3, 30)] {
                std::fs::write(c.path(NodeId(n)), vec![0u8; len]).expect("copy");
                c.put_lazy(NodeId(n), &CacheEntry::unknown())
                    .expect("index");
            }
            assert_eq!(c.usage().expect("usage"), (3, 60));
            // Opened again: the most recently used; a copy grown and recorded counts its size.
            c.touch(NodeId(1));
            std::fs::write(c.path(NodeId(2)), vec![0u8; 25]).expect("grow");
            c.put_lazy(NodeId(2), &CacheEntry::unknown())
                .expect("index");
            assert_eq!(c.usage().expect("usage"), (3, 65));
            let order: Vec<NodeId> = c.least_used(None, 10).into_iter().map(|e| e.0).collect();
            assert_eq!(order, vec![NodeId(2), NodeId(3), NodeId(1)]);
            // Pages follow on from a cursor.
            let first = c.least_used(None, 1);
            let rest: Vec<NodeId> = c
                .least_used(Some(first[0].2), 10)
                .into_iter()
                .map(|e| e.0)
                .collect();
            assert_eq!(rest, vec![NodeId(3), NodeId(1)]);
            c.remove(NodeId(3)).expect("remove");
            assert_eq!(c.usage().expect("usage"), (2, 35));
        }
        // Reopened: listed once from the copies on disk.
        let c = CacheDir::open(dir.path()).expect("reopen");
        assert_eq!(c.usage().expect("usage"), (2, 35));
    }

    #[test]
    fn regression_a_cache_of_another_cluster_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = CacheDir::open(dir.path()).expect("open");
        c.claim("aaaa").expect("first claim binds");
        c.claim("aaaa").expect("same cluster");
        assert!(
            c.claim("bbbb").is_err(),
            "node ids of another cluster must never meet this cache"
        );
    }

    #[test]
    fn index_survives_reopen_and_lists_pending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pending = Pending {
            upload_id: UploadId::from_bytes([1; 16]),
            hash: ContentHash::empty(),
            size: 0,
            earlier: vec![],
        };
        {
            let c = CacheDir::open(dir.path()).expect("open");
            c.put(
                NodeId(2),
                &CacheEntry {
                    version: 1,
                    hash: ContentHash::empty(),
                    pending: None,
                    writing: false,
                    seq: 0,
                },
            )
            .expect("put");
            c.put(
                NodeId(3),
                &CacheEntry {
                    version: 1,
                    hash: ContentHash::empty(),
                    pending: Some(pending.clone()),
                    writing: false,
                    seq: 0,
                },
            )
            .expect("put");
        }
        let c = CacheDir::open(dir.path()).expect("reopen");
        assert_eq!(c.get(NodeId(2)).expect("get").map(|e| e.version), Some(1));
        let p = c.pending().expect("pending");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, NodeId(3));
        assert_eq!(p[0].1.pending.as_ref(), Some(&pending));
        // The in-memory pending set follows every change of the index.
        assert!(c.is_pending(NodeId(3)) && !c.is_pending(NodeId(2)));
        let mut clean = p[0].1.clone();
        clean.pending = None;
        c.put_lazy(NodeId(3), &clean).expect("clean");
        assert!(!c.is_pending(NodeId(3)));
        clean.pending = Some(pending.clone());
        c.record(NodeId(2), &clean).expect("record");
        assert_eq!(c.pending_nodes(), vec![NodeId(2)]);
        c.remove(NodeId(2)).expect("remove");
        assert!(c.pending_nodes().is_empty());
    }

    #[test]
    fn regression_a_recorded_pending_upload_survives_a_process_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pending = Pending {
            upload_id: UploadId::from_bytes([7; 16]),
            hash: ContentHash::empty(),
            size: 0,
            earlier: vec![],
        };
        let clean = CacheEntry {
            version: 1,
            hash: ContentHash::empty(),
            pending: None,
            writing: false,
            seq: 0,
        };
        let crashed = tempfile::tempdir().expect("tempdir");
        {
            let c = CacheDir::open(dir.path()).expect("open");
            c.put(NodeId(4), &clean).expect("durable clean record");
            let dirty = CacheEntry {
                pending: Some(pending.clone()),
                ..clean.clone()
            };
            c.record(NodeId(4), &dirty).expect("record");
            // The image a crash of this process leaves: the files as they are now.
            for f in ["index.redb", "journal.log"] {
                std::fs::copy(dir.path().join(f), crashed.path().join(f)).expect("copy");
            }
        }
        let c = CacheDir::open(crashed.path()).expect("reopen after crash");
        let e = c.get(NodeId(4)).expect("get").expect("entry");
        assert_eq!(
            e.pending.as_ref(),
            Some(&pending),
            "pending upload replayed"
        );
        // An older journal line never overrides a newer durable record.
        c.put(NodeId(4), &clean).expect("newer clean record");
        drop(c);
        let c = CacheDir::open(crashed.path()).expect("reopen");
        assert_eq!(c.get(NodeId(4)).expect("get").expect("entry").pending, None);
    }
}
