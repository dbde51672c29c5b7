//! Who may do what in the namespace: the POSIX rules of `common::perm` applied to the
//! directory's operations, each refusal with the error POSIX gives (EACCES for permission
//! bits, EPERM for what only an owner or the administrator may do).

use common::api::SetAttrRequest;
use common::perm::{R, SETGID, SETUID, W, X};
use common::{FileKind, Identity, NodeMeta};

use crate::error::{ServiceError, ServiceResult};

fn bits(want: u32) -> String {
    [(R, 'r'), (W, 'w'), (X, 'x')]
        .iter()
        .filter(|(b, _)| want & b != 0)
        .map(|(_, c)| *c)
        .collect()
}

/// Refuses (EACCES) unless `who` may `want` `node`.
pub fn need(who: &Identity, node: &NodeMeta, want: u32) -> ServiceResult<()> {
    if who.may(
        node.uid,
        node.gid,
        node.mode,
        want,
        node.kind == FileKind::Dir,
    ) {
        return Ok(());
    }
    Err(ServiceError::AccessDenied(format!(
        "uid {} may not {} node {} (owner {}:{}, mode {:04o})",
        who.uid,
        bits(want),
        node.id,
        node.uid,
        node.gid,
        node.mode
    )))
}

/// Refuses (EACCES) a new version of `node` unless `who` may write it or owns it. The owner
/// is let through as NFS servers do: a program may create a file read-only (`open(O_CREAT,
/// 0444)`, as git does for its objects) and still write through the descriptor it got, and
/// an owner could always make the file writable first.
pub fn need_write(who: &Identity, node: &NodeMeta) -> ServiceResult<()> {
    if who.owns(node.uid) {
        return Ok(());
    }
    need(who, node, W)
}

/// Refuses (EACCES) removing or renaming `entry` out of `dir` unless the permission bits of
/// `dir` allow it (write and search) and, in a sticky directory, `who` owns one of them.
pub fn need_unlink(who: &Identity, dir: &NodeMeta, entry: &NodeMeta) -> ServiceResult<()> {
    need(who, dir, W | X)?;
    if who.may_unlink_from(dir.uid, dir.mode, entry.uid) {
        return Ok(());
    }
    // EPERM, not EACCES, as unlink(2) and rename(2) say for a sticky directory.
    Err(ServiceError::Forbidden(format!(
        "node {} is in sticky directory {} and uid {} owns neither",
        entry.id, dir.id, who.uid
    )))
}

/// Owner and group of a node `who` creates in `parent`, and its mode: the parent's group when
/// the parent is set-group-id (a new directory then inherits the bit), else the caller's
/// primary group; a set-group-id bit asked for a file whose group the caller is not in is
/// dropped (as Linux does).
pub fn new_node(who: &Identity, parent: &NodeMeta, kind: FileKind, mode: u32) -> (u32, u32, u32) {
    let inherit = parent.mode & SETGID != 0;
    let gid = if inherit { parent.gid } else { who.gid };
    let mut mode = mode;
    if kind == FileKind::Dir && inherit {
        mode |= SETGID;
    }
    if kind != FileKind::Dir && mode & SETGID != 0 && !who.admin && !who.in_group(gid) {
        mode &= !SETGID;
    }
    (who.uid, gid, mode)
}

/// Refuses (EPERM) a device node unless `who` is the administrator (as only root may
/// `mknod(2)` one); FIFOs and sockets need only what any new entry needs.
pub fn need_mknod(who: &Identity, kind: FileKind) -> ServiceResult<()> {
    if kind.is_device() && !who.admin {
        return Err(ServiceError::Forbidden(format!(
            "only the administrator may make device nodes (caller uid {})",
            who.uid
        )));
    }
    Ok(())
}

/// Refuses a hard link to `node`: EPERM for a directory (link(2)), as Linux does.
pub fn need_linkable(node: &NodeMeta) -> ServiceResult<()> {
    if node.kind == FileKind::Dir {
        return Err(ServiceError::Forbidden(format!(
            "node {} is a directory; directories have no hard links",
            node.id
        )));
    }
    Ok(())
}

fn not_permitted(what: &str, who: &Identity, node: &NodeMeta) -> ServiceError {
    ServiceError::Forbidden(format!(
        "only the owner (uid {}) or the administrator may {what} node {} (caller uid {})",
        node.uid, node.id, who.uid
    ))
}

/// Applies a setattr to `meta` if `who` may make it, by POSIX's rules: chmod and explicit
/// times need the owner (EPERM otherwise); setting both times to now needs the owner or write
/// permission (EACCES); chown needs the administrator; chgrp needs the owner and a group it is
/// in; chmod by a non-member of the file's group drops set-group-id; chown or chgrp by anyone
/// but the administrator drops set-user-id and set-group-id. A time set to now is `now` (the
/// directory's clock), whatever time the request carries.
pub fn apply_setattr(
    who: &Identity,
    meta: &mut NodeMeta,
    req: &SetAttrRequest,
    now: u64,
) -> ServiceResult<()> {
    if let Some(uid) = req.uid
        && uid != meta.uid
        && !who.admin
    {
        return Err(ServiceError::Forbidden(format!(
            "only the administrator may give node {} to another user",
            meta.id
        )));
    }
    if let Some(gid) = req.gid
        && gid != meta.gid
        && !(who.admin || (who.uid == meta.uid && who.in_group(gid)))
    {
        return Err(ServiceError::Forbidden(format!(
            "uid {} may not give node {} to group {gid} (the owner may, to a group it is in)",
            who.uid, meta.id
        )));
    }
    if req.mode.is_some() && !who.owns(meta.uid) {
        return Err(not_permitted("change the mode of", who, meta));
    }
    // utimensat(2) as Linux judges it: both times set to now (UTIME_NOW twice, or a NULL
    // `times`: `touch`) need the owner or write permission (EACCES); any other change of the
    // times, an explicit one or one set to now with the other omitted (`touch -a`,
    // `touch -m`), needs the owner (EPERM).
    let touch = req.mtime_ns.is_some() && req.mtime_now && req.atime_ns.is_some() && req.atime_now;
    if touch {
        if !who.owns(meta.uid) {
            need(who, meta, W)?;
        }
    } else if (req.mtime_ns.is_some() || req.atime_ns.is_some()) && !who.owns(meta.uid) {
        return Err(not_permitted("set the times of", who, meta));
    }
    // Ownership first, then the mode: a chown by anyone but the administrator drops the
    // set-id bits of the old mode, and a mode given with it is judged against the new group.
    let owner_changed = req.uid.is_some_and(|u| u != meta.uid);
    let group_changed = req.gid.is_some_and(|g| g != meta.gid);
    if (owner_changed || group_changed) && !who.admin && meta.kind != FileKind::Dir {
        meta.mode &= !(SETUID | SETGID);
    }
    if let Some(uid) = req.uid {
        meta.uid = uid;
    }
    if let Some(gid) = req.gid {
        meta.gid = gid;
    }
    if let Some(mut m) = req.mode {
        if m & SETGID != 0 && !who.admin && !who.in_group(meta.gid) {
            m &= !SETGID;
        }
        meta.mode = m;
    }
    if let Some(t) = req.mtime_ns {
        meta.mtime_ns = if req.mtime_now { now } else { t };
    }
    if let Some(t) = req.atime_ns {
        meta.atime_ns = if req.atime_now { now } else { t };
    }
    Ok(())
}
