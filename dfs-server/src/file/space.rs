//! Disk space of a file server: what its file system holds and what it may still take. A
//! reserve is kept back (by default 5% of the disk, at most 1 GiB) so that the server's own
//! bookkeeping (pack compaction, its index, fence marks) never meets a full disk; a write that
//! would eat into it is refused as `no_space` before its body is read.

use std::path::{Path, PathBuf};

use common::api::Space;

use crate::error::{ServiceError, ServiceResult};

/// The disk a data directory lives on.
#[derive(Debug, Clone)]
pub struct Disk {
    root: PathBuf,
    /// Bytes kept back; None: the default share of the disk.
    reserve: Option<u64>,
}

/// The default reserve for a file system of `total` bytes.
pub fn default_reserve(total: u64) -> u64 {
    (total / 20).min(1 << 30)
}

impl Disk {
    /// The disk of `root`, keeping `reserve` bytes back (None: the default).
    pub fn new(root: &Path, reserve: Option<u64>) -> Self {
        Disk {
            root: root.to_path_buf(),
            reserve,
        }
    }

    /// Size and room left now.
    pub fn space(&self) -> ServiceResult<Space> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| ServiceError::internal("statvfs", std::io::Error::from(e)))?;
        let total = st.f_blocks.saturating_mul(st.f_frsize);
        let avail = st.f_bavail.saturating_mul(st.f_frsize);
        let reserve = self.reserve.unwrap_or_else(|| default_reserve(total));
        Ok(Space {
            total_bytes: total,
            free_bytes: avail.saturating_sub(reserve),
        })
    }

    /// Refuses a write of `bytes` that the disk has no room for.
    pub fn check_room(&self, bytes: u64) -> ServiceResult<()> {
        let space = self.space()?;
        if bytes > space.free_bytes {
            return Err(ServiceError::NoSpace(format!(
                "{bytes} bytes do not fit: {} bytes free on this server (after its reserve)",
                space.free_bytes
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_kept_back_and_a_write_past_it_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let all = Disk::new(dir.path(), Some(0)).space().expect("space");
        assert!(all.total_bytes > 0 && all.free_bytes > 0);
        // A reserve as large as the disk leaves no room at all.
        let none = Disk::new(dir.path(), Some(all.total_bytes));
        assert_eq!(none.space().expect("space").free_bytes, 0);
        assert!(matches!(none.check_room(1), Err(ServiceError::NoSpace(_))));
        assert!(none.check_room(0).is_ok());
        assert_eq!(default_reserve(10 << 30), 512 << 20);
        assert_eq!(default_reserve(100 << 30), 1 << 30);
    }
}
