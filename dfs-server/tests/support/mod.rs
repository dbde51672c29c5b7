//! Shared by the API test binaries: an in-process cluster on ephemeral loopback ports, a
//! logged-in user and raw HTTP calls to each service.
#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a part; a failed unwrap fails the test

use std::time::Duration;

use common::api::{
    AcquireRequest, AcquireResponse, ClusterInfo, CreateRequest, PublicKeyResponse, TokenResponse,
};
use common::{
    ContentHash, ErrorBody, ErrorCode, FileKind, NodeId, NodeMeta, UploadId, ValidName, routes,
};
use dfs_server::cluster::{ClusterConfig, ClusterHandle};
use rsa::PublicKey;
use rsa::pkcs8::DecodePublicKey;
use sha2::{Digest, Sha256};

/// A cluster and a logged-in user (`alice`).
pub struct Harness {
    pub cluster: ClusterHandle,
    pub http: reqwest::Client,
    pub token: String,
    pub _dir: Option<tempfile::TempDir>,
}

pub async fn start_on(
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut ClusterConfig),
) -> ClusterHandle {
    let mut cfg = ClusterConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    cfg.directory.heartbeat = Duration::from_millis(200);
    tweak(&mut cfg);
    dfs_server::cluster::start(cfg)
        .await
        .expect("cluster starts")
}

pub async fn public_key(http: &reqwest::Client, cluster: &ClusterHandle) -> PublicKey {
    let pk: PublicKeyResponse = http
        .get(format!("{}{}", cluster.auth_url, routes::AUTH_PUBLIC_KEY))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    PublicKey::from_public_key_pem(&pk.pem).unwrap()
}

pub async fn post_envelope(
    http: &reqwest::Client,
    cluster: &ClusterHandle,
    path: &str,
    env: &common::api::Envelope,
) -> reqwest::Response {
    http.post(format!("{}{path}", cluster.auth_url))
        .json(env)
        .send()
        .await
        .unwrap()
}

pub async fn signup_login(
    http: &reqwest::Client,
    cluster: &ClusterHandle,
    user: &str,
) -> TokenResponse {
    let pk = public_key(http, cluster).await;
    let env = dfs_server::auth::seal(&pk, user, "password123").unwrap();
    let r = post_envelope(http, cluster, routes::AUTH_SIGNUP, &env).await;
    assert!(
        r.status().is_success(),
        "signup: {}",
        r.text().await.unwrap()
    );
    let env = dfs_server::auth::seal(&pk, user, "password123").unwrap();
    let r = post_envelope(http, cluster, routes::AUTH_LOGIN, &env).await;
    assert!(r.status().is_success());
    r.json().await.unwrap()
}

impl Harness {
    pub async fn new(tweak: impl FnOnce(&mut ClusterConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cluster = start_on(dir.path(), tweak).await;
        let http = dfs_server::tls::client().expect("an HTTP client");
        let token = signup_login(&http, &cluster, "alice").await.token;
        Harness {
            cluster,
            http,
            token,
            _dir: Some(dir),
        }
    }

    pub fn dir(&self, path: &str) -> String {
        format!("{}{path}", self.cluster.directory_url)
    }

    pub async fn create(&self, parent: NodeId, name: &str, kind: FileKind) -> NodeMeta {
        let req = CreateRequest {
            name: ValidName::parse(name).unwrap(),
            kind,
            mode: if kind == FileKind::Dir { 0o755 } else { 0o644 },
            symlink_target: None,
            rdev: 0,
        };
        let r = self
            .http
            .post(self.dir(&routes::children(parent)))
            .bearer_auth(&self.token)
            .json(&req)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "create: {}", r.status());
        r.json().await.unwrap()
    }

