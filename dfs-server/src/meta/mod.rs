//! The directory's metadata store, behind one seam with two engines: redb in the data
//! directory (`redb.rs`, the default) and etcd (`etcd.rs`, `--meta etcd://...`).
//!
//! The seam is a typed, ordered key/value layer. A table is one `const`: a name, a key type and
//! a value type (`Table<(u64, String), u64>` is `children`). Both engines derive everything from
//! that declaration: the redb engine opens a redb table of the matching redb types (so the
//! on-disk format of a redb store is exactly what it was before the seam), the etcd engine
//! stores each row under `<prefix>/<table>/<key>` with the key in an order-preserving byte
//! encoding (`MetaKey::encode`) and the value in the bytes redb stores for it (`MetaValue`).
//! Adding a table is adding that one `const` (and, for a key or value type not yet known, one
//! `MetaKey`/`MetaValue` impl in this file).
//!
//! A transaction (`Txn`) offers `get`, `put`, `delete` and `range` on any table. Writes go
//! through `MetaStore::write(|tx| ...)`: one transaction, all or nothing; an `Err` from the
//! closure writes nothing. On etcd the closure may run more than once (optimistic concurrency:
//! see `etcd.rs`), so it must have no effect outside `tx` (no counters bumped, no channels
//! sent to, no state kept between runs). Reads go through `MetaStore::read(|tx| ...)`, a
//! consistent snapshot on both engines (a redb read transaction; one etcd revision, read
//! linearizably).

pub mod etcd;
pub mod migrate;
pub mod redb;

use std::marker::PhantomData;

use common::api::ChangeKind;

use crate::directory::feed::{Feed, Origin};
use crate::error::{ServiceError, ServiceResult};

/// A table: its name and the types of its keys and values. The name is the redb table's name
/// and the etcd key segment; it must not contain `/`.
pub struct Table<K, V> {
    /// The table's name.
    pub name: &'static str,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Table<K, V> {
    /// A table named `name`.
    pub const fn new(name: &'static str) -> Self {
        Table {
            name,
            _types: PhantomData,
        }
    }
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K, V> Copy for Table<K, V> {}

/// A table of any key and value types, row by row as bytes (the key in its
/// order-preserving encoding, the value in redb's bytes): what `meta export` and `meta import`
/// copy, whatever the table's types. Every `Table` is one.
pub trait AnyTable: Sync {
    /// The table's name.
    fn name(&self) -> &'static str;
    /// At most `limit` rows with keys after `after` (encoded; `None`: from the first), in key
    /// order, as (encoded key, value bytes).
    #[allow(clippy::type_complexity)]
    fn page(
        &self,
        tx: &Txn,
        after: Option<&[u8]>,
        limit: usize,
    ) -> ServiceResult<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Writes one row given as `page` gives it; a key or value that is not one of this
    /// table's is refused.
    fn put_raw(&self, tx: &Txn, key: &[u8], value: &[u8]) -> ServiceResult<()>;
}

impl<K: MetaKey, V: MetaValue> AnyTable for Table<K, V> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn page(
        &self,
        tx: &Txn,
        after: Option<&[u8]>,
        limit: usize,
    ) -> ServiceResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let lo = match after {
            Some(b) => Some(K::decode(b).ok_or_else(|| bad_row(self.name, "key"))?),
            None => None,
        };
        // `lo` is inclusive: one more, and the row at `after` skipped.
        let rows = tx.range(*self, lo.as_ref(), None, Some(limit.saturating_add(1)))?;
        let mut out = Vec::with_capacity(limit);
        for (k, v) in rows {
            let mut key = Vec::new();
            k.encode(&mut key);
            if after.is_some_and(|a| a == key.as_slice()) {
                continue;
            }
            if out.len() == limit {
                break;
            }
            out.push((key, v.to_bytes()));
        }
        Ok(out)
    }

    fn put_raw(&self, tx: &Txn, key: &[u8], value: &[u8]) -> ServiceResult<()> {
        let k = K::decode(key).ok_or_else(|| bad_row(self.name, "key"))?;
        let v = V::from_bytes(value).ok_or_else(|| bad_row(self.name, "value"))?;
        tx.put(*self, &k, &v)
    }
}

