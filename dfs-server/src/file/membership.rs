//! A file server's membership of its cluster: registration, heartbeats, and the cluster
//! identity its data belongs to.
//!
//! The first directory a data directory registers with names the cluster (`cluster_id`, kept
//! next to `server_id`). From then on the server joins only a directory of that cluster: a
//! directory that was wiped, or a `--directory` URL that points at another cluster or another
//! kind of service, is refused with a clear error instead of being trusted. Until the server has
//! joined its own cluster in this run it deletes nothing (see `scrub`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::api::RegisterServerRequest;
use tokio_util::sync::CancellationToken;

use super::replicate::FileServer;
use crate::error::{ServiceError, ServiceResult};

/// Name of the file that records the cluster a data directory belongs to.
pub const CLUSTER_ID_FILE: &str = "cluster_id";

impl FileServer {
    /// The cluster this server's data belongs to, if it has ever joined one.
    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether this server has joined its own cluster's directory in this run: the condition
    /// for acting on the directory's answers by deleting anything.
    pub fn joined(&self) -> bool {
        self.joined.load(Ordering::Acquire)
    }

    /// Registers at `url`; keeps the id across restarts. Returns the heartbeat interval.
    /// Refuses a directory of another cluster (or a wiped one, which has a new cluster id).
    pub async fn register(&self, url: &str, capacity_bytes: u64) -> ServiceResult<Duration> {
        self.directory
            .call(|dir| async move { self.register_at(&dir, url, capacity_bytes).await })
            .await
    }

    /// `register` with the directory at `dir` (its map and the registration from the same one).
    async fn register_at(
        &self,
        dir: &str,
        url: &str,
        capacity_bytes: u64,
    ) -> ServiceResult<Duration> {
        let ours = self.cluster_id();
        // Asked before registering, so that a directory of another cluster (or a build that
        // does not say) never records this server at all.
        let map = self.peer.cluster(dir).await?;
        let theirs = map.cluster_id.clone();
        if theirs.is_empty() {
            return Err(ServiceError::Forbidden(format!(
                "{} did not say which cluster it is; refusing to join it",
                dir
            )));
        }
        if let Some(ours) = &ours
            && *ours != theirs
        {
            return Err(self.foreign(dir, ours, &theirs));
        }
        if ours.is_none()
            && let Some(previous) = self.id()
            && !map.servers.iter().any(|s| s.id == previous && s.url == url)
        {
            // A data directory from before cluster ids, which this directory does not list
            // under this server's id and address: it may be a wiped or another cluster's.
            // Refused before registering, so it records nothing.
            return Err(ServiceError::Forbidden(format!(
                "this data directory was file server {} at {url}, but the directory at {} does \
                 not list that server (wiped, replaced, or another cluster): refusing to join \
                 it; point --directory at this server's own cluster",
                previous.0, dir
            )));
        }
        let req = RegisterServerRequest {
            url: url.to_owned(),
            capacity_bytes,
            previous_id: self.id(),
            cluster_id: ours.clone(),
        };
        let resp = self.peer.register_server(dir, &req).await?;
        if resp.cluster_id.is_empty() {
            return Err(ServiceError::Forbidden(format!(
                "{} did not say which cluster it is; refusing to join it",
                dir
            )));
        }
        match ours {
            Some(ours) if ours != resp.cluster_id => {
                return Err(self.foreign(dir, &ours, &resp.cluster_id));
            }
            Some(_) => {}
            None => {
                crate::store::write_durable(&self.cluster_file, resp.cluster_id.as_bytes(), 0o644)?;
                *self.cluster_id.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(resp.cluster_id.clone());
            }
        }
        self.set_id(resp.id)?;
        self.joined.store(true, Ordering::Release);
        Ok(Duration::from_millis(resp.heartbeat_ms.max(100)))
    }

    /// The condition for deleting anything on the directory's word: joined in this run, and
    /// the directory confirmed, *after* it gave that word, to be this server's cluster.
    pub async fn may_delete(&self) -> ServiceResult<()> {
        if !self.joined() {
            return Err(ServiceError::Unavailable(
                "this server has not joined its cluster's directory; deleting nothing".into(),
            ));
        }
        self.confirm_cluster().await
    }

    /// Asks the directory, now, whether it is still this server's cluster; a different answer
    /// (a wiped or replaced directory) ends the membership until the next registration.
    pub async fn confirm_cluster(&self) -> ServiceResult<()> {
        let Some(ours) = self.cluster_id() else {
            return Err(ServiceError::Unavailable(
                "this server has not joined a cluster yet".into(),
            ));
        };
        let dir = self.directory.current().to_owned();
        let theirs = self
            .directory
            .call(|d| async move { self.peer.cluster(&d).await })
            .await?
            .cluster_id;
        if theirs != ours {
            self.joined.store(false, Ordering::Release);
            return Err(self.foreign(&dir, &ours, &theirs));
        }
        Ok(())
    }

    fn foreign(&self, dir: &str, ours: &str, theirs: &str) -> ServiceError {
        ServiceError::Forbidden(format!(
            "this data directory belongs to cluster {ours}, but the directory at {} is cluster \
             {theirs} (wiped, replaced, or another cluster): refusing to join it or to delete \
             anything on its word; point --directory at this server's own cluster",
            dir
        ))
    }

    /// Registers (retrying until the directory answers) and then heartbeats until `cancel`.
    pub async fn run_heartbeats(
        self: std::sync::Arc<Self>,
        url: String,
        capacity: u64,
        cancel: CancellationToken,
    ) {
        let mut interval = Duration::from_secs(1);
        let mut registered = false;
        loop {
            if !registered {
                match self.register(&url, capacity).await {
                    Ok(i) => {
                        interval = i;
                        registered = true;
                        tracing::info!(id = ?self.id(), %url, "registered with the directory");
                    }
                    Err(e @ ServiceError::Forbidden(_)) => {
                        tracing::error!(error = %e, "registration refused; retrying")
                    }
                    Err(e) => tracing::warn!(error = %e, "registration failed; retrying"),
                }
            } else if let Some(id) = self.id()
                && !crate::faults::heartbeat_lost(id)
            {
                // An fsync: on the blocking pool, not on a runtime worker.
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.store.flush_fences()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "persisting fence marks failed"),
                    Err(e) => tracing::warn!(error = %e, "persisting fence marks failed"),
                }
                let space = match self.store.disk.space() {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the disk's free space failed");
                        None
                    }
                };
                let peer = &self.peer;
                match self
                    .directory
                    .call(|d| async move { peer.heartbeat(&d, id, space).await })
                    .await
                {
                    Ok(()) => {}
                    Err(ServiceError::NotFound(_) | ServiceError::NoRoute(_)) => {
                        // The directory does not know this server (it may have been wiped), or
                        // is no directory: nothing is deleted until a registration shows the
                        // directory is ours.
                        self.joined.store(false, Ordering::Release);
                        registered = false;
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}
