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
//!   is acted upon once, and deaths are remembered across restarts of the directory.
//! - **Placement counters** (`placed`, `(server, shard)` → (primaries, replicas)), sharded by
//!   node id like the `statfs` counters (`counters.rs`).
//!
//! Every function here takes the transaction it works in; none opens one, so that the
//! storage seam can carry them to another engine unchanged in meaning.

use std::collections::BTreeSet;

use common::{FileKind, NodeId, NodeMeta, ServerId};
use redb::{ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{DirectoryService, META, NODES, counters};
use crate::error::ServiceResult;
use crate::store::decode;

/// The store format that has the queue, the holdings index and the counters.
pub const FORMAT: u64 = 4;

const HOLDINGS: TableDefinition<(u64, u64), ()> = TableDefinition::new("holdings");
const QUEUE: TableDefinition<u64, u64> = TableDefinition::new("repair_queue");
const QUEUE_DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("repair_due");
const PLACED: TableDefinition<(u64, u64), (u64, u64)> = TableDefinition::new("placed");
const SEEN: TableDefinition<u64, bool> = TableDefinition::new("server_seen");
/// The replication factor the queue was kept for (`dir_meta`).
const REPLICATION: &str = "replication";

/// Due time of a parked entry: served only after a server joins or returns.
pub const PARKED: u64 = u64::MAX;

/// Entries re-dated per transaction when many are (a dead server's files, unparking).
const CHUNK: usize = 10_000;

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
    tx: &WriteTransaction,
    server: ServerId,
    shard: u64,
    primaries: i64,
    replicas: i64,
) -> ServiceResult<()> {
    let mut t = tx.open_table(PLACED)?;
    let (p, r) = t.get((server.0, shard))?.map_or((0, 0), |v| v.value());
    let p = p.saturating_add_signed(primaries);
    let r = r.saturating_add_signed(replicas);
    if (p, r) == (0, 0) {
        t.remove((server.0, shard))?;
    } else {
        t.insert((server.0, shard), (p, r))?;
    }
    Ok(())
}

fn replication(tx: &WriteTransaction) -> ServiceResult<usize> {
    let r = tx
        .open_table(META)?
        .get(REPLICATION)?
        .map_or(3, |v| v.value());
    Ok(usize::try_from(r).unwrap_or(usize::MAX))
}

/// Whether server `s` was found dead by the last repair pass.
fn dead(tx: &WriteTransaction, s: ServerId) -> ServiceResult<bool> {
    Ok(tx.open_table(SEEN)?.get(s.0)?.is_some_and(|v| !v.value()))
}

/// Whether file `m` has, as far as the store knows, a live primary and `want` live holders.
fn satisfied(tx: &WriteTransaction, m: &NodeMeta, want: usize) -> ServiceResult<bool> {
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
pub(super) fn enqueue(tx: &WriteTransaction, node: NodeId, due: u64) -> ServiceResult<()> {
    let mut q = tx.open_table(QUEUE)?;
    let old = q.get(node.0)?.map(|v| v.value());
    match old {
        Some(o) if o <= due => return Ok(()),
        Some(o) => {
            tx.open_table(QUEUE_DUE)?.remove((o, node.0))?;
        }
        None => {}
    }
    q.insert(node.0, due)?;
    tx.open_table(QUEUE_DUE)?.insert((due, node.0), ())?;
    Ok(())
}

/// Sets the due time of `node`'s entry (queued if it was not).
pub(super) fn set_due(tx: &WriteTransaction, node: NodeId, due: u64) -> ServiceResult<()> {
    dequeue(tx, node)?;
    tx.open_table(QUEUE)?.insert(node.0, due)?;
    tx.open_table(QUEUE_DUE)?.insert((due, node.0), ())?;
    Ok(())
}

/// Removes `node`'s entry, if any.
pub(super) fn dequeue(tx: &WriteTransaction, node: NodeId) -> ServiceResult<()> {
    let old = tx.open_table(QUEUE)?.remove(node.0)?.map(|v| v.value());
    if let Some(o) = old {
        tx.open_table(QUEUE_DUE)?.remove((o, node.0))?;
    }
    Ok(())
}

/// The hook every change of a node calls, in the transaction that makes it: `before` and
/// `after` are the node's records (`None`: absent). Keeps the statfs counters, the holdings
/// index, the placement counters and the queue.
pub(super) fn node_changed(
    tx: &WriteTransaction,
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
    if was != is {
        let mut h = tx.open_table(HOLDINGS)?;
        for s in was.difference(&is) {
            h.remove((*s, id.0))?;
        }
        for s in is.difference(&was) {
            h.insert((*s, id.0), ())?;
        }
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
            if satisfied(tx, m, replication(tx)?)? {
                dequeue(tx, id)
            } else {
                enqueue(tx, id, crate::store::now_ms())
            }
        }
        _ => dequeue(tx, id),
    }
}

