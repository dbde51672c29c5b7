//! `FileServer`: a file server's network role. Registration and heartbeats, and the primary's
//! write path: store durably, push to the replicas, apply the acknowledgement rule, record the
//! version in the directory.
//!
//! Acknowledgement rule: a write is acknowledged once the primary and at least one replica hold
//! it durably (fsync + rename), or the primary alone for a file placed on a single server. A
//! replica that fails the push does not fail the write while the rule holds; it is left out of
//! the version's holders.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::api::CommitRequest;
use common::{ContentHash, FenceToken, FileKind, NodeId, NodeMeta, ServerId, UploadId, routes};
use futures_util::Stream;

use super::FileStore;
use crate::error::{ServiceError, ServiceResult};
use crate::keyed::KeyedMutex;
use crate::peer::{Peer, error_from_response};

/// One file server.
pub struct FileServer {
    pub(super) fence_key: String,
    /// Its blobs.
    pub store: FileStore,
    pub(super) peer: Peer,
    pub(super) directory: crate::peer::Directories,
    id: AtomicU64,
    id_file: PathBuf,
    /// Where the cluster id is kept, and the id (see `membership`).
    pub(super) cluster_file: PathBuf,
    pub(super) cluster_id: std::sync::Mutex<Option<String>>,
    /// Joined its own cluster's directory in this run (see `membership`).
    pub(super) joined: AtomicBool,
    /// How long copies set aside by the scrub are kept before they are deleted.
    pub quarantine_grace: Duration,
    /// Copies (primary included) that must be durable before a write is acknowledged.
    pub min_copies: usize,
    pub(super) node_locks: KeyedMutex<NodeId>,
    cluster_cache: std::sync::Mutex<Option<(std::time::Instant, common::api::ClusterInfo)>>,
    /// Latency of the write path's stages, and whatever `cluster::file_metrics` adds.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Batches held in memory at once, from clients and from primaries (each up to
    /// `MAX_BATCH_BYTES`): beyond that a batch is refused as busy and its files go alone.
    pub batch_permits: [tokio::sync::Semaphore; 2],
}

/// How long a copy the scrub sets aside (see `scrub`) is kept before it is deleted.
pub const DEFAULT_QUARANTINE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Batches of each kind (client uploads, replica stores) one server holds in memory at once.
const BATCHES_IN_MEMORY: usize = 4;

/// Parameters of one primary write.
pub struct WriteRequest {
    /// The file.
    pub node: NodeId,
    /// Declared SHA-256 of the body.
    pub hash: ContentHash,
    /// The writer's fencing token.
    pub fence: FenceToken,
    /// The lock service's signature of `fence` for this node.
    pub fence_sig: String,
    /// Idempotency key.
    pub upload_id: UploadId,
    /// What the content was based on.
    pub base: common::api::PushBase,
    /// Who writes.
    pub writer: common::Caller,
    /// The writer's client process (`x-dfs-origin`), passed on to the directory's commit.
    pub origin: Option<String>,
    /// The placement the writer knows, `(primary, replicas)`; `None`: ask the directory.
    pub placement: Option<(ServerId, Vec<ServerId>)>,
    /// The body's length, when declared (forwarded to the replicas).
    pub size: Option<u64>,
    /// Permission bits to apply with the new version.
    pub mode: Option<u32>,
    /// Explicit modification time to apply with the new version.
    pub mtime_ns: Option<u64>,
}

