//! Repair work proportional to what needs repairing (issue 10): the under-replicated queue,
//! the holdings index and the placement counters, all kept in the directory's store and changed
//! in the same transactions that change a file's placement or holders.
//!
//! - **Queue** (`repair_queue`, node → due time; `repair_due`, `(due, node)`: the order it is
//!   served in). A file is queued by [`node_changed`] when, as far as the store knows, it has
//!   fewer live holders than the replication factor or its primary is dead (a new version held
//!   by fewer servers than wanted, a dropped copy, a promotion), and dequeued there once it has
//!   enough. The repair pass (`repair.rs`) takes a bounded batch of due entries, plans each with
//!   the pure `plan()`, and removes an entry only once its file is satisfied; an entry that
//!   cannot be satisfied now is re-dated (a copy in flight, no live holder) or *parked* (fewer
//!   live servers than the replication factor) until a server joins or returns.
//! - **Holdings** (`holdings`, `(server, node)`): every server a file's placement names or that
//!   holds its current version. When a server dies or returns, its files are queued through it,
//!   not through a scan of the namespace.
//! - **Server states** (`server_seen`, server → live as of the last pass): a death or a return
//!   is acted upon once, and deaths are remembered across restarts of the directory. A change
//!   is recorded *before* its files are queued, in one transaction with a resume point
//!   (`dir_meta`, `noted_from/{server}` → next node); the queueing chunks move the point on and
//!   the last removes it; a point left by a crash is carried on by the next pass. Recorded
//!   first, so that a copy recorded while the files are being queued is judged by the
//!   server's new state: a dead holder never counts toward taking out an entry.
//! - **Placement counters** (`placed`, `(server, shard)` → (primaries, replicas)), sharded by
//!   node id like the `statfs` counters (`counters.rs`).
//!
//! Every function here takes the transaction (`meta::Txn`) it works in; the work that spans
//! many entries (a dead server's files, unparking, settling a batch, the format-4 upgrade and
//! the rescan after the replication factor is raised) is cut into chunks, each its own
//! transaction and idempotent, small on etcd (whose transactions compare every key they read
//! and hold at most `--max-txn-ops`, 128 by default, writes).

use std::collections::BTreeSet;

use common::{FileKind, NodeId, NodeMeta, ServerId};

use super::{DirectoryService, META, NODES, counters, meta_get, meta_put};
use crate::error::ServiceResult;
use crate::meta::{MetaStore, Table, Txn};
use crate::store::decode;

/// The store format that has the queue, the holdings index and the counters.
pub const FORMAT: u64 = 4;

pub(crate) const HOLDINGS: Table<(u64, u64), ()> = Table::new("holdings");
pub(crate) const QUEUE: Table<u64, u64> = Table::new("repair_queue");
pub(crate) const QUEUE_DUE: Table<(u64, u64), ()> = Table::new("repair_due");
pub(crate) const PLACED: Table<(u64, u64), (u64, u64)> = Table::new("placed");
pub(crate) const SEEN: Table<u64, bool> = Table::new("server_seen");
/// The replication factor the queue is kept for (`dir_meta`).
const REPLICATION: &str = "replication";
/// The next node the format-4 upgrade builds from, while it is under way (`dir_meta`).
const UPGRADE_FROM: &str = "upgrade4_from";
/// The next node the rescan after a raised replication factor looks at, while it is under
/// way (`dir_meta`).
const RESCAN_FROM: &str = "rescan_from";

/// The point a server's recorded death or return is queueing its files from
/// (`dir_meta`, `{NOTED_FROM}{server}` → next node, or [`HELD_DONE`]), while it is under way.
const NOTED_FROM: &str = "noted_from/";
/// Just past every key starting with [`NOTED_FROM`].
const NOTED_END: &str = "noted_from0";
/// A point whose files are all queued (what is left: unparking, for a live server).
const HELD_DONE: u64 = u64::MAX;

fn noted_key(server: ServerId) -> String {
    format!("{NOTED_FROM}{}", server.0)
}

/// Due time of a parked entry: served only after a server joins or returns.
pub const PARKED: u64 = u64::MAX;

/// Entries (or nodes) per transaction of the chunked work: many on redb (one writer, cheap
/// transactions), few on etcd (see the module docs: a node costs about ten writes in the
/// upgrade, a queue entry three).
fn chunk(store: &MetaStore, per_entry_writes: usize) -> usize {
    match store {
        MetaStore::Redb(_) => 10_000,
        MetaStore::Etcd(_) => (96 / per_entry_writes.max(1)).max(1),
    }
}

/// Every server named by `m`'s placement or holding its current version.
fn servers_of(m: Option<&NodeMeta>) -> BTreeSet<u64> {
    match m {
        Some(m) if m.kind == FileKind::File => m
            .primary
            .iter()
            .chain(&m.replicas)
            .chain(&m.holders)
            .map(|s| s.0)
            .collect(),
        _ => BTreeSet::new(),
    }
}

fn placement_of(m: Option<&NodeMeta>) -> (Option<ServerId>, &[ServerId]) {
    match m {
        Some(m) if m.kind == FileKind::File => (m.primary, &m.replicas),
        _ => (None, &[]),
    }
}

fn add_placed(
    tx: &Txn,
    server: ServerId,
    shard: u64,
    primaries: i64,
    replicas: i64,
) -> ServiceResult<()> {
    let key = (server.0, shard);
    let (p, r) = tx.get(PLACED, &key)?.unwrap_or((0, 0));
    let p = p.saturating_add_signed(primaries);
    let r = r.saturating_add_signed(replicas);
    if (p, r) == (0, 0) {
        tx.delete(PLACED, &key)
    } else {
        tx.put(PLACED, &key, &(p, r))
    }
}

fn replication_of(tx: &Txn) -> ServiceResult<usize> {
    let r = meta_get(tx, REPLICATION)?.unwrap_or(3);
    Ok(usize::try_from(r).unwrap_or(usize::MAX))
}

/// Whether server `s` was found dead by the last repair pass.
fn dead(tx: &Txn, s: ServerId) -> ServiceResult<bool> {
    Ok(tx.get(SEEN, &s.0)?.is_some_and(|live| !live))
}

