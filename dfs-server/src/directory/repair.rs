//! Keeping every file available: primary failover and re-replication, decided by the pure
//! [`plan`] and carried out by [`run`], a throttled background loop of the directory.
//!
//! - **Failover**: a file whose primary is dead gets a live *holder* of its current version
//!   (a server that acknowledged it) as primary. Never a server with an older version.
//! - **Re-replication**: a file with fewer live holders than `min(replication, live servers)`
//!   is copied from a live holder to another live server: first a placement member that missed
//!   versions (a returning server catches up), else a new server.
//!
//! A pass serves a bounded batch of the queue of files that need repair (`replicas.rs`), not
//! every file: its cost follows the work to do, not the size of the namespace.
//!
//! A pass never waits for its copies: they run in the background (at most
//! `max_copies_per_pass` at once, one per file), so a slow or stopped copy target can never
//! delay the failover of another file to the next pass.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{ContentHash, FileKind, NodeId, NodeMeta, ServerId};
use tokio_util::sync::CancellationToken;

use crate::meta::as_leader;

use super::DirectoryService;
use super::replicas::Settle;
use crate::peer::Peer;

/// What one file needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// Nothing.
    None,
    /// Make this live holder the primary.
    Promote(ServerId),
    /// Copy the current version from a live holder to another live server.
    Copy {
        /// A live holder.
        from: ServerId,
        /// The server that gets the copy.
        to: ServerId,
    },
    /// No live server holds the current version; wait for one to return.
    Unavailable,
}

/// Decides the next repair step for `meta` given the live servers (pure).
pub fn plan(meta: &NodeMeta, live: &[ServerId], replication: u32) -> Repair {
    if meta.kind != FileKind::File || live.is_empty() {
        return Repair::None;
    }
    let live_holders: Vec<ServerId> = meta
        .holders
        .iter()
        .copied()
        .filter(|h| live.contains(h))
        .collect();
    let primary_live = meta.primary.is_some_and(|p| live.contains(&p));
    if !primary_live {
        return match live_holders.first() {
            Some(h) => Repair::Promote(*h),
            None => Repair::Unavailable,
        };
    }
    let want = usize::try_from(replication)
        .unwrap_or(usize::MAX)
        .min(live.len());
    if live_holders.len() >= want {
        return Repair::None;
    }
    let Some(from) = meta
        .primary
        .filter(|p| live_holders.contains(p))
        .or(live_holders.first().copied())
    else {
        return Repair::Unavailable;
    };
    let members = meta.primary.iter().chain(meta.replicas.iter());
    let target = members
        .copied()
        .find(|m| live.contains(m) && !meta.holders.contains(m))
        .or_else(|| {
            live.iter().copied().find(|s| {
                !meta.holders.contains(s) && Some(*s) != meta.primary && !meta.replicas.contains(s)
            })
        });
    match target {
        Some(to) => Repair::Copy { from, to },
        None => Repair::None,
    }
}

/// Tunables of the repair loop.
#[derive(Debug, Clone)]
pub struct RepairConfig {
    /// Time between passes.
    pub interval: Duration,
    /// Most copies under way at once (throttle).
    pub max_copies_per_pass: usize,
}

impl Default for RepairConfig {
    fn default() -> Self {
        RepairConfig {
            interval: Duration::from_secs(2),
            max_copies_per_pass: 8,
        }
    }
}

/// The files with a copy under way.
#[derive(Default, Clone)]
pub struct InFlight(Arc<Mutex<HashSet<NodeId>>>);

impl InFlight {
    fn set(&self) -> std::sync::MutexGuard<'_, HashSet<NodeId>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many copies are under way.
    pub fn len(&self) -> usize {
        self.set().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Files taken from the queue per pass.
pub const BATCH: usize = 1024;

/// How long a file no live server holds waits before it is planned again (a holder's return
/// queues it at once anyway).
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(30);

/// One pass over a bounded batch of the queue of files needing repair (see `replicas.rs`):
/// deaths and returns of servers noted first (their files queued through the holdings index),
/// then failovers done at once, copies started in the background (see the module docs), and
/// each entry settled. Returns (promotions done, copies started).
pub async fn pass(
    svc: &Arc<DirectoryService>,
    peer: &Peer,
    cfg: &RepairConfig,
    inflight: &InFlight,
) -> (usize, usize) {
    let (promoted, started, _) = pass_full(svc, peer, cfg, inflight).await;
    (promoted, started)
}

/// Every instance keeps its registry in step with the others' (shared liveness), once per
/// heartbeat interval, and the leader before every pass (so a run of passes never judges
/// liveness from a view older than that). Returns whether the view is fresh: not due, or
/// read now; false when a due read failed.
async fn sync_if_due(svc: &Arc<DirectoryService>) -> bool {
    if !svc.registry_sync_due() {
        return true;
    }
    let s = svc.clone();
    match tokio::task::spawn_blocking(move || s.sync_registry()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "reading the shared registry failed");
            false
        }
        Err(_) => false,
    }
}