fn bad_row(table: &str, what: &str) -> ServiceError {
    ServiceError::BadRequest(format!("a {what} that is not one of table {table:?}"))
}

/// The lock service's fence base on an etcd prefix: the etcd key `<prefix>/locks/fence_base`
/// (row `fence_base` of table `locks`, `FENCE_BASE`), a decimal u64. The etcd lock engine adds
/// it to every fencing token it derives from etcd revisions; `meta import` sets it to the
/// highest token the cluster's previous lock store could have issued, so tokens continue
/// above every token a file server accepted before the move.
pub const FENCE_BASE_KEY: &str = "locks/fence_base";
/// `FENCE_BASE_KEY` as a row of the seam (its key and value bytes are exactly those).
pub const FENCE_BASE: (Table<String, String>, &str) = (Table::new("locks"), "fence_base");

/// A key type: its redb type (the redb table's key), and an encoding whose byte order is the
/// key order (for etcd, which orders keys as bytes). A `String` is only ever a key's last part,
/// so it needs no terminator.
pub trait MetaKey: Sized + Clone + std::fmt::Debug + 'static {
    /// The redb key type of tables keyed by `Self`.
    type Redb: ::redb::Key + 'static;
    /// `self` as redb takes it.
    fn as_redb(&self) -> <Self::Redb as ::redb::Value>::SelfType<'_>;
    /// A key read from redb.
    fn from_redb(k: <Self::Redb as ::redb::Value>::SelfType<'_>) -> Self;
    /// Appends the order-preserving encoding of `self`.
    fn encode(&self, out: &mut Vec<u8>);
    /// Reads an encoding made by `encode`; `None` if it is not one.
    fn decode(b: &[u8]) -> Option<Self>;
}

/// A value type: its redb type, and the bytes redb stores for it (which etcd stores too).
pub trait MetaValue: Sized + 'static {
    /// The redb value type of tables holding `Self`.
    type Redb: ::redb::Value + 'static;
    /// `self` as redb takes it.
    fn as_redb(&self) -> <Self::Redb as ::redb::Value>::SelfType<'_>;
    /// A value read from redb.
    fn from_redb(v: <Self::Redb as ::redb::Value>::SelfType<'_>) -> Self;
    /// The bytes redb stores for `self`.
    fn to_bytes(&self) -> Vec<u8>;
    /// A value from bytes `to_bytes` made; `None` if they are not such bytes.
    fn from_bytes(b: &[u8]) -> Option<Self>;
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

impl MetaKey for u64 {
    type Redb = u64;
    fn as_redb(&self) -> u64 {
        *self
    }
    fn from_redb(k: u64) -> Self {
        k
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_be_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == 8).then(|| be_u64(b)).flatten()
    }
}

impl MetaKey for String {
    type Redb = &'static str;
    fn as_redb(&self) -> &str {
        self.as_str()
    }
    fn from_redb(k: &str) -> Self {
        k.to_owned()
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.as_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        String::from_utf8(b.to_vec()).ok()
    }
}

