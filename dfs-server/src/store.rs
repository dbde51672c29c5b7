//! Record encoding for the services' redb stores (opened through `commit::GroupCommit`), plus
//! the durable-file helpers (tmp + fsync + rename + dir fsync) used for blobs and keys.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ServiceError, ServiceResult};

/// Serialises a value for storage.
pub fn encode<T: Serialize>(v: &T) -> ServiceResult<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

/// Deserialises a stored value; a failure means a corrupt store, reported as internal.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> ServiceResult<T> {
    serde_json::from_slice(bytes).map_err(|e| ServiceError::internal("decoding stored record", e))
}

/// Writes `data` to `path` durably: a temp file beside it, fsync, rename, fsync of the directory.
pub fn write_durable(path: &Path, data: &[u8], mode: u32) -> ServiceResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .ok_or_else(|| ServiceError::internal("durable write", "path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    // A temp name of its own: two writers never share (and corrupt) one temp file.
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

/// Creates `path` with `data` durably unless it exists (then returns false): a temp file,
/// fsync, then a hard link, which unlike rename never replaces what another process made.
pub fn create_durable_new(path: &Path, data: &[u8], mode: u32) -> ServiceResult<bool> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .ok_or_else(|| ServiceError::internal("durable create", "path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".new.{}.{}.tmp",
        std::process::id(),
        hex::encode(rand::random::<[u8; 6]>())
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Takes an exclusive lock on `dir` (a `flock` of `dir/lock`, made 0600 if missing), held
/// until the returned file is dropped or the process ends: a second process starting on the
/// same data directory is refused at once, before it reads or makes anything there.
pub fn lock_dir(dir: &Path, what: &str) -> ServiceResult<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(f),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ServiceError::DataDirInUse(format!(
            "another {what} is already running on {} (it holds the lock on {}); stop it or \
             give this one another --data",
            dir.display(),
            path.display()
        ))),
        Err(e) => Err(ServiceError::internal(
            &format!("locking {}", path.display()),
            e,
        )),
    }
}

/// fsyncs a directory so that a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> ServiceResult<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub use common::meta::now_ns;

/// The key of a redb store's format record (in the store's own `&str → u64` table).
pub const FORMAT_KEY: &str = "format";

/// Checks the format record of the redb store at `path` (row `FORMAT_KEY` of `table`, inside
/// write transaction `tx`, before anything else of the store is touched) against `current`,
/// the format this build writes. A newer one is refused, naming the file and both formats
/// (the caller's transaction then aborts: the store stays as it was); an older one, or none
/// (a store of a release before format records), is stamped `current` (logged; the caller
/// upgrades the rest in the same transaction). Returns the format found (0: none).
pub fn check_format(
    tx: &redb::WriteTransaction,
    table: redb::TableDefinition<&str, u64>,
    path: &Path,
    current: u64,
) -> ServiceResult<u64> {
    use redb::ReadableTable;
    let mut t = tx.open_table(table)?;
    let found = t.get(FORMAT_KEY)?.map(|v| v.value());
    match found {
        Some(f) if f > current => Err(newer_format(&path.display().to_string(), f, current)),
        Some(f) if f == current => Ok(f),
        _ => {
            t.insert(FORMAT_KEY, current)?;
            tracing::info!(
                store = %path.display(),
                from = found.unwrap_or(0),
                to = current,
                "store format upgraded"
            );
            Ok(found.unwrap_or(0))
        }
    }
}

/// The refusal of a store written by a newer dfs.
pub fn newer_format(what: &str, found: u64, current: u64) -> ServiceError {
    ServiceError::Internal(format!(
        "{what} is format {found}, written by a newer dfs; this dfs-server knows formats up to \
         {current} and does not downgrade a store: run the newer dfs-server"
    ))
}

#[cfg(test)]
mod tests {
    use crate::error::ServiceError;

    #[test]
    fn a_locked_data_dir_is_refused_as_in_use_not_as_unavailable() {
        let tmp = tempfile::tempdir().unwrap();
        let _held = super::lock_dir(tmp.path(), "auth service").unwrap();
        match super::lock_dir(tmp.path(), "auth service") {
            Err(ServiceError::DataDirInUse(m)) => {
                assert!(
                    m.contains("another auth service is already running on"),
                    "{m}"
                )
            }
            other => panic!("expected DataDirInUse, got {other:?}"),
        }
    }
}

/// Every store's format record: a newer format is refused, untouched; a store of the release
/// before format records (none) is accepted and stamped.
#[cfg(test)]
mod format_tests {
    use std::path::Path;

    use redb::{ReadableDatabase, TableDefinition};

    /// Writes `rows` into table `table` of a new redb file at `path`.
    fn make(path: &Path, table: &str, rows: &[(&str, u64)]) {
        let db = redb::Database::create(path).expect("create");
        let tx = db.begin_write().expect("begin");
        {
            let mut t = tx
                .open_table(TableDefinition::<&str, u64>::new(table))
                .expect("table");
            for (k, v) in rows {
                t.insert(*k, *v).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }

    fn read(path: &Path, table: &str, key: &str) -> Option<u64> {
        let db = redb::Database::open(path).expect("open");
        let tx = db.begin_read().expect("begin");
        let t = tx
            .open_table(TableDefinition::<&str, u64>::new(table))
            .expect("table");
        t.get(key).expect("get").map(|v| v.value())
    }

    fn assert_refused(err: impl std::fmt::Display, file: &str, found: u64, current: u64) {
        let m = err.to_string();
        assert!(
            m.contains(file)
                && m.contains(&format!("format {found}"))
                && m.contains(&format!("up to {current}")),
            "{m}"
        );
    }

    #[test]
    fn the_lock_store_refuses_a_newer_format_and_stamps_an_old_one() {
        use crate::lock::local::{LOCK_FORMAT, fence_high_water};
        use crate::lock::{LockConfig, LockService};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("lock.redb");
        let newer = LOCK_FORMAT + 1;
        make(
            &path,
            "lock_meta",
            &[("format", newer), ("fence_reserved_upto", 7)],
        );
        let err = LockService::open(dir.path(), LockConfig::default(), "k")
            .err()
            .expect("refused");
        assert_refused(err, "lock.redb", newer, LOCK_FORMAT);
        assert!(
            fence_high_water(dir.path()).is_err(),
            "the export refuses it too"
        );
        assert_eq!(read(&path, "lock_meta", "format"), Some(newer), "untouched");
        assert_eq!(read(&path, "lock_meta", "fence_reserved_upto"), Some(7));

        let old = tempfile::tempdir().expect("tempdir");
        let path = old.path().join("lock.redb");
        make(&path, "lock_meta", &[("fence_reserved_upto", 5000)]);
        drop(LockService::open(old.path(), LockConfig::default(), "k").expect("opens"));
        assert_eq!(read(&path, "lock_meta", "format"), Some(LOCK_FORMAT));
        assert_eq!(fence_high_water(old.path()).expect("read"), 5000, "kept");
        // Idempotent: opened again as it is.
        drop(LockService::open(old.path(), LockConfig::default(), "k").expect("opens"));
        assert_eq!(read(&path, "lock_meta", "format"), Some(LOCK_FORMAT));
    }

    #[test]
    fn the_auth_store_refuses_a_newer_format_and_stamps_an_old_one() {
        use crate::auth::{AUTH_FORMAT, AuthConfig, AuthService};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("auth.redb");
        let newer = AUTH_FORMAT + 1;
        make(&path, "auth_meta", &[("format", newer)]);
        let err = AuthService::open(dir.path(), AuthConfig::default())
            .err()
            .expect("refused");
        assert_refused(err, "auth.redb", newer, AUTH_FORMAT);
        assert_eq!(read(&path, "auth_meta", "format"), Some(newer), "untouched");

        let old = tempfile::tempdir().expect("tempdir");
        let path = old.path().join("auth.redb");
        make(&path, "nonces", &[("n1", 1)]);
        drop(AuthService::open(old.path(), AuthConfig::default()).expect("opens"));
        assert_eq!(read(&path, "auth_meta", "format"), Some(AUTH_FORMAT));
        assert_eq!(read(&path, "nonces", "n1"), Some(1), "its records kept");
    }

    #[test]
    fn the_file_store_refuses_a_newer_format_untouched_and_stamps_an_old_one() {
        use crate::file::{FILE_FORMAT, FileStore};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("file.redb");
        let newer = FILE_FORMAT + 1;
        make(&path, "file_meta", &[("format", newer)]);
        std::fs::create_dir(dir.path().join("tmp")).expect("mkdir");
        let err = FileStore::open(dir.path(), 1 << 20).err().expect("refused");
        assert_refused(err, "file.redb", newer, FILE_FORMAT);
        assert_eq!(read(&path, "file_meta", "format"), Some(newer));
        assert!(
            dir.path().join("tmp").exists() && !dir.path().join("objects").exists(),
            "nothing in the data directory was cleaned up or made"
        );

        let old = tempfile::tempdir().expect("tempdir");
        let path = old.path().join("file.redb");
        {
            let db = redb::Database::create(&path).expect("create");
            let tx = db.begin_write().expect("begin");
            tx.open_table(TableDefinition::<u64, u64>::new("fences"))
                .expect("table")
                .insert(7, 42)
                .expect("insert");
            tx.commit().expect("commit");
        }
        let store = FileStore::open(old.path(), 1 << 20).expect("opens");
        let stale = store.check_fence(common::NodeId(7), common::FenceToken(41));
        assert!(stale.is_err(), "the fence mark was kept");
        store
            .check_fence(common::NodeId(7), common::FenceToken(42))
            .expect("the mark itself passes");
        drop(store);
        assert_eq!(read(&path, "file_meta", "format"), Some(FILE_FORMAT));
    }
}
