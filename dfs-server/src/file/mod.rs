//! `FileStore`: one file server's blobs, stored by node id and content hash (never by a user
//! path), hash-checked while streaming; plus the per-file fence high-water mark and counters.
//!
//! Layout: blobs up to 1 MiB are records in pack files (`packs/`, see `pack`): durable with one
//! fdatasync, shared by concurrent writers. Larger ones are files,
//! `objects/<shard>/<node>-<hash>`, in 256 shard directories made (and fsynced) once at open:
//! written to a temp name in the shard, fsynced, renamed, and the shard directory fsynced. Blobs
//! of older layouts (`blobs/<node>/<hash>`, slot files) are read and moved over at open.

pub mod batch;
pub mod membership;
pub mod pack;
pub mod replicate;
pub mod routes;
pub mod scrub;
pub mod slots;
pub mod space;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use common::api::FileServerStats;
use common::{ContentHash, FenceToken, NodeId};
use futures_util::{Stream, StreamExt};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::commit::GroupCommit;
use crate::error::{ServiceError, ServiceResult};
use crate::store::sync_dir;

const SHARDS: u64 = 256;
const TMP_PREFIX: &str = ".tmp-";
/// Where the pack files are (see `pack`).
pub const PACKS: &str = "packs";
/// Where the scrub sets aside copies it would otherwise delete (see `scrub`).
pub const QUARANTINE: &str = "quarantine";

const FENCES: TableDefinition<u64, u64> = TableDefinition::new("fences");
/// The data directory's format record (`crate::store::check_format`), in `file.redb`: it
/// covers the whole layout (objects shards, packs, the fences table).
const FILE_META: TableDefinition<&str, u64> = TableDefinition::new("file_meta");
/// The file server's data directory format: 1, the first with a format record (packs and
/// sharded large blobs).
pub const FILE_FORMAT: u64 = 1;

/// Counters exposed at `GET /v1/stats`.
#[derive(Default)]
pub struct Stats {
    /// Blob downloads served.
    pub downloads: AtomicU64,
    /// Client uploads accepted.
    pub uploads: AtomicU64,
    /// Replica pushes accepted.
    pub replica_writes: AtomicU64,
    /// Bytes served.
    pub bytes_out: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// fsync calls made for blobs.
    pub fsyncs: AtomicU64,
}

/// Blob storage of one file server.
pub struct FileStore {
    root: PathBuf,
    /// Blobs up to `pack::PACK_BLOB_MAX`, as records in pack files.
    packs: std::sync::Arc<pack::Packs>,
    db: GroupCommit,
    /// Counters.
    pub stats: Stats,
    /// Largest accepted blob.
    pub max_blob_bytes: u64,
    /// The disk it lives on, and the reserve kept back on it.
    pub disk: space::Disk,
}

/// Deletes a temp file unless disarmed (the blob reached its final name).
struct TmpGuard(Option<PathBuf>);

