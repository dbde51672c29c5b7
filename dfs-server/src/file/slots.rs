//! Blobs written by the slot store of earlier builds: read (`<node>-<hash>.t`, body then a
//! 56-byte trailer) and migrated, never written any more.
//!
//! That store wrote a small blob into a pre-made slot file with a trailer naming it, one
//! fdatasync, then moved it to its final name. It was withdrawn: on a file system without a
//! journal neither a rename across directories nor a hard link's count is made durable by the
//! fsyncs it did, so a crash could lose an acknowledged blob, and trusting an existing final
//! name could keep a corrupt copy. Opening a store migrates what such a build left in `slots/`:
//! every slot whose trailer is valid and whose body hashes to it is stored again as a plain,
//! durable blob; the others were never acknowledged and are dropped.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use common::{ContentHash, NodeId};
use sha2::{Digest, Sha256};

use crate::error::{ServiceError, ServiceResult};

/// Bytes after the body of a `.t` blob: magic, node, hash, body length.
pub const TRAILER_LEN: u64 = 8 + 8 + 32 + 8;
const MAGIC: &[u8; 8] = b"DFSBLOB1";
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

/// Migrates `root/slots` (see the module docs): `store(node, hash, body)` stores a recovered
/// blob durably. Entries that are not regular files are left alone (and logged).
pub fn migrate(
    root: &Path,
    store: impl Fn(NodeId, &ContentHash, &[u8]) -> ServiceResult<()>,
) -> ServiceResult<()> {
    let dir = root.join("slots");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut moved = 0;
    let mut kept = 0;
    for e in entries.flatten() {
        let path = e.path();
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            tracing::warn!(path = %path.display(), "not a slot file; left alone");
            kept += 1;
            continue;
        }
        match recover_slot(&path) {
            Ok(Recovered::Blob(node, hash)) => {
                let body = std::fs::read(&path)?;
                let len = body.len().saturating_sub(TRAILER_LEN as usize);
                store(node, &hash, &body[..len])?;
                moved += 1;
            }
            Ok(Recovered::Empty | Recovered::Torn) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable slot file; left alone");
                kept += 1;
                continue;
            }
        }
        std::fs::remove_file(&path)?;
    }
    if moved > 0 {
        tracing::info!(moved, "migrated blobs from slot files");
    }
    if kept == 0 {
        std::fs::remove_dir(&dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(d: &[u8]) -> ContentHash {
        ContentHash::from_digest(&Sha256::digest(d).into())
    }

    #[test]
    fn slots_left_by_an_earlier_build_are_migrated_and_torn_ones_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slots = dir.path().join("slots");
        std::fs::create_dir_all(&slots).expect("slots");
        let mut good = b"survives".to_vec();
        good.extend(trailer(NodeId(5), &hash(b"survives"), 8).expect("trailer"));
        std::fs::write(slots.join("a"), &good).expect("a");
        std::fs::write(slots.join("b"), b"half a bo").expect("torn");
        let mut lying = b"other bytes".to_vec();
        lying.extend(trailer(NodeId(6), &hash(b"claimed"), 11).expect("trailer"));
        std::fs::write(slots.join("c"), &lying).expect("c");
        std::fs::write(slots.join("d"), b"").expect("empty");
        let stored = std::sync::Mutex::new(Vec::new());
        migrate(dir.path(), |n, h, b| {
            stored
                .lock()
                .expect("lock")
                .push((n, h.clone(), b.to_vec()));
            Ok(())
        })
        .expect("migrate");
        let stored = stored.into_inner().expect("stored");
        assert_eq!(
            stored,
            vec![(NodeId(5), hash(b"survives"), b"survives".to_vec())]
        );
        assert!(!slots.exists(), "the slots directory is gone");
    }
}
