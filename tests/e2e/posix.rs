//! The rest of POSIX on real mounts: hard links and their counts, FIFOs, UNIX sockets and
//! devices, and the exact errno of every refusal. The mounts run as root, whom the kernel
//! never stops: the refusals between users come from the cluster.

use std::time::Duration;

use dfs_tests::*;

/// Runs a perl statement on `m` (with `Fcntl` and `POSIX` loaded) and answers `OK` if it
/// returned true, else the name of the errno it left (`EEXIST`, ...).
fn errno(m: &Mount, code: &str) -> String {
    let script = format!(
        "perl -MFcntl -MPOSIX -e '{code} and do {{ print \"OK\"; exit 0 }}; \
         for my $k (keys %!) {{ print $k if $!{{$k}} }}'"
    );
    let out = m.sh(&script);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `stat -c FORMAT` of `paths` in `m`, one line each.
fn stat(m: &Mount, format: &str, paths: &str) -> String {
    ok(m.sh(&format!("stat -c '{format}' {paths}")))
}

/// A user that acts as the administrator (the cluster key makes one), logged in again so its
/// token says so.
fn administrator(cluster: &Cluster, name: &str) -> Client {
    let key = cluster.data.join("cluster.key");
    let root = Client::new(&cluster.url);
    root.signup_login(name);
    let set = root.run(
        &[
            "user",
            "set",
            name,
            "--admin",
            "--cluster-key-file",
            key.to_str().unwrap(),
        ],
        "",
    );
    assert!(set.status.success(), "{set:?}");
    root.signup_login(name);
    root
}

#[test]
fn hard_links_share_one_node_count_their_names_and_free_it_with_the_last() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let other = Client::new(&cluster.url);
    other.signup_login("alice");
    let (m, m2) = (a.mount(&[]), other.mount(&[]));

    ok(m.sh("echo one > f && ln f g"));
    assert_eq!(stat(&m, "%h", "f g"), "2\n2\n");
    assert_eq!(
        stat(&m, "%i", "f"),
        stat(&m, "%i", "g"),
        "one node, one inode"
    );
    // Content and attributes are shared, here and on another client.
    ok(m.sh("echo two >> g && chmod 600 g"));
    assert_eq!(ok(m.sh("cat f")), "one\ntwo\n");
    assert_eq!(stat(&m, "%a", "f"), "600\n");
    assert!(
        eventually(Duration::from_secs(5), || {
            m2.sh("cat f").stdout == b"one\ntwo\n" && stat(&m2, "%h %a", "g") == "2 600\n"
        }),
        "the other client sees both names of one file"
    );
    // One name goes: the other keeps the node, with one link.
    ok(m.sh("rm f"));
    assert_eq!(stat(&m, "%h", "g"), "1\n");
    assert_eq!(ok(m.sh("cat g")), "one\ntwo\n");
    assert!(eventually(Duration::from_secs(5), || {
        stat(&m2, "%h", "g") == "1\n" && m2.sh("cat g").stdout == b"one\ntwo\n"
    }));
    // A link made by another client counts too.
    ok(m2.sh("ln g h"));
    assert!(eventually(Duration::from_secs(5), || stat(&m, "%h", "g") == "2\n"));

    // The last name of a file open on the unlinking client: it reads on from its copy.
    ok(m.sh("echo open > o"));
    assert_eq!(
        ok(m.sh("bash -c 'exec 3<o; rm o; cat <&3'")),
        "open\n",
        "an unlinked open file reads on"
    );
    assert_eq!(errno(&m, "stat(\"o\")"), "ENOENT");
    // ... and open on another client: that one reads on from its cache.
    ok(m.sh("echo away > w"));
    assert!(eventually(Duration::from_secs(5), || m2.sh("cat w").stdout
        == b"away\n"));
    let both = format!(
        "bash -c 'exec 3<\"{}\"; rm \"{}\"; cat <&3'",
        m2.path("w").display(),
        m.path("w").display()
    );
    assert_eq!(ok(m.sh(&both)), "away\n");

    // Directories: 2 + subdirectories; a hard link to one is EPERM; rename moves a link.
    ok(m.sh("mkdir d e && mkdir d/x d/y"));
    assert_eq!(stat(&m, "%h", "d e"), "4\n2\n");
    // Documentation only: the kernel refuses a link to a directory before asking dfs (the
    // directory's own EPERM: directory/tests.rs `link_errors_are_the_ones_posix_gives`).
    assert_eq!(errno(&m, "link(\"d\", \"dl\")"), "EPERM");
    ok(m.sh("mv d/x e/"));
    assert_eq!(stat(&m, "%h", "d e"), "3\n3\n");
    ok(m.sh("mkdir z && mv e/x z && rmdir d/y"));
    assert_eq!(stat(&m, "%h", "d e z"), "2\n2\n3\n");
    // An empty directory replaced by another: its parent loses its link.
    ok(m.sh("mkdir d/t && mv z/x d/t"));
    assert_eq!(stat(&m, "%h", "d z"), "3\n2\n");
    assert!(
        eventually(Duration::from_secs(5), || stat(&m2, "%h", "d z e")
            == "3\n2\n2\n"),
        "the other client counts the same"
    );
}

