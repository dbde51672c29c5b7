//! URL paths and header names, used by both the routers and the client so they cannot drift.
//! Router patterns use axum's `{param}` syntax; the functions build concrete paths.

use crate::ids::{ContentHash, NodeId};

/// Liveness probe answered by every service.
pub const HEALTH: &str = "/health";
/// Prometheus text exposition, on every service and on a client started with `--metrics`.
pub const METRICS: &str = "/metrics";
/// The dfs protocol version this build speaks: sent on every request and every answer in
/// [`PROTOCOL_HEADER`]. Raised when a change breaks what an older peer understands.
pub const PROTOCOL_VERSION: u32 = 1;
/// Header carrying the sender's protocol version (a request without it is taken as version 1).
pub const PROTOCOL_HEADER: &str = "x-dfs-protocol";
/// Header carrying the cluster key on service-to-service calls.
pub const CLUSTER_KEY_HEADER: &str = "x-dfs-cluster-key";
/// Header carrying the writer's fencing token on an upload.
pub const FENCE_HEADER: &str = "x-dfs-fence";
/// Header carrying the lock service's signature of the fencing token.
pub const FENCE_SIG_HEADER: &str = "x-dfs-fence-sig";
/// Header carrying the SHA-256 (hex) the body must have.
pub const HASH_HEADER: &str = "x-dfs-hash";
/// Header carrying the idempotency key of an upload.
pub const UPLOAD_ID_HEADER: &str = "x-dfs-upload-id";
/// Header of an upload: the placement the writer knows, `primary,replica,...` (server ids). The
/// primary pushes to these replicas without asking the directory; the directory refuses the
/// commit if the placement changed meanwhile.
pub const PLACEMENT_HEADER: &str = "x-dfs-placement";
/// Header of an upload: the version its content was based on ([`crate::api::PushBase`]).
pub const BASE_HEADER: &str = "x-dfs-base";
/// Header of an upload: permission bits to apply with the new version (octal).
pub const MODE_HEADER: &str = "x-dfs-mode";
/// Header of an upload: explicit modification time to apply with the new version (ns).
pub const MTIME_HEADER: &str = "x-dfs-mtime-ns";
/// Header of a namespace change: the client's id for the operation, the same on every retry of
/// it, so that the directory applies it once (≤ 64 characters of `[A-Za-z0-9-]`).
pub const REQUEST_ID: &str = "x-dfs-request-id";

/// Directory: cluster map (lock and auth URLs, file servers).
pub const CLUSTER: &str = "/v1/cluster";
/// Directory: totals for statfs.
pub const STATFS: &str = "/v1/statfs";
/// Directory: atomic rename.
pub const RENAME: &str = "/v1/rename";
/// Directory: one more name for a file (hard link).
pub const LINK: &str = "/v1/link";
/// Directory: one node's metadata (GET) or setattr (PATCH).
pub const NODE: &str = "/v1/nodes/{id}";
/// Directory: list (GET) or create in (POST) a directory.
pub const CHILDREN: &str = "/v1/nodes/{id}/children";
/// Directory: lookup (GET) or remove (DELETE) one entry.
pub const CHILD: &str = "/v1/nodes/{id}/children/{name}";
/// Directory, internal: file server registration.
pub const REGISTER_SERVER: &str = "/v1/internal/servers";
/// Directory, internal: file server heartbeat.
pub const HEARTBEAT: &str = "/v1/internal/servers/{id}/heartbeat";
/// Directory, internal: lock/auth service registration.
pub const REGISTER_SERVICE: &str = "/v1/internal/services";
/// Directory, internal: record a new version written by a primary.
pub const COMMIT: &str = "/v1/internal/nodes/{id}/commit";

/// Lock: join the queue / wait for the grant (long poll).
pub const LOCK_ACQUIRE: &str = "/v1/locks/{id}/acquire";
/// Lock: extend the lease.
pub const LOCK_RENEW: &str = "/v1/locks/{id}/renew";
/// Lock: give the lock up (or leave the queue).
pub const LOCK_RELEASE: &str = "/v1/locks/{id}/release";
/// Lock: every lock held or waited for.
pub const LOCKS: &str = "/v1/locks";
/// Lock: take an application lock (`flock`/`fcntl`) on a file.
pub const APPLOCK_LOCK: &str = "/v1/applocks/{id}/lock";
/// Lock: give an application lock up (or leave its queue).
pub const APPLOCK_UNLOCK: &str = "/v1/applocks/{id}/unlock";
/// Lock: which holder would conflict with a request (`F_GETLK`).
pub const APPLOCK_TEST: &str = "/v1/applocks/{id}/test";
/// Lock: renew every application lock of a client session.
pub const APPLOCK_RENEW: &str = "/v1/applocks/renew";

