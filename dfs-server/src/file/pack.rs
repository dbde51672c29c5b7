//! `Packs`: small blobs stored as records appended to a few large pack files, so that a durable
//! blob costs one `fdatasync` of a file that already exists: no new inode, no directory entry,
//! no directory fsync. Concurrent writers share that fdatasync (group commit), and a batch of
//! blobs costs one in all.
//!
//! Layout: `packs/<seq>.pack` (16 hex digits), each a sequence of records:
//! `[96-byte header][body]`. Header: magic, kind (blob or tombstone), node, body length, the
//! time it was written, the content hash, for a tombstone the record it removes, and a checksum
//! of all that *and of the record's place* (pack, offset), so that bytes inside a body never
//! pass for a record. A blob's body must hash to its content hash.
//!
//! Why one fdatasync is enough, also on ext4 without a journal: a record never changes a
//! directory, and `fdatasync` makes durable the file's data and the metadata needed to read it
//! back (its size and block map). Records are written strictly in offset order under one lock,
//! and a record is acknowledged only after an fdatasync that started after its write returned;
//! that fdatasync covers every earlier record of the pack too. So after a crash the durable part
//! of a pack is a prefix of valid records that reaches past every acknowledged one. Opening
//! reads the newest pack record by record, checks each body against its hash, and cuts the pack
//! at the first record that is not whole (never-acknowledged bytes of the crash).
//!
//! The index (node, hash) -> (pack, offset, length) lives in memory, rebuilt from the headers at
//! open. A record is in the index only once it is durable, and a write always appends (an
//! earlier record of the same blob may be one nothing made durable). A removal appends a
//! tombstone naming the exact record, without an fsync: a removal lost in a crash brings back a
//! copy of a deleted or superseded version, which nothing reads (readers ask for the version
//! the directory names) and the scrub removes again. After a failed fdatasync the pack's state
//! is unknown: nothing in it that was waiting is acknowledged, and writing moves on to a new
//! pack.
//!
//! Space: a full pack whose live records take under half of it is compacted: its live records
//! are appended again (durably), with its tombstones for records of packs still there, then the
//! pack is deleted. A write still waiting on a pack being deleted is refused, not acknowledged.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use common::{ContentHash, NodeId};
use sha2::{Digest, Sha256};

/// Largest blob stored in a pack; larger ones are files of their own.
pub const PACK_BLOB_MAX: u64 = 1 << 20;
/// Size past which writing moves on to a new pack.
const ROLL_AT: u64 = 256 << 20;
const MAGIC: &[u8; 8] = b"dfspack2";
/// Bytes of a record header.
pub const HEADER_LEN: u64 = 96;
const KIND_BLOB: u8 = 1;
const KIND_TOMBSTONE: u8 = 2;
/// Packs smaller than this are not worth compacting yet.
const COMPACT_MIN: u64 = 1 << 20;
/// Bytes appended at once while compacting.
const COMPACT_CHUNK: u64 = 8 << 20;

/// Where one blob's body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Pack number.
    pub seq: u64,
    /// Offset of the body in the pack.
    pub body: u64,
    /// Body length.
    pub len: u64,
    /// When it was stored (ns since the epoch); a compacted copy keeps its original's.
    pub written_ns: u64,
}

impl Loc {
    /// Bytes of the pack this record takes, header included.
    fn span(&self) -> u64 {
        HEADER_LEN + self.len
    }
}

/// The index key: node and raw content hash.
type Key = (u64, [u8; 32]);

fn key(node: NodeId, hash: &ContentHash) -> Key {
    let mut raw = [0u8; 32];
    // A ContentHash is always 64 hex digits.
    let _ = hex::decode_to_slice(hash.as_str(), &mut raw);
    (node.0, raw)
}

/// A record header. A tombstone names the exact record it removes (`target`), so that it can
/// never remove a later copy of the same blob.
struct Header {
    kind: u8,
    node: u64,
    hash: [u8; 32],
    len: u64,
    written_ns: u64,
    target: (u64, u64),
}

impl Header {
    /// The header of a record at offset `at` of pack `seq`: its checksum covers its place too,
    /// so bytes that look like a record anywhere else (inside a blob body, in another pack)
    /// never pass for one.
    fn encode(&self, seq: u64, at: u64) -> [u8; HEADER_LEN as usize] {
        let mut b = [0u8; HEADER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8] = self.kind;
        b[16..24].copy_from_slice(&self.node.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.written_ns.to_le_bytes());
        b[40..72].copy_from_slice(&self.hash);
        b[72..80].copy_from_slice(&self.target.0.to_le_bytes());
        b[80..88].copy_from_slice(&self.target.1.to_le_bytes());
        let sum = checksum(&b, seq, at);
        b[88..96].copy_from_slice(&sum);
        b
    }

    fn decode(b: &[u8; HEADER_LEN as usize], seq: u64, at: u64) -> Option<Header> {
        if &b[0..8] != MAGIC || checksum(b, seq, at) != b[88..96] {
            return None;
        }
        let u = |r: std::ops::Range<usize>| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[r]);
            u64::from_le_bytes(x)
        };
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[40..72]);
        let h = Header {
            kind: b[8],
            node: u(16..24),
            len: u(24..32),
            written_ns: u(32..40),
            hash,
            target: (u(72..80), u(80..88)),
        };
        match h.kind {
            KIND_BLOB if h.len <= PACK_BLOB_MAX => Some(h),
            KIND_TOMBSTONE if h.len == 0 => Some(h),
            _ => None,
        }
    }
}