/// [`pass`], also telling whether the batch was full (more work may be due at once).
async fn pass_full(
    svc: &Arc<DirectoryService>,
    peer: &Peer,
    cfg: &RepairConfig,
    inflight: &InFlight,
) -> (usize, usize, bool) {
    if !sync_if_due(svc).await {
        // A stale view would take a server beating through another instance for dead: its
        // death recorded, its primaries failed over away from it. Nothing is judged on it.
        tracing::warn!(
            "repair: the shared registry could not be read; this pass records and settles nothing"
        );
        return (0, 0, false);
    }
    let servers: Vec<(ServerId, bool, bool)> = svc
        .registry
        .status(&Default::default())
        .into_iter()
        .map(|s| (s.id, s.alive, s.last_heartbeat_ms_ago.is_some()))
        .collect();
    let alive: Vec<ServerId> = servers.iter().filter(|s| s.1).map(|s| s.0).collect();
    if alive.is_empty() && !servers.is_empty() {
        // Every server looks dead: more likely this instance's view is stale (a registry
        // sync behind) than the cluster gone. Recording deaths and settling entries against
        // no live server would dequeue them unrepaired; there is nothing to copy from anyway.
        tracing::warn!("repair: no file server looks alive; this pass records and settles nothing");
        return (0, 0, false);
    }
    // Alive but never heard (presumed alive after this instance started or learned of it) is
    // not dead, so no death is recorded for it, but it is no live holder or primary either:
    // a long-dead server inside that grace must not take a file's entry out of the queue.
    // Its files wait (their primary is not failed over) until it is heard or found dead.
    let live: Vec<ServerId> = servers.iter().filter(|s| s.1 && s.2).map(|s| s.0).collect();
    let undecided: Vec<ServerId> = servers
        .iter()
        .filter(|s| s.1 && !s.2)
        .map(|s| s.0)
        .collect();
    let batch = {
        let svc = svc.clone();
        let r = tokio::task::spawn_blocking(move || {
            as_leader(|| svc.note_servers(&servers))?;
            svc.repair_batch(BATCH)
        })
        .await;
        match r {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "repair: reading the queue failed");
                return (0, 0, false);
            }
            Err(_) => return (0, 0, false),
        }
    };
    if live.is_empty() {
        // Every live server unheard yet: settling against none would park every entry.
        return (0, 0, false);
    }
    let full = batch.len() >= BATCH;
    let now = crate::store::now_ms();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let later = now.saturating_add(ms(cfg.interval));
    // Failovers first: they are cheap and writes wait on them.
    let mut promoted = 0;
    let mut copies = Vec::new();
    let mut settled = Vec::with_capacity(batch.len());
    for (id, meta) in batch {
        let Some(meta) = meta else {
            settled.push((id, None, Settle::Check));
            continue;
        };
        if meta.primary.is_some_and(|p| undecided.contains(&p)) {
            // Its primary may be alive: no failover on a guess; looked at again next pass.
            settled.push((id, Some(meta), Settle::RetryAt(later)));
            continue;
        }
        let settle = match plan(&meta, &live, svc.replication()) {
            Repair::None => Settle::Check,
            Repair::Unavailable => Settle::RetryAt(now.saturating_add(ms(UNAVAILABLE_RETRY))),
            Repair::Promote(to) => match as_leader(|| svc.promote(meta.id, &meta.hash, to)) {
                Ok(()) => {
                    promoted += 1;
                    tracing::warn!(node = %meta.id, old = ?meta.primary, new = %to, "primary failed over");
                    Settle::Check
                }
                Err(e) => {
                    tracing::warn!(node = %meta.id, error = %e, "failover failed");
                    Settle::RetryAt(later)
                }
            },
            // Empty content needs no bytes moved: record it at once.
            Repair::Copy { to, .. } if meta.hash.as_str() == ContentHash::EMPTY_HEX => {
                if let Err(e) = as_leader(|| svc.add_holder(meta.id, &meta.hash, to)) {
                    tracing::warn!(node = %meta.id, error = %e, "recording a copy failed");
                }
                Settle::Check
            }
            Repair::Copy { from, to } => {
                if !inflight.set().contains(&meta.id) {
                    copies.push((meta.clone(), from, to));
                }
                // Under way (now or soon): looked at again next pass, after the others due.
                Settle::RetryAt(later)
            }
        };
        settled.push((id, Some(meta), settle));
    }
    // Then a bounded number of copies, concurrently; the ones left over wait for a later
    // pass (their entries were re-dated behind the others due, so they cannot starve them).
    copies.truncate(cfg.max_copies_per_pass.saturating_sub(inflight.len()));
    let started = copies.len();
    for (meta, from, to) in copies {
        inflight.set().insert(meta.id);
        let (svc, peer, inflight) = (svc.clone(), peer.clone(), inflight.clone());
        tokio::spawn(async move {
            if copy(&svc, &peer, &meta, from, to).await {
                match as_leader(|| svc.add_holder(meta.id, &meta.hash, to)) {
                    Ok(()) => tracing::info!(node = %meta.id, %from, %to, "re-replicated"),
                    Err(e) => {
                        tracing::warn!(node = %meta.id, error = %e, "recording a copy failed")
                    }
                }
            }
            inflight.set().remove(&meta.id);
        });
    }
    let settle_svc = svc.clone();
    let r = tokio::task::spawn_blocking(move || {
        as_leader(|| settle_svc.settle_repairs(&settled, &live))
    })
    .await;
    if let Ok(Err(e)) = r {
        tracing::warn!(error = %e, "repair: settling the queue failed; its entries are served again");
    }
    (promoted, started, full)
}

