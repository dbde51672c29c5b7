//! `Remote`: every call the client makes to the cluster (directory, lock, auth, file servers)
//! over HTTP, each with a deadline; tokens are renewed before they expire.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;

use common::api::{
    AcquireRequest, AcquireResponse, ClusterInfo, CreateRequest, Grant, LockRequest,
    PublicKeyResponse, RefreshRequest, RenameRequest, SetAttrRequest, StatFs, TokenResponse,
    WaiterId,
};
use common::{
    ContentHash, DirEntry, ErrorBody, ErrorCode, NodeId, NodeMeta, UploadId, ValidName, routes,
};
use futures_util::StreamExt;
use rsa::PublicKey;
use rsa::pkcs8::DecodePublicKey;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::creds::{CredStore, SavedLogin};
use crate::progress::{Progress, unless_stalled};

/// Why a remote call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// The service answered with a dfs error.
    #[error("{message}")]
    Api {
        /// Error class.
        code: ErrorCode,
        /// Message from the server.
        message: String,
    },
    /// No answer (connection refused, reset, DNS).
    #[error("server unreachable: {0}")]
    Network(String),
    /// No answer in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Local I/O while moving file contents.
    #[error("local I/O: {0}")]
    Io(String),
    /// Writing a download into the local cache failed (the local disk is full, say): no other
    /// server can help, and the errno is what the caller sees.
    #[error("local cache: {message}")]
    Local {
        /// The OS error number.
        errno: i32,
        /// What failed.
        message: String,
    },
    /// No saved login for this server.
    #[error("not logged in to {0}; run `dfs login --server {0}`")]
    NotLoggedIn(String),
    /// The auth service presented a public key other than the one pinned: credentials are
    /// not sealed with it (it may be someone in the middle).
    #[error(
        "the auth service's key changed: it presents {found}, this client pinned {expected}; \
         nothing was sent"
    )]
    AuthKeyChanged {
        /// The pinned fingerprint.
        expected: String,
        /// The fingerprint presented.
        found: String,
    },
}

impl RemoteError {
    /// The server answered that the thing does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            RemoteError::Api {
                code: ErrorCode::NotFound,
                ..
            }
        )
    }

    /// Could not reach the server at all (as opposed to a refusal).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, RemoteError::Network(_) | RemoteError::Timeout(_))
            || matches!(
                self,
                RemoteError::Api {
                    code: ErrorCode::Unavailable | ErrorCode::Internal,
                    ..
                }
            )
    }
}

fn net(what: &str, e: reqwest::Error) -> RemoteError {
    let text = dfs_server::tls::describe(&e);
    if e.is_timeout() {
        RemoteError::Timeout(format!("{what}: {text}"))
    } else {
        RemoteError::Network(format!("{what}: {text}"))
    }
}

async fn api_error(resp: reqwest::Response) -> RemoteError {
    let status = resp.status();
    match resp.json::<ErrorBody>().await {
        Ok(b) => RemoteError::Api {
            code: b.code,
            message: b.message,
        },
        Err(_) => RemoteError::Api {
            code: ErrorCode::Internal,
            message: format!("server answered {status}"),
        },
    }
}

/// One upload of a file's content to its primary.
#[derive(Clone, Copy)]
pub struct Upload<'a> {
    /// The local copy to send.
    pub path: &'a Path,
    /// Its SHA-256.
    pub hash: &'a ContentHash,
    /// Its size (exactly this many bytes are sent).
    pub size: u64,
    /// The lock grant (fencing token and signature).
    pub grant: &'a Grant,
    /// Idempotency key.
    pub upload_id: &'a UploadId,
    /// What the content was based on.
    pub base: common::api::PushBase,
    /// The push's progress: bytes sent count, and the upload is given up once nothing moved
    /// for the stall timeout.
    pub progress: &'a Progress,
    /// Permission bits to apply with the version.
    pub mode: Option<u32>,
    /// Explicit modification time to apply with the version.
    pub mtime_ns: Option<u64>,
}

/// Bodies up to this size are sent from one buffer rather than streamed.
const SMALL_BODY: u64 = 1 << 20;

/// Client-side timeouts.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Deadline of one metadata or lock call.
    pub call_timeout: Duration,
    /// How long an upload or download may make no progress before it is given up (it has no
    /// total deadline: a transfer that keeps moving is never cut off).
    pub stall_timeout: Duration,
    /// The roots https URLs are checked against (`--ca-file`, else the system's).
    pub tls: dfs_server::tls::ClientTls,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            call_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            tls: dfs_server::tls::ClientTls::system(),
        }
    }
}

struct Session {
    login: Option<SavedLogin>,
    /// After a failed refresh, the next attempt waits until then (ms since the epoch).
    retry_refresh_at_ms: u64,
}

/// Counters of this client (for `dfs status` and tests).
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Whole-file downloads.
    pub downloads: AtomicU64,
    /// Whole-file uploads.
    pub uploads: AtomicU64,
    /// Batched upload requests (each carrying several files).
    pub batches: AtomicU64,
}

/// The cluster as the client sees it.
pub struct Remote {
    server: String,
    http: reqwest::Client,
    stream: reqwest::Client,
    session: tokio::sync::Mutex<Session>,
    creds: Option<CredStore>,
    cluster: std::sync::Mutex<Option<ClusterInfo>>,
    config: RemoteConfig,
    /// The identity of the current login, for what the mount shows (kept in step by `token`).
    identity: std::sync::Mutex<Option<common::Identity>>,
    /// Capabilities the directory gave with authorised opens, by (node, content hash): what a
    /// download shows the file servers. The newest per node only.
    capabilities:
        std::sync::Mutex<std::collections::HashMap<NodeId, (common::ContentHash, String)>>,
    /// Capabilities to queue for write locks, by node, with when they were given (ms).
    commit_caps: std::sync::Mutex<std::collections::HashMap<NodeId, (String, u64)>>,
    /// The auth key fingerprint credentials may be sealed with (None: any, trust on first use).
    auth_key_pin: std::sync::Mutex<Option<String>>,
    /// The fingerprint of the auth key last used to seal credentials.
    auth_key_used: std::sync::Mutex<Option<String>>,
    /// Counters.
    pub stats: Arc<ClientStats>,
    /// A `--local-ids` mount: requests made for a local caller (`caller::current`) name it.
    local_ids: std::sync::atomic::AtomicBool,
}

