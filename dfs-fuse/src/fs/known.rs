//! What this client knows of the namespace: the metadata last heard of each node, the names in
//! each directory, and which directories it knows completely (listed, or made here), so that a
//! lookup of a name that is not there (every `open(O_CREAT)` of a new file, `mkdir -p`, an
//! editor's temp file) is answered without a round trip. Nothing older than the caller's TTL
//! is answered as fresh: the README's metadata bound holds for absent names too.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::{DirEntry, NodeId, NodeMeta};

/// A directory with more entries than this is not listed again just to answer lookups.
pub(super) const RELIST_MAX_ENTRIES: usize = 512;

/// How long after the change feed said a node changed an answer about it is not taken as
/// fresh: the request may have been answered before the change (a request lasts at most the
/// call timeout; beyond this window the short TTL bounds what remains).
pub(super) const FEED_RACE: Duration = Duration::from_secs(10);

/// At most this many "changed at" marks are kept one by one (each lasts [`FEED_RACE`]); past
/// it, the oldest are folded into one mark that counts for every node (conservative: replies
/// get the short TTL), so a burst of changes costs bounded memory.
const TOUCHED_MAX: usize = 65_536;

/// How to answer a lookup (see [`Known::lookup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup {
    /// The name is not there.
    Absent,
    /// List the directory again, then answer from the listing.
    Relist,
    /// Ask the directory for this name.
    Ask,
}

/// Everything last heard from the directory, to keep cached files usable while it is down.
#[derive(Default)]
pub(super) struct Known {
    by_id: HashMap<NodeId, NodeMeta>,
    /// When each `by_id` entry was last heard from the directory (or changed by this client's
    /// own namespace operation).
    heard: HashMap<NodeId, Instant>,
    /// Names per directory, and of each node.
    names: Names,
    /// Directories whose every name is in `names`, and since when.
    complete: HashMap<NodeId, Instant>,
    /// Changes this client made per directory: a listing requested before one of them
    /// happened may not show it, so it does not replace what is known.
    changes: HashMap<NodeId, u64>,
    /// When the change feed last said each node (or directory) changed, or until when an
    /// operation of unknown outcome here may still change it.
    touched: Touched,
    /// Listings started (`listing_start`), and per directory the one whose names it holds as
    /// complete: an older listing that ends later never replaces them.
    listings: u64,
    newest_listing: HashMap<NodeId, u64>,
    /// Until when everything heard is distrusted (the feed lost: `FEED_RACE` after the loss),
    /// and how many times everything was.
    distrusted_until: Option<Instant>,
    distrusts: u64,
}

/// The names per directory, indexed both ways: the feed names a node, and finding its names
/// must cost the names it has, not a scan of its directory (or of every directory). A name is
/// stored once, shared by both indexes.
#[derive(Default)]
struct Names {
    by_dir: HashMap<NodeId, HashMap<Arc<str>, NodeId>>,
    /// The (directory, name) pairs of each node in `by_dir` (one for most nodes; a hard link
    /// adds one).
    of_node: HashMap<NodeId, Vec<(NodeId, Arc<str>)>>,
}

impl Names {
    fn dir(&self, dir: NodeId) -> Option<&HashMap<Arc<str>, NodeId>> {
        self.by_dir.get(&dir)
    }

    fn get(&self, dir: NodeId, name: &str) -> Option<NodeId> {
        self.by_dir.get(&dir)?.get(name).copied()
    }

    fn unindex(&mut self, dir: NodeId, name: &str, id: NodeId) {
        if let Some(list) = self.of_node.get_mut(&id) {
            if let Some(i) = list.iter().position(|(d, n)| *d == dir && **n == *name) {
                list.swap_remove(i);
            }
            if list.is_empty() {
                self.of_node.remove(&id);
            }
        }
    }

    fn index(&mut self, dir: NodeId, name: Arc<str>, id: NodeId) {
        self.of_node.entry(id).or_default().push((dir, name));
    }

    /// `name` in `dir` is `id` now (whatever it was before).
    fn insert(&mut self, dir: NodeId, name: &str, id: NodeId) {
        let name: Arc<str> = Arc::from(name);
        let old = self.by_dir.entry(dir).or_default().insert(name.clone(), id);
        if let Some(old) = old {
            self.unindex(dir, &name, old);
        }
        self.index(dir, name, id);
    }