    /// An authorised GET of a directory document.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.http
            .get(self.dir(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn cluster_info(&self) -> ClusterInfo {
        self.http
            .get(self.dir(routes::CLUSTER))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn server_url(&self, id: common::ServerId) -> String {
        self.cluster_info()
            .await
            .servers
            .into_iter()
            .find(|s| s.id == id)
            .unwrap()
            .url
    }

    pub async fn acquire(&self, node: NodeId, waiter: u8, wait_ms: u64) -> AcquireResponse {
        let req = AcquireRequest {
            waiter: UploadId::from_bytes([waiter; 16]),
            wait_ms,
        };
        let r = self
            .http
            .post(format!(
                "{}{}",
                self.cluster.lock_url,
                routes::lock(node, "acquire")
            ))
            .bearer_auth(&self.token)
            .header(
                routes::CAPABILITY_HEADER,
                self.commit_capability(node).await,
            )
            .json(&req)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "acquire: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn release(&self, node: NodeId, waiter: u8) {
        let r = self
            .http
            .post(format!(
                "{}{}",
                self.cluster.lock_url,
                routes::lock(node, "release")
            ))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "waiter": UploadId::from_bytes([waiter; 16]) }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    /// A push a close waits for (it may replace any version).
    pub async fn write(
        &self,
        meta: &NodeMeta,
        data: &[u8],
        fence: u64,
        upload: u8,
    ) -> reqwest::Response {
        self.write_based(meta, data, fence, upload, "0;waiting")
            .await
    }

    /// A push with base header `base` (`N`: applies only over version N; `N;waiting`).
    pub async fn write_based(
        &self,
        meta: &NodeMeta,
        data: &[u8],
        fence: u64,
        upload: u8,
        base: &str,
    ) -> reqwest::Response {
        let primary = self.server_url(meta.primary.unwrap()).await;
        self.http
            .put(format!("{primary}{}", routes::file_write(meta.id)))
            .bearer_auth(&self.token)
            .header(routes::FENCE_HEADER, fence.to_string())
            .header(
                routes::FENCE_SIG_HEADER,
                dfs_server::lock::sign_fence(
                    &self.cluster.cluster_key,
                    meta.id,
                    common::FenceToken(fence),
                ),
            )
            .header(routes::HASH_HEADER, hash_of(data).as_str())
            .header(
                routes::UPLOAD_ID_HEADER,
                UploadId::from_bytes([upload; 16]).as_str(),
            )
            .header(routes::BASE_HEADER, base)
            .body(data.to_vec())
            .send()
            .await
            .unwrap()
    }

    /// Reads `meta`'s version from `server` as a client does: opens it at the directory for
    /// the capability first.
    pub async fn read_from(&self, server: common::ServerId, meta: &NodeMeta) -> reqwest::Response {
        let cap = self.capability(meta.id).await;
        self.read_with(server, meta, cap.as_deref()).await
    }

    /// The capability to queue for `id`'s write lock (empty if refused).
    pub async fn commit_capability(&self, id: NodeId) -> String {
        self.capability_for(id, "commit").await.unwrap_or_default()
    }

    /// The capability an open for reading gets from the directory (None if refused).
    pub async fn capability(&self, id: NodeId) -> Option<String> {
        self.capability_for(id, "r").await
    }

    /// The capability the directory answers `GET ?access=ACCESS` with (None if refused).
    async fn capability_for(&self, id: NodeId, access: &str) -> Option<String> {
        let r = self
            .http
            .get(format!("{}?access={access}", self.dir(&routes::node(id))))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        r.headers()
            .get(routes::CAPABILITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Reads `meta`'s version from `server` with `cap` (or none).
    pub async fn read_with(
        &self,
        server: common::ServerId,
        meta: &NodeMeta,
        cap: Option<&str>,
    ) -> reqwest::Response {
        let url = self.server_url(server).await;
        let mut req = self
            .http
            .get(format!("{url}{}", routes::file_read(meta.id, &meta.hash)))
            .bearer_auth(&self.token);
        if let Some(c) = cap {
            req = req.header(routes::CAPABILITY_HEADER, c);
        }
        req.send().await.unwrap()
    }
}

pub fn hash_of(data: &[u8]) -> ContentHash {
    ContentHash::from_digest(&Sha256::digest(data).into())
}

pub async fn error_code(r: reqwest::Response) -> (u16, ErrorCode) {
    let status = r.status().as_u16();
    let body: ErrorBody = r.json().await.expect("JSON error body");
    (status, body.code)
}

pub fn granted(r: &AcquireResponse) -> u64 {
    match r {
        AcquireResponse::Granted(g) => g.fence.0,
        AcquireResponse::Queued { .. } => panic!("expected grant, got {r:?}"),
    }
}
