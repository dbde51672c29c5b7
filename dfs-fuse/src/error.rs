//! `FsError` and the one table from errors to errno.

use common::{ErrorCode, NameError};

use crate::cache::CacheError;
use crate::remote::RemoteError;

/// Why a file system operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// A cluster call failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The local cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Local I/O on a cache file.
    #[error("local I/O: {0}")]
    Io(#[from] std::io::Error),
    /// An invalid entry name.
    #[error("invalid name: {0}")]
    Name(#[from] NameError),
    /// A name that is not UTF-8.
    #[error("names must be UTF-8")]
    NotUtf8,
    /// An unknown file handle.
    #[error("bad file handle {0}")]
    BadHandle(u64),
    /// Something dfs does not do.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// A push on close/fsync did not complete; the data stays in the cache, pending.
    #[error("upload not done (kept in the cache and retried): {0}")]
    PushFailed(String),
    /// The operation needs a regular file.
    #[error("not a regular file")]
    NotAFile,
    /// No such entry, known without asking (a fresh complete listing of the directory).
    #[error("no such entry")]
    Absent,
    /// A lock asked for without waiting is held by someone else.
    #[error("the lock is held elsewhere")]
    WouldBlock,
    /// A wait given up because the caller got a signal.
    #[error("interrupted")]
    Interrupted,
    /// The permission bits refuse this mount's user the access asked (`access(2)`).
    #[error("permission denied")]
    AccessDenied,
    /// An argument the operation does not take.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Only the owner (or the administrator) may make this change (EPERM), known without
    /// asking: a change folded into a later push is judged when made, not at the push.
    #[error("only the owner may {0}")]
    NotOwner(&'static str),
}

impl FsError {
    /// The errno reported to the application.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Remote(RemoteError::Api { code, .. }) => match code {
                ErrorCode::NotFound => libc::ENOENT,
                ErrorCode::Exists => libc::EEXIST,
                ErrorCode::NotEmpty => libc::ENOTEMPTY,
                ErrorCode::NotDir => libc::ENOTDIR,
                ErrorCode::IsDir => libc::EISDIR,
                ErrorCode::InvalidMove | ErrorCode::InvalidName | ErrorCode::BadRequest => {
                    libc::EINVAL
                }
                ErrorCode::Unauthorized | ErrorCode::Replay => libc::EACCES,
                ErrorCode::Forbidden | ErrorCode::NotAdministrator => libc::EPERM,
                ErrorCode::InUse => libc::EBUSY,
                ErrorCode::AccessDenied => libc::EACCES,
                ErrorCode::TooLarge => libc::EFBIG,
                ErrorCode::NoSpace => libc::ENOSPC,
                ErrorCode::NameTooLong => libc::ENAMETOOLONG,
                ErrorCode::RateLimited => libc::EAGAIN,
                ErrorCode::TooManyLinks => libc::EMLINK,
                ErrorCode::ProtocolMismatch => libc::EPROTO,
                ErrorCode::StaleFence
                | ErrorCode::HashMismatch
                | ErrorCode::NotHolder
                | ErrorCode::NotPrimary
                | ErrorCode::Unavailable
                | ErrorCode::Internal
                | ErrorCode::NoRoute
                | ErrorCode::Conflict => libc::EIO,
            },
            FsError::Remote(RemoteError::Timeout(_)) => libc::ETIMEDOUT,
            FsError::Remote(RemoteError::NotLoggedIn(_) | RemoteError::AuthKeyChanged { .. }) => {
                libc::EACCES
            }
            FsError::Remote(RemoteError::Network(_) | RemoteError::Io(_)) => libc::EIO,
            FsError::Remote(RemoteError::Local { errno, .. }) => *errno,
            FsError::Cache(_) => libc::EIO,
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            FsError::Name(NameError::TooLong(_)) => libc::ENAMETOOLONG,
            FsError::Name(_) | FsError::NotUtf8 => libc::EINVAL,
            FsError::BadHandle(_) => libc::EBADF,
            FsError::Unsupported(_) => libc::ENOTSUP,
            FsError::NotAFile => libc::EINVAL,
            FsError::Absent => libc::ENOENT,
            FsError::WouldBlock => libc::EAGAIN,
            FsError::Interrupted => libc::EINTR,
            FsError::AccessDenied => libc::EACCES,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::NotOwner(_) => libc::EPERM,
            FsError::PushFailed(_) => libc::EIO,
        }
    }

    /// Whether this is an ordinary "no such entry" (logged at debug, not warn).
    pub fn is_not_found(&self) -> bool {
        self.errno() == libc::ENOENT
    }
}

/// Result of a core operation.
pub type FsResult<T> = Result<T, FsError>;
