//! The cache's size budget (`--cache-size`). Copies beyond it are evicted, least recently
//! opened first, but only clean, closed ones: a copy with changes not on the servers (pending,
//! unrecorded, open for writing), a copy open here, or one a push or an open is working on
//! right now is never touched. A copy without an index entry is left alone too (its state is
//! unknown). An evicted file is simply downloaded again by its next open.

use common::NodeId;
use std::sync::atomic::Ordering;

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
    /// budget. Returns the bytes freed. Walks the cache's index of copies from the least
    /// recently used, so its cost follows the copies it looks at, not the cache's size.
    pub fn evict(&self) -> FsResult<u64> {
        self.evict_wanted.store(false, Ordering::Relaxed);
        self.cached_since_evict.store(0, Ordering::Relaxed);
        let (_, mut used) = self.cache.usage()?;
        let mut freed = 0;
        let mut cursor = None;
        'walk: while used > self.cache_budget {
            let page = self.cache.least_used(cursor, 256);
            if page.is_empty() {
                break;
            }
            for (node, size, key) in page {
                cursor = Some(key);
                if used <= self.cache_budget {
                    break 'walk;
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

    /// Notes an open of `node` (the order eviction follows).
    pub(super) fn note_open(&self, node: NodeId) {
        self.cache.touch(node);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_budget_is_a_share_of_the_disk() {
        assert_eq!(super::default_budget(100 << 30), 25 << 30);
    }
}
