//! Who is calling: the `Authed` extractor verifies a bearer token locally with the auth service's
//! public key (no call to auth per request) or the cluster key of an internal call.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use common::api::{Claims, ClusterInfo, PublicKeyResponse};
use rsa::PublicKey;
use rsa::pkcs8::DecodePublicKey;
use rsa::sha2::{Digest, Sha256};

use crate::error::{ServiceError, ServiceResult};
use crate::http::AppError;
use crate::store::now_ms;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A user, from a valid token: name and identity.
    User(Claims),
    /// Another dfs service, from the cluster key.
    Cluster,
}

impl Principal {
    /// Name recorded as owner/writer.
    pub fn name(&self) -> &str {
        match self {
            Principal::User(c) => &c.user,
            Principal::Cluster => "@cluster",
        }
    }

    /// Who the request acts as (another service acts as the administrator).
    pub fn caller(&self) -> common::Caller {
        match self {
            Principal::User(c) => common::Caller {
                name: c.user.clone(),
                id: c.id.clone(),
            },
            Principal::Cluster => common::Caller::cluster(),
        }
    }
}

/// Tells a verifier where the auth service is (`None`: not registered yet).
pub type AuthUrlSource = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Verifies user tokens and the cluster key. Holds the auth public key, fetched lazily through the
/// directory when the service runs in its own process.
pub struct Verifier {
    cluster_key_digest: [u8; 32],
    public_key: RwLock<Option<PublicKey>>,
    directory_url: Option<String>,
    /// Where the auth service is, asked before `directory_url`: the directory's own registry
    /// (the directory must not call itself through its bound address, which may be 0.0.0.0
    /// or not named by its certificate).
    auth_url: Option<AuthUrlSource>,
    http: reqwest::Client,
    /// Tokens whose signature was already checked, by SHA-256 of the token: an RSA verification
    /// costs far more than the request it guards, and a client sends the same token for an
    /// hour. Expiry is still checked on every use.
    verified: std::sync::Mutex<std::collections::HashMap<[u8; 32], Claims>>,
}

/// Most verified tokens remembered (the map is emptied when full).
const VERIFIED_CAP: usize = 4096;

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The auth URL a directory's verifier may fetch the token-signing key from: a TLS directory
/// (`https_only`) never takes a plain-HTTP one (say, left in its registry from before the
/// cluster moved to TLS), which a man in the middle could answer with a key of his own.
pub fn usable_auth_url(url: Option<String>, https_only: bool) -> Option<String> {
    url.filter(|u| !https_only || u.starts_with("https://"))
}

