//! Pre-made slot files: a small blob becomes durable with one `fdatasync`, instead of a new
//! file's fsync, rename and directory fsync.
//!
//! A slot is an empty file in `slots/` whose directory entry is already durable: the filler
//! makes them in rounds, off the write path (one directory fsync per round; a blob's own
//! fdatasync makes its inode durable). A small blob is written into a slot followed by a
//! trailer that names it (node, hash, length), made durable with one `fdatasync`, and *linked*
//! as `objects/<shard>/<node>-<hash>.t`: the slot's own name stays until that link is durable
//! (`sync_names`, from the heartbeat loop, fsyncs the shard directories linked into and only
//! then unlinks the slots), so every crash state keeps at least one durable name for an
//! acknowledged blob, even on a file system without a journal. Opening the pool finishes the
//! job for every slot whose trailer is valid and whose body hashes to it, and discards torn
//! ones (cut off mid-write: never acknowledged). A batch writes all its slots, then fdatasyncs
//! them in parallel (concurrent flushes of one disk merge in the block layer), then links them.
//! Readers never see the trailer: a `.t` blob's length excludes it.

use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use common::{ContentHash, NodeId};
use sha2::{Digest, Sha256};

use crate::error::{ServiceError, ServiceResult};
use crate::store::sync_dir;

/// Bytes after the body of a `.t` blob: magic, node, hash, body length.
pub const TRAILER_LEN: u64 = 8 + 8 + 32 + 8;
const MAGIC: &[u8; 8] = b"DFSBLOB1";
/// Slots made per filler round, and the level below which a round starts.
const ROUND: usize = 64;
const LOW: usize = 16;
/// Suffix of blobs stored with a trailer.
pub const TRAILER_SUFFIX: &str = ".t";

/// The trailer of a blob of `len` bytes.
pub fn trailer(node: NodeId, hash: &ContentHash, len: u64) -> ServiceResult<Vec<u8>> {
    let digest = hex::decode(hash.as_str()).map_err(|e| ServiceError::internal("blob hash", e))?;
    let mut t = Vec::with_capacity(TRAILER_LEN as usize);
    t.extend_from_slice(MAGIC);
    t.extend_from_slice(&node.0.to_be_bytes());
    t.extend_from_slice(&digest);
    t.extend_from_slice(&len.to_be_bytes());
    Ok(t)
}

/// (node, hash, body length) from a trailer, if it is one.
fn parse_trailer(t: &[u8]) -> Option<(NodeId, ContentHash, u64)> {
    if t.len() != TRAILER_LEN as usize || &t[..8] != MAGIC {
        return None;
    }
    let node = u64::from_be_bytes(t[8..16].try_into().ok()?);
    let digest: [u8; 32] = t[16..48].try_into().ok()?;
    let len = u64::from_be_bytes(t[48..56].try_into().ok()?);
    Some((NodeId(node), ContentHash::from_digest(&digest), len))
}

/// The pool of free slots of one file store.
pub struct Slots {
    dir: PathBuf,
    free: Mutex<Vec<PathBuf>>,
    filling: AtomicBool,
    /// Slots linked to their final name since the last `sync_names`: (shard directory, slot).
    linked: Mutex<Vec<(PathBuf, PathBuf)>>,
    /// When `sync_names` last ran.
    last_sync: Mutex<std::time::Instant>,
}

/// One blob of `store_many`: its slot, final name and body (hash already checked).
pub struct SlotJob {
    /// The slot to write.
    pub slot: PathBuf,
    /// The blob's final name.
    pub dest: PathBuf,
    /// The file.
    pub node: NodeId,
    /// Its content hash.
    pub hash: ContentHash,
    /// Its content.
    pub body: Bytes,
}

impl Slots {
    /// Opens the pool in `root/slots`, recovering blobs left in slots by a crash: `dest`
    /// names a blob's final path. Makes the first round of slots.
    pub fn open(
        root: &Path,
        dest: impl Fn(NodeId, &ContentHash) -> PathBuf,
    ) -> ServiceResult<Self> {
        let dir = root.join("slots");
        std::fs::create_dir_all(&dir)?;
        let mut free = Vec::new();
        let mut moved = BTreeSet::new();
        let mut used = Vec::new();
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            match recover_slot(&path)? {
                Recovered::Empty => free.push(path),
                Recovered::Blob(node, hash) => {
                    let to = dest(node, &hash);
                    link_or_exists(&path, &to)?;
                    if let Some(d) = to.parent() {
                        moved.insert(d.to_path_buf());
                    }
                    used.push(path);
                }
                Recovered::Torn => std::fs::remove_file(&path)?,
            }
        }
        if !moved.is_empty() {
            tracing::info!(
                dirs = moved.len(),
                "recovered blobs left in slots by a crash"
            );
            for d in &moved {
                sync_dir(d)?;
            }
            for slot in &used {
                std::fs::remove_file(slot)?;
            }
            sync_dir(&dir)?;
        }
        let slots = Slots {
            dir,
            free: Mutex::new(free),
            filling: AtomicBool::new(false),
            linked: Mutex::new(Vec::new()),
            last_sync: Mutex::new(std::time::Instant::now()),
        };
        slots.fill()?;
        Ok(slots)
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<PathBuf>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A free slot, if any (the caller falls back to a fresh file otherwise).
    pub fn take(&self) -> Option<PathBuf> {
        self.free().pop()
    }