/// Up to `limit` queued nodes due at `now_ms`, earliest first.
pub(super) fn due(tx: &ReadTransaction, now_ms: u64, limit: usize) -> ServiceResult<Vec<NodeId>> {
    let t = tx.open_table(QUEUE_DUE)?;
    let mut out = Vec::new();
    for row in t.range((0, 0)..=(now_ms.min(PARKED - 1), u64::MAX))? {
        if out.len() >= limit {
            break;
        }
        out.push(NodeId(row?.0.value().1));
    }
    Ok(out)
}

/// Number of queued entries (all, parked included).
pub(super) fn queued(tx: &ReadTransaction) -> ServiceResult<u64> {
    use redb::ReadableTableMetadata;
    Ok(tx.open_table(QUEUE)?.len()?)
}

/// Per server (primaries, replicas) from the placement counters.
pub(super) fn placement_counts(
    tx: &ReadTransaction,
) -> ServiceResult<std::collections::HashMap<ServerId, (u64, u64)>> {
    let mut out = std::collections::HashMap::new();
    for row in tx.open_table(PLACED)?.iter()? {
        let (k, v) = row?;
        let (p, r) = v.value();
        let e: &mut (u64, u64) = out.entry(ServerId(k.value().0)).or_default();
        e.0 = e.0.saturating_add(p);
        e.1 = e.1.saturating_add(r);
    }
    Ok(out)
}

/// Server states as of the last pass: (server, live).
pub(super) fn seen(tx: &ReadTransaction) -> ServiceResult<Vec<(ServerId, bool)>> {
    let mut out = Vec::new();
    for row in tx.open_table(SEEN)?.iter()? {
        let (k, v) = row?;
        out.push((ServerId(k.value()), v.value()));
    }
    Ok(out)
}

/// Queues (due now) up to [`CHUNK`] files held by or placed on `server`, from node `from` on.
/// Returns the node to continue from, if there are more.
pub(super) fn enqueue_held(
    tx: &WriteTransaction,
    server: ServerId,
    from: u64,
    now_ms: u64,
) -> ServiceResult<Option<u64>> {
    let nodes: Vec<u64> = {
        let h = tx.open_table(HOLDINGS)?;
        let mut v = Vec::new();
        for row in h.range((server.0, from)..=(server.0, u64::MAX))? {
            v.push(row?.0.value().1);
            if v.len() > CHUNK {
                break;
            }
        }
        v
    };
    let more = (nodes.len() > CHUNK).then(|| nodes[CHUNK]);
    for n in nodes.into_iter().take(CHUNK) {
        enqueue(tx, NodeId(n), now_ms)?;
    }
    Ok(more)
}

/// Makes up to [`CHUNK`] parked entries due now. Returns whether any are left.
pub(super) fn unpark(tx: &WriteTransaction, now_ms: u64) -> ServiceResult<bool> {
    let nodes: Vec<u64> = {
        let t = tx.open_table(QUEUE_DUE)?;
        let mut v = Vec::new();
        for row in t.range((PARKED, 0)..=(PARKED, u64::MAX))? {
            v.push(row?.0.value().1);
            if v.len() > CHUNK {
                break;
            }
        }
        v
    };
    let more = nodes.len() > CHUNK;
    for n in nodes.into_iter().take(CHUNK) {
        set_due(tx, NodeId(n), now_ms)?;
    }
    Ok(more)
}

/// Records that `server` is live (`true`) or dead as of this pass.
pub(super) fn set_seen(tx: &WriteTransaction, server: ServerId, live: bool) -> ServiceResult<()> {
    tx.open_table(SEEN)?.insert(server.0, live)?;
    Ok(())
}

