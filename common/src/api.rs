//! Request and response bodies of the four services (JSON).

use serde::{Deserialize, Serialize};

use crate::ids::{ContentHash, FenceToken, NodeId, ServerId, UploadId};
use crate::meta::{DirEntry, FileKind};
use crate::name::ValidName;

/// Longest symlink target accepted, in bytes (Linux `PATH_MAX`).
pub const SYMLINK_MAX: usize = 4096;

/// Deadline for moving `bytes` of file content in one request (upload to a primary, which
/// includes its replica pushes; replica push; download; re-replication copy): a minute plus
/// what the slowest acceptable link (1 MiB/s) needs. Never a fixed cap that large files exceed.
pub fn transfer_timeout(bytes: u64) -> std::time::Duration {
    std::time::Duration::from_secs(60 + bytes / (1 << 20))
}

/// Identifies one lock waiter: 32 hex digits chosen by the client, stable across re-polls.
pub type WaiterId = UploadId;

/// `POST /v1/nodes/{id}/children`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRequest {
    /// Name of the new entry.
    pub name: ValidName,
    /// What to create.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Target, for a symlink only.
    #[serde(default)]
    pub symlink_target: Option<String>,
    /// Device number, for a character or block device only.
    #[serde(default)]
    pub rdev: u64,
}

/// `POST /v1/link`: one more name for an existing file (`link(2)`). The file is named by an
/// existing name as well as its id: as link(2) does, the directory checks search permission
/// on the way to it, so a node id alone (ids are sequential) reaches nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkRequest {
    /// The node to name (not a directory).
    pub node: NodeId,
    /// A directory holding a name of `node` (search permission on it needed).
    pub parent: NodeId,
    /// That name of `node` in `parent`.
    pub name: ValidName,
    /// Directory of the new name.
    pub new_parent: NodeId,
    /// The new name.
    pub new_name: ValidName,
}

/// Query of `DELETE /v1/nodes/{id}/children/{name}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RemoveQuery {
    /// `true`: rmdir (the entry must be an empty directory); `false`: unlink (must not be a dir).
    #[serde(default)]
    pub dir: bool,
}

/// `POST /v1/rename`: atomic; replaces an existing target of a compatible kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenameRequest {
    /// Source directory.
    pub parent: NodeId,
    /// Source name.
    pub name: ValidName,
    /// Destination directory.
    pub new_parent: NodeId,
    /// Destination name.
    pub new_name: ValidName,
    /// Fail with `exists` rather than replace (RENAME_NOREPLACE).
    #[serde(default)]
    pub no_replace: bool,
}

/// `GET /v1/nodes/{id}?access=r|w|rw|commit`: the metadata of a node about to be opened,
/// refused (EACCES) unless the caller may read and/or write it (`commit`: write new versions,
/// as its owner or with write permission; the capability answered lets the caller queue for
/// the file's write lock). Without `access`, plain metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeQuery {
    /// `r`, `w` or `rw`.
    #[serde(default)]
    pub access: Option<String>,
}

impl NodeQuery {
    /// The access asked for, as `perm::R`/`perm::W` bits (0: none).
    pub fn want(&self) -> Result<u32, String> {
        match self.access.as_deref() {
            None | Some("") => Ok(0),
            Some("r") => Ok(crate::perm::R),
            Some("w") => Ok(crate::perm::W),
            Some("rw") => Ok(crate::perm::R | crate::perm::W),
            Some("commit") => Ok(crate::perm::COMMIT),
            Some(other) => Err(format!("access must be r, w, rw or commit, not {other:?}")),
        }
    }
}

/// Most entries one page of a listing holds (`ListQuery::limit` is capped to it).
pub const LIST_MAX_ENTRIES: u32 = 1000;

/// Most bytes of entries (as stored) one page of a listing holds: a page ends before the entry
/// that would pass it (a page always holds at least one entry).
pub const LIST_MAX_BYTES: usize = 1 << 20;