/// Auth: the RSA public key (SPKI PEM).
pub const AUTH_PUBLIC_KEY: &str = "/v1/auth/public-key";
/// Auth: create a user.
pub const AUTH_SIGNUP: &str = "/v1/auth/signup";
/// Auth: exchange credentials for a token.
pub const AUTH_LOGIN: &str = "/v1/auth/login";
/// Auth: exchange a refresh token for a new token.
pub const AUTH_REFRESH: &str = "/v1/auth/refresh";
/// Response header of an open the directory authorised (`GET /v1/nodes/{id}?access=r`), and
/// request header of the download: the capability a file server serves a blob against.
pub const CAPABILITY_HEADER: &str = "x-dfs-capability";
/// Header of an administrator's `--local-ids` mount: the local caller the request acts as
/// (`uid:gid:group,group,...`, [`crate::perm::Identity::act_as_header`]).
pub const ACT_AS_HEADER: &str = "x-dfs-act-as";
/// `GET`: every user and their identity (cluster key).
pub const AUTH_USERS: &str = "/v1/auth/users";
/// `PATCH`: change a user's identity (cluster key).
pub const AUTH_USER: &str = "/v1/auth/users/{name}";

/// `AUTH_USER` for one user.
pub fn auth_user(name: &str) -> String {
    format!("/v1/auth/users/{name}")
}

/// Auth: `GET` every group with its gid and members (cluster key).
pub const AUTH_GROUPS: &str = "/v1/auth/groups";
/// `POST`: create a group and/or add members to it (cluster key).
pub const AUTH_GROUP: &str = "/v1/auth/groups/{name}";
/// `POST`: remove members from a group, or the group itself (cluster key).
pub const AUTH_GROUP_REMOVE: &str = "/v1/auth/groups/{name}/remove";

/// `AUTH_GROUP` for one group.
pub fn auth_group(name: &str) -> String {
    format!("/v1/auth/groups/{name}")
}

/// `AUTH_GROUP_REMOVE` for one group.
pub fn auth_group_remove(name: &str) -> String {
    format!("/v1/auth/groups/{name}/remove")
}

/// File server: upload a new version to the primary (PUT, streamed body).
pub const FILE_WRITE: &str = "/v1/files/{id}";
/// File server: download one exact content (GET, streamed body).
pub const FILE_READ: &str = "/v1/files/{id}/{hash}";
/// File server, internal: replica push from a primary (PUT, streamed body).
pub const REPLICA_PUT: &str = "/v1/internal/files/{id}/{hash}";
/// File server, internal: drop the copy of one superseded version.
pub const DROP_BLOB: &str = "/v1/internal/files/{id}/{hash}/drop";
/// File server, internal: push a blob this server holds to another server (re-replication).
pub const COPY_TO: &str = "/v1/internal/files/{id}/{hash}/copy-to";
/// Directory, internal: a server lost its copy of a version (scrub found it corrupt).
pub const DROP_HOLDER: &str = "/v1/internal/nodes/{id}/drop-holder";
/// A client announces a write-back push of a file (`POST`).
pub const INTENT: &str = "/v1/nodes/{id}/intent";

/// Path of [`INTENT`].
pub fn intent(id: NodeId) -> String {
    format!("/v1/nodes/{id}/intent")
}

/// A replica that finished after the write was acknowledged joins the version's holders.
pub const ADD_HOLDER: &str = "/v1/internal/nodes/{id}/add-holder";
/// Batched upload of small files to their common primary (write-back).
pub const FILE_BATCH_WRITE: &str = "/v1/batch/files";
/// Batched replica store, primary to replica.
pub const REPLICA_BATCH: &str = "/v1/internal/batch/files";
/// Batched version commit, primary to directory.
pub const COMMIT_BATCH: &str = "/v1/internal/batch/commit";
/// `GET`: the change feed (long poll; `ChangesQuery`, `ChangesResponse`).
pub const CHANGES: &str = "/v1/changes";
/// The client process a directory request comes from (32 hex digits, random per process):
/// the change feed does not tell a client the changes it made itself.
pub const ORIGIN_HEADER: &str = "x-dfs-origin";