/// At open: builds the queue, the holdings index and the counters of a store from before
/// them (format < [`FORMAT`]), once, in `tx`; and queues the files short of a replication
/// factor raised since the last start. `fresh`: a store just made (nothing to log).
pub(super) fn open(tx: &WriteTransaction, replication: u32, fresh: bool) -> ServiceResult<()> {
    let format = tx
        .open_table(META)?
        .get(super::FORMAT)?
        .map_or(1, |v| v.value());
    let stored = tx.open_table(META)?.get(REPLICATION)?.map(|v| v.value());
    tx.open_table(META)?
        .insert(REPLICATION, u64::from(replication))?;
    if format < FORMAT {
        let (nodes, files, queued) = rebuild(tx)?;
        tx.open_table(META)?.insert(super::FORMAT, FORMAT)?;
        if !fresh {
            tracing::info!(
                from = format,
                to = FORMAT,
                nodes,
                files,
                queued,
                "directory store upgrade: repair queue, holdings index and counters built"
            );
        }
    } else if stored.is_some_and(|s| s < u64::from(replication)) {
        // More copies wanted than the queue was kept for: files with enough before may not
        // have now. Once per change of the setting, a scan.
        let want = usize::try_from(replication).unwrap_or(usize::MAX);
        let mut short = Vec::new();
        for row in tx.open_table(NODES)?.iter()? {
            let (_, v) = row?;
            let m: NodeMeta = decode(v.value())?;
            if m.kind == FileKind::File {
                short.push(m);
            }
        }
        let now = crate::store::now_ms();
        let mut queued = 0u64;
        for m in short {
            if !satisfied(tx, &m, want)? {
                enqueue(tx, m.id, now)?;
                queued += 1;
            }
        }
        tracing::info!(
            from = stored,
            to = replication,
            queued,
            "replication factor raised: files short of it queued for repair"
        );
    }
    // Readers find every table, even one nothing was written to yet.
    tx.open_table(HOLDINGS)?;
    tx.open_table(QUEUE)?;
    tx.open_table(QUEUE_DUE)?;
    tx.open_table(PLACED)?;
    tx.open_table(SEEN)?;
    Ok(())
}

/// Builds everything this module keeps from the nodes. Returns (nodes, files, files queued).
fn rebuild(tx: &WriteTransaction) -> ServiceResult<(u64, u64, u64)> {
    tx.delete_table(HOLDINGS)?;
    tx.delete_table(QUEUE)?;
    tx.delete_table(QUEUE_DUE)?;
    tx.delete_table(PLACED)?;
    tx.delete_table(SEEN)?;
    let mut tally = vec![(0u64, 0u64); usize::try_from(counters::SHARDS).unwrap_or(16)];
    let mut files = Vec::new();
    let mut nodes = 0u64;
    for row in tx.open_table(NODES)?.iter()? {
        let (_, v) = row?;
        let m: NodeMeta = decode(v.value())?;
        counters::tally(&mut tally, &m);
        nodes += 1;
        if m.kind == FileKind::File {
            files.push(m);
        }
    }
    counters::set_all(tx, &tally)?;
    let want = replication(tx)?;
    let now = crate::store::now_ms();
    let mut servers = BTreeSet::new();
    let mut queued = 0u64;
    let count = files.len() as u64;
    for m in &files {
        let is = servers_of(Some(m));
        {
            let mut h = tx.open_table(HOLDINGS)?;
            for s in &is {
                h.insert((*s, m.id.0), ())?;
            }
        }
        servers.extend(is);
        let shard = m.id.0 % counters::SHARDS;
        if let Some(p) = m.primary {
            add_placed(tx, p, shard, 1, 0)?;
        }
        for r in &m.replicas {
            add_placed(tx, *r, shard, 0, 1)?;
        }
        // No server is known dead yet: the first passes find the dead ones and queue their
        // files through the index.
        if !satisfied(tx, m, want)? {
            enqueue(tx, m.id, now)?;
            queued += 1;
        }
    }
    for s in servers {
        set_seen(tx, ServerId(s), true)?;
    }
    Ok((nodes, count, queued))
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
        let tx = self.store.db()?.begin_read()?;
        let ids = due(&tx, crate::store::now_ms(), limit)?;
        let nodes = tx.open_table(NODES)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let meta = match nodes.get(id.0)? {
                Some(v) => Some(decode::<NodeMeta>(v.value())?),
                None => None,
            };
            out.push((id, meta));
        }
        Ok(out)
    }

    /// Records the outcome of a repair pass over queued files (`planned`: the record each was
    /// planned from), in one transaction not waited onto the disk (a lost one leaves entries
    /// that the next pass serves again). Each file is looked at again as it is now: an entry
    /// goes only if its file has `replication` live holders and a live primary; one with
    /// enough holders for the live servers but not for the replication factor is parked until
    /// a server joins; one that changed since it was planned is due at once.
    pub fn settle_repairs(
        &self,
        outcomes: &[(NodeId, Option<NodeMeta>, Settle)],
        live: &[ServerId],
    ) -> ServiceResult<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        let want = usize::try_from(self.replication()).unwrap_or(usize::MAX);
        let now = crate::store::now_ms();
        self.store.write_lazy(|tx| {
            for (id, planned, settle) in outcomes {
                let current = match tx.open_table(NODES)?.get(id.0)? {
                    Some(v) => decode::<NodeMeta>(v.value())?,
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
        })
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
        let seen: std::collections::HashMap<ServerId, bool> = {
            let tx = self.store.db()?.begin_read()?;
            seen(&tx)?.into_iter().collect()
        };
        let (mut died, mut came) = (0, 0);
        let now = crate::store::now_ms();
        for &(server, alive, heard) in servers {
            let change = match (seen.get(&server).copied(), alive) {
                (Some(true), false) | (None, false) => Some(false),
                (Some(false), true) if heard => Some(true),
                (None, true) => Some(true),
                _ => None,
            };
            let Some(live) = change else { continue };
            // Its files first, in chunks; the state last, so that a crash in between does it
            // all again (queueing is idempotent). A server seen for the first time, alive,
            // holds only what it was given since it registered, which the transactions that
            // gave it queued as needed: nothing of its own to queue.
            let joined = live && !seen.contains_key(&server);
            let mut from = (!joined).then_some(0u64);
            while let Some(f) = from {
                from = self.store.write(|tx| enqueue_held(tx, server, f, now))?;
            }
            if live {
                while self.store.write(|tx| unpark(tx, now))? {}
                came += 1;
            } else {
                died += 1;
            }
            self.store.write(|tx| set_seen(tx, server, live))?;
            if live {
                tracing::info!(%server, "repair: server live; its files and the parked ones queued");
            } else {
                tracing::warn!(%server, "repair: server dead; its files queued");
            }
        }
        Ok((died, came))
    }

    /// Entries in the repair queue (parked ones included).
    pub fn repair_queue_len(&self) -> ServiceResult<u64> {
        let tx = self.store.db()?.begin_read()?;
        queued(&tx)
    }
}