/// `GET /v1/nodes/{id}/children?after=NAME&limit=N`: one page of a directory, by name order,
/// starting after `after` (absent: from the start). A name-based cursor: entries made or
/// removed meanwhile ahead of it are seen as they are, none is returned twice.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ListQuery {
    /// The last name of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Entries wanted (1 to `LIST_MAX_ENTRIES`; absent: the most).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// One page of a listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListPage {
    /// Entries, sorted by name.
    pub entries: Vec<DirEntry>,
    /// The cursor of the next page (`after`), absent on the last page.
    #[serde(default)]
    pub next: Option<String>,
}

/// `PATCH /v1/nodes/{id}`: metadata-only changes (size changes are new versions).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SetAttrRequest {
    /// New permission bits (owner or administrator only).
    #[serde(default)]
    pub mode: Option<u32>,
    /// New modification time (ns since the epoch). Setting both times to now (`mtime_now`
    /// and `atime_now`, `touch`) needs write permission or the owner; any other time change
    /// (explicit, or one time now and the other omitted) needs the owner (or the
    /// administrator), as utimensat(2) on Linux.
    #[serde(default)]
    pub mtime_ns: Option<u64>,
    /// Set the modification time to now (`UTIME_NOW`): the directory uses its own clock, not
    /// `mtime_ns`, which must still be given to say the time changes.
    #[serde(default)]
    pub mtime_now: bool,
    /// New access time (ns since the epoch), under the same rules as `mtime_ns`.
    #[serde(default)]
    pub atime_ns: Option<u64>,
    /// Set the access time to now, by the directory's clock (see `mtime_now`).
    #[serde(default)]
    pub atime_now: bool,
    /// New owner (administrator only).
    #[serde(default)]
    pub uid: Option<u32>,
    /// New group (administrator, or the owner to a group it is in).
    #[serde(default)]
    pub gid: Option<u32>,
}

/// What a push's content was based on, so that no push overwrites a version its writer never
/// saw without saying so. The rule (README, "Consistency"): a push may replace a newer version
/// only while the close or fsync that made it is still waiting (last close wins, as in AFS);
/// every later push (a background retry after a failed close, write-back) applies only if its
/// base is still the current version, and is otherwise refused as a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushBase {
    /// The version the writer's content derives from (0: a new, empty file).
    pub version: u64,
    /// The close or fsync that made this push is waiting for it.
    pub waiting: bool,
}

impl PushBase {
    /// The header form: the version, then `;waiting` for a push a close waits for.
    pub fn to_header(self) -> String {
        if self.waiting {
            format!("{};waiting", self.version)
        } else {
            self.version.to_string()
        }
    }

    /// Parses [`PushBase::to_header`]'s form.
    pub fn parse_header(s: &str) -> Option<PushBase> {
        let (v, waiting) = match s.split_once(';') {
            Some((v, "waiting")) => (v, true),
            Some(_) => return None,
            None => (s, false),
        };
        Some(PushBase {
            version: v.parse().ok()?,
            waiting,
        })
    }

    /// Whether a push on this base may become the next version of a file at `current`.
    pub fn admits(self, current: u64) -> bool {
        self.waiting || self.version == current
    }
}

