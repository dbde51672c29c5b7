//! Bad input through the mount and the CLI: a clear errno or message at once, nothing lost.

use std::time::{Duration, Instant};

use dfs_tests::*;

#[test]
fn long_names_and_moving_a_directory_into_itself_fail_cleanly() {
    let cluster = Cluster::start(&[]);
    let c = Client::new(&cluster.url);
    c.signup_login("alice");
    let m = c.mount(&[]);
    ok(m.sh("mkdir -p d/sub && echo kept > d/f"));
    let out = m.sh("touch \"$(head -c 256 /dev/zero | tr '\\0' x)\"");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("File name too long"),
        "{out:?}"
    );
    ok(m.sh("touch \"$(head -c 255 /dev/zero | tr '\\0' y)\""));
    // perl's rename(2) skips mv's own check, so the refusal comes from dfs.
    let out = m.sh("perl -e 'rename(\"d\", \"d/sub/x\") or die \"$!\\n\"'");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Invalid argument"),
        "{out:?}"
    );
    assert_eq!(ok(m.sh("cat d/f")), "kept\n");
    // Hard links work; one to a directory is refused at once (EPERM), not hung.
    assert_eq!(ok(m.sh("ln d/f hardlink && cat hardlink")), "kept\n");
    let out = m.sh("perl -e 'link(\"d\", \"dirlink\") or die \"$!\\n\"'");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Operation not permitted"),
        "{out:?}"
    );
}

#[test]
fn a_token_the_server_no_longer_accepts_gives_eacces_at_once_and_loses_nothing() {
    let port = free_port();
    let data = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut cluster = Cluster::start_at(data.path(), &listen, &[]);
    let c = Client::new(&cluster.url);
    c.signup_login("alice");
    let m = c.mount(&[]);
    ok(m.sh("echo precious > keep.txt"));
    // Restart the cluster with a new auth key: every token issued before is now forged.
    cluster.stop();
    std::fs::remove_file(data.path().join("auth").join("auth_key.pem")).unwrap();
    let cluster = Cluster::start_at(data.path(), &listen, &[]);
    let start = Instant::now();
    let out = sh_in(m.dir.parent().unwrap(), "ls mnt");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "refused at once, not after a hang"
    );
    // A new mount with the stale login is refused with a clear message.
    let out = c.run(&["mount", "/tmp"], "");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no longer accepted") || err.contains("already a mount point"),
        "{err}"
    );
    drop(m);
    // Nothing was lost: after logging in again (pinning the new auth key, as the client asks
    // when the key changed) the file is there.
    let fp = cluster.auth_key_fingerprint();
    ok(c.run(
        &["login", "--user", "alice", "--password-stdin"]
            .into_iter()
            .chain(["--auth-key-fingerprint", fp.as_str()])
            .collect::<Vec<_>>(),
        "password123\n",
    ));
    let m = c.mount(&[]);
    assert_eq!(ok(m.sh("cat keep.txt")), "precious\n");
}

#[test]
fn cli_errors_are_one_clear_line() {
    let cluster = Cluster::start(&[]);
    let c = Client::new(&cluster.url);
    let out = c.run(&["mount", "/nonexistent/dir"], "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{out:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = c.run(&["mount", dir.path().to_str().unwrap()], "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not logged in"),
        "{out:?}"
    );
    let out = c.run(
        &[
            "login",
            "--user",
            "nobody",
            "--password-stdin",
            "--server",
            "http://127.0.0.1:9",
        ],
        "password123\n",
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unreachable"),
        "{out:?}"
    );
    c.signup_login("alice");
    use std::os::unix::fs::PermissionsExt;
    let creds = c.config_dir().join("dfs/credentials.json");
    let mode = std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the saved token is private");
    let m = c.mount(&[]);
    let out = c.run(&["mount", m.dir.to_str().unwrap()], "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already a mount point"),
        "{out:?}"
    );
    assert!(
        ok(m.sh("df -k . | tail -1")).contains("dfs"),
        "statfs answers"
    );
    drop(m);
    let out = c.run(&["logout"], "");
    assert!(out.status.success());
    let out = c.run(&["mount", dir.path().to_str().unwrap()], "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not logged in"),
        "{out:?}"
    );
    c.signup_login("alice");
    let out = c.run(
        &["login", "--user", "alice", "--password-stdin"],
        "wrongpassword\n",
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong user name or password"),
        "{out:?}"
    );
    let help = c.run(&["mount", "--help"], "");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--close-timeout-secs"));
}
