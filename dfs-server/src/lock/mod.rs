//! `LockService`: exclusive per-file write locks (a FIFO wait queue, leases, fencing tokens
//! that only grow) and application locks (`flock`/`fcntl`, shared or exclusive), over one of
//! two engines: `local` (in memory, one process; the fence counter in redb) or `etcd` (any
//! number of stateless instances over one etcd cluster). `routes.rs` is the HTTP side; the
//! engines know nothing of HTTP.

pub mod app;
pub mod etcd;
pub mod local;
pub mod routes;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::time::Duration;

use common::api::{AcquireResponse, AppLockConflict, AppLockResponse, Grant, LockOwner};
use common::api::{LockStatus, WaiterId};
use common::{FenceToken, NodeId};

use crate::error::ServiceResult;
use crate::meta::MetaConfig;
use crate::meta::etcd::EtcdConfig;

/// Tunables of the lock service.
#[derive(Debug, Clone)]
pub struct LockConfig {
    /// How long a grant lasts without renewal; also how long a silent waiter keeps its place.
    pub lease: Duration,
    /// Longest a single acquire call waits before answering `queued`.
    pub max_wait: Duration,
}

impl Default for LockConfig {
    fn default() -> Self {
        LockConfig {
            lease: Duration::from_secs(10),
            max_wait: Duration::from_secs(25),
        }
    }
}

/// Where the locks live: one engine per service, chosen at start from `--meta`.
// One value per process: the sizes of the variants do not matter.
#[allow(clippy::large_enum_variant)]
enum Engine {
    /// In memory, one process; fence counter in redb (the default, `dfs up`).
    Local {
        writes: local::LocalLocks,
        apps: app::AppLocks,
    },
    /// In etcd: any number of instances over one cluster, none with state of its own.
    Etcd(etcd::EtcdLocks),
}

/// The lock service: write locks and application locks, over one engine. The HTTP routes
/// call only this.
pub struct LockService {
    fence_key: String,
    config: LockConfig,
    engine: Engine,
}

impl LockService {
    /// The engine `meta` names: `redb`, the in-memory engine with its fence counter under
    /// `data_dir`; etcd, the etcd engine under the same prefix as the directory's metadata.
    /// Grants are signed with `fence_key` (the cluster key), so file servers accept only
    /// fencing tokens this service issued.
    pub async fn build(
        meta: &MetaConfig,
        data_dir: &Path,
        config: LockConfig,
        fence_key: &str,
    ) -> ServiceResult<Self> {
        match meta {
            MetaConfig::Redb => Self::open(data_dir, config, fence_key),
            MetaConfig::Etcd(c) => Self::connect_etcd(c, config, fence_key).await,
        }
    }

    /// The in-memory engine, its fence counter under `data_dir`.
    pub fn open(data_dir: &Path, config: LockConfig, fence_key: &str) -> ServiceResult<Self> {
        Ok(LockService {
            engine: Engine::Local {
                writes: local::LocalLocks::open(data_dir, config.clone(), fence_key)?,
                apps: app::AppLocks::new(config.lease, config.max_wait),
            },
            config,
            fence_key: fence_key.to_owned(),
        })
    }

    /// The etcd engine on the cluster of `etcd` (keys under `<prefix>/locks/`).
    pub async fn connect_etcd(
        etcd: &EtcdConfig,
        config: LockConfig,
        fence_key: &str,
    ) -> ServiceResult<Self> {
        Ok(LockService {
            engine: Engine::Etcd(etcd::EtcdLocks::connect(etcd, config.clone(), fence_key).await?),
            config,
            fence_key: fence_key.to_owned(),
        })
    }

    /// Refuses (EACCES) a capability that does not let its holder write `node`.
    pub fn check_capability(&self, cap: &str, node: NodeId) -> ServiceResult<()> {
        crate::capability::verify_node(
            &self.fence_key,
            cap,
            node,
            common::perm::W,
            crate::store::now_ms(),
        )
    }

    /// The configured lease.
    pub fn lease(&self) -> Duration {
        self.config.lease
    }

