//! The upload protocol: record a change as pending, push it under the file's lock with its
//! fencing token, retry what failed in the background. Latency budget of a close in the default
//! mode is in ARCHITECTURE.md ("Write path").

use std::sync::Arc;
use std::time::Duration;

use common::api::SetAttrRequest;
use common::{NodeId, NodeMeta, UploadId};
use tokio::time::Instant;

use super::{DfsFs, FoldedAttrs, hash_file};

/// The identity of `meta`'s owner as a local caller (its private group, no others): who a
/// push of a change whose maker is unknown acts as on a `--local-ids` mount.
fn owner_of(meta: &NodeMeta) -> common::Identity {
    common::Identity {
        uid: meta.uid,
        gid: meta.gid,
        groups: vec![],
        admin: meta.uid == 0,
    }
}
use crate::cache::{CacheEntry, Pending};
use crate::error::{FsError, FsResult};
use crate::remote::RemoteError;

/// How long the background uploader lets closes gather after being woken, so that a burst of
/// write-back closes (tar, a build) goes out in batches rather than one file at a time. Adds at
/// most this much (`BATCH_WINDOW_BUSY` during a sustained burst) to the time a write-back close
/// waits to reach the servers.
const BATCH_WINDOW: Duration = Duration::from_millis(30);
/// The window after a pass that pushed at least `BUSY_PASS` files: a sustained burst goes out
/// in fuller batches.
const BATCH_WINDOW_BUSY: Duration = Duration::from_millis(100);
const BUSY_PASS: usize = 8;

/// How long a test holds a push, lock granted, at the fault point `push-hold` (ms).
fn push_hold() -> Option<u64> {
    fail::fail_point!("push-hold", |v| v.and_then(|v| v.parse().ok()));
    None
}

/// Whether a lease renewal goes out (a test may drop them at the fault point `lock-renew`).
fn renewal_allowed() -> bool {
    fail::fail_point!("lock-renew", |_| false);
    true
}

