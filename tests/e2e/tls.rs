//! Transport security: every service on TLS with a CA the test makes, a real mount whose
//! files round-trip over https (client to services, file server to file server and to the
//! directory), and the clear refusals: plain HTTP to a TLS service, an unknown CA, a bad PEM.

use std::time::Duration;

use dfs_tests::*;

#[test]
fn a_mount_round_trips_files_with_every_service_on_tls() {
    let certs = TestCerts::new();
    let cluster = SplitCluster::start_tls(2, &certs);
    assert!(cluster.url.starts_with("https://"));
    let map = http_get_json_using(
        &certs.client(),
        &format!("{}{}", cluster.url, common::routes::CLUSTER),
        None,
    );
    for url in [&map["auth_url"], &map["lock_url"]]
        .into_iter()
        .chain(map["servers"].as_array().unwrap().iter().map(|s| &s["url"]))
    {
        assert!(
            url.as_str().unwrap().starts_with("https://127.0.0.1:"),
            "every service registers an https URL: {map}"
        );
    }

    let a = Client::with_ca(&cluster.url, &certs.ca);
    a.signup_login("alice");
    // Administrator commands trust the CA too (they send the cluster key).
    let key = cluster.cluster_key_file();
    let key = key.to_str().unwrap();
    ok(a.run(
        &["group", "add", "staff", "alice", "--cluster-key-file", key],
        "",
    ));
    assert!(ok(a.run(&["group", "list", "--cluster-key-file", key], "")).contains("staff"));
    ok(a.run(&["user", "list", "--cluster-key-file", key], ""));
    let ma = a.mount(&[]);
    ok(ma.sh("echo 'sealed in transit' > t.txt && mkdir d && seq 1 20000 > d/big"));
    // The primary pushed its copy to the other file server over https.
    let meta = cluster.meta_of("t.txt");
    let (node, hash) = (
        meta["id"].as_u64().unwrap(),
        meta["hash"].as_str().unwrap().to_owned(),
    );
    assert!(
        eventually(Duration::from_secs(20), || {
            ["file-1", "file-2"]
                .iter()
                .all(|f| has_blob(&cluster.data_dir(f), node, &hash))
        }),
        "both file servers hold the file: {}",
        cluster.logs()
    );

    // Another client (fresh cache) downloads over https what the first wrote.
    let b = Client::with_ca(&cluster.url, &certs.ca);
    b.signup_login("bob");
    let mb = b.mount(&[]);
    assert_eq!(ok(mb.sh("cat t.txt")), "sealed in transit\n");
    assert_eq!(ok(mb.sh("wc -l < d/big")).trim(), "20000");
    let status = ok(b.run(&["status"], ""));
    assert!(status.contains("https://"), "{status}");
    drop(mb);
    drop(ma);
}