impl MetaKey for (u64, u64) {
    type Redb = (u64, u64);
    fn as_redb(&self) -> (u64, u64) {
        *self
    }
    fn from_redb(k: (u64, u64)) -> Self {
        k
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
        out.extend_from_slice(&self.1.to_be_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        (b.len() == 16).then(|| Some((be_u64(b)?, be_u64(&b[8..])?)))?
    }
}

impl MetaKey for (u64, String) {
    type Redb = (u64, &'static str);
    fn as_redb(&self) -> (u64, &str) {
        (self.0, self.1.as_str())
    }
    fn from_redb(k: (u64, &str)) -> Self {
        (k.0, k.1.to_owned())
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
        out.extend_from_slice(self.1.as_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        Some((be_u64(b)?, String::from_utf8(b.get(8..)?.to_vec()).ok()?))
    }
}

impl MetaKey for (u64, u64, String) {
    type Redb = (u64, u64, &'static str);
    fn as_redb(&self) -> (u64, u64, &str) {
        (self.0, self.1, self.2.as_str())
    }
    fn from_redb(k: (u64, u64, &str)) -> Self {
        (k.0, k.1, k.2.to_owned())
    }
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0.to_be_bytes());
        out.extend_from_slice(&self.1.to_be_bytes());
        out.extend_from_slice(self.2.as_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        Some((
            be_u64(b)?,
            be_u64(b.get(8..)?)?,
            String::from_utf8(b.get(16..)?.to_vec()).ok()?,
        ))
    }
}

impl MetaValue for u64 {
    type Redb = u64;
    fn as_redb(&self) -> u64 {
        *self
    }
    fn from_redb(v: u64) -> Self {
        v
    }
    fn to_bytes(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }
}

impl MetaValue for Vec<u8> {
    type Redb = &'static [u8];
    fn as_redb(&self) -> &[u8] {
        self.as_slice()
    }
    fn from_redb(v: &[u8]) -> Self {
        v.to_vec()
    }
    fn to_bytes(&self) -> Vec<u8> {
        self.clone()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        Some(b.to_vec())
    }
}

impl MetaValue for String {
    type Redb = &'static str;
    fn as_redb(&self) -> &str {
        self.as_str()
    }
    fn from_redb(v: &str) -> Self {
        v.to_owned()
    }
    fn to_bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        String::from_utf8(b.to_vec()).ok()
    }
}

/// A fixed-width redb value stored as the bytes redb stores for it.
macro_rules! fixed_value {
    ($t:ty) => {
        impl MetaValue for $t {
            type Redb = $t;
            fn as_redb(&self) -> $t {
                *self
            }
            fn from_redb(v: $t) -> Self {
                v
            }
            fn to_bytes(&self) -> Vec<u8> {
                let b = <$t as ::redb::Value>::as_bytes(self);
                AsRef::<[u8]>::as_ref(&b).to_vec()
            }
            fn from_bytes(b: &[u8]) -> Option<Self> {
                (Some(b.len()) == <$t as ::redb::Value>::fixed_width())
                    .then(|| <$t as ::redb::Value>::from_bytes(b))
            }
        }
    };
}

fixed_value!(bool);
fixed_value!((u64, u64));

impl MetaValue for () {
    type Redb = ();
    fn as_redb(&self) {}
    fn from_redb(_: ()) -> Self {}
    fn to_bytes(&self) -> Vec<u8> {
        Vec::new()
    }
    fn from_bytes(b: &[u8]) -> Option<Self> {
        b.is_empty().then_some(())
    }
}

/// One transaction (or read view) of either engine. Helpers take `&Txn`; every method takes
/// `&self` (interior mutability on etcd, where reads are recorded for the commit's compares).
///
/// A transaction also carries the changes it makes to the namespace, for the change feed
/// ([`Txn::changed`]): the store publishes them once, and only if, the transaction commits.
pub struct Txn<'a> {
    inner: Inner<'a>,
    changes: std::sync::Mutex<Vec<ChangeKind>>,
}

enum Inner<'a> {
    RedbWrite(&'a ::redb::WriteTransaction),
    RedbRead(&'a ::redb::ReadTransaction),
    Etcd(&'a etcd::EtcdTxn),
}

impl<'a> Txn<'a> {
    fn new(inner: Inner<'a>) -> Self {
        Txn {
            inner,
            changes: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records `what` as one of this transaction's changes (each at most once), published to
    /// the change feed when the transaction commits.
    pub fn changed(&self, what: ChangeKind) {
        let mut c = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        if !c.contains(&what) {
            c.push(what);
        }
    }

    /// The changes recorded, taken (the engines, after the closure ran).
    fn take_changes(&self) -> Vec<ChangeKind> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The value of `key` in `table`.
    pub fn get<K: MetaKey, V: MetaValue>(
        &self,
        table: Table<K, V>,
        key: &K,
    ) -> ServiceResult<Option<V>> {
        match &self.inner {
            Inner::RedbWrite(tx) => redb::get_w(tx, table, key),
            Inner::RedbRead(tx) => redb::get_r(tx, table, key),
            Inner::Etcd(tx) => tx.get(table, key),
        }
    }

    /// The values of `keys` in `table`, in their order: `get` of each, in few round trips on
    /// etcd.
    pub fn get_many<K: MetaKey, V: MetaValue>(
        &self,
        table: Table<K, V>,
        keys: &[K],
    ) -> ServiceResult<Vec<Option<V>>> {
        match &self.inner {
            Inner::Etcd(tx) => tx.get_many(table, keys),
            _ => keys.iter().map(|k| self.get(table, k)).collect(),
        }
    }

    /// Sets `key` to `value` in `table`.
    pub fn put<K: MetaKey, V: MetaValue>(
        &self,
        table: Table<K, V>,
        key: &K,
        value: &V,
    ) -> ServiceResult<()> {
        match &self.inner {
            Inner::RedbWrite(tx) => redb::put(tx, table, key, value),
            Inner::RedbRead(_) => Err(read_only()),
            Inner::Etcd(tx) => tx.put(table, key, value),
        }
    }

    /// Removes `key` from `table` (nothing if it is not there).
    pub fn delete<K: MetaKey, V: MetaValue>(
        &self,
        table: Table<K, V>,
        key: &K,
    ) -> ServiceResult<()> {
        match &self.inner {
            Inner::RedbWrite(tx) => redb::delete(tx, table, key),
            Inner::RedbRead(_) => Err(read_only()),
            Inner::Etcd(tx) => tx.delete(table, key),
        }
    }

    /// The rows of `table` with `lo <= key < hi` (`None`: unbounded), in key order, at most
    /// `limit` of them (`None`: all).
    pub fn range<K: MetaKey, V: MetaValue>(
        &self,
        table: Table<K, V>,
        lo: Option<&K>,
        hi: Option<&K>,
        limit: Option<usize>,
    ) -> ServiceResult<Vec<(K, V)>> {
        if limit == Some(0) {
            return Ok(vec![]);
        }
        match &self.inner {
            Inner::RedbWrite(tx) => redb::range_w(tx, table, lo, hi, limit),
            Inner::RedbRead(tx) => redb::range_r(tx, table, lo, hi, limit),
            Inner::Etcd(tx) => tx.range(table, lo, hi, limit),
        }
    }

    /// The row of `table` with the greatest key.
    pub fn last<K: MetaKey, V: MetaValue>(
        &self,
        table: Table<K, V>,
    ) -> ServiceResult<Option<(K, V)>> {
        match &self.inner {
            Inner::RedbWrite(tx) => redb::last_w(tx, table),
            Inner::RedbRead(_) => Ok(self.all(table)?.pop()),
            Inner::Etcd(tx) => tx.last(table),
        }
    }

    /// Every row of `table`, in key order.
    pub fn all<K: MetaKey, V: MetaValue>(&self, table: Table<K, V>) -> ServiceResult<Vec<(K, V)>> {
        self.range(table, None, None, None)
    }

    /// Removes `table` whole (format upgrades that retire one, and tests that make a store
    /// of an older format): redb deletes the table, etcd each of its rows (one write per row:
    /// a small table only, see `--max-txn-ops`).
    pub fn drop_table<K: MetaKey, V: MetaValue>(&self, table: Table<K, V>) -> ServiceResult<()> {
        match &self.inner {
            Inner::RedbWrite(tx) => {
                tx.delete_table(::redb::TableDefinition::<K::Redb, V::Redb>::new(table.name))?;
                Ok(())
            }
            Inner::RedbRead(_) => Err(read_only()),
            Inner::Etcd(_) => {
                for (k, _) in self.all(table)? {
                    self.delete(table, &k)?;
                }
                Ok(())
            }
        }
    }
}

fn read_only() -> ServiceError {
    ServiceError::internal("metadata store", "a write in a read view")
}

thread_local! {
    static FENCED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (synchronous) with every store write it makes from this thread fenced by the
/// leadership: on etcd each commits only while this instance holds the leader key (a deposed
/// leader's late write is refused as unavailable); on redb, the only instance, as usual.
pub fn as_leader<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FENCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FENCED.with(|c| c.replace(true)));
    f()
}

fn leader_fenced() -> bool {
    FENCED.with(|c| c.get())
}

/// Where the directory's metadata lives (`--meta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaConfig {
    /// A redb file in the data directory (the default).
    Redb,
    /// An etcd cluster: its client endpoints and the key prefix of this cluster's metadata.
    Etcd(etcd::EtcdConfig),
}

impl MetaConfig {
    /// Parses `--meta`: `redb`, or `etcd://host:port[,host:port...][/prefix]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "redb" {
            return Ok(MetaConfig::Redb);
        }
        etcd::EtcdConfig::parse(s).map(MetaConfig::Etcd)
    }
}

impl std::str::FromStr for MetaConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MetaConfig::parse(s)
    }
}