impl FileServer {
    /// A file server storing under `data_dir` and registering with `directory` (one URL or
    /// several, comma-separated, of one cluster).
    pub fn new(
        fence_key: &str,
        store: FileStore,
        peer: Peer,
        directory: String,
        data_dir: &std::path::Path,
    ) -> Self {
        let id_file = data_dir.join("server_id");
        let previous = std::fs::read_to_string(&id_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let cluster_file = data_dir.join(super::membership::CLUSTER_ID_FILE);
        let cluster_id = std::fs::read_to_string(&cluster_file)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        FileServer {
            fence_key: fence_key.to_owned(),
            store,
            peer,
            directory: crate::peer::Directories::parse(&directory)
                .unwrap_or_else(|_| crate::peer::Directories::single(directory)),
            id: AtomicU64::new(previous),
            id_file,
            cluster_file,
            cluster_id: std::sync::Mutex::new(cluster_id),
            joined: AtomicBool::new(false),
            quarantine_grace: DEFAULT_QUARANTINE_GRACE,
            min_copies: 2,
            node_locks: KeyedMutex::default(),
            cluster_cache: Default::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            batch_permits: [
                tokio::sync::Semaphore::new(BATCHES_IN_MEMORY),
                tokio::sync::Semaphore::new(BATCHES_IN_MEMORY),
            ],
        }
    }

    /// Records the id the directory gave this server (durably, before it is used).
    pub(super) fn set_id(&self, id: ServerId) -> ServiceResult<()> {
        crate::store::write_durable(&self.id_file, id.0.to_string().as_bytes(), 0o644)?;
        self.id.store(id.0, Ordering::Relaxed);
        Ok(())
    }

    /// This server's id, once registered.
    pub fn id(&self) -> Option<ServerId> {
        match self.id.load(Ordering::Relaxed) {
            0 => None,
            n => Some(ServerId(n)),
        }
    }

    /// The primary's write path (see the module docs for the acknowledgement rule).
    ///
    /// Refuses (EACCES) a download not covered by a capability the directory signed.
    pub fn check_capability(
        &self,
        cap: &str,
        node: NodeId,
        hash: &ContentHash,
    ) -> ServiceResult<()> {
        crate::capability::verify(
            &self.fence_key,
            cap,
            node,
            hash,
            common::perm::R,
            crate::store::now_ms(),
        )
    }

    /// Latency budget (small file, placement known from the writer): fence check (memory),
    /// body streamed into the local temp file *and* to every replica at once, local fsync +
    /// rename + shard fsync in parallel with the replicas' own, then one commit at the directory
    /// (one group-committed fsync). The answer goes out as soon as the primary and the first
    /// replica are durable and the commit is recorded; slower replicas finish in the background
    /// and join the holders, and superseded copies are dropped in the background too.
    pub async fn write_primary<S, E>(
        self: &Arc<Self>,
        req: WriteRequest,
        body: S,
    ) -> ServiceResult<NodeMeta>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let node = req.node;
        if !crate::lock::verify_fence(&self.fence_key, node, req.fence, &req.fence_sig) {
            return Err(ServiceError::Forbidden(format!(
                "fencing token {} for node {node} was not issued by the lock service",
                req.fence
            )));
        }
        // One write per file at a time on this primary, from the fence check to the commit: an
        // older write can then never commit in the middle of a newer one.
        let lock = self.node_locks.get(node);
        let _serialised = lock.lock().await;
        let me = self
            .id()
            .ok_or_else(|| ServiceError::Unavailable("file server not registered yet".into()))?;
        let (primary, replicas) = match &req.placement {
            Some(p) => p.clone(),
            None => {
                let meta = self
                    .directory
                    .call(|d| async move { self.peer.node(&d, node).await })
                    .await?;
                if meta.kind != FileKind::File {
                    return Err(ServiceError::IsDir(format!("node {node}")));
                }
                if meta.recent_uploads.contains(&req.upload_id) {
                    return Ok(meta);
                }
                match meta.primary {
                    Some(p) => (p, meta.replicas.clone()),
                    None => return Err(ServiceError::IsDir(format!("node {node}"))),
                }
            }
        };
        if primary != me {
            return Err(ServiceError::NotPrimary(format!(
                "this server ({me}) is not the primary of node {node}; ask the directory"
            )));
        }
        self.store.check_fence(node, req.fence)?;

        // Live replicas, in placement order; a dead one is skipped (the directory's repair
        // catches it up later).
        let cluster = if replicas.is_empty() {
            None
        } else {
            Some(self.cluster().await?)
        };
        let mut live = live_replicas(cluster.as_ref(), &replicas, node);
        let required = self.min_copies.clamp(1, 1 + replicas.len());
        // Just enough replicas get the body while it arrives (pipelined with the local write);
        // the others get it from the stored copy after the acknowledgement, so their fsyncs do
        // not compete with the ones the writer waits for.
        let eager = live.len().min(required - 1);
        let deferred: Vec<(ServerId, String)> = live.split_off(eager);
        let mut senders = Vec::new();
        let mut pushes = futures_util::stream::FuturesUnordered::new();
        for (r, url) in live {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
            senders.push(tx);
            let push = self.push_stream(&url, node, &req.hash, req.size, rx);
            pushes.push(tokio::spawn(async move { (r, push.await) }));
        }
        let tee = futures_util::StreamExt::then(body, move |chunk| {
            let senders = senders.clone();
            async move {
                let copy = match &chunk {
                    Ok(b) => Ok(b.clone()),
                    Err(e) => Err(e.to_string()),
                };
                for tx in &senders {
                    // A replica that failed has dropped its receiver; the others go on.
                    let item = copy.clone().map_err(std::io::Error::other);
                    let _ = tx.send(item).await;
                }
                chunk
            }
        });
        let t = std::time::Instant::now();
        let local = self.store.put_stream(node, &req.hash, Box::pin(tee)).await;
        self.metrics
            .observe("write_stage", "store_local", t.elapsed());
        let size = match local {
            Ok(size) => size,
            Err(e) => {
                for p in pushes.iter() {
                    p.abort();
                }
                return Err(e);
            }
        };
        self.store.accept_fence(node, req.fence)?;
        self.store.stats.uploads.fetch_add(1, Ordering::Relaxed);

        let mut holders = vec![me];
        // A replica out of space makes a refusal for lack of copies a "no space" one.
        let mut full = None;
        while let Some(done) = futures_util::StreamExt::next(&mut pushes).await {
            match done {
                Ok((r, Ok(()))) => holders.push(r),
                Ok((r, Err(e))) => {
                    tracing::warn!(replica = %r, %node, error = %e, "replica push failed");
                    if matches!(e, ServiceError::NoSpace(_)) {
                        full = Some(r);
                    }
                }
                Err(e) => tracing::warn!(%node, error = %e, "replica push task failed"),
            }
        }
        // A pipelined push failed: the deferred replicas stand in, from the stored copy.
        let mut deferred = deferred.into_iter();
        while holders.len() < required {
            let Some((r, url)) = deferred.next() else {
                break;
            };
            match self.push(&url, node, &req.hash).await {
                Ok(()) => holders.push(r),
                Err(e) => {
                    tracing::warn!(replica = %r, %node, error = %e, "replica push failed");
                    if matches!(e, ServiceError::NoSpace(_)) {
                        full = Some(r);
                    }
                }
            }
        }
        let deferred: Vec<(ServerId, String)> = deferred.collect();
        self.metrics
            .observe("write_stage", "replicate", t.elapsed());
        if holders.len() < required {
            if let Some(r) = full {
                return Err(ServiceError::NoSpace(format!(
                    "replica {r} is out of space; {required} durable copies are needed"
                )));
            }
            return Err(ServiceError::Unavailable(format!(
                "only {} of {} copies are durable; {required} needed before acknowledging",
                holders.len(),
                1 + replicas.len()
            )));
        }
        let commit = CommitRequest {
            hash: req.hash.clone(),
            size,
            fence: req.fence,
            upload_id: req.upload_id,
            base: req.base,
            holders: holders.clone(),
            writer: req.writer.name,
            writer_id: Some(req.writer.id),
            primary: Some(me),
            replicas: Some(replicas.clone()),
            mode: req.mode,
            mtime_ns: req.mtime_ns,
            origin: req.origin,
        };
        let t = std::time::Instant::now();
        // A directory restarting (or failing over) meanwhile is waited for, within bounds.
        let c = &commit;
        let committed = self
            .directory
            .call_within(crate::peer::COMMIT_RIDE_OUT, |d| async move {
                self.peer.commit(&d, node, c).await
            })
            .await?;
        self.metrics.observe("write_stage", "commit", t.elapsed());
        let meta = committed.meta;
        // Off the critical path: the other replicas get their copy and join the holders.
        if !deferred.is_empty() {
            let this = self.clone();
            let hash = req.hash.clone();
            tokio::spawn(async move {
                for (r, url) in deferred {
                    let result = match this.push(&url, node, &hash).await {
                        Ok(()) => {
                            let (peer, hash) = (&this.peer, &hash);
                            this.directory
                                .call(|d| async move { peer.add_holder(&d, node, hash, r).await })
                                .await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        tracing::debug!(replica = %r, %node, error = %e, "late replica copy failed; the repair loop will make it");
                    }
                }
            });
        }
        if meta.hash == req.hash
            && let Some(old) = committed.superseded
        {
            self.spawn_drop_superseded(node, meta.hash.clone(), old);
        }
        Ok(meta)
    }

    /// In the background, the holders of `old` drop it once `new` is committed.
    pub(super) fn spawn_drop_superseded(
        self: &Arc<Self>,
        node: NodeId,
        new: ContentHash,
        old: common::api::Superseded,
    ) {
        if old.hash == new || old.hash.as_str() == ContentHash::EMPTY_HEX {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            // Under the file's lock, like every write: a later write of the same content
            // (A, B, A again) then either runs before this check, which finds A current
            // and keeps it, or after the drops, and stores A anew.
            let lock = this.node_locks.get(node);
            let _serialised = lock.lock().await;
            this.drop_superseded(&old, node, &new).await
        });
    }

