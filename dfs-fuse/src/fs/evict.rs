//! The cache's size budget (`--cache-size`). Copies beyond it are evicted, least recently
//! opened first, but only clean, closed ones: a copy with changes not on the servers (pending,
//! unrecorded, open for writing), a copy open here, or one a push or an open is working on
//! right now is never touched. A copy without an index entry is left alone too (its state is
//! unknown). An evicted file is simply downloaded again by its next open.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use common::NodeId;

use super::DfsFs;
use crate::error::FsResult;

/// The default budget: this share of the cache's file system.
pub const DEFAULT_BUDGET_PERCENT: u64 = 25;

/// The default budget for a cache on a file system of `total` bytes.
pub fn default_budget(total: u64) -> u64 {
    total / 100 * DEFAULT_BUDGET_PERCENT
}

impl DfsFs {
    /// The cache's size budget in bytes.
    pub fn cache_budget(&self) -> u64 {
        self.cache_budget
    }

    /// Notes `bytes` newly cached; asks the uploader for an eviction pass once they add up to
    /// an eighth of the budget.
    pub(super) fn cached_more(&self, bytes: u64) {
        let since = self.cached_since_evict.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if since >= self.cache_budget / 8 {
            self.evict_wanted.store(true, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// Evicts clean, closed copies, least recently opened first, until the cache fits its
    /// budget. Returns the bytes freed.
    pub fn evict(&self) -> FsResult<u64> {
        self.evict_wanted.store(false, Ordering::Relaxed);
        self.cached_since_evict.store(0, Ordering::Relaxed);
        let mut copies: Vec<(NodeId, u64, SystemTime)> = Vec::new();
        let mut used = 0u64;
        for e in std::fs::read_dir(self.cache.root().join("files"))?.flatten() {
            let Some(node) = e.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let Ok(m) = e.metadata() else { continue };
            used += m.len();
            let used_at = self
                .last_open(NodeId(node))
                .or_else(|| m.modified().ok())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            copies.push((NodeId(node), m.len(), used_at));
        }
        if used <= self.cache_budget {
            return Ok(0);
        }
        copies.sort_by_key(|(_, _, at)| *at);
        let mut freed = 0;
        for (node, size, _) in copies {
            if used <= self.cache_budget {
                break;
            }
            // Whoever works on the file now (a push, an open) keeps it.
            let lock = self.node_locks.get(node);
            let Ok(_g) = lock.try_lock() else { continue };
            if !self.evictable(node)? {
                continue;
            }
            self.cache.remove(node)?;
            used = used.saturating_sub(size);
            freed += size;
        }
        if freed > 0 {
            tracing::debug!(
                freed,
                used,
                budget = self.cache_budget,
                "evicted cached copies"
            );
        }
        Ok(freed)
    }

    /// Whether the copy of `node` may go: clean, closed, indexed.
    fn evictable(&self, node: NodeId) -> FsResult<bool> {
        let Some(e) = self.cache.get(node)? else {
            return Ok(false);
        };
        Ok(e.pending.is_none()
            && !e.writing
            && self.writer_count(node) == 0
            && !self.open_here(node)
            && !self.is_unrecorded(node))
    }

    /// When `node` was last opened here (since the mount started).
    fn last_open(&self, node: NodeId) -> Option<SystemTime> {
        self.opened_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
    }

    /// Notes an open of `node`.
    pub(super) fn note_open(&self, node: NodeId) {
        self.opened_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, SystemTime::now());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_budget_is_a_share_of_the_disk() {
        assert_eq!(super::default_budget(100 << 30), 25 << 30);
    }
}
