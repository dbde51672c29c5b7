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
    /// How long a directory operation is retried (and failed over between directory URLs)
    /// while the directory is unreachable or answers `unavailable` (`--op-timeout-secs`).
    pub op_timeout: Duration,
}

/// Default of `--op-timeout-secs`.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a metadata read waits for the directory when the caller has an answer of its own
/// to fall back on (what it heard before, a cached copy): long enough to ride out a failover
/// to another directory URL or a quick restart, short enough that cached files stay readable
/// while the directory is down.
pub const FALLBACK_WAIT: Duration = Duration::from_secs(2);

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            call_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            tls: dfs_server::tls::ClientTls::system(),
            op_timeout: DEFAULT_OP_TIMEOUT,
        }
    }
}

/// First and largest pause between retries of a directory operation (each jittered).
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Whether a failed directory call may be sent again: no answer, or `unavailable`. Any
/// definite answer (4xx, an internal error) is final.
fn retryable(e: &RemoteError) -> bool {
    matches!(e, RemoteError::Network(_) | RemoteError::Timeout(_))
        || matches!(
            e,
            RemoteError::Api {
                code: ErrorCode::Unavailable,
                ..
            }
        )
}

/// How long a lock renewal is retried on another lock instance at most: a third of the
/// default lease, so that the next renewal (a third of the lease later) is not held up and
/// the lease the last one gave still covers the failover. Shorter leases shorten it
/// (`renew_bounds`).
pub const RENEW_RETRY: Duration = Duration::from_secs(3);

/// How much longer than its wait a lock long poll's attempt may take before another
/// instance is asked.
const POLL_SLACK: Duration = Duration::from_secs(2);

/// The lease assumed until a grant names one (the lock service's default).
const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// A renewal's (retry bound, per-attempt timeout) for a lease of `lease`: retried for at
/// most a third of the lease (`RENEW_RETRY` at most), each attempt given at most a quarter
/// of it, so that an instance that takes the request and never answers (a dead host, a
/// partition, a stopped process: no reset) costs one short attempt and the renewal reaches
/// another instance well before the lease the last renewal gave runs out.
pub fn renew_bounds(lease: Duration, call_timeout: Duration) -> (Duration, Duration) {
    let lease = lease.max(Duration::from_millis(100));
    (RENEW_RETRY.min(lease / 3), call_timeout.min(lease / 4))
}

