//! Conflict copies. A later push (a background retry after a failed close, a write-back push)
//! of content based on a version that is no longer current is refused by the directory
//! (`conflict`): the writer's content is then kept as a new file next to the original,
//! `NAME.conflict-USER-TIME`, with the original's mode, and the original keeps the newer version.
//! Where that file cannot be made, the content stays in the cache under `recovered/`. Either way
//! the log and `dfs status` say where it went; nothing is dropped and nothing is overwritten.

use std::ffi::OsStr;
use std::time::SystemTime;

use common::{FileKind, NodeId, NodeMeta, UploadId};
use serde::{Deserialize, Serialize};

use super::{DfsFs, hash_file};
use crate::cache::{CacheEntry, Pending};
use crate::error::{FsError, FsResult};
use crate::remote::RemoteError;

/// How many conflicts `dfs status` lists (the newest).
const CONFLICTS_SHOWN: usize = 100;
/// The cache file that keeps them across restarts of the client.
const NOTES_FILE: &str = "conflicts.json";

/// The conflicts a client found before it (re)started; none if it never found any. A file it
/// cannot read is reported in the log and ignored (the copies themselves are untouched).
pub fn load_notes(cache_root: &std::path::Path) -> Vec<ConflictNote> {
    let path = cache_root.join(NOTES_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "the list of earlier conflicts is unreadable; starting a new one");
            Vec::new()
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "reading the list of earlier conflicts");
            Vec::new()
        }
    }
}

/// A conflict this client found, and where the refused content went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictNote {
    /// The file whose push was refused.
    pub node: u64,
    /// Its name then (empty if it could not be found).
    pub name: String,
    /// Where the content is: the conflict copy's name in the same directory, or a path in the
    /// cache's `recovered/` directory.
    pub kept_as: String,
    /// Whether `kept_as` is a file in the mount (else a path in the cache).
    pub in_mount: bool,
    /// When, in ms since the epoch.
    pub at_ms: u64,
}

/// The name of the `attempt`-th (from 1) conflict copy of `name` made by `user` at `at`:
/// `NAME.conflict-USER-2026-12-02T051500Z`, a `-N` suffix from the second attempt on, `NAME`
/// shortened to keep the whole within 255 bytes.
pub fn conflict_name(name: &str, user: &str, at: SystemTime, attempt: u32) -> String {
    let user: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let stamp = humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace(':', "");
    let mut suffix = format!(".conflict-{user}-{stamp}");
    if attempt > 1 {
        suffix.push_str(&format!("-{attempt}"));
    }
    let room = common::name::NAME_MAX.saturating_sub(suffix.len());
    let mut cut = name.len().min(room);
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{suffix}", &name[..cut])
}

