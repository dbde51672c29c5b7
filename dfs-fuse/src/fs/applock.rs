//! Application locks through the mount: `flock` and `fcntl` locks are taken in the cluster's
//! lock service (see `dfs_server::lock::app`), for the whole file, so that programs on
//! different clients exclude each other as on one machine. The client renews its session's
//! lease while it holds any; a client that dies loses them when the lease runs out.
//!
//! Content moves whole, so what a lock protects must be read fresh: when a lock is granted, a
//! clean cached copy older than the servers' version is replaced at once, even if a handle has
//! it open for reading (`flock FILE cmd` opens the file before it locks it); the next open
//! then reads, and an append then extends, the newest version.

use std::sync::Arc;
use std::time::Duration;

use common::NodeId;
use common::api::{AppLockConflict, AppLockResponse, LockOwner};

use super::DfsFs;
use crate::cache::CacheEntry;
use crate::error::{FsError, FsResult};

/// The longest one request to the lock service waits before asking again.
const LONG_POLL: Duration = Duration::from_secs(20);

/// The byte ranges one owner has locked on one file: (first, last, shared), disjoint.
pub type Ranges = Vec<(u64, u64, bool)>;

/// `ranges` after an `fcntl` lock or unlock of `first..=last` (POSIX: the new request
/// replaces whatever the owner had over that range; ranges outside it stay).
pub fn apply_range(ranges: &Ranges, first: u64, last: u64, typ: Option<bool>) -> Ranges {
    let mut out = Vec::with_capacity(ranges.len() + 2);
    for &(a, b, sh) in ranges {
        if b < first || a > last {
            out.push((a, b, sh));
            continue;
        }
        if a < first {
            out.push((a, first - 1, sh));
        }
        if b > last {
            out.push((last + 1, b, sh));
        }
    }
    if let Some(shared) = typ {
        out.push((first, last, shared));
    }
    out.sort_unstable();
    out
}

/// The whole-file lock `ranges` need at the lock service: none, shared, or exclusive.
pub fn needed(ranges: &Ranges) -> Option<bool> {
    if ranges.is_empty() {
        None
    } else {
        Some(ranges.iter().all(|r| r.2))
    }
}

impl DfsFs {
    fn app_owner(&self, owner: u64) -> LockOwner {
        LockOwner {
            session: self.session.clone(),
            owner,
        }
    }

    /// Takes a lock on `node` for `owner` (the kernel's lock owner), shared or exclusive;
    /// `block`: waits for it (the caller may drop this future, then `app_unlock`), else answers
    /// `WouldBlock` at once if it is held elsewhere.
    pub async fn app_lock(
        &self,
        node: NodeId,
        owner: u64,
        shared: bool,
        block: bool,
    ) -> FsResult<()> {
        let who = self.app_owner(owner);
        // An unlock of this owner still on its way goes first.
        drop(self.unlocking.get((node, owner)).lock().await);
        self.app_locks_touched(node, owner, true);
        loop {
            let wait = if block { LONG_POLL } else { Duration::ZERO };
            match self.remote.app_lock(node, &who, shared, wait).await? {
                AppLockResponse::Granted { lease_ms } => {
                    self.app_lease_ms
                        .store(lease_ms, std::sync::atomic::Ordering::Relaxed);
                    self.remote.note_lease(lease_ms);
                    self.app_granted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((node, owner));
                    break;
                }
                // Stays known (and renewed) either way: an owner whose upgrade was refused
                // keeps the lock it had.
                AppLockResponse::Busy => return Err(FsError::WouldBlock),
                AppLockResponse::Queued { .. } => {}
            }
        }
        self.lock_wake.notify_one();
        if let Err(e) = self.refresh_after_lock(node).await {
            // The lock is held; the copy could not be brought up to date (the servers are
            // away): the next open checks again, as always.
            tracing::warn!(%node, error = %e, "refreshing a file after locking it failed");
        }
        Ok(())
    }

    /// A lock or unlock of a byte range (`typ`: Some(shared), None to unlock) by `owner`.
    /// Content moves whole, so the lock service holds one whole-file lock per owner: the
    /// strongest its ranges need, given up when none is left (so releasing one range, as
    /// SQLite does, keeps the others locked). `block`: wait for a conflicting holder.
    pub async fn app_setlk(
        &self,
        node: NodeId,
        owner: u64,
        (first, last): (u64, u64),
        typ: Option<bool>,
        block: bool,
    ) -> FsResult<()> {
        let key = (node, owner);
        let before = self
            .app_ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
            .unwrap_or_default();
        let after = apply_range(&before, first, last.max(first), typ);
        let (had, need) = (needed(&before), needed(&after));
        if had != need {
            match need {
                None => self.app_unlock_pushed(node, owner).await?,
                Some(shared) => self.app_lock(node, owner, shared, block).await?,
            }
        }
        let mut all = self.app_ranges.lock().unwrap_or_else(|p| p.into_inner());
        if after.is_empty() {
            all.remove(&key);
        } else {
            all.insert(key, after);
        }
        Ok(())
    }