impl Verifier {
    /// A verifier with a known public key (in-process auth) or one to fetch via `directory_url`.
    /// The key is fetched over https with `tls`'s roots. An error if its HTTP client cannot
    /// be built.
    pub fn new(
        cluster_key: &str,
        public_key: Option<PublicKey>,
        directory_url: Option<String>,
        tls: &crate::tls::ClientTls,
    ) -> anyhow::Result<Self> {
        let http = tls
            .builder()?
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("building the HTTP client for the auth key: {e}"))?;
        Ok(Verifier {
            cluster_key_digest: digest(cluster_key),
            public_key: RwLock::new(public_key),
            directory_url,
            auth_url: None,
            http,
            verified: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// This verifier, finding the auth service with `source` (the directory's registry)
    /// instead of asking a directory for its cluster map.
    pub fn with_auth_url(mut self, source: AuthUrlSource) -> Self {
        self.auth_url = Some(source);
        self
    }

    /// Whether `key` is the cluster key (compared as digests, so timing reveals nothing useful).
    pub fn is_cluster_key(&self, key: &str) -> bool {
        digest(key) == self.cluster_key_digest
    }

    /// Installs the public key (used when auth starts in the same process).
    pub fn set_public_key(&self, key: PublicKey) {
        if let Ok(mut k) = self.public_key.write() {
            *k = Some(key);
        }
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn cached_key(&self) -> Option<PublicKey> {
        self.public_key.read().ok().and_then(|k| k.clone())
    }

    /// GETs `url` and reads its JSON answer (an error status is an error).
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: String) -> reqwest::Result<T> {
        self.http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }

    async fn key(&self) -> ServiceResult<PublicKey> {
        if let Some(k) = self.cached_key() {
            return Ok(k);
        }
        let unavailable = |e: reqwest::Error| {
            ServiceError::Unavailable(format!("fetching auth key: {}", crate::tls::describe(&e)))
        };
        let no_auth = || ServiceError::Unavailable("no auth service registered".into());
        let auth = match (&self.auth_url, self.directory_url.as_deref()) {
            (Some(source), _) => source().ok_or_else(no_auth)?,
            (None, Some(dirs)) => {
                // One directory URL or several (comma-separated): the first that answers.
                let mut found = Err(ServiceError::Unavailable("no directory URL".into()));
                for dir in dirs.split(',').map(|d| d.trim().trim_end_matches('/')) {
                    if dir.is_empty() {
                        continue;
                    }
                    found = match self
                        .get_json::<ClusterInfo>(format!("{dir}{}", common::routes::CLUSTER))
                        .await
                    {
                        Ok(info) => info
                            .check_https(dir)
                            .map(|()| info)
                            .map_err(ServiceError::Unavailable),
                        Err(e) => Err(unavailable(e)),
                    };
                    if found.is_ok() {
                        break;
                    }
                }
                found?.auth_url.ok_or_else(no_auth)?
            }
            (None, None) => {
                return Err(ServiceError::Unavailable(
                    "auth public key not known yet".into(),
                ));
            }
        };
        let pk: PublicKeyResponse = self
            .get_json(format!("{auth}{}", common::routes::AUTH_PUBLIC_KEY))
            .await
            .map_err(unavailable)?;
        let key = PublicKey::from_public_key_pem(&pk.pem)
            .map_err(|e| ServiceError::Unavailable(format!("bad auth public key: {e}")))?;
        self.set_public_key(key.clone());
        Ok(key)
    }

    /// Checks a bearer token's signature and expiry; returns its claims.
    pub async fn verify_token(&self, token: &str) -> ServiceResult<Claims> {
        let id = digest(token);
        let now = now_ms();
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned();
        if let Some(claims) = known {
            if claims.exp_ms <= now {
                return Err(ServiceError::Unauthorized(
                    "token expired; log in again".into(),
                ));
            }
            return Ok(claims);
        }
        let key = self.key().await?;
        let claims = crate::auth::token::verify_token_with(&key, token, now)?;
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= VERIFIED_CAP {
            verified.clear();
        }
        verified.insert(id, claims.clone());
        Ok(claims)
    }
}

/// Extractor: the request carries a valid user token (`Authorization: Bearer`) or the cluster key.
pub struct Authed(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Authed {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let verifier = parts
            .extensions
            .get::<Arc<Verifier>>()
            .cloned()
            .ok_or_else(|| AppError(ServiceError::internal("auth", "no verifier installed")))?;
        if let Some(key) = parts.headers.get(common::routes::CLUSTER_KEY_HEADER) {
            let key = key.to_str().unwrap_or_default();
            if !key.is_empty() && verifier.is_cluster_key(key) {
                return Ok(Authed(Principal::Cluster));
            }
        }
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(|| {
                AppError(ServiceError::Unauthorized(
                    "missing bearer token; log in".into(),
                ))
            })?;
        let token = header.strip_prefix("Bearer ").ok_or_else(|| {
            AppError(ServiceError::Unauthorized("expected a Bearer token".into()))
        })?;
        let claims = verifier.verify_token(token).await?;
        Ok(Authed(Principal::User(act_as(parts, claims)?)))
    }
}

/// The claims a request acts with: the token's own, or, from an administrator's `--local-ids`
/// mount, the local caller's identity it names in `x-dfs-act-as` (a trusted host, as NFS's
/// AUTH_SYS). Anyone else naming an identity is refused, never silently ignored.
fn act_as(parts: &Parts, mut claims: Claims) -> Result<Claims, AppError> {
    let Some(value) = parts.headers.get(common::routes::ACT_AS_HEADER) else {
        return Ok(claims);
    };
    if !claims.id.admin {
        return Err(AppError(ServiceError::NotAdministrator(format!(
            "{} is not an administrator: only an administrator's mount may act as local users (--local-ids)",
            claims.user
        ))));
    }
    claims.id = value
        .to_str()
        .ok()
        .and_then(common::Identity::from_act_as_header)
        .ok_or_else(|| {
            AppError(ServiceError::BadRequest(format!(
                "malformed {} header: expected uid:gid:group,...",
                common::routes::ACT_AS_HEADER
            )))
        })?;
    Ok(claims)
}

/// Extractor: only other dfs services (cluster key) may call.
pub struct ClusterOnly;

impl<S: Send + Sync> FromRequestParts<S> for ClusterOnly {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Authed::from_request_parts(parts, state).await?.0 {
            Principal::Cluster => Ok(ClusterOnly),
            Principal::User(_) => Err(AppError(ServiceError::Forbidden(
                "internal endpoint: cluster key required".into(),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::usable_auth_url;

    #[test]
    fn regression_a_tls_directory_never_fetches_the_auth_key_from_a_plain_url() {
        let plain = Some("http://auth:7072".to_owned());
        let tls = Some("https://auth:7072".to_owned());
        assert_eq!(usable_auth_url(plain.clone(), true), None);
        assert_eq!(usable_auth_url(tls.clone(), true), tls);
        assert_eq!(usable_auth_url(plain.clone(), false), plain);
        assert_eq!(usable_auth_url(None, true), None);
    }
}