fn checksum(b: &[u8; HEADER_LEN as usize], seq: u64, at: u64) -> [u8; 8] {
    let mut d = Sha256::new();
    d.update(&b[..88]);
    d.update(seq.to_le_bytes());
    d.update(at.to_le_bytes());
    let mut out = [0u8; 8];
    out.copy_from_slice(&d.finalize()[..8]);
    out
}

/// Bytes a pack holds and how many of them are records still in the index.
#[derive(Default, Clone, Copy)]
struct PackStat {
    total: u64,
    live: u64,
}

/// The pack being appended to.
struct Active {
    seq: u64,
    file: Arc<File>,
    end: u64,
}

struct Inner {
    index: HashMap<Key, Loc>,
    /// Every pack in use; a pack that is gone from here is being (or was) deleted.
    packs: BTreeMap<u64, PackStat>,
}

impl Inner {
    fn unindex(&mut self, k: &Key) -> Option<Loc> {
        let old = self.index.remove(k)?;
        if let Some(s) = self.packs.get_mut(&old.seq) {
            s.live = s.live.saturating_sub(old.span());
        }
        Some(old)
    }

    fn index(&mut self, k: Key, loc: Loc) {
        self.unindex(&k);
        if let Some(s) = self.packs.get_mut(&loc.seq) {
            s.live += loc.span();
        }
        self.index.insert(k, loc);
    }
}

/// The pack store of one file server (see the module docs).
pub struct Packs {
    dir: PathBuf,
    /// Size past which writing moves on to a new pack.
    roll_at: u64,
    inner: Mutex<Inner>,
    active: Mutex<Active>,
    /// How far each recent pack is known durable; held across an fdatasync, so that the
    /// writers waiting meanwhile find their records covered by it.
    synced: Mutex<BTreeMap<u64, u64>>,
    /// Packs an fdatasync failed on: nothing more is acknowledged from them.
    failed: Mutex<BTreeSet<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn pack_name(seq: u64) -> String {
    format!("{seq:016x}.pack")
}

/// One record read back from a pack by `scan`.
pub struct Scanned {
    /// Blob (true) or tombstone.
    pub blob: bool,
    /// The node.
    pub node: u64,
    /// The content hash.
    pub hash: ContentHash,
    /// Where its body is (a tombstone's is empty).
    pub loc: Loc,
    /// For a tombstone, the (pack, body offset) of the record it removes.
    pub target: (u64, u64),
    /// Whether a blob's body matched its hash, if the scan checked it.
    pub verified: Option<bool>,
}

/// Reads a pack's records in order. A header that does not check out (a torn write at the
/// tail, or a damaged block) is skipped by searching forward for the next record that does;
/// with `verify`, each blob's body is checked against its hash too. A record whose body does
/// not match is kept when whole records follow it (a damaged copy: the scrub finds and reports
/// it) and dropped at the tail (a torn write, never acknowledged). Returns the records and the
/// offset where the last whole record ends.
pub fn scan(file: &File, seq: u64, verify: bool) -> std::io::Result<(Vec<Scanned>, u64)> {
    let size = file.metadata()?.len();
    let mut out: Vec<Scanned> = Vec::new();
    let mut at = 0u64;
    let mut end = 0u64;
    while at + HEADER_LEN <= size {
        match record_at(file, at, size, seq, verify)? {
            Some(r) => {
                at = r.loc.body + r.loc.len;
                if r.verified != Some(false) {
                    end = at;
                }
                out.push(r);
            }
            None => match resync(file, at + 1, size, seq, verify)? {
                Some(next) => {
                    tracing::error!(seq, at, next, "pack: damaged bytes skipped");
                    at = next;
                }
                None => break,
            },
        }
    }
    out.retain(|r| r.loc.body + r.loc.len <= end);
    Ok((out, end))
}

/// The record at `at`, if its header checks out and its body is within the file; and whether
/// its body matches its hash (always true without `verify`).
fn record_at(
    file: &File,
    at: u64,
    size: u64,
    seq: u64,
    verify: bool,
) -> std::io::Result<Option<Scanned>> {
    let mut head = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut head, at)?;
    let Some(h) = Header::decode(&head, seq, at) else {
        return Ok(None);
    };
    let body = at + HEADER_LEN;
    if body + h.len > size {
        return Ok(None);
    }
    let hash = ContentHash::from_digest(&h.hash);
    let loc = Loc {
        seq,
        body,
        len: h.len,
        written_ns: h.written_ns,
    };
    let verified = (verify && h.kind == KIND_BLOB)
        .then(|| body_matches(file, &loc, &hash))
        .transpose()?;
    Ok(Some(Scanned {
        blob: h.kind == KIND_BLOB,
        node: h.node,
        hash,
        loc,
        target: h.target,
        verified,
    }))
}

