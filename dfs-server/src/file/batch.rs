//! Batched writes of small files (write-back uploads): many files per request, per replica
//! push, per filesystem sync and per directory commit. Each file is checked, fenced, stored and
//! committed on its own: a batch is all-or-nothing per file, never for the batch as a whole.
//!
//! Cost of a batch of N files on its primary: one request in, one replica-batch request per
//! eager replica (in parallel with the local store), two filesystem syncs on each server (the
//! bodies, then their names) instead of 2·N fsyncs, one directory transaction (one shared
//! fsync). The acknowledgement rule is the single write's: primary + one replica per file.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use common::api::{
    BatchHeader, BatchItem, CommitBatchItem, CommitBatchRequest, CommitRequest, ItemResult,
    MAX_BATCH_BYTES, MAX_BATCH_ITEM_BYTES, MAX_BATCH_ITEMS, ReplicaBatchHeader, ReplicaItem,
};
use common::{ContentHash, NodeId, NodeMeta, ServerId};
use sha2::{Digest, Sha256};

use super::FileStore;
use super::replicate::{FileServer, live_replicas};
use crate::error::{ServiceError, ServiceResult, item_result};

/// A parsed batch frame: its header and each body, in item order.
pub struct Frame<H> {
    /// The header.
    pub header: H,
    /// The bodies (slices of one buffer).
    pub bodies: Vec<Bytes>,
}

/// Parses a batch frame whose header lists the bodies' sizes, and checks the batch's bounds
/// (see `check_bounds`) against a server whose largest file is `max_blob_bytes`.
pub fn parse_frame<H: serde::de::DeserializeOwned>(
    frame: Bytes,
    sizes: impl Fn(&H) -> Vec<u64>,
    max_blob_bytes: u64,
) -> ServiceResult<Frame<H>> {
    let bad = |e: &dyn std::fmt::Display| ServiceError::BadRequest(format!("batch: {e}"));
    let (header, rest) = common::batch::split(&frame).map_err(|e| bad(&e))?;
    let header: H = serde_json::from_slice(header).map_err(|e| bad(&e))?;
    let sizes = sizes(&header);
    check_bounds(&sizes, max_blob_bytes)?;
    let ranges = common::batch::body_ranges(rest, &sizes).map_err(|e| bad(&e))?;
    let bodies = ranges.into_iter().map(|r| frame.slice(r)).collect();
    Ok(Frame { header, bodies })
}

/// Encodes a batch frame.
pub fn encode_frame<H: serde::Serialize>(header: &H, bodies: &[Bytes]) -> ServiceResult<Bytes> {
    let json = serde_json::to_vec(header).map_err(|e| ServiceError::internal("batch header", e))?;
    let mut out = common::batch::prefix(&json);
    for b in bodies {
        out.extend_from_slice(b);
    }
    Ok(Bytes::from(out))
}

/// Bounds every batch, whoever sends it: the batch limits and this server's file size limit.
fn check_bounds(sizes: &[u64], max_blob_bytes: u64) -> ServiceResult<()> {
    if sizes.iter().any(|s| *s > max_blob_bytes) {
        return Err(ServiceError::TooLarge(format!(
            "file larger than this server's limit of {max_blob_bytes} bytes"
        )));
    }
    if sizes.len() > MAX_BATCH_ITEMS {
        return Err(ServiceError::TooLarge(format!(
            "a batch carries at most {MAX_BATCH_ITEMS} files"
        )));
    }
    if sizes.iter().any(|s| *s > MAX_BATCH_ITEM_BYTES) {
        return Err(ServiceError::TooLarge(format!(
            "a file in a batch is at most {MAX_BATCH_ITEM_BYTES} bytes; send bigger ones alone"
        )));
    }
    if sizes.iter().sum::<u64>() > MAX_BATCH_BYTES {
        return Err(ServiceError::TooLarge(format!(
            "a batch carries at most {MAX_BATCH_BYTES} bytes"
        )));
    }
    Ok(())
}

