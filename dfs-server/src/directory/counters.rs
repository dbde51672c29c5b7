//! The namespace's totals for `statfs` (nodes, bytes of regular files), kept as counters in
//! `dir_meta` and changed in the transaction that creates, removes or commits a node, so that
//! `statfs` reads 32 keys instead of every node (issue 10).
//!
//! The counters are sharded by node id (`nodes.<k>`, `bytes.<k>`, k = id % [`SHARDS`]): a
//! node always lands in the same shard, so no shard goes below zero, and concurrent
//! transactions on an engine with optimistic concurrency (etcd) rarely touch the same key.

use common::{FileKind, NodeMeta};

use super::{meta_get, meta_put};
use crate::error::ServiceResult;
use crate::meta::Txn;

/// Shards per counter.
pub const SHARDS: u64 = 16;

fn key(what: &str, shard: u64) -> String {
    format!("{what}.{shard}")
}

/// Bytes a node counts for: a regular file's size, nothing for anything else.
fn bytes_of(m: &NodeMeta) -> u64 {
    if m.kind == FileKind::File { m.size } else { 0 }
}

fn add(tx: &Txn, key: &str, delta: i128) -> ServiceResult<()> {
    if delta == 0 {
        return Ok(());
    }
    let cur = meta_get(tx, key)?.unwrap_or(0);
    let new = (i128::from(cur) + delta).clamp(0, i128::from(u64::MAX));
    meta_put(tx, key, u64::try_from(new).unwrap_or(u64::MAX))
}

/// A node changed from `before` to `after` (`None`: absent) in `tx`: the totals follow.
pub(super) fn changed(
    tx: &Txn,
    before: Option<&NodeMeta>,
    after: Option<&NodeMeta>,
) -> ServiceResult<()> {
    let Some(id) = after.or(before).map(|m| m.id.0) else {
        return Ok(());
    };
    let shard = id % SHARDS;
    let nodes = i128::from(after.is_some()) - i128::from(before.is_some());
    let bytes = i128::from(after.map_or(0, bytes_of)) - i128::from(before.map_or(0, bytes_of));
    add(tx, &key("nodes", shard), nodes)?;
    add(tx, &key("bytes", shard), bytes)
}

/// (nodes, bytes) of the whole namespace.
pub(super) fn totals(tx: &Txn) -> ServiceResult<(u64, u64)> {
    let keys: Vec<String> = (0..SHARDS)
        .flat_map(|shard| [key("nodes", shard), key("bytes", shard)])
        .collect();
    let values = tx.get_many(super::META, &keys)?;
    let (mut nodes, mut bytes) = (0u64, 0u64);
    for pair in values.chunks(2) {
        let n = pair.first().copied().flatten().unwrap_or(0);
        let b = pair.get(1).copied().flatten().unwrap_or(0);
        nodes = nodes.saturating_add(n);
        bytes = bytes.saturating_add(b);
    }
    Ok((nodes, bytes))
}