/// The metadata store of one engine.
pub enum MetaStore {
    /// redb, group-committed (`crate::commit::GroupCommit`).
    Redb(redb::RedbStore),
    /// etcd, optimistic transactions.
    Etcd(etcd::EtcdStore),
}

impl MetaStore {
    /// Runs `f` in one transaction and returns once it is durable. An `Err` from `f` writes
    /// nothing. On etcd `f` may run more than once: no effects outside `tx`.
    pub fn write<T: Send>(
        &self,
        f: impl FnMut(&Txn) -> ServiceResult<T> + Send,
    ) -> ServiceResult<T> {
        let origin = crate::directory::feed::current_origin();
        match self {
            MetaStore::Redb(s) => s.write(f, true, origin),
            MetaStore::Etcd(s) => s.write_as(f, origin, leader_fenced()),
        }
    }

    /// `write` for records whose loss in a crash is harmless: redb does not wait for the disk
    /// (the next durable write persists it); etcd commits as `write` does.
    pub fn write_lazy<T: Send>(
        &self,
        f: impl FnMut(&Txn) -> ServiceResult<T> + Send,
    ) -> ServiceResult<T> {
        let origin = crate::directory::feed::current_origin();
        match self {
            MetaStore::Redb(s) => s.write(f, false, origin),
            MetaStore::Etcd(s) => s.write_as(f, origin, leader_fenced()),
        }
    }

