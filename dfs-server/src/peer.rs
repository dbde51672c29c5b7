//! `Peer`: the HTTP client one service uses to call another (cluster key attached), mapping the
//! callee's error body back into a [`ServiceError`].

use std::time::Duration;

use anyhow::Context;

use common::api::{
    ClusterInfo, CommitRequest, RegisterServerRequest, RegisterServerResponse,
    RegisterServiceRequest,
};
use common::{ErrorBody, NodeId, NodeMeta, ServerId, routes};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ServiceError, ServiceResult};

/// The directory URLs a service knows (`--directory URL,URL,...`, all of one cluster) and the
/// one it calls now: a call that finds no answer (or `unavailable`) moves on to the next URL,
/// and the service stays on the one that answered.
#[derive(Debug, Clone)]
pub struct Directories {
    urls: std::sync::Arc<Vec<String>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Directories {
    /// From `URL` or `URL,URL,...` (trailing slashes dropped); an error if none is given.
    pub fn parse(spec: &str) -> anyhow::Result<Self> {
        let urls: Vec<String> = spec
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        anyhow::ensure!(!urls.is_empty(), "no directory URL given");
        Ok(Directories {
            urls: std::sync::Arc::new(urls),
            current: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    /// Exactly `url` (no list parsing): the in-process cluster's own directory.
    pub fn single(url: String) -> Self {
        Directories {
            urls: std::sync::Arc::new(vec![url]),
            current: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    /// The URL calls go to now.
    pub fn current(&self) -> &str {
        &self.urls[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.urls.len()]
    }

    /// Every URL, in order.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Calls `f` with the current URL, and on `unavailable` with each other URL once, staying
    /// on the first that answers; the last error if none does.
    pub async fn call<T, F, Fut>(&self, f: F) -> ServiceResult<T>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ServiceResult<T>>,
    {
        use std::sync::atomic::Ordering;
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut last = None;
        for k in 0..n {
            let idx = (start + k) % n;
            match f(self.urls[idx].clone()).await {
                Err(e @ ServiceError::Unavailable(_)) => {
                    if n > 1 {
                        tracing::warn!(url = %self.urls[idx], error = %e, "directory unavailable; trying the next one");
                    }
                    last = Some(e);
                }
                other => {
                    if k > 0 {
                        self.current.store(idx, Ordering::Relaxed);
                    }
                    return other;
                }
            }
        }
        Err(last.unwrap_or_else(|| ServiceError::Unavailable("no directory URL".into())))
    }

    /// As `call`, retried while every URL is unavailable, with pauses from 50 ms doubling to
    /// 1 s (jittered), for up to `bound`: how a primary's commit rides out a directory
    /// restart or failover (re-sending a commit is safe: the directory applies an upload id
    /// once).
    pub async fn call_within<T, F, Fut>(&self, bound: Duration, f: F) -> ServiceResult<T>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = ServiceResult<T>>,
    {
        let deadline = tokio::time::Instant::now() + bound;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.call(&f).await {
                Err(e @ ServiceError::Unavailable(_)) => {
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(e);
                    }
                    let jitter = 0.5 + rand::random::<f64>() / 2.0;
                    tracing::debug!(error = %e, "directory unavailable; retrying");
                    tokio::time::sleep(pause.mul_f64(jitter).min(deadline - now)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }
}

impl std::fmt::Display for Directories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls.join(","))
    }
}

/// How long a primary keeps re-sending a commit while the directory is unavailable: within the
/// client's push window (`--close-timeout-secs`, 30 s by default), which also re-sends.
pub const COMMIT_RIDE_OUT: Duration = Duration::from_secs(20);

/// A client for service-to-service calls.
#[derive(Clone)]
pub struct Peer {
    http: reqwest::Client,
    streaming: reqwest::Client,
    cluster_key: String,
}

/// Maps a callee's error response into a service error of the same class.
pub async fn error_from_response(resp: reqwest::Response) -> ServiceError {
    let status = resp.status();
    match resp.json::<ErrorBody>().await {
        Ok(body) => ServiceError::from_wire(body.code, format!("peer: {}", body.message)),
        Err(_) => ServiceError::Unavailable(format!("peer answered {status}")),
    }
}

impl Peer {
    /// A client with request timeouts; `cluster_key` authenticates it to other services.
    /// https URLs are checked against the system's roots.
    pub fn new(cluster_key: &str) -> anyhow::Result<Self> {
        Peer::with_tls(cluster_key, &crate::tls::ClientTls::system())
    }

    /// As `new`, trusting `tls`'s roots for https URLs. An error if the HTTP clients cannot
    /// be built.
    pub fn with_tls(cluster_key: &str, tls: &crate::tls::ClientTls) -> anyhow::Result<Self> {
        let build = |timeout: Option<Duration>| -> anyhow::Result<reqwest::Client> {
            let mut b = tls.builder()?.connect_timeout(Duration::from_secs(3));
            // Streaming requests get a deadline scaled to their size per request instead.
            if let Some(t) = timeout {
                b = b.timeout(t);
            } else {
                b = b.tcp_keepalive(Duration::from_secs(15));
            }
            b.build()
                .context("building the HTTP client for other services")
        };
        Ok(Peer {
            http: build(Some(Duration::from_secs(10)))?,
            streaming: build(None)?,
            cluster_key: cluster_key.to_owned(),
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> ServiceResult<T> {
        let resp = req
            .header(routes::CLUSTER_KEY_HEADER, &self.cluster_key)
            .send()
            .await
            .map_err(|e| {
                ServiceError::Unavailable(format!("{what}: {}", crate::tls::describe(&e)))
            })?;
        if !resp.status().is_success() {
            return Err(error_from_response(resp).await);
        }
        resp.json()
            .await
            .map_err(|e| ServiceError::Unavailable(format!("{what}: bad answer: {e}")))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        url: String,
        body: &B,
        what: &str,
    ) -> ServiceResult<T> {
        self.send(self.http.post(url).json(body), what).await
    }

    /// The directory's cluster map.
    /// A map from an https:// directory naming a plain http:// service is refused.
    pub async fn cluster(&self, dir: &str) -> ServiceResult<ClusterInfo> {
        let info: ClusterInfo = self
            .send(
                self.http.get(format!("{dir}{}", routes::CLUSTER)),
                "cluster map",
            )
            .await?;
        info.check_https(dir).map_err(ServiceError::Unavailable)?;
        Ok(info)
    }

    /// One node's metadata from the directory.
    pub async fn node(&self, dir: &str, id: NodeId) -> ServiceResult<NodeMeta> {
        self.send(
            self.http.get(format!("{dir}{}", routes::node(id))),
            "node metadata",
        )
        .await
    }

    /// Registers a file server.
    pub async fn register_server(
        &self,
        dir: &str,
        req: &RegisterServerRequest,
    ) -> ServiceResult<RegisterServerResponse> {
        self.post(
            format!("{dir}{}", routes::REGISTER_SERVER),
            req,
            "registering",
        )
        .await
    }

    /// Sends a heartbeat.
    pub async fn heartbeat(
        &self,
        dir: &str,
        id: ServerId,
        space: Option<common::api::Space>,
    ) -> ServiceResult<()> {
        self.post::<_, serde_json::Value>(
            format!("{dir}{}", routes::heartbeat(id)),
            &space,
            "heartbeat",
        )
        .await
        .map(drop)
    }

    /// Registers the lock or auth service.
    pub async fn register_service(
        &self,
        dir: &str,
        req: &RegisterServiceRequest,
    ) -> ServiceResult<()> {
        self.post::<_, serde_json::Value>(
            format!("{dir}{}", routes::REGISTER_SERVICE),
            req,
            "registering",
        )
        .await
        .map(drop)
    }

    /// Records a new version in the directory.
    pub async fn commit(
        &self,
        dir: &str,
        id: NodeId,
        req: &CommitRequest,
    ) -> ServiceResult<common::api::CommitResponse> {
        self.post(format!("{dir}{}", routes::commit(id)), req, "commit")
            .await
    }

    /// Several commits in one directory transaction, one result per item.
    pub async fn commit_batch(
        &self,
        dir: &str,
        req: &common::api::CommitBatchRequest,
    ) -> ServiceResult<common::api::BatchResponse<common::api::CommitResponse>> {
        self.post(
            format!("{dir}{}", routes::COMMIT_BATCH),
            req,
            "batch commit",
        )
        .await
    }

    /// Stores a batch of blobs on the replica at `base` (a frame of `common::batch`).
    pub async fn replica_batch(
        &self,
        base: &str,
        frame: bytes::Bytes,
    ) -> ServiceResult<common::api::BatchResponse<u64>> {
        let len = frame.len() as u64;
        self.send(
            self.streaming
                .put(format!("{base}{}", routes::REPLICA_BATCH))
                .timeout(common::api::transfer_timeout(len))
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(frame),
            "replica batch",
        )
        .await
    }

    /// A streaming request builder with the cluster key (replica pushes).
    pub fn stream_put(&self, url: String) -> reqwest::RequestBuilder {
        self.streaming
            .put(url)
            .header(routes::CLUSTER_KEY_HEADER, &self.cluster_key)
    }

    /// Asks the server at `from` to push its copy of `(id, hash)` to the server at `to`.
    pub async fn copy_blob(
        &self,
        from: &str,
        id: NodeId,
        hash: &common::ContentHash,
        size: u64,
        to: &str,
    ) -> ServiceResult<()> {
        let req = self
            .streaming
            .post(format!("{from}{}", routes::copy_to(id, hash)))
            .timeout(common::api::transfer_timeout(size))
            .json(&common::api::CopyToRequest { url: to.to_owned() });
        self.send::<serde_json::Value>(req, "copy").await.map(drop)
    }

    /// Tells the directory that `server` now holds `(id, hash)` durably.
    pub async fn add_holder(
        &self,
        dir: &str,
        id: NodeId,
        hash: &common::ContentHash,
        server: ServerId,
    ) -> ServiceResult<()> {
        let url = format!("{dir}{}", routes::add_holder(id));
        self.holder_change(url, hash, server, "add holder").await
    }

    /// Several late copies join their versions' holders at once.
    pub async fn add_holders(
        &self,
        dir: &str,
        items: Vec<common::api::HolderItem>,
    ) -> ServiceResult<()> {
        let url = format!("{dir}{}", routes::ADD_HOLDERS_BATCH);
        let req = common::api::AddHoldersRequest { items };
        self.post_unit(url, &req, "add holders").await
    }

    async fn holder_change(
        &self,
        url: String,
        hash: &common::ContentHash,
        server: ServerId,
        what: &str,
    ) -> ServiceResult<()> {
        let req = common::api::DropHolderRequest {
            server,
            hash: hash.clone(),
        };
        self.post_unit(url, &req, what).await
    }

    /// Tells the directory that `server` lost its copy of `(id, hash)`.
    pub async fn drop_holder(
        &self,
        dir: &str,
        id: NodeId,
        hash: &common::ContentHash,
        server: ServerId,
    ) -> ServiceResult<()> {
        let url = format!("{dir}{}", routes::drop_holder(id));
        self.holder_change(url, hash, server, "drop holder").await
    }

    /// A short POST with the cluster key and no interesting answer.
    pub async fn post_empty(&self, url: String, what: &str) -> ServiceResult<()> {
        self.post_unit(url, &(), what).await
    }

    /// A POST whose answer carries nothing the caller needs.
    async fn post_unit<B: Serialize>(
        &self,
        url: String,
        body: &B,
        what: &str,
    ) -> ServiceResult<()> {
        self.post::<_, serde_json::Value>(url, body, what)
            .await
            .map(drop)
    }
}