/// Whether file `m` has, as far as the store knows, a live primary and `want` live holders.
fn satisfied(tx: &Txn, m: &NodeMeta, want: usize) -> ServiceResult<bool> {
    let Some(p) = m.primary else {
        return Ok(false);
    };
    if dead(tx, p)? {
        return Ok(false);
    }
    let mut live = 0usize;
    for h in &m.holders {
        if !dead(tx, *h)? {
            live += 1;
        }
    }
    Ok(live >= want)
}

/// Queues `node` to be served at `due` at the latest (an entry due earlier stays as it is).
pub(super) fn enqueue(tx: &Txn, node: NodeId, due: u64) -> ServiceResult<()> {
    match tx.get(QUEUE, &node.0)? {
        Some(o) if o <= due => return Ok(()),
        Some(o) => tx.delete(QUEUE_DUE, &(o, node.0))?,
        None => {}
    }
    tx.put(QUEUE, &node.0, &due)?;
    tx.put(QUEUE_DUE, &(due, node.0), &())
}

/// Sets the due time of `node`'s entry (queued if it was not).
pub(super) fn set_due(tx: &Txn, node: NodeId, due: u64) -> ServiceResult<()> {
    dequeue(tx, node)?;
    tx.put(QUEUE, &node.0, &due)?;
    tx.put(QUEUE_DUE, &(due, node.0), &())
}

/// Removes `node`'s entry, if any.
pub(super) fn dequeue(tx: &Txn, node: NodeId) -> ServiceResult<()> {
    if let Some(o) = tx.get(QUEUE, &node.0)? {
        tx.delete(QUEUE, &node.0)?;
        tx.delete(QUEUE_DUE, &(o, node.0))?;
    }
    Ok(())
}

/// The hook every change of a node calls, in the transaction that makes it: `before` and
/// `after` are the node's records (`None`: absent). Keeps the statfs counters, the holdings
/// index, the placement counters and the queue. Every key it reads is the node's own (its
/// queue entry), a shard of a counter (by node id), a server's state or the replication
/// factor: two writers of different nodes seldom read what the other writes (etcd).
pub(super) fn node_changed(
    tx: &Txn,
    before: Option<&NodeMeta>,
    after: Option<&NodeMeta>,
) -> ServiceResult<()> {
    counters::changed(tx, before, after)?;
    let Some(id) = after.or(before).map(|m| m.id) else {
        return Ok(());
    };
    let file = |m: Option<&NodeMeta>| m.is_some_and(|m| m.kind == FileKind::File);
    if !file(before) && !file(after) {
        return Ok(());
    }
    let same_servers = match (before, after) {
        (Some(b), Some(a)) => {
            b.primary == a.primary
                && b.replicas == a.replicas
                && b.holders == a.holders
                && b.hash == a.hash
        }
        _ => false,
    };
    if same_servers {
        return Ok(());
    }
    // Holdings.
    let (was, is) = (servers_of(before), servers_of(after));
    for s in was.difference(&is) {
        tx.delete(HOLDINGS, &(*s, id.0))?;
    }
    for s in is.difference(&was) {
        tx.put(HOLDINGS, &(*s, id.0), &())?;
    }
    // Placement counters.
    let shard = id.0 % counters::SHARDS;
    let (bp, br) = placement_of(before);
    let (ap, ar) = placement_of(after);
    if bp != ap || br != ar {
        if let Some(p) = bp {
            add_placed(tx, p, shard, -1, 0)?;
        }
        for r in br {
            add_placed(tx, *r, shard, 0, -1)?;
        }
        if let Some(p) = ap {
            add_placed(tx, p, shard, 1, 0)?;
        }
        for r in ar {
            add_placed(tx, *r, shard, 0, 1)?;
        }
    }
    // The queue.
    match after {
        Some(m) if m.kind == FileKind::File => {
            if satisfied(tx, m, replication_of(tx)?)? {
                dequeue(tx, id)
            } else {
                enqueue(tx, id, crate::store::now_ms())
            }
        }
        _ => dequeue(tx, id),
    }
}

/// Up to `limit` queued nodes due at `now_ms`, earliest first.
pub(super) fn due(tx: &Txn, now_ms: u64, limit: usize) -> ServiceResult<Vec<NodeId>> {
    let hi = (now_ms.min(PARKED - 1) + 1, 0);
    Ok(tx
        .range(QUEUE_DUE, Some(&(0, 0)), Some(&hi), Some(limit))?
        .into_iter()
        .map(|((_, n), ())| NodeId(n))
        .collect())
}

/// Per server (primaries, replicas) from the placement counters.
pub(super) fn placement_counts(
    tx: &Txn,
) -> ServiceResult<std::collections::HashMap<ServerId, (u64, u64)>> {
    let mut out = std::collections::HashMap::new();
    for ((server, _), (p, r)) in tx.all(PLACED)? {
        let e: &mut (u64, u64) = out.entry(ServerId(server)).or_default();
        e.0 = e.0.saturating_add(p);
        e.1 = e.1.saturating_add(r);
    }
    Ok(out)
}

/// Server states as of the last pass: (server, live).
pub(super) fn seen(tx: &Txn) -> ServiceResult<Vec<(ServerId, bool)>> {
    Ok(tx
        .all(SEEN)?
        .into_iter()
        .map(|(s, live)| (ServerId(s), live))
        .collect())
}

/// Queues (due now) up to `chunk` files held by or placed on `server`, from node `from` on.
/// Returns the node to continue from, if there are more.
pub(super) fn enqueue_held(
    tx: &Txn,
    server: ServerId,
    from: u64,
    now_ms: u64,
    chunk: usize,
) -> ServiceResult<Option<u64>> {
    let hi = server.0.checked_add(1).map(|s| (s, 0));
    let rows = tx.range(
        HOLDINGS,
        Some(&(server.0, from)),
        hi.as_ref(),
        Some(chunk.saturating_add(1)),
    )?;
    let more = rows.get(chunk).map(|((_, n), ())| *n);
    for ((_, n), ()) in rows.into_iter().take(chunk) {
        enqueue(tx, NodeId(n), now_ms)?;
    }
    Ok(more)
}

