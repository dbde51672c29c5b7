//! Cost proportional to work (issue 10), seen through a mount: listings come in pages.

use dfs_tests::*;

#[test]
fn a_directory_of_several_pages_lists_every_name_once_through_the_kernel() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("alice");
    let (ma, mb) = (a.mount(&[]), b.mount(&[]));
    // More than two pages of the server's most (1000 a page), made by the other client.
    let count = common::api::LIST_MAX_ENTRIES as usize * 2 + 345;
    ok(mb.sh(&format!(
        "mkdir big && cd big && i=0; while [ $i -lt {count} ]; do : > \"f $i\"; i=$((i+1)); done"
    )));
    assert_eq!(ok(ma.sh("ls big | wc -l")).trim(), count.to_string());
    let listed = ok(ma.sh("ls -1 big"));
    let mut names: Vec<&str> = listed.lines().collect();
    names.sort_unstable();
    names.dedup();
    let mut want: Vec<String> = (0..count).map(|i| format!("f {i}")).collect();
    want.sort_unstable();
    assert_eq!(names, want, "every name, once each");
    // `find` reads the same directory through readdirplus.
    assert_eq!(
        ok(ma.sh("find big -type f | wc -l")).trim(),
        count.to_string()
    );
}
