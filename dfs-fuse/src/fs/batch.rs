//! Batched background pushes (write-back and retries): small pending files with the same
//! primary go in one request, so the servers store, sync and commit them together. Each file
//! keeps its own lock, fencing token and upload id, and succeeds or fails on its own; a file
//! the batch did not settle goes through the single-file push (`upload.rs`) right after.

use std::collections::BTreeMap;
use std::time::Duration;

use common::api::{
    BatchHeader, BatchItem, ItemResult, MAX_BATCH_BYTES, MAX_BATCH_ITEM_BYTES, MAX_BATCH_ITEMS,
};
use common::{NodeId, ServerId, UploadId};
use tokio::time::Instant;

use super::{DfsFs, FoldedAttrs};
use crate::cache::Pending;
use crate::remote::RemoteError;

/// A file that can go in a batch: its pending record, the version it is based on, folded
/// attributes and content.
type Candidate = (NodeId, Pending, u64, FoldedAttrs, Vec<u8>);

/// One file taken into a batch: locked here and at the lock service.
struct Taken {
    node: NodeId,
    pending: Pending,
    attrs: FoldedAttrs,
    body: Vec<u8>,
    waiter: UploadId,
    lease: Duration,
    item: BatchItem,
}

/// What files of one batch share: their primary, and the `x-dfs-act-as` value of the local
/// caller they act as (None: the mount's login).
type BatchKey = (ServerId, Option<String>);

/// Files pushed in one request, and the local caller they act as (None: the mount's login).
pub(super) type Batch = (Option<common::Identity>, Vec<NodeId>);