    fn remove(&mut self, dir: NodeId, name: &str) -> Option<NodeId> {
        let id = self.by_dir.get_mut(&dir)?.remove(name)?;
        self.unindex(dir, name, id);
        Some(id)
    }

    /// Takes every name of `dir` out.
    fn take_dir(&mut self, dir: NodeId) -> HashMap<Arc<str>, NodeId> {
        let old = self.by_dir.remove(&dir).unwrap_or_default();
        for (name, id) in &old {
            self.unindex(dir, name, *id);
        }
        old
    }

    /// The names of `dir` are exactly `names` (what it held is taken out first).
    fn set_dir(&mut self, dir: NodeId, names: HashMap<Arc<str>, NodeId>) {
        self.take_dir(dir);
        for (name, id) in &names {
            self.index(dir, name.clone(), *id);
        }
        self.by_dir.insert(dir, names);
    }

    /// The names `dir` has for `node`.
    fn in_dir_of(&self, dir: NodeId, node: NodeId) -> Vec<String> {
        self.of(node)
            .filter(|(d, _)| *d == dir)
            .map(|(_, name)| name.to_string())
            .collect()
    }

    /// Every (directory, name) of `node`.
    fn of(&self, node: NodeId) -> impl Iterator<Item = &(NodeId, Arc<str>)> {
        self.of_node.get(&node).into_iter().flatten()
    }
}

/// When nodes last changed as far as this client can tell, kept while it matters
/// ([`FEED_RACE`]). Marks are pruned oldest first as new ones come (each mark is queued once
/// and dropped once: the cost follows the changes, not how many marks are held) and bounded
/// by [`TOUCHED_MAX`].
#[derive(Default)]
struct Touched {
    at: HashMap<NodeId, Instant>,
    /// Marks of changes heard (each at the time it was heard), oldest first.
    heard: VecDeque<(Instant, NodeId)>,
    /// Marks of changes that may still happen (each at the end of its window), oldest first.
    doubts: VecDeque<(Instant, NodeId)>,
    /// Every node counts as changed at this time (marks folded away when too many were held).
    all: Option<Instant>,
}

impl Touched {
    fn since(&self, id: NodeId, since: Instant) -> bool {
        self.all.is_some_and(|t| t >= since) || self.at.get(&id).is_some_and(|t| *t >= since)
    }

    /// Marks `id` changed at `at` (`doubt`: `at` is the end of a window in which it may
    /// change) and drops the marks that no longer matter at `now`.
    fn mark(&mut self, id: NodeId, at: Instant, doubt: bool, now: Instant) {
        let horizon = now.checked_sub(FEED_RACE).unwrap_or(now);
        let at_map = &mut self.at;
        for queue in [&mut self.heard, &mut self.doubts] {
            while queue.front().is_some_and(|(t, _)| *t < horizon) {
                if let Some((t, old)) = queue.pop_front()
                    && at_map.get(&old) == Some(&t)
                {
                    at_map.remove(&old);
                }
            }
        }
        let t = self.at.entry(id).or_insert(at);
        if *t > at {
            return;
        }
        *t = at;
        if doubt {
            self.doubts.push_back((at, id));
        } else {
            self.heard.push_back((at, id));
        }
        while self.heard.len() + self.doubts.len() > TOUCHED_MAX {
            let queue = if self.heard.len() >= self.doubts.len() {
                &mut self.heard
            } else {
                &mut self.doubts
            };
            if let Some((t, old)) = queue.pop_front() {
                if self.at.get(&old) == Some(&t) {
                    self.at.remove(&old);
                }
                if t > now && self.all.is_none_or(|a| a <= now) {
                    // A doubt's window end: every node counts as changed until then (logged
                    // once per such period).
                    tracing::info!(
                        until = ?t.saturating_duration_since(now),
                        "too many changes in doubt; every reply gets the short TTL meanwhile"
                    );
                }
                self.all = Some(self.all.map_or(t, |a| a.max(t)));
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.heard.len() + self.doubts.len()
    }
}

/// Taken before a listing request: when and at which change of the directory.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListingStart {
    at: Instant,
    changes: u64,
    distrusts: u64,
    seq: u64,
}

impl Known {
    /// Records `meta`, heard now, under `name` in its parent if given.
    pub fn remember(&mut self, meta: &NodeMeta, name: Option<(NodeId, &str)>, now: Instant) {
        self.by_id.insert(meta.id, meta.clone());
        self.heard(meta.id, now);
        if let Some((parent, name)) = name {
            self.changed(parent);
            self.names.insert(parent, name, meta.id);
        }
    }