/// Whether everything this module keeps matches a scan of the nodes (tests).
#[cfg(test)]
pub(super) fn check_against_scan(svc: &DirectoryService) -> Result<(), String> {
    let e = |e: crate::error::ServiceError| e.to_string();
    let tx = svc
        .store
        .db()
        .map_err(e)?
        .begin_read()
        .map_err(|x| x.to_string())?;
    let run = || -> ServiceResult<Result<(), String>> {
        let (mut nodes, mut bytes) = (0u64, 0u64);
        let mut holdings = BTreeSet::new();
        let mut placed: std::collections::HashMap<ServerId, (u64, u64)> = Default::default();
        for row in tx.open_table(NODES)?.iter()? {
            let m: NodeMeta = decode(row?.1.value())?;
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
        let mut kept = BTreeSet::new();
        for row in tx.open_table(HOLDINGS)?.iter()? {
            kept.insert(row?.0.value());
        }
        let counted = counters::totals(&tx)?;
        let counts = placement_counts(&tx)?;
        let mut queue = Vec::new();
        for row in tx.open_table(QUEUE)?.iter()? {
            let (k, v) = row?;
            queue.push((v.value(), k.value()));
        }
        queue.sort();
        let mut by_due = Vec::new();
        for row in tx.open_table(QUEUE_DUE)?.iter()? {
            by_due.push(row?.0.value());
        }
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
    run().map_err(e)?
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use common::api::{CommitRequest, CreateRequest, RegisterServerRequest};
    use common::{Caller, ContentHash, FenceToken, UploadId, ValidName};

    use super::*;
    use crate::directory::DirectoryConfig;
    use crate::directory::repair::{self, InFlight, RepairConfig};

    fn open(dir: &std::path::Path) -> DirectoryService {
        let svc = DirectoryService::open(dir, DirectoryConfig::default()).expect("open");
        for i in 0..3 {
            // Closed ports: a copy fails at once.
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let url = format!("http://{}", l.local_addr().expect("addr"));
            drop(l);
            svc.register_server(&RegisterServerRequest {
                url,
                capacity_bytes: 1 << 30,
                previous_id: None,
                cluster_id: None,
            })
            .expect("register");
            let _ = i;
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
        svc.store
            .write(|tx| {
                for t in [HOLDINGS, QUEUE_DUE] {
                    tx.delete_table(t)?;
                }
                tx.delete_table(QUEUE)?;
                tx.delete_table(PLACED)?;
                tx.delete_table(SEEN)?;
                let mut meta = tx.open_table(META)?;
                for k in 0..counters::SHARDS {
                    meta.remove(format!("nodes.{k}").as_str())?;
                    meta.remove(format!("bytes.{k}").as_str())?;
                }
                meta.remove(REPLICATION)?;
                meta.insert(super::super::FORMAT, 3)?;
                Ok(())
            })
            .expect("rewrite");
    }

    #[test]
    fn a_format_3_store_gets_its_queue_index_and_counters_once_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (short, full, stat) = {
            let svc = open(dir.path());
            mk(&svc, "d", FileKind::Dir);
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
            let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("open");
            check_against_scan(&svc).expect("rebuilt consistently");
            let format = svc
                .store
                .db()
                .expect("db")
                .begin_read()
                .expect("read")
                .open_table(META)
                .expect("meta")
                .get(super::super::FORMAT)
                .expect("get")
                .map(|v| v.value());
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
        assert_eq!(first.4.values().map(|c| c.0).sum::<u64>(), 2);
        assert_eq!(state(), first, "reopening changes nothing");
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
}