fn now_ms() -> u64 {
    dfs_server::store::now_ms()
}

impl Remote {
    /// A client of the directory at `server`, authenticated by `login` (renewed tokens are
    /// saved back to `creds`).
    pub fn new(
        server: &str,
        login: Option<SavedLogin>,
        creds: Option<CredStore>,
        config: RemoteConfig,
    ) -> anyhow::Result<Self> {
        let server = server.trim_end_matches('/').to_owned();
        let http = config
            .tls
            .builder()?
            .connect_timeout(Duration::from_secs(3))
            .timeout(config.call_timeout + Duration::from_secs(30))
            .default_headers(origin_header())
            .build()
            .context("building the HTTP client")?;
        // Bodies get a per-request deadline scaled to their size (reqwest's read_timeout would cap
        // the whole upload, fsyncs and replication included, at a fixed time).
        let stream = config
            .tls
            .builder()?
            .connect_timeout(Duration::from_secs(3))
            .tcp_keepalive(Duration::from_secs(15))
            .build()
            .context("building the HTTP client for file bodies")?;
        Ok(Remote {
            identity: std::sync::Mutex::new(login.as_ref().and_then(|l| l.id.clone())),
            capabilities: std::sync::Mutex::new(std::collections::HashMap::new()),
            commit_caps: std::sync::Mutex::new(std::collections::HashMap::new()),
            server,
            http,
            stream,
            session: tokio::sync::Mutex::new(Session {
                login,
                retry_refresh_at_ms: 0,
            }),
            creds,
            cluster: std::sync::Mutex::new(None),
            config,
            auth_key_pin: std::sync::Mutex::new(None),
            auth_key_used: std::sync::Mutex::new(None),
            stats: Arc::new(ClientStats::default()),
            local_ids: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Makes this a `--local-ids` client: every request made for a local caller
    /// (`caller::scope`) acts as that caller (`x-dfs-act-as`), which the services accept only
    /// from an administrator's token.
    pub fn set_local_ids(&self, on: bool) {
        self.local_ids
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this is a `--local-ids` client.
    pub fn local_ids(&self) -> bool {
        self.local_ids.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The header naming the local caller a request acts for (none outside a caller's
    /// operation, or on an ordinary mount: then it acts as the login itself). On a
    /// `--local-ids` mount, a caller whose header cannot be made fails the request (EPERM):
    /// sending none would act as the administrator.
    fn act_as(&self) -> Result<reqwest::header::HeaderMap, RemoteError> {
        let mut h = reqwest::header::HeaderMap::new();
        if self.local_ids()
            && let Some(id) = crate::caller::current()
        {
            let v = reqwest::header::HeaderValue::from_str(&id.act_as_header()).map_err(|e| {
                RemoteError::Local {
                    errno: libc::EPERM,
                    message: format!("naming local caller uid {} to the cluster: {e}", id.uid),
                }
            })?;
            h.insert(routes::ACT_AS_HEADER, v);
        }
        Ok(h)
    }

    /// Seals credentials (signup, login) only with the auth key of this fingerprint
    /// (`dfs_server::auth::keys::fingerprint`); None: with whatever key the service presents.
    pub fn pin_auth_key(&self, fingerprint: Option<String>) {
        *self.auth_key_pin.lock().unwrap_or_else(|p| p.into_inner()) = fingerprint;
    }

    /// The fingerprint of the auth key the last signup or login sealed with.
    pub fn auth_key_used(&self) -> Option<String> {
        self.auth_key_used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// This client with transfers given up after `window` without progress.
    pub fn with_stall_timeout(mut self, window: Duration) -> Self {
        self.config.stall_timeout = window;
        self
    }

    /// The name of the user this client is logged in as.
    pub async fn user(&self) -> Option<String> {
        self.session
            .lock()
            .await
            .login
            .as_ref()
            .map(|l| l.user.clone())
    }

    /// The directory URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn dir(&self, path: &str) -> String {
        format!("{}{path}", self.server)
    }

    /// A login another `dfs` process saved for this server that is newer than `than` (refresh
    /// tokens are single use: whoever refreshed first holds the live one).
    fn newer_saved_login(&self, than: &SavedLogin) -> Option<SavedLogin> {
        let saved = self.creds.as_ref()?.get(&self.server).ok()??;
        (saved.refresh_token != than.refresh_token && saved.expires_at_ms > than.expires_at_ms)
            .then_some(saved)
    }

    /// The bearer token, renewed with the refresh token first when it nears expiry. A login
    /// renewed meanwhile by another process sharing the credentials file is adopted, and a
    /// failed renewal is not retried for 30 s while the old token is still valid.
    async fn token(&self) -> Result<String, RemoteError> {
        let mut s = self.session.lock().await;
        let login = s
            .login
            .clone()
            .ok_or_else(|| RemoteError::NotLoggedIn(self.server.clone()))?;
        if login.id.is_some() {
            *self.identity.lock().unwrap_or_else(|p| p.into_inner()) = login.id.clone();
        }
        let now = now_ms();
        if now < login.renew_at_ms() || (now < s.retry_refresh_at_ms && login.expires_at_ms > now) {
            return Ok(login.token);
        }
        if let Some(saved) = self.newer_saved_login(&login) {
            let token = saved.token.clone();
            s.login = Some(saved);
            return Ok(token);
        }
        match self.refresh(&login.refresh_token).await {
            Ok(t) => {
                let token = t.token.clone();
                let renewed = SavedLogin::from_response(t);
                if let Some(c) = &self.creds
                    && let Err(e) = c.put(&self.server, Some(renewed.clone()))
                {
                    tracing::warn!(error = %e, "saving the renewed token failed");
                }
                s.login = Some(renewed);
                tracing::info!("login token renewed");
                Ok(token)
            }
            Err(e) => {
                // Another process may have renewed with our refresh token just before us.
                if let Some(saved) = self.newer_saved_login(&login) {
                    let token = saved.token.clone();
                    s.login = Some(saved);
                    return Ok(token);
                }
                if login.expires_at_ms > now_ms() {
                    // Still valid for a while: keep using it, try again later.
                    tracing::warn!(error = %e, "token refresh failed; retrying in 30 s");
                    s.retry_refresh_at_ms = now_ms() + 30_000;
                    Ok(login.token)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn refresh(&self, refresh_token: &str) -> Result<TokenResponse, RemoteError> {
        let auth = self.auth_url().await?;
        let req = RefreshRequest {
            refresh_token: refresh_token.to_owned(),
        };
        let resp = self
            .http
            .post(format!("{auth}{}", routes::AUTH_REFRESH))
            .timeout(self.config.call_timeout)
            .json(&req)
            .send()
            .await
            .map_err(|e| net("refresh", e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        resp.json().await.map_err(|e| net("refresh", e))
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<T, RemoteError> {
        self.send_raw(req, what)
            .await?
            .json()
            .await
            .map_err(|e| net(what, e))
    }

    /// `send`, answering the response itself (for its headers).
    async fn send_raw(
        &self,
        req: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::Response, RemoteError> {
        let token = self.token().await?;
        let resp = req
            .bearer_auth(token)
            .headers(self.act_as()?)
            .timeout(self.config.call_timeout)
            .send()
            .await
            .map_err(|e| {
                // A restarted service may be at a new address: fetch the map again next time.
                self.invalidate_cluster();
                net(what, e)
            })?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        Ok(resp)
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        url: String,
        body: &B,
        what: &str,
    ) -> Result<T, RemoteError> {
        self.send(self.http.post(url).json(body), what).await
    }

    /// The cluster map (fetched once, refreshed with `refresh = true`). A map from an https://
    /// directory that names a plain http:// service is refused.
    pub async fn cluster(&self, refresh: bool) -> Result<ClusterInfo, RemoteError> {
        if !refresh && let Some(c) = self.cluster.lock().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let resp = self
            .http
            .get(self.dir(routes::CLUSTER))
            .timeout(self.config.call_timeout)
            .send()
            .await
            .map_err(|e| net("cluster map", e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        let info: ClusterInfo = resp.json().await.map_err(|e| net("cluster map", e))?;
        // An https directory naming a plain service: refuse it rather than downgrade.
        info.check_https(&self.server)
            .map_err(RemoteError::Network)?;
        if let Ok(mut c) = self.cluster.lock() {
            *c = Some(info.clone());
        }
        Ok(info)
    }

    /// The URL of the auth or lock service from the cluster map (fetched again once if the
    /// cached map does not name it yet).
    async fn service_url(
        &self,
        pick: fn(&ClusterInfo) -> Option<String>,
        what: &str,
    ) -> Result<String, RemoteError> {
        if let Some(u) = pick(&self.cluster(false).await?) {
            return Ok(u);
        }
        pick(&self.cluster(true).await?).ok_or_else(|| RemoteError::Api {
            code: ErrorCode::Unavailable,
            message: format!("no {what} service registered with the directory"),
        })
    }

    async fn auth_url(&self) -> Result<String, RemoteError> {
        self.service_url(|c| c.auth_url.clone(), "auth").await
    }

    async fn lock_url(&self) -> Result<String, RemoteError> {
        self.service_url(|c| c.lock_url.clone(), "lock").await
    }

    /// Forgets the cluster map, so the next call fetches server URLs afresh (a restarted
    /// server may have a new address).
    fn invalidate_cluster(&self) {
        if let Ok(mut c) = self.cluster.lock() {
            *c = None;
        }
    }

    async fn server_url(&self, id: common::ServerId) -> Result<String, RemoteError> {
        for refresh in [false, true] {
            if let Some(s) = self
                .cluster(refresh)
                .await?
                .servers
                .into_iter()
                .find(|s| s.id == id)
            {
                return Ok(s.url);
            }
        }
        Err(RemoteError::Api {
            code: ErrorCode::Unavailable,
            message: format!("file server {id} unknown"),
        })
    }

    /// Seals `user`/`password` with the auth key and posts it to `path` (signup or login).
    async fn sealed(
        &self,
        path: &str,
        user: &str,
        password: &str,
        cluster_key: Option<&str>,
    ) -> Result<reqwest::Response, RemoteError> {
        let auth = self.auth_url().await?;
        let pk: PublicKeyResponse = self
            .http
            .get(format!("{auth}{}", routes::AUTH_PUBLIC_KEY))
            .timeout(self.config.call_timeout)
            .send()
            .await
            .map_err(|e| net("auth key", e))?
            .json()
            .await
            .map_err(|e| net("auth key", e))?;
        let key = PublicKey::from_public_key_pem(&pk.pem)
            .map_err(|e| RemoteError::Io(format!("bad auth public key: {e}")))?;
        let found = dfs_server::auth::keys::fingerprint(&key)
            .map_err(|e| RemoteError::Io(format!("bad auth public key: {e}")))?;
        let pinned = self
            .auth_key_pin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(expected) = pinned
            && expected != found
        {
            return Err(RemoteError::AuthKeyChanged { expected, found });
        }
        *self.auth_key_used.lock().unwrap_or_else(|p| p.into_inner()) = Some(found);
        let env = dfs_server::auth::seal(&key, user, password).map_err(|e| RemoteError::Api {
            code: ErrorCode::BadRequest,
            message: e.to_string(),
        })?;
        let mut req = self.http.post(format!("{auth}{path}"));
        if let Some(k) = cluster_key {
            req = req.header(routes::CLUSTER_KEY_HEADER, k);
        }
        let resp = req
            .timeout(self.config.call_timeout)
            .json(&env)
            .send()
            .await
            .map_err(|e| net("auth", e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        Ok(resp)
    }

    /// Every user and their identity (the administrator, with the cluster key).
    pub async fn users(
        &self,
        cluster_key: &str,
    ) -> Result<Vec<common::api::UserInfo>, RemoteError> {
        let auth = self.auth_url().await?;
        let resp = self
            .http
            .get(format!("{auth}{}", routes::AUTH_USERS))
            .header(routes::CLUSTER_KEY_HEADER, cluster_key)
            .timeout(self.config.call_timeout)
            .send()
            .await
            .map_err(|e| net("users", e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        resp.json().await.map_err(|e| net("users", e))
    }

    /// Changes a user's identity (the administrator, with the cluster key).
    pub async fn set_user(
        &self,
        user: &str,
        req: &common::api::SetUserRequest,
        cluster_key: &str,
    ) -> Result<common::api::UserInfo, RemoteError> {
        let auth = self.auth_url().await?;
        let resp = self
            .http
            .patch(format!("{auth}{}", routes::auth_user(user)))
            .header(routes::CLUSTER_KEY_HEADER, cluster_key)
            .timeout(self.config.call_timeout)
            .json(req)
            .send()
            .await
            .map_err(|e| net("set user", e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        resp.json().await.map_err(|e| net("set user", e))
    }

    /// An administrator's call to the auth service with the cluster key: `body` posted to
    /// `path` (or a GET without one).
    async fn admin_call<T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&impl Serialize>,
        cluster_key: &str,
        what: &str,
    ) -> Result<T, RemoteError> {
        let url = format!("{}{path}", self.auth_url().await?);
        let req = match body {
            Some(b) => self.http.post(url).json(b),
            None => self.http.get(url),
        };
        let resp = req
            .header(routes::CLUSTER_KEY_HEADER, cluster_key)
            .timeout(self.config.call_timeout)
            .send()
            .await
            .map_err(|e| net(what, e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        resp.json().await.map_err(|e| net(what, e))
    }

    /// Every named group (the administrator, with the cluster key).
    pub async fn groups(
        &self,
        cluster_key: &str,
    ) -> Result<Vec<common::api::GroupInfo>, RemoteError> {
        self.admin_call(routes::AUTH_GROUPS, None::<&()>, cluster_key, "groups")
            .await
    }

    /// Creates a group and/or adds members (the administrator, with the cluster key).
    pub async fn add_group(
        &self,
        name: &str,
        req: &common::api::AddGroupRequest,
        cluster_key: &str,
    ) -> Result<common::api::GroupInfo, RemoteError> {
        self.admin_call(
            &routes::auth_group(name),
            Some(req),
            cluster_key,
            "add group",
        )
        .await
    }

    /// Removes members, or the group with none named (the administrator, with the cluster
    /// key); the group as it is now, None once removed.
    pub async fn remove_group(
        &self,
        name: &str,
        req: &common::api::RemoveGroupRequest,
        cluster_key: &str,
    ) -> Result<Option<common::api::GroupInfo>, RemoteError> {
        self.admin_call(
            &routes::auth_group_remove(name),
            Some(req),
            cluster_key,
            "remove group",
        )
        .await
    }

    /// Creates a user.
    pub async fn signup(&self, user: &str, password: &str) -> Result<(), RemoteError> {
        self.signup_as_admin(user, password, None).await
    }

    /// Creates a user, presenting the cluster key (needed when signup is closed).
    pub async fn signup_as_admin(
        &self,
        user: &str,
        password: &str,
        cluster_key: Option<&str>,
    ) -> Result<(), RemoteError> {
        self.sealed(routes::AUTH_SIGNUP, user, password, cluster_key)
            .await
            .map(drop)
    }

    /// Logs in and starts using the new token.
    pub async fn login(&self, user: &str, password: &str) -> Result<SavedLogin, RemoteError> {
        let t: TokenResponse = self
            .sealed(routes::AUTH_LOGIN, user, password, None)
            .await?
            .json()
            .await
            .map_err(|e| net("login", e))?;
        let login = SavedLogin::from_response(t);
        *self.identity.lock().unwrap_or_else(|p| p.into_inner()) = login.id.clone();
        let mut session = self.session.lock().await;
        session.login = Some(login.clone());
        session.retry_refresh_at_ms = 0;
        Ok(login)
    }

    /// The cluster identity this client acts as (None: not logged in, or an old login).
    pub fn identity(&self) -> Option<common::Identity> {
        self.identity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Metadata of a node about to be opened with `flags`: refused (EACCES) unless this user
    /// may read and/or write it, as `flags` ask.
    pub async fn get_to_open(&self, id: NodeId, flags: i32) -> Result<NodeMeta, RemoteError> {
        let access = match flags & libc::O_ACCMODE {
            libc::O_WRONLY => "w",
            libc::O_RDWR => "rw",
            _ => "r",
        };
        let url = format!("{}?access={access}", self.dir(&routes::node(id)));
        let resp = self.send_raw(self.http.get(url), "open").await?;
        let cap = header_of(&resp, routes::CAPABILITY_HEADER);
        let meta: NodeMeta = resp.json().await.map_err(|e| net("open", e))?;
        if access.contains('w')
            && let Some(c) = &cap
        {
            // An open for writing says this user may write: its close needs no other word.
            self.remember_commit_capability(id, c.clone());
        }
        let mut caps = self.capabilities.lock().unwrap_or_else(|p| p.into_inner());
        // A write-only open's capability lets no one download.
        match cap.filter(|_| access.contains('r')) {
            Some(c) => {
                caps.insert(id, (meta.hash.clone(), c));
            }
            None => {
                caps.remove(&id);
            }
        }
        Ok(meta)
    }

    /// The capability to queue for `node`'s write lock: the one the directory gave last, or a
    /// new one (`fresh`, or none yet, or one near its expiry). Refused (EACCES) if this user
    /// may not write the file.
    async fn commit_capability(&self, node: NodeId, fresh: bool) -> Result<String, RemoteError> {
        let now = now_ms();
        let half = dfs_server::capability::TTL_MS / 2;
        if !fresh
            && let Some((cap, at)) = self
                .commit_caps
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&node)
            && now.saturating_sub(*at) < half
        {
            return Ok(cap.clone());
        }
        let url = format!("{}?access=commit", self.dir(&routes::node(node)));
        let resp = self
            .send_raw(self.http.get(url), "write permission")
            .await?;
        let cap = header_of(&resp, routes::CAPABILITY_HEADER).ok_or_else(|| RemoteError::Api {
            code: ErrorCode::Unavailable,
            message: "the directory answered no capability".into(),
        })?;
        self.remember_commit_capability(node, cap.clone());
        Ok(cap)
    }

    /// The capability to download version `hash` of `node`, if an open gave one.
    fn capability(&self, node: NodeId, hash: &common::ContentHash) -> Option<String> {
        self.capabilities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .filter(|(h, _)| h == hash)
            .map(|(_, c)| c.clone())
    }

    /// Metadata of one node.
    pub async fn get(&self, id: NodeId) -> Result<NodeMeta, RemoteError> {
        self.send(self.http.get(self.dir(&routes::node(id))), "getattr")
            .await
    }

    /// Looks `name` up in `parent`.
    pub async fn lookup(&self, parent: NodeId, name: &ValidName) -> Result<NodeMeta, RemoteError> {
        self.send(
            self.http
                .get(self.dir(&routes::child(parent, name.as_str()))),
            "lookup",
        )
        .await
    }

    /// Lists a whole directory, page by page (the server bounds each page; the cursor is the
    /// last name of the previous one, so an entry made or removed meanwhile is seen at most
    /// once).
    pub async fn list(&self, parent: NodeId) -> Result<Vec<DirEntry>, RemoteError> {
        let mut out: Vec<DirEntry> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page: common::api::ListPage = self
                .send(
                    self.http.get(self.dir(&routes::children_page(
                        parent,
                        after.as_deref(),
                        common::api::LIST_MAX_ENTRIES,
                    ))),
                    "readdir",
                )
                .await?;
            out.extend(page.entries);
            match page.next {
                // A cursor must move forward, or the listing would never end: an answer that
                // does not is as unusable as one that does not parse.
                Some(next) if after.as_ref().is_none_or(|a| next > *a) => after = Some(next),
                Some(_) => {
                    return Err(RemoteError::Network(format!(
                        "readdir: the listing of node {parent} did not move past {after:?}"
                    )));
                }
                None => return Ok(out),
            }
        }
    }

    /// Creates a node.
    pub async fn create(
        &self,
        parent: NodeId,
        req: &CreateRequest,
    ) -> Result<NodeMeta, RemoteError> {
        let resp = self
            .send_raw(
                self.http
                    .post(self.dir(&routes::children(parent)))
                    .json(req),
                "create",
            )
            .await?;
        let cap = header_of(&resp, routes::CAPABILITY_HEADER);
        let meta: NodeMeta = resp.json().await.map_err(|e| net("create", e))?;
        if let Some(cap) = cap {
            self.remember_commit_capability(meta.id, cap);
        }
        Ok(meta)
    }

    /// Keeps a capability to queue for `node`'s write lock.
    fn remember_commit_capability(&self, node: NodeId, cap: String) {
        let mut caps = self.commit_caps.lock().unwrap_or_else(|p| p.into_inner());
        if caps.len() > 4096 {
            caps.clear();
        }
        caps.insert(node, (cap, now_ms()));
    }

    /// unlink or rmdir.
    pub async fn remove(
        &self,
        parent: NodeId,
        name: &ValidName,
        dir: bool,
    ) -> Result<NodeMeta, RemoteError> {
        let url = format!(
            "{}?dir={dir}",
            self.dir(&routes::child(parent, name.as_str()))
        );
        self.send(self.http.delete(url), "remove").await
    }

    /// One more name for a file; returns the node with its new link count.
    pub async fn link(&self, req: &common::api::LinkRequest) -> Result<NodeMeta, RemoteError> {
        self.post(self.dir(routes::LINK), req, "link").await
    }

    /// Atomic rename; returns the replaced node.
    pub async fn rename(&self, req: &RenameRequest) -> Result<Option<NodeMeta>, RemoteError> {
        self.post(self.dir(routes::RENAME), req, "rename").await
    }

    /// Mode/mtime change.
    pub async fn setattr(&self, id: NodeId, req: &SetAttrRequest) -> Result<NodeMeta, RemoteError> {
        self.send(
            self.http.patch(self.dir(&routes::node(id))).json(req),
            "setattr",
        )
        .await
    }

    /// Announces a write-back push of `id` (other clients' opens wait for it).
    pub async fn intent(
        &self,
        id: NodeId,
        req: &common::api::IntentRequest,
    ) -> Result<NodeMeta, RemoteError> {
        self.post(self.dir(&routes::intent(id)), req, "intent")
            .await
    }

    /// Totals.
    pub async fn statfs(&self) -> Result<StatFs, RemoteError> {
        self.send(self.http.get(self.dir(routes::STATFS)), "statfs")
            .await
    }

    /// Downloads the exact content `meta.hash` into `dest`, trying the replicas (in random
    /// order) and then the primary; a server that fails or sends bytes that do not hash right
    /// is skipped. `dest` is fsynced before this returns.
    pub async fn download(&self, meta: &NodeMeta, dest: &Path) -> Result<(), RemoteError> {
        if self.capability(meta.id, &meta.hash).is_none() {
            // Metadata from a plain read (a wait for a write-back push, a retry): the file
            // servers want the directory's word that this user may read it.
            self.get_to_open(meta.id, libc::O_RDONLY).await?;
        }
        let mut order: Vec<_> = meta
            .holders
            .iter()
            .copied()
            .filter(|s| Some(*s) != meta.primary)
            .collect();
        let shift = if order.is_empty() {
            0
        } else {
            usize::from(rand::random::<u8>()) % order.len()
        };
        order.rotate_left(shift);
        order.extend(meta.primary.filter(|p| meta.holders.contains(p)));
        // Servers the directory believes dead go last.
        if let Ok(c) = self.cluster(false).await {
            order.sort_by_key(|id| !c.servers.iter().any(|s| s.id == *id && s.alive));
        }
        let mut last = RemoteError::Api {
            code: ErrorCode::Unavailable,
            message: "no server holds this version".into(),
        };
        // Each holder gets its share of the stall window: a stopped server costs at most that
        // before the next copy is tried, and a download that keeps moving is never cut off.
        let holders = u32::try_from(order.len()).unwrap_or(1).max(1);
        let window = (self.config.stall_timeout / holders).max(Duration::from_secs(2));
        for server in order {
            let progress = Progress::new();
            let attempt = self.download_from(server, meta, dest, &progress);
            let r = unless_stalled(attempt, &progress, window, || {
                RemoteError::Timeout(format!(
                    "download from server {server} made no progress for {} s",
                    window.as_secs()
                ))
            })
            .await;
            let r = match r {
                Ok(file) => file.sync_all().await.map_err(|e| RemoteError::Local {
                    errno: e.raw_os_error().unwrap_or(libc::EIO),
                    message: format!("syncing {}: {e}", dest.display()),
                }),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    self.stats.downloads.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e @ RemoteError::Local { .. }) => {
                    let _ = std::fs::remove_file(dest);
                    return Err(e);
                }
                Err(e) => {
                    if e.is_unreachable() {
                        self.invalidate_cluster();
                    }
                    tracing::warn!(node = %meta.id, %server, error = %e, "download failed; trying the next copy");
                    last = e;
                }
            }
        }
        Err(last)
    }

    async fn download_from(
        &self,
        server: common::ServerId,
        meta: &NodeMeta,
        dest: &Path,
        progress: &Progress,
    ) -> Result<tokio::fs::File, RemoteError> {
        let base = self.server_url(server).await?;
        let token = self.token().await?;
        let mut req = self
            .stream
            .get(format!("{base}{}", routes::file_read(meta.id, &meta.hash)))
            .bearer_auth(token)
            .headers(self.act_as()?);
        if let Some(cap) = self.capability(meta.id, &meta.hash) {
            req = req.header(routes::CAPABILITY_HEADER, cap);
        }
        let resp = req.send().await.map_err(|e| net("download", e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        let io = |e: std::io::Error| RemoteError::Local {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            message: format!("writing {}: {e}", dest.display()),
        };
        let file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| net("download", e))?;
            progress.tick();
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io)?;
        }
        out.flush().await.map_err(io)?;
        let got = ContentHash::from_digest(&hasher.finalize().into());
        if got != meta.hash {
            return Err(RemoteError::Api {
                code: ErrorCode::HashMismatch,
                message: format!(
                    "server {server} sent content hashing to {got}, expected {}",
                    meta.hash
                ),
            });
        }
        // Made durable by the caller, outside the no-progress window (an fsync of a large
        // file makes no progress visible, yet is no stall).
        Ok(out.into_inner())
    }

    /// Waits in the lock queue until granted or `deadline`; a waiter that gives up leaves
    /// the queue.
    pub async fn acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        deadline: tokio::time::Instant,
    ) -> Result<Grant, RemoteError> {
        let url = format!(
            "{}{}",
            self.lock_url().await?,
            routes::lock(node, "acquire")
        );
        let mut fresh = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let wait_ms = u64::try_from(left.min(Duration::from_secs(20)).as_millis()).unwrap_or(0);
            let req = AcquireRequest {
                waiter: waiter.clone(),
                wait_ms,
            };
            let cap = self.commit_capability(node, fresh).await?;
            let token = self.token().await?;
            let resp = self
                .http
                .post(&url)
                .bearer_auth(token)
                .headers(self.act_as()?)
                .header(routes::CAPABILITY_HEADER, cap)
                .timeout(left + self.config.call_timeout)
                .json(&req)
                .send()
                .await
                .map_err(|e| {
                    self.invalidate_cluster();
                    net("lock", e)
                })?;
            if !resp.status().is_success() {
                let e = api_error(resp).await;
                if !fresh
                    && matches!(
                        &e,
                        RemoteError::Api {
                            code: ErrorCode::AccessDenied,
                            ..
                        }
                    )
                {
                    // Expired, or from before a chmod: ask the directory once more.
                    fresh = true;
                    continue;
                }
                return Err(e);
            }
            match resp
                .json::<AcquireResponse>()
                .await
                .map_err(|e| net("lock", e))?
            {
                AcquireResponse::Granted(g) => return Ok(g),
                AcquireResponse::Queued { position } => {
                    if tokio::time::Instant::now() >= deadline {
                        let _ = self.release(node, waiter).await;
                        return Err(RemoteError::Timeout(format!(
                            "waiting for the lock (position {position})"
                        )));
                    }
                }
            }
        }
    }

    /// Asks for an application lock, waiting up to `wait` (one long poll; 0: answer at once).
    pub async fn app_lock(
        &self,
        node: NodeId,
        owner: &common::api::LockOwner,
        shared: bool,
        wait: Duration,
    ) -> Result<common::api::AppLockResponse, RemoteError> {
        let url = format!(
            "{}{}",
            self.lock_url().await?,
            routes::applock(node, "lock")
        );
        let req = common::api::AppLockRequest {
            owner: owner.clone(),
            shared,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        let token = self.token().await?;
        let resp = self
            .http
            .post(&url)
            .bearer_auth(token)
            .headers(self.act_as()?)
            .timeout(wait + self.config.call_timeout)
            .json(&req)
            .send()
            .await
            .map_err(|e| {
                self.invalidate_cluster();
                net("application lock", e)
            })?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        resp.json().await.map_err(|e| net("application lock", e))
    }

    /// Gives an application lock up (or its place in the queue).
    pub async fn app_unlock(
        &self,
        node: NodeId,
        owner: &common::api::LockOwner,
    ) -> Result<(), RemoteError> {
        let url = format!(
            "{}{}",
            self.lock_url().await?,
            routes::applock(node, "unlock")
        );
        let q = common::api::AppLockQuery {
            owner: owner.clone(),
            shared: false,
        };
        self.post::<_, serde_json::Value>(url, &q, "application unlock")
            .await
            .map(drop)
    }

    /// The holder a request would conflict with (`F_GETLK`).
    pub async fn app_test(
        &self,
        node: NodeId,
        owner: &common::api::LockOwner,
        shared: bool,
    ) -> Result<Option<common::api::AppLockConflict>, RemoteError> {
        let url = format!(
            "{}{}",
            self.lock_url().await?,
            routes::applock(node, "test")
        );
        let q = common::api::AppLockQuery {
            owner: owner.clone(),
            shared,
        };
        self.post(url, &q, "application lock test").await
    }

    /// Renews every application lock of `session`.
    pub async fn app_renew(
        &self,
        session: &UploadId,
        locks: Vec<(NodeId, u64)>,
    ) -> Result<(), RemoteError> {
        let url = format!("{}{}", self.lock_url().await?, routes::APPLOCK_RENEW);
        let req = common::api::AppLockRenew {
            session: session.clone(),
            locks,
        };
        self.post::<_, serde_json::Value>(url, &req, "application lock renewal")
            .await
            .map(drop)
    }

    /// Extends a held lock's lease.
    pub async fn renew(&self, node: NodeId, waiter: &WaiterId) -> Result<Grant, RemoteError> {
        let url = format!("{}{}", self.lock_url().await?, routes::lock(node, "renew"));
        self.post(
            url,
            &LockRequest {
                waiter: waiter.clone(),
            },
            "renew",
        )
        .await
    }

    /// Releases a lock (or leaves its queue).
    pub async fn release(&self, node: NodeId, waiter: &WaiterId) -> Result<(), RemoteError> {
        let url = format!(
            "{}{}",
            self.lock_url().await?,
            routes::lock(node, "release")
        );
        self.post::<_, serde_json::Value>(
            url,
            &LockRequest {
                waiter: waiter.clone(),
            },
            "release",
        )
        .await
        .map(drop)
    }

    /// Streams `path` to the primary of `meta` as the new content.
    pub async fn upload(&self, meta: &NodeMeta, up: &Upload<'_>) -> Result<NodeMeta, RemoteError> {
        let Upload {
            path,
            hash,
            size,
            grant,
            upload_id,
            base,
            progress,
            mode,
            mtime_ns,
        } = *up;
        let primary = meta.primary.ok_or_else(|| RemoteError::Api {
            code: ErrorCode::Unavailable,
            message: "file has no primary".into(),
        })?;
        let server = self.server_url(primary).await?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| RemoteError::Io(format!("reading {}: {e}", path.display())))?;
        // Exactly `size` bytes: if the file changed since it was hashed, the server answers
        // "hash mismatch" and the push re-hashes, instead of the request failing mid-body.
        let file = tokio::io::AsyncReadExt::take(file, size);
        let body = if size <= SMALL_BODY {
            // Small files go in one buffer: no per-chunk streaming overhead.
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            let mut file = file;
            tokio::io::AsyncReadExt::read_to_end(&mut file, &mut buf)
                .await
                .map_err(|e| RemoteError::Io(format!("reading {}: {e}", path.display())))?;
            progress.tick();
            reqwest::Body::from(buf)
        } else {
            let p = progress.clone();
            let window = self.config.stall_timeout;
            let mut sent = 0u64;
            let chunks =
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).inspect(move |c| {
                    p.tick();
                    sent += c.as_ref().map_or(0, |b| b.len() as u64);
                    if sent >= size {
                        // The whole body is out: the servers' own work on it (fsyncs, the
                        // replica's copy, the commit) shows no progress here; give it the time
                        // a transfer of this size may take.
                        p.hold(common::api::transfer_timeout(size).saturating_sub(window));
                    }
                });
            reqwest::Body::wrap_stream(chunks)
        };
        let placement: Vec<String> = meta
            .primary
            .iter()
            .chain(&meta.replicas)
            .map(|s| s.0.to_string())
            .collect();
        let token = self.token().await?;
        let mut req = self
            .stream
            .put(format!("{server}{}", routes::file_write(meta.id)))
            .header(routes::PLACEMENT_HEADER, placement.join(","));
        if let Some(m) = mode {
            req = req.header(routes::MODE_HEADER, format!("{m:o}"));
        }
        if let Some(t) = mtime_ns {
            req = req.header(routes::MTIME_HEADER, t.to_string());
        }
        let resp = req
            .bearer_auth(token)
            .headers(self.act_as()?)
            .header(routes::FENCE_HEADER, grant.fence.0.to_string())
            .header(routes::FENCE_SIG_HEADER, &grant.signature)
            .header(routes::HASH_HEADER, hash.as_str())
            .header(routes::UPLOAD_ID_HEADER, upload_id.as_str())
            .header(routes::BASE_HEADER, base.to_header())
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(body)
            .send();
        let answer = async {
            let resp = resp.await.map_err(|e| {
                self.invalidate_cluster();
                net("upload", e)
            })?;
            if !resp.status().is_success() {
                return Err(api_error(resp).await);
            }
            resp.json::<NodeMeta>().await.map_err(|e| net("upload", e))
        };
        let window = self.config.stall_timeout;
        let meta = unless_stalled(answer, progress, window, || {
            self.invalidate_cluster();
            RemoteError::Timeout(format!(
                "upload to server {primary} made no progress for {} s",
                window.as_secs()
            ))
        })
        .await?;
        self.stats.uploads.fetch_add(1, Ordering::Relaxed);
        Ok(meta)
    }

    /// Sends several small files to their common primary in one request (see
    /// `dfs_server::file::batch`); one result per item, in order.
    pub async fn upload_batch(
        &self,
        primary: common::ServerId,
        header: &common::api::BatchHeader,
        bodies: &[Vec<u8>],
    ) -> Result<Vec<common::api::ItemResult<NodeMeta>>, RemoteError> {
        let server = self.server_url(primary).await?;
        let json = serde_json::to_vec(header).map_err(|e| RemoteError::Io(e.to_string()))?;
        let mut frame = common::batch::prefix(&json);
        for b in bodies {
            frame.extend_from_slice(b);
        }
        let len = frame.len() as u64;
        let token = self.token().await?;
        let resp = self
            .stream
            .post(format!("{server}{}", routes::FILE_BATCH_WRITE))
            .bearer_auth(token)
            .headers(self.act_as()?)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(frame)
            .send();
        let answer = async {
            let resp = resp.await.map_err(|e| {
                self.invalidate_cluster();
                net("batch upload", e)
            })?;
            if !resp.status().is_success() {
                return Err(api_error(resp).await);
            }
            resp.json::<common::api::BatchResponse<NodeMeta>>()
                .await
                .map_err(|e| net("batch upload", e))
        };
        // One buffer, sent at once: what follows is the servers' work.
        let progress = Progress::new();
        let window = self.config.stall_timeout;
        let answer = unless_stalled(answer, &progress, window, || {
            self.invalidate_cluster();
            RemoteError::Timeout(format!(
                "batch upload to server {primary} made no progress for {} s",
                window.as_secs()
            ))
        })
        .await?;
        if answer.results.len() != header.items.len() {
            return Err(RemoteError::Io(format!(
                "batch upload: {} results for {} files",
                answer.results.len(),
                header.items.len()
            )));
        }
        let ok = answer
            .results
            .iter()
            .filter(|r| matches!(r, common::api::ItemResult::Ok(_)))
            .count();
        self.stats.uploads.fetch_add(ok as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(answer.results)
    }
}

/// The change feed (issue 10), apart from the calls above: the subscriber's long poll.
impl Remote {
    /// The changes after `after` in feed `epoch` (None: first poll, answered with a resync),
    /// waiting up to `wait` (at most the feed's bound) for one. The request's deadline is
    /// the wait plus the call timeout, so a directory that stopped answering is noticed.
    pub async fn changes(
        &self,
        epoch: Option<u64>,
        after: u64,
        wait: Duration,
    ) -> Result<common::api::ChangesResponse, RemoteError> {
        let wait_ms = u64::try_from(wait.as_millis())
            .unwrap_or(u64::MAX)
            .min(common::api::CHANGES_MAX_WAIT_MS);
        let mut url = format!(
            "{}?after={after}&wait_ms={wait_ms}",
            self.dir(routes::CHANGES)
        );
        if let Some(e) = epoch {
            url.push_str(&format!("&epoch={e}"));
        }
        let token = self.token().await?;
        let resp = self
            .http
            .get(url)
            .bearer_auth(token)
            .timeout(Duration::from_millis(wait_ms) + self.config.call_timeout)
            .send()
            .await
            .map_err(|e| net("change feed", e))?;
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        resp.json().await.map_err(|e| net("change feed", e))
    }
}

/// The header naming this client process to the directory (`x-dfs-origin`, random per
/// process), sent with every request: the change feed leaves out what it changed itself.
fn origin_header() -> reqwest::header::HeaderMap {
    let mut h = reqwest::header::HeaderMap::new();
    let origin = format!("{:032x}", rand::random::<u128>());
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&origin) {
        h.insert(routes::ORIGIN_HEADER, v);
    }
    h
}

/// A response header as text.
fn header_of(resp: &reqwest::Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(r: &Remote) -> Option<String> {
        r.act_as()
            .expect("made")
            .get(routes::ACT_AS_HEADER)
            .map(|v| v.to_str().expect("ascii").to_owned())
    }

    #[tokio::test]
    async fn a_local_ids_request_names_exactly_its_caller() {
        let r =
            Remote::new("http://127.0.0.1:9", None, None, RemoteConfig::default()).expect("client");
        let alice = common::Identity {
            uid: 1000,
            gid: 1000,
            groups: vec![24],
            admin: false,
        };
        // An ordinary mount never names anyone.
        let ordinary = crate::caller::scope(Some(alice.clone()), async { header(&r) }).await;
        assert_eq!(ordinary, None);
        r.set_local_ids(true);
        let named = crate::caller::scope(Some(alice), async { header(&r) }).await;
        assert_eq!(named.as_deref(), Some("1000:1000:24"));
        // A request's caller is its own uid and gid (pid 0: no groups read), never root.
        let request =
            crate::caller::scope_request(Some((1001, 100, 0)), async { header(&r) }).await;
        assert_eq!(request.as_deref(), Some("1001:100:"));
        // Outside any caller's scope: the mount's own login.
        assert_eq!(header(&r), None);
    }
}
