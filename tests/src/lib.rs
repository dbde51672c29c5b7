//! Harness for the end-to-end tests: real `dfs-server` and `dfs` binaries on loopback, real FUSE
//! mounts in temp dirs, each client with its own config and cache directories (two clients on
//! one machine behave as two machines). Everything is stopped with SIGTERM, then killed.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a harness failure is a test failure

mod disk;
mod tls;
/// A throwaway etcd on loopback (`EtcdServer::start`, or the binary's `shared_etcd`), for
/// directories started with `--meta etcd://...`.
pub use dfs_server::testing as etcd;
pub use disk::LoopDisk;
pub use tls::TestCerts;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// Parses a Prometheus / OpenMetrics text exposition strictly: every sample line is
/// `name{labels} value` with a number for value, and the text ends with `# EOF`. Returns each
/// series (name with labels) and its value.
pub fn parse_metrics(text: &str) -> std::collections::HashMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "exposition must end with # EOF"
    );
    let mut out = std::collections::HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let name = series.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        out.insert(series.to_owned(), value);
    }
    out
}

/// Blocking GET of a text document.
pub fn http_get_text(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        dfs_server::tls::client()
            .expect("an HTTP client")
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
}

/// Where the file server with data directory `data` keeps the blob `(node, hash)`: a record in
/// one of its packs (path, body offset, length), or a file of its own (offset 0; a legacy
/// slot's trailer not counted).
pub fn blob_location(data: &Path, node: u64, hash: &str) -> Option<(PathBuf, u64, u64)> {
    let packs = dfs_server::file::pack::stored(&data.join(dfs_server::file::PACKS)).unwrap();
    if let Some((path, loc)) = packs.get(&(node, hash.to_owned())) {
        return Some((path.clone(), loc.body, loc.len));
    }
    let shard = data.join(format!("objects/{:02x}", node % 256));
    let with_trailer = shard.join(format!("{node}-{hash}.t"));
    let plain = shard.join(format!("{node}-{hash}"));
    if let Ok(m) = std::fs::metadata(&with_trailer) {
        return Some((with_trailer, 0, m.len().saturating_sub(56)));
    }
    std::fs::metadata(&plain).ok().map(|m| (plain, 0, m.len()))
}

/// Whether the file server with data directory `data` stores the blob `(node, hash)`.
pub fn has_blob(data: &Path, node: u64, hash: &str) -> bool {
    blob_location(data, node, hash).is_some()
}

/// The stored bytes of a blob, as they are on disk (corrupt ones too).
pub fn blob_content(data: &Path, node: u64, hash: &str) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let (path, at, len) = blob_location(data, node, hash)?;
    let mut buf = vec![0u8; len as usize];
    std::fs::File::open(path)
        .ok()?
        .read_exact_at(&mut buf, at)
        .ok()?;
    Some(buf)
}

/// Overwrites every byte of a stored blob with zeros, in place (same length).
pub fn corrupt_blob(data: &Path, node: u64, hash: &str) {
    use std::os::unix::fs::FileExt;
    let (path, at, len) = blob_location(data, node, hash).expect("blob stored");
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; len as usize], at).unwrap();
    f.sync_all().unwrap();
}

/// Every blob the file server with data directory `data` stores, as (node, hash), sorted.
pub fn stored_blobs(data: &Path) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> =
        dfs_server::file::pack::stored(&data.join(dfs_server::file::PACKS))
            .unwrap()
            .into_keys()
            .collect();
    if let Ok(shards) = std::fs::read_dir(data.join("objects")) {
        for shard in shards.flatten() {
            for f in std::fs::read_dir(shard.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = f
                    .file_name()
                    .to_string_lossy()
                    .trim_end_matches(".t")
                    .to_owned();
                if let Some((n, h)) = name.split_once('-')
                    && let Ok(n) = n.parse()
                    && !name.starts_with('.')
                {
                    out.push((n, h.to_owned()));
                }
            }
        }
    }
    out.sort();
    out
}

/// Fails (never skips) when there is no FUSE device: CI must run the mount tests.
pub fn require_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the mount tests need FUSE"
    );
}

