//! The scrub: a file server's background check of every stored copy, and the rules for when a
//! copy may go.
//!
//! A copy is only ever dropped on the word of this server's own directory (see `membership`:
//! joined in this run, and the cluster id confirmed after the directory's answer, before any
//! copy is deleted or set aside; a pass stops as soon as the server is no longer joined). An
//! answer from anything else (a route the service does not have, a directory of another
//! cluster, a wiped one) deletes nothing. What goes:
//! - a superseded version (the directory names a newer one, committed after this copy was
//!   written): deleted;
//! - a corrupt copy, once reported to the directory: deleted;
//! - the copy of a file the directory says is gone, or that this server no longer holds:
//!   *quarantined*, moved aside and deleted only after `quarantine_grace`, so a mistake can be
//!   undone by moving it back.

use std::time::Duration;

use common::{ContentHash, NodeId};
use tokio_util::sync::CancellationToken;

use super::replicate::FileServer;
use crate::error::{ServiceError, ServiceResult};

impl FileServer {
    /// One scrub pass: re-hashes every blob older than `grace`; drops copies that are corrupt
    /// (reporting them, so the directory re-replicates) or stale (an older version), and sets
    /// aside those of deleted files (see the module docs). Sleeps `pause` between blobs to stay
    /// in the background. Returns corrupt copies found.
    pub async fn scrub(&self, grace: Duration, pause: Duration) -> usize {
        let Some(me) = self.id() else { return 0 };
        if !self.joined() {
            tracing::debug!("scrub: not joined to this server's cluster; checking nothing");
            return 0;
        }
        self.store.purge_quarantine(self.quarantine_grace);
        match self.store.compact().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(packs = n, "scrub: compacted packs"),
            Err(e) => tracing::warn!(error = %e, "scrub: compacting packs failed"),
        }
        let mut corrupt = 0;
        for (node, hash, written) in self.store.blobs() {
            if !self.joined() {
                tracing::warn!("scrub: no longer joined to this server's cluster; pass stopped");
                return corrupt;
            }
            let old_enough = written.elapsed().is_ok_and(|age| age >= grace);
            if !old_enough {
                continue;
            }
            let meta = match self
                .directory
                .call(|d| async move { self.peer.node(&d, node).await })
                .await
            {
                Ok(m) => m,
                Err(ServiceError::NotFound(_)) => {
                    if !self.set_aside(node, &hash, "its file was deleted").await {
                        return corrupt;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(%node, error = %e, "scrub: directory unavailable; this copy is checked next pass");
                    continue;
                }
            };
            if meta.hash != hash {
                // Superseded only if written before the current version was committed; a newer
                // blob may belong to an upload that is still replicating.
                let written_ns = written
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(u64::MAX, |d| {
                        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
                    });
                // A few seconds of margin for clock skew between this server and the directory.
                if written_ns.saturating_add(5_000_000_000) < meta.committed_ns {
                    tracing::debug!(%node, %hash, "scrub: dropping a superseded copy");
                    if let Err(e) = self.may_delete().await {
                        tracing::error!(%node, error = %e, "scrub: not acting on the directory's answer");
                        return corrupt;
                    }
                    // Only the copy looked at: one stored again meanwhile (A, B, A) stays.
                    let _ = self.store.remove_blob_written(node, &hash, written);
                }
                continue;
            }
            let member = meta.primary == Some(me)
                || meta.replicas.contains(&me)
                || meta.holders.contains(&me);
            if !member {
                // The file's placement moved away from this server while it was away.
                if !self
                    .set_aside(node, &hash, "this server no longer holds its file")
                    .await
                {
                    return corrupt;
                }
                continue;
            }
            match self.store.verify(node, &hash).await {
                Ok(true) => {}
                Ok(false) => {
                    corrupt += 1;
                    tracing::error!(%node, %hash, "scrub: stored copy is corrupt; reporting it for repair");
                    // Report first: a copy dropped but not reported would still count as held.
                    // A corrupt copy kept meanwhile is harmless (readers verify every hash).
                    let h = &hash;
                    match self
                        .directory
                        .call(|d| async move { self.peer.drop_holder(&d, node, h, me).await })
                        .await
                    {
                        Ok(()) => {
                            if self.may_delete().await.is_ok() {
                                let _ = self.store.remove_blob(node, &hash);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(%node, error = %e, "scrub: reporting the corrupt copy failed; retrying next pass")
                        }
                    }
                }
                Err(e) => tracing::warn!(%node, error = %e, "scrub: reading a copy failed"),
            }
            tokio::time::sleep(pause).await;
        }
        corrupt
    }

    /// Quarantines a copy the directory says should go, once the directory is confirmed to be
    /// this server's own. False: it is not (or could not be asked), and the pass must stop.
    async fn set_aside(&self, node: NodeId, hash: &ContentHash, why: &str) -> bool {
        if let Err(e) = self.may_delete().await {
            tracing::error!(%node, error = %e, "scrub: not acting on the directory's answer");
            return false;
        }
        tracing::info!(%node, %hash, "scrub: quarantining a copy: {why}");
        if let Err(e) = self.store.quarantine_blob(node, hash) {
            tracing::warn!(%node, error = %e, "scrub: quarantining a copy failed");
        }
        true
    }

    /// Scrubs every `interval` until `cancel`.
    pub async fn run_scrub(
        self: std::sync::Arc<Self>,
        interval: Duration,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let grace = interval.min(Duration::from_secs(600));
            self.scrub(grace, Duration::from_millis(5)).await;
        }
    }

    /// Drops this server's copy of `(node, hash)` unless the directory says it is the current
    /// version (a deposed primary's late clean-up must not delete what a newer write restored).
    /// A copy of a file the directory no longer has is quarantined, as by the scrub.
    pub async fn drop_if_superseded(&self, node: NodeId, hash: &ContentHash) -> ServiceResult<()> {
        if !self.joined() {
            return Err(ServiceError::Unavailable(
                "this server has not joined its cluster's directory; not dropping anything".into(),
            ));
        }
        match self
            .directory
            .call(|d| async move { self.peer.node(&d, node).await })
            .await
        {
            Ok(meta) if &meta.hash == hash => Err(ServiceError::Forbidden(format!(
                "{hash} is the current version of node {node}; not dropping it"
            ))),
            Ok(_) => {
                self.may_delete().await?;
                self.store.remove_blob(node, hash)
            }
            Err(ServiceError::NotFound(_)) => {
                self.may_delete().await?;
                self.store.quarantine_blob(node, hash)
            }
            Err(e) => Err(e),
        }
    }
}
