//! `dfs-server meta export` and `meta import`: a directory's metadata moved between stores
//! (a redb cluster onto etcd), through a file.
//!
//! The file is JSON lines: a header (`HEADER_FORMAT`, its `version`, the cluster id, the
//! store's format, the fence base, where it came from, the tables), then one line per row
//! (`{"t": table, "k": key, "v": value}`: the key in its order-preserving encoding, hex; the
//! value in redb's bytes, base64), then `{"end": rows}`. A file without its end line is
//! incomplete and refused. Both sides stream: export reads `PAGE` rows per read view and
//! writes them out, import writes `CHUNK` rows per transaction, so memory stays bounded
//! whatever the namespace's size.
//!
//! Every table of `directory::TABLES` goes across, whatever its types (`AnyTable`): adding a
//! table to the directory adds it to the export.
//!
//! **Fencing tokens.** Tokens of the etcd lock engine are `fence base + etcd revision`, and
//! revisions of a fresh etcd start near 1. The export records as the fence base the highest
//! token the source could have issued (a redb cluster: the lock store's reserved block end,
//! `--lock-data`; an etcd one: its fence base plus its current revision), and the import
//! writes it to `meta::FENCE_BASE_KEY` (never lowering one there), so tokens continue above
//! every token the file servers accepted.
//!
//! **Restartable.** Import first marks the target unfinished (`directory::IMPORTING`, the
//! cluster id, in `dir_meta`); a directory refuses to open such a store. Its last transaction
//! sets the fence base and removes the mark. Running the same import again over an unfinished
//! one of the same cluster writes every row again (puts are idempotent) and finishes it; a
//! target holding anything else is refused unless `--replace` (which deletes the prefix first).

use std::io::{BufRead, Write};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{AnyTable, FENCE_BASE, MetaStore};
use crate::directory::{CLUSTER_ID, FORMAT, IMPORTING, META, TABLES};
use crate::error::{ServiceError, ServiceResult};

/// The header's `format`.
pub const HEADER_FORMAT: &str = "dfs-meta-export";
/// The version of the file's layout this dfs writes and reads (and any older one).
pub const VERSION: u32 = 1;
/// Rows per read view on export.
const PAGE: usize = 512;
/// Rows per transaction on import: within etcd's default `--max-txn-ops` (128).
pub const CHUNK: usize = 64;
/// The longest line accepted.
const MAX_LINE: u64 = 16 << 20;

/// The first line of an export.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Header {
    /// `HEADER_FORMAT`.
    pub format: String,
    /// The file layout's version (`VERSION`).
    pub version: u32,
    /// The cluster id, 16 hex digits, as `GET /v1/cluster` gives it.
    pub cluster_id: String,
    /// The directory store's format (`dir_meta` `format`).
    pub store_format: u64,
    /// Every fencing token the source could have issued is at most this.
    pub fence_base: u64,
    /// Where the rows came from (for people).
    pub source: String,
    /// The tables, in the order their rows follow.
    pub tables: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Row {
    t: String,
    k: String,
    v: String,
}

#[derive(Serialize, Deserialize)]
struct End {
    end: u64,
}

/// What an export or import did.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The header written or read.
    pub header: Header,
    /// Rows copied.
    pub rows: u64,
    /// Import only: an unfinished import of the same cluster was found and finished.
    pub resumed: bool,
}

fn bad_file(msg: impl std::fmt::Display) -> ServiceError {
    ServiceError::BadRequest(format!("the export file: {msg}"))
}

fn io_err(e: std::io::Error) -> ServiceError {
    e.into()
}

/// The highest fencing token an etcd store's lock engine may have issued: its fence base plus
/// its current revision.
fn etcd_fence_high_water(store: &MetaStore) -> ServiceResult<u64> {
    let MetaStore::Etcd(e) = store else {
        return Ok(0);
    };
    let base = read_fence_base(store)?;
    let (_, rev) = e.key_count()?;
    Ok(base.saturating_add(u64::try_from(rev).unwrap_or(0)))
}

/// The fence base written on `store` (0 when absent).
pub fn read_fence_base(store: &MetaStore) -> ServiceResult<u64> {
    let (table, key) = FENCE_BASE;
    let v = store.read(|tx| tx.get(table, &key.to_owned()))?;
    match v {
        None => Ok(0),
        Some(s) => s.parse().map_err(|_| {
            ServiceError::internal("the fence base", format!("{s:?} is not a number"))
        }),
    }
}