/// `POST /v1/internal/nodes/{id}/commit`, sent by a primary after the content is durable.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitRequest {
    /// SHA-256 of the new content.
    pub hash: ContentHash,
    /// Its size.
    pub size: u64,
    /// The writer's fencing token.
    pub fence: FenceToken,
    /// The upload's idempotency key.
    pub upload_id: UploadId,
    /// What the content was based on; a push that may not replace the current version is
    /// refused as a conflict.
    pub base: PushBase,
    /// Servers holding the new content durably.
    pub holders: Vec<ServerId>,
    /// Who wrote it.
    pub writer: String,
    /// The writer's identity: the directory refuses the commit if it may not write the file
    /// (`None` from primaries older than permissions: not checked).
    #[serde(default)]
    pub writer_id: Option<crate::Identity>,
    /// The primary that stored it; the commit is refused if the directory names another.
    #[serde(default)]
    pub primary: Option<ServerId>,
    /// The replicas the primary wrote for (from the writer's placement); the commit is refused
    /// if the directory's placement differs, so a stale placement can never lower the number
    /// of copies a write needs.
    #[serde(default)]
    pub replicas: Option<Vec<ServerId>>,
    /// Permission bits changed while the file was open for writing (fchmod before close),
    /// applied with this version.
    #[serde(default)]
    pub mode: Option<u32>,
    /// An explicit modification time set while the file was open or pending (futimens, `cp -p`,
    /// tar), applied instead of the commit time.
    #[serde(default)]
    pub mtime_ns: Option<u64>,
    /// The writer's client process (the `x-dfs-origin` of its push, 32 hex digits): with
    /// `writer_id`'s uid, the directory leaves the commit out of that client's change feed,
    /// as it does for the namespace ops the client makes itself. `None`: every client hears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// Answer to a commit: the new metadata and, if a version was replaced, what its holders may
/// now drop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitResponse {
    /// The node after the commit.
    #[serde(flatten)]
    pub meta: crate::meta::NodeMeta,
    /// The version this commit replaced (none for a retried upload already applied).
    #[serde(default)]
    pub superseded: Option<Superseded>,
}

/// A version replaced by a commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Superseded {
    /// Its content hash.
    pub hash: ContentHash,
    /// The servers that held it.
    pub holders: Vec<ServerId>,
}

/// `POST /v1/nodes/{id}/intent`: announce a write-back push of the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IntentRequest {
    /// The upload that will carry the content.
    pub upload_id: UploadId,
    /// How long the intent lasts without a commit (capped by the directory).
    pub lease_ms: u64,
}

/// Longest write-back intent the directory records.
pub const MAX_INTENT_MS: u64 = 120_000;

/// `GET /v1/statfs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatFs {
    /// Number of nodes.
    pub nodes: u64,
    /// Sum of file sizes (one copy).
    pub bytes: u64,
    /// What the live file servers' disks hold, counted once per copy a file gets (the sum of
    /// their sizes divided by the copies per file): what `df` shows as the size.
    #[serde(default)]
    pub total_bytes: u64,
    /// What they can still take, counted the same way.
    #[serde(default)]
    pub free_bytes: u64,
}

/// A file server's disk space, sent with every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Space {
    /// Size of the file system its data lives on.
    pub total_bytes: u64,
    /// What it can still take for files: the space free to it, less its reserve.
    pub free_bytes: u64,
}

/// A server with less than this free is short of space: new files are placed elsewhere
/// while other live servers have room.
pub const MIN_PLACEMENT_FREE: u64 = 64 << 20;

/// `POST /v1/internal/servers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterServerRequest {
    /// Base URL clients and peers use to reach it.
    pub url: String,
    /// Bytes of storage it offers.
    pub capacity_bytes: u64,
    /// The id it had before a restart, if any.
    #[serde(default)]
    pub previous_id: Option<ServerId>,
    /// The cluster its data belongs to, once it has joined one: a directory of another cluster
    /// (or a wiped one) refuses it instead of taking it in as a new, empty server.
    #[serde(default)]
    pub cluster_id: Option<String>,
}

/// Answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterServerResponse {
    /// The server's id.
    pub id: ServerId,
    /// How often to send heartbeats.
    pub heartbeat_ms: u64,
    /// The directory's cluster id.
    #[serde(default)]
    pub cluster_id: String,
}

/// Which singleton service registers its URL with the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceKind {
    /// The lock service.
    Lock,
    /// The auth service.
    Auth,
}

/// `POST /v1/internal/services`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterServiceRequest {
    /// Which service.
    pub kind: ServiceKind,
    /// Its base URL.
    pub url: String,
}