#[test]
fn fifos_sockets_and_devices_are_nodes_the_local_kernel_serves() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let m = a.mount(&[]);

    // A FIFO with a reader and a writer on one client.
    ok(m.sh("mkfifo -m 640 p"));
    assert_eq!(stat(&m, "%F %a %h", "p"), "fifo 640 1\n");
    assert_eq!(
        ok(m.sh("{ cat p > out & echo through the pipe > p; wait; cat out; }")),
        "through the pipe\n"
    );
    // A UNIX socket bound on a path in the mount, with a client connecting to it.
    let sock = r#"perl -MIO::Socket::UNIX -e '
        my $srv = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => "s", Listen => 1)
            or die "bind: $!";
        if (fork() == 0) {
            my $c = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => "s") or die "connect: $!";
            print $c "hello over the socket\n";
            exit 0;
        }
        my $conn = $srv->accept or die "accept: $!";
        print scalar <$conn>;
        wait;'"#;
    assert_eq!(ok(m.sh(sock)), "hello over the socket\n");
    assert_eq!(stat(&m, "%F", "s"), "socket\n");
    // They are nodes like any: chmod, link, rename, unlink.
    ok(m.sh("chmod 600 p && ln p p2 && mv p2 p3"));
    assert_eq!(stat(&m, "%F %a %h", "p3"), "fifo 600 2\n");
    ok(m.sh("rm p s"));
    assert_eq!(stat(&m, "%h", "p3"), "1\n");
    // Another client sees them as they are.
    let b = Client::new(&cluster.url);
    b.signup_login("bob");
    let mb = b.mount(&[]);
    assert_eq!(stat(&mb, "%F %a", "p3"), "fifo 600\n");

    // Devices: the administrator's only.
    let refused = m.sh("mknod null c 1 3");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Operation not permitted"),
        "{refused:?}"
    );
    let root = administrator(&cluster, "carol");
    let mr = root.mount(&[]);
    ok(mr.sh("mknod null c 1 3 && mknod disk b 7 0"));
    assert_eq!(
        stat(&m, "%F %t %T", "null disk"),
        "character special file 1 3\nblock special file 7 0\n"
    );
}

