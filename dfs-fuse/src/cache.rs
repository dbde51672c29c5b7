//! `CacheDir`: whole-file copies by node id, plus a persisted index (redb) saying which version
//! each copy is and whether it holds local changes not yet on the servers (dirty). A dirty copy
//! is never replaced or deleted until the servers have it.

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
}

impl CacheEntry {
    /// A copy equal to the server version `meta`.
    pub fn clean(meta: &common::NodeMeta) -> Self {
        CacheEntry {
            version: meta.version,
            hash: meta.hash.clone(),
            pending: None,
            writing: false,
        }
    }
}

/// A pending upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// Idempotency key of the upload.
    pub upload_id: UploadId,
    /// Hash of the content to push.
    pub hash: ContentHash,
    /// Its size.
    pub size: u64,
}

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
        Ok(CacheDir {
            root: root.to_path_buf(),
            db,
        })
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
        let data = serde_json::to_vec(entry).map_err(index_err)?;
        let tx = self.db.begin_write().map_err(index_err)?;
        tx.open_table(ENTRIES)
            .map_err(index_err)?
            .insert(node.0, data.as_slice())
            .map_err(index_err)?;
        tx.commit().map_err(index_err)
    }

    /// Records `entry` without waiting for the disk: for records whose loss in a crash is
    /// harmless (the copy is then fetched again, or a pending upload re-sent with its id).
    pub fn put_lazy(&self, node: NodeId, entry: &CacheEntry) -> Result<(), CacheError> {
        let data = serde_json::to_vec(entry).map_err(index_err)?;
        let mut tx = self.db.begin_write().map_err(index_err)?;
        tx.set_durability(redb::Durability::None)
            .map_err(index_err)?;
        tx.open_table(ENTRIES)
            .map_err(index_err)?
            .insert(node.0, data.as_slice())
            .map_err(index_err)?;
        tx.commit().map_err(index_err)
    }

    /// Forgets `node` and deletes its copy.
    pub fn remove(&self, node: NodeId) -> Result<(), CacheError> {
        let tx = self.db.begin_write().map_err(index_err)?;
        tx.open_table(ENTRIES)
            .map_err(index_err)?
            .remove(node.0)
            .map_err(index_err)?;
        tx.commit().map_err(index_err)?;
        match std::fs::remove_file(self.path(node)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Every entry with a pending upload.
    pub fn pending(&self) -> Result<Vec<(NodeId, CacheEntry)>, CacheError> {
        Ok(self
            .entries()?
            .into_iter()
            .filter(|(_, e)| e.pending.is_some())
            .collect())
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

    /// (files cached, bytes cached).
    pub fn usage(&self) -> Result<(u64, u64), CacheError> {
        let mut files = 0;
        let mut bytes = 0;
        for e in std::fs::read_dir(self.root.join("files"))?.flatten() {
            files += 1;
            bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
        Ok((files, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
