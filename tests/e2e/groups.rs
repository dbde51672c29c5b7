//! `dfs group add|remove|list`: the administrator's named groups, with the cluster key.

use dfs_tests::*;

#[test]
fn the_administrator_adds_lists_and_removes_groups_with_the_cluster_key() {
    let cluster = Cluster::start(&[]);
    let admin = Client::new(&cluster.url);
    admin.signup_login("alice");
    admin.signup_login("bob");
    let key = cluster.data.join("cluster.key");
    let key = key.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--cluster-key-file", key]);
        admin.run(&all, "")
    };
    let out = ok(run(&[
        "group", "add", "staff", "alice", "bob", "--gid", "20000",
    ]));
    assert!(
        out.contains("staff") && out.contains("20000") && out.contains("alice,bob"),
        "{out}"
    );
    let listed = ok(run(&["group", "list"]));
    assert!(
        listed.contains("gid 20000") && listed.contains("alice,bob"),
        "{listed}"
    );
    let users = ok(run(&["user", "list"]));
    assert!(
        users
            .lines()
            .any(|l| l.starts_with("bob") && l.contains("20000")),
        "what bob's tokens carry: {users}"
    );
    ok(run(&["group", "remove", "staff", "bob"]));
    let out = run(&["group", "remove", "staff", "carol"]);
    assert!(!out.status.success(), "not a member: {out:?}");
    assert_eq!(
        ok(run(&["group", "remove", "staff"])),
        "group staff removed\n"
    );
    assert_eq!(ok(run(&["group", "list"])), "");
    // Without the cluster key: refused.
    let out = admin.run(&["group", "list", "--cluster-key-file", "/dev/null"], "");
    assert!(!out.status.success(), "{out:?}");
}