/// Makes up to `chunk` parked entries due now. Returns whether any are left.
pub(super) fn unpark(tx: &Txn, now_ms: u64, chunk: usize) -> ServiceResult<bool> {
    let rows = tx.range(
        QUEUE_DUE,
        Some(&(PARKED, 0)),
        None,
        Some(chunk.saturating_add(1)),
    )?;
    let more = rows.len() > chunk;
    for ((_, n), ()) in rows.into_iter().take(chunk) {
        set_due(tx, NodeId(n), now_ms)?;
    }
    Ok(more)
}

/// Records that `server` is live (`true`) or dead as of this pass.
pub(super) fn set_seen(tx: &Txn, server: ServerId, live: bool) -> ServiceResult<()> {
    tx.put(SEEN, &server.0, &live)
}

/// In the transaction that makes a new store: the format, the replication factor, and the
/// root's share of the counters (nothing else to build).
pub(super) fn init(tx: &Txn, replication: u32, root: &NodeMeta) -> ServiceResult<()> {
    meta_put(tx, REPLICATION, u64::from(replication))?;
    node_changed(tx, None, Some(root))?;
    meta_put(tx, super::FORMAT, FORMAT)
}

/// At open, each step its own transaction: builds the queue, the holdings index and the
/// counters of a store from before them (format < [`FORMAT`]), and queues the files short of
/// a replication factor raised since the last start. Both scan the nodes in chunks from a
/// marker kept in `dir_meta`, so that a crash (or a second directory opening the same store)
/// carries on where the work stopped; every step is idempotent.
pub(super) fn open(store: &MetaStore, replication: u32) -> ServiceResult<()> {
    let (format, stored) = store.read(|tx| {
        Ok((
            meta_get(tx, super::FORMAT)?.unwrap_or(1),
            meta_get(tx, REPLICATION)?,
        ))
    })?;
    if format < FORMAT {
        upgrade(store, replication, format)?;
    } else if stored.is_none_or(|s| s != u64::from(replication)) {
        let raised = store.write(|tx| {
            let stored = meta_get(tx, REPLICATION)?;
            meta_put(tx, REPLICATION, u64::from(replication))?;
            // More copies wanted than the queue was kept for: files with enough before may
            // not have now. Once per change of the setting, a scan.
            let raised = stored.is_some_and(|s| s < u64::from(replication));
            if raised && meta_get(tx, RESCAN_FROM)?.is_none() {
                meta_put(tx, RESCAN_FROM, 0)?;
            }
            Ok(raised.then_some(stored))
        })?;
        if let Some(from) = raised {
            tracing::info!(
                from,
                to = replication,
                "replication factor raised: queueing the files short of it"
            );
        }
    }
    // A rescan under way (just begun, or cut short by a crash): carried on to its end.
    let per = chunk(store, 3);
    let mut queued = 0u64;
    let mut rescanned = false;
    loop {
        let step = store.write(|tx| {
            let Some(from) = meta_get(tx, RESCAN_FROM)? else {
                return Ok(None);
            };
            let want = replication_of(tx)?;
            let rows = tx.range(NODES, Some(&from), None, Some(per))?;
            let now = crate::store::now_ms();
            let mut queued = 0u64;
            for (_, v) in &rows {
                let m: NodeMeta = decode(v)?;
                if m.kind == FileKind::File && !satisfied(tx, &m, want)? {
                    enqueue(tx, m.id, now)?;
                    queued += 1;
                }
            }
            match rows.last() {
                Some((last, _)) if rows.len() >= per => meta_put(tx, RESCAN_FROM, last + 1)?,
                _ => tx.delete(META, &RESCAN_FROM.to_owned())?,
            }
            Ok(Some((queued, rows.len() >= per)))
        })?;
        let Some((n, more)) = step else { break };
        rescanned = true;
        queued += n;
        if !more {
            break;
        }
    }
    if rescanned {
        tracing::info!(queued, "rescan after a raised replication factor done");
    }
    Ok(())
}

/// The upgrade to format 4: every node, in chunks, taken in as [`node_changed`] takes in a new
/// node, from a marker; the format is set once the last chunk is in. No server is known dead
/// yet: the first passes find the dead ones and queue their files through the index.
fn upgrade(store: &MetaStore, replication: u32, from_format: u64) -> ServiceResult<()> {
    // The start: no table of this module has a row in a store of an older format (no dfs
    // wrote them), so only the marker and the replication factor are set.
    store.write(|tx| {
        if meta_get(tx, super::FORMAT)?.unwrap_or(1) >= FORMAT {
            return Ok(());
        }
        meta_put(tx, REPLICATION, u64::from(replication))?;
        if meta_get(tx, UPGRADE_FROM)?.is_none() {
            meta_put(tx, UPGRADE_FROM, 0)?;
        }
        Ok(())
    })?;
    // A file costs about ten writes (counters, holdings and placement of each of its servers,
    // queue), more with more servers.
    let per = chunk(store, 16);
    let (mut nodes, mut queued) = (0u64, 0u64);
    loop {
        let step = store.write(|tx| {
            let Some(from) = meta_get(tx, UPGRADE_FROM)? else {
                return Ok(None);
            };
            let rows = tx.range(NODES, Some(&from), None, Some(per))?;
            let mut servers = BTreeSet::new();
            let mut queued = 0u64;
            for (_, v) in &rows {
                let m: NodeMeta = decode(v)?;
                servers.extend(servers_of(Some(&m)));
                node_changed(tx, None, Some(&m))?;
                queued += u64::from(tx.get(QUEUE, &m.id.0)?.is_some());
            }
            for s in servers {
                set_seen(tx, ServerId(s), true)?;
            }
            let more = rows.len() >= per;
            match rows.last() {
                Some((last, _)) if more => meta_put(tx, UPGRADE_FROM, last + 1)?,
                _ => {
                    tx.delete(META, &UPGRADE_FROM.to_owned())?;
                    meta_put(tx, super::FORMAT, FORMAT)?;
                }
            }
            Ok(Some((rows.len() as u64, queued, more)))
        })?;
        let Some((n, q, more)) = step else { break };
        nodes += n;
        queued += q;
        if !more {
            break;
        }
    }
    tracing::info!(
        from = from_format,
        to = FORMAT,
        nodes,
        queued,
        "directory store upgrade: repair queue, holdings index and counters built"
    );
    Ok(())
}