/// The one retry loop of directory and lock calls. `attempt(i)` sends the call to URL `i`
/// (modulo how many there are) and answers (how many URLs there are, the URL, the result).
/// On no answer or `unavailable` the call is sent again: to the next URL if there are
/// several (`current` moves on, so later calls start at the one that answered), and once
/// every URL failed, after calling `round_failed`, a pause (50 ms doubling to 1 s, jittered
/// 50–100 %), until `bound` has passed; then the last error is returned. A definite answer
/// (4xx, an internal error) is returned at once.
async fn retry<T, Fut>(
    service: &str,
    what: &str,
    bound: Duration,
    current: &std::sync::atomic::AtomicUsize,
    round_failed: impl Fn(),
    mut attempt: impl FnMut(usize) -> Fut,
) -> Result<T, RemoteError>
where
    Fut: std::future::Future<Output = (usize, String, Result<T, RemoteError>)>,
{
    let deadline = tokio::time::Instant::now() + bound;
    let mut backoff = RETRY_FIRST;
    let mut failures = 0usize;
    loop {
        let idx = current.load(Ordering::Relaxed);
        let (n, url, result) = attempt(idx).await;
        let n = n.max(1);
        let e = match result {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) => e,
            Err(e) => return Err(e),
        };
        failures += 1;
        if n > 1 {
            let next = (idx % n + 1) % n;
            if current
                .compare_exchange(idx, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                tracing::warn!(%service, from = %url, error = %e, "{service} failed; trying the next one");
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            tracing::warn!(%service, %what, error = %e, after = ?bound, "{service} unavailable for the whole wait; giving up");
            return Err(e);
        }
        if failures.is_multiple_of(n) {
            // Every URL failed once more: pause (jittered, 50% to 100%) before the next round.
            round_failed();
            let jitter = 0.5 + rand::random::<f64>() / 2.0;
            let pause = backoff.mul_f64(jitter).min(deadline - now);
            tracing::debug!(%service, %what, error = %e, ?pause, "{service} unavailable; retrying");
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }
}

/// A fresh operation id (`x-dfs-request-id`): 32 hex digits.
pub fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Splits a `--server` value (`URL` or `URL,URL,...`) into trimmed URLs without a trailing
/// slash; empty entries are dropped.
pub fn parse_servers(spec: &str) -> Vec<String> {
    spec.split(',')
        .map(|u| u.trim().trim_end_matches('/').to_owned())
        .filter(|u| !u.is_empty())
        .collect()
}

/// The directory URLs a client knows and the one its requests go to: a request that finds
/// no answer (or `unavailable`) moves on to the next, and the client stays on the one that
/// answered. Each URL is asked for its cluster id before its first use, and one that names
/// another cluster than the first is never used.
struct Directories {
    urls: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
    checked: Vec<std::sync::atomic::AtomicBool>,
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
    /// `--server` as given (for messages).
    server: String,
    dirs: Directories,
    /// The lock instance (index into the map's `lock_urls`) lock calls go to first: the one
    /// that answered last.
    lock_current: std::sync::atomic::AtomicUsize,
    /// The lease (ms) the lock service last granted (0: none yet): bounds renewals.
    lock_lease_ms: AtomicU64,
    /// The lock instances of the last map that named any: used while the map cannot be
    /// fetched (the directory away must not stop lock renewals).
    last_lock_urls: std::sync::Mutex<Vec<String>>,
    /// The cluster id of the directory (learnt from the first cluster map): what saved logins
    /// are keyed by, and what every other directory URL must name.
    cluster_id: std::sync::Mutex<Option<String>>,
    /// Whether a peer's other protocol version has been logged already.
    protocol_noted: std::sync::atomic::AtomicBool,
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
        let urls = parse_servers(server);
        if urls.is_empty() {
            anyhow::bail!("no directory URL given");
        }
        let server = urls.join(",");
        // One origin for both clients: a push to a file server names it too, and the primary
        // passes it on with its commit (the writer's own close is not fed back to it).
        let origin = origin_header();
        let http = config
            .tls
            .builder()?
            .connect_timeout(Duration::from_secs(3))
            .timeout(config.call_timeout + Duration::from_secs(30))
            .default_headers(origin.clone())
            .build()
            .context("building the HTTP client")?;
        // Bodies get a per-request deadline scaled to their size (reqwest's read_timeout would cap
        // the whole upload, fsyncs and replication included, at a fixed time).
        let stream = config
            .tls
            .builder()?
            .connect_timeout(Duration::from_secs(3))
            .tcp_keepalive(Duration::from_secs(15))
            .default_headers(origin)
            .build()
            .context("building the HTTP client for file bodies")?;
        Ok(Remote {
            identity: std::sync::Mutex::new(login.as_ref().and_then(|l| l.id.clone())),
            capabilities: std::sync::Mutex::new(std::collections::HashMap::new()),
            commit_caps: std::sync::Mutex::new(std::collections::HashMap::new()),
            dirs: Directories {
                checked: urls
                    .iter()
                    .map(|_| std::sync::atomic::AtomicBool::new(false))
                    .collect(),
                urls,
                current: std::sync::atomic::AtomicUsize::new(0),
            },
            lock_current: std::sync::atomic::AtomicUsize::new(0),
            lock_lease_ms: AtomicU64::new(0),
            last_lock_urls: std::sync::Mutex::new(Vec::new()),
            cluster_id: std::sync::Mutex::new(None),
            protocol_noted: std::sync::atomic::AtomicBool::new(false),
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

    /// The directory URLs as given (`URL` or `URL,URL,...`).
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Every directory URL, in the order given.
    pub fn servers(&self) -> &[String] {
        &self.dirs.urls
    }

    /// The directory URL requests go to now.
    pub fn current_server(&self) -> String {
        self.dirs.urls[self.dirs.current.load(Ordering::Relaxed) % self.dirs.urls.len()].clone()
    }

    /// The cluster id, once a cluster map was fetched.
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts using `login` (found once the cluster id was known).
    pub async fn set_login(&self, login: SavedLogin) {
        *self.identity.lock().unwrap_or_else(|p| p.into_inner()) = login.id.clone();
        let mut s = self.session.lock().await;
        s.login = Some(login);
        s.retry_refresh_at_ms = 0;
    }

    /// The saved login of this cluster (by cluster id; a login saved by URL before is found
    /// by any of this client's URLs and moved to the cluster id).
    fn saved_login(&self) -> Option<SavedLogin> {
        let id = self.cluster_id()?;
        self.creds.as_ref()?.get_for(&id, &self.dirs.urls).ok()?
    }

    /// A login another `dfs` process saved for this server that is newer than `than` (refresh
    /// tokens are single use: whoever refreshed first holds the live one).
    fn newer_saved_login(&self, than: &SavedLogin) -> Option<SavedLogin> {
        let saved = self.saved_login()?;
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
                    && let Some(id) = self.cluster_id()
                    && let Err(e) = c.put_for(&id, &self.dirs.urls, Some(renewed.clone()))
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

    /// Logs once when a service speaks another protocol version than this client, naming
    /// both (an older service refuses nothing this client sends today; a newer one says
    /// `protocol_mismatch` if it can no longer serve it).
    fn note_protocol(&self, resp: &reqwest::Response) {
        let theirs = header_of(resp, routes::PROTOCOL_HEADER)
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(1);
        if theirs != routes::PROTOCOL_VERSION && !self.protocol_noted.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                url = %resp.url(),
                service_protocol = theirs,
                client_protocol = routes::PROTOCOL_VERSION,
                "the service at {} speaks dfs protocol {theirs}; this client speaks {} \
                 (protocols 1 to {1} supported)",
                resp.url().origin().ascii_serialization(),
                routes::PROTOCOL_VERSION,
            );
        }
    }

    /// A directory call: `build` makes the request for a directory URL; it is sent to the
    /// current URL, and on no answer or `unavailable` sent again (to the next URL if there
    /// are several, after a jittered pause from 50 ms doubling to 1 s once every URL failed)
    /// until `--op-timeout-secs` have passed; then the last error is returned. A definite
    /// answer is returned at once. `change`: the operation changes the namespace and carries
    /// one request id on every attempt (`x-dfs-request-id`), so the directory applies it once.
    async fn dir_call(
        &self,
        what: &str,
        change: bool,
        build: &(dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<reqwest::Response, RemoteError> {
        self.dir_retry(
            what,
            change.then(new_request_id),
            true,
            self.config.op_timeout,
            build,
        )
        .await
    }

    /// A read that retries for `bound` only (at most the op timeout): for callers with a local
    /// answer to fall back on.
    async fn dir_read_within<T: DeserializeOwned>(
        &self,
        what: &str,
        bound: Duration,
        build: &(dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<T, RemoteError> {
        self.dir_retry(what, None, true, bound.min(self.config.op_timeout), build)
            .await?
            .json()
            .await
            .map_err(|e| net(what, e))
    }

    async fn dir_retry(
        &self,
        what: &str,
        request_id: Option<String>,
        authed: bool,
        bound: Duration,
        build: &(dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<reqwest::Response, RemoteError> {
        let n = self.dirs.urls.len();
        retry(
            "directory",
            what,
            bound,
            &self.dirs.current,
            || {},
            |idx| {
                let idx = idx % n;
                let url = &self.dirs.urls[idx];
                let request_id = request_id.as_deref();
                async move {
                    let r = self
                        .dir_attempt(idx, url, request_id, authed, build, what)
                        .await;
                    (n, url.clone(), r)
                }
            },
        )
        .await
    }

    async fn dir_attempt(
        &self,
        idx: usize,
        url: &str,
        request_id: Option<&str>,
        authed: bool,
        build: &(dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync),
        what: &str,
    ) -> Result<reqwest::Response, RemoteError> {
        let mut req = build(url).timeout(self.config.call_timeout);
        if authed {
            if !self.dirs.checked[idx].load(Ordering::Relaxed) {
                self.check_directory(idx, url).await?;
            }
            // Boxed: a token refresh asks the cluster map, which comes through here.
            let token = Box::pin(self.token()).await?;
            req = req.bearer_auth(token).headers(self.act_as()?);
        }
        if let Some(id) = request_id {
            req = req.header(routes::REQUEST_ID, id);
        }
        let resp = req.send().await.map_err(|e| {
            // A restarted service may be at a new address: fetch the map again next time.
            self.invalidate_cluster();
            net(what, e)
        })?;
        self.note_protocol(&resp);
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        // Tests lose the answer of a namespace change the directory applied.
        fail::fail_point!("dir-answer-lost", request_id.is_some(), |_| Err(
            RemoteError::Network("fault injected: the directory's answer was lost".into())
        ));
        Ok(resp)
    }

    /// Asks the directory at `url` for its cluster map before its first use, and refuses it
    /// (as unreachable: the next URL is tried) if it names another cluster than the one this
    /// client knows.
    async fn check_directory(&self, idx: usize, url: &str) -> Result<(), RemoteError> {
        let resp = self
            .http
            .get(format!("{url}{}", routes::CLUSTER))
            .timeout(self.config.call_timeout)
            .send()
            .await
            .map_err(|e| net("cluster map", e))?;
        self.note_protocol(&resp);
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        let info: ClusterInfo = resp.json().await.map_err(|e| net("cluster map", e))?;
        self.adopt_map(idx, url, info).map(drop)
    }

    /// Checks a cluster map from the directory at `url` (https, cluster id) and keeps it.
    fn adopt_map(
        &self,
        idx: usize,
        url: &str,
        info: ClusterInfo,
    ) -> Result<ClusterInfo, RemoteError> {
        // An https directory naming a plain service: refuse it rather than downgrade.
        info.check_https(url).map_err(RemoteError::Network)?;
        {
            let mut known = self.cluster_id.lock().unwrap_or_else(|p| p.into_inner());
            match known.as_deref() {
                Some(id) if id != info.cluster_id => {
                    tracing::error!(%url, theirs = %info.cluster_id, ours = %id, "this directory URL belongs to another cluster; not using it");
                    return Err(RemoteError::Network(format!(
                        "the directory at {url} is of cluster {}, not {id}",
                        info.cluster_id
                    )));
                }
                Some(_) => {}
                None => *known = Some(info.cluster_id.clone()),
            }
        }
        self.dirs.checked[idx].store(true, Ordering::Relaxed);
        if let Ok(mut c) = self.cluster.lock() {
            *c = Some(info.clone());
        }
        Ok(info)
    }

    /// The cluster map (fetched once, refreshed with `refresh = true`). A map from an https://
    /// directory that names a plain http:// service is refused.
    pub async fn cluster(&self, refresh: bool) -> Result<ClusterInfo, RemoteError> {
        if !refresh && let Some(c) = self.cluster.lock().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let resp = self
            .dir_retry("cluster map", None, false, self.config.op_timeout, &|d| {
                self.http.get(format!("{d}{}", routes::CLUSTER))
            })
            .await?;
        let url = resp.url().origin().ascii_serialization();
        let info: ClusterInfo = resp.json().await.map_err(|e| net("cluster map", e))?;
        let idx = self.dirs.current.load(Ordering::Relaxed) % self.dirs.urls.len();
        let from = self.dirs.urls[idx].clone();
        let adopted = self.adopt_map(idx, &from, info);
        if adopted.is_err() {
            // Not ours: the next call starts at the next URL.
            let n = self.dirs.urls.len();
            let _ = self.dirs.current.compare_exchange(
                idx,
                (idx + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            tracing::debug!(%url, "cluster map refused");
        }
        adopted
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

    /// Every live lock instance the cluster map names (fetched again once if the cached map
    /// names none), the map fetch bounded by `deadline`. While the map cannot be fetched
    /// (the directory away), the lock instances of the last map that named some: a fetch
    /// is then given a quarter of the time left, so the lock call itself keeps the rest.
    async fn lock_urls(&self, deadline: tokio::time::Instant) -> Result<Vec<String>, RemoteError> {
        let last = self
            .last_lock_urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let now = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(now);
        let until = if last.is_empty() {
            deadline
        } else {
            now + left / 4
        };
        let fetched = tokio::time::timeout_at(until, async {
            let urls = self.cluster(false).await?.lock_instances();
            if !urls.is_empty() {
                return Ok(urls);
            }
            self.cluster(true).await.map(|c| c.lock_instances())
        })
        .await
        .unwrap_or_else(|_| {
            Err(RemoteError::Timeout(
                "the cluster map within the lock call's time".into(),
            ))
        });
        match fetched {
            Ok(urls) if !urls.is_empty() => {
                *self
                    .last_lock_urls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = urls.clone();
                Ok(urls)
            }
            Ok(_) => Err(RemoteError::Api {
                code: ErrorCode::Unavailable,
                message: "no lock service registered with the directory".into(),
            }),
            Err(e) if last.is_empty() => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "cluster map unavailable; using the last lock instances known");
                Ok(last)
            }
        }
    }

    /// A lock-service call: `build` makes the request for a lock instance's base URL (the
    /// login's token, the caller and `timeout` are added); it goes to the instance that
    /// answered last, and on no answer or `unavailable` to the next one the cluster map
    /// lists, with the retry loop of directory calls (`retry`), for at most `bound` (the op
    /// timeout, plus the wait of a long poll: a poll cut by a silent instance still leaves
    /// time to fail over). Once
    /// every instance failed the map is fetched again (an instance may have started since).
    /// Every lock request is idempotent (a waiter or owner id names it), so sending one again
    /// is safe.
    async fn lock_call(
        &self,
        what: &str,
        bound: Duration,
        timeout: Duration,
        build: &(dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<reqwest::Response, RemoteError> {
        let deadline = tokio::time::Instant::now() + bound;
        retry(
            "lock service",
            what,
            bound,
            &self.lock_current,
            || self.invalidate_cluster(),
            |idx| async move {
                let urls = match self.lock_urls(deadline).await {
                    Ok(u) => u,
                    Err(e) => return (1, "-".to_owned(), Err(e)),
                };
                let url = urls[idx % urls.len()].clone();
                let r = self.lock_attempt(&url, timeout, build, what).await;
                (urls.len(), url, r)
            },
        )
        .await
    }

    async fn lock_attempt(
        &self,
        url: &str,
        timeout: Duration,
        build: &(dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync),
        what: &str,
    ) -> Result<reqwest::Response, RemoteError> {
        let token = self.token().await?;
        let resp = build(url)
            .bearer_auth(token)
            .headers(self.act_as()?)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| net(what, e))?;
        self.note_protocol(&resp);
        if !resp.status().is_success() {
            return Err(api_error(resp).await);
        }
        Ok(resp)
    }

    /// A lock call answering JSON, retried for `bound`, each attempt given `timeout`.
    async fn lock_post<B: Serialize + Sync, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
        bound: Duration,
        timeout: Duration,
    ) -> Result<T, RemoteError> {
        self.lock_call(what, bound, timeout, &|u| {
            self.http.post(format!("{u}{path}")).json(body)
        })
        .await?
        .json()
        .await
        .map_err(|e| net(what, e))
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
        self.get_to_open_within(id, flags, self.config.op_timeout)
            .await
    }

    /// `get_to_open`, waiting for the directory for `bound` only (the caller has a cached copy
    /// to open instead).
    pub async fn get_to_open_within(
        &self,
        id: NodeId,
        flags: i32,
        bound: Duration,
    ) -> Result<NodeMeta, RemoteError> {
        let access = match flags & libc::O_ACCMODE {
            libc::O_WRONLY => "w",
            libc::O_RDWR => "rw",
            _ => "r",
        };
        let path = format!("{}?access={access}", routes::node(id));
        let resp = self
            .dir_retry(
                "open",
                None,
                true,
                bound.min(self.config.op_timeout),
                &|d| self.http.get(format!("{d}{path}")),
            )
            .await?;
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
        let path = format!("{}?access=commit", routes::node(node));
        let resp = self
            .dir_call("write permission", false, &|d| {
                self.http.get(format!("{d}{path}"))
            })
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

    /// A directory call (see `dir_call`) answered with JSON.
    async fn dir_json<T: DeserializeOwned>(
        &self,
        what: &str,
        change: bool,
        build: &(dyn Fn(&str) -> reqwest::RequestBuilder + Send + Sync),
    ) -> Result<T, RemoteError> {
        self.dir_call(what, change, build)
            .await?
            .json()
            .await
            .map_err(|e| net(what, e))
    }

    /// Metadata of one node.
    pub async fn get(&self, id: NodeId) -> Result<NodeMeta, RemoteError> {
        let path = routes::node(id);
        self.dir_json("getattr", false, &|d| self.http.get(format!("{d}{path}")))
            .await
    }

    /// `get`, waiting for the directory for `bound` only (the caller has an answer of its own).
    pub async fn get_within(&self, id: NodeId, bound: Duration) -> Result<NodeMeta, RemoteError> {
        let path = routes::node(id);
        self.dir_read_within("getattr", bound, &|d| self.http.get(format!("{d}{path}")))
            .await
    }

    /// Looks `name` up in `parent`.
    pub async fn lookup(&self, parent: NodeId, name: &ValidName) -> Result<NodeMeta, RemoteError> {
        self.lookup_within(parent, name, self.config.op_timeout)
            .await
    }

    /// `lookup`, waiting for the directory for `bound` only.
    pub async fn lookup_within(
        &self,
        parent: NodeId,
        name: &ValidName,
        bound: Duration,
    ) -> Result<NodeMeta, RemoteError> {
        let path = routes::child(parent, name.as_str());
        self.dir_read_within("lookup", bound, &|d| self.http.get(format!("{d}{path}")))
            .await
    }

    /// Lists a whole directory, page by page (the server bounds each page; the cursor is the
    /// last name of the previous one, so an entry made or removed meanwhile is seen at most
    /// once).
    pub async fn list(&self, parent: NodeId) -> Result<Vec<DirEntry>, RemoteError> {
        self.list_within(parent, self.config.op_timeout).await
    }

    /// `list`, waiting for the directory for `bound` only (per page).
    pub async fn list_within(
        &self,
        parent: NodeId,
        bound: Duration,
    ) -> Result<Vec<DirEntry>, RemoteError> {
        let mut out: Vec<DirEntry> = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let path =
                routes::children_page(parent, after.as_deref(), common::api::LIST_MAX_ENTRIES);
            let page: common::api::ListPage = self
                .dir_read_within("readdir", bound, &|d| self.http.get(format!("{d}{path}")))
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
        let path = routes::children(parent);
        let resp = self
            .dir_call("create", true, &|d| {
                self.http.post(format!("{d}{path}")).json(req)
            })
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
        let path = format!("{}?dir={dir}", routes::child(parent, name.as_str()));
        self.dir_json("remove", true, &|d| self.http.delete(format!("{d}{path}")))
            .await
    }

    /// One more name for a file; returns the node with its new link count.
    pub async fn link(&self, req: &common::api::LinkRequest) -> Result<NodeMeta, RemoteError> {
        self.dir_json("link", true, &|d| {
            self.http.post(format!("{d}{}", routes::LINK)).json(req)
        })
        .await
    }

    /// Atomic rename; returns the replaced node.
    pub async fn rename(&self, req: &RenameRequest) -> Result<Option<NodeMeta>, RemoteError> {
        self.dir_json("rename", true, &|d| {
            self.http.post(format!("{d}{}", routes::RENAME)).json(req)
        })
        .await
    }

    /// Mode/mtime change.
    pub async fn setattr(&self, id: NodeId, req: &SetAttrRequest) -> Result<NodeMeta, RemoteError> {
        let path = routes::node(id);
        self.dir_json("setattr", true, &|d| {
            self.http.patch(format!("{d}{path}")).json(req)
        })
        .await
    }

    /// Announces a write-back push of `id` (other clients' opens wait for it).
    pub async fn intent(
        &self,
        id: NodeId,
        req: &common::api::IntentRequest,
    ) -> Result<NodeMeta, RemoteError> {
        let path = routes::intent(id);
        self.dir_json("intent", true, &|d| {
            self.http.post(format!("{d}{path}")).json(req)
        })
        .await
    }

    /// Totals.
    pub async fn statfs(&self) -> Result<StatFs, RemoteError> {
        self.dir_json("statfs", false, &|d| {
            self.http.get(format!("{d}{}", routes::STATFS))
        })
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
    /// the queue. Each poll fails over between lock instances (`lock_call`): the waiter id
    /// keeps its place whichever instance it polls (etcd engine).
    pub async fn acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        deadline: tokio::time::Instant,
    ) -> Result<Grant, RemoteError> {
        let path = routes::lock(node, "acquire");
        let mut fresh = false;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A poll waits at most half of what is left, and an attempt is given the poll's
            // wait plus a little: an instance that takes the poll and never answers is left
            // with time to spare for another one before the caller's deadline.
            let wait = (left / 2).min(Duration::from_secs(20));
            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(0);
            let slack = self.config.call_timeout.min(POLL_SLACK);
            let req = AcquireRequest {
                waiter: waiter.clone(),
                wait_ms,
            };
            let cap = self.commit_capability(node, fresh).await?;
            let sent = self
                .lock_call("lock", left.max(slack), wait + slack, &|u| {
                    self.http
                        .post(format!("{u}{path}"))
                        .header(routes::CAPABILITY_HEADER, &cap)
                        .json(&req)
                })
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(RemoteError::Api {
                    code: ErrorCode::AccessDenied,
                    ..
                }) if !fresh => {
                    // Expired, or from before a chmod: ask the directory once more.
                    fresh = true;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match resp
                .json::<AcquireResponse>()
                .await
                .map_err(|e| net("lock", e))?
            {
                AcquireResponse::Granted(g) => {
                    self.note_lease(g.lease_ms);
                    return Ok(g);
                }
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
        let path = routes::applock(node, "lock");
        let req = common::api::AppLockRequest {
            owner: owner.clone(),
            shared,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        self.lock_call(
            "application lock",
            self.config.op_timeout + wait,
            wait + self.config.call_timeout.min(POLL_SLACK),
            &|u| self.http.post(format!("{u}{path}")).json(&req),
        )
        .await?
        .json()
        .await
        .map_err(|e| net("application lock", e))
    }

    /// Gives an application lock up (or its place in the queue).
    pub async fn app_unlock(
        &self,
        node: NodeId,
        owner: &common::api::LockOwner,
    ) -> Result<(), RemoteError> {
        let q = common::api::AppLockQuery {
            owner: owner.clone(),
            shared: false,
        };
        self.lock_post::<_, serde_json::Value>(
            &routes::applock(node, "unlock"),
            &q,
            "application unlock",
            self.config.op_timeout,
            self.config.call_timeout,
        )
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
        let q = common::api::AppLockQuery {
            owner: owner.clone(),
            shared,
        };
        self.lock_post(
            &routes::applock(node, "test"),
            &q,
            "application lock test",
            self.config.op_timeout,
            self.config.call_timeout,
        )
        .await
    }

    /// Records the lease a grant named (bounds later renewals).
    pub fn note_lease(&self, lease_ms: u64) {
        if lease_ms > 0 {
            self.lock_lease_ms.store(lease_ms, Ordering::Relaxed);
        }
    }

    /// `renew_bounds` for the lease last granted.
    fn renewal_bounds(&self) -> (Duration, Duration) {
        let lease = match self.lock_lease_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_LEASE,
            ms => Duration::from_millis(ms),
        };
        renew_bounds(lease, self.config.call_timeout)
    }

    /// Renews every application lock of `session` (retried within `renew_bounds`); how
    /// many of them the lock service still holds.
    pub async fn app_renew(
        &self,
        session: &UploadId,
        locks: Vec<(NodeId, u64)>,
    ) -> Result<u64, RemoteError> {
        let req = common::api::AppLockRenew {
            session: session.clone(),
            locks,
        };
        let (bound, timeout) = self.renewal_bounds();
        let v: serde_json::Value = self
            .lock_post(
                routes::APPLOCK_RENEW,
                &req,
                "application lock renewal",
                bound,
                timeout,
            )
            .await?;
        v.get("held")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| {
                RemoteError::Network("an application lock renewal without a count".into())
            })
    }

    /// Extends a held lock's lease (retried within `renew_bounds`).
    pub async fn renew(&self, node: NodeId, waiter: &WaiterId) -> Result<Grant, RemoteError> {
        let req = LockRequest {
            waiter: waiter.clone(),
        };
        let (bound, timeout) = self.renewal_bounds();
        let g: Grant = self
            .lock_post(&routes::lock(node, "renew"), &req, "renew", bound, timeout)
            .await?;
        self.note_lease(g.lease_ms);
        Ok(g)
    }

    /// Releases a lock (or leaves its queue).
    pub async fn release(&self, node: NodeId, waiter: &WaiterId) -> Result<(), RemoteError> {
        let req = LockRequest {
            waiter: waiter.clone(),
        };
        self.lock_post::<_, serde_json::Value>(
            &routes::lock(node, "release"),
            &req,
            "release",
            self.config.op_timeout,
            self.config.call_timeout,
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
            "{}{}?after={after}&wait_ms={wait_ms}",
            self.current_server(),
            routes::CHANGES
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

    /// A fake directory on loopback: its cluster map names `cluster_id`; `rename` and `list`
    /// answer the scripted (status, JSON body) in turn (then 200 with an empty page or `[]`), and every such request's
    /// request id and protocol header are recorded.
    #[derive(Clone)]
    struct Fake {
        cluster_id: String,
        /// The lock instances its map names (it answers lock calls itself too).
        locks: Arc<std::sync::Mutex<Vec<String>>>,
        /// Map requests go unanswered (a directory gone silent).
        map_hangs: Arc<std::sync::atomic::AtomicBool>,
        answers: Arc<std::sync::Mutex<std::collections::VecDeque<(u16, String)>>>,
        seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    }

    /// A request's `x-dfs-request-id` and `x-dfs-protocol`.
    type Seen = (Option<String>, Option<String>);

    impl Fake {
        async fn start(cluster_id: &str, script: &[(u16, &str)]) -> (Fake, String) {
            use axum::routing::{get, post};
            let fake = Fake {
                cluster_id: cluster_id.to_owned(),
                locks: Arc::default(),
                map_hangs: Arc::default(),
                answers: Arc::new(std::sync::Mutex::new(
                    script.iter().map(|(c, b)| (*c, (*b).to_owned())).collect(),
                )),
                seen: Arc::default(),
            };
            let app = axum::Router::new()
                .route(routes::CLUSTER, get(Fake::map))
                .route(routes::RENAME, post(Fake::op))
                .route(routes::CHILDREN, get(Fake::op))
                .route(routes::LOCK_RELEASE, post(Fake::op))
                .route(routes::APPLOCK_UNLOCK, post(Fake::op))
                .route(routes::LOCK_RENEW, post(Fake::op))
                .route(routes::LOCK_ACQUIRE, post(Fake::op))
                .route(routes::APPLOCK_RENEW, post(Fake::op))
                .with_state(fake.clone());
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let url = format!("http://{}", l.local_addr().expect("addr"));
            tokio::spawn(async move { axum::serve(l, app).await });
            (fake, url)
        }

        async fn map(
            axum::extract::State(f): axum::extract::State<Fake>,
        ) -> axum::Json<ClusterInfo> {
            if f.map_hangs.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            axum::Json(ClusterInfo {
                lock_url: None,
                lock_urls: f.locks.lock().expect("locks").clone(),
                auth_url: None,
                servers: vec![],
                replication: 3,
                cluster_id: f.cluster_id.clone(),
            })
        }

        async fn op(
            axum::extract::State(f): axum::extract::State<Fake>,
            uri: axum::http::Uri,
            headers: axum::http::HeaderMap,
        ) -> axum::response::Response {
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            f.seen
                .lock()
                .expect("seen")
                .push((h(routes::REQUEST_ID), h(routes::PROTOCOL_HEADER)));
            let (status, body) = f
                .answers
                .lock()
                .expect("answers")
                .pop_front()
                .unwrap_or_else(|| {
                    // A listing answers a page; anything else an empty list.
                    let body = if uri.path().ends_with("/children") {
                        r#"{"entries":[],"next":null}"#
                    } else {
                        "[]"
                    };
                    (200, body.into())
                });
            axum::response::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .expect("response")
        }

        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("seen").clone()
        }
    }

    fn logged_in(urls: &str, op_timeout: Duration) -> Remote {
        let now = now_ms();
        let login = SavedLogin {
            user: "alice".into(),
            token: "t".into(),
            expires_at_ms: now + 3_600_000,
            refresh_token: "r".into(),
            issued_at_ms: now,
            id: None,
        };
        let config = RemoteConfig {
            op_timeout,
            ..RemoteConfig::default()
        };
        Remote::new(urls, Some(login), None, config).expect("client")
    }

    /// A loopback address nothing listens on.
    async fn dead_url() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        drop(l);
        url
    }

    const UNAVAILABLE: &str = r#"{"code":"unavailable","message":"restarting"}"#;

    fn rename_req() -> RenameRequest {
        serde_json::from_value(serde_json::json!({
            "parent": 1, "name": "a", "new_parent": 1, "new_name": "b"
        }))
        .expect("a rename request")
    }

    #[tokio::test]
    async fn a_change_is_retried_through_unavailable_with_one_request_id() {
        let script = [
            (503, UNAVAILABLE),
            (503, UNAVAILABLE),
            (200, "null"),
            (200, "null"),
        ];
        let (fake, url) = Fake::start("aa", &script).await;
        let r = logged_in(&url, Duration::from_secs(10));
        let replaced = r
            .rename(&rename_req())
            .await
            .expect("renamed after two 503s");
        assert!(replaced.is_none());
        let seen = fake.seen();
        assert_eq!(seen.len(), 3, "{seen:?}");
        let id = seen[0].0.clone().expect("a request id");
        assert!(
            !id.is_empty()
                && id.len() <= 64
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "{id}"
        );
        for (rid, proto) in &seen {
            assert_eq!(
                rid.as_deref(),
                Some(id.as_str()),
                "the same id on every retry"
            );
            assert_eq!(
                proto.as_deref(),
                Some("1"),
                "every request names its protocol"
            );
        }
        // The next operation is another one: a new id.
        r.rename(&rename_req()).await.expect("renamed");
        assert_ne!(fake.seen()[3].0.as_deref(), Some(id.as_str()));
        // A read carries no request id.
        r.list(NodeId::ROOT).await.expect("listed");
        assert_eq!(fake.seen()[4].0, None);
    }

    #[tokio::test]
    async fn a_definite_answer_is_never_retried() {
        let exists = r#"{"code":"exists","message":"b exists"}"#;
        let mismatch = r#"{"code":"protocol_mismatch","message":"speaks 2"}"#;
        let (fake, url) = Fake::start("aa", &[(409, exists), (426, mismatch)]).await;
        let r = logged_in(&url, Duration::from_secs(10));
        let e = r.rename(&rename_req()).await.expect_err("refused");
        assert!(
            matches!(
                e,
                RemoteError::Api {
                    code: ErrorCode::Exists,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = r.list(NodeId::ROOT).await.expect_err("refused");
        assert!(
            matches!(
                e,
                RemoteError::Api {
                    code: ErrorCode::ProtocolMismatch,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(crate::error::FsError::Remote(e).errno(), libc::EPROTO);
        assert_eq!(fake.seen().len(), 2, "one request each");
    }

    #[tokio::test]
    async fn a_dead_directory_url_is_failed_over_and_left() {
        let dead = dead_url().await;
        let (fake, url) = Fake::start("aa", &[]).await;
        let r = logged_in(&format!("{dead}, {url}/"), Duration::from_secs(10));
        r.list(NodeId::ROOT)
            .await
            .expect("listed through the live URL");
        assert_eq!(r.current_server(), url, "stays on the URL that answered");
        r.list(NodeId::ROOT).await.expect("listed");
        assert_eq!(fake.seen().len(), 2);
        assert_eq!(r.cluster_id().as_deref(), Some("aa"));
    }

    /// Lock calls fail over between the lock instances the map names, as directory calls do
    /// between directory URLs: a dead one is left for the next, a 503 is sent again, and the
    /// client stays on the instance that answered.
    #[tokio::test]
    async fn a_lock_call_fails_over_to_the_next_lock_instance_and_retries_unavailable() {
        let dead = dead_url().await;
        let (fake, url) = Fake::start("aa", &[(503, UNAVAILABLE)]).await;
        *fake.locks.lock().expect("locks") = vec![dead.clone(), url.clone()];
        let r = logged_in(&url, Duration::from_secs(10));
        let waiter = UploadId::from_bytes([7; 16]);
        r.release(NodeId(5), &waiter)
            .await
            .expect("released through the live instance, after its 503");
        assert_eq!(fake.seen().len(), 2, "the 503, then the answer");
        assert_eq!(
            r.lock_current.load(Ordering::Relaxed) % 2,
            1,
            "stays on the instance that answered"
        );
        let owner = common::api::LockOwner {
            session: waiter.clone(),
            owner: 1,
        };
        r.app_unlock(NodeId(5), &owner).await.expect("unlocked");
        assert_eq!(fake.seen().len(), 3);
        assert_eq!(r.lock_current.load(Ordering::Relaxed) % 2, 1);
        // Every instance dead: given up after the op timeout, not at once.
        *fake.locks.lock().expect("locks") = vec![dead.clone()];
        let r = logged_in(&url, Duration::from_millis(800));
        let t = std::time::Instant::now();
        let e = r
            .release(NodeId(5), &waiter)
            .await
            .expect_err("no lock instance");
        assert!(e.is_unreachable(), "{e:?}");
        assert!(
            t.elapsed() >= Duration::from_millis(750),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    /// A loopback address that takes connections and never answers (a stopped process, a
    /// dead host behind a live route: no reset). The listener lives as long as the test.
    async fn silent_url() -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        url
    }

    /// A renewal sent to a lock instance that takes it and never answers gives that
    /// instance a fraction of the lease, then reaches the next one, well within the lease:
    /// a silent instance does not cost a live holder its lock.
    #[tokio::test]
    async fn a_renewal_leaves_a_silent_lock_instance_within_the_lease() {
        let silent = silent_url().await;
        let grant = r#"{"fence":7,"lease_ms":2000,"signature":""}"#;
        let (fake, url) = Fake::start("aa", &[(200, grant), (200, r#"{"held":1}"#)]).await;
        *fake.locks.lock().expect("locks") = vec![silent.clone(), url.clone()];
        let r = logged_in(&url, Duration::from_secs(10));
        r.note_lease(2000);
        let waiter = UploadId::from_bytes([7; 16]);
        let t = std::time::Instant::now();
        let g = r
            .renew(NodeId(5), &waiter)
            .await
            .expect("renewed elsewhere");
        assert_eq!(g.fence, common::FenceToken(7));
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        // Application lock renewals too, with the count of locks still held.
        r.lock_current.store(0, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let held = r
            .app_renew(&waiter, vec![(NodeId(5), 1)])
            .await
            .expect("renewed elsewhere");
        assert_eq!(held, 1);
        assert!(
            t.elapsed() < Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
    }

    /// A write lock's long poll sent to a lock instance that never answers is given its
    /// wait plus a little, and leaves time to reach another instance before the caller's
    /// deadline (a close's push is cut at its deadline).
    #[tokio::test]
    async fn a_lock_poll_leaves_a_silent_lock_instance_before_the_deadline() {
        let silent = silent_url().await;
        let granted = r#"{"state":"granted","fence":7,"lease_ms":2000,"signature":""}"#;
        let (fake, url) = Fake::start("aa", &[(200, granted)]).await;
        *fake.locks.lock().expect("locks") = vec![silent.clone(), url.clone()];
        let r = logged_in(&url, Duration::from_secs(10));
        let node = NodeId(5);
        r.remember_commit_capability(node, "cap".into());
        let waiter = UploadId::from_bytes([7; 16]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
        let g = tokio::time::timeout_at(deadline, r.acquire(node, &waiter, deadline))
            .await
            .expect("within the deadline")
            .expect("granted by the other instance");
        assert_eq!(g.fence, common::FenceToken(7));
        assert_eq!(r.lock_current.load(Ordering::Relaxed) % 2, 1);
    }

    /// A renewal while the directory does not answer (the cached map dropped after a
    /// failed round) goes to the lock instances of the last map, within its short bound.
    #[tokio::test]
    async fn a_renewal_uses_the_last_lock_instances_while_the_map_cannot_be_fetched() {
        let grant = r#"{"fence":7,"lease_ms":10000,"signature":""}"#;
        let (fake, url) = Fake::start("aa", &[(200, grant), (200, grant)]).await;
        *fake.locks.lock().expect("locks") = vec![url.clone()];
        let r = logged_in(&url, Duration::from_secs(10));
        let waiter = UploadId::from_bytes([7; 16]);
        r.renew(NodeId(5), &waiter).await.expect("renewed");
        fake.map_hangs.store(true, Ordering::Relaxed);
        r.invalidate_cluster();
        let t = std::time::Instant::now();
        r.renew(NodeId(5), &waiter)
            .await
            .expect("renewed without a map");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn an_unreachable_directory_fails_after_the_op_timeout() {
        let dead = dead_url().await;
        let r = logged_in(&dead, Duration::from_millis(800));
        let t = std::time::Instant::now();
        let e = r.list(NodeId::ROOT).await.expect_err("nothing answers");
        let took = t.elapsed();
        assert!(matches!(e, RemoteError::Network(_)), "{e:?}");
        assert!(
            took >= Duration::from_millis(750),
            "retried for the op timeout: {took:?}"
        );
        assert!(took < Duration::from_secs(5), "then gave up: {took:?}");
    }

    #[tokio::test]
    async fn a_directory_url_of_another_cluster_is_never_used() {
        let (ours, a) = Fake::start("aa", &[(503, UNAVAILABLE); 64]).await;
        let (theirs, b) = Fake::start("bb", &[]).await;
        let r = logged_in(&format!("{a},{b}"), Duration::from_millis(800));
        assert_eq!(r.cluster(true).await.expect("map").cluster_id, "aa");
        let e = r
            .list(NodeId::ROOT)
            .await
            .expect_err("only the other cluster answers");
        assert!(
            matches!(e, RemoteError::Network(_) | RemoteError::Api { .. }),
            "{e:?}"
        );
        assert!(!ours.seen().is_empty());
        assert!(
            theirs.seen().is_empty(),
            "nothing was sent to another cluster's directory"
        );
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