impl DfsFs {
    /// Records the local copy of `node` as pending (keeping the upload id if the content is
    /// the same as an earlier pending attempt). Returns the pending upload, or None if the copy
    /// equals the server version.
    pub(super) fn mark_pending(&self, node: NodeId) -> FsResult<Option<(CacheEntry, Pending)>> {
        let path = self.cache.path(node);
        let (hash, size) = match hash_file(&path) {
            Ok(v) => v,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // The copy is gone (its file was deleted here): a pending record left by a
                // crash before the deletion's record reached the disk names nothing to push.
                if self.cache.get(node)?.is_some_and(|e| e.pending.is_some()) {
                    self.cache.remove(node)?;
                }
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let _g = self.entry_updates();
        let mut entry = self.cache.get(node)?.unwrap_or_else(CacheEntry::unknown);
        let pending = match &entry.pending {
            Some(p) if p.hash == hash => p.clone(),
            _ if entry.pending.is_none() && entry.hash == hash => return Ok(None),
            previous => {
                let mut earlier = previous
                    .as_ref()
                    .map(|p| {
                        let mut e = p.earlier.clone();
                        e.push(p.hash.clone());
                        e
                    })
                    .unwrap_or_default();
                let excess = earlier.len().saturating_sub(crate::cache::EARLIER_PENDING);
                earlier.drain(..excess);
                Pending {
                    upload_id: UploadId::from_bytes(rand::random()),
                    hash,
                    size,
                    earlier,
                }
            }
        };
        entry.pending = Some(pending.clone());
        fail::fail_point!("record-pending", |_| Err(crate::error::FsError::Io(
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        )));
        // Survives a crash of this process without an fsync: a close that began is pushed
        // after a restart (the upload id makes a resend harmless).
        self.cache.record(node, &entry)?;
        Ok(Some((entry, pending)))
    }

    /// Pushes the local copy of `node` if it differs from the server's, retrying until
    /// `deadline`. Serialised per node with open(). Attribute changes folded into this push
    /// (see `setattr`) go with it, or alone if the content did not change. `waiting`: a close
    /// or fsync waits for this push, which may then replace a version newer than the one the
    /// copy was based on (last close wins); any other push that finds a newer version keeps
    /// its content as a conflict copy instead (`conflict.rs`).
    pub async fn push(&self, node: NodeId, deadline: Instant, waiting: bool) -> FsResult<()> {
        let lock = self.node_locks.get(node);
        // Another push of this file (an earlier close, the uploader) ends within the close
        // timeout of no progress; this one waits for it no longer than its own deadline.
        let Ok(_g) = tokio::time::timeout_at(deadline, lock.lock()).await else {
            return Err(FsError::Remote(RemoteError::Timeout(
                "another push of this file is still running".into(),
            )));
        };
        let started = std::time::Instant::now();
        if self.torn_copy(node) {
            return Err(FsError::Io(std::io::Error::other(
                "the cached copy was damaged by a refresh that failed (cache disk full?); \
                 changes written to it since are not pushed: reopen the file and write again",
            )));
        }
        let Some((mut entry, mut pending)) = self.mark_pending(node)? else {
            return self.apply_folded_attrs(node).await;
        };
        let mut backoff = Duration::from_millis(200);
        let mut rebased = false;
        // Bytes moving keep the push going past `deadline`; nothing moving for the close
        // timeout ends it, whatever an attempt is waiting on.
        let progress = crate::progress::Progress::new();
        let window = self.config.close_timeout;
        loop {
            let until = |p: &crate::progress::Progress| p.extend(deadline, window);
            let attrs = self.folded_attrs(node);
            let base = common::api::PushBase {
                version: entry.version,
                waiting,
            };
            match self
                .push_once(node, &pending, base, &attrs, until(&progress), &progress)
                .await
            {
                Ok(meta) => {
                    self.settle_push(node, &pending, &attrs, &meta)?;
                    self.metrics.push_done(started.elapsed());
                    return self.folded_mode_applied(node, &attrs, &meta, waiting);
                }
                // Only the directory saying so means the file is gone (a NotFound from another
                // service, e.g. an unknown route after a restart, does not).
                Err(e)
                    if e.is_not_found()
                        && tokio::time::timeout_at(until(&progress), self.remote.get(node))
                            .await
                            .is_ok_and(|r| r.is_err_and(|d| d.is_not_found())) =>
                {
                    tracing::info!(%node, "file was deleted; dropping its unpushed changes");
                    self.drop_cached(node);
                    return Ok(());
                }
                Err(RemoteError::Api {
                    code: common::ErrorCode::Conflict,
                    message,
                }) => {
                    if !rebased
                        && let Ok(m) = self.remote.get(node).await
                        && pending.earlier.contains(&m.hash)
                        && let Some(e) = self.rebase_pending(node, &pending, &m)?
                    {
                        // The newer version is an earlier push of this very copy whose answer
                        // was lost: this change is based on it.
                        tracing::info!(%node, version = m.version, "the newer version is this client's own earlier push; resending on it");
                        entry = e;
                        rebased = true;
                        continue;
                    }
                    tracing::info!(%node, %message, "push refused as a conflict");
                    self.keep_conflict_copy(node, &pending).await?;
                    return Ok(());
                }
                Err(
                    e @ RemoteError::Api {
                        code: common::ErrorCode::AccessDenied,
                        ..
                    },
                ) => {
                    // This user may not write the file (any more: a chmod since the open). A
                    // close that waits is told EACCES; the change stays pending. On an
                    // ordinary mount every change is this login's own, and the next background
                    // push keeps it aside as for a conflict instead of retrying for ever. On a
                    // `--local-ids` mount the change may be another local user's than the
                    // one this push acted as: a refusal for permission never takes it away
                    // (no conflict copy, no `recovered/`); it stays pending, listed by
                    // `dfs status`, retried with a long back-off.
                    tracing::warn!(%node, error = %e, "push refused: no permission to write this file");
                    if self.remote.local_ids() {
                        self.refused
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(node);
                    }
                    if waiting || self.remote.local_ids() {
                        return Err(e.into());
                    }
                    self.keep_conflict_copy(node, &pending).await?;
                    return Ok(());
                }
                Err(RemoteError::Api {
                    code: common::ErrorCode::HashMismatch,
                    ..
                }) if Instant::now() + backoff < until(&progress) => {
                    // The copy changed while it was being sent: hash it again and resend.
                    match self.mark_pending(node)? {
                        Some((e, p)) => (entry, pending) = (e, p),
                        None => return Ok(()),
                    }
                }
                Err(e) => {
                    use common::ErrorCode::{
                        Forbidden, HashMismatch, NotHolder, NotPrimary, StaleFence,
                    };
                    let moved = matches!(
                        &e,
                        RemoteError::Api {
                            code: NotPrimary,
                            ..
                        }
                    );
                    if moved || e.is_unreachable() {
                        // The placement may have moved (failover): learn the current one before
                        // resending, instead of knocking at a dead or deposed primary again.
                        // Within this push's time: the directory may be what is down, and the
                        // metadata read retries for as long as the op timeout.
                        if let Ok(Ok(m)) =
                            tokio::time::timeout_at(until(&progress), self.remote.get(node)).await
                        {
                            self.remember(&m, None);
                        }
                    }
                    let retryable = e.is_unreachable()
                        || e.is_not_found()
                        || matches!(&e, RemoteError::Api { code, .. } if matches!(code,
                            StaleFence | HashMismatch | NotHolder | NotPrimary | Forbidden));
                    if !retryable || Instant::now() + backoff >= until(&progress) {
                        tracing::warn!(%node, error = %e, "push failed; changes kept in the cache and retried later");
                        return Err(e.into());
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Bases the pending change `pending` of `node` on `meta`'s version; the entry as recorded,
    /// or None if the pending change was replaced meanwhile.
    fn rebase_pending(
        &self,
        node: NodeId,
        pending: &Pending,
        meta: &NodeMeta,
    ) -> FsResult<Option<CacheEntry>> {
        let _g = self.entry_updates();
        let Some(mut e) = self.cache.get(node)? else {
            return Ok(None);
        };
        if e.pending.as_ref().map(|p| &p.upload_id) != Some(&pending.upload_id) {
            return Ok(None);
        }
        e.version = meta.version;
        e.hash = meta.hash.clone();
        self.cache.record(node, &e)?;
        Ok(Some(e))
    }

    /// Bookkeeping of a push the servers accepted: the pushed content becomes clean.
    pub(super) fn settle_push(
        &self,
        node: NodeId,
        pending: &Pending,
        attrs: &FoldedAttrs,
        meta: &NodeMeta,
    ) -> FsResult<()> {
        // Only the pushed content becomes clean: a pending record written meanwhile
        // (by release) for newer content stays, now based on the version just pushed.
        let g = self.entry_updates();
        let mut entry = self.cache.get(node)?.unwrap_or_else(CacheEntry::unknown);
        if meta.hash == pending.hash {
            entry.version = meta.version;
            entry.hash = meta.hash.clone();
        } else {
            // A retried upload that was applied before a newer version: the copy
            // holds our content, not the server's newest, so the next open fetches.
            entry.version = 0;
            entry.hash = pending.hash.clone();
        }
        if entry
            .pending
            .as_ref()
            .is_some_and(|p| p.upload_id == pending.upload_id)
        {
            entry.pending = None;
            if self.writer_count(node) == 0 {
                self.forget_actor(node);
            }
        }
        fail::fail_point!("settle-before-write");
        if entry.pending.is_some() {
            // Newer content waits: it must not come back after a crash as based on the older
            // version (it would then be taken for a conflict).
            self.cache.record(node, &entry)?;
        } else {
            self.cache.put_lazy(node, &entry)?;
        }
        drop(g);
        self.remember(meta, None);
        // The kernel may hold attributes from before this commit (a push that finished after
        // its close or truncate answered): this client's own commits never come back in its
        // feed, so it tells its kernel itself (a local call, no round trip).
        self.to_kernel(vec![super::feed::Invalidation::Inode(node)]);
        self.retry_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
        self.settle_folded_attrs(node, attrs);
        self.writeback_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
        Ok(())
    }

    /// One attempt: take the lock (renewing the lease meanwhile), upload to the primary named
    /// by the metadata this client already has, and answer; the unlock goes out after the
    /// answer, off the critical path (a lost unlock costs others one lease at worst).
    async fn push_once(
        &self,
        node: NodeId,
        pending: &Pending,
        base: common::api::PushBase,
        attrs: &FoldedAttrs,
        deadline: Instant,
        progress: &crate::progress::Progress,
    ) -> Result<NodeMeta, RemoteError> {
        let waiter = UploadId::from_bytes(rand::random());
        let t = std::time::Instant::now();
        // Bounded by the push's deadline: the write capability comes from the directory, whose
        // calls otherwise retry for the whole op timeout.
        let acquired =
            tokio::time::timeout_at(deadline, self.remote.acquire(node, &waiter, deadline))
                .await
                .unwrap_or_else(|_| {
                    Err(RemoteError::Timeout(
                        "no lock grant before the push's deadline".into(),
                    ))
                });
        let grant = match acquired {
            Ok(g) => g,
            Err(e) => {
                // A grant whose answer was lost must not block everyone for a whole lease.
                self.release_later(node, waiter);
                return Err(e);
            }
        };
        self.metrics.stage("lock", t.elapsed());
        let renew_every = Duration::from_millis(grant.lease_ms / 3).max(Duration::from_millis(50));
        let upload = async {
            // Tests hold a push here, lock granted, as long as they like (a slow client).
            if let Some(ms) = push_hold() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let meta = match self.known_meta(node) {
                Some(m) if m.primary.is_some() => m,
                _ => {
                    let m = tokio::time::timeout_at(deadline, self.remote.get(node))
                        .await
                        .map_err(|_| {
                            RemoteError::Timeout(
                                "the file's metadata before the push's deadline".into(),
                            )
                        })??;
                    self.remember(&m, None);
                    m
                }
            };
            let t = std::time::Instant::now();
            let path = self.cache.path(node);
            let up = crate::remote::Upload {
                path: &path,
                hash: &pending.hash,
                size: pending.size,
                grant: &grant,
                upload_id: &pending.upload_id,
                base,
                progress,
                mode: attrs.mode,
                mtime_ns: attrs.mtime_ns,
            };
            let r = self.remote.upload(&meta, &up).await;
            fail::fail_point!("upload-answer-lost", r.is_ok(), |_| Err(
                RemoteError::Network("fault injected: the upload's answer was lost".into())
            ));
            self.metrics.stage("upload", t.elapsed());
            r
        };
        // Renewals run beside the upload (polled together), never in its way.
        let renewals = async {
            loop {
                tokio::time::sleep(renew_every).await;
                let r = if renewal_allowed() {
                    self.remote.renew(node, &waiter).await.map(drop)
                } else {
                    Err(RemoteError::Network("fault injected: renewal lost".into()))
                };
                if let Err(e) = r {
                    tracing::warn!(%node, error = %e, "lock renewal failed");
                }
            }
        };
        let result = {
            tokio::pin!(upload);
            tokio::pin!(renewals);
            tokio::select! {
                r = &mut upload => r,
                never = &mut renewals => never,
            }
        };
        self.release_later(node, waiter);
        result
    }

    async fn push_one_pending(&self, node: NodeId, deadline: Instant, backoff: bool) {
        if self.writer_count(node) > 0 {
            return;
        }
        let now = Instant::now();
        let waiting = self
            .retry_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied();
        if backoff && waiting.is_some_and(|(at, _)| at > now) {
            return;
        }
        // Nobody waits for this push: it applies only over the version it was based on. It
        // acts as the local caller whose handle made the change (`--local-ids`).
        let pushed = match self.push_actor(node).await {
            Ok(who) => crate::caller::scope(who, self.push(node, deadline, false)).await,
            Err(e) => Err(e),
        };
        match pushed {
            Ok(()) => {
                self.retry_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node);
            }
            Err(e) => {
                // Refusals the user must act on back off long; anything else (servers away,
                // a failover in progress) is transient.
                use common::ErrorCode::{
                    AccessDenied, BadRequest, NotAdministrator, TooLarge, Unauthorized,
                };
                let cap = match &e {
                    FsError::Remote(RemoteError::Api {
                        code: Unauthorized | TooLarge | BadRequest | AccessDenied | NotAdministrator,
                        ..
                    }) => Duration::from_secs(300),
                    _ => Duration::from_secs(10),
                };
                let next = waiting.map_or(Duration::from_secs(2), |(_, d)| (d * 2).min(cap));
                self.retry_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node, (Instant::now() + next, next));
                tracing::debug!(%node, error = %e, retry_in = ?next, "pending upload not done yet");
            }
        }
    }

    /// Write-back close: records the change as pending (crash-safe, no fsync), announces the
    /// push at the directory so that other clients' opens wait for it, and leaves the push to
    /// the background uploader. Returns false when the close must push now instead (the
    /// dirty-bytes bound is reached, or the announcement failed).
    pub(super) async fn writeback(&self, h: &super::Handle) -> FsResult<bool> {
        let node = h.node;
        let size = h.file().metadata()?.len();
        let dirty: u64 = self
            .writeback_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(n, _)| **n != node)
            .map(|(_, s)| *s)
            .sum();
        if dirty + size > self.config.writeback_max_dirty {
            return Ok(false);
        }
        let lock = self.node_locks.get(node);
        let guard = lock.lock().await;
        let Some((_, pending)) = self.mark_pending(node)? else {
            drop(guard);
            self.apply_folded_attrs(node).await?;
            return Ok(true);
        };
        let req = common::api::IntentRequest {
            upload_id: pending.upload_id.clone(),
            lease_ms: u64::try_from(super::WRITEBACK_INTENT.as_millis()).unwrap_or(u64::MAX),
        };
        if let Err(e) = self.remote.intent(node, &req).await {
            tracing::debug!(%node, error = %e, "announcing a write-back push failed; pushing now");
            return Ok(false);
        }
        self.writeback_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, pending.size);
        self.wake.notify_one();
        Ok(true)
    }

    /// On a `--local-ids` mount, records that the change of `node` about to be pending was
    /// made through a handle opened by `opener` (None: the mount's login): pushes no caller
    /// waits for act as it.
    pub(super) fn note_actor(&self, node: NodeId, opener: Option<&common::Identity>) {
        if self.remote.local_ids() {
            self.actors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node, opener.cloned());
        }
    }

    /// Forgets who made the change of `node` (pushed, kept aside, or gone).
    pub(super) fn forget_actor(&self, node: NodeId) {
        self.actors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
        self.refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    /// Who a push of `node` that no caller waits for acts as, if that can be told without
    /// asking the directory: the mount's login on an ordinary mount; on a `--local-ids` mount
    /// the local caller whose handle made the change, or, when this process did not see it
    /// made (a change left pending by an earlier run), the file's owner as last heard.
    pub(super) fn actor_now(&self, node: NodeId) -> Option<Option<common::Identity>> {
        if !self.remote.local_ids() {
            return Some(None);
        }
        if let Some(who) = self
            .actors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
        {
            return Some(who.clone());
        }
        self.known_meta(node).map(|m| Some(owner_of(&m)))
    }

    /// `actor_now`, asking the directory for the owner if need be.
    pub(super) async fn push_actor(&self, node: NodeId) -> FsResult<Option<common::Identity>> {
        if let Some(who) = self.actor_now(node) {
            return Ok(who);
        }
        match crate::caller::scope(None, self.remote.get(node)).await {
            Ok(meta) => {
                self.remember(&meta, None);
                Ok(Some(owner_of(&meta)))
            }
            // Deleted while this client was away: no one may write it any more, and the push
            // (as the mount's login) meets the directory's "not found" and drops the copy,
            // instead of the change staying pending forever.
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Pending changes a push refused for permission (`--local-ids`): kept, listed by
    /// `dfs status`, retried with a long back-off.
    pub(super) fn refused_uploads(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|n| n.0)
            .collect();
        v.sort_unstable();
        v
    }

    /// A mode folded into a push that the directory did not apply (it applies one only from
    /// the file's owner, and the owner changed since the chmod) is never lost silently: it is
    /// logged, and the close or fsync waiting for the push is told EPERM (the content is
    /// committed).
    pub(super) fn folded_mode_applied(
        &self,
        node: NodeId,
        attrs: &FoldedAttrs,
        meta: &NodeMeta,
        waiting: bool,
    ) -> FsResult<()> {
        match attrs.mode {
            Some(m) if meta.mode & 0o7777 != m => {
                tracing::warn!(%node, mode = %format!("{m:o}"), "a chmod folded into a push was not applied: the pusher does not own the file (any more)");
                if waiting {
                    return Err(FsError::Io(std::io::Error::from_raw_os_error(libc::EPERM)));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Attribute changes waiting for the next push of `node`.
    pub(super) fn folded_attrs(&self, node: NodeId) -> FoldedAttrs {
        self.folded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
            .unwrap_or_default()
    }

    /// Forgets the folded changes a push carried (unless they changed again meanwhile).
    fn settle_folded_attrs(&self, node: NodeId, sent: &FoldedAttrs) {
        let mut f = self.folded.lock().unwrap_or_else(|p| p.into_inner());
        if f.get(&node) == Some(sent) {
            f.remove(&node);
        }
    }

    /// Applies folded attribute changes on their own (the content did not change).
    async fn apply_folded_attrs(&self, node: NodeId) -> FsResult<()> {
        let attrs = self.folded_attrs(node);
        if attrs == FoldedAttrs::default() {
            return Ok(());
        }
        let req = SetAttrRequest {
            mode: attrs.mode,
            mtime_ns: attrs.mtime_ns,
            ..SetAttrRequest::default()
        };
        let m = self.set_attrs(node, &req).await?;
        self.remember(&m, None);
        self.settle_folded_attrs(node, &attrs);
        Ok(())
    }

    /// Whether `node` has changes here that could not be recorded yet.
    pub(super) fn is_unrecorded(&self, node: NodeId) -> bool {
        self.unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&node)
    }

    /// Tries again to record the changes of `node` that could not be recorded; the error if it
    /// still fails (a close or fsync of the file reports it).
    pub(super) fn record_unrecorded(&self, node: NodeId) -> FsResult<()> {
        let Some(generation) = self
            .unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .copied()
        else {
            return Ok(());
        };
        self.mark_pending(node)?;
        let mut set = self.unrecorded.lock().unwrap_or_else(|p| p.into_inner());
        // A failure recorded since this attempt began stays.
        if set.get(&node) == Some(&generation) {
            set.remove(&node);
        }
        drop(set);
        tracing::info!(%node, "changes that could not be recorded are recorded now");
        Ok(())
    }

    /// Nodes with changes not yet on the servers, or open for writing here (whose changes may
    /// not even be recorded yet).
    pub fn unsettled(&self) -> FsResult<Vec<NodeId>> {
        let mut v = self.pending()?;
        v.extend(
            self.unrecorded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied(),
        );
        v.extend(
            self.writers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied(),
        );
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Handles open for writing.
    pub fn open_writers(&self) -> usize {
        self.writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .sum()
    }

    /// Nodes with changes not yet on the servers.
    pub fn pending(&self) -> FsResult<Vec<NodeId>> {
        Ok(self.cache.pending_nodes())
    }

    /// Pushes every pending node not open for writing; returns those still pending.
    /// With `backoff`, a node that failed recently waits its turn (2 s doubling to 10 s while
    /// the servers are unreachable, to 5 min while they refuse), so a push the servers keep
    /// refusing is not re-sent every pass.
    pub async fn push_pending(&self, deadline: Instant, backoff: bool) -> FsResult<Vec<NodeId>> {
        let unrecorded: Vec<NodeId> = self
            .unrecorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        for node in unrecorded {
            if let Err(e) = self.record_unrecorded(node) {
                tracing::warn!(%node, error = %e, "changes still cannot be recorded");
            }
        }
        let mut nodes = self.pending()?;
        // Folded attribute changes of files whose content was already pushed.
        nodes.extend(
            self.folded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied(),
        );
        nodes.sort();
        nodes.dedup();
        // Small files with one primary go in batches; what a batch did not settle, and
        // everything else, one by one.
        let (batches, mut single) = self.plan_batches(nodes, backoff);
        let left: Vec<Vec<NodeId>> =
            futures_util::StreamExt::collect(futures_util::StreamExt::buffer_unordered(
                futures_util::stream::iter(
                    batches
                        .into_iter()
                        .map(|(who, b)| crate::caller::scope(who, self.push_batch(b, deadline))),
                ),
                2,
            ))
            .await;
        single.extend(left.into_iter().flatten());
        // Several at once: their commits share fsyncs at the directory and the file servers.
        let concurrency = self.config.upload_concurrency.max(1);
        futures_util::StreamExt::for_each_concurrent(
            futures_util::stream::iter(single),
            concurrency,
            |node| async move { self.push_one_pending(node, deadline, backoff).await },
        )
        .await;
        self.write_status_throttled();
        self.pending()
    }

    /// Background loop: retries pending uploads with back-off until `cancel`.
    pub async fn run_uploader(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        let mut window = BATCH_WINDOW;
        loop {
            if self.evict_wanted.load(std::sync::atomic::Ordering::Relaxed) {
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.evict()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "evicting cached copies failed"),
                    Err(e) => tracing::warn!(error = %e, "evicting cached copies failed"),
                    Ok(Ok(_)) => {}
                }
            }
            // Short attempts: a node being retried is locked for at most this long.
            let deadline = Instant::now() + self.config.close_timeout.min(Duration::from_secs(10));
            let before = self.cache.pending_nodes().len();
            match self.push_pending(deadline, true).await {
                // A busy pass (a tar, a build): let the next one gather more.
                Ok(left) if before.saturating_sub(left.len()) >= BUSY_PASS => {
                    window = BATCH_WINDOW_BUSY;
                }
                Ok(_) => window = BATCH_WINDOW,
                Err(e) => tracing::warn!(error = %e, "retrying pending uploads failed"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                // Closes that follow within the window join the same pass (and batch).
                _ = self.wake.notified() => tokio::time::sleep(window).await,
                _ = tokio::time::sleep(self.config.retry_interval) => {}
            }
        }
    }
}