/// What the repair pass did with a queued file, for [`DirectoryService::settle_repairs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Nothing left to start: the entry goes if the file is satisfied, else it is parked or
    /// stays due.
    Check,
    /// Work is under way or impossible now: look again at this time (ms since the epoch),
    /// unless the file changed meanwhile.
    RetryAt(u64),
}

impl DirectoryService {
    /// Up to `limit` files due for repair now, earliest first; `None`: the node is gone.
    pub fn repair_batch(&self, limit: usize) -> ServiceResult<Vec<(NodeId, Option<NodeMeta>)>> {
        self.store.read(|tx| {
            let ids = due(tx, crate::store::now_ms(), limit)?;
            let keys: Vec<u64> = ids.iter().map(|id| id.0).collect();
            let metas = tx.get_many(NODES, &keys)?;
            ids.iter()
                .zip(metas)
                .map(|(id, v)| Ok((*id, v.map(|v| decode::<NodeMeta>(&v)).transpose()?)))
                .collect()
        })
    }

    /// Records the outcome of a repair pass over queued files (`planned`: the record each was
    /// planned from), in transactions not waited onto the disk (a lost one leaves entries
    /// that the next pass serves again), a chunk of files each. Each file is looked at again
    /// as it is now: an entry goes only if its file has `replication` live holders and a live
    /// primary; one with enough holders for the live servers but not for the replication
    /// factor is parked until a server joins; one that changed since it was planned is due at
    /// once.
    pub fn settle_repairs(
        &self,
        outcomes: &[(NodeId, Option<NodeMeta>, Settle)],
        live: &[ServerId],
    ) -> ServiceResult<()> {
        let want = usize::try_from(self.replication()).unwrap_or(usize::MAX);
        let now = crate::store::now_ms();
        for part in outcomes.chunks(chunk(&self.store, 4)) {
            self.store.write_lazy(|tx| {
                for (id, planned, settle) in part {
                    let current = match tx.get(NODES, &id.0)? {
                        Some(v) => decode::<NodeMeta>(&v)?,
                        None => {
                            dequeue(tx, *id)?;
                            continue;
                        }
                    };
                    if current.kind != FileKind::File {
                        dequeue(tx, *id)?;
                        continue;
                    }
                    let changed = planned.as_ref().is_none_or(|p| {
                        p.hash != current.hash
                            || p.holders != current.holders
                            || p.primary != current.primary
                            || p.replicas != current.replicas
                    });
                    match super::repair::plan(&current, live, self.replication()) {
                        super::repair::Repair::None => {
                            let live_holders =
                                current.holders.iter().filter(|h| live.contains(h)).count();
                            if live_holders >= want {
                                dequeue(tx, *id)?;
                            } else {
                                set_due(tx, *id, PARKED)?;
                            }
                        }
                        _ if changed => set_due(tx, *id, now)?,
                        _ => match settle {
                            Settle::Check => set_due(tx, *id, now)?,
                            Settle::RetryAt(t) => set_due(tx, *id, *t)?,
                        },
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Compares the servers' liveness (`(server, alive, heard since this directory started)`)
    /// with the states the last pass recorded, and queues the files of every server that died
    /// or returned since, through the holdings index; a server that joins or returns also
    /// unparks the parked entries. A server is taken as returned only on a heartbeat heard in
    /// this run (not while it is presumed alive after a restart of the directory). Returns
    /// (deaths, returns and joins).
    pub fn note_servers(
        &self,
        servers: &[(ServerId, bool, bool)],
    ) -> ServiceResult<(usize, usize)> {
        self.note_servers_between(servers, &mut |_| {})
    }

    /// [`Self::note_servers`], calling `between` after each transaction that queues or
    /// unparks (tests: a change of a file lands in between).
    pub(super) fn note_servers_between(
        &self,
        servers: &[(ServerId, bool, bool)],
        between: &mut dyn FnMut(ServerId),
    ) -> ServiceResult<(usize, usize)> {
        let now = crate::store::now_ms();
        let per = chunk(&self.store, 3);
        // The work of an earlier pass cut short (a crash, a failed write) first.
        let pending: Vec<ServerId> = self.store.read(|tx| {
            Ok(tx
                .range(
                    META,
                    Some(&NOTED_FROM.to_owned()),
                    Some(&NOTED_END.to_owned()),
                    None,
                )?
                .into_iter()
                .filter_map(|(k, _)| k.strip_prefix(NOTED_FROM)?.parse().ok())
                .map(ServerId)
                .collect())
        })?;
        for server in pending {
            tracing::info!(%server, "repair: carrying on with a server's change an earlier pass began");
            self.queue_noted(server, now, per, between)?;
        }
        let seen: std::collections::HashMap<ServerId, bool> =
            self.store.read(seen)?.into_iter().collect();
        let (mut died, mut came) = (0, 0);
        for &(server, alive, heard) in servers {
            let change = match (seen.get(&server).copied(), alive) {
                (Some(true), false) | (None, false) => Some(false),
                (Some(false), true) if heard => Some(true),
                (None, true) => Some(true),
                _ => None,
            };
            let Some(live) = change else { continue };
            // The state first, with the point its files are queued from, in one transaction:
            // from then on every change of one of its files judges the file by the server's
            // new state (a copy recorded meanwhile cannot take out an entry on the word of a
            // dead holder), and a crash before the files are all queued leaves the point, from
            // which the next pass carries on. A server seen for the first time, alive, holds
            // only what it was given since it registered, which the transactions that gave it
            // queued as needed: nothing of its own to queue, only the parked entries.
            let joined = live && !seen.contains_key(&server);
            let start = if joined { HELD_DONE } else { 0 };
            self.store.write(|tx| {
                set_seen(tx, server, live)?;
                meta_put(tx, &noted_key(server), start)
            })?;
            self.queue_noted(server, now, per, between)?;
            if live {
                came += 1;
                tracing::info!(%server, "repair: server live; its files and the parked ones queued");
            } else {
                died += 1;
                tracing::warn!(%server, "repair: server dead; its files queued");
            }
        }
        Ok((died, came))
    }

    /// Queues the files of `server`, whose change is recorded, from its point in `dir_meta`
    /// on, a chunk per transaction that also moves the point on; then, for a live server,
    /// unparks the parked entries; then removes the point. Idempotent.
    fn queue_noted(
        &self,
        server: ServerId,
        now: u64,
        per: usize,
        between: &mut dyn FnMut(ServerId),
    ) -> ServiceResult<()> {
        let key = noted_key(server);
        loop {
            let done = self.store.write(|tx| {
                let Some(from) = meta_get(tx, &key)? else {
                    return Ok(true);
                };
                if from != HELD_DONE {
                    let next = enqueue_held(tx, server, from, now, per)?;
                    meta_put(tx, &key, next.unwrap_or(HELD_DONE))?;
                    return Ok(false);
                }
                if tx.get(SEEN, &server.0)?.unwrap_or(false) && unpark(tx, now, per)? {
                    return Ok(false);
                }
                tx.delete(META, &key)?;
                Ok(true)
            })?;
            if done {
                return Ok(());
            }
            between(server);
        }
    }

    /// Entries in the repair queue (parked ones included): a read of the whole queue, for
    /// tests and benchmarks.
    pub fn repair_queue_len(&self) -> ServiceResult<u64> {
        self.store.read(|tx| Ok(tx.all(QUEUE)?.len() as u64))
    }
}

/// Whether everything this module keeps matches a scan of the nodes (tests).
#[cfg(test)]
pub(super) fn check_against_scan(svc: &DirectoryService) -> Result<(), String> {
    let run = |tx: &Txn| -> ServiceResult<Result<(), String>> {
        let (mut nodes, mut bytes) = (0u64, 0u64);
        let mut holdings = BTreeSet::new();
        let mut placed: std::collections::HashMap<ServerId, (u64, u64)> = Default::default();
        for (_, v) in tx.all(NODES)? {
            let m: NodeMeta = decode(&v)?;
            nodes += 1;
            if m.kind == FileKind::File {
                bytes += m.size;
                for s in servers_of(Some(&m)) {
                    holdings.insert((s, m.id.0));
                }
                if let Some(p) = m.primary {
                    placed.entry(p).or_default().0 += 1;
                }
                for r in &m.replicas {
                    placed.entry(*r).or_default().1 += 1;
                }
            }
        }
        let kept: BTreeSet<(u64, u64)> = tx.all(HOLDINGS)?.into_iter().map(|(k, ())| k).collect();
        let counted = counters::totals(tx)?;
        let counts = placement_counts(tx)?;
        let mut queue: Vec<(u64, u64)> = tx.all(QUEUE)?.into_iter().map(|(k, v)| (v, k)).collect();
        queue.sort();
        let by_due: Vec<(u64, u64)> = tx.all(QUEUE_DUE)?.into_iter().map(|(k, ())| k).collect();
        Ok(if counted != (nodes, bytes) {
            Err(format!("counters {counted:?}, scan {:?}", (nodes, bytes)))
        } else if kept != holdings {
            Err(format!("holdings {kept:?}, scan {holdings:?}"))
        } else if counts != placed {
            Err(format!("placement counters {counts:?}, scan {placed:?}"))
        } else if queue != by_due {
            Err(format!("queue {queue:?}, its order {by_due:?}"))
        } else {
            Ok(())
        })
    };
    svc.store.read(run).map_err(|e| e.to_string())?
}

/// The tests below, once per engine (as the directory's suite, `tests.rs`).
#[cfg(test)]
macro_rules! conformance_of_replicas {
    () => {
        mod on_redb {
            fn open_raw(
                dir: &std::path::Path,
            ) -> crate::error::ServiceResult<crate::directory::DirectoryService> {
                crate::directory::DirectoryService::open(
                    dir,
                    crate::directory::DirectoryConfig::default(),
                )
            }
            fn open_with(
                dir: &std::path::Path,
                config: crate::directory::DirectoryConfig,
            ) -> crate::error::ServiceResult<crate::directory::DirectoryService> {
                crate::directory::DirectoryService::open(dir, config)
            }
            crate::directory::replicas::replicas_tests!();
        }
        mod on_etcd {
            fn open_raw(
                dir: &std::path::Path,
            ) -> crate::error::ServiceResult<crate::directory::DirectoryService> {
                crate::directory::tests::open_on_etcd(dir)
            }
            fn open_with(
                dir: &std::path::Path,
                config: crate::directory::DirectoryConfig,
            ) -> crate::error::ServiceResult<crate::directory::DirectoryService> {
                crate::directory::tests::open_on_etcd_with(dir, config)
            }
            crate::directory::replicas::replicas_tests!();
        }
    };
}

#[cfg(test)]
macro_rules! replicas_tests {
    () => {
        use std::time::Duration;

        use common::api::{CommitRequest, CreateRequest, RegisterServerRequest};
        use common::{Caller, ContentHash, FenceToken, UploadId, ValidName};

        use crate::directory::repair::{self, InFlight, RepairConfig};
        use crate::directory::replicas::*;
        use crate::directory::replicas::{HOLDINGS, PLACED, QUEUE, QUEUE_DUE, REPLICATION, SEEN};
        use crate::directory::{DirectoryService, META};

        /// Registers a server at a closed port (a copy to or from it fails at once).
        fn register_closed(svc: &DirectoryService) -> ServerId {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let url = format!("http://{}", l.local_addr().expect("addr"));
            drop(l);
            svc.register_server(&RegisterServerRequest {
                url,
                capacity_bytes: 1 << 30,
                previous_id: None,
                cluster_id: None,
            })
            .expect("register")
        }

        fn open(dir: &std::path::Path) -> DirectoryService {
            let svc = open_raw(dir).expect("open");
            for _ in 0..3 {
                register_closed(&svc);
            }
            svc
        }

        fn mk(svc: &DirectoryService, name: &str, kind: FileKind) -> NodeMeta {
            let req = CreateRequest {
                name: ValidName::parse(name).expect("name"),
                kind,
                mode: 0o644,
                symlink_target: None,
                rdev: 0,
            };
            svc.create(NodeId::ROOT, &req, &Caller::cluster())
                .expect("create")
        }

        /// Commits a new version of `f` (at `version`) held by `holders`.
        fn commit(svc: &DirectoryService, f: &NodeMeta, version: u64, holders: &[ServerId]) {
            let tag = u8::try_from(version + 1).expect("small");
            svc.commit(
                f.id,
                &CommitRequest {
                    hash: ContentHash::from_digest(&[tag; 32]),
                    size: 100 + version,
                    fence: FenceToken(version + 1),
                    upload_id: UploadId::from_bytes([tag; 16]),
                    base: common::api::PushBase {
                        version,
                        waiting: true,
                    },
                    holders: holders.to_vec(),
                    writer: "t".into(),
                    writer_id: None,
                    primary: f.primary,
                    replicas: Some(f.replicas.clone()),
                    mode: None,
                    mtime_ns: None,
                    origin: None,
                },
            )
            .expect("commit");
        }

        fn queue(svc: &DirectoryService) -> u64 {
            svc.repair_queue_len().expect("queue")
        }

        #[test]
        fn a_version_held_by_fewer_servers_than_wanted_is_queued_until_its_late_copy() {
            let dir = tempfile::tempdir().expect("tempdir");
            let svc = open(dir.path());
            let f = mk(&svc, "f", FileKind::File);
            assert_eq!(queue(&svc), 0, "a new file is held by all its members");
            let p = f.primary.expect("primary");
            commit(&svc, &f, 0, &[p, f.replicas[0]]);
            assert_eq!(queue(&svc), 1);
            let cur = svc.get(f.id).expect("f");
            svc.add_holder(f.id, &cur.hash, f.replicas[1])
                .expect("late copy");
            assert_eq!(queue(&svc), 0, "the late copy satisfies it");
            // A scrub drops a corrupt copy: queued again.
            svc.drop_holder(f.id, &cur.hash, p).expect("drop");
            assert_eq!(queue(&svc), 1);
            // The file goes: so does its entry.
            svc.remove(
                NodeId::ROOT,
                &ValidName::parse("f").expect("name"),
                false,
                &Caller::cluster().id,
            )
            .expect("remove");
            assert_eq!(queue(&svc), 0);
            check_against_scan(&svc).expect("consistent");
        }

        #[test]
        fn statfs_and_placement_counts_come_from_counters_kept_with_every_change() {
            let dir = tempfile::tempdir().expect("tempdir");
            let svc = open(dir.path());
            let before = svc.statfs().expect("statfs");
            let f = mk(&svc, "f", FileKind::File);
            mk(&svc, "d", FileKind::Dir);
            commit(&svc, &f, 0, &[f.primary.expect("p"), f.replicas[0]]);
            let after = svc.statfs().expect("statfs");
            assert_eq!(
                (after.nodes, after.bytes),
                (before.nodes + 2, before.bytes + 100)
            );
            let counts = svc.placement_counts();
            assert_eq!(counts.get(&f.primary.expect("p")).map(|c| c.0), Some(1));
            assert_eq!(counts.values().map(|c| c.0 + c.1).sum::<u64>(), 3);
            check_against_scan(&svc).expect("consistent");
        }

        /// Rewrites the store as format 3 left it: none of this module's tables or keys.
        fn as_format_3(svc: &DirectoryService) {
            // A transaction per table: etcd deletes a table row by row.
            let w = |f: &(dyn Fn(&crate::meta::Txn) -> crate::error::ServiceResult<()> + Sync)| {
                svc.store.write(|tx| f(tx)).expect("rewrite");
            };
            w(&|tx| tx.drop_table(HOLDINGS));
            w(&|tx| tx.drop_table(QUEUE_DUE));
            w(&|tx| tx.drop_table(QUEUE));
            w(&|tx| tx.drop_table(PLACED));
            w(&|tx| tx.drop_table(SEEN));
            w(&|tx| {
                for k in 0..counters::SHARDS {
                    tx.delete(META, &format!("nodes.{k}"))?;
                    tx.delete(META, &format!("bytes.{k}"))?;
                }
                tx.delete(META, &REPLICATION.to_owned())?;
                tx.put(META, &crate::directory::FORMAT.to_owned(), &3)
            });
        }

        #[test]
        fn a_format_3_store_gets_its_queue_index_and_counters_once_at_open() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (short, full, stat) = {
                let svc = open(dir.path());
                mk(&svc, "d", FileKind::Dir);
                // More nodes than one chunk of the upgrade holds on etcd.
                for i in 0..20 {
                    mk(&svc, &format!("whole{i}"), FileKind::File);
                }
                let short = mk(&svc, "short", FileKind::File);
                let full = mk(&svc, "full", FileKind::File);
                commit(
                    &svc,
                    &short,
                    0,
                    &[short.primary.expect("p"), short.replicas[0]],
                );
                let mut all = vec![full.primary.expect("p")];
                all.extend(&full.replicas);
                commit(&svc, &full, 0, &all);
                let stat = svc.statfs().expect("statfs");
                as_format_3(&svc);
                (short, full, stat)
            };
            let state = || {
                let svc = open_raw(dir.path()).expect("open");
                check_against_scan(&svc).expect("rebuilt consistently");
                let format = svc
                    .store
                    .read(|tx| tx.get(META, &crate::directory::FORMAT.to_owned()))
                    .expect("format");
                let s = svc.statfs().expect("statfs");
                let due: Vec<NodeId> = svc
                    .repair_batch(10)
                    .expect("batch")
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect();
                (format, s.nodes, s.bytes, due, svc.placement_counts())
            };
            let first = state();
            assert_eq!(first.0, Some(FORMAT));
            assert_eq!((first.1, first.2), (stat.nodes, stat.bytes));
            assert_eq!(first.3, vec![short.id], "only the short file is queued");
            assert!(!first.3.contains(&full.id));
            assert_eq!(first.4.values().map(|c| c.0).sum::<u64>(), 22);
            assert_eq!(state(), first, "reopening changes nothing");
        }

        #[test]
        fn a_raised_replication_factor_queues_the_files_short_of_it_once() {
            let dir = tempfile::tempdir().expect("tempdir");
            let files: Vec<NodeId> = {
                let svc = open(dir.path());
                // More files than one chunk of the rescan holds on etcd, each held by all three.
                (0..40)
                    .map(|i| mk(&svc, &format!("f{i}"), FileKind::File).id)
                    .collect()
            };
            assert_eq!(
                queue(&open_raw(dir.path()).expect("reopen")),
                0,
                "three copies: as wanted"
            );
            let four = crate::directory::DirectoryConfig {
                replication: 4,
                ..Default::default()
            };
            let svc = open_with(dir.path(), four.clone()).expect("open");
            assert_eq!(queue(&svc), 40, "every file is short of a fourth copy");
            let mut due: Vec<NodeId> = svc
                .repair_batch(100)
                .expect("batch")
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            due.sort();
            assert_eq!(due, files);
            check_against_scan(&svc).expect("consistent");
            // Settled (parked: three live servers for four copies), then reopened at the same
            // factor: no second scan queues them again.
            let outcomes: Vec<_> = svc
                .repair_batch(100)
                .expect("batch")
                .into_iter()
                .map(|(id, m)| (id, m, Settle::Check))
                .collect();
            svc.settle_repairs(&outcomes, &svc.registry.live())
                .expect("settle");
            assert!(svc.repair_batch(100).expect("batch").is_empty(), "parked");
            drop(svc);
            let svc = open_with(dir.path(), four).expect("reopen");
            assert!(
                svc.repair_batch(100).expect("batch").is_empty(),
                "no rescan"
            );
            assert_eq!(queue(&svc), 40);
        }

        #[test]
        fn regression_servers_a_pass_sees_first_queue_none_of_their_files() {
            let dir = tempfile::tempdir().expect("tempdir");
            let svc = std::sync::Arc::new(open(dir.path()));
            for i in 0..5 {
                mk(&svc, &format!("f{i}"), FileKind::File);
            }
            // The first pass meets every server: the files they were given are whole, and not
            // queued (a pass would only take them out again, at a cost growing with the files).
            let servers: Vec<(ServerId, bool, bool)> = svc
                .registry
                .live()
                .into_iter()
                .map(|s| (s, true, true))
                .collect();
            assert_eq!(servers.len(), 3);
            assert_eq!(svc.note_servers(&servers).expect("note"), (0, 3));
            assert_eq!(queue(&svc), 0);
        }

        /// Regression: a server's death was recorded after its files were queued; a copy
        /// recorded in between counted the dying server as live and took the file's entry out:
        /// the file was left with two live copies and no entry, for good.
        #[test]
        fn regression_a_copy_recorded_while_a_deaths_files_are_queued_keeps_the_entry() {
            let dir = tempfile::tempdir().expect("tempdir");
            let svc = open(dir.path());
            register_closed(&svc);
            let f = mk(&svc, "f", FileKind::File);
            let p = f.primary.expect("primary");
            let s = f.replicas[0];
            let all = svc.registry.live();
            assert_eq!(all.len(), 4);
            let a = *all
                .iter()
                .find(|x| Some(**x) != f.primary && !f.replicas.contains(x))
                .expect("a server outside the placement");
            // Every server is known live; the file is held by P and S (a repair copy to A is
            // under way).
            let servers: Vec<(ServerId, bool, bool)> =
                all.iter().map(|s| (*s, true, true)).collect();
            svc.note_servers(&servers).expect("note");
            commit(&svc, &f, 0, &[p, s]);
            assert_eq!(queue(&svc), 1);
            let hash = svc.get(f.id).expect("f").hash;
            // S dies; while its files are queued, the copy to A is recorded.
            let mut copied = false;
            let noted = svc
                .note_servers_between(&[(s, false, true)], &mut |_| {
                    if !copied {
                        copied = true;
                        svc.add_holder(f.id, &hash, a).expect("copy recorded");
                    }
                })
                .expect("note");
            assert_eq!(noted, (1, 0));
            assert!(copied);
            let now = svc.get(f.id).expect("f");
            assert_eq!(now.holders.len(), 3, "{now:?}");
            assert_eq!(queue(&svc), 1, "two live copies: still queued");
            assert_eq!(
                svc.repair_batch(10)
                    .expect("batch")
                    .first()
                    .map(|(id, _)| *id),
                Some(f.id)
            );
            assert_eq!(
                svc.store
                    .read(|tx| Ok(tx
                        .range(
                            META,
                            Some(&"noted_from/".to_owned()),
                            Some(&"noted_from0".to_owned()),
                            None
                        )?
                        .len()))
                    .expect("read"),
                0,
                "no point left"
            );
            check_against_scan(&svc).expect("consistent");
        }

        /// A death recorded by a pass cut short before its files were queued (its point left
        /// in `dir_meta`) is carried on by the next pass.
        #[test]
        fn a_deaths_queueing_cut_short_is_carried_on_by_the_next_pass() {
            let dir = tempfile::tempdir().expect("tempdir");
            let svc = open(dir.path());
            let f = mk(&svc, "f", FileKind::File);
            let s = f.replicas[0];
            let live: Vec<(ServerId, bool, bool)> = svc
                .registry
                .live()
                .into_iter()
                .map(|s| (s, true, true))
                .collect();
            svc.note_servers(&live).expect("note");
            assert_eq!(queue(&svc), 0);
            // What the first transaction of S's death writes, and no more.
            svc.store
                .write(|tx| {
                    set_seen(tx, s, false)?;
                    tx.put(META, &format!("noted_from/{}", s.0), &0)
                })
                .expect("write");
            assert_eq!(queue(&svc), 0);
            // The next pass sees S dead as recorded (no change of its own to act on) and
            // carries the queueing on.
            let dead: Vec<(ServerId, bool, bool)> =
                live.iter().map(|&(x, _, h)| (x, x != s, h)).collect();
            assert_eq!(svc.note_servers(&dead).expect("note"), (0, 0));
            assert_eq!(queue(&svc), 1, "S's file queued");
            assert!(
                svc.store
                    .read(|tx| tx.get(META, &format!("noted_from/{}", s.0)))
                    .expect("read")
                    .is_none()
            );
        }

        /// Regression: a pass whose view shows every server dead (more likely a stale view
        /// than a cluster gone) recorded every server's death and parked every entry it took,
        /// with nothing to copy from anyway. It must do nothing at all.
        #[tokio::test(start_paused = true)]
        async fn regression_a_pass_that_sees_no_live_server_records_and_settles_nothing() {
            let dir = tempfile::tempdir().expect("tempdir");
            let svc = std::sync::Arc::new(open(dir.path()));
            let f = mk(&svc, "f", FileKind::File);
            let all: Vec<(ServerId, bool, bool)> = svc
                .registry
                .live()
                .into_iter()
                .map(|s| (s, true, true))
                .collect();
            svc.note_servers(&all).expect("note");
            // Held by two of three: queued, due now.
            commit(&svc, &f, 0, &[f.primary.expect("primary"), f.replicas[0]]);
            let due = || -> Vec<NodeId> {
                svc.repair_batch(10)
                    .expect("batch")
                    .into_iter()
                    .map(|(id, _)| id)
                    .collect()
            };
            assert_eq!(due(), vec![f.id]);
            let before = svc.store.read(|tx| tx.all(QUEUE_DUE)).expect("read");
            // No heartbeat for longer than the dead-after period: every server looks dead.
            tokio::time::advance(Duration::from_secs(7)).await;
            assert!(svc.registry.live().is_empty());
            let peer = crate::peer::Peer::new("key").expect("peer");
            let (cfg, inflight) = (RepairConfig::default(), InFlight::default());
            assert_eq!(repair::pass(&svc, &peer, &cfg, &inflight).await, (0, 0));
            let seen = svc.store.read(seen).expect("seen");
            assert_eq!(seen.len(), 3);
            assert!(
                seen.iter().all(|(_, live)| *live),
                "deaths recorded from an empty view: {seen:?}"
            );
            assert_eq!(
                svc.store.read(|tx| tx.all(QUEUE_DUE)).expect("read"),
                before,
                "the queue changed"
            );
            assert_eq!(due(), vec![f.id], "the entry was settled or parked");
            check_against_scan(&svc).expect("consistent");
        }

        #[tokio::test(start_paused = true)]
        async fn a_dead_servers_files_are_queued_through_its_holdings_and_settled() {
            let dir = tempfile::tempdir().expect("tempdir");
            let svc = std::sync::Arc::new(open(dir.path()));
            let f = mk(&svc, "f", FileKind::File);
            let p = f.primary.expect("primary");
            let mut all = vec![p];
            all.extend(&f.replicas);
            commit(&svc, &f, 0, &all);
            let peer = crate::peer::Peer::new("key").expect("peer");
            let cfg = RepairConfig::default();
            let inflight = InFlight::default();
            assert_eq!(repair::pass(&svc, &peer, &cfg, &inflight).await, (0, 0));
            assert_eq!(queue(&svc), 0, "nothing to do");
            // The primary stops beating; the others go on.
            tokio::time::advance(Duration::from_secs(7)).await;
            for r in &f.replicas {
                svc.registry.heartbeat(*r, None).expect("beat");
            }
            let (promoted, started) = repair::pass(&svc, &peer, &cfg, &inflight).await;
            assert_eq!(
                (promoted, started),
                (1, 0),
                "failed over, found through the index"
            );
            let now = svc.get(f.id).expect("f");
            assert_ne!(now.primary, Some(p));
            // Two live servers hold it: all there are; the entry waits for a third.
            assert_eq!(queue(&svc), 1);
            assert!(svc.repair_batch(10).expect("batch").is_empty(), "parked");
            // The old primary returns: its files and the parked ones are served, and settled.
            svc.registry.heartbeat(p, None).expect("beat");
            for r in &f.replicas {
                svc.registry.heartbeat(*r, None).expect("beat");
            }
            repair::pass(&svc, &peer, &cfg, &inflight).await;
            assert_eq!(queue(&svc), 0, "three live holders: satisfied");
            check_against_scan(&svc).expect("consistent");
        }

        /// Regression (review 2): after a restart of the directory, a long-dead server,
        /// presumed alive through the start-up grace, counted as a live holder: a pass took its
        /// files' entries out of the queue, and when the grace ended its death was already
        /// recorded, so nothing queued them again: under-replicated for good.
        #[tokio::test(start_paused = true)]
        async fn regression_a_server_presumed_alive_after_a_restart_is_no_live_holder() {
            let dir = tempfile::tempdir().expect("tempdir");
            let f = {
                let svc = open(dir.path());
                // A fourth server, outside f's placement (somewhere to copy to).
                register_closed(&svc);
                let f = mk(&svc, "f", FileKind::File);
                // Content (not empty, which a pass records copied at once), held by all three.
                let mut members = vec![f.primary.expect("primary")];
                members.extend(&f.replicas);
                commit(&svc, &f, 0, &members);
                let all: Vec<(ServerId, bool, bool)> = svc
                    .registry
                    .live()
                    .into_iter()
                    .map(|s| (s, true, true))
                    .collect();
                svc.note_servers(&all).expect("note");
                // A replica of f dies: its death recorded, f queued.
                let x = f.replicas[0];
                svc.note_servers(&[(x, false, true)]).expect("note");
                assert_eq!(queue(&svc), 1);
                f
            };
            let x = f.replicas[0];
            // The directory restarts: every server presumed alive, unheard; all but x beat.
            let svc = std::sync::Arc::new(open_raw(dir.path()).expect("reopen"));
            tokio::time::advance(Duration::from_secs(2)).await;
            for s in svc.registry.live() {
                if s != x {
                    svc.heartbeat(s, None).expect("beat");
                }
            }
            assert!(svc.registry.live().contains(&x), "x inside the grace");
            let peer = crate::peer::Peer::new("key").expect("peer");
            let (cfg, inflight) = (RepairConfig::default(), InFlight::default());
            repair::pass(&svc, &peer, &cfg, &inflight).await;
            assert_eq!(
                queue(&svc),
                1,
                "f left the queue on the word of a dead holder"
            );
            // Past the grace x is dead (recorded already): f is still queued.
            tokio::time::advance(Duration::from_secs(5)).await;
            for s in svc.registry.live() {
                svc.heartbeat(s, None).expect("beat");
            }
            assert!(!svc.registry.live().contains(&x));
            repair::pass(&svc, &peer, &cfg, &inflight).await;
            assert_eq!(queue(&svc), 1);
            check_against_scan(&svc).expect("consistent");
        }
    };
}

#[cfg(test)]
use conformance_of_replicas;
#[cfg(test)]
use replicas_tests;

#[cfg(test)]
mod tests {
    crate::directory::replicas::conformance_of_replicas! {}
}