/// Whether the body at `loc` hashes to `hash`.
fn body_matches(file: &File, loc: &Loc, hash: &ContentHash) -> std::io::Result<bool> {
    let mut buf = vec![0u8; usize::try_from(loc.len).unwrap_or(usize::MAX)];
    file.read_exact_at(&mut buf, loc.body)?;
    Ok(&ContentHash::from_digest(&Sha256::digest(&buf).into()) == hash)
}

/// The offset of the next whole record at or after `from`, searching for the magic.
fn resync(
    file: &File,
    from: u64,
    size: u64,
    seq: u64,
    verify: bool,
) -> std::io::Result<Option<u64>> {
    const CHUNK: u64 = 1 << 20;
    let mut base = from;
    while base + HEADER_LEN <= size {
        let len = (size - base).min(CHUNK + MAGIC.len() as u64);
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut buf, base)?;
        for (i, w) in buf.windows(MAGIC.len()).enumerate() {
            if w == MAGIC {
                let at = base + i as u64;
                if at + HEADER_LEN <= size
                    && let Some(r) = record_at(file, at, size, seq, verify)?
                    && r.verified != Some(false)
                {
                    return Ok(Some(at));
                }
            }
        }
        base += CHUNK;
    }
    Ok(None)
}

/// The numbered packs under `dir`, ascending.
fn list(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut seqs = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name();
        if let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".pack"))
            .and_then(|n| u64::from_str_radix(n, 16).ok())
        {
            seqs.push(seq);
        }
    }
    seqs.sort_unstable();
    Ok(seqs)
}

/// Applies one scanned record to an index being rebuilt.
fn apply(inner: &mut Inner, r: &Scanned) {
    let k = key(NodeId(r.node), &r.hash);
    if r.blob {
        inner.index(k, r.loc);
    } else if inner
        .index
        .get(&k)
        .is_some_and(|l| (l.seq, l.body) == r.target)
    {
        inner.unindex(&k);
    }
}

/// Every blob the packs under `dir` hold, with the path of its pack and where it is in it (read
/// only, removals applied; for tests and tools that inspect a server's data directory).
pub fn stored(dir: &Path) -> std::io::Result<BTreeMap<(u64, String), (PathBuf, Loc)>> {
    let mut inner = Inner {
        index: HashMap::new(),
        packs: BTreeMap::new(),
    };
    let Ok(seqs) = list(dir) else {
        return Ok(BTreeMap::new());
    };
    for seq in seqs {
        let (records, _) = scan(&File::open(dir.join(pack_name(seq)))?, seq, false)?;
        inner.packs.insert(seq, PackStat::default());
        for r in &records {
            apply(&mut inner, r);
        }
    }
    Ok(inner
        .index
        .into_iter()
        .map(|((node, raw), loc)| {
            let hash = ContentHash::from_digest(&raw).as_str().to_owned();
            ((node, hash), (dir.join(pack_name(loc.seq)), loc))
        })
        .collect())
}

fn create_pack(dir: &Path, seq: u64) -> std::io::Result<File> {
    let path = dir.join(pack_name(seq));
    // Private: records are every user's file contents.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let durable = f
        .sync_all()
        .and_then(|()| crate::store::sync_dir(dir).map_err(std::io::Error::other));
    if let Err(e) = durable {
        // Not left behind: the next attempt makes the same pack again.
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(f)
}

fn open_rw(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
}

/// One record for `Packs::append`.
struct Item<'a> {
    node: NodeId,
    hash: ContentHash,
    body: &'a [bytes::Bytes],
    /// A compaction copy of this record: it keeps its age, and is indexed only if the index
    /// still has this record.
    copy_of: Option<Loc>,
}

impl Packs {
    /// Opens (or creates) the packs under `dir`: rebuilds the index from every pack, and cuts
    /// the newest one after its last whole record (see the module docs).
    pub fn open(dir: &Path) -> std::io::Result<Packs> {
        Packs::open_rolling_at(dir, ROLL_AT)
    }

