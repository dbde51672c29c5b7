//! Two users on two mounts have exactly the access their modes give them; the administrator
//! gives files away. The mounts run as root, whom the kernel never stops: every refusal here
//! comes from the cluster.

use std::time::Duration;

use dfs_tests::*;

#[test]
fn users_get_exactly_the_access_their_modes_give_and_the_administrator_gives_files_away() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("bob");
    let (ma, mb) = (a.mount(&[]), b.mount(&[]));
    ok(ma.sh(
        "mkdir -m 755 home && echo secret > home/s && chmod 600 home/s && echo public > home/p",
    ));
    // Alice's own files show as the mounting user's; Bob sees her uid.
    assert_eq!(ok(ma.sh("stat -c %u home/s")).trim(), "0");
    let alice_uid = ok(mb.sh("stat -c %u home/s")).trim().to_owned();
    assert_eq!(alice_uid, "10000", "the first user's uid");

    fails_with(mb.sh("cat home/s"), "Permission denied");
    assert_eq!(ok(mb.sh("cat home/p")), "public\n");
    fails_with(mb.sh("echo bob > home/p"), "Permission denied");
    fails_with(mb.sh("rm home/p"), "Permission denied");
    fails_with(mb.sh("touch home/mine"), "Permission denied");
    fails_with(mb.sh("chmod 666 home/p"), "Operation not permitted");
    fails_with(mb.sh("chown 10001 home/p"), "Operation not permitted");
    // The sticky top: Bob's file there is his alone to remove.
    ok(mb.sh("echo b > bobs"));
    fails_with(ma.sh("rm -f bobs"), "Operation not permitted"); // EPERM, as unlink(2) says
    assert_eq!(ok(ma.sh("cat home/p home/s")), "public\nsecret\n");

    // The administrator (the cluster key makes one) gives Alice's file to Bob.
    let key = cluster.data.join("cluster.key");
    let key = key.to_str().unwrap();
    let root = Client::new(&cluster.url);
    root.signup_login("carol");
    let set = root.run(
        &["user", "set", "carol", "--admin", "--cluster-key-file", key],
        "",
    );
    assert!(set.status.success(), "{set:?}");
    root.signup_login("carol"); // a token that says so
    let listed = ok(root.run(&["user", "list", "--cluster-key-file", key], ""));
    assert!(
        listed.contains("alice") && listed.contains("10000"),
        "{listed}"
    );
    let mr = root.mount(&[]);
    ok(mr.sh("cat home/s >/dev/null && chown 10001 home/p"));
    assert!(
        eventually(Duration::from_secs(5), || ok(mb.sh("stat -c %u home/p"))
            .trim()
            == "0"),
        "Bob's mount shows his new file as his"
    );
    ok(mb.sh("echo bob > home/p"));
    assert_eq!(ok(ma.sh("cat home/p")), "bob\n");
}