    /// Up to `n` free slots.
    pub fn take_many(&self, n: usize) -> Vec<PathBuf> {
        let mut free = self.free();
        let keep = free.len().saturating_sub(n);
        free.split_off(keep)
    }

    /// Whether the pool runs low and no round is under way (the caller then runs `fill` on a
    /// blocking thread). Claims the round.
    pub fn claim_round(&self) -> bool {
        self.free().len() < LOW
            && self
                .filling
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Makes a round of slots (their names durable with one directory fsync), then adds them
    /// to the pool.
    pub fn fill(&self) -> ServiceResult<()> {
        let result = (|| {
            let mut made = Vec::with_capacity(ROUND);
            for _ in 0..ROUND {
                let path = self.dir.join(hex::encode(rand::random::<[u8; 12]>()));
                // Private: blobs are every user's file contents.
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                made.push(path);
            }
            // The names; each slot's inode becomes durable with its blob's fdatasync.
            sync_dir(&self.dir)?;
            self.free().extend(made);
            Ok(())
        })();
        self.filling.store(false, Ordering::Release);
        result
    }

    fn linked(&self, dest: &Path, slot: &Path) {
        if let Some(dir) = dest.parent() {
            self.linked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((dir.to_path_buf(), slot.to_path_buf()));
        }
    }

    /// Makes the final names linked since the last call durable (an fsync of each shard
    /// directory linked into), then drops the slots' own names. Until then a crash leaves both
    /// names, or the slot's alone, which opening the pool links again.
    pub fn sync_names(&self) -> ServiceResult<()> {
        self.sync_names_every(std::time::Duration::ZERO)
    }

    /// `sync_names` unless it ran less than `interval` ago: one fsync per shard directory
    /// touched meanwhile, however many blobs went into it.
    pub fn sync_names_every(&self, interval: std::time::Duration) -> ServiceResult<()> {
        {
            let mut last = self.last_sync.lock().unwrap_or_else(|p| p.into_inner());
            if last.elapsed() < interval {
                return Ok(());
            }
            *last = std::time::Instant::now();
        }
        let linked = std::mem::take(&mut *self.linked.lock().unwrap_or_else(|p| p.into_inner()));
        let dirs: BTreeSet<PathBuf> = linked.iter().map(|(d, _)| d.clone()).collect();
        for dir in &dirs {
            if let Err(e) = sync_dir(dir) {
                self.linked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(linked);
                return Err(e);
            }
        }
        for (_, slot) in &linked {
            // Not waited onto the disk: a slot name that comes back is dropped at open.
            let _ = std::fs::remove_file(slot);
        }
        Ok(())
    }

    /// Stores `chunks` (whose hash the caller checked) as the blob `dest` through `slot`: body
    /// and trailer, one `fdatasync`, link to `dest`. Durable when this returns (under the
    /// slot's name until `sync_names`). On error the slot is discarded.
    pub fn store(
        &self,
        slot: &Path,
        dest: &Path,
        node: NodeId,
        hash: &ContentHash,
        chunks: &[Bytes],
    ) -> ServiceResult<()> {
        let len: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let result = (|| {
            let mut f = std::fs::OpenOptions::new().write(true).open(slot)?;
            for c in chunks {
                f.write_all(c)?;
            }
            f.write_all(&trailer(node, hash, len)?)?;
            f.sync_data()?;
            drop(f);
            link_or_exists(slot, dest)?;
            self.linked(dest, slot);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(slot);
        }
        result
    }

    /// `store` for several blobs: all written first, then fdatasynced in parallel, then
    /// linked. One result per job; a failed one discards its slot and affects no other.
    pub fn store_many(&self, jobs: &[SlotJob]) -> Vec<ServiceResult<u64>> {
        let mut results: Vec<ServiceResult<u64>> = Vec::with_capacity(jobs.len());
        let mut written: Vec<(usize, std::fs::File)> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let w = (|| {
                let mut f = std::fs::OpenOptions::new().write(true).open(&job.slot)?;
                f.write_all(&job.body)?;
                f.write_all(&trailer(job.node, &job.hash, job.body.len() as u64)?)?;
                Ok::<_, ServiceError>(f)
            })();
            match w {
                Ok(f) => {
                    results.push(Ok(job.body.len() as u64));
                    written.push((i, f));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        let files: Vec<&std::fs::File> = written.iter().map(|(_, f)| f).collect();
        let synced = sync_parallel(&files, |f| f.sync_data());
        for ((i, _), r) in written.iter().zip(synced) {
            let job = &jobs[*i];
            match r.and_then(|()| link_or_exists(&job.slot, &job.dest)) {
                Ok(()) => self.linked(&job.dest, &job.slot),
                Err(e) => results[*i] = Err(e.into()),
            }
        }
        for (job, r) in jobs.iter().zip(&results) {
            if r.is_err() {
                let _ = std::fs::remove_file(&job.slot);
            }
        }
        results
    }
}

/// Runs `sync` on every file, on up to 8 threads at once: concurrent flushes of one disk are
/// merged by the block layer, so N files cost about one flush rather than N in a row.
fn sync_parallel<F: std::borrow::Borrow<std::fs::File> + Sync>(
    files: &[F],
    sync: impl Fn(&std::fs::File) -> std::io::Result<()> + Sync,
) -> Vec<std::io::Result<()>> {
    if files.len() <= 1 {
        return files.iter().map(|f| sync(f.borrow())).collect();
    }
    let per = files.len().div_ceil(8);
    let sync = &sync;
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks(per)
            .map(|chunk| {
                (
                    chunk.len(),
                    s.spawn(move || chunk.iter().map(|f| sync(f.borrow())).collect::<Vec<_>>()),
                )
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|(n, h)| {
                h.join().unwrap_or_else(|_| {
                    (0..n)
                        .map(|_| Err(std::io::Error::other("sync thread panicked")))
                        .collect()
                })
            })
            .collect()
    })
}

/// Links `slot` as `dest`; a `dest` that exists already holds the same content (names are
/// content hashes, and a final name only ever appears after its content was durable).
fn link_or_exists(slot: &Path, dest: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(slot, dest) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

enum Recovered {
    Empty,
    Blob(NodeId, ContentHash),
    Torn,
}

/// What a slot found at open holds.
fn recover_slot(path: &Path) -> ServiceResult<Recovered> {
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    if size == 0 {
        return Ok(Recovered::Empty);
    }
    if size < TRAILER_LEN {
        return Ok(Recovered::Torn);
    }
    let body_len = size - TRAILER_LEN;
    f.seek(SeekFrom::Start(body_len))?;
    let mut t = vec![0u8; TRAILER_LEN as usize];
    f.read_exact(&mut t)?;
    let Some((node, hash, len)) = parse_trailer(&t) else {
        return Ok(Recovered::Torn);
    };
    if len != body_len {
        return Ok(Recovered::Torn);
    }
    f.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut body = (&mut f).take(body_len);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    if ContentHash::from_digest(&hasher.finalize().into()) != hash {
        return Ok(Recovered::Torn);
    }
    Ok(Recovered::Blob(node, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(d: &[u8]) -> ContentHash {
        ContentHash::from_digest(&Sha256::digest(d).into())
    }

    #[test]
    fn a_blob_left_in_its_slot_by_a_crash_is_recovered_and_a_torn_one_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let objects = dir.path().join("objects");
        std::fs::create_dir_all(&objects).expect("objects");
        let dest = |n: NodeId, h: &ContentHash| objects.join(format!("{}-{}.t", n.0, h.as_str()));
        let slots = Slots::open(dir.path(), dest).expect("open");
        let a = slots.take().expect("slot");
        let b = slots.take().expect("slot");
        // "Crash" after the fdatasync, before the rename: the body and trailer are in the slot.
        let mut f = std::fs::OpenOptions::new().write(true).open(&a).expect("a");
        f.write_all(b"survives").expect("write");
        f.write_all(&trailer(NodeId(5), &hash(b"survives"), 8).expect("t"))
            .expect("trailer");
        drop(f);
        // A slot cut off mid-write: body without a valid trailer.
        std::fs::write(&b, b"half a bo").expect("torn");
        drop(slots);
        let slots = Slots::open(dir.path(), dest).expect("reopen");
        let blob = dest(NodeId(5), &hash(b"survives"));
        let stored = std::fs::read(&blob).expect("recovered");
        assert_eq!(&stored[..8], b"survives");
        assert_eq!(stored.len() as u64, 8 + TRAILER_LEN);
        assert!(!a.exists() && !b.exists(), "the torn slot is gone");
        // Stored through a slot: durable under its final name, the slot used up.
        let c = slots.take().expect("slot");
        let dest_c = dest(NodeId(6), &hash(b"hello"));
        slots
            .store(
                &c,
                &dest_c,
                NodeId(6),
                &hash(b"hello"),
                &[Bytes::from_static(b"hello")],
            )
            .expect("store");
        assert_eq!(&std::fs::read(&dest_c).expect("c")[..5], b"hello");
        // The slot keeps its own name until the final one is durable: a crash then leaves
        // both, and opening the pool keeps the final one and drops the slot.
        assert!(c.exists());
        drop(slots);
        let slots = Slots::open(dir.path(), dest).expect("reopen");
        assert!(!c.exists());
        assert_eq!(&std::fs::read(&dest_c).expect("c")[..5], b"hello");
        // Without a crash, `sync_names` drops the slot's name.
        let d = slots.take().expect("slot");
        let dest_d = dest(NodeId(7), &hash(b"world"));
        slots
            .store(
                &d,
                &dest_d,
                NodeId(7),
                &hash(b"world"),
                &[Bytes::from_static(b"world")],
            )
            .expect("store");
        assert!(d.exists());
        slots.sync_names().expect("sync");
        assert!(!d.exists());
        assert_eq!(&std::fs::read(&dest_d).expect("d")[..5], b"world");
    }
}
