//! A bulk loader for benchmarks: many files written straight into the store, many per
//! transaction, with the indexes and counters every other write keeps (issue 10's benchmark
//! builds a namespace of a million nodes this way, untimed).

use common::{ContentHash, FenceToken, FileKind, NodeId, NodeMeta, ServerId};

use super::{
    DirectoryService, NEXT_ID, add_name, meta_get, meta_put, put_node, replicas, touch_dir,
};
use crate::error::{ServiceError, ServiceResult};
use crate::store::now_ns;

impl DirectoryService {
    /// Creates `count` empty files named `{prefix}{i}` in directory `parent`, each placed on
    /// `primary` and `replicas` and held by all of them, `per_tx` files per transaction (made
    /// durable once at the end). For benchmarks and load tests, not for service use: no
    /// permission checks, no placement decisions.
    #[doc(hidden)]
    pub fn bulk_load(
        &self,
        parent: NodeId,
        prefix: &str,
        count: u64,
        per_tx: u64,
        primary: ServerId,
        replicas: &[ServerId],
    ) -> ServiceResult<()> {
        // On etcd a file costs about ten writes (node, names, counters, holdings, placement):
        // a transaction stays within `--max-txn-ops`.
        let per_tx = match &self.store {
            crate::meta::MetaStore::Redb(_) => per_tx.max(1),
            crate::meta::MetaStore::Etcd(_) => per_tx.clamp(1, 6),
        };
        let mut done = 0u64;
        while done < count {
            let n = per_tx.min(count - done);
            self.store.write_lazy(|tx| {
                let first = meta_get(tx, NEXT_ID)?
                    .ok_or_else(|| ServiceError::internal("bulk load", "no next id"))?;
                meta_put(tx, NEXT_ID, first + n)?;
                let now = now_ns();
                let holders: Vec<ServerId> = std::iter::once(primary)
                    .chain(replicas.iter().copied())
                    .collect();
                for k in 0..n {
                    let name = format!("{prefix}{}", done + k);
                    let meta = NodeMeta {
                        id: NodeId(first + k),
                        parent,
                        kind: FileKind::File,
                        mode: 0o644,
                        owner: "root".into(),
                        uid: 0,
                        gid: 0,
                        size: 0,
                        version: 0,
                        mtime_ns: now,
                        ctime_ns: now,
                        atime_ns: now,
                        nlink: 1,
                        rdev: 0,
                        committed_ns: now,
                        hash: ContentHash::empty(),
                        primary: Some(primary),
                        replicas: replicas.to_vec(),
                        holders: holders.clone(),
                        symlink_target: None,
                        fence: FenceToken(0),
                        recent_uploads: vec![],
                        writeback: None,
                    };
                    put_node(tx, &meta)?;
                    replicas::node_changed(tx, None, Some(&meta))?;
                    add_name(tx, parent, &name, meta.id)?;
                }
                touch_dir(tx, parent, now)
            })?;
            done += n;
        }
        // A durable write carries the lazy ones onto the disk (redb).
        self.store.write(|_| Ok(()))
    }
}