    /// The cluster map (server URLs and liveness), re-fetched at most once a second: every
    /// write needs it, and a second-old view of liveness is fresh enough to pick replicas.
    pub(super) async fn cluster(&self) -> ServiceResult<common::api::ClusterInfo> {
        let now = std::time::Instant::now();
        if let Some((at, info)) = self
            .cluster_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && now.duration_since(*at) < Duration::from_secs(1)
        {
            return Ok(info.clone());
        }
        let info = self
            .directory
            .call(|d| async move { self.peer.cluster(&d).await })
            .await?;
        *self.cluster_cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((now, info.clone()));
        Ok(info)
    }

    /// Re-replication: pushes this server's copy of `(node, hash)` to the server at `url`.
    pub async fn copy_to(&self, node: NodeId, hash: &ContentHash, url: &str) -> ServiceResult<()> {
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(ServiceError::BadRequest(
                "copy target must be an http(s) URL".into(),
            ));
        }
        self.push(url, node, hash).await
    }

    /// A replica push fed chunk by chunk from `rx` while the primary writes its own copy.
    fn push_stream(
        &self,
        base: &str,
        node: NodeId,
        hash: &ContentHash,
        size: Option<u64>,
        rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
    ) -> impl std::future::Future<Output = ServiceResult<()>> + Send + 'static {
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut request = self
            .peer
            .stream_put(format!("{base}{}", routes::replica_put(node, hash)))
            .timeout(common::api::transfer_timeout(
                size.unwrap_or(self.store.max_blob_bytes),
            ))
            .body(reqwest::Body::wrap_stream(stream));
        if let Some(len) = size {
            request = request.header(reqwest::header::CONTENT_LENGTH, len);
        }
        send_replica(request, base.to_owned())
    }

    /// Pushes this server's stored copy of `(node, hash)` to the server at `base`.
    pub(super) async fn push(
        &self,
        base: &str,
        node: NodeId,
        hash: &ContentHash,
    ) -> ServiceResult<()> {
        let (file, len) = self.store.open_blob(node, hash).await?;
        let body =
            reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
        let request = self
            .peer
            .stream_put(format!("{base}{}", routes::replica_put(node, hash)))
            .header(reqwest::header::CONTENT_LENGTH, len)
            .timeout(common::api::transfer_timeout(len))
            .body(body);
        send_replica(request, base.to_owned()).await
    }

    /// Best effort: the servers that held the superseded version `old` of `node` drop it.
    /// Only that exact version is dropped, never "everything but the new one", so a newer
    /// version can never be deleted by an older write's clean-up.
    async fn drop_superseded(
        &self,
        old: &common::api::Superseded,
        node: NodeId,
        new: &ContentHash,
    ) {
        if &old.hash == new || old.hash.as_str() == ContentHash::EMPTY_HEX {
            return;
        }
        if let Err(e) = self.drop_if_superseded(node, &old.hash).await {
            tracing::warn!(%node, error = %e, "dropping the old copy failed");
        }
        let Ok(cluster) = self.cluster().await else {
            return;
        };
        for s in cluster
            .servers
            .iter()
            .filter(|s| old.holders.contains(&s.id) && Some(s.id) != self.id())
        {
            let url = format!("{}{}", s.url, routes::drop_blob(node, &old.hash));
            if let Err(e) = self.peer.post_empty(url, "drop").await {
                tracing::debug!(server = %s.id, error = %e, "dropping the old copy failed; the scrub will");
            }
        }
    }
}

/// The live ones of `replicas`, with their URLs, in placement order; a dead one is skipped (the
/// directory's repair catches it up later).
pub(super) fn live_replicas(
    cluster: Option<&common::api::ClusterInfo>,
    replicas: &[ServerId],
    node: NodeId,
) -> Vec<(ServerId, String)> {
    let mut live = Vec::new();
    for r in replicas {
        match cluster.and_then(|c| {
            c.servers
                .iter()
                .find(|s| s.id == *r && s.alive)
                .map(|s| s.url.clone())
        }) {
            Some(url) => live.push((*r, url)),
            None => tracing::warn!(replica = %r, %node, "replica is down; writing without it"),
        }
    }
    live
}

/// Sends one replica push and maps its failure.
async fn send_replica(request: reqwest::RequestBuilder, base: String) -> ServiceResult<()> {
    let resp = request.send().await.map_err(|e| {
        ServiceError::Unavailable(format!("pushing to {base}: {}", crate::tls::describe(&e)))
    })?;
    if !resp.status().is_success() {
        return Err(error_from_response(resp).await);
    }
    Ok(())
}
