//! Paged listings (issue 10): one page of a directory per request, bounded in entries and in
//! bytes, with a name cursor, so that no request's cost or answer grows with the directory.

use common::api::{LIST_MAX_BYTES, LIST_MAX_ENTRIES, ListPage};
use common::perm::R;
use common::{DirEntry, FileKind, Identity, NodeId, NodeMeta, ValidName};

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
        self.store.read(|tx| {
            let pv = tx
                .get(NODES, &parent.0)?
                .ok_or_else(|| ServiceError::NotFound(format!("node {parent}")))?;
            let pmeta: NodeMeta = decode(&pv)?;
            if pmeta.kind != FileKind::Dir {
                return Err(ServiceError::NotDir(format!("node {parent}")));
            }
            access::need(who, &pmeta, R)?;
            // The range starts at `after` itself (it is skipped below): one more row than a
            // page, to tell whether more follow.
            let lo = (
                parent.0,
                after.map_or(String::new(), |a| a.as_str().to_owned()),
            );
            let hi = parent.0.checked_add(1).map(|p| (p, String::new()));
            let mut rows = tx.range(CHILDREN, Some(&lo), hi.as_ref(), Some(limit + 2))?;
            if let Some(a) = after
                && rows.first().is_some_and(|((_, n), _)| n == a.as_str())
            {
                rows.remove(0);
            }
            let ids: Vec<u64> = rows.iter().map(|(_, id)| *id).collect();
            let metas = tx.get_many(NODES, &ids)?;
            let mut entries = Vec::new();
            let mut bytes = 0usize;
            let mut more = false;
            for (((_, name), _), meta) in rows.into_iter().zip(metas) {
                let meta = meta.ok_or_else(|| ServiceError::internal("list", "dangling entry"))?;
                let size = meta.len() + name.len();
                if entries.len() >= limit || (!entries.is_empty() && bytes + size > LIST_MAX_BYTES)
                {
                    more = true;
                    break;
                }
                bytes += size;
                entries.push(DirEntry {
                    name,
                    meta: decode(&meta)?,
                });
            }
            let next = if more {
                entries.last().map(|e: &DirEntry| e.name.clone())
            } else {
                None
            };
            Ok(ListPage { entries, next })
        })
    }
}

#[cfg(test)]
mod tests {
    use common::api::CreateRequest;
    use common::{Caller, FileKind, NodeId, ValidName};

    use super::*;
    use crate::directory::DirectoryConfig;

    #[test]
    fn a_page_ends_at_its_byte_budget_and_the_cursor_carries_on_on_redb() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = DirectoryService::open(dir.path(), DirectoryConfig::default()).expect("open");
        pages_end_at_their_byte_budget(&svc);
    }

    #[test]
    fn a_page_ends_at_its_byte_budget_and_the_cursor_carries_on_on_etcd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = crate::directory::tests::open_on_etcd(dir.path()).expect("open");
        pages_end_at_their_byte_budget(&svc);
    }

    fn pages_end_at_their_byte_budget(svc: &DirectoryService) {
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
