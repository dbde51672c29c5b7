//! `--local-ids` mounts: an administrator's mount acts as each calling local process (uid, gid,
//! supplementary groups), so root's `tar -x` restores owners exactly and a process that drops
//! to an unprivileged uid is refused what a local file system refuses it. Every comparison is
//! against the same commands on a local directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use dfs_tests::*;

/// A cluster with an administrator client ("admin", uid 10000) and its cluster key.
fn admin_client(cluster: &Cluster) -> Client {
    let admin = Client::new(&cluster.url);
    admin.signup_login("admin");
    let key = cluster.data.join("cluster.key");
    let set = admin.run(
        &[
            "user",
            "set",
            "admin",
            "--admin",
            "--cluster-key-file",
            key.to_str().unwrap(),
        ],
        "",
    );
    assert!(set.status.success(), "{set:?}");
    admin.signup_login("admin"); // a token that says so
    admin
}

/// Lets unprivileged test users reach `dir` (temp dirs are 0700).
fn open_up(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A tree with several owners, modes (setgid directory, sticky directory, 0600, setuid) and
/// fixed times, packed by tar with numeric owners.
fn tarball(tmp: &Path) -> std::path::PathBuf {
    let src = tmp.join("src");
    std::fs::create_dir(&src).unwrap();
    ok(sh_in(
        &src,
        "mkdir t t/sg t/tmp t/priv \
         && echo public > t/a && echo secret > t/secret && echo group > t/sg/f \
         && echo exe > t/exe && echo su > t/su && echo mine > t/priv/p \
         && chown 1000:1000 t/a && chmod 644 t/a \
         && chown 1001:1001 t/secret && chmod 600 t/secret \
         && chown 1000:1002 t/sg t/sg/f && chmod 2775 t/sg && chmod 660 t/sg/f \
         && chmod 1777 t/tmp \
         && chown 1002:1000 t/exe && chmod 755 t/exe \
         && chown 1000:1000 t/su && chmod 4755 t/su \
         && chown 1001:1001 t/priv t/priv/p && chmod 700 t/priv && chmod 640 t/priv/p \
         && touch -d '2001-02-03 04:05:06' t/a \
         && touch -d '2002-03-04 05:06:07' t/secret t/sg/f \
         && touch -d '2003-04-05 06:07:08' t/exe t/su t/priv/p \
         && touch -d '2004-05-06 07:08:09' t/sg t/tmp t/priv t",
    ));
    let ball = tmp.join("ball.tar");
    ok(sh_in(
        &src,
        &format!("tar --numeric-owner -cf {} t", ball.display()),
    ));
    ball
}

/// Owner, group, mode and (with `times`) mtime of every path under `t`, sorted.
fn listing(root: &Path, times: bool) -> String {
    let format = if times {
        "%n %u %g %a %Y"
    } else {
        "%n %u %g %a"
    };
    ok(sh_in(
        root,
        &format!("find t | sort | xargs stat -c '{format}'"),
    ))
}

/// Runs `script` in `dir` as `uid`:`gid` with supplementary `groups`, through setpriv (what a
/// setuid program or `su` does); returns its output (stdout and stderr) and exit codes.
fn as_user(dir: &Path, uid: u32, gid: u32, groups: &[u32], script: &str) -> String {
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        let g: Vec<String> = groups.iter().map(u32::to_string).collect();
        c.arg(format!("--groups={}", g.join(",")));
    }
    let out = c
        .args(["--", "sh", "-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// What each unprivileged caller may do, as lines "command: outcome" (sh's own error
/// messages, which name the errno).
const UNPRIVILEGED: &[(u32, u32, &[u32], &str)] = &[
    // Not the owner of a 0600 file.
    (1000, 1000, &[], "cat t/secret"),
    (1000, 1000, &[], "echo x >> t/secret"),
    // Its owner.
    (
        1001,
        1001,
        &[],
        "cat t/secret && echo more >> t/secret && cat t/secret",
    ),
    // A private directory: no search, no listing.
    (1000, 1000, &[], "cat t/priv/p"),
    (1000, 1000, &[], "ls t/priv"),
    (1001, 1001, &[], "ls t/priv && cat t/priv/p"),
    // Group access through a supplementary group only.
    (1003, 1003, &[1002], "echo member >> t/sg/f && cat t/sg/f"),
    (1003, 1003, &[], "cat t/sg/f"),
    // A new file in a setgid directory takes its group.
    (1003, 1003, &[1002], "echo new > t/sg/new"),
    // Not in the group of a group-writable directory.
    (1004, 1004, &[], "echo no > t/sg/no"),
    // The sticky directory: anyone creates, only the owner removes.
    (1003, 1003, &[], "echo t > t/tmp/mine"),
    (1004, 1004, &[], "rm -f t/tmp/mine"),
    (1003, 1003, &[], "mv t/tmp/mine t/tmp/moved"),
    // chmod and chown are the owner's and root's.
    (1000, 1000, &[], "chmod 777 t/exe"),
    (1002, 1000, &[], "chmod 750 t/exe"),
    (1002, 1000, &[], "chown 1000 t/exe"),
    // chgrp by the owner, only to a group the caller is in.
    (1000, 1000, &[], "chgrp 1002 t/a"),
    (1000, 1000, &[1002], "chgrp 1002 t/a"),
    // Not root: no new file at the top of the tree, no removing root's directory.
    (1000, 1000, &[], "mkdir t/mine"),
    (1000, 1000, &[], "rmdir t/tmp"),
];

fn unprivileged_run(root: &Path) -> String {
    let mut out = String::new();
    for (uid, gid, groups, script) in UNPRIVILEGED {
        let got = as_user(
            root,
            *uid,
            *gid,
            groups,
            &format!("{script}; echo \"rc=$?\""),
        );
        out.push_str(&format!("{uid}:{gid} {groups:?} {script}\n{got}"));
    }
    out
}

#[test]
fn root_tar_on_a_local_ids_mount_restores_owners_and_users_get_local_permissions() {
    tar_and_unprivileged_users(&["--local-ids"]);
}

/// The same in write-back mode, where pushes run in the background as the administrator and
/// tar's attribute changes are folded into them.
#[test]
fn root_tar_and_unprivileged_users_on_a_local_ids_mount_in_writeback_mode() {
    tar_and_unprivileged_users(&["--local-ids", "--writeback"]);
}

fn tar_and_unprivileged_users(flags: &[&str]) {
    let cluster = Cluster::start(&[]);
    let admin = admin_client(&cluster);
    let m = admin.mount(flags);
    open_up(m.dir.parent().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    open_up(tmp.path());
    let ball = tarball(tmp.path());
    let local = tmp.path().join("local");
    std::fs::create_dir(&local).unwrap();
    open_up(&local);
    let extract = format!("tar --numeric-owner -xpf {}", ball.display());
    ok(sh_in(&local, &extract));
    ok(m.sh(&extract));
    let want = listing(&local, true);
    assert!(want.contains("t/sg 1000 1002 2775 "), "{want}");
    assert!(want.contains("t/su 1000 1000 4755 "), "{want}");
    assert_eq!(listing(&m.dir, true), want, "tar -x as root on the mount");

    // Processes that switch to unprivileged users meet the same refusals and successes.
    let want = unprivileged_run(&local);
    assert!(want.contains("Permission denied"), "{want}");
    assert!(want.contains("Operation not permitted"), "{want}");
    assert_eq!(unprivileged_run(&m.dir), want);
    // (Times differ now: the two runs changed files and directories at different moments.)
    assert_eq!(
        listing(&m.dir, false),
        listing(&local, false),
        "what they made, changed and removed"
    );
    assert_eq!(
        ok(m.sh("cat t/secret t/sg/f")),
        ok(sh_in(&local, "cat t/secret t/sg/f"))
    );

    // Permission is checked at open: a process that opens a file as root and then drops to
    // a uid that may not write it still writes through that open, and its close pushes.
    let dropped = r#"perl -e 'use POSIX; open(my $f, ">>", "t/exe") or die "open: $!";
        POSIX::setgid(1004); POSIX::setuid(1004) or die "setuid: $!";
        open(my $g, ">>", "t/exe") and die "reopened"; print $f "dropped\n";
        close($f) or die "close: $!"; print "ok\n"'"#;
    assert_eq!(ok(sh_in(&local, dropped)), "ok\n");
    assert_eq!(ok(m.sh(dropped)), "ok\n");
    assert_eq!(ok(m.sh("cat t/exe")), "exe\ndropped\n");
}

#[test]
fn chown_by_the_administrator_is_seen_by_every_client() {
    let cluster = Cluster::start(&[]);
    let admin = admin_client(&cluster);
    let bob = Client::new(&cluster.url);
    bob.signup_login("bob");
    let (ma, mb) = (admin.mount(&["--local-ids"]), bob.mount(&[]));
    // Root on the administrator's mount makes a file and gives it to bob (uid 10001).
    ok(ma.sh("echo root > f && chmod 644 f && stat -c %u f"));
    fails_with(mb.sh("echo bob > f"), "Permission denied");
    ok(ma.sh("chown 10001:10001 f"));
    assert_eq!(ok(ma.sh("stat -c '%u %g' f")), "10001 10001\n");
    // Bob's mount shows his files as its mounting user's (root here) and lets him write.
    assert!(
        eventually(Duration::from_secs(5), || ok(mb.sh("stat -c %u f")).trim()
            == "0"),
        "bob's mount shows the file as his"
    );
    ok(mb.sh("echo bob > f"));
    assert_eq!(ok(ma.sh("cat f")), "bob\n");
    // A local user acting as uid 10001 on the administrator's mount owns it too.
    open_up(ma.dir.parent().unwrap());
    assert_eq!(
        as_user(&ma.dir, 10001, 10001, &[], "echo local >> f; echo rc=$?"),
        "rc=0\n"
    );
    assert_eq!(ok(mb.sh("cat f")), "bob\nlocal\n");
}

#[test]
fn local_ids_is_refused_without_the_administrators_login() {
    let cluster = Cluster::start(&[]);
    let bob = Client::new(&cluster.url);
    bob.signup_login("bob");
    let tmp = tempfile::tempdir().unwrap();
    let out = bob
        .dfs()
        .arg("mount")
        .arg(tmp.path())
        .arg("--local-ids")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("administrator"),
        "{out:?}"
    );
    assert!(!is_mounted(tmp.path()));
}
