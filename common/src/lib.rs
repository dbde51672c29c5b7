//! Wire types, routes and pure validation shared by the dfs client (`dfs-fuse`) and the cluster
//! services (`dfs-server`). This crate does no I/O and knows nothing of tokio or HTTP libraries.

pub mod api;
pub mod batch;
pub mod error;
pub mod ids;
pub mod meta;
pub mod name;
pub mod perm;
pub mod routes;

pub use error::{ErrorBody, ErrorCode};
pub use ids::{ContentHash, FenceToken, NodeId, ServerId, UploadId};
pub use meta::{DirEntry, FileKind, NodeMeta, WritebackIntent};
pub use name::{NameError, ValidName};
pub use perm::{Caller, Identity};
