//! Who an operation acts for on a `--local-ids` mount: the local process that made the FUSE
//! request (its uid, gid and supplementary groups), carried as a task-local value from the
//! adapter through the core to `Remote`, which names it to the services (`x-dfs-act-as`).
//! Outside such a scope (background pushes, lock renewals) a request acts as the mount's own
//! login, the administrator.

use std::future::Future;
use std::io::Read;

use common::Identity;

tokio::task_local! {
    static CALLER: Option<Who>;
}

/// The caller of a scope: known, or named by a FUSE request (uid, gid, pid) whose groups are
/// read the first time a request to the cluster needs them (most ops the client answers
/// itself need none). Either way the identity is explicit: there is no default to fall back
/// to (a default identity would be uid 0, the administrator).
enum Who {
    Known(Identity),
    Request {
        uid: u32,
        gid: u32,
        pid: u32,
        id: std::sync::OnceLock<Identity>,
    },
}

impl Who {
    fn identity(&self) -> Identity {
        match self {
            Who::Known(id) => id.clone(),
            Who::Request { uid, gid, pid, id } => {
                id.get_or_init(|| of_request(*uid, *gid, *pid)).clone()
            }
        }
    }
}

/// Runs `f` acting for `id` (None: the mount's own login).
pub async fn scope<F: Future>(id: Option<Identity>, f: F) -> F::Output {
    CALLER.scope(id.map(Who::Known), f).await
}

/// Runs `f` acting for the caller of a FUSE request, `(uid, gid, pid)` (None: the mount's own
/// login); see [`of_request`].
pub async fn scope_request<F: Future>(request: Option<(u32, u32, u32)>, f: F) -> F::Output {
    let who = request.map(|(uid, gid, pid)| Who::Request {
        uid,
        gid,
        pid,
        id: std::sync::OnceLock::new(),
    });
    CALLER.scope(who, f).await
}

/// The local caller the running operation acts for, if any.
pub fn current() -> Option<Identity> {
    CALLER
        .try_with(|w| w.as_ref().map(Who::identity))
        .ok()
        .flatten()
}

/// Most bytes of `/proc/<pid>/status` read: the `Groups:` line comes early, after a few short
/// lines; a status longer than this up to it is treated as having no groups.
const STATUS_LIMIT: u64 = 64 * 1024;

/// The identity of a FUSE request's caller: the uid and gid the kernel gives (the file-system
/// ids of the calling thread) and the supplementary groups of thread `pid`, read from
/// `/proc/<pid>/status`. Any doubt (no such thread any more, a status that does not show the
/// same file-system uid and gid, an unreadable or overlong line) gives no supplementary
/// groups: a caller may lose group access it has, never gain one it lacks.
pub fn of_request(uid: u32, gid: u32, pid: u32) -> Identity {
    let groups = if pid == 0 {
        vec![]
    } else {
        groups_of(pid, uid, gid).unwrap_or_default()
    };
    Identity {
        uid,
        gid,
        groups,
        admin: uid == 0,
    }
}

fn groups_of(pid: u32, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let mut text = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .ok()?
        .take(STATUS_LIMIT)
        .read_to_string(&mut text)
        .ok()?;
    parse_status(&text, uid, gid)
}

/// The supplementary groups in a `/proc/<pid>/status` text, if it is the status of a thread
/// whose file-system uid and gid are `uid` and `gid` (the 4th field of `Uid:` and `Gid:`), so
/// that a pid reused by another process is never believed.
pub fn parse_status(text: &str, uid: u32, gid: u32) -> Option<Vec<u32>> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::split_whitespace)
    };
    let fs_id = |name: &str| field(name)?.nth(3)?.parse::<u32>().ok();
    if fs_id("Uid:")? != uid || fs_id("Gid:")? != gid {
        return None;
    }
    // A `Groups:` line cut off by the read limit could lose groups, never add: no line
    // ending means the text was cut, and then no groups are believed.
    let line = text.lines().find(|l| l.starts_with("Groups:"))?;
    let start = text.find(line)?;
    if !text[start..].contains('\n') {
        return None;
    }
    let mut groups = line["Groups:".len()..]
        .split_whitespace()
        .map(str::parse::<u32>)
        .collect::<Result<Vec<u32>, _>>()
        .ok()?;
    if groups.len() > common::perm::MAX_GROUPS {
        return None;
    }
    groups.retain(|g| *g != gid);
    Some(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tsh\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t7\nPid:\t7\n\
        Uid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nFDSize:\t64\n\
        Groups:\t24 100 27 \nNStgid:\t7\n";

    #[test]
    fn groups_come_from_the_status_of_the_same_caller_only() {
        assert_eq!(parse_status(STATUS, 1000, 100), Some(vec![24, 27]));
        // A reused pid (another owner) or a changed fsuid: no groups believed.
        assert_eq!(parse_status(STATUS, 1001, 100), None);
        assert_eq!(parse_status(STATUS, 1000, 0), None);
        // Cut off inside the Groups line.
        let cut = &STATUS[..STATUS.find("27").expect("in it")];
        assert_eq!(parse_status(cut, 1000, 100), None);
        let junk = STATUS.replace("24 100 27", "24 x");
        assert_eq!(parse_status(&junk, 1000, 100), None);
        assert_eq!(of_request(0, 0, 0).groups, Vec::<u32>::new());
        assert!(of_request(0, 0, 0).admin && !of_request(5, 5, 0).admin);
    }

    #[test]
    fn this_process_reads_its_own_groups() {
        let pid = std::process::id();
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let fs = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u32>().ok())
                .expect("id")
        };
        let (uid, gid) = (fs("Uid:"), fs("Gid:"));
        // The process's real supplementary groups, read here on their own: every number
        // after `Groups:`, less the primary gid.
        let mut real: Vec<u32> = text
            .lines()
            .find(|l| l.starts_with("Groups:"))
            .expect("a Groups line")
            .split_whitespace()
            .skip(1)
            .map(|g| g.parse().expect("a gid"))
            .filter(|g| *g != gid)
            .collect();
        real.sort_unstable();
        let mut read = groups_of(pid, uid, gid).expect("its own status");
        read.sort_unstable();
        assert_eq!(read, real);
        let id = of_request(uid, gid, pid);
        assert_eq!((id.uid, id.gid), (uid, gid));
        let mut carried = id.groups;
        carried.sort_unstable();
        assert_eq!(carried, real);
    }

    #[tokio::test]
    async fn a_scope_names_its_caller_and_only_inside_it() {
        assert_eq!(current(), None);
        let pid = std::process::id();
        let got = scope_request(Some((0, 0, pid)), async { current() }).await;
        assert!(got.is_some_and(|id| id.uid == 0 && id.admin));
        let alice = Identity {
            uid: 1000,
            gid: 1000,
            groups: vec![24],
            admin: false,
        };
        let inner = scope_request(
            Some((0, 0, pid)),
            scope(Some(alice.clone()), async { current() }),
        )
        .await;
        assert_eq!(inner, Some(alice));
        assert_eq!(scope(None, async { current() }).await, None);
    }
}
