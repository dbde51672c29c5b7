//! Crash recovery of the cache: copies that were open for writing when the client died.

use std::time::{SystemTime, UNIX_EPOCH};

use common::{ContentHash, NodeId};

use super::{DfsFs, hash_file};
use crate::cache::CacheEntry;
use crate::error::FsResult;

impl DfsFs {
    /// Sets or clears the durable "open for writing" mark of `node`.
    pub(super) fn set_writing(&self, node: NodeId, on: bool) -> FsResult<()> {
        let _g = self.entry_updates();
        if !on && self.writer_count(node) > 0 {
            // Another handle opened for writing meanwhile: its mark stays.
            return Ok(());
        }
        if let Some(mut e) = self.cache.get(node)?
            && e.writing != on
        {
            e.writing = on;
            // Setting must be durable before the first byte changes; a lost clear only costs a
            // re-hash at the next start. A clean empty copy (a file just created, the common
            // case) needs no fsync: any write makes it non-empty, which `recover` notices.
            if on && !empty_clean(&e, &self.cache.path(node)) {
                self.cache.put(node, &e)?;
            } else {
                self.cache.put_lazy(node, &e)?;
            }
        }
        Ok(())
    }

    /// After a crash: copies still marked "open for writing" may hold writes that were never
    /// recorded. One with a pending upload keeps its newest bytes pending (they are the user's
    /// latest); a clean one that changed is moved to `recovered/` (never pushed over the good
    /// server version, never deleted) and fetched again on the next open.
    pub(super) fn recover(&self) -> FsResult<()> {
        for (node, mut e) in self.cache.entries()? {
            let path = self.cache.path(node);
            let grown_empty = e.pending.is_none()
                && e.hash.as_str() == ContentHash::EMPTY_HEX
                && std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
            if !e.writing && !grown_empty {
                continue;
            }
            let current = match hash_file(&path) {
                Ok((h, _)) => Some(h),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
                Err(err) => return Err(err.into()),
            };
            if current.is_none() && e.pending.is_none() {
                // No copy (a crash before a download or truncation put one in place): nothing
                // to keep, nothing to name.
                self.cache.remove(node)?;
                continue;
            }
            let unchanged = current.as_ref().is_some_and(|h| match &e.pending {
                Some(p) => &p.hash == h,
                None => &e.hash == h,
            });
            if !unchanged && e.pending.is_none() && current.is_some() {
                let dir = self.cache.root().join("recovered");
                std::fs::create_dir_all(&dir)?;
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let to = dir.join(format!("node-{}-{stamp}", node.0));
                std::fs::rename(&path, &to)?;
                // Durable in `recovered/` (and gone from the copies) before the index forgets
                // it: a crash right after must not lose the bytes set aside.
                std::fs::File::open(&dir)?.sync_all()?;
                if let Some(from) = path.parent() {
                    std::fs::File::open(from)?.sync_all()?;
                }
                if let Some(root) = dir.parent() {
                    std::fs::File::open(root)?.sync_all()?;
                }
                tracing::warn!(%node, saved = %to.display(), "a write interrupted by a crash was set aside, not pushed");
                self.cache.remove(node)?;
                continue;
            }
            if !unchanged {
                // Pending and written further: push the newest bytes (recorded as pending now).
                e.writing = false;
                self.cache.put(node, &e)?;
                self.mark_pending(node)?;
                continue;
            }
            e.writing = false;
            self.cache.put(node, &e)?;
        }
        Ok(())
    }
}

/// A copy recorded as the empty version, with no pending change, and empty on disk.
fn empty_clean(e: &CacheEntry, path: &std::path::Path) -> bool {
    e.pending.is_none()
        && e.hash.as_str() == ContentHash::EMPTY_HEX
        && std::fs::metadata(path).is_ok_and(|m| m.len() == 0)
}