#[test]
fn plain_http_to_tls_an_unknown_ca_and_a_bad_pem_fail_clearly() {
    let certs = TestCerts::new();
    let args = certs.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let cluster = Cluster::start(&args);
    assert!(cluster.url.starts_with("https://"), "{}", cluster.url);
    let trusted = Client::with_ca(&cluster.url, &certs.ca);
    trusted.signup_login("alice");

    // The same server named with http://: the service answers in plain HTTP that it speaks
    // TLS only.
    let plain_url = cluster.url.replace("https://", "http://");
    let plain = Client::with_ca(&plain_url, &certs.ca);
    fails_with(
        plain.run(
            &["login", "--user", "alice", "--password-stdin"],
            "password123\n",
        ),
        "speaks TLS only: use an https:// URL",
    );

    // https, without the CA: the message says what to pass.
    let untrusting = Client::new(&cluster.url);
    fails_with(
        untrusting.run(
            &["login", "--user", "alice", "--password-stdin"],
            "password123\n",
        ),
        "--ca-file",
    );

    // A bad PEM path names the file.
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("dfs-server"))
        .args(["all", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .args(["--tls-cert", "/nonexistent/cert.pem", "--tls-key"])
        .arg(&certs.key)
        .output()
        .unwrap();
    fails_with(out, "/nonexistent/cert.pem");
}

#[test]
fn the_auth_key_is_pinned_at_first_login_and_a_changed_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let data = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut cluster = Cluster::start_at(data.path(), &listen, &[]);
    let first = cluster.auth_key_fingerprint();
    assert!(first.starts_with("SHA256:") && first.len() == 50, "{first}");
    let alice = Client::new(&cluster.url);
    // The first signup pins the key, and says which.
    let out = alice.run(
        &["signup", "--user", "alice", "--password-stdin"],
        "password123\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && err.contains(&format!(
                "pinned the auth key of {}: {first} (first use",
                cluster.url
            )),
        "{err}"
    );
    alice.signup_login("alice");
    let pins = alice.config_dir().join("dfs/known_auth_keys.json");
    assert!(std::fs::read_to_string(&pins).unwrap().contains(&first));
    let mode = std::fs::metadata(&pins).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the pins are private");

    // A fingerprint given explicitly is checked before the password leaves.
    let bob = Client::new(&cluster.url);
    let wrong = format!("SHA256:{}", "A".repeat(43));
    fails_with(
        bob.run(
            &["login", "--user", "alice", "--password-stdin"]
                .into_iter()
                .chain(["--auth-key-fingerprint", wrong.as_str()])
                .collect::<Vec<_>>(),
            "password123\n",
        ),
        &format!("presents key {first}, not {wrong}"),
    );
    assert!(!bob.config_dir().join("dfs/known_auth_keys.json").exists());

    // The auth key is replaced (its file lost): Alice's client refuses to seal her password
    // with the new one, and says where the pin is.
    cluster.stop();
    std::fs::remove_file(data.path().join("auth/auth_key.pem")).unwrap();
    let cluster = Cluster::start_at(data.path(), &listen, &[]);
    let second = cluster.auth_key_fingerprint();
    assert_ne!(first, second);
    let login = ["login", "--user", "alice", "--password-stdin"];
    let out = alice.run(&login, "password123\n");
    fails_with(out.clone(), "the auth service's key changed");
    fails_with(out, pins.to_str().unwrap());
    // Told the new fingerprint, she pins it, and logs in as usual from then on.
    let explicit: Vec<&str> = login
        .into_iter()
        .chain(["--auth-key-fingerprint", second.as_str()])
        .collect();
    ok(alice.run(&explicit, "password123\n"));
    assert!(std::fs::read_to_string(&pins).unwrap().contains(&second));
    ok(alice.run(&login, "password123\n"));
}

#[test]
fn dfs_up_serves_tls_when_asked() {
    require_fuse();
    let certs = TestCerts::new();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let mut up = std::process::Command::new(bin("dfs"))
        .current_dir(tmp.path())
        .args(["up", "--listen", "127.0.0.1:0"])
        .args(certs.server_args())
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mnt = tmp.path().join("mnt");
    if !eventually(Duration::from_secs(60), || is_mounted(&mnt)) {
        terminate(&mut up, Duration::from_secs(5));
        panic!("dfs up did not mount");
    }
    assert!(ok(sh_in(&mnt, "cat Hello.txt")).starts_with("Hello from dfs!"));
    ok(sh_in(&mnt, "echo over tls > n.txt"));
    assert_eq!(ok(sh_in(&mnt, "cat n.txt")), "over tls\n");
    let status = terminate(&mut up, Duration::from_secs(60)).expect("dfs up exits on SIGTERM");
    assert!(status.success(), "dfs up exit status {status}");
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut up.stdout.take().unwrap(), &mut printed).unwrap();
    assert!(
        printed.contains("directory: https://127.0.0.1:"),
        "{printed}"
    );
}

/// Where a machine without CA certificates looks for them (nowhere).
const NO_SYSTEM_ROOTS: [(&str, &str); 2] = [
    ("SSL_CERT_FILE", "/nonexistent/dfs-test/ca.pem"),
    ("SSL_CERT_DIR", "/nonexistent/dfs-test/certs"),
];