    /// An explicit unlock (`flock -u`, `F_UNLCK`): changes made under the lock reach the
    /// servers first, so that the next holder reads them.
    pub async fn app_unlock_pushed(&self, node: NodeId, owner: u64) -> FsResult<()> {
        if self.has_local_changes(node) {
            let deadline = tokio::time::Instant::now() + self.config.close_timeout;
            if let Err(e) = self.push(node, deadline, true).await {
                tracing::warn!(%node, error = %e, "pushing before an unlock failed; the change stays pending");
            }
        }
        self.app_unlock(node, owner).await
    }

    /// Gives up `owner`'s lock on `node` (or its place in the queue).
    pub async fn app_unlock(&self, node: NodeId, owner: u64) -> FsResult<()> {
        // Once asked, the lock is no longer renewed whatever the answer: one whose unlock is
        // lost lapses with the lease.
        self.app_locks_touched(node, owner, false);
        self.app_ranges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(node, owner));
        self.remote.app_unlock(node, &self.app_owner(owner)).await?;
        Ok(())
    }

    /// Gives up `owner`'s lock on `node` in the background (a release, which the kernel does
    /// not wait for); a later `app_lock` of the same owner waits for it.
    pub fn app_unlock_later(self: &Arc<Self>, node: NodeId, owner: u64) {
        let guard = self.unlocking.get((node, owner)).try_lock_owned().ok();
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.app_unlock(node, owner).await {
                tracing::warn!(%node, error = %e, "unlocking at release failed; the lock lapses with its lease");
            }
            drop(guard);
        });
    }

    /// Whether `owner` may hold or wait for a lock on `node` (so that closing its file must
    /// give it up); a close costs no round trip otherwise.
    pub fn app_lock_known(&self, node: NodeId, owner: u64) -> bool {
        self.app_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(node, owner))
    }

    /// The holder a request of `owner` would conflict with (`F_GETLK`).
    pub async fn app_test(
        &self,
        node: NodeId,
        owner: u64,
        shared: bool,
    ) -> FsResult<Option<AppLockConflict>> {
        Ok(self
            .remote
            .app_test(node, &self.app_owner(owner), shared)
            .await?)
    }

    fn app_locks_touched(&self, node: NodeId, owner: u64, held: bool) {
        let mut l = self.app_locks.lock().unwrap_or_else(|p| p.into_inner());
        if held {
            l.insert((node, owner));
        } else {
            l.remove(&(node, owner));
            self.app_granted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(node, owner));
        }
    }

    /// Renews this client's application locks (a third of the lease apart) until `cancel`.
    pub async fn run_lock_renewals(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            let lease = self
                .app_lease_ms
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(300);
            let held: Vec<(NodeId, u64)> = self
                .app_locks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect();
            if !held.is_empty() {
                let want = {
                    let g = self.app_granted.lock().unwrap_or_else(|p| p.into_inner());
                    held.iter().filter(|k| g.contains(k)).count()
                };
                match self.remote.app_renew(&self.session, held).await {
                    // POSIX has no way to tell a process its lock is gone: say it loudly.
                    Ok(n) if n < u64::try_from(want).unwrap_or(u64::MAX) => tracing::error!(
                        held = want,
                        renewed = n,
                        "application locks lapsed at the lock service (lease ran out): another \
                         process may now hold them while this one believes it does"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "renewing application locks failed"),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.lock_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(lease / 3)) => {}
            }
        }
    }

    /// Whether the copy of `node` holds nothing the servers lack: nothing pending or
    /// unrecorded, and no handle open on it wrote anything (an append handle opened before the
    /// lock, as in `exec 9>>log; flock 9`, may still be brought up to date).
    fn unchanged_here(&self, node: NodeId) -> bool {
        if self.cache.is_pending(node) || self.is_unrecorded(node) {
            return false;
        }
        let passthrough = self.passthrough.load(std::sync::atomic::Ordering::Relaxed);
        self.handles_of(node).iter().all(|h| {
            !h.writable || (!h.changed() && (h.append || !passthrough || h.provably_unchanged()))
        })
    }

    /// Whether a failed refresh damaged the copy of `node` (its writers' closes fail).
    pub(super) fn torn_copy(&self, node: NodeId) -> bool {
        self.torn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&node)
    }

    /// After a lock is granted: replaces a clean copy older than the servers' version, even
    /// one open here for reading (those handles keep the old bytes; new opens get the new).
    async fn refresh_after_lock(&self, node: NodeId) -> FsResult<()> {
        let lock = self.node_locks.get(node);
        let Ok(_g) = tokio::time::timeout(self.config.close_timeout, lock.lock()).await else {
            return Ok(());
        };
        if !self.unchanged_here(node) {
            return Ok(());
        }
        if self.torn_copy(node) {
            return Ok(());
        }
        let Some(entry) = self.cache.get(node)? else {
            return Ok(());
        };
        if !self.cache.path(node).exists() {
            return Ok(());
        }
        let mut meta = self.remote.get_to_open(node, libc::O_RDONLY).await?;
        self.remember(&meta, None);
        if meta.kind != common::FileKind::File {
            return Ok(());
        }
        if meta.writeback.is_some() {
            meta = self.wait_for_writeback(meta).await?;
        }
        if entry.hash == meta.hash {
            return self.rebase(node, &meta);
        }
        let tmp = self.cache.tmp_path();
        if meta.hash.as_str() == common::ContentHash::EMPTY_HEX {
            std::fs::File::create(&tmp)?.sync_all()?;
        } else if let Err(e) = self.remote.download(&meta, &tmp).await {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        if !self.unchanged_here(node) {
            // Written meanwhile (a writer needs no node lock once the file is open): keep it.
            let _ = std::fs::remove_file(&tmp);
            return Ok(());
        }
        if self.open_here(node) {
            // Kernel passthrough binds the inode to this very cache file while it is open:
            // the new content goes into it in place. Until that is done and durable the
            // index names no content for it, so a crash in between is caught by `recover`.
            let rewrite = || -> FsResult<()> {
                self.cache
                    .put(node, &CacheEntry::being_replaced(meta.version))?;
                let mut src = std::fs::File::open(&tmp)?;
                let mut dst = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(self.cache.path(node))?;
                std::io::copy(&mut src, &mut dst)?;
                dst.sync_all()?;
                Ok(())
            };
            let r = rewrite();
            let _ = std::fs::remove_file(&tmp);
            if let Err(e) = r {
                // The copy is damaged. Nobody reads it as a version again: without writers it
                // is dropped (fetched again by the next open); writers' closes fail rather
                // than push it.
                if self.writer_count(node) == 0 {
                    self.cache.remove(node)?;
                } else {
                    self.torn
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(node);
                }
                return Err(e);
            }
            // The handles open on it did not change it: it is their starting point now.
            for h in self.handles_of(node) {
                h.mark_clean();
            }
        } else {
            self.install(node, &tmp)?;
        }
        self.cached_more(meta.size);
        self.cache.put(
            node,
            &CacheEntry {
                writing: self.writer_count(node) > 0,
                ..CacheEntry::clean(&meta)
            },
        )?;
        tracing::debug!(%node, version = meta.version, "copy refreshed for a lock holder");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: u64 = i64::MAX as u64;

    #[test]
    fn releasing_one_range_keeps_the_others_as_sqlite_needs() {
        // SQLite: read-lock the PENDING byte, then the SHARED range, then release PENDING.
        let r = apply_range(&vec![], 100, 100, Some(true));
        let r = apply_range(&r, 200, 700, Some(true));
        let r = apply_range(&r, 100, 100, None);
        assert_eq!(r, vec![(200, 700, true)]);
        assert_eq!(needed(&r), Some(true), "still read-locked");
        // Write-lock a byte inside: exclusive; unlock it again: back to shared.
        let w = apply_range(&r, 300, 300, Some(false));
        assert_eq!(needed(&w), Some(false));
        assert_eq!(
            w,
            vec![(200, 299, true), (300, 300, false), (301, 700, true)]
        );
        let back = apply_range(&w, 300, 300, None);
        assert_eq!(needed(&back), Some(true));
        // Unlocking the whole file drops everything.
        assert_eq!(needed(&apply_range(&back, 0, END, None)), None);
        assert_eq!(
            apply_range(&vec![(0, END, false)], 0, 9, None),
            vec![(10, END, false)]
        );
    }
}