/// Writes every row of the directory store `store` to `out`. `lock_high_water` is the highest
/// token the cluster's lock store may have issued (`lock::fence_high_water`; for an etcd
/// source the etcd fence base and revision are taken too). The directory must be stopped.
pub fn export(
    store: &MetaStore,
    lock_high_water: u64,
    out: &mut impl Write,
) -> ServiceResult<Summary> {
    let (cluster_id, format, importing) = store.read(|tx| {
        let get = |k: &str| tx.get(META, &k.to_owned());
        Ok((get(CLUSTER_ID)?, get(FORMAT)?, get(IMPORTING)?))
    })?;
    if importing.is_some() {
        return Err(ServiceError::BadRequest(format!(
            "{} holds an unfinished import: finish it before exporting",
            store.describe()
        )));
    }
    let cluster_id = cluster_id.ok_or_else(|| {
        ServiceError::NotFound(format!(
            "{} holds no directory (no cluster id)",
            store.describe()
        ))
    })?;
    let fence_base = lock_high_water.max(etcd_fence_high_water(store)?);
    let header = Header {
        format: HEADER_FORMAT.into(),
        version: VERSION,
        cluster_id: format!("{cluster_id:016x}"),
        store_format: format.unwrap_or(1),
        fence_base,
        source: store.describe(),
        tables: TABLES.iter().map(|t| t.name().to_owned()).collect(),
    };
    let line = |out: &mut dyn Write, v: &dyn erased::Ser| -> ServiceResult<()> {
        v.write_line(out).map_err(io_err)
    };
    line(out, &header)?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut rows = 0u64;
    for table in TABLES {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = store.read(|tx| table.page(tx, after.as_deref(), PAGE))?;
            let Some((last, _)) = page.last() else { break };
            let last = last.clone();
            for (k, v) in &page {
                let row = Row {
                    t: table.name().to_owned(),
                    k: hex::encode(k),
                    v: b64.encode(v),
                };
                line(out, &row)?;
                rows += 1;
            }
            if page.len() < PAGE {
                break;
            }
            after = Some(last);
        }
    }
    line(out, &End { end: rows })?;
    out.flush().map_err(io_err)?;
    Ok(Summary {
        header,
        rows,
        resumed: false,
    })
}

/// JSON lines of any serialisable value.
mod erased {
    pub trait Ser {
        fn write_line(&self, out: &mut dyn std::io::Write) -> std::io::Result<()>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn write_line(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
            serde_json::to_writer(&mut *out, self)?;
            out.write_all(b"\n")
        }
    }
}

/// Reads one line of at most `MAX_LINE` bytes (`None` at the end of the input).
fn next_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> ServiceResult<Option<()>> {
    buf.clear();
    let n = std::io::Read::take(&mut *input, MAX_LINE + 1)
        .read_until(b'\n', buf)
        .map_err(io_err)?;
    if n == 0 {
        return Ok(None);
    }
    if n as u64 > MAX_LINE {
        return Err(bad_file(format!("a line longer than {MAX_LINE} bytes")));
    }
    Ok(Some(()))
}

fn table_named(name: &str) -> ServiceResult<&'static dyn AnyTable> {
    TABLES
        .iter()
        .copied()
        .find(|t| t.name() == name)
        .ok_or_else(|| {
            bad_file(format!(
                "table {name:?} is not one this dfs-server knows (an export of a newer dfs?)"
            ))
        })
}

/// Reads the header of an export.
pub fn read_header(input: &mut impl BufRead) -> ServiceResult<Header> {
    let mut buf = Vec::new();
    next_line(input, &mut buf)?.ok_or_else(|| bad_file("it is empty"))?;
    let header: Header =
        serde_json::from_slice(&buf).map_err(|e| bad_file(format!("no header ({e})")))?;
    if header.format != HEADER_FORMAT {
        return Err(bad_file(format!(
            "its format is {:?}, not {HEADER_FORMAT:?}",
            header.format
        )));
    }
    if header.version > VERSION {
        return Err(bad_file(format!(
            "it is version {} of the export format, written by a newer dfs; this dfs-server \
             reads versions up to {VERSION}",
            header.version
        )));
    }
    if u64::from_str_radix(&header.cluster_id, 16).is_err() {
        return Err(bad_file(format!(
            "cluster id {:?} is not hex",
            header.cluster_id
        )));
    }
    for t in &header.tables {
        table_named(t)?;
    }
    Ok(header)
}

