//! Pre-made slot files: a small blob becomes durable with one `fdatasync`, instead of a new
//! file's fsync, rename and directory fsync.
//!
//! A slot is an empty file in `slots/` whose directory entry is already durable: the filler
//! makes them in rounds, off the write path, and syncs the file system once per round. A small
//! blob is written into a slot followed by a trailer that names it (node, hash, length), made
//! durable with one `fdatasync`, and renamed to `objects/<shard>/<node>-<hash>.t`. That rename
//! becomes durable lazily (`sync_names`, from the heartbeat loop, and every filler round); a
//! crash before then leaves the blob in its slot, and `recover` moves every slot whose trailer
//! is valid and whose body hashes to it to its final name at open. A torn slot (crash mid-write)
//! fails that check and is discarded; it was never acknowledged. Readers never see the trailer:
//! a `.t` blob's length excludes it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use common::{ContentHash, NodeId};
use sha2::{Digest, Sha256};

use crate::error::ServiceResult;

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
    let digest = hex::decode(hash.as_str())
        .map_err(|e| crate::error::ServiceError::internal("blob hash", e))?;
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
    /// A blob was renamed out of a slot since the last sync of the file system.
    unsynced: AtomicBool,
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
        let mut moved = 0;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            match recover_slot(&path)? {
                Recovered::Empty => free.push(path),
                Recovered::Blob(node, hash) => {
                    std::fs::rename(&path, dest(node, &hash))?;
                    moved += 1;
                }
                Recovered::Torn => std::fs::remove_file(&path)?,
            }
        }
        if moved > 0 {
            tracing::info!(moved, "recovered blobs left in slots by a crash");
        }
        let slots = Slots {
            dir,
            free: Mutex::new(free),
            filling: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
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

    /// Whether the pool runs low and no round is under way (the caller then runs `fill` on a
    /// blocking thread). Claims the round.
    pub fn claim_round(&self) -> bool {
        self.free().len() < LOW
            && self
                .filling
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Makes a round of slots durable (one sync of the file system for all of them, which also
    /// makes earlier renames out of slots durable), then adds them to the pool.
    pub fn fill(&self) -> ServiceResult<()> {
        let result = (|| {
            // Before the files exist: see `SyncHandle`.
            let sync = super::batch::SyncHandle::open(&self.dir)?;
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
            self.unsynced.store(false, Ordering::Release);
            sync.syncfs()?;
            self.free().extend(made);
            Ok(())
        })();
        self.filling.store(false, Ordering::Release);
        result
    }

    /// Makes the renames out of slots since the last sync durable (one sync of the file
    /// system, only if there were any).
    pub fn sync_names(&self) -> ServiceResult<()> {
        // A missed error here costs nothing: a rename that did not persist is redone at open.
        if self.unsynced.swap(false, Ordering::AcqRel)
            && let Err(e) = super::batch::SyncHandle::open(&self.dir).and_then(|h| h.syncfs())
        {
            self.unsynced.store(true, Ordering::Release);
            return Err(e.into());
        }
        Ok(())
    }

    /// Stores `chunks` (whose hash the caller checked) as the blob `dest` through `slot`: body
    /// and trailer, one `fdatasync`, rename. Durable when this returns: a crash before the
    /// rename is durable leaves it for `recover`. On error the slot is discarded.
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
            std::fs::rename(slot, dest)?;
            self.unsynced.store(true, Ordering::Release);
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(slot);
        }
        result
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
        assert!(!c.exists());
        assert_eq!(&std::fs::read(&dest_c).expect("c")[..5], b"hello");
        slots.sync_names().expect("sync");
    }
}
