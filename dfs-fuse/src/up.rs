//! `dfs up`: a whole local cluster plus a mount, in one foreground command.

use std::time::Duration;

use anyhow::Context;
use dfs_server::cluster::{self, ClusterConfig};
use tokio_util::sync::CancellationToken;

use crate::cli::UpArgs;
use crate::creds::{CredStore, KnownKeys};
use crate::remote::{Remote, RemoteConfig};
use crate::session;

/// The user `dfs up` creates and logs in as.
pub const DEFAULT_USER: &str = "dfs";

const HELLO: &str = "Hello from dfs!\n\nThis directory is a distributed file system: files are cached whole on open\nand pushed to the replicated file servers, under a per-file lock, on close.\n";

/// Starts the cluster, signs the default user up and in, writes `Hello.txt` into a fresh
/// store, mounts, and on Ctrl-C/SIGTERM unmounts (pushing pending uploads) and stops.
pub async fn run(a: UpArgs) -> anyhow::Result<()> {
    // Catch Ctrl-C/SIGTERM from the very start: a signal during start-up (even while Hello.txt
    // is written into the mount) must stop this process cleanly, not kill it with its mount
    // half set up, and must not be lost before the mount waits for it.
    let stop = CancellationToken::new();
    let signal = dfs_server::cli::listen_for_shutdown();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            signal.await;
            stop.cancel();
        }
    });
    dfs_server::cluster::create_private_dir(&a.data)
        .with_context(|| format!("creating {}", a.data.display()))?;
    std::fs::create_dir_all(&a.mountpoint)
        .with_context(|| format!("creating {}", a.mountpoint.display()))?;
    session::preflight(&a.mountpoint)?;
    let fresh = !a.data.join("directory").exists();
    let local_ids = local_ids_by_default(session::running_as_root(), a.local_ids, a.no_local_ids);
    if local_ids && !session::may_allow_other() {
        anyhow::bail!(
            "--local-ids shares the mount with the machine's users (allow_other), which FUSE \
             allows a non-root user only with `user_allow_other` in /etc/fuse.conf: add it, \
             run as root, or leave out --local-ids"
        );
    }
    let mut cfg = ClusterConfig::new(a.data.clone(), a.listen);
    // On a --local-ids mount a cluster uid is a local uid: with open signup any local user
    // could sign up until given the cluster uid of another local user, and act as that user
    // through a mount of their own. Only the cluster key holder signs users up then.
    cfg.auth.open_signup = !local_ids;
    (cfg.tls, cfg.client_tls) = a.tls.load()?;
    let config = RemoteConfig {
        tls: cfg.client_tls.clone(),
        op_timeout: a.cache.op_timeout(),
        ..RemoteConfig::default()
    };
    let cluster = tokio::select! {
        c = cluster::start(cfg) => c?,
        _ = stop.cancelled() => return Ok(()),
    };
    let server = cluster.directory_url.clone();
    let start = async {
        let pw_path = a.data.join("default-user.password");
        let password = match std::fs::read_to_string(&pw_path) {
            Ok(p) => p.trim().to_owned(),
            // Only a missing file means "first start"; any other error must not replace it.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("reading {}", pw_path.display()));
            }
            Err(_) => {
                let p = hex::encode(rand::random::<[u8; 16]>());
                dfs_server::store::write_durable(&pw_path, p.as_bytes(), 0o600)?;
                p
            }
        };
        let creds = CredStore::default_location()?;
        // This cluster's auth key was made (or read) by this very process: pin it for this
        // URL, replacing a pin of an earlier cluster there, so that `dfs login` to it works
        // after the data was made anew.
        let fingerprint = cluster.auth.fingerprint()?;
        let known = KnownKeys::beside(&creds);
        let remote = Remote::new(&server, None, Some(creds.clone()), config)?;
        let cluster_id = remote.cluster(true).await?.cluster_id;
        if known.get_for(&cluster_id, remote.servers())?.as_deref() != Some(fingerprint.as_str())
            || known.get(&server)?.as_deref() != Some(fingerprint.as_str())
        {
            known.put_for(&cluster_id, remote.servers(), &fingerprint)?;
        }
        remote.pin_auth_key(Some(fingerprint));
        let key = Some(cluster.cluster_key.as_str());
        if let Err(e) = remote.signup_as_admin(DEFAULT_USER, &password, key).await
            && !matches!(
                &e,
                crate::remote::RemoteError::Api {
                    code: common::ErrorCode::Exists,
                    ..
                }
            )
        {
            return Err(anyhow::anyhow!("creating the default user: {e}"));
        }
        // The single user of a local cluster is its administrator (acts as root, may chown).
        let admin = common::api::SetUserRequest {
            admin: Some(true),
            ..Default::default()
        };
        remote
            .set_user(DEFAULT_USER, &admin, &cluster.cluster_key)
            .await
            .context("making the default user the administrator")?;
        let login = remote
            .login(DEFAULT_USER, &password)
            .await
            .context("logging in the default user")?;
        creds.put_for(&cluster_id, remote.servers(), Some(login))?;
        let mut opts = a
            .cache
            .options(remote.servers(), a.mountpoint.clone(), &cluster_id)?;
        opts.local_ids = local_ids;
        session::mount(remote, &opts)
    };
    let result = async {
        let m = tokio::select! {
            m = start => m?,
            _ = stop.cancelled() => return Ok(()),
        };
        // Hello.txt is written into this process's own mount, which the FUSE session serves
        // meanwhile: a signal caught during the write is acted on once it is done, by the
        // unmount below.
        if fresh {
            let written = write_hello(&a.mountpoint).await;
            // The kernel releases the file only after close() returned: an unmount before that
            // release would leave Hello.txt "open for writing" and the drain waiting for it.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while m.fs.open_writers() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if let Err(e) = written {
                m.unmount().await?;
                return Err(e);
            }
        }
        println!("dfs is up: mounted at {}", a.mountpoint.display());
        println!("directory: {server}   (another client: dfs login --server {server} ...; dfs mount DIR --server {server})");
        if local_ids {
            println!(
                "signup is closed (local uids are cluster uids): dfs signup --server {server} --cluster-key-file {} --user NAME",
                a.data.join("cluster.key").display()
            );
        }
        println!("press Ctrl-C to unmount and stop");
        m.wait_for(stop.cancelled()).await;
        session::report_pending(m.unmount().await?)
    }
    .await;
    cluster.shutdown().await;
    result
}