async fn copy(
    svc: &DirectoryService,
    peer: &Peer,
    meta: &NodeMeta,
    from: ServerId,
    to: ServerId,
) -> bool {
    let (Some(from_url), Some(to_url)) = (svc.registry.url(from), svc.registry.url(to)) else {
        return false;
    };
    match peer
        .copy_blob(&from_url, meta.id, &meta.hash, meta.size, &to_url)
        .await
    {
        Ok(()) => true,
        Err(e) => {
            if matches!(e, crate::error::ServiceError::NotFound(_)) {
                // The source has lost its copy: it is no holder.
                let _ = as_leader(|| svc.drop_holder(meta.id, &meta.hash, from));
            }
            tracing::warn!(node = %meta.id, %from, %to, error = %e, "re-replication copy failed");
            false
        }
    }
}

/// Runs passes every `cfg.interval` until `cancel`, while this instance leads: several
/// directory instances on one etcd prefix elect one (`DirectoryService::start_election`),
/// and its writes are fenced by the leadership (`meta::as_leader`), so a deposed leader's
/// late step is refused.
pub async fn run(
    svc: Arc<DirectoryService>,
    peer: Peer,
    cfg: RepairConfig,
    cancel: CancellationToken,
) {
    svc.start_election();
    let inflight = InFlight::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                svc.resign();
                return;
            }
            _ = tokio::time::sleep(cfg.interval) => {}
        }
        let _ = sync_if_due(&svc).await;
        // A full batch with failovers in it: more may be due, and writes wait on them. Each
        // pass first brings the registry in step (a long run of passes must not judge
        // liveness from a view older than the dead-after period).
        while svc.is_leader() {
            let (promoted, _, full) = pass_full(&svc, &peer, &cfg, &inflight).await;
            if !(full && promoted > 0) || cancel.is_cancelled() {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{FenceToken, NodeId};

    fn meta(primary: u64, replicas: &[u64], holders: &[u64]) -> NodeMeta {
        NodeMeta {
            id: NodeId(5),
            parent: NodeId::ROOT,
            kind: FileKind::File,
            mode: 0o644,
            owner: "t".into(),
            uid: 0,
            gid: 0,
            size: 3,
            version: 2,
            mtime_ns: 0,
            ctime_ns: 0,
            atime_ns: 0,
            nlink: 1,
            rdev: 0,
            committed_ns: 0,
            hash: ContentHash::from_digest(&[1; 32]),
            primary: Some(ServerId(primary)),
            replicas: replicas.iter().copied().map(ServerId).collect(),
            holders: holders.iter().copied().map(ServerId).collect(),
            symlink_target: None,
            fence: FenceToken(1),
            recent_uploads: vec![],
            writeback: None,
        }
    }

    fn ids(v: &[u64]) -> Vec<ServerId> {
        v.iter().copied().map(ServerId).collect()
    }

    #[test]
    fn dead_primary_fails_over_to_a_live_holder_only() {
        // Server 2 missed the last version (not a holder): never promoted.
        assert_eq!(
            plan(&meta(1, &[2, 3], &[1, 3]), &ids(&[2, 3]), 3),
            Repair::Promote(ServerId(3))
        );
        assert_eq!(
            plan(&meta(1, &[2, 3], &[1]), &ids(&[2, 3]), 3),
            Repair::Unavailable
        );
    }

    #[test]
    fn missing_copies_go_first_to_members_that_missed_versions() {
        assert_eq!(
            plan(&meta(1, &[2, 3], &[1, 2]), &ids(&[1, 2, 3]), 3),
            Repair::Copy {
                from: ServerId(1),
                to: ServerId(3)
            }
        );
        // Member 3 is dead: a new server (4) gets the copy.
        assert_eq!(
            plan(&meta(1, &[2, 3], &[1, 2]), &ids(&[1, 2, 4]), 3),
            Repair::Copy {
                from: ServerId(1),
                to: ServerId(4)
            }
        );
        // Enough live copies for the live server count: nothing to do.
        assert_eq!(
            plan(&meta(1, &[2, 3], &[1, 2]), &ids(&[1, 2]), 3),
            Repair::None
        );
        assert_eq!(
            plan(&meta(1, &[2, 3], &[1, 2, 3]), &ids(&[1, 2, 3]), 3),
            Repair::None
        );
    }
}