/// Imports an export into `store`, an etcd prefix that must be empty (or hold an unfinished
/// import of the same cluster, which this finishes; or anything, with `replace`, which
/// deletes it first, keeping the fence base above every token it may have issued).
pub fn import(
    store: &MetaStore,
    input: &mut impl BufRead,
    replace: bool,
) -> ServiceResult<Summary> {
    let MetaStore::Etcd(etcd) = store else {
        return Err(ServiceError::BadRequest(
            "meta import writes into etcd (--meta etcd://...); a redb store is made by \
             starting a directory on it"
                .into(),
        ));
    };
    let header = read_header(input)?;
    let cid = u64::from_str_radix(&header.cluster_id, 16)
        .map_err(|_| bad_file("cluster id is not hex"))?;
    let (keys, _) = etcd.key_count()?;
    let mut resumed = false;
    // Tokens a lock engine on this prefix may have issued: a replaced prefix keeps them below.
    let mut floor = 0;
    if keys > 0 {
        let importing = store.read(|tx| tx.get(META, &IMPORTING.to_owned()))?;
        if importing == Some(cid) {
            tracing::info!(cluster = %header.cluster_id, "finishing an unfinished import");
            resumed = true;
        } else if replace {
            tracing::warn!(keys, target = %store.describe(), "deleting the target's keys (--replace)");
            floor = etcd_fence_high_water(store)?;
            etcd.delete_all()?;
        } else {
            return Err(ServiceError::BadRequest(format!(
                "{} holds {keys} keys already: import into an empty prefix, or pass --replace \
                 to delete them first",
                store.describe()
            )));
        }
    }
    store.write(|tx| tx.put(META, &IMPORTING.to_owned(), &cid))?;

    let b64 = base64::engine::general_purpose::STANDARD;
    let mut chunk: Vec<(&'static dyn AnyTable, Vec<u8>, Vec<u8>)> = Vec::with_capacity(CHUNK);
    let flush = |chunk: &mut Vec<(&'static dyn AnyTable, Vec<u8>, Vec<u8>)>| {
        if chunk.is_empty() {
            return Ok(());
        }
        store.write(|tx| {
            for (t, k, v) in chunk.iter() {
                t.put_raw(tx, k, v)?;
            }
            Ok(())
        })?;
        chunk.clear();
        ServiceResult::Ok(())
    };
    let mut rows = 0u64;
    let mut buf = Vec::new();
    let mut ended = None;
    while next_line(input, &mut buf)?.is_some() {
        if ended.is_some() {
            return Err(bad_file("lines after the end line"));
        }
        if let Ok(end) = serde_json::from_slice::<End>(&buf) {
            ended = Some(end.end);
            continue;
        }
        let row: Row = serde_json::from_slice(&buf)
            .map_err(|e| bad_file(format!("line {} is not a row ({e})", rows + 2)))?;
        let table = table_named(&row.t)?;
        let k = hex::decode(&row.k).map_err(|_| bad_file(format!("row {rows}: key not hex")))?;
        let v = b64
            .decode(&row.v)
            .map_err(|_| bad_file(format!("row {rows}: value not base64")))?;
        if table.name() == META.name && k == IMPORTING.as_bytes() {
            return Err(bad_file("it holds an import mark"));
        }
        chunk.push((table, k, v));
        rows += 1;
        if chunk.len() == CHUNK {
            flush(&mut chunk)?;
        }
    }
    flush(&mut chunk)?;
    match ended {
        Some(n) if n == rows => {}
        Some(n) => {
            return Err(bad_file(format!(
                "its end line counts {n} rows, it holds {rows}"
            )));
        }
        None => {
            return Err(bad_file(
                "it has no end line: it is incomplete (an export cut short?); export again",
            ));
        }
    }
    let (fence_table, fence_key) = FENCE_BASE;
    store.write(|tx| {
        let stored = tx.get(META, &CLUSTER_ID.to_owned())?;
        if stored != Some(cid) {
            return Err(bad_file(format!(
                "it names cluster {} but its rows hold cluster id {stored:?}",
                header.cluster_id
            )));
        }
        let old = match tx.get(fence_table, &fence_key.to_owned())? {
            Some(s) => s.parse::<u64>().map_err(|_| {
                ServiceError::internal("the fence base", format!("{s:?} is not a number"))
            })?,
            None => 0,
        };
        let base = old.max(floor).max(header.fence_base);
        tx.put(fence_table, &fence_key.to_owned(), &base.to_string())?;
        tx.delete(META, &IMPORTING.to_owned())?;
        Ok(())
    })?;
    Ok(Summary {
        header,
        rows,
        resumed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::{DirectoryConfig, DirectoryService};
    use crate::meta::MetaConfig;
    use crate::meta::etcd::{EtcdConfig, EtcdStore};

    fn etcd_prefix() -> MetaConfig {
        let etcd = crate::testing::shared_etcd().unwrap_or_else(|e| panic!("{e}"));
        let prefix = format!("migrate/{:016x}", rand::random::<u64>());
        MetaConfig::Etcd(EtcdConfig::parse(&etcd.meta_url(&prefix)).expect("url"))
    }

    fn connect(c: &MetaConfig) -> MetaStore {
        let MetaConfig::Etcd(c) = c else {
            panic!("not etcd")
        };
        MetaStore::Etcd(EtcdStore::connect(c).expect("connect"))
    }

    /// A redb directory with a few nodes, exported.
    fn exported(high_water: u64) -> (String, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = {
            let d = DirectoryService::open_meta(dir.path(), &MetaConfig::Redb, Default::default())
                .expect("open");
            d.cluster_id()
        };
        let store = MetaStore::Redb(
            crate::meta::redb::RedbStore::open(&dir.path().join("directory.redb")).expect("open"),
        );
        let mut out = Vec::new();
        let s = export(&store, high_water, &mut out).expect("export");
        assert_eq!(s.header.cluster_id, id);
        assert!(s.rows >= 4, "root, cluster id, node counter, format");
        (id, out)
    }

    #[test]
    fn an_import_cut_short_blocks_the_directory_until_it_is_run_again() {
        let (id, file) = exported(777);
        let target = etcd_prefix();
        let store = connect(&target);
        // All but the end line.
        let text = std::str::from_utf8(&file).expect("utf-8");
        let cut: String = text
            .lines()
            .take(text.lines().count() - 1)
            .map(|l| format!("{l}\n"))
            .collect();
        let err = import(&store, &mut cut.as_bytes(), false).expect_err("incomplete");
        assert!(err.to_string().contains("no end line"), "{err}");
        let open = DirectoryService::open_meta(
            std::path::Path::new("unused"),
            &target,
            DirectoryConfig::default(),
        );
        let err = open.err().expect("refused");
        assert!(err.to_string().contains("unfinished import"), "{err}");
        // The same import again finishes it.
        let done = import(&store, &mut file.as_slice(), false).expect("import");
        assert!(done.resumed);
        let d = DirectoryService::open_meta(
            std::path::Path::new("unused"),
            &target,
            DirectoryConfig::default(),
        )
        .expect("opens");
        assert_eq!(d.cluster_id(), id, "the cluster id came across");
        assert_eq!(read_fence_base(&store).expect("base"), 777);
        // A prefix in use is refused, or replaced when told (the fence base never goes down).
        let err = import(&store, &mut file.as_slice(), false).expect_err("not empty");
        assert!(err.to_string().contains("--replace"), "{err}");
        let (other, lower) = exported(5);
        let done = import(&store, &mut lower.as_slice(), true).expect("replace");
        assert!(!done.resumed);
        let d = DirectoryService::open_meta(
            std::path::Path::new("unused"),
            &target,
            DirectoryConfig::default(),
        )
        .expect("opens");
        assert_eq!(d.cluster_id(), other);
        assert!(
            read_fence_base(&store).expect("base") > 777,
            "never lowered"
        );
    }

    #[test]
    fn an_export_from_etcd_carries_its_base_plus_revision_and_newer_files_are_refused() {
        let (_, file) = exported(1000);
        let target = etcd_prefix();
        let store = connect(&target);
        import(&store, &mut file.as_slice(), false).expect("import");
        let mut again = Vec::new();
        let s = export(&store, 0, &mut again).expect("export");
        assert!(
            s.header.fence_base > 1000,
            "above the base: etcd's revision is added"
        );
        let mut newer = serde_json::to_value(&s.header).expect("json");
        newer["version"] = (VERSION + 1).into();
        let line = format!("{newer}\n");
        let err = read_header(&mut line.as_bytes()).expect_err("newer");
        assert!(err.to_string().contains("newer dfs"), "{err}");
        let mut unknown = serde_json::to_value(&s.header).expect("json");
        unknown["tables"] = serde_json::json!(["nodes", "from_the_future"]);
        let line = format!("{unknown}\n");
        let err = read_header(&mut line.as_bytes()).expect_err("unknown table");
        assert!(err.to_string().contains("from_the_future"), "{err}");
    }
}
