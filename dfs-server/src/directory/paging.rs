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

#[cfg(test)]
mod tests {
    use common::api::CreateRequest;
    use common::{Caller, FileKind, NodeId, ValidName};

    use super::*;
    use crate::directory::DirectoryConfig;

    #[test]
    fn a_page_ends_at_its_byte_budget_and_the_cursor_carries_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("open");
        // Symlinks with the longest targets: 600 of them are well past one page's bytes.
        let target = "t".repeat(common::api::SYMLINK_MAX);
        for i in 0..600 {
            let req = CreateRequest {
                name: ValidName::parse(&format!("l{i:03}")).expect("name"),
                kind: FileKind::Symlink,
                mode: 0o777,
                symlink_target: Some(target.clone()),
                rdev: 0,
            };
            svc.create(NodeId::ROOT, &req, &Caller::cluster())
                .expect("symlink");
        }
        let who = Caller::cluster().id;
        let mut names = Vec::new();
        let mut after: Option<ValidName> = None;
        let mut pages = 0;
        loop {
            let page = svc
                .list_page(NodeId::ROOT, after.as_ref(), None, &who)
                .expect("page");
            pages += 1;
            let bytes: usize = page
                .entries
                .iter()
                .map(|e| e.name.len() + crate::store::encode(&e.meta).expect("encode").len())
                .sum();
            assert!(bytes <= LIST_MAX_BYTES, "{bytes} bytes in a page");
            names.extend(page.entries.into_iter().map(|e| e.name));
            match page.next {
                Some(n) => after = Some(ValidName::parse(&n).expect("cursor")),
                None => break,
            }
        }
        assert!(pages >= 3, "{pages} pages");
        let want: Vec<String> = (0..600).map(|i| format!("l{i:03}")).collect();
        assert_eq!(names, want);
    }
}
