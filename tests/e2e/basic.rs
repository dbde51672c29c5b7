//! One client: `dfs up`, shell tools, an editor, git, and persistence across remounts.

use std::process::{Command, Stdio};
use std::time::Duration;

use dfs_tests::*;

#[test]
fn dfs_up_serves_hello_and_keeps_files_across_restarts() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let start = || {
        let mut child = Command::new(bin("dfs"))
            .current_dir(tmp.path())
            .args(["up", "--listen", "127.0.0.1:0"])
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mnt = tmp.path().join("mnt");
        if !eventually(Duration::from_secs(60), || is_mounted(&mnt)) {
            terminate(&mut child, Duration::from_secs(5));
            panic!("dfs up did not mount");
        }
        child
    };
    let mut up = start();
    let mnt = tmp.path().join("mnt");
    let hello = ok(sh_in(&mnt, "cat Hello.txt"));
    assert!(hello.starts_with("Hello from dfs!"), "{hello}");
    // An editor save through vim in ex mode.
    ok(sh_in(
        &mnt,
        "vim -u NONE -N -n -e -s -c 'normal ihello from vim' -c 'wq' notes.txt",
    ));
    assert_eq!(ok(sh_in(&mnt, "cat notes.txt")), "hello from vim\n");
    // Mounted as root, `dfs up` acts as each local caller (--local-ids): a process that
    // drops to uid 1000 makes a file of its own and may not change root's.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let denied = sh_in(
        &mnt,
        "setpriv --reuid=1000 --regid=1000 --clear-groups sh -c \
         'echo mine > mine && echo x >> notes.txt'",
    );
    // Refused for permission, and only that: not any other failure.
    assert!(
        !denied.status.success()
            && String::from_utf8_lossy(&denied.stderr).contains("notes.txt: Permission denied"),
        "{denied:?}"
    );
    assert_eq!(
        ok(sh_in(&mnt, "stat -c '%u %g' mine notes.txt")),
        "1000 1000\n0 0\n"
    );
    // Local uids are cluster uids here: nobody may sign up (and so pick a uid) without the
    // cluster key.
    // Logins are kept by cluster id; the pinned auth key names the URL too.
    let pins = std::fs::read(home.join("config/dfs/known_auth_keys.json")).unwrap();
    let pins: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&pins).unwrap();
    let url = pins
        .keys()
        .find(|k| k.starts_with("http"))
        .expect("dfs up's pin")
        .clone();
    let outsider = Client::new(&url);
    let signup = |extra: &[&str]| {
        let mut args = vec!["signup", "--user", "mallory", "--password-stdin"];
        args.extend_from_slice(extra);
        outsider.run(&args, "password123\n")
    };
    let refused = signup(&[]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("signup is closed"),
        "{refused:?}"
    );
    let key = tmp.path().join(".dfs/cluster.key");
    ok(signup(&["--cluster-key-file", key.to_str().unwrap()]));
    let status = terminate(&mut up, Duration::from_secs(60)).expect("dfs up exits on SIGTERM");
    assert!(status.success(), "dfs up exit status {status}");
    assert!(!is_mounted(&mnt));

    let mut up = start();
    assert_eq!(ok(sh_in(&mnt, "cat notes.txt")), "hello from vim\n");
    assert!(ok(sh_in(&mnt, "cat Hello.txt")).starts_with("Hello from dfs!"));
    assert!(terminate(&mut up, Duration::from_secs(60)).is_some_and(|s| s.success()));
}

#[test]
fn shell_tools_work_and_files_survive_remount() {
    shell_tools(&[]);
}

#[test]
fn shell_tools_work_without_kernel_passthrough() {
    shell_tools(&["--no-passthrough"]);
}