/// One file server as the directory sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerStatus {
    /// Its id.
    pub id: ServerId,
    /// Its base URL.
    pub url: String,
    /// Whether its heartbeats arrive.
    pub alive: bool,
    /// Milliseconds since its last heartbeat (None: none since the directory started).
    pub last_heartbeat_ms_ago: Option<u64>,
    /// Offered capacity.
    pub capacity_bytes: u64,
    /// Its disk space, as of its last heartbeat.
    #[serde(default)]
    pub space: Option<Space>,
    /// Files whose primary it is.
    pub primaries: u64,
    /// Files it holds a replica of.
    pub replicas: u64,
}

/// `GET /v1/cluster`: everything a client needs after the directory's URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Lock service base URL, once registered: the latest registration. Kept for clients
    /// that know only one lock URL; `lock_urls` names every live instance.
    pub lock_url: Option<String>,
    /// Every live lock instance (several over etcd), by URL. Empty from a directory older
    /// than this field: then `lock_url` is the one.
    #[serde(default)]
    pub lock_urls: Vec<String>,
    /// Auth service base URL, once registered.
    pub auth_url: Option<String>,
    /// File servers.
    pub servers: Vec<ServerStatus>,
    /// Configured replication factor (copies per file).
    pub replication: u32,
    /// The cluster's identity: node ids are only meaningful within one cluster.
    #[serde(default)]
    pub cluster_id: String,
}

impl ClusterInfo {
    /// A map fetched from an https:// directory must name only https:// services: a plain URL
    /// in it would send tokens, the cluster key and files in clear. Err names the first one.
    pub fn check_https(&self, directory_url: &str) -> Result<(), String> {
        if !directory_url.starts_with("https://") {
            return Ok(());
        }
        let urls = self
            .lock_url
            .iter()
            .chain(self.lock_urls.iter())
            .chain(self.auth_url.iter())
            .chain(self.servers.iter().map(|s| &s.url));
        for url in urls {
            if !url.starts_with("https://") {
                return Err(format!(
                    "the TLS directory {directory_url} names a plain-HTTP service {url}: refusing \
                     to send anything to it in clear (serve it with TLS)"
                ));
            }
        }
        Ok(())
    }

    /// The lock instances to try, in order: `lock_urls`, else (an older directory) `lock_url`.
    pub fn lock_instances(&self) -> Vec<String> {
        if self.lock_urls.is_empty() {
            self.lock_url.iter().cloned().collect()
        } else {
            self.lock_urls.clone()
        }
    }
}

/// `POST /v1/locks/{id}/acquire`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcquireRequest {
    /// The caller's waiter id; re-polling with the same id keeps the queue position.
    pub waiter: WaiterId,
    /// How long to wait for the grant before answering `queued` (capped by the server).
    pub wait_ms: u64,
}

/// A lock grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    /// Fencing token to present with writes.
    pub fence: FenceToken,
    /// The lease: renew before this many milliseconds pass, or lose the lock.
    pub lease_ms: u64,
    /// The lock service's signature of (node, fence); the primary refuses unsigned fences.
    #[serde(default)]
    pub signature: String,
}

/// Who holds or waits for an application lock (`flock`, `fcntl`): a client session (chosen
/// by the client at mount, renewed as one lease) and the kernel's lock owner within it (an open
/// file for `flock`, a process for `fcntl` record locks).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LockOwner {
    /// The client session.
    pub session: UploadId,
    /// The owner within it.
    pub owner: u64,
}

/// `POST /v1/applocks/{id}/lock`: take a shared or exclusive application lock on a whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppLockRequest {
    /// Who takes it.
    pub owner: LockOwner,
    /// Shared (read) rather than exclusive (write).
    pub shared: bool,
    /// How long to wait for it (capped by the server); 0: do not wait, answer at once (a
    /// refused non-blocking request leaves no place in the queue).
    pub wait_ms: u64,
}

/// Answer to an application lock request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum AppLockResponse {
    /// Held; keep the session's lease renewed.
    Granted {
        /// Renew the session within this many milliseconds.
        lease_ms: u64,
    },
    /// Waiting in line; ask again (within a lease time) to keep the place.
    Queued {
        /// 1 = next in line.
        position: u64,
    },
    /// A non-blocking request that conflicts with a holder.
    Busy,
}