    /// The change feed of this store, fed with every change committed from now on: on redb
    /// by this process's write path (an epoch of its own), on etcd by a watch of the prefix
    /// (an epoch shared by every instance on it). Call once, within a runtime.
    pub fn start_feed(&self) -> std::sync::Arc<Feed> {
        use crate::directory::feed::DEFAULT_CAPACITY;
        match self {
            MetaStore::Redb(s) => {
                let feed = std::sync::Arc::new(Feed::default());
                s.attach_feed(feed.clone());
                feed
            }
            MetaStore::Etcd(s) => {
                let feed = std::sync::Arc::new(Feed::shared(s.feed_epoch(), DEFAULT_CAPACITY));
                s.attach_feed(feed.clone());
                feed
            }
        }
    }

    /// Starts campaigning for the leadership of background work (the repair loop, registry
    /// sweeps) with a lease of `lease`: etcd elects one instance per prefix; redb always
    /// leads.
    pub fn start_election(&self, lease: std::time::Duration) {
        if let MetaStore::Etcd(s) = self {
            s.start_election(lease);
        }
    }

    /// Stops campaigning (etcd; tests: a leader that stops renewing, as a killed one).
    pub fn stop_election(&self) {
        if let MetaStore::Etcd(s) = self {
            s.stop_election();
        }
    }

    /// Stops campaigning and hands the leadership over at once (graceful stop; etcd).
    pub fn resign(&self) {
        if let MetaStore::Etcd(s) = self {
            s.resign();
        }
    }

    /// Whether several directory instances may share this store (etcd).
    pub fn is_shared(&self) -> bool {
        matches!(self, MetaStore::Etcd(_))
    }

    /// Whether this instance leads background work now (always on redb).
    pub fn is_leader(&self) -> bool {
        match self {
            MetaStore::Redb(_) => true,
            MetaStore::Etcd(s) => s.is_leader(),
        }
    }