impl Drop for TmpGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl FileStore {
    /// Opens the store under `data_dir`, removing temp files left by a crash and moving blobs
    /// of the older layout into the current one.
    pub fn open(data_dir: &Path, max_blob_bytes: u64) -> ServiceResult<Self> {
        let root = data_dir.to_path_buf();
        // The format first: a data directory of a newer dfs is refused before anything in it
        // is cleaned up, moved or cut.
        std::fs::create_dir_all(&root)?;
        let db_path = root.join("file.redb");
        let db = GroupCommit::open(&db_path)?;
        db.write(|tx| {
            crate::store::check_format(tx, FILE_META, &db_path, FILE_FORMAT)?;
            tx.open_table(FENCES)?;
            Ok(())
        })?;
        let objects = root.join("objects");
        std::fs::create_dir_all(&objects)?;
        for shard in 0..SHARDS {
            let dir = objects.join(format!("{shard:02x}"));
            std::fs::create_dir_all(&dir)?;
            for e in std::fs::read_dir(&dir)?.flatten() {
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            sync_dir(&dir)?;
        }
        sync_dir(&objects)?;
        let old_tmp = root.join("tmp");
        if old_tmp.exists() {
            std::fs::remove_dir_all(&old_tmp)?;
        }
        let packs = std::sync::Arc::new(pack::Packs::open(&root.join(PACKS))?);
        let store = FileStore {
            root,
            packs,
            db,
            stats: Stats::default(),
            max_blob_bytes,
            disk: space::Disk::new(data_dir, None),
        };
        store.migrate_old_layout()?;
        slots::migrate(&store.root, |node, hash, body| {
            store_small(
                &store.shard_dir(node),
                &store.blob_path(node, hash),
                &[Bytes::copy_from_slice(body)],
            )
        })?;
        Ok(store)
    }

    /// Moves `blobs/<node>/<hash>` (round-1 layout) to `objects/<shard>/<node>-<hash>`.
    fn migrate_old_layout(&self) -> ServiceResult<()> {
        let old = self.root.join("blobs");
        let Ok(dirs) = std::fs::read_dir(&old) else {
            return Ok(());
        };
        for d in dirs.flatten() {
            let Some(node) = d.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            for f in std::fs::read_dir(d.path())?.flatten() {
                if let Some(hash) = f
                    .file_name()
                    .to_str()
                    .and_then(|h| ContentHash::parse(h).ok())
                {
                    std::fs::rename(f.path(), self.blob_path(NodeId(node), &hash))?;
                }
            }
            let _ = std::fs::remove_dir_all(d.path());
        }
        for shard in 0..SHARDS {
            sync_dir(&self.shard_dir(NodeId(shard)))?;
        }
        std::fs::remove_dir_all(&old)?;
        sync_dir(&self.root)
    }

    fn shard_dir(&self, node: NodeId) -> PathBuf {
        self.root
            .join("objects")
            .join(format!("{:02x}", node.0 % SHARDS))
    }

    /// Path of a blob; both parts are validated numbers/hex, so no traversal is possible.
    pub fn blob_path(&self, node: NodeId, hash: &ContentHash) -> PathBuf {
        self.shard_dir(node)
            .join(format!("{}-{}", node.0, hash.as_str()))
    }

    /// Path of a blob an earlier build stored through a slot (body, then a trailer; read only,
    /// see `slots`).
    pub fn trailer_blob_path(&self, node: NodeId, hash: &ContentHash) -> PathBuf {
        trailer_blob_in(&self.root.join("objects"), node, hash)
    }

    /// Whether this server holds `hash` for `node`.
    pub fn has(&self, node: NodeId, hash: &ContentHash) -> bool {
        hash.as_str() == ContentHash::EMPTY_HEX
            || self.packs.get(node, hash).is_some()
            || self.trailer_blob_path(node, hash).is_file()
            || self.blob_path(node, hash).is_file()
    }

    /// Opens a blob for streaming out (its body only), with its length.
    pub async fn open_blob(
        &self,
        node: NodeId,
        hash: &ContentHash,
    ) -> ServiceResult<(tokio::io::Take<tokio::fs::File>, u64)> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        // A pack being compacted may go between the lookup and the open: look again once.
        for _ in 0..2 {
            let Some(loc) = self.packs.get(node, hash) else {
                break;
            };
            match tokio::fs::File::open(self.packs.path(loc.seq)).await {
                Ok(mut f) => {
                    f.seek(std::io::SeekFrom::Start(loc.body)).await?;
                    return Ok((f.take(loc.len), loc.len));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let with_trailer = self.trailer_blob_path(node, hash);
        let (f, trailer) = match tokio::fs::File::open(&with_trailer).await {
            Ok(f) => (f, slots::TRAILER_LEN),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match tokio::fs::File::open(self.blob_path(node, hash)).await {
                    Ok(f) => (f, 0),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(ServiceError::NotFound(format!(
                            "content {hash} of node {node} on this server"
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let len = f
            .metadata()
            .await?
            .len()
            .checked_sub(trailer)
            .ok_or_else(|| {
                ServiceError::internal("reading a blob", format!("{node}-{hash} is truncated"))
            })?;
        Ok((f.take(len), len))
    }

    /// Streams `body` into the blob `(node, declared)`: verifies the size bound and the hash,
    /// then makes it durable. Returns the size. Nothing is visible under the final name until
    /// the content is complete, verified and fsynced.
    pub async fn put_stream<S, E>(
        &self,
        node: NodeId,
        declared: &ContentHash,
        mut body: S,
    ) -> ServiceResult<u64>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        // Small bodies (most files) are gathered in memory and stored by one blocking task:
        // create, write, fdatasync, rename and directory fsync without a hop to the blocking
        // pool for each. Larger ones stream to disk as they arrive, in bounded memory.
        let mut hasher = Sha256::new();
        let mut head: Vec<Bytes> = Vec::new();
        let mut size = 0u64;
        let mut streaming = false;
        while let Some(chunk) =
            next_chunk(&mut body, &mut size, &mut hasher, self.max_blob_bytes).await?
        {
            head.push(chunk);
            if size > SMALL_BLOB {
                streaming = true;
                break;
            }
        }
        if !streaming {
            check_hash(hasher, declared)?;
            let mut results = self.put_small(vec![(node, declared.clone(), head)]).await;
            return results
                .pop()
                .unwrap_or_else(|| Err(ServiceError::internal("storing a blob", "no result")));
        }
        let dir = self.shard_dir(node);
        let tmp_path = tmp_in(&dir);
        let mut guard = TmpGuard(Some(tmp_path.clone()));
        // Private: blobs are every user's file contents.
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp_path)
            .await?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        for chunk in head {
            out.write_all(&chunk).await?;
        }
        while let Some(chunk) =
            next_chunk(&mut body, &mut size, &mut hasher, self.max_blob_bytes).await?
        {
            out.write_all(&chunk).await?;
        }
        check_hash(hasher, declared)?;
        out.flush().await?;
        let file = out.into_inner();
        file.sync_data().await?;
        drop(file);
        tokio::fs::rename(&tmp_path, self.blob_path(node, declared)).await?;
        guard.0 = None;
        tokio::task::spawn_blocking(move || sync_dir(&dir))
            .await
            .map_err(|e| ServiceError::internal("fsync", e))??;
        self.stats.fsyncs.fetch_add(2, Ordering::Relaxed);
        self.stats.bytes_in.fetch_add(size, Ordering::Relaxed);
        Ok(size)
    }

    /// Stores small blobs (each at most `pack::PACK_BLOB_MAX`, hash already checked) as pack
    /// records: durable together with one fdatasync. One result (the size) per blob.
    pub async fn put_small(
        &self,
        items: Vec<(NodeId, ContentHash, Vec<Bytes>)>,
    ) -> Vec<ServiceResult<u64>> {
        let n = items.len();
        // Empty content is never stored (every server has it). Anything else is appended even
        // if a record of it exists: that one may never have been made durable (see `pack`).
        let fresh: Vec<usize> = (0..n)
            .filter(|i| items[*i].1.as_str() != ContentHash::EMPTY_HEX)
            .collect();
        let sizes: Vec<u64> = items
            .iter()
            .map(|(_, _, b)| b.iter().map(|c| c.len() as u64).sum())
            .collect();
        let mut results: Vec<ServiceResult<u64>> = sizes.iter().map(|s| Ok(*s)).collect();
        if fresh.is_empty() {
            return results;
        }
        let packs = self.packs.clone();
        let todo: Vec<(NodeId, ContentHash, Vec<Bytes>)> =
            fresh.iter().map(|i| items[*i].clone()).collect();
        let stored = tokio::task::spawn_blocking(move || {
            let refs: Vec<(NodeId, ContentHash, &[Bytes])> = todo
                .iter()
                .map(|(n, h, b)| (*n, h.clone(), b.as_slice()))
                .collect();
            packs.put_many(&refs)
        })
        .await;
        match stored {
            Ok((stored, syncs)) => {
                self.stats.fsyncs.fetch_add(syncs, Ordering::Relaxed);
                for (i, r) in fresh.into_iter().zip(stored) {
                    match r {
                        Ok(size) => {
                            self.stats.bytes_in.fetch_add(size, Ordering::Relaxed);
                        }
                        Err(e) => results[i] = Err(e.into()),
                    }
                }
            }
            Err(e) => {
                for i in fresh {
                    results[i] = Err(ServiceError::internal("storing blobs", &e));
                }
            }
        }
        results
    }

    /// Every stored blob as (node, hash, when it was written).
    pub fn blobs(&self) -> Vec<(NodeId, ContentHash, std::time::SystemTime)> {
        let mut out: Vec<(NodeId, ContentHash, std::time::SystemTime)> = self
            .packs
            .all()
            .into_iter()
            .map(|(node, hash, loc)| {
                (
                    node,
                    hash,
                    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(loc.written_ns),
                )
            })
            .collect();
        for shard in 0..SHARDS {
            let Ok(files) = std::fs::read_dir(self.shard_dir(NodeId(shard))) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name();
                let name = name
                    .to_str()
                    .map(|n| n.strip_suffix(slots::TRAILER_SUFFIX).unwrap_or(n));
                let Some((node, hash)) = name.and_then(|n| n.split_once('-')) else {
                    continue;
                };
                if let (Ok(node), Ok(hash)) = (node.parse::<u64>(), ContentHash::parse(hash)) {
                    let written = f
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or_else(|_| std::time::SystemTime::now());
                    out.push((NodeId(node), hash, written));
                }
            }
        }
        out
    }

    /// Deletes one blob, if it is still the copy written at `written` (as `blobs` reported
    /// it): a copy stored again since is kept.
    pub fn remove_blob_written(
        &self,
        node: NodeId,
        hash: &ContentHash,
        written: std::time::SystemTime,
    ) -> ServiceResult<()> {
        if self.packs.get(node, hash).is_some() {
            let ns = written
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            self.packs.remove(node, hash, Some(ns))?;
            return Ok(());
        }
        let same = |p: PathBuf| {
            std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .is_ok_and(|m| m == written)
        };
        if same(self.blob_path(node, hash)) || same(self.trailer_blob_path(node, hash)) {
            self.remove_blob(node, hash)?;
        }
        Ok(())
    }

    /// Deletes one blob.
    pub fn remove_blob(&self, node: NodeId, hash: &ContentHash) -> ServiceResult<()> {
        self.packs.remove(node, hash, None)?;
        for path in [
            self.trailer_blob_path(node, hash),
            self.blob_path(node, hash),
        ] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Moves one blob aside instead of deleting it: to `quarantine/<unix secs>-<file name>`,
    /// where `purge_quarantine` deletes it once its grace period is over. Moving it back into
    /// its shard directory restores it.
    pub fn quarantine_blob(&self, node: NodeId, hash: &ContentHash) -> ServiceResult<()> {
        let dir = self.root.join(QUARANTINE);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)?;
            sync_dir(&self.root)?;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Some(loc) = self.packs.get(node, hash) {
            // Copied out of its pack durably first; only then is the record dropped.
            let body = self.packs.read(&loc)?;
            let to = dir.join(format!("{now}-{}-{}", node.0, hash.as_str()));
            store_small(&dir, &to, &[Bytes::from(body)])?;
            self.packs.remove(node, hash, Some(loc.written_ns))?;
        }
        for path in [
            self.trailer_blob_path(node, hash),
            self.blob_path(node, hash),
        ] {
            let Some(name) = path.file_name() else {
                continue;
            };
            let to = dir.join(format!("{now}-{}", name.to_string_lossy()));
            match std::fs::rename(&path, &to) {
                Ok(()) => {
                    // Both names durable: the copy is in quarantine, and only there.
                    sync_dir(&dir)?;
                    if let Some(from) = path.parent() {
                        sync_dir(from)?;
                    }
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                Err(_) => {}
            }
        }
        Ok(())
    }

    /// Deletes the quarantined blobs set aside more than `grace` ago. Returns how many.
    pub fn purge_quarantine(&self, grace: std::time::Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(self.root.join(QUARANTINE)) else {
            return 0;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut purged = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let since = name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .and_then(|(secs, _)| secs.parse::<u64>().ok());
            if since.is_some_and(|s| now.saturating_sub(s) >= grace.as_secs())
                && std::fs::remove_file(e.path()).is_ok()
            {
                purged += 1;
            }
        }
        purged
    }

    /// Compacts the packs (see `pack`): on the blocking pool. Returns the packs deleted.
    pub async fn compact(&self) -> ServiceResult<usize> {
        let packs = self.packs.clone();
        tokio::task::spawn_blocking(move || packs.compact())
            .await
            .map_err(|e| ServiceError::internal("compacting packs", e))?
            .map_err(Into::into)
    }

    /// Re-hashes a blob: whether its content still matches its name.
    pub async fn verify(&self, node: NodeId, hash: &ContentHash) -> ServiceResult<bool> {
        use tokio::io::AsyncReadExt;
        let (mut f, _) = self.open_blob(node, hash).await?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(&ContentHash::from_digest(&hasher.finalize().into()) == hash)
    }

    /// Fails if `fence` is older than the newest accepted for `node`.
    pub fn check_fence(&self, node: NodeId, fence: FenceToken) -> ServiceResult<()> {
        let tx = self.db.db()?.begin_read()?;
        let newest = tx.open_table(FENCES)?.get(node.0)?.map_or(0, |v| v.value());
        if fence.0 < newest {
            return Err(ServiceError::stale(fence, FenceToken(newest)));
        }
        Ok(())
    }

    /// Atomically checks and raises the high-water mark for `node`. Recorded without waiting
    /// for the disk: the directory re-checks every fence durably at commit, so a mark lost in a
    /// crash can only let a stale writer store a blob that is never committed (and scrubbed).
    pub fn accept_fence(&self, node: NodeId, fence: FenceToken) -> ServiceResult<()> {
        self.db.write_lazy(|tx| {
            let mut t = tx.open_table(FENCES)?;
            let newest = t.get(node.0)?.map_or(0, |v| v.value());
            if fence.0 < newest {
                return Err(ServiceError::stale(fence, FenceToken(newest)));
            }
            t.insert(node.0, fence.0)?;
            Ok(())
        })
    }

    /// Persists lazily recorded fence marks (called from the heartbeat loop).
    pub fn flush_fences(&self) -> ServiceResult<()> {
        self.db.flush_lazy()
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> FileServerStats {
        let s = &self.stats;
        FileServerStats {
            downloads: s.downloads.load(Ordering::Relaxed),
            uploads: s.uploads.load(Ordering::Relaxed),
            replica_writes: s.replica_writes.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
        }
    }
}

/// `objects/<shard>/<node>-<hash>.t`.
fn trailer_blob_in(objects: &Path, node: NodeId, hash: &ContentHash) -> PathBuf {
    objects
        .join(format!("{:02x}", node.0 % SHARDS))
        .join(format!(
            "{}-{}{}",
            node.0,
            hash.as_str(),
            slots::TRAILER_SUFFIX
        ))
}

/// Bodies up to this size are stored from memory in one blocking task.
const SMALL_BLOB: u64 = 1 << 20;

/// A fresh temp name in the shard `dir` (same directory as the blob, for the rename).
fn tmp_in(dir: &Path) -> PathBuf {
    dir.join(format!(
        "{TMP_PREFIX}{}",
        hex::encode(rand::random::<[u8; 12]>())
    ))
}

/// The next chunk of a blob body, counted against `limit` and hashed.
async fn next_chunk<S, E>(
    body: &mut S,
    size: &mut u64,
    hasher: &mut Sha256,
    limit: u64,
) -> ServiceResult<Option<Bytes>>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let Some(chunk) = body.next().await else {
        return Ok(None);
    };
    let chunk = chunk.map_err(|e| ServiceError::BadRequest(format!("reading body: {e}")))?;
    *size += chunk.len() as u64;
    if *size > limit {
        return Err(too_large(limit));
    }
    hasher.update(&chunk);
    Ok(Some(chunk))
}

fn too_large(limit: u64) -> ServiceError {
    ServiceError::TooLarge(format!(
        "file larger than this server's limit of {limit} bytes"
    ))
}

fn check_hash(hasher: Sha256, declared: &ContentHash) -> ServiceResult<()> {
    let actual = ContentHash::from_digest(&hasher.finalize().into());
    if &actual != declared {
        return Err(ServiceError::HashMismatch {
            declared: declared.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// Stores `chunks` at `dest` durably: a temp file in `dir` (the shard), fdatasync, rename,
/// fsync of `dir`. The temp file is removed on every error.
fn store_small(dir: &Path, dest: &Path, chunks: &[Bytes]) -> ServiceResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = tmp_in(dir);
    let mut guard = TmpGuard(Some(tmp.clone()));
    // Private: blobs are every user's file contents.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    for c in chunks {
        f.write_all(c)?;
    }
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, dest)?;
    guard.0 = None;
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    async fn body_of(store: &FileStore, node: u64, hash: &ContentHash) -> Vec<u8> {
        let (mut f, len) = store.open_blob(NodeId(node), hash).await.expect("open");
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut f, &mut body)
            .await
            .expect("body");
        assert_eq!(len, body.len() as u64);
        body
    }

    fn hash_of(data: &[u8]) -> ContentHash {
        ContentHash::from_digest(&Sha256::digest(data).into())
    }

    #[tokio::test]
    async fn stored_blob_matches_and_bad_hash_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path(), 1 << 20).expect("open");
        let h = hash_of(b"hello world");
        assert_eq!(
            store
                .put_stream(NodeId(5), &h, chunks(&[b"hello ", b"world"]))
                .await
                .expect("put"),
            11
        );
        assert_eq!(body_of(&store, 5, &h).await, b"hello world");
        assert!(
            !store.blob_path(NodeId(5), &h).exists(),
            "a small blob is a pack record, not a file"
        );
        // A blob an earlier build stored with a trailer: readers get the body only.
        let legacy = hash_of(b"legacy");
        let mut raw = b"legacy".to_vec();
        raw.extend(slots::trailer(NodeId(9), &legacy, 6).expect("trailer"));
        std::fs::write(store.trailer_blob_path(NodeId(9), &legacy), raw).expect("write");
        assert!(store.has(NodeId(9), &legacy));
        let (mut f, len) = store.open_blob(NodeId(9), &legacy).await.expect("open");
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut f, &mut body)
            .await
            .expect("body");
        assert_eq!((len, &body[..]), (6, &b"legacy"[..]));
        assert!(store.verify(NodeId(9), &legacy).await.expect("verify"));
        store.remove_blob(NodeId(9), &legacy).expect("remove");
        assert!(!store.has(NodeId(9), &legacy));
        let wrong = hash_of(b"other");
        let r = store
            .put_stream(NodeId(6), &wrong, chunks(&[b"hello"]))
            .await;
        assert!(matches!(r, Err(ServiceError::HashMismatch { .. })));
        assert!(!store.has(NodeId(6), &wrong));
        let shard = store.blob_path(NodeId(6), &wrong);
        let leftovers = std::fs::read_dir(shard.parent().expect("shard"))
            .expect("shard dir")
            .count();
        assert_eq!(leftovers, 0, "temp file removed");
    }

    #[tokio::test]
    async fn a_body_past_the_in_memory_bound_streams_to_disk_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path(), 8 << 20).expect("open");
        let part: &'static [u8] = Box::leak(vec![7u8; 700 << 10].into_boxed_slice());
        let whole = [part, part, part].concat();
        let h = hash_of(&whole);
        let n = store
            .put_stream(NodeId(9), &h, chunks(&[part, part, part]))
            .await
            .expect("put");
        assert_eq!(n, whole.len() as u64);
        assert_eq!(
            std::fs::read(store.blob_path(NodeId(9), &h)).expect("read"),
            whole
        );
    }

    #[tokio::test]
    async fn oversize_body_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path(), 4).expect("open");
        let r = store
            .put_stream(NodeId(1), &hash_of(b"12345"), chunks(&[b"123", b"45"]))
            .await;
        assert!(matches!(r, Err(ServiceError::TooLarge(_))));
    }

    #[tokio::test]
    async fn a_quarantined_blob_is_kept_for_its_grace_then_purged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path(), 1 << 20).expect("open");
        let body = b"set aside".to_vec();
        let hash = hash_of(&body);
        store
            .put_stream(NodeId(7), &hash, chunks(&[b"set aside"]))
            .await
            .expect("put");
        assert_eq!(body_of(&store, 7, &hash).await, body);
        store.quarantine_blob(NodeId(7), &hash).expect("quarantine");
        assert!(!store.has(NodeId(7), &hash), "no longer served");
        assert!(store.blobs().is_empty(), "no longer scrubbed");
        assert_eq!(
            store.purge_quarantine(std::time::Duration::from_secs(3600)),
            0
        );
        let kept: Vec<_> = std::fs::read_dir(dir.path().join(QUARANTINE))
            .expect("quarantine dir")
            .flatten()
            .collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read(kept[0].path()).expect("read"), body);
        assert_eq!(store.purge_quarantine(std::time::Duration::ZERO), 1);
        assert_eq!(
            std::fs::read_dir(dir.path().join(QUARANTINE))
                .expect("quarantine dir")
                .count(),
            0
        );
    }

    #[test]
    fn fences_only_grow_and_survive_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = FileStore::open(dir.path(), 1).expect("open");
            store
                .accept_fence(NodeId(1), FenceToken(10))
                .expect("accept");
            store
                .accept_fence(NodeId(1), FenceToken(10))
                .expect("same token again");
            store.flush_fences().expect("flush");
        }
        let store = FileStore::open(dir.path(), 1).expect("reopen");
        assert!(matches!(
            store.accept_fence(NodeId(1), FenceToken(9)),
            Err(ServiceError::StaleFence(_))
        ));
        assert!(store.check_fence(NodeId(1), FenceToken(9)).is_err());
        store
            .accept_fence(NodeId(2), FenceToken(1))
            .expect("other file independent");
    }
}