impl FileStore {
    /// Stores several small blobs durably: each body checked against its hash, then all of
    /// them appended to the active pack and made durable with one fdatasync (see `pack`). One
    /// result per blob: a body whose hash differs fails alone.
    pub async fn put_many(
        &self,
        items: Vec<(NodeId, ContentHash, Bytes)>,
    ) -> Vec<ServiceResult<u64>> {
        let mut results: Vec<Option<ServiceResult<u64>>> = Vec::with_capacity(items.len());
        let mut good: Vec<(NodeId, ContentHash, Vec<Bytes>)> = Vec::new();
        let mut slots: Vec<usize> = Vec::new();
        for (i, (node, hash, body)) in items.into_iter().enumerate() {
            let actual = ContentHash::from_digest(&Sha256::digest(&body).into());
            if actual != hash {
                results.push(Some(Err(ServiceError::HashMismatch {
                    declared: hash.to_string(),
                    actual: actual.to_string(),
                })));
            } else if body.len() as u64 > super::pack::PACK_BLOB_MAX {
                results.push(Some(Err(ServiceError::TooLarge(format!(
                    "a batched blob is at most {} bytes",
                    super::pack::PACK_BLOB_MAX
                )))));
            } else {
                results.push(None);
                slots.push(i);
                good.push((node, hash, vec![body]));
            }
        }
        for (i, r) in slots.into_iter().zip(self.put_small(good).await) {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(ServiceError::internal("storing a batch", "no result")))
            })
            .collect()
    }
}

/// What the primary decided for one item before storing it.
struct Planned {
    /// Index in the batch.
    index: usize,
    item: BatchItem,
    body: Bytes,
    replicas: Vec<ServerId>,
    required: usize,
    eager: Vec<(ServerId, String)>,
    deferred: Vec<(ServerId, String)>,
    holders: Vec<ServerId>,
}

impl FileServer {
    /// A replica stores a batch of blobs sent by a primary.
    pub async fn store_replica_batch(&self, frame: Bytes) -> ServiceResult<Vec<ItemResult<u64>>> {
        let Frame { header, bodies } = parse_frame(
            frame,
            |h: &ReplicaBatchHeader| h.items.iter().map(|i| i.size).collect(),
            self.store.max_blob_bytes,
        )?;
        let jobs = header
            .items
            .into_iter()
            .zip(bodies)
            .map(|(i, b)| (i.node, i.hash, b))
            .collect();
        let results = self.store.put_many(jobs).await;
        self.store.stats.replica_writes.fetch_add(
            results.iter().filter(|r| r.is_ok()).count() as u64,
            Ordering::Relaxed,
        );
        Ok(results.into_iter().map(item_result).collect())
    }