/// `POST /v1/applocks/{id}/unlock` and `.../test`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppLockQuery {
    /// Who asks.
    pub owner: LockOwner,
    /// For `test`: whether a shared request is meant.
    #[serde(default)]
    pub shared: bool,
}

/// Answer to `test`: a holder that would conflict, if any.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppLockConflict {
    /// Whether that holder's lock is shared.
    pub shared: bool,
    /// Who holds it.
    pub user: String,
}

/// `POST /v1/applocks/renew`: extends the named application locks of a session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppLockRenew {
    /// The session.
    pub session: UploadId,
    /// The (file, owner) pairs the client still holds; any other lock of the session (one
    /// whose unlock was lost) is left to lapse.
    pub locks: Vec<(NodeId, u64)>,
}

/// Answer to an acquire.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum AcquireResponse {
    /// The caller holds the lock.
    Granted(Grant),
    /// Still waiting; poll again (within a lease time) with the same waiter id.
    Queued {
        /// 1 = next in line.
        position: u64,
    },
}

/// `POST /v1/locks/{id}/renew` and `/release`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockRequest {
    /// The waiter id that was granted (or queued).
    pub waiter: WaiterId,
}

/// One lock in `GET /v1/locks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockStatus {
    /// The file.
    pub node: NodeId,
    /// User holding it, if held.
    pub holder: Option<String>,
    /// Fence of the current grant.
    pub fence: Option<FenceToken>,
    /// Waiters queued behind the holder.
    pub queued: u64,
}

/// The plaintext sealed inside an [`Envelope`] for signup and login.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// User name (1..=32 bytes of `[A-Za-z0-9._-]`).
    #[serde(rename = "u")]
    pub user: String,
    /// Password (8..=64 bytes).
    #[serde(rename = "p")]
    pub password: String,
    /// 32 hex digits, never reused: a replayed envelope is refused.
    #[serde(rename = "n")]
    pub nonce: String,
    /// Client clock, ms since the epoch; must be within the server's replay window.
    #[serde(rename = "t")]
    pub timestamp_ms: u64,
}

/// `POST /v1/auth/signup` and `/login`: [`Credentials`] as JSON, RSA-OAEP(SHA-256) encrypted
/// with the auth server's public key, base64 (standard alphabet).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    /// The ciphertext.
    pub ciphertext: String,
}

/// `POST /v1/auth/refresh`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshRequest {
    /// The refresh token from a login.
    pub refresh_token: String,
}

/// Answer to login and refresh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    /// Bearer token for every service.
    pub token: String,
    /// When `token` stops being accepted (ms since the epoch).
    pub expires_at_ms: u64,
    /// Long-lived token to get a new `token` without the password.
    pub refresh_token: String,
    /// The user.
    pub user: String,
    /// The user's identity as the token carries it (absent from older auth services).
    #[serde(default)]
    pub id: Option<crate::Identity>,
}

/// `GET /v1/auth/public-key`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicKeyResponse {
    /// SPKI PEM of the RSA public key.
    pub pem: String,
}

/// The signed claims inside a bearer token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// User name.
    pub user: String,
    /// Expiry, ms since the epoch.
    pub exp_ms: u64,
    /// Numeric identity: uid, gid, groups, administrator. Tokens issued before identities
    /// existed carry none and act as `nobody` (65534): they own nothing.
    #[serde(default = "crate::Identity::nobody")]
    pub id: crate::Identity,
}

/// One user, as the administrator sees it (`GET /v1/auth/users`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    /// User name.
    pub user: String,
    /// Numeric identity.
    pub id: crate::Identity,
}

/// A named group (`GET /v1/auth/groups`): its gid and the users in it, whose tokens carry
/// the gid among their groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Group id (unique among groups).
    pub gid: u32,
    /// Member user names, sorted.
    pub members: Vec<String>,
}