    /// `id` was heard of at `now`: fresh unless the feed said it changed so recently that
    /// the answer may predate the change.
    fn heard(&mut self, id: NodeId, now: Instant) {
        let horizon = now.checked_sub(FEED_RACE).unwrap_or(now);
        if self.touched_since(id, horizon) || self.distrusted_until.is_some_and(|t| t >= now) {
            self.heard.remove(&id);
        } else {
            self.heard.insert(id, now);
        }
    }

    /// Whether the change feed said `id` changed at or after `since`.
    pub fn touched_since(&self, id: NodeId, since: Instant) -> bool {
        self.touched.since(id, since)
    }

    /// The change feed says `id` changed: nothing heard of it before is fresh, and nothing
    /// heard within `FEED_RACE` after either.
    pub fn feed_changed(&mut self, id: NodeId, now: Instant) {
        self.heard.remove(&id);
        self.touched.mark(id, now, false, now);
    }

    /// An operation here on `id` ended without an answer: the directory may have applied it,
    /// or may still, within `FEED_RACE` (and this client's own changes never come back in
    /// its feed). Nothing heard of it is fresh, and nothing heard until that window ends.
    pub fn doubt(&mut self, id: NodeId, now: Instant) {
        self.heard.remove(&id);
        self.touched.mark(id, now + FEED_RACE, true, now);
    }

    /// The names `dir` is known to have for `node`.
    pub fn names_for(&self, dir: NodeId, node: NodeId) -> Vec<String> {
        self.names.in_dir_of(dir, node)
    }

    /// Nothing known is fresh any more (the change feed was lost): every name and every node
    /// known, for the caller to drop from the kernel too. What is known stays, for when the
    /// directory cannot be reached.
    ///
    /// `race`: for how long after now what is heard is not fresh either (an answer heard then
    /// may predate a change the lost feed never delivered): `FEED_RACE` after a loss, zero at
    /// a mount's first subscription (nothing was heard through a feed yet, so no change was
    /// missed by one; what was heard before is dropped all the same).
    pub fn distrust_all(&mut self, race: Duration) -> (Vec<(NodeId, String)>, Vec<NodeId>) {
        let names: Vec<(NodeId, String)> = self
            .names
            .by_dir
            .iter()
            .flat_map(|(dir, n)| n.keys().map(|name| (*dir, name.to_string())))
            .collect();
        let dirs: Vec<NodeId> = self
            .names
            .by_dir
            .keys()
            .chain(self.complete.keys())
            .copied()
            .collect();
        for dir in dirs {
            self.changed(dir);
        }
        self.complete.clear();
        self.heard.clear();
        self.distrusts += 1;
        let now = Instant::now();
        self.distrusted_until = Some(now + race);
        (names, self.by_id.keys().copied().collect())
    }

    fn changed(&mut self, dir: NodeId) {
        *self.changes.entry(dir).or_default() += 1;
    }

    /// Call before requesting a listing of `dir`.
    pub fn listing_start(&mut self, dir: NodeId, now: Instant) -> ListingStart {
        self.listings += 1;
        ListingStart {
            at: now,
            changes: self.changes.get(&dir).copied().unwrap_or(0),
            distrusts: self.distrusts,
            seq: self.listings,
        }
    }