/// Whether `dfs up` mounts with `--local-ids`: when asked (`--local-ids`), never when asked
/// not to, and otherwise only when run as root. Local POSIX behaviour (each local user, and a
/// program that switches users, acting as itself) is root's default; a user other than root
/// mounts as the `dfs` user for itself only, as before: sharing its mount with every local
/// user, and making its older files (the `dfs` user's) read-only to itself, is asked for.
pub fn local_ids_by_default(root: bool, asked: bool, refused: bool) -> bool {
    !refused && (asked || root)
}

/// Writes `Hello.txt` into the mount on a thread of its own (not the runtime's blocking pool,
/// whose shutdown would wait for a write stuck in the mount), for up to 60 s.
async fn write_hello(mountpoint: &std::path::Path) -> anyhow::Result<()> {
    let path = mountpoint.join("Hello.txt");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let p = path.clone();
    std::thread::Builder::new()
        .name("dfs-hello".into())
        .spawn(move || {
            let _ = tx.send(std::fs::write(&p, HELLO));
        })
        .context("starting the Hello.txt writer")?;
    tokio::time::timeout(Duration::from_secs(60), rx)
        .await
        .context("writing Hello.txt timed out")?
        .context("the Hello.txt writer stopped")?
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::local_ids_by_default;

    #[test]
    fn only_root_acts_as_each_local_user_unless_asked() {
        assert!(local_ids_by_default(true, false, false));
        assert!(!local_ids_by_default(true, false, true));
        assert!(
            !local_ids_by_default(false, false, false),
            "a user's own dfs up stays private"
        );
        assert!(local_ids_by_default(false, true, false));
    }
}