#[test]
fn every_refusal_has_the_errno_posix_gives() {
    let cluster = Cluster::start(&[]);
    let a = Client::new(&cluster.url);
    a.signup_login("alice");
    let b = Client::new(&cluster.url);
    b.signup_login("bob");
    let (ma, mb) = (a.mount(&[]), b.mount(&[]));
    ok(ma.sh("mkdir -m 755 home && echo data > home/f && mkdir home/d && touch home/d/in"));
    ok(ma.sh("cd home && ln -s f l && ln -s l1 l2 && ln -s l2 l1"));

    // O_EXCL, also for a name another client made after this one listed the directory.
    assert_eq!(
        errno(&ma, "sysopen(F, \"home/f\", O_WRONLY|O_CREAT|O_EXCL)"),
        "EEXIST"
    );
    ok(ma.sh("ls home > /dev/null"));
    ok(mb.sh("echo bob > late"));
    assert_eq!(
        errno(&ma, "sysopen(F, \"late\", O_WRONLY|O_CREAT|O_EXCL)"),
        "EEXIST"
    );
    // O_NOFOLLOW and symlink loops. Documentation only: the kernel resolves symlinks and
    // answers ELOOP itself; dfs only stores the links.
    assert_eq!(
        errno(&ma, "sysopen(F, \"home/l\", O_RDONLY|O_NOFOLLOW)"),
        "ELOOP"
    );
    assert_eq!(errno(&ma, "open(F, \"<\", \"home/l1\")"), "ELOOP");
    assert_eq!(ok(ma.sh("cat home/l")), "data\n");
    // Names.
    assert_eq!(
        errno(&ma, "open(F, \">\", \"home/\" . (\"a\" x 256))"),
        "ENAMETOOLONG"
    );
    assert_eq!(
        errno(&ma, "open(F, \">\", \"home/\" . (\"a\" x 255))"),
        "OK"
    );
    assert_eq!(errno(&ma, "mkdir(\"home/f/x\")"), "ENOTDIR");
    assert_eq!(errno(&ma, "rmdir(\"home/f\")"), "ENOTDIR");
    assert_eq!(errno(&ma, "rename(\"home/d\", \"home/f\")"), "ENOTDIR");
    assert_eq!(errno(&ma, "unlink(\"home/d\")"), "EISDIR");
    assert_eq!(errno(&ma, "rename(\"home/f\", \"home/d\")"), "EISDIR");
    assert_eq!(errno(&ma, "rmdir(\"home/d\")"), "ENOTEMPTY");
    ok(ma.sh("mkdir home/e"));
    assert_eq!(errno(&ma, "rename(\"home/e\", \"home/d\")"), "ENOTEMPTY");
    // Documentation only, from here to the next section: the kernel answers these before a
    // request reaches dfs (an existing name it has looked up, a rename into the source's own
    // subtree, a link or rename out of the mount, a link to a directory). Where dfs decides
    // the same rule itself, a service test proves it: directory/tests.rs
    // `link_errors_are_the_ones_posix_gives` (EEXIST, EPERM),
    // `rename_of_directory_into_itself_is_refused` (EINVAL), and api.rs
    // `links_and_long_names_answer_their_own_codes`. EXDEV is the kernel's alone: one
    // request to dfs never names two mounts.
    assert_eq!(errno(&ma, "mkdir(\"home/d\")"), "EEXIST");
    assert_eq!(errno(&ma, "link(\"home/f\", \"home/l\")"), "EEXIST");
    assert_eq!(errno(&ma, "rename(\"home\", \"home/d/sub\")"), "EINVAL");
    let outside = tempfile::tempdir().unwrap();
    let outside = outside.path().join("x");
    let outside = outside.display();
    assert_eq!(
        errno(&ma, &format!("link(\"home/f\", \"{outside}\")")),
        "EXDEV"
    );
    assert_eq!(
        errno(&ma, &format!("rename(\"home/f\", \"{outside}\")")),
        "EXDEV"
    );
    assert_eq!(errno(&ma, "link(\"home/d\", \"home/dl\")"), "EPERM");

    // Between users: permission bits are EACCES, what only an owner may do EPERM.
    ok(ma.sh("cd home && echo open > w && chmod 666 w && chmod 644 f"));
    assert_eq!(errno(&mb, "link(\"home/f\", \"home/g\")"), "EACCES");
    assert_eq!(errno(&mb, "link(\"home/f\", \"mine\")"), "OK");
    assert!(
        eventually(Duration::from_secs(5), || stat(&ma, "%h", "home/f")
            == "2\n"),
        "the owner's client sees the link another user made"
    );
    assert_eq!(errno(&mb, "truncate(\"home/f\", 0)"), "EACCES");
    assert_eq!(
        errno(&mb, "open(F, \"<\", \"home/f\") and truncate(F, 0)"),
        "EINVAL",
        "ftruncate needs a descriptor open for writing"
    );
    assert_eq!(errno(&mb, "truncate(\"home/w\", 2)"), "OK");
    assert_eq!(ok(ma.sh("cat home/w")), "op");
    assert_eq!(errno(&ma, "unlink(\"late\")"), "EPERM", "sticky top");
    assert_eq!(errno(&mb, "chmod(0600, \"home/w\")"), "EPERM");
    // utimensat: both times now (`touch`, utime(NULL)) needs write permission; any other
    // change of the times the owner, also one time now with the other omitted (`touch -a`,
    // `touch -m`), as Linux judges it. UTIME_OMIT leaves a time as it is.
    ok(ma.sh("touch -m -d @1000000000 home/w && touch -a -d @1100000000 home/w"));
    assert_eq!(stat(&ma, "%X %Y", "home/w"), "1100000000 1000000000\n");
    for flag in ["-a", "-m"] {
        let out = mb.sh(&format!("touch {flag} home/w"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Operation not permitted"),
            "touch {flag} by a non-owner: {err}"
        );
    }
    // Both times stay as the owner set them (once bob's client hears them again).
    assert!(eventually(Duration::from_secs(5), || stat(
        &mb, "%X %Y", "home/w"
    ) == "1100000000 1000000000\n"));
    ok(mb.sh("touch home/w"));
    let (atime, mtime) = {
        let s = stat(&mb, "%X %Y", "home/w");
        let mut it = s.split_whitespace().map(|t| t.parse::<u64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    };
    assert!(atime > 1_700_000_000, "atime now: {atime}");
    assert!(mtime > 1_700_000_000, "mtime now: {mtime}");
    assert_eq!(errno(&mb, "utime(undef, undef, \"home/w\")"), "OK");
    assert_eq!(errno(&mb, "utime(5, 5, \"home/w\")"), "EPERM");
    assert_eq!(errno(&mb, "utime(undef, undef, \"home/f\")"), "EACCES");

    // ctime moves with chmod, link, unlink, rename and truncate.
    let ctime = |p: &str| stat(&ma, "%z", p);
    let changes = |op: &str, path: &str, after: &str| {
        let before = ctime(path);
        std::thread::sleep(Duration::from_millis(20));
        ok(ma.sh(op));
        assert_ne!(before, ctime(after), "{op} changes the ctime of {after}");
    };
    changes("chmod 640 home/f", "home/f", "home/f");
    changes("ln home/f home/f2", "home/f", "home/f");
    changes("rm home/f2", "home/f", "home/f");
    changes("mv home/f home/f3", "home/f", "home/f3");
    changes("truncate -s 2 home/f3", "home/f3", "home/f3");
    let root = administrator(&cluster, "carol");
    let mr = root.mount(&[]);
    let before = ctime("home/f3");
    ok(mr.sh("chown 10001 home/f3"));
    assert!(
        eventually(Duration::from_secs(5), || ctime("home/f3") != before),
        "chown changes the ctime"
    );
}
