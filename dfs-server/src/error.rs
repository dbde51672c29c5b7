//! `ServiceError`: the domain errors of every service. No HTTP types here; `http::AppError`
//! maps them to status codes in one table.

use common::{ErrorCode, FenceToken, NameError};

/// An error from a service's logic.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Malformed input.
    #[error("{0}")]
    BadRequest(String),
    /// An invalid entry name.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// Missing node, user, server, blob.
    #[error("{0} not found")]
    NotFound(String),
    /// Name or user taken.
    #[error("{0} already exists")]
    Exists(String),
    /// rmdir of a non-empty directory.
    #[error("directory {0} is not empty")]
    NotEmpty(String),
    /// A directory operation on something else.
    #[error("{0} is not a directory")]
    NotDir(String),
    /// A file operation on a directory.
    #[error("{0} is a directory")]
    IsDir(String),
    /// rename of a directory into its own subtree.
    #[error("cannot move a directory into itself")]
    InvalidMove,
    /// Bad or expired credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// Not allowed: only the owner, the administrator or another service may (EPERM).
    #[error("{0}")]
    Forbidden(String),
    /// The permission bits refuse this access (EACCES).
    #[error("permission denied: {0}")]
    AccessDenied(String),
    /// A write fenced off by a newer lock holder.
    #[error("stale fencing token: {0}")]
    StaleFence(String),
    /// Body and declared hash differ.
    #[error("content hash mismatch: declared {declared}, body hashes to {actual}")]
    HashMismatch {
        /// Declared by the sender.
        declared: String,
        /// Computed from the body.
        actual: String,
    },
    /// Over a size limit.
    #[error("{0}")]
    TooLarge(String),
    /// Replayed or stale login envelope.
    #[error("{0}")]
    Replay(String),
    /// Lock operation by a non-holder.
    #[error("{0}")]
    NotHolder(String),
    /// A write sent to a server that is not the file's primary, or with a stale placement.
    #[error("{0}")]
    NotPrimary(String),
    /// Not enough live servers, or a peer failed.
    #[error("{0}")]
    Unavailable(String),
    /// Storage or I/O failure; the detail is logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
    /// No such route on the service asked (a wrong URL or a different service).
    #[error("no such route: {0}")]
    NoRoute(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("out of space: {0}")]
    NoSpace(String),
    /// A symlink target (or name) over its length limit.
    #[error("{0}")]
    NameTooLong(String),
    /// Too many login or signup attempts (per user or per address).
    #[error("{0}")]
    RateLimited(String),
    /// An `x-dfs-act-as` header from a login that is not the administrator's.
    #[error("{0}")]
    NotAdministrator(String),
    /// Still in use (a group that is some user's primary group).
    #[error("{0}")]
    InUse(String),
    /// A link to a file whose link count is at its maximum (EMLINK).
    #[error("{0}")]
    TooManyLinks(String),
    /// A request of a newer protocol version than this service speaks.
    #[error("{0}")]
    ProtocolMismatch(String),
    /// A service's data directory is locked by another running process: a start-up error of a
    /// binary, never an answer to a request.
    #[error("{0}")]
    DataDirInUse(String),
    /// The answer remembered for a retried request (`directory::requests`): its refusal, as
    /// it was given the first time.
    #[error("{}", .0.message)]
    Remembered(common::ErrorBody),
}