impl DfsFs {
    /// Splits pending `nodes` into batches (same primary, small, not open for writing, not
    /// backing off) and the rest.
    pub(super) fn plan_batches(
        &self,
        nodes: Vec<NodeId>,
        backoff: bool,
    ) -> (Vec<Batch>, Vec<NodeId>) {
        let now = Instant::now();
        // On a `--local-ids` mount a batch is one request, so one identity: files go in
        // batches of the same local caller (see `actor_now`).
        let mut by_primary: BTreeMap<BatchKey, Vec<(NodeId, u64)>> = BTreeMap::new();
        let mut single = Vec::new();
        for node in nodes {
            let size = std::fs::metadata(self.cache.path(node)).map(|m| m.len());
            let waiting = backoff
                && self
                    .retry_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&node)
                    .is_some_and(|(at, _)| *at > now);
            let actor = self.actor_now(node);
            match (self.known_meta(node).and_then(|m| m.primary), size, actor) {
                (Some(p), Ok(size), Some(actor))
                    if size <= MAX_BATCH_ITEM_BYTES && !waiting && self.writer_count(node) == 0 =>
                {
                    let who = actor.map(|a| a.act_as_header());
                    by_primary.entry((p, who)).or_default().push((node, size));
                }
                _ => single.push(node),
            }
        }
        let mut batches = Vec::new();
        for ((_, who), files) in by_primary {
            let who = who
                .as_deref()
                .and_then(common::Identity::from_act_as_header);
            let mut batch = Vec::new();
            let mut bytes = 0;
            for (node, size) in files {
                if !batch.is_empty()
                    && (batch.len() == MAX_BATCH_ITEMS || bytes + size > MAX_BATCH_BYTES)
                {
                    batches.push((who.clone(), std::mem::take(&mut batch)));
                    bytes = 0;
                }
                batch.push(node);
                bytes += size;
            }
            match batch.len() {
                0 => {}
                // Alone, a batch buys nothing.
                1 => single.extend(batch),
                _ => batches.push((who.clone(), batch)),
            }
        }
        (batches, single)
    }

    /// Pushes `nodes` (one primary) in one batch. Returns the nodes it did not settle, for the
    /// single-file path.
    pub(super) async fn push_batch(&self, nodes: Vec<NodeId>, deadline: Instant) -> Vec<NodeId> {
        let started = std::time::Instant::now();
        // Serialised with open() and single pushes per node, taken in node order (no cycles).
        let mut sorted = nodes.clone();
        sorted.sort();
        sorted.dedup();
        let mut guards = Vec::with_capacity(sorted.len());
        for node in &sorted {
            guards.push(self.node_locks.get(*node).lock_owned().await);
        }
        let mut left = Vec::new();
        let mut candidates = Vec::new();
        for node in sorted {
            match self.batch_candidate(node) {
                Ok(Some(c)) => candidates.push(c),
                // Nothing to push, or a plain attribute change: the single path handles both.
                Ok(None) => left.push(node),
                Err(e) => {
                    tracing::debug!(%node, error = %e, "not batching this file");
                    left.push(node);
                }
            }
        }
        let grants = futures_util::future::join_all(candidates.iter().map(|(node, ..)| {
            let waiter = UploadId::from_bytes(rand::random());
            async move {
                let wait = deadline.min(Instant::now() + BATCH_LOCK_WAIT);
                // Bounded by the batch's own short wait, whatever the lock service or the
                // directory does: the node locks of every file in the batch are held
                // meanwhile (an open of any of them waits). A grant cut off is released.
                let r = tokio::time::timeout_at(wait, async {
                    if batch_acquire_hangs() {
                        std::future::pending::<()>().await;
                    }
                    self.remote.acquire(*node, &waiter, wait).await
                })
                .await
                .unwrap_or_else(|_| {
                    Err(RemoteError::Timeout(
                        "no lock grant within the batch's wait".into(),
                    ))
                });
                (waiter, r)
            }
        }))
        .await;
        let mut taken = Vec::new();
        for ((node, pending, base, attrs, body), (waiter, grant)) in
            candidates.into_iter().zip(grants)
        {
            let grant = match grant {
                Ok(g) => g,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "lock for a batched push not granted");
                    self.release_later(node, waiter);
                    left.push(node);
                    continue;
                }
            };
            let Some(meta) = self.known_meta(node).filter(|m| m.primary.is_some()) else {
                self.release_later(node, waiter);
                left.push(node);
                continue;
            };
            let item = BatchItem {
                node,
                hash: pending.hash.clone(),
                size: pending.size,
                fence: grant.fence,
                fence_sig: grant.signature.clone(),
                upload_id: pending.upload_id.clone(),
                // A batch is a background push: it applies only over its base.
                base: common::api::PushBase {
                    version: base,
                    waiting: false,
                },
                placement: meta.primary.iter().chain(&meta.replicas).copied().collect(),
                mode: attrs.mode,
                mtime_ns: attrs.mtime_ns,
            };
            taken.push(Taken {
                node,
                pending,
                attrs,
                body,
                waiter,
                lease: Duration::from_millis(grant.lease_ms),
                item,
            });
        }
        // Files may have grown since the plan: what no longer fits goes alone.
        let mut bytes = 0u64;
        taken.retain(|t| {
            bytes += t.pending.size;
            let fits = bytes <= MAX_BATCH_BYTES;
            if !fits {
                self.release_later(t.node, t.waiter.clone());
                left.push(t.node);
            }
            fits
        });
        if taken.is_empty() {
            return left;
        }
        let primary = taken[0].item.placement[0];
        let header = BatchHeader {
            items: taken.iter().map(|t| t.item.clone()).collect(),
        };
        let bodies: Vec<Vec<u8>> = taken
            .iter_mut()
            .map(|t| std::mem::take(&mut t.body))
            .collect();
        let t = std::time::Instant::now();
        let answer = self
            .with_renewals(&taken, self.remote.upload_batch(primary, &header, &bodies))
            .await;
        self.metrics.stage("batch", t.elapsed());
        match answer {
            Ok(results) => {
                for (t, r) in taken.iter().zip(results) {
                    match r {
                        ItemResult::Ok(meta) => {
                            match self.settle_push(t.node, &t.pending, &t.attrs, &meta) {
                                Ok(()) => {
                                    self.metrics.push_done(started.elapsed());
                                    // Nobody waits: a folded mode not applied is logged.
                                    let _ =
                                        self.folded_mode_applied(t.node, &t.attrs, &meta, false);
                                }
                                Err(e) => {
                                    tracing::warn!(node = %t.node, error = %e, "recording a pushed file failed");
                                    left.push(t.node);
                                }
                            }
                        }
                        ItemResult::Err(e) => {
                            tracing::debug!(node = %t.node, code = ?e.code, error = %e.message, "batched push refused; pushing alone");
                            left.push(t.node);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, files = taken.len(), "batched push failed; pushing alone");
                left.extend(taken.iter().map(|t| t.node));
            }
        }
        for t in taken {
            self.release_later(t.node, t.waiter);
        }
        drop(guards);
        left
    }

    /// The pending record and content of `node` for a batch; None if it has nothing to push
    /// or does not fit.
    fn batch_candidate(&self, node: NodeId) -> crate::error::FsResult<Option<Candidate>> {
        if self.writer_count(node) > 0 {
            return Ok(None);
        }
        let Some((entry, pending)) = self.mark_pending(node)? else {
            return Ok(None);
        };
        if pending.size > MAX_BATCH_ITEM_BYTES {
            return Ok(None);
        }
        let body = std::fs::read(self.cache.path(node))?;
        if body.len() as u64 != pending.size {
            // Changed since it was hashed: the single path re-hashes and resends.
            return Ok(None);
        }
        Ok(Some((
            node,
            pending,
            entry.version,
            self.folded_attrs(node),
            body,
        )))
    }

    /// Runs `work` while renewing the leases of `taken` (a batch may outlast a third of one).
    async fn with_renewals<T>(
        &self,
        taken: &[Taken],
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let lease = taken
            .iter()
            .map(|t| t.lease)
            .min()
            .unwrap_or_default()
            .max(Duration::from_millis(150));
        // The renewals run beside the work (polled together), never in its way: a slow
        // renewal does not stop the upload's progress.
        let renewals = async {
            loop {
                tokio::time::sleep(lease / 3).await;
                futures_util::future::join_all(taken.iter().map(|t| async move {
                    if let Err(e) = self.remote.renew(t.node, &t.waiter).await {
                        tracing::warn!(node = %t.node, error = %e, "lock renewal failed");
                    }
                }))
                .await;
            }
        };
        tokio::pin!(work);
        tokio::pin!(renewals);
        tokio::select! {
            r = &mut work => r,
            never = &mut renewals => never,
        }
    }

    /// Releases a lock after the answer, off the critical path (a lost unlock costs others one
    /// lease at worst).
    pub(super) fn release_later(&self, node: NodeId, waiter: UploadId) {
        let remote = self.remote.clone();
        tokio::spawn(async move {
            if let Err(e) = remote.release(node, &waiter).await {
                tracing::debug!(%node, error = %e, "lock release failed; the lease will expire");
            }
        });
    }
}

/// How long a batch waits for a file's lock: a file someone else holds is pushed alone later
/// instead of holding up the batch.
const BATCH_LOCK_WAIT: Duration = Duration::from_secs(1);

/// Fault point `batch-acquire-hang`: a batch's lock acquire never answers (tests).
fn batch_acquire_hangs() -> bool {
    fail::fail_point!("batch-acquire-hang", |_| true);
    false
}
