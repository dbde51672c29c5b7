//! Test support shared by dfs-server's unit tests and the end-to-end crate (feature
//! `testing`): a throwaway etcd on loopback.
//!
//! `EtcdServer::start` runs the `etcd` binary (Debian: etcd-server) on free loopback ports with
//! a fresh data directory, under a small shell that kills it and removes the directory when
//! the test process goes away (its stdin, held by the process, closes), so that a test binary
//! that shares one server among its tests (`shared_etcd`) never leaves one running. A missing
//! binary is an error that says what to install: tests using etcd fail, they never skip.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a started etcd may take to answer `/health`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// An etcd member on loopback, stopped (and its data removed) when dropped or when the
/// process exits.
pub struct EtcdServer {
    child: Child,
    /// `127.0.0.1:<client port>`, as `--meta etcd://...` takes it.
    pub endpoint: String,
    /// The data directory (removed at the end).
    pub data_dir: PathBuf,
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("reading a free port: {e}"))
}

fn healthy(endpoint: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(endpoint) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET /health HTTP/1.0\r\nHost: {endpoint}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.take(4096).read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl EtcdServer {
    /// Starts a one-member etcd and waits (at most `START_TIMEOUT`) until it is healthy.
    /// `extra` are further flags (e.g. `--max-txn-ops`).
    pub fn start(extra: &[&str]) -> Result<Self, String> {
        let mut one = start_cluster(1, extra)?;
        one.pop().ok_or_else(|| "no member started".to_owned())
    }

    fn spawn(
        name: &str,
        client: u16,
        peer: u16,
        initial_cluster: &str,
        extra: &[&str],
    ) -> Result<Self, String> {
        let data_dir = std::env::temp_dir().join(format!(
            "dfs-etcd-{}-{client}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
        let endpoint = format!("127.0.0.1:{client}");
        let client_url = format!("http://{endpoint}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args: Vec<String> = vec![
            "--name".into(),
            name.into(),
            "--data-dir".into(),
            data_dir.join("member").display().to_string(),
            "--listen-client-urls".into(),
            client_url.clone(),
            "--advertise-client-urls".into(),
            client_url,
            "--listen-peer-urls".into(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            peer_url,
            "--initial-cluster".into(),
            initial_cluster.into(),
            "--log-level".into(),
            "warn".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        // etcd runs until our stdin closes (this process exits or drops the server), then the
        // shell kills it and removes its data.
        let script = r#"dir="$1"; shift
etcd "$@" >"$dir/etcd.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/etcd.pid"
cat >/dev/null
kill "$pid" 2>/dev/null
wait "$pid"
rm -rf "$dir""#;
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&data_dir)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting etcd: {e}"))?;
        Ok(EtcdServer {
            child,
            endpoint,
            data_dir,
        })
    }

    /// Waits until this member answers healthy, or fails with its log.
    fn wait_healthy(&mut self, deadline: Instant) -> Result<(), String> {
        while Instant::now() < deadline {
            if healthy(&self.endpoint) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("etcd exited at start ({status}): {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "etcd on {} was not healthy within {} s: {}",
            self.endpoint,
            START_TIMEOUT.as_secs(),
            self.log()
        ))
    }

    /// The end of etcd's log (for failure messages).
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.data_dir.join("etcd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        log.get(start..).unwrap_or_default().to_owned()
    }

    /// Kills this member with SIGKILL (a crash: no goodbye to its peers); its data is still
    /// removed when it is dropped.
    pub fn kill9(&self) -> Result<(), String> {
        let pid = std::fs::read_to_string(self.data_dir.join("etcd.pid"))
            .map_err(|e| format!("reading etcd's pid: {e}"))?;
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .map_err(|e| format!("kill -9: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -9 {} failed", pid.trim()))
        }
    }

    /// `--meta` for this member under `prefix`.
    pub fn meta_url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoint)
    }
}

fn etcd_installed() -> Result<(), String> {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if found.is_ok_and(|s| s.success()) {
        Ok(())
    } else {
        Err(
            "the etcd binary is not on PATH: install etcd-server (apt-get install \
             etcd-server etcd-client) to run the etcd tests"
                .into(),
        )
    }
}

/// Starts an etcd cluster of `members` members on loopback (`m0`, `m1`, ...) and waits, at
/// most `START_TIMEOUT`, until every member is healthy (which needs a quorum). Dropping a
/// member stops it: a test takes members down by dropping them.
pub fn start_cluster(members: usize, extra: &[&str]) -> Result<Vec<EtcdServer>, String> {
    etcd_installed()?;
    let ports = (0..members)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<Result<Vec<_>, String>>()?;
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        servers.push(EtcdServer::spawn(
            &format!("m{i}"),
            *client,
            *peer,
            &initial,
            extra,
        )?);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    for s in &mut servers {
        s.wait_healthy(deadline)?;
    }
    Ok(servers)
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // Closing stdin ends the shell's `cat`: it stops etcd and removes the data.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One etcd for the whole test binary (each test uses its own key prefix), started on first
/// use; it stops when the test process exits.
pub fn shared_etcd() -> Result<&'static EtcdServer, String> {
    static ETCD: OnceLock<Result<EtcdServer, String>> = OnceLock::new();
    ETCD.get_or_init(|| EtcdServer::start(&[]))
        .as_ref()
        .map_err(Clone::clone)
}
