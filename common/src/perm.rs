//! Who a request acts as, and the POSIX permission rules the directory enforces with it. Pure
//! functions of an identity and a node's owner, group and mode, shared by the services (which
//! decide) and the client (which shows owners and explains refusals).

use serde::{Deserialize, Serialize};

/// First uid (and gid) given to users at signup, as Debian's `adduser` starts at 1000 and AFS
/// deployments often higher: far from local system accounts.
pub const FIRST_UID: u32 = 10_000;

/// A caller: numeric user, primary group, further groups, and whether it is the cluster's
/// administrator (who acts as root: no permission check stops it, and only it may chown).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Further groups.
    #[serde(default)]
    pub groups: Vec<u32>,
    /// The administrator.
    #[serde(default)]
    pub admin: bool,
}

/// A caller as the services see it: the user name (recorded as a node's `owner`) and the
/// identity permissions are checked with. Other services call as `@cluster`, the administrator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// User name.
    pub name: String,
    /// Numeric identity.
    pub id: Identity,
}

impl Caller {
    /// Another dfs service (the cluster key): acts as root.
    pub fn cluster() -> Self {
        Caller {
            name: "@cluster".into(),
            id: Identity {
                admin: true,
                ..Identity::default()
            },
        }
    }
}

/// Read permission bit (in `may`'s `want`).
pub const R: u32 = 4;
/// Write permission bit.
pub const W: u32 = 2;
/// Execute (search, for a directory) permission bit.
pub const X: u32 = 1;

/// Not a mode bit: to write new versions of a file, which its owner may (even a read-only
/// file it created) or anyone with write permission. Asked for by a writer's client before
/// it queues for the file's write lock.
pub const COMMIT: u32 = 8;

/// Set-user-id bit of a mode.
pub const SETUID: u32 = 0o4000;
/// Set-group-id bit of a mode.
pub const SETGID: u32 = 0o2000;
/// Sticky bit of a mode (on a directory: only owners may remove or rename entries).
pub const STICKY: u32 = 0o1000;

/// Most supplementary groups an identity carries on the wire (Linux allows 65536; a request
/// header must stay small).
pub const MAX_GROUPS: usize = 256;

/// The uid and gid of `nobody`: an identity that owns nothing.
pub const NOBODY: u32 = 65_534;

impl Identity {
    /// The header value an administrator's `--local-ids` mount sends for a local caller.
    pub fn act_as_header(&self) -> String {
        let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
        format!("{}:{}:{}", self.uid, self.gid, groups.join(","))
    }

    /// The local caller named by an `x-dfs-act-as` value: the local root (uid 0) is the
    /// administrator, every other uid an ordinary user. None if malformed or with more than
    /// [`MAX_GROUPS`] groups.
    pub fn from_act_as_header(value: &str) -> Option<Identity> {
        let mut parts = value.splitn(3, ':');
        let uid: u32 = parts.next()?.parse().ok()?;
        let gid: u32 = parts.next()?.parse().ok()?;
        let groups = match parts.next()? {
            "" => vec![],
            g => g
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u32>>>()?,
        };
        if groups.len() > MAX_GROUPS {
            return None;
        }
        Some(Identity {
            uid,
            gid,
            groups,
            admin: uid == 0,
        })
    }

    /// `nobody`: what a token without an identity acts as.
    pub fn nobody() -> Self {
        Identity {
            uid: NOBODY,
            gid: NOBODY,
            groups: vec![],
            admin: false,
        }
    }

    /// Whether `gid` is the caller's primary group or one of its groups.
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    /// Whether the caller may `want` (a mix of `R`, `W`, `X`) a node owned by `uid`:`gid` with
    /// `mode`: the owner's bits for the owner, else the group's for a member, else the others'
    /// (as POSIX: an owner refused by the owner bits is refused, whatever the group bits say).
    /// The administrator may read and write anything, and execute a file only if someone may
    /// (as root).
    pub fn may(&self, uid: u32, gid: u32, mode: u32, want: u32, is_dir: bool) -> bool {
        if self.admin {
            return want & X == 0 || is_dir || mode & 0o111 != 0;
        }
        let bits = if self.uid == uid {
            mode >> 6
        } else if self.in_group(gid) {
            mode >> 3
        } else {
            mode
        } & 7;
        bits & want == want
    }