/// Sends SIGTERM, waits up to `grace`, then SIGKILL.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Reads `child`'s stdout until a line contains `marker`; returns the rest of that line.
/// Copies everything into `log`.
fn wait_for_line(child: &mut Child, marker: &str, log: PathBuf) -> String {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(log).expect("log file");
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            if !sent && let Some(pos) = line.find(&marker) {
                let _ = tx.send(line[pos + marker.len()..].trim().to_owned());
                sent = true;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("process never printed the expected line"))
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `dfs-server all` process.
pub struct Cluster {
    child: Child,
    /// The directory URL.
    pub url: String,
    /// Its data directory.
    pub data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts a cluster in a fresh temp dir on a free port.
    pub fn start(extra: &[&str]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Cluster::start_at(tmp.path(), "127.0.0.1:0", extra);
        c._tmp = Some(tmp);
        c
    }

    /// Stops the cluster and hands over its temp dir (if it made one), so that the caller
    /// decides when its files are deleted.
    pub fn stop_keeping_data(mut self) -> Option<tempfile::TempDir> {
        self.stop();
        self._tmp.take()
    }

    /// Starts a cluster on `data` listening at `listen`.
    pub fn start_at(data: &Path, listen: &str, extra: &[&str]) -> Cluster {
        Cluster::start_at_with_env(data, listen, extra, &[])
    }

    /// As `start`, with these environment variables set for the server.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = Cluster::start_at_with_env(tmp.path(), "127.0.0.1:0", extra, env);
        c._tmp = Some(tmp);
        c
    }

    /// As `start_at`, with these environment variables set for the server.
    pub fn start_at_with_env(
        data: &Path,
        listen: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Cluster {
        let mut child = Command::new(bin("dfs-server"))
            .envs(env.iter().copied())
            .arg("all")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(listen)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn dfs-server");
        let url = wait_for_line(&mut child, "directory: ", data.join("stdout.log"));
        Cluster {
            child,
            url,
            data: data.to_path_buf(),
            _tmp: None,
        }
    }

    /// The server process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The auth key fingerprint this cluster printed at start (what clients pin).
    pub fn auth_key_fingerprint(&self) -> String {
        let mut found = None;
        let printed = eventually(Duration::from_secs(10), || {
            let log = std::fs::read_to_string(self.data.join("stdout.log")).unwrap_or_default();
            found = log
                .lines()
                .find_map(|l| l.strip_prefix("auth key fingerprint: "))
                .map(|f| f.trim().to_owned());
            found.is_some()
        });
        assert!(printed, "the cluster printed no auth key fingerprint");
        found.unwrap()
    }

    /// Stops it (SIGTERM) and waits.
    pub fn stop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(20));
    }

    /// GET a JSON document from the directory.
    pub fn get_json(&self, path: &str) -> serde_json::Value {
        http_get_json(&format!("{}{path}", self.url))
    }

    /// Device flushes the cluster has asked for so far, read from the services' `/metrics`:
    /// (the directory's durable commits, every file server's blob fsyncs summed).
    pub fn flushes(&self) -> (f64, f64) {
        let metric = |url: &str, name: &str| -> f64 {
            parse_metrics(&http_get_text(&format!("{url}{}", common::routes::METRICS)))
                .get(name)
                .copied()
                .unwrap_or(0.0)
        };
        let cluster = self.get_json(common::routes::CLUSTER);
        let files: f64 = cluster["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| metric(s["url"].as_str().unwrap(), "dfs_file_fsyncs_total"))
            .sum();
        (metric(&self.url, "dfs_directory_fsyncs_total"), files)
    }

    /// Downloads served so far, summed over every file server.
    pub fn server_downloads(&self) -> u64 {
        let cluster = self.get_json(common::routes::CLUSTER);
        cluster["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let url = s["url"].as_str().unwrap();
                http_get_json(&format!("{url}{}", common::routes::FILE_STATS))["downloads"]
                    .as_u64()
                    .unwrap()
            })
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Blocking GET of a JSON document.
pub fn http_get_json(url: &str) -> serde_json::Value {
    http_get_json_with(url, None)
}

/// Blocking GET of a JSON document, with an optional (header, value).
pub fn http_get_json_with(url: &str, header: Option<(&str, &str)>) -> serde_json::Value {
    http_get_json_using(
        &dfs_server::tls::client().expect("an HTTP client"),
        url,
        header,
    )
}

/// Blocking GET of a JSON document with `client`, with an optional (header, value).
pub fn http_get_json_using(
    client: &reqwest::Client,
    url: &str,
    header: Option<(&str, &str)>,
) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut req = client.get(url);
        if let Some((k, v)) = header {
            req = req.header(k, v);
        }
        req.send().await.unwrap().json().await.unwrap()
    })
}