/// `POST /v1/auth/groups/{name}` (cluster key): creates the group if it does not exist (with
/// `gid`, or the next free id) and adds `members`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddGroupRequest {
    /// The gid of a new group (an existing group must already have it).
    #[serde(default)]
    pub gid: Option<u32>,
    /// Users to add.
    #[serde(default)]
    pub members: Vec<String>,
}

/// `POST /v1/auth/groups/{name}/remove` (cluster key): removes `members` from the group, or,
/// with none named, the group itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveGroupRequest {
    /// Users to remove (none: remove the group).
    #[serde(default)]
    pub members: Vec<String>,
}

/// `PATCH /v1/auth/users/{name}` (cluster key): what to change; absent fields stay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetUserRequest {
    /// New uid (unique among users).
    #[serde(default)]
    pub uid: Option<u32>,
    /// New primary gid.
    #[serde(default)]
    pub gid: Option<u32>,
    /// New list of further groups (replaces the old one).
    #[serde(default)]
    pub groups: Option<Vec<u32>>,
    /// Make (or stop making) the user the administrator.
    #[serde(default)]
    pub admin: Option<bool>,
}

/// `GET /v1/stats` of a file server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FileServerStats {
    /// Blob downloads served.
    pub downloads: u64,
    /// Client uploads accepted as primary.
    pub uploads: u64,
    /// Replica pushes accepted.
    pub replica_writes: u64,
    /// Bytes served.
    pub bytes_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
}

/// `POST /v1/internal/files/{id}/{hash}/copy-to`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CopyToRequest {
    /// Base URL of the server that gets the copy.
    pub url: String,
}

/// `POST /v1/internal/nodes/{id}/drop-holder`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DropHolderRequest {
    /// The server that lost its copy.
    pub server: ServerId,
    /// The version's hash.
    pub hash: ContentHash,
}

/// Most files in one batched upload (also bounds the batch commit's JSON).
pub const MAX_BATCH_ITEMS: usize = 64;
/// Largest file sent in a batch; bigger ones go alone, streamed.
pub const MAX_BATCH_ITEM_BYTES: u64 = 1 << 20;
/// Most content bytes in one batch.
pub const MAX_BATCH_BYTES: u64 = 8 << 20;

/// One file of a batched upload (`POST /v1/batch/files`): what a single upload's headers
/// carry. Its body follows the batch header in item order (see [`crate::batch`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchItem {
    /// The file.
    pub node: NodeId,
    /// SHA-256 of its new content.
    pub hash: ContentHash,
    /// Its size (the body's length).
    pub size: u64,
    /// The writer's fencing token for this file.
    pub fence: FenceToken,
    /// The lock service's signature of `fence`.
    pub fence_sig: String,
    /// The upload's idempotency key.
    pub upload_id: UploadId,
    /// What the content was based on.
    pub base: PushBase,
    /// The placement the writer knows: primary first, then the replicas.
    pub placement: Vec<ServerId>,
    /// Permission bits to apply with the new version.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Explicit modification time to apply with the new version.
    #[serde(default)]
    pub mtime_ns: Option<u64>,
}

/// Header of a batched upload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchHeader {
    /// The files, in body order.
    pub items: Vec<BatchItem>,
}

/// One blob of a replica batch (`PUT /v1/internal/batch/files`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaItem {
    /// The file.
    pub node: NodeId,
    /// SHA-256 of the content.
    pub hash: ContentHash,
    /// Its size.
    pub size: u64,
}

/// Header of a replica batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaBatchHeader {
    /// The blobs, in body order.
    pub items: Vec<ReplicaItem>,
}

/// The outcome of one item of a batch: each item succeeds or fails on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemResult<T> {
    /// Applied.
    Ok(T),
    /// Refused or failed; nothing of this item was applied.
    Err(crate::ErrorBody),
}

/// Answer to a batch: one result per item, in item order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchResponse<T> {
    /// Per-item outcomes.
    pub results: Vec<ItemResult<T>>,
}

/// One version of a batch commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitBatchItem {
    /// The file.
    pub node: NodeId,
    /// What a single commit would carry.
    pub commit: CommitRequest,
}

