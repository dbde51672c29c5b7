//! The one JSON error shape every dfs service returns.

use serde::{Deserialize, Serialize};

/// Machine-readable error class; the client maps it to an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request (bad JSON, bad header, bad query).
    BadRequest,
    /// A name that is empty, `.`, `..`, contains `/` or NUL, or is too long.
    InvalidName,
    /// The named node, server, user or blob does not exist.
    NotFound,
    /// The name already exists.
    Exists,
    /// rmdir of a directory that still has entries.
    NotEmpty,
    /// A directory operation on a non-directory.
    NotDir,
    /// A file operation on a directory.
    IsDir,
    /// A rename that would move a directory into itself.
    InvalidMove,
    /// Missing, malformed or expired credentials.
    Unauthorized,
    /// Authenticated, but not allowed: an operation only the owner, the administrator or
    /// another service may do (EPERM).
    Forbidden,
    /// The node's permission bits refuse the caller this access (EACCES).
    AccessDenied,
    /// A fencing token older than one already accepted.
    StaleFence,
    /// The body's SHA-256 differs from the declared hash.
    HashMismatch,
    /// A body or field over its size limit.
    TooLarge,
    /// A replayed or stale login envelope.
    Replay,
    /// The lock is not held by the caller.
    NotHolder,
    /// A write sent to a file server that is not (or no longer) the file's primary, or with a
    /// placement the directory no longer has: fetch the metadata again and resend.
    NotPrimary,
    /// Not enough live servers, or a peer did not answer.
    Unavailable,
    /// A bug or an I/O failure on the server; details are in its log.
    Internal,
    /// The service has no such route: the request went to the wrong URL or the wrong kind of
    /// service. Never evidence that a node, user or blob is missing.
    NoRoute,
    /// A push that may not replace the current version: it was based on an older one and no
    /// close waits for it any more (see [`crate::api::PushBase`]). The writer keeps its content
    /// as a conflict copy.
    Conflict,
    /// A file server (or every one that could take the file) is out of space.
    NoSpace,
    /// A name over 255 bytes, or a symlink target over 4096 (ENAMETOOLONG).
    NameTooLong,
    /// Too many login or signup attempts for this user or from this address: try again later.
    RateLimited,
    /// A request names a local caller to act for (`x-dfs-act-as`) but its login is not (any
    /// more) the administrator's: a `--local-ids` mount whose login lost the flag. Permanent
    /// until the login is made the administrator again and renewed (EPERM).
    NotAdministrator,
    /// The thing is still in use and cannot go: a named group that is some user's primary
    /// group (EBUSY).
    InUse,
    /// A file that already has as many names as a link count can hold (EMLINK).
    TooManyLinks,
    /// The request speaks a newer dfs protocol (`x-dfs-protocol`) than this service knows:
    /// one side must be upgraded (EPROTO).
    ProtocolMismatch,
}

/// Body of every non-2xx response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error class.
    pub code: ErrorCode,
    /// A one-line, human-readable explanation.
    pub message: String,
}