/// The one login in a parsed `credentials.json` (saved under its cluster id, `cluster:<id>`).
pub fn only_saved_login(creds: &serde_json::Value) -> &serde_json::Value {
    let all = creds.as_object().expect("credentials are a map");
    assert_eq!(all.len(), 1, "one saved login: {creds}");
    let (key, login) = all.iter().next().expect("one saved login");
    assert!(key.starts_with("cluster:"), "saved by cluster id: {key}");
    login
}

/// One client machine: its own XDG config and cache directories.
pub struct Client {
    home: tempfile::TempDir,
    /// Directory URL.
    pub server: String,
    /// `--ca-file` for every command (`DFS_CA_FILE`).
    ca_file: Option<PathBuf>,
}

impl Client {
    /// Hands over the client's config/cache temp dir, so that the caller decides when its
    /// files are deleted.
    pub fn into_home(self) -> tempfile::TempDir {
        self.home
    }

    /// A client of `server` with fresh config/cache dirs.
    pub fn new(server: &str) -> Client {
        Client {
            home: tempfile::tempdir().unwrap(),
            server: server.to_owned(),
            ca_file: None,
        }
    }

    /// A client of the TLS cluster at `server` that trusts the CA file `ca`.
    pub fn with_ca(server: &str, ca: &Path) -> Client {
        Client {
            ca_file: Some(ca.to_path_buf()),
            ..Client::new(server)
        }
    }

    /// Its config dir.
    pub fn config_dir(&self) -> PathBuf {
        self.home.path().join("config")
    }

    /// Its cache dir.
    pub fn cache_dir(&self) -> PathBuf {
        self.home.path().join("cache")
    }

    /// A `dfs` command with this client's environment.
    pub fn dfs(&self) -> Command {
        let mut c = Command::new(bin("dfs"));
        c.env("XDG_CONFIG_HOME", self.config_dir())
            .env("XDG_CACHE_HOME", self.cache_dir())
            .env("RUST_LOG", "warn")
            .env("DFS_SERVER", &self.server)
            .env_remove("DFS_CA_FILE")
            .stdin(Stdio::null());
        if let Some(ca) = &self.ca_file {
            c.env("DFS_CA_FILE", ca);
        }
        c
    }

    /// Runs `dfs ARGS` with `stdin` as input.
    pub fn run(&self, args: &[&str], stdin: &str) -> Output {
        self.run_with_env(args, stdin, &[])
    }