/// `POST /v1/internal/batch/commit`: several versions recorded in one durable transaction,
/// each checked (and refused) on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommitBatchRequest {
    /// The versions.
    pub items: Vec<CommitBatchItem>,
}

/// A server that now holds a version (`POST /v1/internal/batch/add-holders`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HolderItem {
    /// The file.
    pub node: NodeId,
    /// The version's hash.
    pub hash: ContentHash,
    /// The server holding it durably.
    pub server: ServerId,
}

/// Several late copies recorded at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddHoldersRequest {
    /// The copies.
    pub items: Vec<HolderItem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(lock: &str, server: &str) -> ClusterInfo {
        ClusterInfo {
            lock_url: Some(lock.into()),
            lock_urls: vec![lock.into()],
            auth_url: Some("https://auth:7072".into()),
            servers: vec![ServerStatus {
                id: ServerId(1),
                url: server.into(),
                alive: true,
                last_heartbeat_ms_ago: None,
                capacity_bytes: 1,
                space: None,
                primaries: 0,
                replicas: 0,
            }],
            replication: 2,
            cluster_id: String::new(),
        }
    }

    #[test]
    fn a_map_from_a_tls_directory_names_only_tls_services() {
        let all_tls = map("https://lock:7071", "https://f1:7073");
        assert!(all_tls.check_https("https://dir:7070").is_ok());
        let plain_server = map("https://lock:7071", "http://f1:7073");
        let e = plain_server.check_https("https://dir:7070").unwrap_err();
        assert!(e.contains("http://f1:7073"), "{e}");
        let plain_lock = map("http://lock:7071", "https://f1:7073");
        assert!(plain_lock.check_https("https://dir:7070").is_err());
        // A plain directory's map is not judged: that cluster is plain already.
        assert!(plain_server.check_https("http://dir:7070").is_ok());
    }
}

/// Longest a change-feed request may wait for a change (`wait_ms` of `GET /v1/changes`).
pub const CHANGES_MAX_WAIT_MS: u64 = 30_000;

/// Most changes one change-feed answer carries; a client behind asks again at once.
pub const CHANGES_MAX_PER_ANSWER: usize = 1024;

/// Query of `GET /v1/changes` (the change feed, a long poll).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChangesQuery {
    /// The feed's epoch as the client last heard it (None: the first request, always answered
    /// with `resync` and the feed's current position).
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The last sequence number the client has seen; changes after it are answered.
    #[serde(default)]
    pub after: u64,
    /// How long to wait when there is no change yet, in ms (at most `CHANGES_MAX_WAIT_MS`).
    #[serde(default)]
    pub wait_ms: u64,
}

/// What one change names: only node ids, never a name or any metadata, so the feed tells no
/// one what a directory they cannot read holds (see ARCHITECTURE.md, "Change feed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChangeKind {
    /// Directory `dir` gained or lost a name of `node` (its entries and its own attributes
    /// changed).
    Entry {
        /// The directory.
        dir: NodeId,
        /// The node named or unnamed there.
        node: NodeId,
    },
    /// The attributes or the content of `node` changed.
    Node {
        /// The node.
        node: NodeId,
    },
    /// `node` no longer exists.
    Gone {
        /// The node.
        node: NodeId,
    },
}

/// One change of the feed, with its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Its place in the feed: grows with every change within an epoch (gaps allowed).
    pub seq: u64,
    /// What changed.
    #[serde(flatten)]
    pub what: ChangeKind,
}

/// Answer of `GET /v1/changes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangesResponse {
    /// The feed's epoch (new at every start of the directory).
    pub epoch: u64,
    /// The client must drop everything it caches and continue after `next`: the epoch
    /// differs, or the changes it asked for are no longer kept.
    pub resync: bool,
    /// Changes after the requested sequence number, oldest first (empty on resync).
    pub changes: Vec<Change>,
    /// The sequence number to ask after next time.
    pub next: u64,
}