/// One body, run with and without kernel passthrough (open files served by the kernel from
/// the cache file, or by dfs's own read/write).
fn shell_tools(mount_flags: &[&str]) {
    let cluster = Cluster::start(&[]);
    let client = Client::new(&cluster.url);
    client.signup_login("alice");
    let m = client.mount(mount_flags);
    ok(m.sh("echo hello > a.txt && cp a.txt b.txt && mkdir -p d/e/f && mv b.txt d/e/f/c.txt"));
    ok(m.sh("printf 'one\\ntwo\\n' >> a.txt"));
    assert_eq!(ok(m.sh("cat a.txt")), "hello\none\ntwo\n");
    assert_eq!(ok(m.sh("cat d/e/f/c.txt")), "hello\n");
    let ls = ok(m.sh("ls -l"));
    assert!(ls.contains("a.txt") && ls.contains(" d"), "{ls}");
    // rename over an existing file replaces it atomically
    ok(m.sh("echo new > n.txt && echo old > o.txt && mv n.txt o.txt"));
    assert_eq!(ok(m.sh("cat o.txt; ls")), "new\na.txt\nd\no.txt\n");
    // symlinks, modes, times
    ok(m.sh("ln -s d/e/f/c.txt link && chmod 640 o.txt && touch -d '2001-02-03 04:05:06' o.txt"));
    assert_eq!(ok(m.sh("cat link; readlink link")), "hello\nd/e/f/c.txt\n");
    assert_eq!(ok(m.sh("stat -c '%a %Y' o.txt")), "640 981173106\n");
    // cp -p: the times are set before the close that pushes the content; they survive it.
    ok(m.sh("cp -p o.txt p.txt"));
    // (Also after the kernel's 1 s attribute cache: what the directory holds.)
    let st = ok(m.sh("stat -c '%a %Y' p.txt; sleep 1.2; stat -c '%a %Y' p.txt"));
    assert_eq!(st, "640 981173106\n640 981173106\n");
    ok(m.sh("rm link p.txt"));
    // truncate
    ok(m.sh("truncate -s 3 a.txt"));
    assert_eq!(ok(m.sh("cat a.txt")), "hel");
    ok(m.sh(": > o.txt"));
    assert_eq!(ok(m.sh("stat -c %s o.txt")), "0\n");
    // unlink of an open file: the open descriptor still reads it
    ok(m.sh("echo keep > open.txt"));
    assert_eq!(
        ok(m.sh("exec 3< open.txt; rm open.txt; cat <&3; ls")),
        "keep\na.txt\nd\no.txt\n"
    );
    // a directory tree made and removed
    ok(m.sh("mkdir -p t/u/v && touch t/u/v/w && rm -r t"));
    assert!(!m.path("t").exists());
    // rmdir of a non-empty directory fails cleanly
    let out = m.sh("rmdir d");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not empty"));
    // git works on the mount
    ok(m.sh("git init -q repo && cd repo && echo x > x && git add x && git -c user.email=t@t -c user.name=t commit -qm one && git log --oneline | wc -l"));
    let status = client.run(&["status", "--json"], "");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let want_passthrough = !mount_flags.contains(&"--no-passthrough");
    assert_eq!(
        status["client"]["passthrough"], want_passthrough,
        "{status}"
    );
    let status = m.unmount().expect("mount exits");
    assert!(status.success());

    let m = client.mount(mount_flags);
    assert_eq!(ok(m.sh("cat a.txt d/e/f/c.txt")), "helhello\n");
    assert_eq!(ok(m.sh("cd repo && git log --oneline | wc -l")).trim(), "1");
}

#[test]
fn a_mount_outlives_its_login_token() {
    let cluster = Cluster::start(&["--token-ttl-secs", "3"]);
    let client = Client::new(&cluster.url);
    client.signup_login("alice");
    let before = std::fs::read_to_string(client.config_dir().join("dfs/credentials.json")).unwrap();
    let m = client.mount(&[]);
    ok(m.sh("echo one > f.txt"));
    // Well past the token's 3 s lifetime: the mount renewed it with the refresh token.
    std::thread::sleep(Duration::from_secs(5));
    ok(m.sh("echo two >> f.txt && ls -l f.txt"));
    assert_eq!(ok(m.sh("cat f.txt")), "one\ntwo\n");
    let after = std::fs::read_to_string(client.config_dir().join("dfs/credentials.json")).unwrap();
    assert_ne!(
        before, after,
        "the renewed token was saved for the next mount"
    );
}