impl ServiceError {
    /// The wire error class.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::BadRequest(_) => ErrorCode::BadRequest,
            ServiceError::InvalidName(NameError::TooLong(_)) | ServiceError::NameTooLong(_) => {
                ErrorCode::NameTooLong
            }
            ServiceError::InvalidName(_) => ErrorCode::InvalidName,
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::Exists(_) => ErrorCode::Exists,
            ServiceError::NotEmpty(_) => ErrorCode::NotEmpty,
            ServiceError::NotDir(_) => ErrorCode::NotDir,
            ServiceError::IsDir(_) => ErrorCode::IsDir,
            ServiceError::InvalidMove => ErrorCode::InvalidMove,
            ServiceError::Unauthorized(_) => ErrorCode::Unauthorized,
            ServiceError::Forbidden(_) => ErrorCode::Forbidden,
            ServiceError::AccessDenied(_) => ErrorCode::AccessDenied,
            ServiceError::StaleFence(_) => ErrorCode::StaleFence,
            ServiceError::HashMismatch { .. } => ErrorCode::HashMismatch,
            ServiceError::TooLarge(_) => ErrorCode::TooLarge,
            ServiceError::Replay(_) => ErrorCode::Replay,
            ServiceError::NotHolder(_) => ErrorCode::NotHolder,
            ServiceError::NotPrimary(_) => ErrorCode::NotPrimary,
            ServiceError::Unavailable(_) => ErrorCode::Unavailable,
            ServiceError::Internal(_) => ErrorCode::Internal,
            ServiceError::NoRoute(_) => ErrorCode::NoRoute,
            ServiceError::Conflict(_) => ErrorCode::Conflict,
            ServiceError::NoSpace(_) => ErrorCode::NoSpace,
            ServiceError::RateLimited(_) => ErrorCode::RateLimited,
            ServiceError::NotAdministrator(_) => ErrorCode::NotAdministrator,
            ServiceError::InUse(_) => ErrorCode::InUse,
            ServiceError::TooManyLinks(_) => ErrorCode::TooManyLinks,
            ServiceError::ProtocolMismatch(_) => ErrorCode::ProtocolMismatch,
            // Never sent; were it ever, the client would learn only that the server failed,
            // and the server log would say which directory (as for any internal error).
            ServiceError::DataDirInUse(_) => ErrorCode::Internal,
            ServiceError::Remembered(body) => body.code,
        }
    }

    /// A stale-fence error naming both tokens.
    pub fn stale(got: FenceToken, newest: FenceToken) -> Self {
        ServiceError::StaleFence(format!(
            "{got} is older than {newest}, already accepted for this file"
        ))
    }

    /// Rebuilds an error received from another service from its wire form.
    pub fn from_wire(code: ErrorCode, message: String) -> Self {
        match code {
            ErrorCode::BadRequest | ErrorCode::InvalidName | ErrorCode::InvalidMove => {
                ServiceError::BadRequest(message)
            }
            ErrorCode::NotFound => ServiceError::NotFound(message),
            ErrorCode::Exists => ServiceError::Exists(message),
            ErrorCode::NotEmpty => ServiceError::NotEmpty(message),
            ErrorCode::NotDir => ServiceError::NotDir(message),
            ErrorCode::IsDir => ServiceError::IsDir(message),
            ErrorCode::Unauthorized | ErrorCode::Replay => ServiceError::Unauthorized(message),
            ErrorCode::Forbidden => ServiceError::Forbidden(message),
            ErrorCode::AccessDenied => ServiceError::AccessDenied(message),
            ErrorCode::StaleFence => ServiceError::StaleFence(message),
            ErrorCode::HashMismatch => ServiceError::BadRequest(message),
            ErrorCode::TooLarge => ServiceError::TooLarge(message),
            ErrorCode::NotHolder => ServiceError::NotHolder(message),
            ErrorCode::NotPrimary => ServiceError::NotPrimary(message),
            ErrorCode::Unavailable | ErrorCode::Internal => ServiceError::Unavailable(message),
            ErrorCode::NoRoute => ServiceError::NoRoute(message),
            ErrorCode::Conflict => ServiceError::Conflict(message),
            ErrorCode::NoSpace => ServiceError::NoSpace(message),
            ErrorCode::NameTooLong => ServiceError::NameTooLong(message),
            ErrorCode::RateLimited => ServiceError::RateLimited(message),
            ErrorCode::NotAdministrator => ServiceError::NotAdministrator(message),
            ErrorCode::InUse => ServiceError::InUse(message),
            ErrorCode::TooManyLinks => ServiceError::TooManyLinks(message),
            ErrorCode::ProtocolMismatch => ServiceError::ProtocolMismatch(message),
        }
    }

    /// The wire form: internal details stay in the log, never in the answer.
    pub fn to_body(&self) -> common::ErrorBody {
        let code = self.code();
        let message = if code == ErrorCode::Internal {
            tracing::error!(error = %self, "request failed");
            "internal error; see the server log".to_owned()
        } else {
            tracing::debug!(error = %self, "request refused");
            self.to_string()
        };
        common::ErrorBody { code, message }
    }

    /// Wraps any storage/I/O error with context.
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        ServiceError::Internal(format!("{context}: {e}"))
    }
}

/// One item of a batch answer.
pub fn item_result<T>(r: ServiceResult<T>) -> common::api::ItemResult<T> {
    match r {
        Ok(v) => common::api::ItemResult::Ok(v),
        Err(e) => common::api::ItemResult::Err(e.to_body()),
    }
}

macro_rules! internal_from {
    ($($t:ty),*) => {$(
        impl From<$t> for ServiceError {
            fn from(e: $t) -> Self {
                ServiceError::Internal(format!("{}: {e}", stringify!($t)))
            }
        }
    )*};
}

internal_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
    serde_json::Error
);

impl From<std::io::Error> for ServiceError {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => ServiceError::NoSpace(e.to_string()),
            _ => ServiceError::Internal(format!("std::io::Error: {e}")),
        }
    }
}

/// Result alias for service logic.
pub type ServiceResult<T> = Result<T, ServiceError>;