/// An origin as sent in [`ORIGIN_HEADER`]: exactly 32 hex digits.
pub fn parse_origin(s: &str) -> Option<u128> {
    (s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(s, 16).ok())
        .flatten()
}
/// Late copies of a batched upload join the holders, primary to directory.
pub const ADD_HOLDERS_BATCH: &str = "/v1/internal/batch/add-holders";
/// File server counters.
pub const FILE_STATS: &str = "/v1/stats";

/// `/v1/nodes/{id}`.
pub fn node(id: NodeId) -> String {
    format!("/v1/nodes/{id}")
}

/// `/v1/nodes/{id}/children`.
pub fn children(id: NodeId) -> String {
    format!("/v1/nodes/{id}/children")
}

/// `/v1/nodes/{id}/children?limit=N[&after=NAME]`: one page of a listing, the cursor
/// percent-encoded.
pub fn children_page(id: NodeId, after: Option<&str>, limit: u32) -> String {
    match after {
        Some(a) => format!(
            "/v1/nodes/{id}/children?limit={limit}&after={}",
            encode_segment(a)
        ),
        None => format!("/v1/nodes/{id}/children?limit={limit}"),
    }
}

/// `/v1/nodes/{id}/children/{name}` with the name percent-encoded.
pub fn child(id: NodeId, name: &str) -> String {
    format!("/v1/nodes/{id}/children/{}", encode_segment(name))
}

/// `/v1/internal/servers/{id}/heartbeat`.
pub fn heartbeat(id: crate::ServerId) -> String {
    format!("/v1/internal/servers/{}/heartbeat", id.0)
}

/// `/v1/internal/nodes/{id}/commit`.
pub fn commit(id: NodeId) -> String {
    format!("/v1/internal/nodes/{id}/commit")
}

/// `/v1/locks/{id}/{action}` for `acquire`, `renew` or `release`.
pub fn lock(id: NodeId, action: &str) -> String {
    format!("/v1/locks/{id}/{action}")
}

/// `/v1/applocks/{id}/{action}` (`lock`, `unlock`, `test`).
pub fn applock(id: NodeId, action: &str) -> String {
    format!("/v1/applocks/{id}/{action}")
}

/// `/v1/files/{id}`.
pub fn file_write(id: NodeId) -> String {
    format!("/v1/files/{id}")
}

/// `/v1/files/{id}/{hash}`.
pub fn file_read(id: NodeId, hash: &ContentHash) -> String {
    format!("/v1/files/{id}/{hash}")
}

/// `/v1/internal/files/{id}/{hash}`.
pub fn replica_put(id: NodeId, hash: &ContentHash) -> String {
    format!("/v1/internal/files/{id}/{hash}")
}

/// `/v1/internal/files/{id}/{hash}/drop`.
pub fn drop_blob(id: NodeId, hash: &ContentHash) -> String {
    format!("/v1/internal/files/{id}/{hash}/drop")
}

/// `/v1/internal/files/{id}/{hash}/copy-to`.
pub fn copy_to(id: NodeId, hash: &ContentHash) -> String {
    format!("/v1/internal/files/{id}/{hash}/copy-to")
}

/// Path of [`ADD_HOLDER`].
pub fn add_holder(id: NodeId) -> String {
    format!("/v1/internal/nodes/{id}/add-holder")
}

/// Path of [`DROP_HOLDER`].
pub fn drop_holder(id: NodeId) -> String {
    format!("/v1/internal/nodes/{id}/drop-holder")
}

/// Percent-encodes everything but unreserved characters, so any valid name is one path segment.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_path_encodes_reserved_characters() {
        assert_eq!(
            child(NodeId(3), "a b%?#"),
            "/v1/nodes/3/children/a%20b%25%3F%23"
        );
        assert_eq!(child(NodeId::ROOT, "ü"), "/v1/nodes/1/children/%C3%BC");
    }
}
