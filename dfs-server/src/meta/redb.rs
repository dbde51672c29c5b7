//! The redb engine: each `Table` is the redb table of the same name and matching types, so a
//! store written before the seam (format 3, and formats 1–2 through the directory's upgrade) is
//! read as it is. Writes are group-committed (`crate::commit::GroupCommit`: shared fsyncs,
//! recovery after a failed one, fault injection).

use std::ops::Bound;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Feed, Inner, MetaKey, MetaValue, Origin, Table, Txn};
use crate::commit::GroupCommit;
use crate::error::ServiceResult;

/// A redb metadata store.
pub struct RedbStore {
    /// The group-committed database.
    pub store: GroupCommit,
    path: Option<PathBuf>,
    /// Where committed changes are published (the directory's feed, once attached).
    feed: std::sync::OnceLock<std::sync::Arc<Feed>>,
}

fn def<K: MetaKey, V: MetaValue>(t: Table<K, V>) -> TableDefinition<'static, K::Redb, V::Redb> {
    TableDefinition::new(t.name)
}

impl RedbStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> ServiceResult<Self> {
        Ok(RedbStore {
            store: GroupCommit::open(path)?,
            path: Some(path.to_path_buf()),
            feed: Default::default(),
        })
    }

    /// A store over an opened group commit (tests: a custom opener).
    pub fn from_group_commit(store: GroupCommit) -> Self {
        RedbStore {
            store,
            path: None,
            feed: Default::default(),
        }
    }

    /// Publishes to `feed` the changes of every transaction committed from now on.
    pub(super) fn attach_feed(&self, feed: std::sync::Arc<Feed>) {
        let _ = self.feed.set(feed);
    }

    pub(super) fn write<T>(
        &self,
        mut f: impl FnMut(&Txn) -> ServiceResult<T>,
        durable: bool,
        origin: Origin,
    ) -> ServiceResult<T> {
        let run = |tx: &redb::WriteTransaction| {
            let t = Txn::new(Inner::RedbWrite(tx));
            let v = f(&t)?;
            Ok((v, t.take_changes()))
        };
        let (value, changes) = if durable {
            self.store.write(run)?
        } else {
            self.store.write_lazy(run)?
        };
        // Committed (and durable, unless lazy): published here, in the store's write path, so
        // no caller dropped meanwhile can lose it. One writer at a time commits; the sequence
        // is the feed's own (a restart is a new epoch).
        if !changes.is_empty()
            && let Some(feed) = self.feed.get()
        {
            feed.publish_from(origin, changes);
        }
        Ok(value)
    }

    pub(super) fn read<T>(&self, mut f: impl FnMut(&Txn) -> ServiceResult<T>) -> ServiceResult<T> {
        let tx = self.store.db()?.begin_read()?;
        f(&Txn::new(Inner::RedbRead(&tx)))
    }

    pub(super) fn counters(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.store.flushes.load(Relaxed),
            self.store.durable_writes.load(Relaxed),
            self.store.recoveries.load(Relaxed),
        )
    }

    pub(super) fn describe(&self) -> String {
        match &self.path {
            Some(p) => format!("the redb store {}", p.display()),
            None => "the redb store".into(),
        }
    }
}

/// A bound of a redb range over keys of type `K`.
type RedbBound<'k, K> = Bound<<<K as MetaKey>::Redb as redb::Value>::SelfType<'k>>;

fn bounds<'k, K: MetaKey>(
    lo: Option<&'k K>,
    hi: Option<&'k K>,
) -> (RedbBound<'k, K>, RedbBound<'k, K>) {
    (
        lo.map_or(Bound::Unbounded, |k| Bound::Included(k.as_redb())),
        hi.map_or(Bound::Unbounded, |k| Bound::Excluded(k.as_redb())),
    )
}

fn collect<K: MetaKey, V: MetaValue>(
    range: redb::Range<'_, K::Redb, V::Redb>,
    limit: Option<usize>,
) -> ServiceResult<Vec<(K, V)>> {
    let mut out = Vec::new();
    for row in range {
        if limit.is_some_and(|l| out.len() >= l) {
            break;
        }
        let (k, v) = row?;
        out.push((K::from_redb(k.value()), V::from_redb(v.value())));
    }
    Ok(out)
}

pub(super) fn get_w<K: MetaKey, V: MetaValue>(
    tx: &redb::WriteTransaction,
    t: Table<K, V>,
    key: &K,
) -> ServiceResult<Option<V>> {
    let table = tx.open_table(def(t))?;
    let v = table.get(key.as_redb())?;
    Ok(v.map(|v| V::from_redb(v.value())))
}

pub(super) fn get_r<K: MetaKey, V: MetaValue>(
    tx: &redb::ReadTransaction,
    t: Table<K, V>,
    key: &K,
) -> ServiceResult<Option<V>> {
    let table = match tx.open_table(def(t)) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let v = table.get(key.as_redb())?;
    Ok(v.map(|v| V::from_redb(v.value())))
}

pub(super) fn put<K: MetaKey, V: MetaValue>(
    tx: &redb::WriteTransaction,
    t: Table<K, V>,
    key: &K,
    value: &V,
) -> ServiceResult<()> {
    tx.open_table(def(t))?
        .insert(key.as_redb(), value.as_redb())?;
    Ok(())
}

pub(super) fn delete<K: MetaKey, V: MetaValue>(
    tx: &redb::WriteTransaction,
    t: Table<K, V>,
    key: &K,
) -> ServiceResult<()> {
    tx.open_table(def(t))?.remove(key.as_redb())?;
    Ok(())
}

pub(super) fn range_w<K: MetaKey, V: MetaValue>(
    tx: &redb::WriteTransaction,
    t: Table<K, V>,
    lo: Option<&K>,
    hi: Option<&K>,
    limit: Option<usize>,
) -> ServiceResult<Vec<(K, V)>> {
    let table = tx.open_table(def(t))?;
    collect(table.range(bounds(lo, hi))?, limit)
}

pub(super) fn range_r<K: MetaKey, V: MetaValue>(
    tx: &redb::ReadTransaction,
    t: Table<K, V>,
    lo: Option<&K>,
    hi: Option<&K>,
    limit: Option<usize>,
) -> ServiceResult<Vec<(K, V)>> {
    let table = match tx.open_table(def(t)) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
        Err(e) => return Err(e.into()),
    };
    collect(table.range(bounds(lo, hi))?, limit)
}

pub(super) fn last_w<K: MetaKey, V: MetaValue>(
    tx: &redb::WriteTransaction,
    t: Table<K, V>,
) -> ServiceResult<Option<(K, V)>> {
    let table = tx.open_table(def(t))?;
    let last = table.last()?;
    Ok(last.map(|(k, v)| (K::from_redb(k.value()), V::from_redb(v.value()))))
}