    /// A full listing of `dir`, requested at `start`: its names are exactly these, as of the
    /// request (not the answer). If this client changed the directory meanwhile, the listing
    /// may predate the change: its names are added, nothing is removed, and the directory is
    /// not taken as known completely. A listing requested before the one that made the
    /// directory known completely is older than what is known: it is ignored (listings run
    /// in parallel, and may end in any order). Returns the names known before that the
    /// listing shows gone or naming another node (the kernel may still hold them).
    pub fn listed(
        &mut self,
        dir: NodeId,
        entries: &[DirEntry],
        start: ListingStart,
    ) -> Vec<String> {
        if self
            .newest_listing
            .get(&dir)
            .is_some_and(|s| *s > start.seq)
        {
            return Vec::new();
        }
        // A change of unknown outcome there may land after the listing was taken.
        let current = self.changes.get(&dir).copied().unwrap_or(0) == start.changes
            && self.distrusts == start.distrusts
            && !self.touched_since(dir, start.at);
        let old = self.names.take_dir(dir);
        let mut names = if current {
            HashMap::with_capacity(entries.len())
        } else {
            old.clone()
        };
        for e in entries {
            self.by_id.insert(e.meta.id, e.meta.clone());
            self.heard(e.meta.id, start.at);
            if current {
                names.insert(Arc::from(e.name.as_str()), e.meta.id);
            } else {
                names.entry(Arc::from(e.name.as_str())).or_insert(e.meta.id);
            }
        }
        let dropped = if current {
            old.into_iter()
                .filter(|(name, id)| names.get(name) != Some(id))
                .map(|(name, _)| name.to_string())
                .collect()
        } else {
            Vec::new()
        };
        self.names.set_dir(dir, names);
        if current {
            self.complete.insert(dir, start.at);
            self.newest_listing.insert(dir, start.seq);
        } else {
            self.complete.remove(&dir);
        }
        dropped
    }

    /// `dir` was just made by this client: empty, and known completely.
    pub fn made_dir(&mut self, dir: NodeId, now: Instant) {
        self.changed(dir);
        self.names.set_dir(dir, HashMap::new());
        self.complete.insert(dir, now);
    }

    /// The name is gone (unlinked or renamed away here). The node's metadata stays: a node
    /// unlinked while open here is still served from it.
    pub fn forget_name(&mut self, parent: NodeId, name: &str) {
        self.changed(parent);
        self.names.remove(parent, name);
    }

    /// A rename done here: the node moves to its new name (replacing what was there).
    pub fn renamed(&mut self, parent: NodeId, name: &str, new_parent: NodeId, new_name: &str) {
        self.changed(parent);
        self.changed(new_parent);
        match self.names.remove(parent, name) {
            Some(id) => self.names.insert(new_parent, new_name, id),
            None => {
                // Which node now has the new name is not known here.
                self.forget_name(new_parent, new_name);
                self.unsure(new_parent);
            }
        }
    }

    /// What this client knows of `dir` may be wrong (an operation there was refused, e.g. a
    /// name another client created): ask the directory until it is listed again.
    pub fn unsure(&mut self, dir: NodeId) {
        self.changed(dir);
        self.complete.remove(&dir);
    }

    /// How a lookup of `name` in `parent` can be answered: `Absent` if the directory is known
    /// completely, as of less than `ttl` ago, and the name is not in it; `Relist` if it was
    /// known completely before (lookups there are frequent) and is small, so one listing
    /// answers this lookup and the ones that follow; else `Ask`.
    pub fn lookup(&self, parent: NodeId, name: &str, ttl: Duration, now: Instant) -> Lookup {
        let Some(since) = self.complete.get(&parent) else {
            return Lookup::Ask;
        };
        let names = self.names.dir(parent);
        if now.saturating_duration_since(*since) < ttl {
            if names.is_some_and(|n| n.contains_key(name)) {
                Lookup::Ask
            } else {
                Lookup::Absent
            }
        } else if names.is_none_or(|n| n.len() <= RELIST_MAX_ENTRIES) {
            Lookup::Relist
        } else {
            Lookup::Ask
        }
    }

    /// The node under `name` in `parent`, as last heard.
    pub fn by_name(&self, parent: NodeId, name: &str) -> Option<NodeMeta> {
        let id = self.names.get(parent, name)?;
        self.by_id.get(&id).cloned()
    }

    /// The names of `id` as last heard, those in `hint` (its recorded parent) first.
    pub fn names_of(&self, id: NodeId, hint: NodeId) -> Vec<(NodeId, String)> {
        let mut out: Vec<(NodeId, String)> = self
            .names
            .of(id)
            .map(|(dir, name)| (*dir, name.to_string()))
            .collect();
        out.sort_by(|(a, x), (b, y)| (*a != hint, *a, x).cmp(&(*b != hint, *b, y)));
        out
    }

    /// The metadata of `id`, as last heard.
    pub fn meta(&self, id: NodeId) -> Option<NodeMeta> {
        self.by_id.get(&id).cloned()
    }

