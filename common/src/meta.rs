//! The directory's vocabulary: node metadata and directory entries.

use serde::{Deserialize, Serialize};

use crate::ids::{ContentHash, FenceToken, NodeId, ServerId, UploadId};

/// Nanoseconds since the Unix epoch, by this machine's clock: the unit of every time in
/// [`NodeMeta`] (0 if the clock is before the epoch).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How many applied upload ids a node remembers.
pub const RECENT_UPLOADS: usize = 32;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file whose content lives on file servers.
    File,
    /// A directory.
    Dir,
    /// A symbolic link; its target is stored in the directory itself.
    Symlink,
    /// A named pipe: metadata only; readers and writers meet in one client's kernel.
    Fifo,
    /// A UNIX socket's name (`bind`): metadata only, like a FIFO.
    Socket,
    /// A character device (`rdev` names it): metadata only, made by the administrator.
    CharDev,
    /// A block device (`rdev` names it): metadata only, made by the administrator.
    BlockDev,
}

impl FileKind {
    /// A FIFO, socket or device: a node with a mode and no content, whose opens the client's
    /// kernel serves itself.
    pub fn is_special(self) -> bool {
        matches!(
            self,
            FileKind::Fifo | FileKind::Socket | FileKind::CharDev | FileKind::BlockDev
        )
    }

    /// A character or block device (only the administrator makes one, as only root may
    /// `mknod` one).
    pub fn is_device(self) -> bool {
        matches!(self, FileKind::CharDev | FileKind::BlockDev)
    }
}

/// Everything the directory knows of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMeta {
    /// The node's id (the client's inode number).
    pub id: NodeId,
    /// The directory that holds it (the root is its own parent).
    pub parent: NodeId,
    /// File, directory, symlink or special file.
    pub kind: FileKind,
    /// Permission bits (`0o7777` at most).
    pub mode: u32,
    /// Name of the user who created it.
    pub owner: String,
    /// Owner's uid (nodes made before ownership was stored: 0, the administrator's).
    #[serde(default)]
    pub uid: u32,
    /// Group id.
    #[serde(default)]
    pub gid: u32,
    /// Size in bytes of the current version (target length for a symlink).
    pub size: u64,
    /// Server-assigned content version; starts at 0 (empty) and only grows.
    pub version: u64,
    /// Modification time, nanoseconds since the Unix epoch (set by the directory on commit).
    pub mtime_ns: u64,
    /// Change time of the metadata, nanoseconds since the Unix epoch.
    pub ctime_ns: u64,
    /// Access time, nanoseconds since the Unix epoch: set at creation and by `utimensat`
    /// (whole-file reads from a cache do not move it, as with `noatime`).
    #[serde(default)]
    pub atime_ns: u64,
    /// Link count: names of a file (hard links), 2 + subdirectories for a directory. A store
    /// from before hard links is counted once when it is opened (format 2).
    #[serde(default)]
    pub nlink: u32,
    /// Device number of a character or block device (0 otherwise).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rdev: u64,
    /// When the directory committed the current version (ns since the epoch); unlike
    /// `mtime_ns`, users cannot set it.
    #[serde(default)]
    pub committed_ns: u64,
    /// SHA-256 of the current version's content.
    pub hash: ContentHash,
    /// The file server that takes writes for this file.
    pub primary: Option<ServerId>,
    /// The other file servers that should hold copies.
    pub replicas: Vec<ServerId>,
    /// Servers known to hold the current version durably (a subset of primary + replicas).
    pub holders: Vec<ServerId>,
    /// Target of a symlink.
    pub symlink_target: Option<String>,
    /// Fencing token of the newest committed write.
    pub fence: FenceToken,
    /// Upload ids of the latest committed writes (at most [`RECENT_UPLOADS`]), so a retried
    /// upload whose acknowledgement was lost is recognised and never applied twice.
    #[serde(default)]
    pub recent_uploads: Vec<UploadId>,
    /// A client closed the file in write-back mode and is pushing it: other clients' opens wait
    /// (until the push commits or the intent expires) so that they see the new content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writeback: Option<WritebackIntent>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A write-back push announced but not yet committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritebackIntent {
    /// The upload that will carry the content; its commit clears the intent.
    pub upload_id: UploadId,
    /// When the intent lapses if no commit came (ms since the epoch).
    pub until_ms: u64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// The entry's name in its parent.
    pub name: String,
    /// The entry's metadata.
    pub meta: NodeMeta,
}