    /// `open`, with packs rolled over at `roll_at` bytes (small in tests).
    pub fn open_rolling_at(dir: &Path, roll_at: u64) -> std::io::Result<Packs> {
        std::fs::create_dir_all(dir)?;
        let seqs = list(dir)?;
        let mut inner = Inner {
            index: HashMap::new(),
            packs: BTreeMap::new(),
        };
        let last = seqs.last().copied();
        let mut active = None;
        for seq in &seqs {
            let path = dir.join(pack_name(*seq));
            let newest = Some(*seq) == last;
            let scanned = open_rw(&path).and_then(|f| {
                let (records, end) = scan(&f, *seq, newest)?;
                Ok((f, records, end))
            });
            let (file, records, end) = match scanned {
                Ok(s) => s,
                Err(e) => {
                    // Its copies are missing from this server (readers use other holders,
                    // the scrub cannot report them); the pack itself is left alone.
                    tracing::error!(pack = %path.display(), error = %e, "pack unreadable; its blobs are not served");
                    continue;
                }
            };
            let size = file.metadata()?.len();
            if end < size {
                if newest {
                    tracing::warn!(pack = %path.display(), at = end, dropped = size - end, "pack ends in a record that is not whole (a crash before it was acknowledged); cutting it there");
                    file.set_len(end)?;
                } else {
                    tracing::error!(pack = %path.display(), at = end, "pack has bytes that are not records past this point; they are ignored");
                }
            }
            inner.packs.insert(
                *seq,
                PackStat {
                    total: end,
                    live: 0,
                },
            );
            for r in &records {
                // A record that would replace another copy of the same blob must be whole: a
                // torn or damaged one (from a pack cut off by a crash before its fdatasync, or
                // damaged since) never shadows a good one.
                if r.blob
                    && inner.index.contains_key(&key(NodeId(r.node), &r.hash))
                    && !r
                        .verified
                        .map_or_else(|| body_matches(&file, &r.loc, &r.hash), Ok)?
                {
                    tracing::warn!(pack = %path.display(), node = r.node, "pack: a damaged copy of a blob stored twice is ignored");
                    continue;
                }
                apply(&mut inner, r);
            }
            if newest {
                // What the scan read may be only in the page cache (a crash of the process,
                // not of the machine): durable before anything more is added.
                file.sync_data()?;
                if end < roll_at {
                    active = Some(Active {
                        seq: *seq,
                        file: Arc::new(file),
                        end,
                    });
                }
            }
        }
        let active = match active {
            Some(a) => a,
            None => {
                let seq = last.map_or(1, |s| s + 1);
                let file = create_pack(dir, seq)?;
                inner.packs.insert(seq, PackStat::default());
                Active {
                    seq,
                    file: Arc::new(file),
                    end: 0,
                }
            }
        };
        let synced = BTreeMap::from([(active.seq, active.end)]);
        Ok(Packs {
            dir: dir.to_path_buf(),
            roll_at,
            inner: Mutex::new(inner),
            active: Mutex::new(active),
            synced: Mutex::new(synced),
            failed: Mutex::new(BTreeSet::new()),
        })
    }