    /// As `run`, with these environment variables set.
    pub fn run_with_env(&self, args: &[&str], stdin: &str, env: &[(&str, &str)]) -> Output {
        let mut child = self
            .dfs()
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Signs `user` up and logs in.
    pub fn signup_login(&self, user: &str) {
        let out = self.run(
            &["signup", "--user", user, "--password-stdin"],
            "password123\n",
        );
        assert!(
            out.status.success() || String::from_utf8_lossy(&out.stderr).contains("exists"),
            "signup: {out:?}"
        );
        let out = self.run(
            &["login", "--user", user, "--password-stdin"],
            "password123\n",
        );
        assert!(out.status.success(), "login: {out:?}");
    }

    /// Mounts in a fresh temp dir with extra `dfs mount` flags.
    pub fn mount(&self, extra: &[&str]) -> Mount {
        require_fuse();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let log = std::fs::File::create(tmp.path().join("mount.log")).unwrap();
        let child = self
            .dfs()
            .arg("mount")
            .arg(&dir)
            .args(extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut m = Mount { child, dir, tmp };
        m.wait_mounted();
        m
    }
}

/// Whether `dir` is a mount point.
pub fn is_mounted(dir: &Path) -> bool {
    let want = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A running `dfs mount`.
pub struct Mount {
    child: Child,
    /// The mount point.
    pub dir: PathBuf,
    tmp: tempfile::TempDir,
}

impl Mount {
    fn wait_mounted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(&self.dir) {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("dfs mount exited with {s}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "mount did not appear: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The mount process's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("mount.log")).unwrap_or_default()
    }

    /// The mount process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Runs `sh -c script` inside the mount (bounded by `timeout`).
    pub fn sh(&self, script: &str) -> Output {
        sh_in(&self.dir, script)
    }

    /// Kills the mount process with SIGKILL (a client crash) and detaches the dead mount.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for cmd in [&["fusermount3", "-u", "-z"][..], &["umount", "-l"][..]] {
            let st = Command::new(cmd[0]).args(&cmd[1..]).arg(&self.dir).status();
            if st.is_ok_and(|s| s.success()) {
                break;
            }
        }
    }

    /// Unmounts with SIGTERM and waits for the process (which pushes pending uploads).
    pub fn unmount(mut self) -> Option<std::process::ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(60))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(30));
        if is_mounted(&self.dir) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.dir)
                .status();
        }
    }
}