impl DfsFs {
    /// The push of `pending` for `node` was refused as a conflict: keep that content as a
    /// conflict copy (or in `recovered/`), and let the original go back to the server's
    /// version unless it changed here again meanwhile. Called with the node's lock held.
    pub(super) async fn keep_conflict_copy(&self, node: NodeId, pending: &Pending) -> FsResult<()> {
        let path = self.cache.path(node);
        // A snapshot of the refused content, durable before anything forgets it.
        let tmp = self.cache.tmp_path();
        std::fs::copy(&path, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        let (hash, size) = hash_file(&tmp)?;
        let user = self.remote.user().await.unwrap_or_else(|| "unknown".into());
        let at = SystemTime::now();
        // The refused push's attribute changes belong to its content, not to the version that
        // won: they go with the copy.
        let folded = self.folded_attrs(node);
        let (name, kept_as, in_mount) = match self.conflict_node(node, &user, at, folded.mode).await
        {
            Err((_, e)) if transient(&e) => {
                // The servers are away for a moment: the change stays pending, judged again
                // by the next push, rather than leaving the file system for the cache.
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            Ok((name, cname, copy)) => {
                // Nothing opens the new name's copy until it is in place and indexed.
                let lock = self.node_locks.get(copy.id);
                let _copy_guard = lock.lock().await;
                let kept = self.install_conflict_copy(&tmp, &copy, hash.clone(), size);
                if kept.is_ok() && folded.mtime_ns.is_some() {
                    self.folded
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(
                            copy.id,
                            super::FoldedAttrs {
                                mode: None,
                                mtime_ns: folded.mtime_ns,
                            },
                        );
                }
                match kept {
                    Ok(()) => (name, cname, true),
                    Err(e) => {
                        tracing::warn!(%node, error = %e, "filling the conflict copy failed; keeping the content in the cache");
                        (name, self.set_aside(&tmp, node)?, false)
                    }
                }
            }
            Err((name, e)) => {
                tracing::warn!(%node, error = %e, "a conflict copy cannot be made next to the file; keeping the content in the cache");
                (name, self.set_aside(&tmp, node)?, false)
            }
        };
        tracing::warn!(%node, file = %name, kept_as = %kept_as, "conflict: this client's change was based on an older version than the servers' newest; the newer version stays and this change is kept aside");
        // The original: back to the server's version at the next open, unless it was written
        // again here meanwhile (that change is pushed, and judged, on its own).
        {
            let _g = self.entry_updates();
            if let Some(mut e) = self.cache.get(node)?
                && e.pending.as_ref().map(|p| &p.upload_id) == Some(&pending.upload_id)
                && self.writer_count(node) == 0
                && !self.is_unrecorded(node)
            {
                e.pending = None;
                self.forget_actor(node);
                // The copy holds our content, which no server version has.
                e.version = 0;
                e.hash = pending.hash.clone();
                self.cache.put(node, &e)?;
                self.folded
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node);
            }
        }
        self.writeback_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
        let mut notes = self.conflicts.lock().unwrap_or_else(|p| p.into_inner());
        notes.push(ConflictNote {
            node: node.0,
            name,
            kept_as,
            in_mount,
            at_ms: dfs_server::store::now_ms(),
        });
        let excess = notes.len().saturating_sub(CONFLICTS_SHOWN);
        notes.drain(..excess);
        // Kept across restarts (the copy itself is already safe: this is only the record),
        // written under the lock so that a newer list is never overwritten by an older one.
        let saved = serde_json::to_vec_pretty(&*notes)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                dfs_server::store::write_durable(&self.cache_root.join(NOTES_FILE), &b, 0o600)
                    .map_err(|e| e.to_string())
            });
        drop(notes);
        if let Err(e) = saved {
            tracing::warn!(error = %e, "saving the list of conflicts failed; it is in the log");
        }
        self.write_status();
        self.wake.notify_one();
        Ok(())
    }

    /// Makes the conflict copy's node next to `node`: the original's name, the copy's, and the
    /// new node. On failure, the original's name (if found) and the error.
    async fn conflict_node(
        &self,
        node: NodeId,
        user: &str,
        at: SystemTime,
        mode: Option<u32>,
    ) -> Result<(String, String, NodeMeta), (String, FsError)> {
        let meta = self
            .remote
            .get(node)
            .await
            .map_err(|e| (String::new(), e.into()))?;
        let entries = self
            .remote
            .list(meta.parent)
            .await
            .map_err(|e| (String::new(), e.into()))?;
        let Some(name) = entries
            .into_iter()
            .find(|e| e.meta.id == node)
            .map(|e| e.name)
        else {
            return Err((String::new(), FsError::Absent));
        };
        fail::fail_point!("conflict-create", |_| Err((
            name.clone(),
            FsError::Remote(RemoteError::Network(
                "fault injected: directory away".into()
            ))
        )));
        let mut last = FsError::Absent;
        for attempt in 1..=5 {
            let cname = conflict_name(&name, user, at, attempt);
            match self
                .create_node(
                    meta.parent,
                    OsStr::new(&cname),
                    FileKind::File,
                    mode.unwrap_or(meta.mode),
                    None,
                )
                .await
            {
                Ok(m) => return Ok((name, cname, m)),
                Err(
                    e @ FsError::Remote(RemoteError::Api {
                        code: common::ErrorCode::Exists,
                        ..
                    }),
                ) => last = e,
                Err(e) => return Err((name, e)),
            }
        }
        Err((name, last))
    }

    /// Puts the snapshot `tmp` in place as the copy of the new node `copy`, pending (pushed
    /// by the uploader like any change).
    fn install_conflict_copy(
        &self,
        tmp: &std::path::Path,
        copy: &NodeMeta,
        hash: common::ContentHash,
        size: u64,
    ) -> FsResult<()> {
        self.install(copy.id, tmp)?;
        let entry = CacheEntry {
            pending: Some(Pending {
                upload_id: UploadId::from_bytes(rand::random()),
                hash,
                size,
                earlier: Vec::new(),
            }),
            ..CacheEntry::clean(copy)
        };
        self.cache.put(copy.id, &entry)?;
        Ok(())
    }

    /// Moves the snapshot `tmp` of `node` into the cache's `recovered/`, durably; its path.
    pub(super) fn set_aside(&self, tmp: &std::path::Path, node: NodeId) -> FsResult<String> {
        let dir = self.cache.root().join("recovered");
        std::fs::create_dir_all(&dir)?;
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
            .to_string()
            .replace(':', "");
        let to = dir.join(format!(
            "node-{}-conflict-{stamp}-{}",
            node.0,
            hex::encode(rand::random::<[u8; 3]>())
        ));
        std::fs::rename(tmp, &to)?;
        std::fs::File::open(&dir)?.sync_all()?;
        if let Some(root) = dir.parent() {
            std::fs::File::open(root)?.sync_all()?;
        }
        Ok(to.display().to_string())
    }

    /// Conflicts found by this client, also before a restart (the newest last).
    pub fn conflicts(&self) -> Vec<ConflictNote> {
        self.conflicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An error that says nothing about the file, only that a server is away for now.
fn transient(e: &FsError) -> bool {
    matches!(e, FsError::Remote(r) if r.is_unreachable())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_188_500)
    }

    #[test]
    fn conflict_names_say_who_and_when() {
        assert_eq!(
            conflict_name("notes.txt", "alice", at(), 1),
            "notes.txt.conflict-alice-2026-12-02T051500Z"
        );
        assert_eq!(
            conflict_name("notes.txt", "al/ice", at(), 2),
            "notes.txt.conflict-al_ice-2026-12-02T051500Z-2"
        );
    }

    #[test]
    fn conflict_names_stay_within_name_max() {
        let long = "é".repeat(200);
        let n = conflict_name(&long, "bob", at(), 3);
        assert!(n.len() <= common::name::NAME_MAX, "{}", n.len());
        assert!(common::ValidName::parse(&n).is_ok());
        assert!(n.ends_with(".conflict-bob-2026-12-02T051500Z-3"));
    }
}