    /// The metadata of `id` if heard less than `ttl` ago, with the time left.
    pub fn recent(&self, id: NodeId, ttl: Duration, now: Instant) -> Option<(NodeMeta, Duration)> {
        let age = now.saturating_duration_since(*self.heard.get(&id)?);
        let left = ttl.checked_sub(age)?;
        Some((self.by_id.get(&id)?.clone(), left))
    }

    /// Directory `dir` gained (`delta` > 0) or lost subdirectories here: its link count
    /// follows locally.
    pub fn dir_links(&mut self, dir: NodeId, delta: i64) {
        if let Some(m) = self.by_id.get_mut(&dir)
            && m.nlink != 0
        {
            let n = i64::from(m.nlink).saturating_add(delta).max(2);
            m.nlink = u32::try_from(n).unwrap_or(u32::MAX);
        }
    }

    /// This client just changed node `id`'s metadata (renamed it): its ctime moves on to
    /// `now_ns` locally, as the directory's did.
    pub fn touched_node(&mut self, id: NodeId, now_ns: u64) {
        if let Some(m) = self.by_id.get_mut(&id) {
            m.ctime_ns = now_ns;
        }
    }

    /// What is known of `id` may be out of date (a change here whose effect on it is not
    /// known): the next getattr asks the directory.
    pub fn stale(&mut self, id: NodeId) {
        self.heard.remove(&id);
    }

    /// This client just changed directory `dir`: its times move on to `now_ns` locally.
    pub fn touched_dir(&mut self, dir: NodeId, now_ns: u64) {
        if let Some(m) = self.by_id.get_mut(&dir) {
            m.mtime_ns = now_ns;
            m.ctime_ns = now_ns;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A regular file's metadata, for tests.
    pub(in crate::fs) fn meta(id: u64) -> NodeMeta {
        NodeMeta {
            id: NodeId(id),
            parent: NodeId::ROOT,
            kind: common::FileKind::File,
            mode: 0o644,
            owner: "t".into(),
            uid: 0,
            gid: 0,
            size: 0,
            version: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            atime_ns: 0,
            nlink: 1,
            rdev: 0,
            committed_ns: 0,
            hash: common::ContentHash::empty(),
            primary: None,
            replicas: vec![],
            holders: vec![],
            symlink_target: None,
            fence: common::FenceToken(0),
            recent_uploads: vec![],
            writeback: None,
        }
    }

    const TTL: Duration = Duration::from_secs(1);

    #[test]
    fn link_counts_follow_local_changes_and_a_stale_node_is_asked_again() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let dir = NodeMeta {
            kind: common::FileKind::Dir,
            nlink: 2,
            ..meta(7)
        };
        k.remember(&dir, None, t0);
        k.dir_links(dir.id, 1);
        k.dir_links(dir.id, 1);
        k.dir_links(dir.id, -1);
        let links = |k: &Known| k.meta(dir.id).map(|m| m.nlink);
        assert_eq!(links(&k), Some(3));
        k.dir_links(dir.id, -5);
        assert_eq!(links(&k), Some(2), "never below a directory's own two");
        k.touched_node(dir.id, 42);
        assert_eq!(k.meta(dir.id).map(|m| m.ctime_ns), Some(42));
        assert!(k.recent(dir.id, TTL, t0).is_some());
        k.stale(dir.id);
        assert!(k.recent(dir.id, TTL, t0).is_none(), "asked again");
        assert!(
            k.meta(dir.id).is_some(),
            "still known for when the directory is down"
        );
    }

    #[test]
    fn a_name_is_absent_only_from_a_fresh_complete_listing() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let dir = NodeId(7);
        assert_eq!(k.lookup(dir, "x", TTL, t0), Lookup::Ask, "nothing known");
        let start = k.listing_start(dir, t0);
        k.listed(
            dir,
            &[DirEntry {
                name: "a".into(),
                meta: meta(8),
            }],
            start,
        );
        assert_eq!(k.lookup(dir, "x", TTL, t0), Lookup::Absent);
        assert_eq!(
            k.lookup(dir, "a", TTL, t0),
            Lookup::Ask,
            "a listed name is asked for"
        );
        assert_eq!(
            k.lookup(dir, "x", TTL, t0 + TTL),
            Lookup::Relist,
            "a listing a TTL old is stale"
        );
        k.unsure(dir);
        assert_eq!(k.lookup(dir, "x", TTL, t0), Lookup::Ask);
    }