/// `sh -c script` in `dir`, killed after 120 s.
pub fn sh_in(dir: &Path, script: &str) -> Output {
    // `cd` inside the shell, so a mount that refuses access fails the command, not the harness.
    Command::new("timeout")
        .arg("120")
        .arg("sh")
        .arg("-c")
        .arg(format!("cd \"$0\" && {script}"))
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Asserts a command failed with `what` in its standard error (an errno's text, a message).
pub fn fails_with(out: Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains(what),
        "expected {what:?}: status {} stderr {err}",
        out.status
    );
}

/// Asserts a shell command succeeded, printing its output otherwise; returns stdout.
pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "command failed ({}): stdout {:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cluster of separate processes (directory, lock, auth, N file servers) sharing one
/// cluster key, so that single services can be stopped and restarted.
pub struct SplitCluster {
    /// The directory URL.
    pub url: String,
    root: tempfile::TempDir,
    dir_port: u16,
    /// Running processes by name (`directory`, `lock`, `auth`, `file-1`, ...).
    pub procs: std::collections::BTreeMap<String, Child>,
    files: usize,
    file_args: Vec<String>,
    /// Flags for every service (TLS).
    service_args: Vec<String>,
    /// The client roots when the services serve TLS.
    tls: Option<dfs_server::tls::ClientTls>,
    /// Small disks (tmpfs) mounted for data dirs, unmounted on drop.
    small_disks: Vec<PathBuf>,
    /// `--meta` for every directory instance and every lock instance (etcd), if any, from
    /// their next start on.
    pub meta: Option<String>,
    /// Ports of directory instances 2, 3, ... (`directory-2`, ...), all on `meta`.
    more_dir_ports: Vec<u16>,
}

impl SplitCluster {
    /// As `start`, with file server `name`'s data on a tmpfs of `bytes` (a small disk that
    /// fills up). Needs root, as FUSE tests do.
    pub fn start_with_small_disk(files: usize, name: &str, bytes: u64) -> SplitCluster {
        let mut c = SplitCluster::unstarted(files, &[]);
        let disk = c.root.path().join(name);
        std::fs::create_dir_all(&disk).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&disk)
            .output()
            .unwrap();
        assert!(out.status.success(), "mounting a small disk: {out:?}");
        c.small_disks.push(disk);
        c.start_all();
        c
    }

    /// A cluster with its data dir and ports chosen, nothing running yet.
    fn unstarted(files: usize, file_args: &[&str]) -> SplitCluster {
        let root = tempfile::tempdir().unwrap();
        let dir_port = free_port();
        SplitCluster {
            url: format!("http://127.0.0.1:{dir_port}"),
            root,
            dir_port,
            procs: Default::default(),
            files,
            file_args: file_args.iter().map(|a| a.to_string()).collect(),
            service_args: vec![],
            tls: None,
            small_disks: vec![],
            meta: None,
            more_dir_ports: vec![],
        }
    }

    /// A cluster of `directories` directory instances sharing the etcd metadata store `meta`
    /// (`--meta etcd://...`), lock, auth and `files` file servers; every service but the
    /// directories names all directory URLs (`--directory URL,URL`). Instance 1 is
    /// `directory` at `url`, instance n is `directory-n` at `dir_url(n)`.
    pub fn start_multi(files: usize, directories: usize, meta: &str) -> SplitCluster {
        let mut c = SplitCluster::unstarted(files, &[]);
        c.meta = Some(meta.to_owned());
        c.more_dir_ports = (1..directories).map(|_| free_port()).collect();
        for n in 2..=directories {
            c.start_service(&format!("directory-{n}"));
        }
        c.start_all();
        c
    }

    /// As `start`, with the directory and the lock service on etcd (`--meta URL`): further
    /// lock instances start as `lock-2`, `lock-3`, ... with `start_service`.
    pub fn start_on_etcd(files: usize, meta: &str) -> SplitCluster {
        let mut c = SplitCluster::unstarted(files, &[]);
        c.meta = Some(meta.to_owned());
        c.start_all();
        c
    }

    /// The URL of directory instance `n` (1: `url`).
    pub fn dir_url(&self, n: usize) -> String {
        match n {
            0 | 1 => self.url.clone(),
            n => format!("http://127.0.0.1:{}", self.more_dir_ports[n - 2]),
        }
    }

    /// Every directory instance's URL, comma-separated (`--server`, `--directory`).
    pub fn directory_urls(&self) -> String {
        (1..=1 + self.more_dir_ports.len())
            .map(|n| self.dir_url(n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// As `start`, with every service serving TLS with `certs` and calling the others over
    /// https.
    pub fn start_tls(files: usize, certs: &TestCerts) -> SplitCluster {
        let mut c = SplitCluster::unstarted(files, &[]);
        c.url = format!("https://127.0.0.1:{}", c.dir_port);
        c.service_args = certs.server_args();
        c.tls = Some(dfs_server::tls::ClientTls::from_ca_file(&certs.ca).unwrap());
        c.start_all();
        c
    }

    /// Starts every service and waits until the cluster map is complete.
    fn start_all(&mut self) {
        self.start_service("directory");
        self.start_service("lock");
        self.start_service("auth");
        for i in 1..=self.files {
            self.start_service(&format!("file-{i}"));
        }
        self.wait_ready();
    }

    /// Starts every service and waits until the cluster map is complete.
    pub fn start(files: usize) -> SplitCluster {
        SplitCluster::start_with(files, &[])
    }

    /// As `start`, with extra flags for every file server.
    pub fn start_with(files: usize, file_args: &[&str]) -> SplitCluster {
        let mut c = SplitCluster::unstarted(files, file_args);
        c.start_all();
        c
    }

    /// (Re)starts one service on its own data dir.
    pub fn start_service(&mut self, name: &str) {
        let url = self.directory_urls();
        self.start_service_using(name, &url);
    }

    /// (Re)starts one service on its own data dir, telling it the directory is at `directory`
    /// (which may be wrong, on purpose).
    pub fn start_service_using(&mut self, name: &str, directory: &str) {
        let data = self.root.path().join(name);
        let key = self.root.path().join("cluster.key");
        let mut cmd = Command::new(bin("dfs-server"));
        let kind = name.split('-').next().unwrap();
        cmd.arg(kind)
            .arg("--data")
            .arg(&data)
            .arg("--cluster-key-file")
            .arg(&key);
        if kind == "directory" {
            let port = match name.strip_prefix("directory-") {
                Some(n) => self.more_dir_ports[n.parse::<usize>().unwrap() - 2],
                None => self.dir_port,
            };
            cmd.arg("--listen").arg(format!("127.0.0.1:{port}")).args([
                "--heartbeat-ms",
                "300",
                "--repair-interval-ms",
                "200",
            ]);
        } else {
            cmd.arg("--directory").arg(directory);
        }
        if kind == "file" {
            cmd.args(&self.file_args);
        }
        if let Some(meta) = &self.meta
            && (kind == "directory" || kind == "lock")
        {
            cmd.arg("--meta").arg(meta);
        }
        cmd.args(&self.service_args);
        let log = std::fs::File::create(self.root.path().join(format!("{name}.log"))).unwrap();
        // Lock instances log each grant (node, fence, waiter): what drills check tokens on.
        let log_level = if kind == "lock" {
            "info,dfs_server::lock=debug"
        } else {
            "info"
        };
        let child = cmd
            .env("RUST_LOG", log_level)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        if kind == "directory" {
            // The key file is created by the first service; give the others the same one.
            assert!(
                eventually(Duration::from_secs(20), || key.exists()),
                "cluster key not created"
            );
        }
        self.procs.insert(name.to_owned(), child);
    }

    /// Stops one service with SIGTERM (or SIGKILL with `kill9`).
    pub fn stop_service(&mut self, name: &str, kill9: bool) {
        if let Some(mut child) = self.procs.remove(name) {
            if kill9 {
                let _ = child.kill();
                let _ = child.wait();
            } else {
                terminate(&mut child, Duration::from_secs(20));
            }
        }
    }

    /// Waits until auth and lock are registered and every running file server is alive.
    pub fn wait_ready(&self) {
        let files = self.procs.keys().filter(|k| k.starts_with("file-")).count();
        let ready = eventually(Duration::from_secs(60), || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let http = self
                .tls
                .clone()
                .unwrap_or_default()
                .client()
                .expect("an HTTP client");
            let info: Option<serde_json::Value> = rt.block_on(async {
                let r = http
                    .get(format!("{}{}", self.url, common::routes::CLUSTER))
                    .send()
                    .await
                    .ok()?;
                r.json().await.ok()
            });
            let Some(i) = info else { return false };
            // The map may name a service restarted a moment ago, before it listens again:
            // ready means each named service answers too.
            let answers = |url: &serde_json::Value| {
                url.as_str().is_some_and(|u| {
                    rt.block_on(async {
                        http.get(format!("{u}{}", common::routes::HEALTH))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                    })
                })
            };
            answers(&i["auth_url"])
                && answers(&i["lock_url"])
                && i["servers"]
                    .as_array()
                    .is_some_and(|s| s.iter().filter(|s| s["alive"] == true).count() >= files)
        });
        assert!(ready, "split cluster did not become ready: {}", self.logs());
    }

    /// Data directory of a service.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// The cluster key file every service of this cluster shares.
    pub fn cluster_key_file(&self) -> PathBuf {
        self.root.path().join("cluster.key")
    }

    /// The process name (`file-N`) of file server `id`.
    pub fn file_service_of(&self, id: u64) -> String {
        (1..=self.files)
            .map(|i| format!("file-{i}"))
            .find(|n| {
                std::fs::read_to_string(self.data_dir(n).join("server_id"))
                    .is_ok_and(|s| s.trim() == id.to_string())
            })
            .unwrap_or_else(|| panic!("no file server with id {id}"))
    }

    /// Metadata of `/name` (root entry) as the directory has it, read with the cluster key.
    pub fn meta_of(&self, name: &str) -> serde_json::Value {
        let key = std::fs::read_to_string(self.root.path().join("cluster.key")).unwrap();
        let path = common::routes::child(common::NodeId::ROOT, name);
        let header = (common::routes::CLUSTER_KEY_HEADER, key.trim());
        let client = self
            .tls
            .clone()
            .unwrap_or_default()
            .client()
            .expect("an HTTP client");
        http_get_json_using(&client, &format!("{}{path}", self.url), Some(header))
    }

    /// Every service log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.root.path()).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                out.push_str(&format!(
                    "\n== {}\n{}",
                    e.path().display(),
                    std::fs::read_to_string(e.path()).unwrap_or_default()
                ));
            }
        }
        out
    }
}

impl Drop for SplitCluster {
    fn drop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            terminate(&mut c, Duration::from_secs(10));
        }
        for d in &self.small_disks {
            let _ = Command::new("umount").arg("-l").arg(d).status();
        }
    }
}
