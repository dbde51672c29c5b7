//! Paged listings (issue 10): one page of a directory per request, bounded in entries and in
//! bytes, with a name cursor, so that no request's cost or answer grows with the directory.

use std::ops::Bound;

use common::api::{LIST_MAX_BYTES, LIST_MAX_ENTRIES, ListPage};
use common::perm::R;
use common::{DirEntry, FileKind, Identity, NodeId, NodeMeta, ValidName};
use redb::ReadableDatabase;

use super::{CHILDREN, DirectoryService, NODES, access};
use crate::error::{ServiceError, ServiceResult};
use crate::store::decode;

impl DirectoryService {
    /// The entries of directory `parent` after the name `after` (from the first without it),
    /// by name: at most `limit` (capped to `LIST_MAX_ENTRIES`) and about `LIST_MAX_BYTES` of
    /// records, at least one. `next` names the last entry returned when more may follow. Read
    /// permission on `parent` needed.
    pub fn list_page(
        &self,
        parent: NodeId,
        after: Option<&ValidName>,
        limit: Option<u32>,
        who: &Identity,
    ) -> ServiceResult<ListPage> {
        let limit = limit.unwrap_or(LIST_MAX_ENTRIES);
        if limit == 0 {
            return Err(ServiceError::BadRequest("limit must be at least 1".into()));
        }
        let limit = usize::try_from(limit.min(LIST_MAX_ENTRIES)).unwrap_or(1);
        let tx = self.store.db()?.begin_read()?;
        let children = tx.open_table(CHILDREN)?;
        let nodes = tx.open_table(NODES)?;
        let pv = nodes
            .get(parent.0)?
            .ok_or_else(|| ServiceError::NotFound(format!("node {parent}")))?;
        let pmeta: NodeMeta = decode(pv.value())?;
        if pmeta.kind != FileKind::Dir {
            return Err(ServiceError::NotDir(format!("node {parent}")));
        }
        access::need(who, &pmeta, R)?;
        let start = match after {
            Some(a) => Bound::Excluded((parent.0, a.as_str())),
            None => Bound::Included((parent.0, "")),
        };
        let end = Bound::Excluded((parent.0.saturating_add(1), ""));
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        for row in children.range::<(u64, &str)>((start, end))? {
            let (k, v) = row?;
            let meta = nodes
                .get(v.value())?
                .ok_or_else(|| ServiceError::internal("list", "dangling entry"))?;
            let size = meta.value().len() + k.value().1.len();
            if entries.len() >= limit || (!entries.is_empty() && bytes + size > LIST_MAX_BYTES) {
                more = true;
                break;
            }
            bytes += size;
            entries.push(DirEntry {
                name: k.value().1.to_owned(),
                meta: decode(meta.value())?,
            });
        }
        let next = if more {
            entries.last().map(|e: &DirEntry| e.name.clone())
        } else {
            None
        };
        Ok(ListPage { entries, next })
    }
}