    /// The sticky-directory rule: in a directory with the sticky bit, an entry may be removed or
    /// renamed only by its owner, the directory's owner or the administrator.
    pub fn may_unlink_from(&self, dir_uid: u32, dir_mode: u32, entry_uid: u32) -> bool {
        dir_mode & STICKY == 0 || self.admin || self.uid == dir_uid || self.uid == entry_uid
    }

    /// Whether the caller owns a node owned by `uid` (or acts as root).
    pub fn owns(&self, uid: u32) -> bool {
        self.admin || self.uid == uid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32, gid: u32, groups: &[u32]) -> Identity {
        Identity {
            uid,
            gid,
            groups: groups.to_vec(),
            admin: false,
        }
    }

    #[test]
    fn an_act_as_header_round_trips_and_only_local_root_is_the_administrator() {
        let alice = user(1000, 1000, &[27, 100]);
        let header = alice.act_as_header();
        assert_eq!(header, "1000:1000:27,100");
        assert_eq!(Identity::from_act_as_header(&header), Some(alice));
        let root = Identity::from_act_as_header("0:0:").expect("root");
        assert!(root.admin && root.groups.is_empty());
        for bad in ["", "1000", "1000:x:", "1000:1000:1,,2", "-1:0:", "1:2:3:4"] {
            assert_eq!(Identity::from_act_as_header(bad), None, "{bad:?}");
        }
        let many: Vec<String> = (0..=MAX_GROUPS).map(|g| g.to_string()).collect();
        assert_eq!(
            Identity::from_act_as_header(&format!("1:1:{}", many.join(","))),
            None
        );
    }

    #[test]
    fn owner_group_and_others_bits_apply_in_posix_order() {
        let alice = user(10_000, 10_000, &[]);
        let bob = user(10_001, 10_001, &[500]);
        let carol = user(10_002, 10_002, &[]);
        // 0640 alice:500
        assert!(alice.may(10_000, 500, 0o640, R | W, false));
        assert!(bob.may(10_000, 500, 0o640, R, false));
        assert!(!bob.may(10_000, 500, 0o640, W, false));
        assert!(!carol.may(10_000, 500, 0o640, R, false));
        // An owner refused by the owner bits is refused even if the group may.
        assert!(!alice.may(10_000, 10_000, 0o070, R, false));
        // Everything asked must be allowed.
        assert!(!bob.may(10_000, 500, 0o640, R | X, false));
    }

    #[test]
    fn the_administrator_acts_as_root() {
        let root = Identity {
            admin: true,
            ..Identity::default()
        };
        assert!(root.may(10_000, 10_000, 0o000, R | W, false));
        assert!(
            root.may(10_000, 10_000, 0o000, X, true),
            "search any directory"
        );
        assert!(
            !root.may(10_000, 10_000, 0o644, X, false),
            "no one may run it"
        );
        assert!(root.may(10_000, 10_000, 0o100, X, false));
        assert!(root.owns(10_000));
    }

    #[test]
    fn sticky_directories_protect_other_users_entries() {
        let alice = user(10_000, 10_000, &[]);
        let bob = user(10_001, 10_001, &[]);
        // /tmp-like: root-owned 1777; alice's file.
        assert!(!bob.may_unlink_from(0, 0o1777, 10_000));
        assert!(alice.may_unlink_from(0, 0o1777, 10_000));
        assert!(bob.may_unlink_from(0, 0o0777, 10_000), "not sticky");
        assert!(
            bob.may_unlink_from(10_001, 0o1777, 10_000),
            "bob owns the directory"
        );
    }
}
