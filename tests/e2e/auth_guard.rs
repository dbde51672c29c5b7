//! The auth service's guards: login and signup rate limits as the `dfs` command shows them,
//! one auth process per data directory (two never make two keys), and private data
//! directories and key files in every mode.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use dfs_tests::*;

fn mode_of(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn past_the_failed_login_rate_the_client_says_so_and_when_to_try_again() {
    let cluster = Cluster::start(&["--logins-per-user-per-minute", "2"]);
    let c = Client::new(&cluster.url);
    c.signup_login("alice");
    let login = |password: &str| {
        c.run(
            &["login", "--user", "alice", "--password-stdin"],
            &format!("{password}\n"),
        )
    };
    // Successes spend nothing; two wrong passwords spend this address's attempts for alice.
    assert!(login("password123").status.success());
    for _ in 0..2 {
        assert!(!login("wrong-password").status.success());
    }
    let out = login("password123");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("too many login or signup attempts for user alice from address"),
        "{err}"
    );
    assert!(err.contains("try again in"), "{err}");
    // Another user is not held back by alice's failures.
    Client::new(&cluster.url).signup_login("bob");
}

#[test]
fn data_directories_and_keys_are_private_in_all_and_single_service_modes() {
    let all = Cluster::start(&[]);
    let split = SplitCluster::start(1);
    let root = split.data_dir("auth").parent().unwrap().to_path_buf();
    for dir in [
        all.data.clone(),
        all.data.join("auth"),
        all.data.join("directory"),
        all.data.join("lock"),
        all.data.join("file-1"),
        split.data_dir("auth"),
        split.data_dir("directory"),
        split.data_dir("lock"),
        split.data_dir("file-1"),
    ] {
        assert_eq!(mode_of(&dir), 0o700, "{}", dir.display());
    }
    for key in [
        all.data.join("cluster.key"),
        all.data.join("auth/auth_key.pem"),
        root.join("cluster.key"),
        split.data_dir("auth").join("auth_key.pem"),
    ] {
        assert_eq!(mode_of(&key), 0o600, "{}", key.display());
    }
}

#[test]
fn of_two_auth_processes_started_on_one_data_dir_one_runs_and_one_key_is_made() {
    let data = tempfile::tempdir().unwrap();
    let auth_dir = data.path().join("auth");
    let start = || {
        Command::new(bin("dfs-server"))
            .arg("auth")
            .arg("--data")
            .arg(&auth_dir)
            .args(["--listen", "127.0.0.1:0"])
            // Nothing listens there: registration retries in the background, harmlessly.
            .args(["--directory", "http://127.0.0.1:9"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut procs = [start(), start()];
    // The loser exits at once; the winner runs until stopped.
    let mut loser = None;
    assert!(
        eventually(Duration::from_secs(30), || {
            loser = procs
                .iter_mut()
                .position(|p| p.try_wait().unwrap().is_some());
            loser.is_some()
        }),
        "one of the two must be refused"
    );
    let loser = loser.unwrap();
    let winner = 1 - loser;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        procs[winner].try_wait().unwrap().is_none(),
        "the other keeps running"
    );
    terminate(&mut procs[winner], Duration::from_secs(10));
    let [a, b] = procs;
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (lost, won) = if loser == 0 { (a, b) } else { (b, a) };
    let err = String::from_utf8_lossy(&lost.stderr);
    assert!(
        !lost.status.success() && err.contains("another auth service is already running on"),
        "{err}"
    );
    assert!(
        !String::from_utf8_lossy(&lost.stdout).contains("fingerprint"),
        "the refused one never got to a key"
    );
    // The one key on disk is the one the running service announced.
    let announced = String::from_utf8_lossy(&won.stdout)
        .lines()
        .find_map(|l| {
            l.split_once("key fingerprint ")
                .map(|(_, f)| f.trim().to_owned())
        })
        .expect("the running service printed its key's fingerprint");
    let pem = std::fs::read_to_string(auth_dir.join("auth_key.pem")).unwrap();
    assert_eq!(
        dfs_server::auth::keys::fingerprint_of_pem(&pem).unwrap(),
        announced
    );
    assert_eq!(mode_of(&auth_dir.join("auth_key.pem")), 0o600);
    assert_eq!(mode_of(&auth_dir), 0o700);
}
