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