    /// Waits up to `wait` (capped) for `node`'s write lock; answers `Granted` or `Queued`.
    /// The waiter keeps its queue position for a lease time after the call returns.
    pub async fn acquire(
        &self,
        node: NodeId,
        waiter: &WaiterId,
        user: &str,
        wait: Duration,
    ) -> ServiceResult<AcquireResponse> {
        match &self.engine {
            Engine::Local { writes, .. } => writes.acquire(node, waiter, user, wait).await,
            Engine::Etcd(e) => e.acquire(node, waiter, user, wait).await,
        }
    }

    /// Extends the holder's lease.
    pub async fn renew(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<Grant> {
        match &self.engine {
            Engine::Local { writes, .. } => writes.renew(node, waiter),
            Engine::Etcd(e) => e.renew(node, waiter).await,
        }
    }

    /// Releases the lock (or leaves the queue); the next waiter is woken. Idempotent.
    pub async fn release(&self, node: NodeId, waiter: &WaiterId) -> ServiceResult<()> {
        match &self.engine {
            Engine::Local { writes, .. } => writes.release(node, waiter),
            Engine::Etcd(e) => e.release(node, waiter).await,
        }
    }

    /// Every write lock held or waited for.
    pub async fn status(&self) -> ServiceResult<Vec<LockStatus>> {
        match &self.engine {
            Engine::Local { writes, .. } => writes.status(),
            Engine::Etcd(e) => e.status().await,
        }
    }

    /// Takes an application lock, waiting up to `wait` (capped); `wait` zero: answers at once.
    pub async fn app_lock(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared: bool,
        user: &str,
        wait: Duration,
    ) -> ServiceResult<AppLockResponse> {
        match &self.engine {
            Engine::Local { apps, .. } => apps.lock(node, owner, shared, user, wait).await,
            Engine::Etcd(e) => e.app_lock(node, owner, shared, user, wait).await,
        }
    }

    /// Gives an application lock up, or its place in the queue. Idempotent.
    pub async fn app_unlock(&self, node: NodeId, owner: &LockOwner) -> ServiceResult<()> {
        match &self.engine {
            Engine::Local { apps, .. } => apps.unlock(node, owner),
            Engine::Etcd(e) => e.app_unlock(node, owner).await,
        }
    }

    /// A holder another owner's request (`shared` or not) would conflict with.
    pub async fn app_test(
        &self,
        node: NodeId,
        owner: &LockOwner,
        shared: bool,
    ) -> ServiceResult<Option<AppLockConflict>> {
        match &self.engine {
            Engine::Local { apps, .. } => apps.test(node, owner, shared),
            Engine::Etcd(e) => e.app_test(node, owner, shared).await,
        }
    }

    /// Extends the application locks `held` of `session`; returns how many it holds.
    pub async fn app_renew(
        &self,
        session: &common::UploadId,
        held: &[(NodeId, u64)],
    ) -> ServiceResult<u64> {
        match &self.engine {
            Engine::Local { apps, .. } => apps.renew(session, held),
            Engine::Etcd(e) => e.app_renew(session, held).await,
        }
    }

    /// Whether nobody holds or waits for an application lock on `node` (tests).
    #[cfg(test)]
    async fn app_idle(&self, node: NodeId) -> ServiceResult<bool> {
        match &self.engine {
            Engine::Local { apps, .. } => apps.idle(node),
            Engine::Etcd(e) => e.app_idle(node).await,
        }
    }
}

/// A grant of `fence` on `node`, signed with the cluster key.
fn grant(key: &str, lease: Duration, node: NodeId, fence: FenceToken) -> Grant {
    Grant {
        fence,
        lease_ms: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
        signature: sign_fence(key, node, fence),
    }
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn fence_mac(key: &str, node: NodeId, fence: FenceToken) -> HmacSha256 {
    use hmac::{KeyInit, Mac};
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(format!("dfs-fence:{node}:{fence}").as_bytes());
    mac
}

/// HMAC-SHA256 (hex) of a grant, keyed with the cluster key: proof that the lock service
/// issued `fence` for `node`.
pub fn sign_fence(key: &str, node: NodeId, fence: FenceToken) -> String {
    use hmac::Mac;
    hex::encode(fence_mac(key, node, fence).finalize().into_bytes())
}

/// Checks a grant signature in constant time.
pub fn verify_fence(key: &str, node: NodeId, fence: FenceToken, signature: &str) -> bool {
    use hmac::Mac;
    let Ok(sig) = hex::decode(signature) else {
        return false;
    };
    fence_mac(key, node, fence).verify_slice(&sig).is_ok()
}