#[test]
fn dfs_up_pins_the_key_it_made_so_a_remade_cluster_on_the_same_url_can_be_logged_into() {
    require_fuse();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let start = || {
        let mut child = Command::new(bin("dfs"))
            .current_dir(tmp.path())
            .args(["up", "--listen", &format!("127.0.0.1:{port}")])
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        if !eventually(Duration::from_secs(60), || {
            is_mounted(&tmp.path().join("mnt"))
        }) {
            terminate(&mut child, Duration::from_secs(5));
            panic!("dfs up did not mount");
        }
        // The Hello.txt of a fresh cluster is there.
        let hello = ok(sh_in(&tmp.path().join("mnt"), "cat Hello.txt"));
        assert!(hello.starts_with("Hello from dfs!"), "{hello}");
        child
    };
    let dfs = |args: &[&str]| {
        let mut child = Command::new(bin("dfs"))
            .args(args)
            .args(["--server", &url, "--password-stdin"])
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env_remove("DFS_CA_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"password123\n").unwrap();
        child.wait_with_output().unwrap()
    };
    let pins = home.join("config/dfs/known_auth_keys.json");
    // Run as root, dfs up closes signup (--local-ids): users sign up with the cluster key.
    let key = tmp.path().join(".dfs/cluster.key");
    let key = key.to_str().unwrap();
    let mut up = start();
    let first = std::fs::read_to_string(&pins).expect("dfs up pinned its key");
    assert!(first.contains(&url), "{first}");
    ok(dfs(&["signup", "--user", "bob", "--cluster-key-file", key]));
    assert!(terminate(&mut up, Duration::from_secs(60)).is_some_and(|s| s.success()));

    // The cluster is made anew (a new auth key) on the same URL: dfs up replaces its pin, and
    // logging in to it works; a user of this cluster signs up again.
    std::fs::remove_dir_all(tmp.path().join(".dfs")).unwrap();
    let mut up = start();
    let second = std::fs::read_to_string(&pins).unwrap();
    assert_ne!(first, second, "the pin follows the new key");
    ok(dfs(&["signup", "--user", "bob", "--cluster-key-file", key]));
    ok(dfs(&["login", "--user", "bob"]));
    assert!(terminate(&mut up, Duration::from_secs(60)).is_some_and(|s| s.success()));
}

#[test]
fn dfs_up_stopped_while_it_writes_hello_exits_and_unmounts() {
    require_fuse();
    // Each round stops a fresh `dfs up` as soon as its mount appears, while it may still be
    // writing Hello.txt into its own mount.
    for round in 0..5 {
        let tmp = tempfile::tempdir().unwrap();
        let home = tmp.path().join("home");
        let mnt = tmp.path().join("mnt");
        let mut child = Command::new(bin("dfs"))
            .current_dir(tmp.path())
            .args(["up", "--listen", "127.0.0.1:0"])
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(tmp.path().join("up.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !is_mounted(&mnt) && std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = child.try_wait() {
                panic!("round {round}: dfs up exited with {s} before mounting");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mounted = is_mounted(&mnt);
        // Not `terminate`: its final wait would hang on a process stuck in its own mount.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let exited = eventually(Duration::from_secs(30), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        let left_mounted = is_mounted(&mnt);
        if !exited || left_mounted {
            // Free a process stuck on its mount (abort the FUSE connection), then detach it.
            if let Some(dev) = fuse_connection(&mnt) {
                let _ = std::fs::write(format!("/sys/fs/fuse/connections/{dev}/abort"), "1");
            }
            let _ = child.kill();
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&mnt)
                .status();
            eventually(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
        }
        let status = exited;
        assert!(mounted, "round {round}: dfs up did not mount");
        assert!(
            status,
            "round {round}: dfs up did not exit within 30 s of SIGTERM: {}",
            std::fs::read_to_string(tmp.path().join("up.log")).unwrap_or_default()
        );
        assert!(!left_mounted, "round {round}: dfs up left its mount behind");
    }
}

/// The FUSE connection number (the device minor) of the mount at `dir`.
fn fuse_connection(dir: &std::path::Path) -> Option<String> {
    let want = dir.to_string_lossy().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(want.as_str()))?;
    let dev = line.split(' ').nth(2)?;
    Some(dev.split_once(':')?.1.to_owned())
}