    /// `write_lazy` for best-effort housekeeping of no client (no origin, never fenced, it
    /// publishes nothing a client must hear): on etcd run once, a conflict failing it (as
    /// unavailable) instead of running it again.
    pub fn write_once<T: Send>(
        &self,
        f: impl FnMut(&Txn) -> ServiceResult<T> + Send,
    ) -> ServiceResult<T> {
        match self {
            MetaStore::Redb(s) => s.write(f, false, None),
            MetaStore::Etcd(s) => s.write_tries(f, None, false, 1),
        }
    }

    /// Runs `f` on a consistent read view (on etcd again, on a newer one, if the revision it
    /// read at was compacted meanwhile: `f` may run more than once).
    pub fn read<T: Send>(
        &self,
        f: impl FnMut(&Txn) -> ServiceResult<T> + Send,
    ) -> ServiceResult<T> {
        match self {
            MetaStore::Redb(s) => s.read(f),
            MetaStore::Etcd(s) => s.read(f),
        }
    }

    /// (durable commits, writes acknowledged by them, recoveries after a failed commit): of
    /// redb's group commit; on etcd (transactions committed, the same, 0).
    pub fn counters(&self) -> (u64, u64, u64) {
        match self {
            MetaStore::Redb(s) => s.counters(),
            MetaStore::Etcd(s) => s.counters(),
        }
    }

    /// Transactions run again after a conflict (etcd; 0 on redb, which has one writer).
    pub fn conflicts(&self) -> u64 {
        match self {
            MetaStore::Redb(_) => 0,
            MetaStore::Etcd(s) => s.conflicts(),
        }
    }

    /// Where the store is, for messages.
    pub fn describe(&self) -> String {
        match self {
            MetaStore::Redb(s) => s.describe(),
            MetaStore::Etcd(s) => s.describe(),
        }
    }

    /// The group commit of a redb store (fault injection in tests); `None` on etcd.
    pub fn group_commit(&self) -> Option<&crate::commit::GroupCommit> {
        match self {
            MetaStore::Redb(s) => Some(&s.store),
            MetaStore::Etcd(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<K: MetaKey>(k: &K) -> Vec<u8> {
        let mut v = Vec::new();
        k.encode(&mut v);
        v
    }

    #[test]
    fn key_encodings_sort_as_the_keys_do_and_round_trip() {
        let keys = vec![
            (0u64, String::new()),
            (0, "a".into()),
            (0, "ab".into()),
            (0, "b".into()),
            (1, String::new()),
            (255, "z".into()),
            (256, String::new()),
            (u64::MAX, "\u{10ffff}".into()),
        ];
        for w in keys.windows(2) {
            assert!(w[0] < w[1]);
            assert!(enc(&w[0]) < enc(&w[1]), "{:?} {:?}", w[0], w[1]);
        }
        for k in &keys {
            assert_eq!(<(u64, String)>::decode(&enc(k)).as_ref(), Some(k));
        }
        let k = (7u64, 9u64, "n".to_owned());
        assert_eq!(<(u64, u64, String)>::decode(&enc(&k)), Some(k));
        assert_eq!(<(u64, u64)>::decode(&enc(&(3u64, 4u64))), Some((3, 4)));
        assert_eq!(
            u64::decode(&[1, 2]),
            None,
            "a short key is refused, never a panic"
        );
    }

    #[test]
    fn values_are_the_bytes_redb_stores() {
        use ::redb::Value;
        let n = 0x0102_0304_0506_0708u64;
        assert_eq!(
            MetaValue::to_bytes(&n),
            <u64 as Value>::as_bytes(&n).to_vec()
        );
        assert_eq!(
            <u64 as MetaValue>::from_bytes(&MetaValue::to_bytes(&n)),
            Some(n)
        );
        let s = "lock".to_owned();
        assert_eq!(
            MetaValue::to_bytes(&s),
            <&str as Value>::as_bytes(&"lock").as_bytes().to_vec()
        );
        assert_eq!(<u64 as MetaValue>::from_bytes(b"abc"), None);
    }
}