    /// The primary's batched write path: per file the same checks, rule and commit as
    /// `write_primary`, with the I/O shared across the batch (see the module docs).
    pub async fn write_batch(
        self: &Arc<Self>,
        writer: &common::Caller,
        origin: Option<String>,
        frame: Bytes,
    ) -> ServiceResult<Vec<ItemResult<NodeMeta>>> {
        let Frame { header, bodies } = parse_frame(
            frame,
            |h: &BatchHeader| h.items.iter().map(|i| i.size).collect(),
            self.store.max_blob_bytes,
        )?;
        let mut nodes: Vec<NodeId> = header.items.iter().map(|i| i.node).collect();
        nodes.sort();
        nodes.dedup();
        if nodes.len() != header.items.len() {
            return Err(ServiceError::BadRequest(
                "a batch names each file once".into(),
            ));
        }
        let me = self
            .id()
            .ok_or_else(|| ServiceError::Unavailable("file server not registered yet".into()))?;
        let mut results: Vec<Option<ServiceResult<NodeMeta>>> =
            (0..header.items.len()).map(|_| None).collect();
        let mut candidates = Vec::new();
        for (index, (item, body)) in header.items.into_iter().zip(bodies).enumerate() {
            match self.precheck(me, &item) {
                Ok(replicas) => candidates.push((index, item, body, replicas)),
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        // One write per file at a time, as in `write_primary`. A file another write holds is
        // refused as busy rather than waited for (a long streamed write must not stall the
        // batch and every lock it took); the client pushes it alone.
        let mut _guards = Vec::with_capacity(candidates.len());
        candidates.retain(|(index, item, _, _)| {
            match self.node_locks.get(item.node).try_lock_owned() {
                Ok(g) => {
                    _guards.push(g);
                    true
                }
                Err(_) => {
                    results[*index] = Some(Err(ServiceError::Unavailable(format!(
                        "node {} is being written; push it alone",
                        item.node
                    ))));
                    false
                }
            }
        });
        let cluster = if candidates.iter().any(|(_, _, _, r)| !r.is_empty()) {
            Some(self.cluster().await?)
        } else {
            None
        };
        let mut planned = Vec::new();
        for (index, item, body, replicas) in candidates {
            if let Err(e) = self.store.check_fence(item.node, item.fence) {
                results[index] = Some(Err(e));
                continue;
            }
            let required = self.min_copies.clamp(1, 1 + replicas.len());
            let mut live = live_replicas(cluster.as_ref(), &replicas, item.node);
            let deferred = live.split_off(live.len().min(required - 1));
            planned.push(Planned {
                index,
                item,
                body,
                replicas,
                required,
                eager: live,
                deferred,
                holders: Vec::new(),
            });
        }

        // Store locally and on the eager replicas at once.
        let local_jobs = planned
            .iter()
            .map(|p| (p.item.node, p.item.hash.clone(), p.body.clone()))
            .collect();
        let picks: Vec<Vec<(ServerId, String)>> = planned.iter().map(|p| p.eager.clone()).collect();
        let (local, remote) = tokio::join!(
            self.store.put_many(local_jobs),
            self.send_replica_batches(&planned, &picks)
        );
        for (p, r) in planned.iter_mut().zip(local) {
            match r.and_then(|_| self.store.accept_fence(p.item.node, p.item.fence)) {
                Ok(()) => p.holders.push(me),
                Err(e) => results[p.index] = Some(Err(e)),
            }
        }
        for (i, server) in remote {
            if planned[i].holders.first() == Some(&me) {
                planned[i].holders.push(server);
            }
        }
        self.store.stats.uploads.fetch_add(
            planned.iter().filter(|p| !p.holders.is_empty()).count() as u64,
            Ordering::Relaxed,
        );
        // A pipelined copy failed: the deferred replicas stand in, one file at a time.
        for p in planned.iter_mut().filter(|p| !p.holders.is_empty()) {
            while p.holders.len() < p.required && !p.deferred.is_empty() {
                let (r, url) = p.deferred.remove(0);
                match self.push(&url, p.item.node, &p.item.hash).await {
                    Ok(()) => p.holders.push(r),
                    Err(e) => {
                        tracing::warn!(replica = %r, node = %p.item.node, error = %e, "replica push failed")
                    }
                }
            }
        }

        let mut commits = Vec::new();
        let mut committing = Vec::new();
        for (i, p) in planned.iter().enumerate() {
            if p.holders.is_empty() {
                continue;
            }
            if p.holders.len() < p.required {
                results[p.index] = Some(Err(ServiceError::Unavailable(format!(
                    "only {} of {} copies are durable; {} needed before acknowledging",
                    p.holders.len(),
                    1 + p.replicas.len(),
                    p.required
                ))));
                continue;
            }
            commits.push(CommitBatchItem {
                node: p.item.node,
                commit: CommitRequest {
                    hash: p.item.hash.clone(),
                    size: p.item.size,
                    fence: p.item.fence,
                    upload_id: p.item.upload_id.clone(),
                    base: p.item.base,
                    holders: p.holders.clone(),
                    writer: writer.name.clone(),
                    writer_id: Some(writer.id.clone()),
                    primary: Some(me),
                    replicas: Some(p.replicas.clone()),
                    mode: p.item.mode,
                    mtime_ns: p.item.mtime_ns,
                    origin: origin.clone(),
                },
            });
            committing.push(i);
        }
        let mut late: Vec<usize> = Vec::new();
        if !commits.is_empty() {
            let req = &CommitBatchRequest { items: commits };
            let answer = self
                .directory
                .call_within(crate::peer::COMMIT_RIDE_OUT, |d| async move {
                    self.peer.commit_batch(&d, req).await
                })
                .await;
            match answer {
                Ok(resp) if resp.results.len() == committing.len() => {
                    for (i, r) in committing.into_iter().zip(resp.results) {
                        let p = &planned[i];
                        results[p.index] = Some(match r {
                            ItemResult::Ok(c) => {
                                if c.meta.hash == p.item.hash
                                    && let Some(old) = c.superseded
                                {
                                    self.spawn_drop_superseded(
                                        p.item.node,
                                        c.meta.hash.clone(),
                                        old,
                                    );
                                }
                                late.push(i);
                                Ok(c.meta)
                            }
                            ItemResult::Err(b) => Err(ServiceError::from_wire(b.code, b.message)),
                        });
                    }
                }
                Ok(_) => {
                    for i in committing {
                        results[planned[i].index] = Some(Err(ServiceError::Unavailable(
                            "batch commit: wrong number of results".into(),
                        )));
                    }
                }
                // The directory's refusal, as it said it, for every file it covered.
                Err(e) => {
                    for i in committing {
                        results[planned[i].index] =
                            Some(Err(ServiceError::from_wire(e.code(), e.to_string())));
                    }
                }
            }
        }
        // Off the critical path: the other replicas get their copies (batched, from memory)
        // and join the holders.
        let late: Vec<Planned> = planned
            .into_iter()
            .enumerate()
            .filter(|(i, p)| late.contains(i) && !p.deferred.is_empty())
            .map(|(_, p)| p)
            .collect();
        if !late.is_empty() {
            let this = self.clone();
            tokio::spawn(async move { this.copy_late(late).await });
        }
        Ok(results
            .into_iter()
            .map(|r| {
                item_result(r.unwrap_or_else(|| {
                    Err(ServiceError::internal(
                        "batch",
                        "item left without a result",
                    ))
                }))
            })
            .collect())
    }

    /// The checks of one item that need no lock: placement, fence signature, mode. Returns the
    /// item's replicas.
    fn precheck(&self, me: ServerId, item: &BatchItem) -> ServiceResult<Vec<ServerId>> {
        let mut distinct = item.placement.clone();
        distinct.sort();
        distinct.dedup();
        if distinct.len() != item.placement.len() || item.placement.len() > 16 {
            return Err(ServiceError::BadRequest(
                "placement must name 1 to 16 distinct servers".into(),
            ));
        }
        let Some((primary, replicas)) = item.placement.split_first() else {
            return Err(ServiceError::BadRequest(
                "placement must name 1 to 16 distinct servers".into(),
            ));
        };
        if *primary != me {
            return Err(ServiceError::NotPrimary(format!(
                "this server ({me}) is not the primary of node {}; ask the directory",
                item.node
            )));
        }
        if !crate::lock::verify_fence(&self.fence_key, item.node, item.fence, &item.fence_sig) {
            return Err(ServiceError::Forbidden(format!(
                "fencing token {} for node {} was not issued by the lock service",
                item.fence, item.node
            )));
        }
        if item.mode.is_some_and(|m| m > 0o7777) {
            return Err(ServiceError::BadRequest(
                "mode has bits beyond 07777".into(),
            ));
        }
        Ok(replicas.to_vec())
    }

    /// Sends each replica the items picked for it (`picks[i]` for `planned[i]`), one batch per
    /// replica, all at once. Returns the (item, replica) pairs stored durably.
    async fn send_replica_batches(
        &self,
        planned: &[Planned],
        picks: &[Vec<(ServerId, String)>],
    ) -> Vec<(usize, ServerId)> {
        let mut by_server: BTreeMap<ServerId, (String, Vec<usize>)> = BTreeMap::new();
        for (i, servers) in picks.iter().enumerate() {
            for (s, url) in servers {
                by_server
                    .entry(*s)
                    .or_insert_with(|| (url.clone(), Vec::new()))
                    .1
                    .push(i);
            }
        }
        let sends = by_server.into_iter().map(|(server, (url, items))| async move {
            let header = ReplicaBatchHeader {
                items: items
                    .iter()
                    .map(|i| ReplicaItem {
                        node: planned[*i].item.node,
                        hash: planned[*i].item.hash.clone(),
                        size: planned[*i].item.size,
                    })
                    .collect(),
            };
            let bodies: Vec<Bytes> = items.iter().map(|i| planned[*i].body.clone()).collect();
            let answer = match encode_frame(&header, &bodies) {
                Ok(frame) => self.peer.replica_batch(&url, frame).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(resp) if resp.results.len() == items.len() => items
                    .into_iter()
                    .zip(resp.results)
                    .filter_map(|(i, r)| match r {
                        ItemResult::Ok(_) => Some((i, server)),
                        ItemResult::Err(e) => {
                            tracing::warn!(replica = %server, node = %planned[i].item.node, error = %e.message, "replica copy failed");
                            None
                        }
                    })
                    .collect::<Vec<_>>(),
                Ok(_) => Vec::new(),
                Err(e) => {
                    tracing::warn!(replica = %server, error = %e, "replica batch failed");
                    Vec::new()
                }
            }
        });
        futures_util::future::join_all(sends)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// After the answer: the deferred replicas get their copies and join the holders (one
    /// directory request for all of them).
    async fn copy_late(&self, late: Vec<Planned>) {
        let picks: Vec<Vec<(ServerId, String)>> = late.iter().map(|p| p.deferred.clone()).collect();
        let items: Vec<common::api::HolderItem> = self
            .send_replica_batches(&late, &picks)
            .await
            .into_iter()
            .map(|(i, server)| common::api::HolderItem {
                node: late[i].item.node,
                hash: late[i].item.hash.clone(),
                server,
            })
            .collect();
        if items.is_empty() {
            return;
        }
        let items = &items;
        if let Err(e) = self
            .directory
            .call(|d| async move { self.peer.add_holders(&d, items.clone()).await })
            .await
        {
            tracing::debug!(error = %e, "late replica copies not recorded; the repair loop will make them");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_many_stores_each_good_blob_and_leaves_nothing_of_a_bad_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = FileStore::open(dir.path(), 1 << 20).expect("store");
        let hash = |d: &[u8]| ContentHash::from_digest(&Sha256::digest(d).into());
        let results = store
            .put_many(vec![
                (NodeId(1), hash(b"one"), Bytes::from_static(b"one")),
                (NodeId(2), hash(b"not this"), Bytes::from_static(b"two")),
                (NodeId(3), hash(b""), Bytes::new()),
            ])
            .await;
        assert_eq!(results[0].as_ref().ok(), Some(&3));
        assert!(matches!(results[1], Err(ServiceError::HashMismatch { .. })));
        assert_eq!(results[2].as_ref().ok(), Some(&0));
        let (mut f, len) = store
            .open_blob(NodeId(1), &hash(b"one"))
            .await
            .expect("blob");
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut f, &mut body)
            .await
            .expect("read");
        assert_eq!((len, &body[..]), (3, &b"one"[..]));
        assert!(!store.has(NodeId(2), &hash(b"not this")));
        assert!(!store.has(NodeId(2), &hash(b"two")));
        // Empty content is never stored: every server "has" it.
        assert!(store.has(NodeId(3), &hash(b"")));
        assert_eq!(
            store.blobs().len(),
            1,
            "only the good non-empty blob is stored"
        );
        assert_eq!(
            store
                .stats
                .fsyncs
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the batch cost one fdatasync"
        );
    }
}
