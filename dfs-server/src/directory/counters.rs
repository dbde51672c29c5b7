//! The namespace's totals for `statfs` (nodes, bytes of regular files), kept as counters in
//! `dir_meta` and changed in the transaction that creates, removes or commits a node, so that
//! `statfs` reads 32 keys instead of every node (issue 10).
//!
//! The counters are sharded by node id (`nodes.<k>`, `bytes.<k>`, k = id % [`SHARDS`]): a
//! node always lands in the same shard, so no shard goes below zero, and concurrent
//! transactions on an engine with optimistic concurrency (etcd) rarely touch the same key.

use common::{FileKind, NodeMeta};
use redb::{ReadTransaction, ReadableTable, WriteTransaction};

use super::META;
use crate::error::ServiceResult;

/// Shards per counter.
pub const SHARDS: u64 = 16;

fn key(what: &str, shard: u64) -> String {
    format!("{what}.{shard}")
}

/// Bytes a node counts for: a regular file's size, nothing for anything else.
fn bytes_of(m: &NodeMeta) -> u64 {
    if m.kind == FileKind::File { m.size } else { 0 }
}

fn add(tx: &WriteTransaction, key: &str, delta: i128) -> ServiceResult<()> {
    if delta == 0 {
        return Ok(());
    }
    let mut meta = tx.open_table(META)?;
    let cur = meta.get(key)?.map_or(0, |v| v.value());
    let new = (i128::from(cur) + delta).clamp(0, i128::from(u64::MAX));
    meta.insert(key, u64::try_from(new).unwrap_or(u64::MAX))?;
    Ok(())
}

/// A node changed from `before` to `after` (`None`: absent) in `tx`: the totals follow.
pub(super) fn changed(
    tx: &WriteTransaction,
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
pub(super) fn totals(tx: &ReadTransaction) -> ServiceResult<(u64, u64)> {
    let meta = tx.open_table(META)?;
    let (mut nodes, mut bytes) = (0u64, 0u64);
    for shard in 0..SHARDS {
        let n = meta
            .get(key("nodes", shard).as_str())?
            .map_or(0, |v| v.value());
        let b = meta
            .get(key("bytes", shard).as_str())?
            .map_or(0, |v| v.value());
        nodes = nodes.saturating_add(n);
        bytes = bytes.saturating_add(b);
    }
    Ok((nodes, bytes))
}

/// Sets the counters from scratch (`tally`: per shard, nodes and bytes), at the upgrade that
/// introduces them.
pub(super) fn set_all(tx: &WriteTransaction, tally: &[(u64, u64)]) -> ServiceResult<()> {
    let mut meta = tx.open_table(META)?;
    for shard in 0..SHARDS {
        let (n, b) = usize::try_from(shard)
            .ok()
            .and_then(|i| tally.get(i))
            .copied()
            .unwrap_or((0, 0));
        meta.insert(key("nodes", shard).as_str(), n)?;
        meta.insert(key("bytes", shard).as_str(), b)?;
    }
    Ok(())
}

/// Adds node `m` to a tally for [`set_all`].
pub(super) fn tally(tally: &mut [(u64, u64)], m: &NodeMeta) {
    if let Some(t) = usize::try_from(m.id.0 % SHARDS)
        .ok()
        .and_then(|i| tally.get_mut(i))
    {
        t.0 += 1;
        t.1 = t.1.saturating_add(bytes_of(m));
    }
}
