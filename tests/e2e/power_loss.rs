//! Power loss: what a cluster acknowledged is on its disk, not only in the page cache.
//!
//! The whole cluster (directory, lock, auth and three file servers) keeps its data on a loop
//! device; after the writes are acknowledged it is killed and the disk is cut off as a power
//! failure would (`LoopDisk::crash_image`: only what reached the device). A cluster started
//! on that image must have every acknowledged create, write, overwrite, rename and signup.
//! Removing the directory store's flush or the pack fdatasync fails this test (checked), which
//! a `kill -9` alone never would; what it cannot see is listed in `LoopDisk`'s docs.

use std::process::Command;

use dfs_tests::*;

#[test]
fn acknowledged_writes_survive_a_power_cut() {
    require_fuse();
    let disk = LoopDisk::new(1 << 30);
    let data = disk.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut cluster = Cluster::start_at(&data, "127.0.0.1:0", &[]);
    let client = Client::new(&cluster.url);
    client.signup_login("alice");
    let mount = client.mount(&[]);
    // Small files (pack records), one large one (a blob file of its own), an overwrite, a
    // rename and a directory: each command returns only after its close was acknowledged.
    ok(mount.sh(
        "mkdir docs && for i in $(seq 1 20); do echo \"note $i\" > docs/n$i; done \
         && head -c 3000000 /dev/urandom > big && echo first > over && echo second > over \
         && echo moved > before && mv before docs/after",
    ));
    let big_sum = ok(mount.sh("sha256sum big"));

    // The power goes: the processes die with the disk as it is.
    let _ = Command::new("kill")
        .args(["-9", &cluster.pid().to_string()])
        .status();
    cluster.stop();
    let image = disk.crash_image();
    mount.kill9();
    drop(disk);

    let cluster = Cluster::start_at(&image.join("data"), "127.0.0.1:0", &[]);
    let client = Client::new(&cluster.url);
    // Login only: the signup must have survived.
    let login = client.run(
        &["login", "--user", "alice", "--password-stdin"],
        "password123\n",
    );
    assert!(
        login.status.success(),
        "login after the power cut: {login:?}"
    );
    let mount = client.mount(&[]);
    for i in 1..=20 {
        assert_eq!(
            ok(mount.sh(&format!("cat docs/n{i}"))),
            format!("note {i}\n"),
            "docs/n{i} after the power cut"
        );
    }
    assert_eq!(ok(mount.sh("sha256sum big")), big_sum);
    assert_eq!(ok(mount.sh("cat over")), "second\n");
    assert_eq!(ok(mount.sh("cat docs/after")), "moved\n");
    assert!(!mount.path("before").exists());
}