    #[test]
    fn names_made_renamed_and_removed_here_keep_the_listing_true() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let (a, b) = (NodeId(2), NodeId(3));
        k.made_dir(a, t0);
        k.made_dir(b, t0);
        k.remember(&meta(10), Some((a, "f")), t0);
        assert_eq!(k.lookup(a, "f", TTL, t0), Lookup::Ask);
        k.renamed(a, "f", b, "g");
        assert_eq!(k.lookup(a, "f", TTL, t0), Lookup::Absent);
        assert_eq!(k.lookup(b, "g", TTL, t0), Lookup::Ask);
        assert_eq!(k.by_name(b, "g").map(|m| m.id), Some(NodeId(10)));
        // A rename of a name not known here: the target directory is no longer known.
        k.renamed(a, "unknown", b, "h");
        assert_eq!(k.lookup(b, "h", TTL, t0), Lookup::Ask);
        assert_eq!(k.lookup(b, "other", TTL, t0), Lookup::Ask);
        k.forget_name(b, "g");
        assert!(k.by_name(b, "g").is_none());
        assert!(k.meta(NodeId(10)).is_some(), "metadata outlives the name");
    }

    #[test]
    fn regression_a_listing_requested_before_a_local_create_never_hides_it() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let dir = NodeId(4);
        k.made_dir(dir, t0);
        let start = k.listing_start(dir, t0);
        // While the listing is on its way, this client creates "x"; the answer predates it.
        k.remember(&meta(11), Some((dir, "x")), t0);
        k.listed(dir, &[], start);
        assert_eq!(k.by_name(dir, "x").map(|m| m.id), Some(NodeId(11)));
        assert_eq!(k.lookup(dir, "x", TTL, t0), Lookup::Ask);
        assert_eq!(
            k.lookup(dir, "y", TTL, t0),
            Lookup::Ask,
            "not known completely until a listing after the change"
        );
        let start = k.listing_start(dir, t0);
        k.listed(
            dir,
            &[DirEntry {
                name: "x".into(),
                meta: meta(11),
            }],
            start,
        );
        assert_eq!(k.lookup(dir, "y", TTL, t0), Lookup::Absent);
    }

    #[test]
    fn regression_a_listing_that_ends_after_a_newer_one_never_replaces_it() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let dir = NodeId(4);
        let older = k.listing_start(dir, t0);
        // Another client creates "n" meanwhile; a second listing, asked later, shows it.
        let t1 = t0 + Duration::from_millis(1);
        let newer = k.listing_start(dir, t1);
        let n = DirEntry {
            name: "n".into(),
            meta: meta(11),
        };
        assert!(k.listed(dir, std::slice::from_ref(&n), newer).is_empty());
        assert_eq!(k.lookup(dir, "n", TTL, t1), Lookup::Ask);
        // The older listing ends last: it does not hide "n".
        assert!(k.listed(dir, &[], older).is_empty(), "nothing dropped");
        assert_eq!(k.by_name(dir, "n").map(|m| m.id), Some(NodeId(11)));
        assert_eq!(
            k.lookup(dir, "n", TTL, t1),
            Lookup::Ask,
            "not answered absent"
        );
        assert_eq!(
            k.lookup(dir, "x", TTL, t1),
            Lookup::Absent,
            "still complete"
        );
    }

    #[test]
    fn the_names_of_a_node_follow_every_change_of_the_namespace() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let (a, b) = (NodeId(2), NodeId(3));
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let start = k.listing_start(a, t0);
        let mut entries: Vec<DirEntry> = (0..1000)
            .map(|i| DirEntry {
                name: format!("n{i}"),
                meta: meta(100 + i),
            })
            .collect();
        // A hard link: node 100 has a second name here.
        entries.push(DirEntry {
            name: "link".into(),
            meta: meta(100),
        });
        k.listed(a, &entries, start);
        assert_eq!(sorted(k.names_for(a, NodeId(100))), ["link", "n0"]);
        assert_eq!(k.names_for(a, NodeId(999)), ["n899"]);
        assert!(k.names_for(b, NodeId(100)).is_empty());
        k.remember(&meta(100), Some((b, "elsewhere")), t0);
        assert_eq!(
            k.names_of(NodeId(100), b),
            [
                (b, "elsewhere".to_owned()),
                (a, "link".to_owned()),
                (a, "n0".to_owned())
            ]
        );
        // A name now naming another node leaves the old node's names.
        k.remember(&meta(5000), Some((a, "link")), t0);
        assert_eq!(k.names_for(a, NodeId(100)), ["n0"]);
        assert_eq!(k.names_for(a, NodeId(5000)), ["link"]);
        k.renamed(a, "n0", b, "moved");
        assert!(k.names_for(a, NodeId(100)).is_empty());
        assert_eq!(sorted(k.names_for(b, NodeId(100))), ["elsewhere", "moved"]);
        k.forget_name(b, "elsewhere");
        assert_eq!(k.names_for(b, NodeId(100)), ["moved"]);
        // A listing of `a` that no longer shows n1 and shows n2 as another node.
        let start = k.listing_start(a, t0);
        k.listed(
            a,
            &[DirEntry {
                name: "n2".into(),
                meta: meta(7000),
            }],
            start,
        );
        assert!(k.names_for(a, NodeId(101)).is_empty());
        assert!(k.names_for(a, NodeId(102)).is_empty());
        assert_eq!(k.names_for(a, NodeId(7000)), ["n2"]);
        // Made again here: empty.
        k.made_dir(a, t0);
        assert!(k.names_for(a, NodeId(7000)).is_empty());
        assert!(k.names_of(NodeId(7000), a).is_empty());
        assert_eq!(k.names_of(NodeId(100), a), [(b, "moved".to_owned())]);
    }

    #[test]
    fn change_marks_last_their_window_and_stay_bounded_under_churn() {
        let mut k = Known::default();
        let t0 = Instant::now();
        let step = Duration::from_micros(50);
        // 200,000 changes of distinct nodes, 50 us apart: 10 s hold 200,000 marks, more than
        // the bound.
        let n: u64 = 200_000;
        for i in 0..n {
            let at = t0 + step * u32::try_from(i).unwrap_or(u32::MAX);
            k.feed_changed(NodeId(i), at);
            assert!(k.touched.len() <= TOUCHED_MAX);
        }
        let end = t0 + step * u32::try_from(n).unwrap_or(u32::MAX);
        // The newest are marked one by one; the oldest count through the folded mark, so a
        // request that began before they changed is still not taken as fresh.
        assert!(k.touched_since(NodeId(n - 1), end - step));
        assert!(k.touched_since(NodeId(0), t0));
        assert!(!k.touched_since(NodeId(n - 1), end + step), "nothing since");
        // Past the window, every mark is pruned as new ones come.
        let later = end + FEED_RACE + Duration::from_secs(1);
        k.feed_changed(NodeId(1), later);
        assert_eq!(k.touched.len(), 1);
        assert!(!k.touched_since(NodeId(n - 1), end));
        assert!(k.touched_since(NodeId(1), later));
    }

    #[test]
    fn a_doubt_lasts_until_its_window_ends() {
        let mut k = Known::default();
        let t0 = Instant::now();
        k.remember(&meta(10), None, t0);
        assert!(k.recent(NodeId(10), TTL, t0).is_some());
        k.doubt(NodeId(10), t0);
        assert!(k.recent(NodeId(10), TTL, t0).is_none());
        // A request begun any time in the window may be answered before the change.
        let inside = t0 + FEED_RACE - Duration::from_millis(1);
        assert!(k.touched_since(NodeId(10), inside));
        k.remember(&meta(10), None, inside);
        assert!(k.recent(NodeId(10), TTL, inside).is_none());
        // Marks heard meanwhile are pruned around it, the doubt stays until it ends.
        for i in 0..100 {
            k.feed_changed(NodeId(1000 + i), t0 + Duration::from_millis(i));
        }
        k.feed_changed(NodeId(1), t0 + FEED_RACE + Duration::from_millis(200));
        assert!(k.touched_since(NodeId(10), inside));
        assert!(!k.touched_since(NodeId(10), t0 + FEED_RACE + Duration::from_millis(1)));
        let after = t0 + FEED_RACE * 3;
        k.feed_changed(NodeId(2), after);
        assert_eq!(k.touched.len(), 1, "the doubt and the old marks are gone");
        k.remember(&meta(10), None, after);
        assert!(k.recent(NodeId(10), TTL, after).is_some());
    }
}