    /// Path of pack `seq`.
    pub fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(pack_name(seq))
    }

    /// Where a stored blob is.
    pub fn get(&self, node: NodeId, hash: &ContentHash) -> Option<Loc> {
        lock(&self.inner).index.get(&key(node, hash)).copied()
    }

    /// Every stored blob: (node, hash, location).
    pub fn all(&self) -> Vec<(NodeId, ContentHash, Loc)> {
        lock(&self.inner)
            .index
            .iter()
            .map(|((node, raw), loc)| (NodeId(*node), ContentHash::from_digest(raw), *loc))
            .collect()
    }

    /// Stores blobs durably, each body already checked against its hash, always as a new
    /// record (an earlier copy of the same blob may be one nothing ever made durable). One
    /// result (the size) per blob. Returns also how many fdatasyncs this call made (0 when
    /// another writer's covered it).
    pub fn put_many(
        &self,
        items: &[(NodeId, ContentHash, &[bytes::Bytes])],
    ) -> (Vec<std::io::Result<u64>>, u64) {
        let (results, syncs) = self.append(
            items
                .iter()
                .map(|(node, hash, body)| Item {
                    node: *node,
                    hash: hash.clone(),
                    body,
                    copy_of: None,
                })
                .collect(),
        );
        (
            results
                .into_iter()
                .map(|r| r.map(|(loc, _)| loc.len))
                .collect(),
            syncs,
        )
    }

    /// Appends records, makes them durable, then indexes them. Per record: where it was
    /// written and whether it was indexed (a compaction copy of a record removed meanwhile is
    /// not).
    fn append(&self, items: Vec<Item<'_>>) -> (Vec<std::io::Result<(Loc, bool)>>, u64) {
        let fail = |n: usize, e: &std::io::Error| -> Vec<std::io::Result<(Loc, bool)>> {
            (0..n)
                .map(|_| Err(std::io::Error::new(e.kind(), e.to_string())))
                .collect()
        };
        let n = items.len();
        let now = now_ns();
        // Written in offset order under the lock (see the module docs).
        let (seq, file, upto, placed) = {
            let mut a = lock(&self.active);
            if let Err(e) = self.roll_if_needed(&mut a) {
                return (fail(n, &e), 0);
            }
            let mut buf: Vec<u8> = Vec::new();
            let mut placed: Vec<(Key, Loc)> = Vec::with_capacity(n);
            let mut at = a.end;
            for it in &items {
                let len: u64 = it.body.iter().map(|b| b.len() as u64).sum();
                let k = key(it.node, &it.hash);
                let written_ns = it.copy_of.map_or(now, |o| o.written_ns);
                let h = Header {
                    kind: KIND_BLOB,
                    node: it.node.0,
                    hash: k.1,
                    len,
                    written_ns,
                    target: (0, 0),
                };
                buf.extend_from_slice(&h.encode(a.seq, at));
                for b in it.body {
                    buf.extend_from_slice(b);
                }
                let loc = Loc {
                    seq: a.seq,
                    body: at + HEADER_LEN,
                    len,
                    written_ns,
                };
                placed.push((k, loc));
                at += loc.span();
            }
            if let Err(e) = a.file.write_all_at(&buf, a.end) {
                // Nothing advanced: the next record overwrites whatever part was written.
                return (fail(n, &e), 0);
            }
            a.end = at;
            if let Some(s) = lock(&self.inner).packs.get_mut(&a.seq) {
                s.total = at;
            }
            (a.seq, a.file.clone(), at, placed)
        };
        let syncs = match self.sync(seq, &file, upto) {
            Ok(s) => s,
            Err(e) => return (fail(n, &e), 1),
        };
        let mut inner = lock(&self.inner);
        if !inner.packs.contains_key(&seq) {
            // Compacted and deleted while these records waited for their fdatasync.
            let e = std::io::Error::other("pack compacted away before the write was recorded");
            return (fail(n, &e), syncs);
        }
        let out = placed
            .into_iter()
            .zip(&items)
            .map(|((k, loc), it)| {
                if let Some(old) = it.copy_of
                    && inner.index.get(&k) != Some(&old)
                {
                    return Ok((loc, false));
                }
                inner.index(k, loc);
                Ok((loc, true))
            })
            .collect();
        (out, syncs)
    }

    /// Moves on to a new pack when the active one is full or failed an fdatasync.
    fn roll_if_needed(&self, a: &mut Active) -> std::io::Result<()> {
        let failed = lock(&self.failed).contains(&a.seq);
        if a.end < self.roll_at && !failed {
            return Ok(());
        }
        // Whatever was written to the full pack is made durable before writing moves on, so
        // that only the newest pack can end in records no fdatasync covered.
        if !failed && let Err(e) = a.file.sync_data() {
            tracing::error!(pack = a.seq, error = %e, "fdatasync of a full pack failed");
            lock(&self.failed).insert(a.seq);
        }
        let seq = a.seq + 1;
        let file = create_pack(&self.dir, seq)?;
        lock(&self.inner).packs.insert(seq, PackStat::default());
        *a = Active {
            seq,
            file: Arc::new(file),
            end: 0,
        };
        Ok(())
    }

    /// Makes pack `seq` durable up to `upto`, sharing one fdatasync between every writer
    /// waiting at once. Returns the fdatasyncs made (0 or 1).
    fn sync(&self, seq: u64, file: &File, upto: u64) -> std::io::Result<u64> {
        // Read before taking `synced` (lock order: `active` before `synced`). Every write up to
        // here has returned, so the fdatasync below covers it.
        let target = {
            let a = lock(&self.active);
            if a.seq == seq { a.end.max(upto) } else { upto }
        };
        let mut s = lock(&self.synced);
        let refuse = || {
            std::io::Error::other(
                "an fdatasync of this pack failed; its unsynced records are not trusted",
            )
        };
        if lock(&self.failed).contains(&seq) {
            return Err(refuse());
        }
        if s.get(&seq).is_some_and(|u| *u >= upto) {
            return Ok(0);
        }
        match file.sync_data() {
            Ok(()) => {
                let u = s.entry(seq).or_insert(0);
                *u = (*u).max(target);
                // Only the newest few packs can still have writers waiting; an entry dropped
                // costs one more fdatasync, never a missed one.
                while s.len() > 4 {
                    s.pop_first();
                }
                Ok(1)
            }
            Err(e) => {
                tracing::error!(pack = seq, error = %e, "fdatasync of a pack failed; moving on to a new pack");
                lock(&self.failed).insert(seq);
                Err(e)
            }
        }
    }

    /// Removes a blob from the index and records that with a tombstone naming the record (no
    /// fsync; see the module docs). With `written_ns`, only the record written then. Whether it
    /// was removed.
    pub fn remove(
        &self,
        node: NodeId,
        hash: &ContentHash,
        written_ns: Option<u64>,
    ) -> std::io::Result<bool> {
        let k = key(node, hash);
        let mut a = lock(&self.active);
        let old = {
            let mut inner = lock(&self.inner);
            match inner.index.get(&k) {
                Some(l) if written_ns.is_none_or(|w| w == l.written_ns) => {}
                _ => return Ok(false),
            }
            inner.unindex(&k)
        };
        let Some(old) = old else { return Ok(false) };
        self.write_tombstones(&mut a, &[(k, (old.seq, old.body))]);
        Ok(true)
    }

    /// Best effort, under the `active` lock: without them, a restart brings back copies
    /// nothing reads, which the scrub removes again.
    fn write_tombstones(&self, a: &mut Active, list: &[(Key, (u64, u64))]) {
        let mut buf = Vec::with_capacity(list.len() * HEADER_LEN as usize);
        let mut at = a.end;
        for (k, target) in list {
            let h = Header {
                kind: KIND_TOMBSTONE,
                node: k.0,
                hash: k.1,
                len: 0,
                written_ns: now_ns(),
                target: *target,
            };
            buf.extend_from_slice(&h.encode(a.seq, at));
            at += HEADER_LEN;
        }
        if a.file.write_all_at(&buf, a.end).is_ok() {
            a.end = at;
            if let Some(s) = lock(&self.inner).packs.get_mut(&a.seq) {
                s.total = at;
            }
        }
    }

    /// Reads a whole blob body (for compaction and quarantine).
    pub fn read(&self, loc: &Loc) -> std::io::Result<Vec<u8>> {
        let file = File::open(self.path(loc.seq))?;
        let mut buf = vec![0u8; usize::try_from(loc.len).unwrap_or(usize::MAX)];
        file.read_exact_at(&mut buf, loc.body)?;
        Ok(buf)
    }

    /// Compacts every full pack (not the active one) whose live records take under half of
    /// it: its live records are appended again durably, with the tombstones it holds for
    /// records of packs still there, and then it is deleted. Returns the packs deleted.
    pub fn compact(&self) -> std::io::Result<usize> {
        let active = lock(&self.active).seq;
        let min = COMPACT_MIN.min(self.roll_at / 2);
        let candidates: Vec<u64> = lock(&self.inner)
            .packs
            .iter()
            .filter(|(seq, s)| {
                **seq < active && (s.live == 0 || (s.total >= min && s.live * 2 < s.total))
            })
            .map(|(seq, _)| *seq)
            .collect();
        let mut deleted = 0;
        for seq in candidates {
            // Tombstones for records elsewhere go on living in the active pack.
            let (records, _) = scan(&File::open(self.path(seq))?, seq, false)?;
            let carried: Vec<(Key, (u64, u64))> = {
                let inner = lock(&self.inner);
                records
                    .iter()
                    .filter(|r| {
                        !r.blob && r.target.0 != seq && inner.packs.contains_key(&r.target.0)
                    })
                    .map(|r| (key(NodeId(r.node), &r.hash), r.target))
                    .collect()
            };
            let live: Vec<(Key, Loc)> = lock(&self.inner)
                .index
                .iter()
                .filter(|(_, l)| l.seq == seq)
                .map(|(k, l)| (*k, *l))
                .collect();
            let mut chunk: Vec<(Key, Loc, bytes::Bytes)> = Vec::new();
            let mut bytes_in_chunk = 0;
            for (i, (k, loc)) in live.iter().enumerate() {
                chunk.push((*k, *loc, bytes::Bytes::from(self.read(loc)?)));
                bytes_in_chunk += loc.len;
                if bytes_in_chunk >= COMPACT_CHUNK || i + 1 == live.len() {
                    self.move_records(std::mem::take(&mut chunk))?;
                    bytes_in_chunk = 0;
                }
            }
            if !carried.is_empty() {
                let (seq_now, file, upto) = {
                    let mut a = lock(&self.active);
                    self.write_tombstones(&mut a, &carried);
                    (a.seq, a.file.clone(), a.end)
                };
                self.sync(seq_now, &file, upto)?;
            }
            let gone = {
                let mut inner = lock(&self.inner);
                let still_used = inner.index.values().any(|l| l.seq == seq);
                if !still_used {
                    // From here on a write still waiting on this pack is refused (`append`).
                    inner.packs.remove(&seq);
                }
                !still_used
            };
            if gone {
                std::fs::remove_file(self.path(seq))?;
                crate::store::sync_dir(&self.dir).map_err(std::io::Error::other)?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Appends copies of records durably and points the index at them, for those the index
    /// still has where they were; a copy of a record removed meanwhile gets a tombstone.
    fn move_records(&self, chunk: Vec<(Key, Loc, bytes::Bytes)>) -> std::io::Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let bodies: Vec<[bytes::Bytes; 1]> = chunk.iter().map(|(_, _, b)| [b.clone()]).collect();
        let items = chunk
            .iter()
            .zip(&bodies)
            .map(|((k, loc, _), body)| Item {
                node: NodeId(k.0),
                hash: ContentHash::from_digest(&k.1),
                body,
                copy_of: Some(*loc),
            })
            .collect();
        let (results, _) = self.append(items);
        let mut unused = Vec::new();
        for ((k, _, _), r) in chunk.iter().zip(results) {
            let (loc, indexed) = r?;
            if !indexed {
                unused.push((*k, (loc.seq, loc.body)));
            }
        }
        if !unused.is_empty() {
            // A copy of a blob removed meanwhile must not come back at the next start; a copy
            // of one stored again meanwhile is as good as that one (same bytes) and stays.
            let mut a = lock(&self.active);
            let dead: Vec<(Key, (u64, u64))> = {
                let inner = lock(&self.inner);
                unused
                    .into_iter()
                    .filter(|(k, _)| !inner.index.contains_key(k))
                    .collect()
            };
            self.write_tombstones(&mut a, &dead);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(i: usize) -> (NodeId, ContentHash, Vec<bytes::Bytes>) {
        let body = format!("blob number {i} ").repeat(i % 7 + 1).into_bytes();
        let hash = ContentHash::from_digest(&Sha256::digest(&body).into());
        (NodeId(i as u64 + 1), hash, vec![bytes::Bytes::from(body)])
    }

    fn put(p: &Packs, items: &[(NodeId, ContentHash, Vec<bytes::Bytes>)]) -> u64 {
        let refs: Vec<(NodeId, ContentHash, &[bytes::Bytes])> = items
            .iter()
            .map(|(n, h, b)| (*n, h.clone(), b.as_slice()))
            .collect();
        let (results, syncs) = p.put_many(&refs);
        for r in results {
            r.expect("stored");
        }
        syncs
    }

    fn body(p: &Packs, item: &(NodeId, ContentHash, Vec<bytes::Bytes>)) -> Option<Vec<u8>> {
        p.get(item.0, &item.1).map(|l| p.read(&l).expect("read"))
    }

    #[test]
    fn a_batch_costs_one_fdatasync_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let items: Vec<_> = (0..10).map(blob).collect();
        {
            let p = Packs::open(dir.path()).expect("open");
            assert_eq!(put(&p, &items), 1, "one fdatasync for the whole batch");
            // Stored again: nothing changes for readers.
            assert_eq!(put(&p, &items[..1]), 1);
        }
        let p = Packs::open(dir.path()).expect("reopen");
        for it in &items {
            assert_eq!(body(&p, it).as_deref(), Some(&it.2[0][..]));
        }
        assert_eq!(p.all().len(), 10);
    }

    #[test]
    fn a_torn_tail_is_cut_and_writing_goes_on_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let items: Vec<_> = (0..4).map(blob).collect();
        let pack = {
            let p = Packs::open(dir.path()).expect("open");
            put(&p, &items[..3]);
            p.path(1)
        };
        let whole = std::fs::metadata(&pack).expect("pack").len();
        // A crash mid-append: a whole header, half a body.
        let h = Header {
            kind: KIND_BLOB,
            node: 99,
            hash: [7u8; 32],
            len: 1000,
            written_ns: 1,
            target: (0, 0),
        };
        let mut torn = h.encode(1, whole).to_vec();
        torn.extend([1u8; 300]);
        let f = open_rw(&pack).expect("pack");
        f.write_all_at(&torn, whole).expect("torn write");
        let p = Packs::open(dir.path()).expect("reopen");
        assert_eq!(std::fs::metadata(&pack).expect("pack").len(), whole, "cut");
        put(&p, &items[3..]);
        drop(p);
        let p = Packs::open(dir.path()).expect("reopen");
        for it in &items {
            assert_eq!(body(&p, it).as_deref(), Some(&it.2[0][..]));
        }
    }

    #[test]
    fn a_damaged_record_costs_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let items: Vec<_> = (0..3).map(blob).collect();
        let (pack, locs) = {
            let p = Packs::open(dir.path()).expect("open");
            put(&p, &items);
            let locs: Vec<Loc> = items
                .iter()
                .map(|it| p.get(it.0, &it.1).expect("stored"))
                .collect();
            (p.path(1), locs)
        };
        let f = open_rw(&pack).expect("pack");
        // The second record's header, and the first record's body, damaged.
        f.write_all_at(b"X", locs[1].body - HEADER_LEN + 20)
            .expect("damage");
        f.write_all_at(b"Y", locs[0].body).expect("damage");
        let size = std::fs::metadata(&pack).expect("pack").len();
        let p = Packs::open(dir.path()).expect("reopen");
        assert_eq!(
            std::fs::metadata(&pack).expect("pack").len(),
            size,
            "nothing cut"
        );
        assert!(
            p.get(items[1].0, &items[1].1).is_none(),
            "the damaged header"
        );
        assert_eq!(body(&p, &items[2]).as_deref(), Some(&items[2].2[0][..]));
        // Kept, for the scrub to find corrupt and report.
        let first = body(&p, &items[0]).expect("kept");
        assert_ne!(first, items[0].2[0]);
    }

    #[test]
    fn removed_blobs_stay_removed_and_compaction_frees_packs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let items: Vec<_> = (0..40).map(blob).collect();
        let p = Packs::open_rolling_at(dir.path(), 512).expect("open");
        for chunk in items.chunks(4) {
            put(&p, chunk);
        }
        let packs_before = list(dir.path()).expect("list").len();
        assert!(packs_before > 3, "rolled over: {packs_before}");
        for it in items.iter().skip(1).step_by(2).chain(&items[..1]) {
            assert!(p.remove(it.0, &it.1, None).expect("remove"));
        }
        assert!(!p.remove(items[0].0, &items[0].1, None).expect("again"));
        let deleted = p.compact().expect("compact");
        assert!(deleted > 0, "compaction deleted packs");
        assert!(list(dir.path()).expect("list").len() < packs_before + 2);
        let check = |p: &Packs| {
            for (i, it) in items.iter().enumerate() {
                let kept = i % 2 == 0 && i > 0;
                assert_eq!(
                    body(p, it).as_deref(),
                    kept.then_some(&it.2[0][..]),
                    "blob {i}"
                );
            }
        };
        check(&p);
        drop(p);
        check(&Packs::open_rolling_at(dir.path(), 512).expect("reopen"));
    }

    #[test]
    fn regression_a_blob_stored_again_is_written_again() {
        // A record found at open may never have been made durable: a retried write must not
        // be acknowledged on the strength of it.
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Packs::open(dir.path()).expect("open");
        let x = blob(3);
        put(&p, std::slice::from_ref(&x));
        let first = p.get(x.0, &x.1).expect("stored");
        assert_eq!(put(&p, std::slice::from_ref(&x)), 1, "synced again");
        let second = p.get(x.0, &x.1).expect("stored");
        assert!(second.body > first.body, "a new record");
    }

    #[test]
    fn regression_a_tombstone_removes_only_the_record_it_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x = blob(5);
        {
            let p = Packs::open(dir.path()).expect("open");
            put(&p, std::slice::from_ref(&x));
            let first = p.get(x.0, &x.1).expect("stored");
            // A second copy written, then the removal of the first landing after it (a put
            // racing a remove).
            put(&p, std::slice::from_ref(&x));
            let mut a = lock(&p.active);
            p.write_tombstones(&mut a, &[(key(x.0, &x.1), (first.seq, first.body))]);
        }
        let p = Packs::open(dir.path()).expect("reopen");
        assert_eq!(body(&p, &x).as_deref(), Some(&x.2[0][..]));
        // And a removal of a copy that is no longer the one looked at does nothing.
        let now = p.get(x.0, &x.1).expect("stored");
        assert!(
            !p.remove(x.0, &x.1, Some(now.written_ns + 1))
                .expect("remove")
        );
        assert!(p.remove(x.0, &x.1, Some(now.written_ns)).expect("remove"));
        drop(p);
        let p = Packs::open(dir.path()).expect("reopen");
        assert!(p.get(x.0, &x.1).is_none());
    }

    #[test]
    fn regression_a_header_copied_elsewhere_never_passes_for_a_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = blob(1);
        let (pack, loc_a) = {
            let p = Packs::open(dir.path()).expect("open");
            put(&p, std::slice::from_ref(&a));
            (p.path(1), p.get(a.0, &a.1).expect("stored"))
        };
        // B's body carries a copy of A's header and body; then B's own header is damaged, so
        // the scan searches forward through B's body.
        let f = open_rw(&pack).expect("pack");
        let mut raw = vec![0u8; loc_a.span() as usize];
        f.read_exact_at(&mut raw, loc_a.body - HEADER_LEN)
            .expect("read");
        let b_body = bytes::Bytes::from([b"pad".to_vec(), raw].concat());
        let b = (
            NodeId(77),
            ContentHash::from_digest(&Sha256::digest(&b_body).into()),
            vec![b_body],
        );
        let c = blob(2);
        let loc_b = {
            let p = Packs::open(dir.path()).expect("open");
            put(&p, &[b.clone(), c.clone()]);
            p.get(b.0, &b.1).expect("stored")
        };
        f.write_all_at(b"Z", loc_b.body - HEADER_LEN + 30)
            .expect("damage");
        let p = Packs::open(dir.path()).expect("reopen");
        assert_eq!(p.get(a.0, &a.1), Some(loc_a), "A where it really is");
        assert!(p.get(b.0, &b.1).is_none());
        assert_eq!(body(&p, &c).as_deref(), Some(&c.2[0][..]));
        assert_eq!(p.all().len(), 2, "no phantom record");
    }

    #[test]
    fn regression_a_full_pack_of_tiny_live_blobs_is_not_compacted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Packs::open_rolling_at(dir.path(), 256).expect("open");
        for i in 0..12 {
            let body = bytes::Bytes::from(vec![i as u8; 8]);
            let hash = ContentHash::from_digest(&Sha256::digest(&body).into());
            put(&p, &[(NodeId(100 + i), hash, vec![body])]);
        }
        assert!(list(dir.path()).expect("list").len() > 2);
        assert_eq!(p.compact().expect("compact"), 0, "every record is live");
    }

    #[test]
    fn regression_a_compaction_copy_of_a_blob_stored_again_keeps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x = blob(6);
        {
            let p = Packs::open(dir.path()).expect("open");
            put(&p, std::slice::from_ref(&x));
            let old = p.get(x.0, &x.1).expect("stored");
            // Stored again while a compaction is copying the first record.
            put(&p, std::slice::from_ref(&x));
            p.move_records(vec![(key(x.0, &x.1), old, x.2[0].clone())])
                .expect("copy");
            assert!(p.get(x.0, &x.1).is_some());
        }
        let p = Packs::open(dir.path()).expect("reopen");
        assert_eq!(body(&p, &x).as_deref(), Some(&x.2[0][..]));
    }

    #[test]
    fn regression_a_torn_second_copy_never_shadows_a_good_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x = blob(4);
        let second = {
            let p = Packs::open_rolling_at(dir.path(), 256).expect("open");
            put(&p, std::slice::from_ref(&x));
            put(&p, &[blob(20)]);
            put(&p, std::slice::from_ref(&x));
            let second = p.get(x.0, &x.1).expect("stored");
            put(&p, &[blob(21)]);
            put(&p, &[blob(22)]);
            second
        };
        assert!(second.seq > 1);
        // The second copy's body torn (a crash before the fdatasync that would have covered it).
        let f = open_rw(&dir.path().join(pack_name(second.seq))).expect("pack");
        f.write_all_at(&vec![0u8; second.len as usize], second.body)
            .expect("tear");
        let p = Packs::open_rolling_at(dir.path(), 256).expect("reopen");
        let now = p.get(x.0, &x.1).expect("kept");
        assert_eq!(now.seq, 1, "the good first copy");
        assert_eq!(body(&p, &x).as_deref(), Some(&x.2[0][..]));
    }
}
