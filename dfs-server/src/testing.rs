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
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !found.is_ok_and(|s| s.success()) {
            return Err(
                "the etcd binary is not on PATH: install etcd-server (apt-get install \
                 etcd-server etcd-client) to run the etcd tests"
                    .into(),
            );
        }
        let (client, peer) = (free_port()?, free_port()?);
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
            "t".into(),
            "--data-dir".into(),
            data_dir.join("member").display().to_string(),
            "--listen-client-urls".into(),
            client_url.clone(),
            "--advertise-client-urls".into(),
            client_url,
            "--listen-peer-urls".into(),
            peer_url.clone(),
            "--initial-advertise-peer-urls".into(),
            peer_url.clone(),
            "--initial-cluster".into(),
            format!("t={peer_url}"),
            "--log-level".into(),
            "warn".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        // etcd runs until our stdin closes (this process exits or drops the server), then the
        // shell kills it and removes its data.
        let script = r#"dir="$1"; shift
etcd "$@" >"$dir/etcd.log" 2>&1 &
pid=$!
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
        let mut server = EtcdServer {
            child,
            endpoint,
            data_dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if healthy(&server.endpoint) {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("etcd exited at start ({status}): {}", server.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "etcd on {} was not healthy within {} s: {}",
            server.endpoint,
            START_TIMEOUT.as_secs(),
            server.log()
        ))
    }

    /// The end of etcd's log (for failure messages).
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.data_dir.join("etcd.log")).unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        log.get(start..).unwrap_or_default().to_owned()
    }

    /// `--meta` for this server under `prefix`.
    pub fn meta_url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoint)
    }
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