#[test]
fn without_system_ca_certificates_plain_http_works_and_https_says_what_to_pass() {
    // Plain HTTP needs no CA certificates: neither the services nor the dfs command read them.
    let cluster = Cluster::start_with_env(&[], &NO_SYSTEM_ROOTS);
    assert!(cluster.url.starts_with("http://"), "{}", cluster.url);
    let c = Client::new(&cluster.url);
    let out = c.run_with_env(
        &["signup", "--user", "alice", "--password-stdin"],
        "password123\n",
        &NO_SYSTEM_ROOTS,
    );
    assert!(out.status.success(), "signup without system roots: {out:?}");
    let out = c.run_with_env(
        &["login", "--user", "alice", "--password-stdin"],
        "password123\n",
        &NO_SYSTEM_ROOTS,
    );
    assert!(out.status.success(), "login without system roots: {out:?}");
    let out = c.run_with_env(&["status"], "", &NO_SYSTEM_ROOTS);
    assert!(out.status.success(), "status without system roots: {out:?}");

    // An https URL without --ca-file on such a machine: a clear error, not a panic.
    let certs = TestCerts::new();
    let args = certs.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tls = Cluster::start_with_env(&args, &NO_SYSTEM_ROOTS);
    assert!(tls.url.starts_with("https://"), "{}", tls.url);
    let out = Client::new(&tls.url).run_with_env(
        &["login", "--user", "alice", "--password-stdin"],
        "password123\n",
        &NO_SYSTEM_ROOTS,
    );
    fails_with(out, "no CA certificates could be loaded from the system");
}

/// Spawns `dfs-server ARGS` with its output in `log`.
fn spawn_service(args: &[String], log: &std::path::Path) -> std::process::Child {
    let log = std::fs::File::create(log).unwrap();
    std::process::Command::new(bin("dfs-server"))
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[test]
fn a_split_tls_directory_whose_certificate_names_a_host_verifies_tokens() {
    // The certificate names only `localhost`: the directory's bound URL (https://127.0.0.1:P)
    // is not a name it may be reached by, so it must find the auth service through its own
    // registry, not by calling itself.
    let certs = TestCerts::for_names(&["localhost"]);
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("cluster.key");
    let (dir_port, auth_port) = (free_port(), free_port());
    let dir_url = format!("https://localhost:{dir_port}");
    let common = |name: &str| -> Vec<String> {
        let mut a = vec![
            "--data".to_owned(),
            root.path().join(name).display().to_string(),
            "--cluster-key-file".to_owned(),
            key.display().to_string(),
        ];
        a.extend(certs.server_args());
        a
    };
    let mut dir_args = vec!["directory".to_owned()];
    dir_args.extend(common("directory"));
    dir_args.extend(["--listen".to_owned(), format!("127.0.0.1:{dir_port}")]);
    let mut directory = spawn_service(&dir_args, &root.path().join("directory.log"));
    assert!(
        eventually(Duration::from_secs(20), || key.exists()),
        "cluster key not created"
    );
    let mut auth_args = vec!["auth".to_owned()];
    auth_args.extend(common("auth"));
    auth_args.extend([
        "--directory".to_owned(),
        dir_url.clone(),
        "--listen".to_owned(),
        format!("127.0.0.1:{auth_port}"),
        "--advertise".to_owned(),
        format!("https://localhost:{auth_port}"),
    ]);
    let mut auth = spawn_service(&auth_args, &root.path().join("auth.log"));
    let logs = || {
        ["directory.log", "auth.log"]
            .iter()
            .map(|l| std::fs::read_to_string(root.path().join(l)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let http = certs.client();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let registered = eventually(Duration::from_secs(30), || {
        rt.block_on(async {
            let r = http
                .get(format!("{dir_url}{}", common::routes::CLUSTER))
                .send()
                .await
                .ok()?;
            r.json::<serde_json::Value>().await.ok()
        })
        .is_some_and(|m| !m["auth_url"].is_null())
    });
    assert!(registered, "auth did not register: {}", logs());

    let c = Client::with_ca(&dir_url, &certs.ca);
    c.signup_login("alice");
    let creds: serde_json::Value = serde_json::from_slice(
        &std::fs::read(c.config_dir().join("dfs").join("credentials.json")).unwrap(),
    )
    .unwrap();
    let token = dfs_tests::only_saved_login(&creds)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    // A user request to the directory: its token is checked with the auth key it fetched.
    let status = rt.block_on(async {
        http.get(format!(
            "{dir_url}{}",
            common::routes::node(common::NodeId::ROOT)
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status()
    });
    assert!(status.is_success(), "GET root: {status}: {}", logs());
    terminate(&mut auth, Duration::from_secs(20));
    terminate(&mut directory, Duration::from_secs(20));
}
